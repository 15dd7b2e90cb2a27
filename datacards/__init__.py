"""Dataset-card templates and their renderer."""
