"""The pruner interface shared by AutoPrune and the baselines (WT, SiPP, FT, PFP).

Every pruner writes its decision into the masked layers of a converted model
(:func:`autoprune_ext.convert`): ``weight_aux`` is set to ``+1`` where a weight is kept and ``-1``
where it is pruned (unit-granularity layers: per output unit). So all methods share one model
representation: the same forward, the same ``finalize``, the same retraining with the mask fixed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..convert import masked_modules
from ..nn import MaskedModule

KEEP, PRUNE = 1.0, -1.0


def masked_layers(model: nn.Module) -> Iterator[tuple[str, MaskedModule]]:
    """The prunable layers: every masked layer of ``model`` (convert the model first)."""
    return masked_modules(model)


@torch.no_grad()
def set_mask(layer: MaskedModule, keep: Tensor) -> None:
    """Write a boolean keep-mask (``weight_aux``'s shape) into ``layer.weight_aux`` as +1 / -1."""
    aux = layer.weight_aux
    if keep.shape != aux.shape:
        raise ValueError(f"keep: expected shape {tuple(aux.shape)}, got {tuple(keep.shape)}")
    aux.copy_(torch.where(keep.to(aux.device), KEEP, PRUNE).to(aux.dtype))


@torch.no_grad()
def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(nonzero, total)`` over every parameter of the *effective* model: masked weights count their
    kept nonzero entries; ``weight_aux`` tensors are not model parameters and are not counted;
    biases and norm parameters count when nonzero (the prune ratio of ``shared/docs/evaluation.md``)."""
    aux_ids = {id(m.weight_aux) for _, m in masked_modules(model)}
    masked_w = {id(m.weight): m for _, m in masked_modules(model)}
    nonzero = total = 0
    for p in model.parameters():
        if id(p) in aux_ids:
            continue
        total += p.numel()
        if id(p) in masked_w:
            nonzero += int((masked_w[id(p)].masked_weight() != 0).sum())
        else:
            nonzero += int((p != 0).sum())
    return nonzero, total


def keep_ratio(model: nn.Module) -> float:
    """Fraction of nonzero parameters (see :func:`parameter_counts`); prune ratio = 1 - keep ratio."""
    nonzero, total = parameter_counts(model)
    return nonzero / max(total, 1)


class Pruner:
    """A pruning method. Subclasses set :attr:`name` and implement :meth:`prune`."""

    name: str = ""
    #: whether :meth:`prune` needs ``data`` (data-informed scores, e.g. SiPP and PFP)
    needs_data: bool = False

    def prune(self, model: nn.Module, keep: float, data: TensorDataset | None = None) -> None:
        """Set the masks of ``model`` (in place) so that :func:`keep_ratio` is within 0.5% (relative)
        of ``keep``, searching the method's internal ratio where needed. ``data``: held-out samples
        (images, labels) for data-informed scores."""
        raise NotImplementedError
