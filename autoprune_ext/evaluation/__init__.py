"""Evaluation beyond test accuracy (``shared/docs/evaluation.md`` sections 2-4).

* :mod:`.loop` — the prune-retrain loop (cascade / one-shot, geometric keep-ratio schedule,
  retraining with the mask enforced, several parents);
* :mod:`.metrics` — prune potential, excess error (zero-intercept fit), functional similarity
  under uniform input noise;
* :mod:`.study` — methods x ratios x distributions, ``potential.json``;
* :mod:`.plots` — the PNGs.
"""

from __future__ import annotations

from .loop import (
    RetrainConfig,
    bake_masks,
    geometric_ratios,
    prepare,
    prune_retrain,
    prune_retrain_parents,
    retrain,
    train_parent,
)
from .metrics import (
    NoiseProbe,
    excess_error,
    fit_zero_intercept,
    noise_levels,
    noise_prune_potential,
    output_distances,
    prune_potential,
    prune_potential_from_accuracy,
)

__all__ = [
    "NoiseProbe",
    "RetrainConfig",
    "bake_masks",
    "excess_error",
    "fit_zero_intercept",
    "geometric_ratios",
    "noise_levels",
    "noise_prune_potential",
    "output_distances",
    "prepare",
    "prune_potential",
    "prune_potential_from_accuracy",
    "prune_retrain",
    "prune_retrain_parents",
    "retrain",
    "train_parent",
]
