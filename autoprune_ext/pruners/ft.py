"""FT, filter thresholding (``shared/docs/evaluation.md`` §1): score of output filter ``i`` is the L1 norm
``||W_i||_1`` of the whole filter; the same fraction of filters is kept in every layer; the class-output
(logits) layer is never pruned. After the prune, what became dead is removed (see
:func:`autoprune_ext.pruners._scores.close_dead`): the input channels the pruned filters fed become
constant and are pruned in the next masked layer, and the bias / norm parameters of filters whose
output is no longer used anywhere are zeroed.

Uniform fraction and ratio matching: filters are kept per layer as ``k_l = floor(f * n_l)`` (at least 1)
and ``f`` is bisected to the requested keep ratio. One filter of a large layer can be worth more than the
0.5% tolerance; then one layer (the one needing the smallest relative change) keeps a few filters more
or fewer than ``f * n_l``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..nn import MaskedModule
from . import _scores as S
from .base import Pruner


def ft_scores(model: nn.Module) -> dict[str, Tensor]:
    """``||W_i||_1`` of every output filter of every masked layer's current (masked) weight, keyed by
    layer name (``[out]`` tensors)."""
    return {name: m.masked_weight().abs().reshape(m.weight.shape[0], -1).sum(1) for name, m in S.prunable(model)}


def _rank(values: Tensor) -> Tensor:
    """Indices best (largest) first; ties in index order."""
    return torch.sort(values.detach().to(torch.float64).cpu(), descending=True, stable=True).indices


class FTPruner(Pruner):
    """Filter thresholding with a uniform per-layer fraction; the logits layer is kept whole.

    Args:
        input_shape: ``(C, H, W)`` (or ``(F,)``) of one input, used to trace the model for dead-unit
            removal when ``prune`` gets no ``data``; without either, a shape is guessed from the
            first masked layer (a 32-pixel image for convolutions).
    """

    name = "ft"
    needs_data = False

    def __init__(self, input_shape: Sequence[int] | None = None) -> None:
        self.input_shape = tuple(int(s) for s in input_shape) if input_shape is not None else None

    def scores(self, model: nn.Module, data: Dataset | None = None) -> dict[str, Tensor]:
        """Per-layer filter norms ``[out]``, keyed by layer name."""
        return ft_scores(model)

    def graph(self, model: nn.Module, data: Dataset | Tensor | None = None) -> S.Graph | None:
        """The dataflow graph used for dead-unit removal (``None``, with a warning, if the model cannot
        be run on a guessed input)."""
        layers = [m for _, m in S.prunable(model)]
        example = S.example_input(model, layers, data, self.input_shape)
        if data is not None or self.input_shape is not None:
            return S.trace(model, example)
        try:
            return S.trace(model, example)
        except Exception as exc:  # noqa: BLE001 - a guessed input may not fit the model
            warnings.warn(
                f"FT: could not run the model on a guessed input of shape {tuple(example.shape)} ({exc}); "
                "dead units are not removed and the last registered masked layer is taken as the logits layer. "
                "Pass data or FTPruner(input_shape=...).",
                stacklevel=2,
            )
            return None

    def prune(self, model: nn.Module, keep: float, data: Dataset | Tensor | None = None) -> None:
        """Prune output filters (same fraction per layer, logits layer excluded) so that the keep ratio
        is within 0.5% of ``keep``. ``data`` is optional (only its first image is used, to trace)."""
        keep = S.check_keep(keep)
        named = S.prunable(model)
        layers = [m for _, m in named]
        graph = self.graph(model, data)
        logits = graph.output_layer if graph is not None else layers[-1]
        pruned: list[MaskedModule] = [m for m in layers if m is not logits]
        if not pruned:
            raise ValueError("model: FT needs at least one masked layer besides the class-output layer")
        norms = {m: m.masked_weight().abs().reshape(m.weight.shape[0], -1).sum(1) for m in pruned}
        orders = {m: _rank(norms[m]) for m in pruned}
        search = S.StructuredSearch(S.Budget(model, layers), graph, orders, "rows", "FT")

        def k_of(f: float) -> dict[MaskedModule, int]:
            return {m: int(math.floor(f * search.sizes[m] + 1e-9)) for m in pruned}

        k = search.solve(k_of, 0.0, 1.0, keep)
        S.apply_plan(search.plan(k), layers)
        S.check_achieved(model, keep, "FT")
