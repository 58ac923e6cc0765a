"""Wanda (Sun et al., 2023) as a one-shot baseline: score ``|W_ij| * ||x_j||`` from calibration data,
keep the same fraction of every output row (Wanda's comparison group). Pruned weights stay pruned."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .. import wanda
from . import _scores as S
from .base import Pruner, set_mask


class WandaPruner(Pruner):
    """One-shot Wanda over every masked layer (weight granularity), per-row keep fraction chosen so
    that the model's keep ratio matches ``keep``. ``batch_size``/``batches`` of ``data`` calibrate."""

    name = "wanda"
    needs_data = True

    def __init__(self, batch_size: int = 128, batches: int = 4) -> None:
        if int(batch_size) < 1 or int(batches) < 1:
            raise ValueError(f"batch_size, batches: expected positive integers, got {batch_size}, {batches}")
        self.batch_size, self.batches = int(batch_size), int(batches)

    @torch.no_grad()
    def prune(self, model: nn.Module, keep: float, data: TensorDataset | None = None) -> None:
        if data is None:
            raise ValueError("data: Wanda needs calibration samples (images, labels)")
        layers = S.prunable(model)
        for name, m in layers:
            if m.granularity != "weight":
                raise ValueError(f"model: layer {name!r} has {m.granularity!r} granularity; Wanda prunes weights")
        x = data.tensors[0]
        calib = [(x[i : i + self.batch_size],) for i in range(0, min(len(x), self.batch_size * self.batches),
                                                              self.batch_size)]
        norms = wanda.collect_input_norms(model, calib)
        budget = S.Budget(model, [m for _, m in layers])
        target, _ = budget.target(keep)
        alive_total = sum(int(budget.alive[m].sum()) for _, m in layers)
        fraction = min(max((target - budget.fixed) / max(alive_total, 1), 0.0), 1.0)
        need = round(fraction * alive_total)
        # the same fraction of every row's alive weights, rounded so the counts add up exactly
        # (largest remainders first): rows differ by at most one kept weight
        per_row = torch.cat([budget.alive[m].reshape(m.weight.shape[0], -1).sum(1) for _, m in layers]).double()
        quota = per_row * fraction
        counts = quota.floor()
        extra = int(need - counts.sum())
        if extra > 0:
            counts[torch.sort(quota - counts, descending=True, stable=True).indices[:extra]] += 1
        counts = counts.long()
        offset = 0
        for name, m in layers:
            alive = budget.alive[m].reshape(m.weight.shape[0], -1)
            score = wanda.wanda_scores(m.mask_weight().detach(), norms[name]).reshape(alive.shape).double()
            score = torch.where(alive, score, torch.full_like(score, -torch.inf))
            k = counts[offset : offset + alive.shape[0]]
            offset += alive.shape[0]
            order = torch.sort(score, dim=1, descending=True, stable=True).indices
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(score.shape[1]).expand_as(score).contiguous())
            set_mask(m, ((rank < k[:, None]) & alive).reshape(m.weight_aux.shape))
