"""SiPP, sensitivity-informed provable pruning, deterministic variant (``shared/docs/evaluation.md`` §1).

Score of weight ``W_ij`` (``j`` a column of ``W.reshape(out, -1)``: input channel and kernel position):
``s_ij = max_{x in S} mean_p g_ij(x, p)`` with the relative contribution
``g_ij(x, p) = max(W+_ij a_j / z+_i, W-_ij a_j / z-_i)`` over the input patches ``p`` of sample ``x``
(``z+ = W+ a``, ``z- = W- a``, no bias; a term with ``z ~ 0`` counts as 0; inputs that can be negative
give two points, ``a+`` and ``a-``). Budget: global top-B over all layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..nn import MaskedModule
from . import _scores as S
from .base import Pruner
from .wt import global_top


@torch.no_grad()
def sipp_scores(model: nn.Module, images: Tensor, batch_size: int = 32) -> dict[str, Tensor]:
    """SiPP scores (weight shape, float64) of every masked layer over the sample set ``images``
    (all of them: no ``|S|`` selection here), keyed by layer name. Weight-granularity layers only
    matter for pruning, but every masked layer is scored."""
    layers = S.prunable(model)
    best = {m: torch.zeros(m.weight.shape[0], m.weight[0].numel(), dtype=torch.float64, device=m.weight.device)
            for _, m in layers}
    weights = {m: S.effective_weight2d(m) for _, m in layers}
    for inputs in S.layer_inputs(model, [m for _, m in layers], images, batch_size):
        for m, a in inputs.items():
            pts = S.split_signs(S.patches(m, a.to(torch.float64)))
            g = S.Contributions.of(weights[m], pts).max_mean_over_patches(pts)  # [out, J]
            best[m] = torch.maximum(best[m], g)
    return {name: best[m].reshape(m.weight.shape) for name, m in layers}


class SiPPPruner(Pruner):
    """SiPP (deterministic): per-weight sensitivities from held-out data, global top-B.

    Args:
        delta: failure probability in ``|S| = ceil(3 ln(8 eta_max eta / delta))``.
        max_samples: an extra cap on ``|S|`` (the spec's cap is half of ``data``).
        batch_size: images per forward while collecting layer inputs (scores stay per image).
    """

    name = "sipp"
    needs_data = True

    def __init__(self, delta: float = S.DELTA, max_samples: int | None = None, batch_size: int = 32) -> None:
        self.delta, self.max_samples, self.batch_size = float(delta), max_samples, int(batch_size)

    def sample_set(self, model: nn.Module, data: Dataset | Tensor | None) -> Tensor:
        """The images ``S`` the scores are computed on (the first ``|S|`` of ``data``)."""
        images = S.images_of(data, "SiPP")
        graph = S.trace(model, images[:1])
        return S.choose_samples(images, graph, self.delta, self.max_samples)

    def scores(self, model: nn.Module, data: Dataset | Tensor | None) -> dict[str, Tensor]:
        """Per-layer SiPP scores (weight shape) on ``S``, keyed by layer name."""
        return sipp_scores(model, self.sample_set(model, data), self.batch_size)

    def prune(self, model: nn.Module, keep: float, data: Dataset | Tensor | None = None) -> None:
        """Keep the top-B weights by SiPP score so that the keep ratio is within 0.5% of ``keep``."""
        keep = S.check_keep(keep)
        layers = S.prunable(model)
        S.require_weight_granularity(layers, "SiPP")
        by_name = self.scores(model, data)
        scores: dict[MaskedModule, Tensor] = {m: by_name[name] for name, m in layers}
        global_top(model, scores, keep, "SiPP")
        S.check_achieved(model, keep, "SiPP")
