"""Simulator backends behind one batched interface (`base.Simulator`)."""
