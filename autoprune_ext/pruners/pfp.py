"""PFP, provable filter pruning, deterministic variant (``shared/docs/evaluation.md`` §1).

Prunes whole *input channels* (columns of a linear layer, input-channel slices of a convolution).
Score of input channel ``c``: ``s_c = max_{x in S} max_{i, kernel position, p} g_ij(x, p)`` with the
relative contribution ``g`` of SiPP (``j`` = channel ``c`` at one kernel position). Budget per layer:
``c_l = 2 * 3 * ln(8 (P_l + 1) K_l / delta) * sum_c s_c`` (``P_l`` output patches, ``K_l`` kernel area),
``m_l(eps) = ceil(3 (6 + 2 eps) c_l / eps^2)`` draws, kept channels = the expected number of distinct
channels among ``m_l`` draws with ``p_c = s_c / sum s``, i.e. ``sum_c 1 - (1 - p_c)^m_l`` (rounded, at
least 1); one global ``eps``, bisected in log-space, meets the requested keep ratio; each layer keeps its
top channels by ``s_c``. A layer whose input channel ``c`` is pruned makes the previous masked layer's
filter ``c`` dead when that filter feeds nothing else: it is pruned and its bias / norm parameters
zeroed (see :func:`autoprune_ext.pruners._scores.close_dead`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..nn import MaskedModule
from . import _scores as S
from .base import Pruner


@torch.no_grad()
def pfp_scores(model: nn.Module, images: Tensor, batch_size: int = 32) -> dict[str, Tensor]:
    """PFP input-channel scores ``[in]`` (float64) of every masked layer over the sample set ``images``
    (all of them: no ``|S|`` selection here), keyed by layer name."""
    layers = S.prunable(model)
    best = {m: torch.zeros(m.weight[0].numel(), dtype=torch.float64, device=m.weight.device) for _, m in layers}
    weights = {m: S.effective_weight2d(m) for _, m in layers}
    for inputs in S.layer_inputs(model, [m for _, m in layers], images, batch_size):
        for m, a in inputs.items():
            pts = S.split_signs(S.patches(m, a.to(torch.float64)))
            step = max(1, S.CHUNK_ELEMS // max(pts.shape[1] * pts.shape[2], 1))
            for s in range(0, pts.shape[0], step):  # bound the [B, J, P] intermediates
                part = pts[s:s + step]
                g = S.Contributions.of(weights[m], part).max_over_units_and_patches(part)  # [B, J]
                best[m] = torch.maximum(best[m], g.amax(dim=0))
    return {name: best[m].reshape(m.weight.shape[1], -1).amax(dim=1) for name, m in layers}


def budget_constant(scores: Tensor, positions: int, kernel_area: int, delta: float = S.DELTA) -> float:
    """``c_l = 2 * 3 * ln(8 (P_l + 1) K_l / delta) * sum_c s_c``."""
    return 6.0 * math.log(8.0 * (positions + 1) * kernel_area / delta) * float(scores.sum())


def sample_count(c: float, eps: float) -> float:
    """``m_l(eps) = ceil(3 (6 + 2 eps) c_l / eps^2)`` (a float: it can be astronomically large)."""
    return float(math.ceil(3.0 * (6.0 + 2.0 * eps) * c / (eps * eps))) if c > 0 else 0.0


def expected_distinct(scores: Tensor, m: float) -> float:
    """Expected number of distinct channels among ``m`` draws with ``p_c = s_c / sum s``:
    ``sum_c 1 - (1 - p_c)^m``."""
    s = scores.detach().to(torch.float64).cpu()
    total = float(s.sum())
    if total <= 0 or m <= 0:
        return 0.0
    p = s / total
    pos = p > 0
    miss = torch.exp(m * torch.log1p(-p[pos].clamp(max=1.0)))
    return float((1.0 - miss).sum())


class PFPPruner(Pruner):
    """PFP (deterministic): input-channel sensitivities from held-out data, sample-complexity budget.

    Args:
        delta: failure probability of the bounds (``|S|`` and ``c_l``).
        max_samples: an extra cap on ``|S|`` (the spec's cap is half of ``data``).
        batch_size: images per forward while collecting layer inputs (scores stay per image).
    """

    name = "pfp"
    needs_data = True

    def __init__(self, delta: float = S.DELTA, max_samples: int | None = None, batch_size: int = 32) -> None:
        self.delta, self.max_samples, self.batch_size = float(delta), max_samples, int(batch_size)

    def scores(self, model: nn.Module, data: Dataset | Tensor | None) -> dict[str, Tensor]:
        """Per-layer input-channel scores ``[in]`` on ``S`` (the first ``|S|`` images of ``data``)."""
        images = S.images_of(data, "PFP")
        graph = S.trace(model, images[:1])
        return pfp_scores(model, S.choose_samples(images, graph, self.delta, self.max_samples), self.batch_size)

    def prune(self, model: nn.Module, keep: float, data: Dataset | Tensor | None = None) -> None:
        """Prune input channels (one global ``eps``) so that the keep ratio is within 0.5% of ``keep``."""
        keep = S.check_keep(keep)
        named = S.prunable(model)
        S.require_weight_granularity(named, "PFP")
        images = S.images_of(data, "PFP")
        layers = [m for _, m in named]
        graph = S.trace(model, images[:1])
        by_name = pfp_scores(model, S.choose_samples(images, graph, self.delta, self.max_samples), self.batch_size)
        scores = {m: by_name[name].cpu() for name, m in named if m in graph.positions}
        consts = {
            m: budget_constant(s, graph.positions[m], math.prod(m.weight.shape[2:]), self.delta)
            for m, s in scores.items()
        }
        orders = {m: torch.sort(s, descending=True, stable=True).indices for m, s in scores.items()}
        search = S.StructuredSearch(S.Budget(model, layers), graph, orders, "cols", "PFP")

        def k_of(theta: float) -> dict[MaskedModule, int]:  # theta = -ln(eps): larger keeps more
            eps = math.exp(-theta)
            return {m: int(round(expected_distinct(s, sample_count(consts[m], eps)))) for m, s in scores.items()}

        k = search.solve(k_of, -math.log(1e12), -math.log(1e-12), keep)
        S.apply_plan(search.plan(k), layers)
        S.check_achieved(model, keep, "PFP")
