"""SimplerEnv evaluation of trained policies (refine-eval comes with its own issue)."""
