"""WT, weight thresholding (``shared/docs/evaluation.md`` §1): score ``|W_ij|``, one global threshold
over all masked layers. SiPP reuses the global top-B selection of this module with its own scores."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..nn import MaskedModule
from . import _scores as S
from .base import Pruner, set_mask


def wt_scores(model: nn.Module) -> dict[str, Tensor]:
    """``|W|`` of every masked layer's current (masked) weight, keyed by layer name."""
    return {name: layer.masked_weight().abs() for name, layer in S.prunable(model)}


@torch.no_grad()
def global_top(model: nn.Module, scores: dict[MaskedModule, Tensor], keep: float, method: str) -> None:
    """Keep the highest-scoring weights over all layers (ties in layer, then index order) so that
    :func:`~autoprune_ext.pruners.base.keep_ratio` is as close as possible to ``keep``; pruned weights
    stay pruned. ValueError if the tolerance cannot be met."""
    layers = list(scores)
    budget = S.Budget(model, layers)
    target, tol = budget.target(keep)
    alive = torch.cat([budget.alive[m].flatten().cpu() for m in layers])
    flat = torch.cat([scores[m].detach().flatten().to(torch.float64).cpu() for m in layers])
    flat = torch.where(alive, flat, torch.full_like(flat, -torch.inf))  # zero or pruned: never chosen first
    order = torch.sort(flat, descending=True, stable=True).indices
    need = target - budget.fixed  # nonzero weights to keep
    if need < -tol:
        raise ValueError(
            f"keep: {method} cannot go below keep ratio {budget.fixed / budget.total:.4g}: the parameters it "
            f"does not prune (biases, norms) already take {budget.fixed} of {budget.total}; requested {keep:.4g}"
        )
    n_alive = int(alive.sum())
    if need > n_alive + tol:
        raise ValueError(
            f"keep: {method} can keep at most a ratio of {(budget.fixed + n_alive) / budget.total:.4g} "
            f"on this model (pruned weights are not revived), requested {keep:.4g}"
        )
    b = min(max(int(round(need)), 0), n_alive)  # the top-b entries of ``order`` are the alive ones
    keep_flat = torch.zeros_like(alive)
    keep_flat[order[:b]] = True
    start = 0
    for m in layers:
        n = m.weight.numel()
        set_mask(m, keep_flat[start:start + n].reshape(m.weight.shape).to(m.weight.device) & m.mask())
        start += n


class WTPruner(Pruner):
    """Weight thresholding: keep the largest ``|W|`` over all masked layers (weight granularity)."""

    name = "wt"
    needs_data = False

    def scores(self, model: nn.Module, data: Dataset | None = None) -> dict[str, Tensor]:
        """Per-layer scores ``|W|`` (weight shape), keyed by layer name."""
        return wt_scores(model)

    def prune(self, model: nn.Module, keep: float, data: Dataset | None = None) -> None:
        """Global threshold on ``|W|`` so that the keep ratio is within 0.5% of ``keep`` (``data`` unused)."""
        keep = S.check_keep(keep)
        layers = S.prunable(model)
        S.require_weight_granularity(layers, "WT")
        global_top(model, {m: m.masked_weight().abs() for _, m in layers}, keep, "WT")
        S.check_achieved(model, keep, "WT")
