"""Wanda-style scores (Sun et al., 2023): ``|W_ij| * ||x_j||``, the weight's magnitude times the norm
of the input feature it multiplies, over a few calibration batches.

* :func:`collect_input_norms` runs the model on calibration batches with forward hooks on every
  linear/convolution layer and keeps only one running sum of squares per input feature (no
  activations are stored);
* :func:`wanda_scores` turns a weight and its input norms into scores;
* :func:`wanda_init` sets every masked layer's ``weight_aux`` from the scores, so AutoPrune starts
  from a sensible mask on a pretrained model (the one-shot baseline is the ``"wanda"`` pruner,
  :class:`autoprune_ext.pruners.wanda.WandaPruner`).

Input features: ``in_features`` for a linear layer (and GPT-2 ``Conv1D``); for a convolution each
``(in_channel, kh, kw)`` column of the unfolded input, i.e. one norm per weight entry of a filter
(padding zeros included, as the convolution sees them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .convert import masked_modules
from .nn import MASKED_TYPES, MaskedModule, masked_type_for
from .training import default_forward, model_device, move_to

#: the margin that keeps initialised entries off the decision boundary (kept: >= +margin)
MARGIN = 1e-3


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, MaskedModule) or type(m) in MASKED_TYPES or masked_type_for(m) is not None]


def _feature_sq_sum(module: nn.Module, x: Tensor) -> Tensor:
    """Sum over all positions of ``x**2`` per input feature of ``module`` (float64)."""
    x = x.detach()
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(f"model: Wanda input norms need a zero-padded conv with explicit padding, got {module}")
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(-2)
            k, d, p, s = (1, *module.kernel_size), (1, *module.dilation), (0, *module.padding), (1, *module.stride)
        else:
            k, d, p, s = module.kernel_size, module.dilation, module.padding, module.stride
        if x.dim() == 3:
            x = x.unsqueeze(0)
        cols = F.unfold(x.double(), k, dilation=d, padding=p, stride=s)  # [N, C*kh*kw, L]
        sq = cols.square().sum(dim=(0, 2))
        if module.groups > 1:  # each group's filters see their own channels: fold groups onto one filter
            sq = sq.reshape(module.groups, -1).sum(0)
        return sq
    return x.double().reshape(-1, x.shape[-1]).square().sum(0)


@torch.no_grad()
def collect_input_norms(
    model: nn.Module,
    batches: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, Tensor]:
    """``||x_j||`` (the L2 norm over every token / position of every batch) of each input feature of
    every linear and convolution layer of ``model``, keyed by layer name (float32 tensors of
    ``in_features``, or ``in_channels/groups * kh * kw`` for a convolution).

    ``batches``: tensors, ``(inputs, ...)`` tuples or keyword dicts (see
    :func:`autoprune_ext.training.default_forward`); ``forward_fn(model, batch)`` overrides. The model
    runs in eval mode (restored afterwards); the hooks are removed even if a batch fails.
    """
    forward_fn = forward_fn or default_forward
    layers = _layers(model)
    if not layers:
        raise ValueError("model: has no Linear/Conv1d/Conv2d/Conv1D layer to score")
    sums: dict[str, Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def run(module: nn.Module, inputs: tuple, output: Any) -> None:
            sq = _feature_sq_sum(module, inputs[0])
            sums[name] = sums[name] + sq if name in sums else sq

        return run

    handles = [m.register_forward_hook(hook(n)) for n, m in layers]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        device = model_device(model)
        for batch in batches:
            forward_fn(model, move_to(batch, device))
            seen += 1
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if not seen:
        raise ValueError("batches: expected at least one calibration batch, got none")
    return {n: s.sqrt().float() for n, s in sums.items()}


def wanda_scores(weight: Tensor, norm: Tensor) -> Tensor:
    """``|W| * ||x||`` with ``weight`` in the mask layout ``[out, in, ...]`` and ``norm`` one value per
    entry of a row (``weight[0].numel()`` values)."""
    row = math.prod(weight.shape[1:])
    if norm.numel() != row:
        raise ValueError(f"norm: expected {row} input-feature norms for weight {tuple(weight.shape)}, got {norm.numel()}")
    return weight.detach().abs().float() * norm.to(weight.device).reshape(weight.shape[1:])


def _row_threshold_aux(score: Tensor, density: float) -> Tensor:
    """``weight_aux`` keeping exactly the top ``round(density * row)`` scores of every row (at least one)."""
    rows = score.reshape(score.shape[0], -1)
    k = min(rows.shape[1], max(1, round(density * rows.shape[1])))
    order = torch.sort(rows, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(rows.shape[1], device=rows.device).expand_as(rows).contiguous())
    kept = rank < k
    # the score's distance to the row's cut, kept entries >= +MARGIN and the others <= -MARGIN
    top = torch.sort(rows, dim=1, descending=True).values
    cut = top[:, k - 1] if k == rows.shape[1] else (top[:, k - 1] + top[:, k]) / 2
    d = rows - cut[:, None]
    return torch.where(kept, d.clamp_min(0) + MARGIN, d.clamp_max(0) - MARGIN).reshape(score.shape)


@torch.no_grad()
def wanda_init(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    density: float = 0.5,
    *,
    norms: Mapping[str, Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, Tensor]:
    """Set every masked layer's ``weight_aux`` from Wanda scores; returns the input norms used.

    * weight granularity: each output row keeps exactly its top ``round(density * row)`` scores (at
      least one), Wanda's per-output comparison group; ``M`` is the score's distance to the row's
      cut plus a margin, so nothing starts on the decision boundary;
    * unit granularity: the units with the top ``density`` fraction of mean row score are kept;
    * N:M granularity: ``M`` is the score (shifted so the mean is positive): the N:M top-N is then
      Wanda's choice in every group; ``density`` does not apply.

    Pass ``norms`` from :func:`collect_input_norms` to reuse them, else ``batches`` are run.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density: expected a fraction in (0, 1], got {density}")
    layers = list(masked_modules(model))
    if not layers:
        raise ValueError("model: has no masked layers; call autoprune_ext.convert(model) first")
    if norms is None:
        if batches is None:
            raise ValueError("batches: calibration batches are needed when norms is not given")
        norms = collect_input_norms(model, batches, forward_fn)
    for name, m in layers:
        if name not in norms:
            raise ValueError(f"norms: no input norms for layer {name!r} (was it called by the calibration batches?)")
        score = wanda_scores(m.mask_weight(), norms[name])
        aux = m.weight_aux
        if m.granularity == "unit":
            unit = score.reshape(score.shape[0], -1).mean(dim=1)
            value = _row_threshold_aux(unit[None, :], density)[0]
        elif ":" in m.granularity:
            value = score / score.mean().clamp_min(1e-30) + MARGIN
        else:
            value = _row_threshold_aux(score, density)
        aux.copy_(value.to(aux.dtype))
    return dict(norms)
