"""Baseline pruners that produce masks for the same layers AutoPrune masks."""

from .magnitude import global_magnitude_prune, prunable_layers

__all__ = ["global_magnitude_prune", "prunable_layers"]
