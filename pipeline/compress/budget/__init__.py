"""A compression budget: per-layer MACs, measured sensitivity of every candidate, and the allocation that meets
the budget with the least summed sensitivity."""
