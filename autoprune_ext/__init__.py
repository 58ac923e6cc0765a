"""autoprune_ext: training-time pruning with learnable auxiliary masks (placeholder, being built)."""
