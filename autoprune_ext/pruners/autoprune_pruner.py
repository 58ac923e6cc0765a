"""AutoPrune and global magnitude pruning behind the :class:`~autoprune_ext.pruners.base.Pruner` interface.

Both work on a converted model (:func:`autoprune_ext.convert`) and leave ``+1`` / ``-1`` in every
``weight_aux``, so they run in the same prune-retrain loop as the baselines (WT, SiPP, FT, PFP):

* :class:`AutoPrunePruner` (``"autoprune"``) runs the AutoPrune trainer with ``target_density`` set
  from the requested keep ratio (its sparsity is driven by the target, not by a fixed ``lambda``),
  then matches the ratio exactly by ranking the learnt ``weight_aux`` values: the top entries are kept.
* :class:`GlobalMagnitudePruner` (``"magnitude"``) keeps the globally largest ``|W * h(M)|``
  (the reference point; same rule as :func:`autoprune_ext.pruners.global_magnitude_prune`, but
  written into the shared mask representation and matched to the keep ratio of *all* parameters).

Ratio matching (:func:`keep_top`): the keep ratio of :func:`~autoprune_ext.pruners.base.keep_ratio`
counts every nonzero parameter (biases and norms too), so the number of masked weights to keep is
``keep * total - (nonzero parameters outside the masked weights)``. Entries whose raw weight is
already zero (pruned in an earlier cascade cycle and baked) add nothing and are ranked last.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from ..nn import MaskedModule
from .base import Pruner, keep_ratio, masked_layers, parameter_counts, set_mask

#: relative tolerance of the achieved keep ratio (shared/docs/evaluation.md, section 1)
RATIO_TOLERANCE = 0.005


def _layers(model: nn.Module) -> list[tuple[str, MaskedModule]]:
    layers = list(masked_layers(model))
    if not layers:
        raise ValueError("model: has no masked layer; convert it first (autoprune_ext.convert)")
    return layers


def _check_keep(keep: float) -> float:
    keep = float(keep)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep: expected a fraction in (0, 1], got {keep}")
    return keep


@torch.no_grad()
def _entry_counts(layer: MaskedModule) -> Tensor:
    """Nonzero raw weights under each ``weight_aux`` entry (1/0 per weight; per unit: its nonzero count)."""
    nz = (layer.weight.detach() != 0)
    if tuple(layer.weight_aux.shape) == tuple(layer.weight.shape):
        return nz.flatten().long()
    return nz.reshape(nz.shape[0], -1).sum(1).long()


@torch.no_grad()
def masked_target(model: nn.Module, keep: float) -> int:
    """How many nonzero masked weights the model must keep for ``keep_ratio(model) == keep``."""
    nonzero, total = parameter_counts(model)
    masked_nonzero = sum(int((m.masked_weight() != 0).sum()) for _, m in masked_layers(model))
    return int(round(keep * total - (nonzero - masked_nonzero)))


@torch.no_grad()
def keep_top(model: nn.Module, scores: dict[str, Tensor], keep: float, *, check: bool = True) -> float:
    """Keep the highest-scoring ``weight_aux`` entries over all masked layers (one global ranking) so
    that :func:`keep_ratio` is as close to ``keep`` as the granularity allows; prune the rest.

    ``scores[name]`` has the shape of that layer's ``weight_aux``. Returns the achieved keep ratio.
    The achieved ratio is the closest the entries allow (within 0.5% relative unless the model is so
    small that one entry is worth more). Raises ``ValueError`` when ``check`` and the target is out of
    reach by more than 0.5%: the parameters outside the masked weights alone exceed the budget, or too
    few masked weights are still nonzero.
    """
    keep = _check_keep(keep)
    layers = _layers(model)
    target = masked_target(model, keep)
    flat_scores, counts, sizes = [], [], []
    for name, layer in layers:
        s = scores[name].detach().to("cpu", torch.float64)
        if tuple(s.shape) != tuple(layer.weight_aux.shape):
            raise ValueError(f"scores[{name!r}]: expected shape {tuple(layer.weight_aux.shape)}, got {tuple(s.shape)}")
        flat_scores.append(s.flatten())
        counts.append(_entry_counts(layer).cpu())
        sizes.append(s.numel())
    score = torch.cat(flat_scores)
    count = torch.cat(counts)
    # entries that hold no nonzero weight go last; then by score, descending (stable: ties keep order)
    score = torch.where(count > 0, score, torch.full_like(score, -float("inf")))
    order = torch.sort(score, descending=True, stable=True).indices
    cum = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(count[order], 0)])  # cum[n]: kept by prefix n
    if target <= 0:
        n = 0
    else:
        n = int(torch.searchsorted(cum, torch.tensor([target])).item())  # first prefix reaching the target
        if n >= len(cum):
            n = len(cum) - 1
        elif n > 0 and target - int(cum[n - 1]) < int(cum[n]) - target:
            n -= 1  # the one-shorter prefix is closer
    keep_flat = torch.zeros(len(score), dtype=torch.bool)
    keep_flat[order[:n]] = True
    start = 0
    for (name, layer), size in zip(layers, sizes):
        set_mask(layer, keep_flat[start:start + size].reshape(layer.weight_aux.shape))
        start += size
    achieved = keep_ratio(model)
    if check and abs(achieved - keep) > RATIO_TOLERANCE * keep and not 0 < target <= int(cum[-1]):
        raise ValueError(
            f"keep: cannot reach keep ratio {keep:.4f} (achieved {achieved:.4f}): the parameters outside the masked "
            f"weights alone are {'more' if target <= 0 else 'fewer'} than that budget allows"
            if target <= 0 else
            f"keep: cannot reach keep ratio {keep:.4f} (achieved {achieved:.4f}): only {int(cum[-1])} masked weights "
            "are still nonzero"
        )
    return achieved


class GlobalMagnitudePruner(Pruner):
    """Global magnitude pruning: keep the largest ``|W * h(M)|`` over all masked layers (per unit:
    the mean ``|W|`` of the unit), matched to the keep ratio of all parameters."""

    name = "magnitude"
    needs_data = False

    @torch.no_grad()
    def prune(self, model: nn.Module, keep: float, data: TensorDataset | None = None) -> None:
        keep = _check_keep(keep)
        scores = {}
        for name, layer in _layers(model):
            mag = layer.masked_weight().abs()
            if tuple(layer.weight_aux.shape) != tuple(mag.shape):
                mag = mag.reshape(mag.shape[0], -1).mean(1)
            scores[name] = mag
        keep_top(model, scores, keep)


class AutoPrunePruner(Pruner):
    """AutoPrune as a pruning method: learn the masks with the AutoPrune trainer at a target density,
    then keep the top ``weight_aux`` entries so the keep ratio matches exactly (within 0.5%).

    Args:
        train: training set of the weight steps (default: ``data`` passed to :meth:`prune`).
        steps: AutoPrune iterations per :meth:`prune` call.
        config: trainer hyper-parameters (:class:`~autoprune_ext.autoprune.AutoPruneConfig`);
            ``target_density`` is overwritten per call. Default: the CLI's LeNet settings
            (``lambda`` 40 / 20, Adam on W at lr 1e-3, batch 64), a larger controller gain so
            the density follows the target within a few hundred steps.
        progress: show the trainer's progress bar.

    ``prune(model, keep, data)``: ``data`` is the held-out set of the bi-level mask steps. Masks of
    kept entries are re-initialised to ``config.mask_init`` before training; entries already pruned
    keep their negative ``weight_aux``. The weights are trained too (that is part of AutoPrune);
    the prune-retrain loop retrains them afterwards with the mask fixed.
    """

    name = "autoprune"
    needs_data = True

    def __init__(self, train: Dataset | None = None, steps: int = 300, config: Any = None,
                 progress: bool = False, **overrides: Any) -> None:
        from ..autoprune import AutoPruneConfig

        if int(steps) < 1:
            raise ValueError(f"steps: expected a positive integer, got {steps}")
        if config is None:
            config = AutoPruneConfig(lr_weight=1e-3, penalty={"linear": 40.0, "conv": 20.0}, batch_size=64,
                                     controller_gain=0.05)
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        self.train, self.steps, self.progress = train, int(steps), progress
        self.history: list[dict[str, Any]] = []

    def prune(self, model: nn.Module, keep: float, data: TensorDataset | None = None) -> None:
        from ..autoprune import AutoPrune

        keep = _check_keep(keep)
        layers = _layers(model)
        train = self.train if self.train is not None else data
        heldout = data if data is not None else train
        if train is None:
            raise ValueError("autoprune: needs data (held-out samples) or a training set (AutoPrunePruner(train=...))")
        n_masked = sum(m.weight.numel() for _, m in layers)
        density = min(max(masked_target(model, keep) / max(n_masked, 1), 1e-4), 1.0)
        mean, std = self.config.mask_init
        with torch.no_grad():
            for _, m in layers:  # fresh masks for the kept entries, pruned ones stay pruned
                init = torch.full_like(m.weight_aux, float(mean))
                if std > 0:
                    torch.nn.init.trunc_normal_(init, mean, std, mean - 2 * std, mean + 2 * std)
                m.weight_aux.copy_(torch.where(m.weight_aux >= 0, init, m.weight_aux.clamp(max=-1e-3)))
        config = dataclasses.replace(self.config, target_density=density)
        for _, m in layers:  # the retrain phase of the loop froze the masks; the trainer leaves frozen ones alone
            m.weight_aux.requires_grad_(True)
        trainer = AutoPrune(model, config)
        trainer.fit(train, heldout if config.mode == "bilevel" else None, self.steps, progress=self.progress)
        self.history = trainer.history
        for _, m in layers:
            m.weight_aux.requires_grad_(True)
            m.weight_aux.grad = None
        for p in trainer.weight_params:
            p.requires_grad_(True)
            p.grad = None
        keep_top(model, {name: m.weight_aux.detach().clone() for name, m in layers}, keep)


def register() -> bool:
    """Register ``"autoprune"`` and ``"magnitude"`` with :mod:`autoprune_ext.pruners.registry` (when
    that module exists). Returns whether they are registered."""
    try:
        from . import registry
        register_pruner = registry.register_pruner
    except (ImportError, AttributeError):  # no registry yet, or it is still initialising (it imports us)
        return False
    for name, cls in (("autoprune", AutoPrunePruner), ("magnitude", GlobalMagnitudePruner)):
        try:
            register_pruner(name, cls)
        except (ValueError, KeyError):  # already registered
            pass
    return True


register()
