"""Global magnitude pruning through ``torch.nn.utils.prune``: the reference point of every comparison.

The pruned layers are the ones :func:`autoprune_ext.convert` would mask (exactly ``nn.Linear``,
``nn.Conv1d``, ``nn.Conv2d``), so AutoPrune and this baseline are compared on the same weights.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune

from ..nn import MASKED_TYPES, MaskedModule


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every layer AutoPrune would mask (dense or already masked)."""
    return [(n, m) for n, m in model.named_modules() if type(m) in MASKED_TYPES or isinstance(m, MaskedModule)]


def global_magnitude_prune(model: nn.Module, density: float, *, bake: bool = False) -> nn.Module:
    """Keep the ``density`` fraction of largest-magnitude weights over all prunable layers, in place.

    Uses ``torch.nn.utils.prune.global_unstructured`` (``weight_orig`` + ``weight_mask``; the mask is
    re-applied at every forward, so fine-tuning keeps the sparsity). ``bake=True`` removes the
    reparametrization afterwards (zeros written into ``weight``).
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density: expected a fraction in [0, 1], got {density}")
    layers = [(m, "weight") for _, m in prunable_layers(model)]
    if not layers:
        raise ValueError("model: has no Linear/Conv1d/Conv2d layer to prune")
    total = sum(m.weight.numel() for m, _ in layers)
    amount = total - round(density * total)
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=int(amount))
    if bake:
        for m, name in layers:
            prune.remove(m, name)
    return model
