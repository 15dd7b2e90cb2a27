"""refine-eval: SimplerEnv benchmarking of refine-train policies, reports against the published
baselines, and attention maps. Nothing imports this package (it sits at the end of the chain)."""
