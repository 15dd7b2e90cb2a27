"""Fine-tuning VLAs on reasoning-enriched datasets (refine-train comes with its own issue)."""
