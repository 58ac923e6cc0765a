"""Metrics beyond test accuracy (``shared/docs/evaluation.md`` section 3).

* :func:`prune_potential` — the largest tested prune ratio whose error on a distribution is at most
  the parent's error there plus ``delta`` (0.5%, and 0); smaller ratios need not pass; 0 if none does.
* :func:`excess_error` — ``[err(f', D') - err(f', D)] - [err(f, D') - err(f, D)]`` with ``err(., D')``
  averaged over the shifted test sets; :func:`fit_zero_intercept` fits it against the prune ratio.
* :class:`NoiseProbe` — functional similarity of a pruned network to its parent under i.i.d.
  uniform input noise ``U[-eps, eps]`` on the normalised inputs: the *same* noisy inputs (a
  deterministic function of the probe's seed) are fed to the parent and to every evaluated network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..training import model_device

#: the paper's thresholds: 0.5% and 0 (fractions of error)
DELTAS = (0.005, 0.0)
#: per-sample similarity metrics reported by :class:`NoiseProbe`
NOISE_METRICS = ("agreement", "softmax_l2", "softmax_linf", "logit_l2", "logit_linf", "accuracy")
_TOL = 1e-9  # float slack when comparing errors computed from counts


def prune_potential(ratios: Sequence[float], errors: Sequence[float], parent_error: float,
                    delta: float = 0.005) -> float:
    """Largest ratio in ``ratios`` whose error is ``<= parent_error + delta``; 0 if none.

    ``errors[i]`` is the pruned network's error (a fraction) at prune ratio ``ratios[i]``. Every
    ratio is tested on its own: a failing smaller ratio does not disqualify a larger one.
    """
    if len(ratios) != len(errors):
        raise ValueError(f"ratios and errors: expected equal lengths, got {len(ratios)} and {len(errors)}")
    if delta < 0:
        raise ValueError(f"delta: expected a non-negative number, got {delta}")
    passing = [float(r) for r, e in zip(ratios, errors) if float(e) <= float(parent_error) + float(delta) + _TOL]
    return max(passing) if passing else 0.0


def prune_potential_from_accuracy(ratios: Sequence[float], accuracies: Sequence[float], parent_accuracy: float,
                                  delta: float = 0.005) -> float:
    """:func:`prune_potential` with accuracies instead of errors."""
    return prune_potential(ratios, [1.0 - a for a in accuracies], 1.0 - parent_accuracy, delta)


def excess_error(pruned_nominal: float, pruned_shifted: float | Sequence[float], parent_nominal: float,
                 parent_shifted: float | Sequence[float]) -> float:
    """``[err(f', D') - err(f', D)] - [err(f, D') - err(f, D)]`` (errors as fractions).

    ``*_shifted``: the error on each shifted test set (averaged here) or their mean already.
    Positive: the pruned network loses more under the shift than its parent does.
    """
    def mean(v: float | Sequence[float]) -> float:
        if isinstance(v, (int, float)):
            return float(v)
        v = [float(x) for x in v]
        if not v:
            raise ValueError("shifted errors: expected at least one shifted test set")
        return sum(v) / len(v)

    return (mean(pruned_shifted) - float(pruned_nominal)) - (mean(parent_shifted) - float(parent_nominal))


def fit_zero_intercept(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least-squares line through the origin ``y = slope * x``: ``slope = sum(x y) / sum(x^2)``.

    Returns ``slope`` and ``r2`` (uncentred: ``1 - SSE / sum(y^2)``; ``nan`` when all ``y`` are 0).
    """
    if len(x) != len(y):
        raise ValueError(f"x and y: expected equal lengths, got {len(x)} and {len(y)}")
    sxx = sum(float(a) * float(a) for a in x)
    if sxx == 0:
        raise ValueError("x: expected at least one nonzero value to fit a slope")
    slope = sum(float(a) * float(b) for a, b in zip(x, y)) / sxx
    syy = sum(float(b) ** 2 for b in y)
    sse = sum((float(b) - slope * float(a)) ** 2 for a, b in zip(x, y))
    return {"slope": slope, "r2": 1.0 - sse / syy if syy > 0 else float("nan")}


def noise_levels(max_eps: float = 0.7, step: float = 0.05) -> list[float]:
    """``0, step, 2 step, ..., max_eps`` (the paper: 0 to 0.7 in steps of 0.05, 15 levels)."""
    if not (step > 0 and max_eps >= 0):
        raise ValueError(f"noise levels: expected step > 0 and max_eps >= 0, got {step}, {max_eps}")
    n = int(math.floor(max_eps / step + 1e-9))
    return [round(i * step, 10) for i in range(n + 1)]


def output_distances(parent_logits: Tensor, logits: Tensor) -> dict[str, Tensor]:
    """Per-sample comparison of two networks' outputs on the same inputs: top-1 agreement (0/1),
    L2 and L-infinity distances of the softmax outputs and of the logits."""
    p, q = F.softmax(parent_logits.double(), 1), F.softmax(logits.double(), 1)
    dl = logits.double() - parent_logits.double()
    ds = q - p
    return {
        "agreement": (logits.argmax(1) == parent_logits.argmax(1)).double(),
        "softmax_l2": ds.norm(dim=1),
        "softmax_linf": ds.abs().amax(1),
        "logit_l2": dl.norm(dim=1),
        "logit_linf": dl.abs().amax(1),
    }


class NoiseProbe:
    """Functional similarity to ``parent`` under uniform input noise, with fixed noisy inputs.

    For every level ``eps`` and every image, ``draws`` noise tensors ``U[-eps, eps]`` are added to
    the (normalised) input. The noise is drawn from a generator seeded by ``(seed, level)`` in a fixed
    order, so every call of :meth:`evaluate` sees exactly the inputs the parent saw (its outputs are
    computed once and cached).

    Args:
        parent: the reference network.
        inputs, labels: the images (normalised, as the network takes them) and their labels.
        eps: the noise levels (default :func:`noise_levels`: 0 to 0.7 step 0.05).
        draws: noise draws per image (the paper: 100).
        seed: seed of the noise.
        chunk: images per forward chunk (``chunk * draws`` inputs per forward pass).
    """

    def __init__(self, parent: nn.Module, inputs: Tensor, labels: Tensor, eps: Sequence[float] | None = None,
                 draws: int = 100, seed: int = 0, chunk: int = 256) -> None:
        if len(inputs) != len(labels) or len(inputs) == 0:
            raise ValueError(f"inputs and labels: expected equal, nonzero lengths, got {len(inputs)} and {len(labels)}")
        if int(draws) < 1 or int(chunk) < 1:
            raise ValueError(f"draws and chunk: expected positive integers, got {draws} and {chunk}")
        self.eps = [float(e) for e in (noise_levels() if eps is None else eps)]
        if any(not math.isfinite(e) or e < 0 for e in self.eps):
            raise ValueError(f"eps: expected non-negative noise levels, got {self.eps}")
        self.inputs, self.labels = inputs.detach().cpu(), labels.detach().cpu()
        self.draws, self.seed, self.chunk = int(draws), int(seed), int(chunk)
        self._parent_logits = [self._logits(parent, i) for i in range(len(self.eps))]
        self.parent_accuracy = [self._accuracy(lg) for lg in self._parent_logits]

    def noisy_batches(self, level: int):
        """Yield ``(noisy inputs, labels)`` chunks of level ``level``: ``[chunk * draws, ...]`` each,
        draws of one image consecutive. The same sequence on every call."""
        eps = self.eps[level]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + level)
        for start in range(0, len(self.inputs), self.chunk):
            x = self.inputs[start:start + self.chunk]
            y = self.labels[start:start + self.chunk]
            noise = torch.rand((x.shape[0], self.draws) + tuple(x.shape[1:]), generator=gen, dtype=x.dtype)
            noisy = x.unsqueeze(1) + (2.0 * noise - 1.0) * eps
            yield noisy.reshape((-1,) + tuple(x.shape[1:])), y.repeat_interleave(self.draws)

    @torch.no_grad()
    def _logits(self, model: nn.Module, level: int) -> Tensor:
        device = model_device(model)
        was_training = model.training
        model.eval()
        try:
            out = [model(x.to(device)).float().cpu() for x, _ in self.noisy_batches(level)]
        finally:
            model.train(was_training)
        return torch.cat(out)

    def _accuracy(self, logits: Tensor) -> float:
        labels = self.labels.repeat_interleave(self.draws)
        return float((logits.argmax(1) == labels).double().mean())

    def evaluate(self, model: nn.Module) -> dict[str, list[float]]:
        """Per noise level (lists aligned with :attr:`eps`): mean top-1 agreement with the parent,
        softmax L2 / Linf and logit L2 / Linf distances to the parent, and ``model``'s accuracy."""
        out: dict[str, list[float]] = {k: [] for k in NOISE_METRICS}
        for level in range(len(self.eps)):
            logits = self._logits(model, level)
            for k, v in output_distances(self._parent_logits[level], logits).items():
                out[k].append(float(v.mean()))
            out["accuracy"].append(self._accuracy(logits))
        return out

    def describe(self) -> dict[str, Any]:
        return {"eps": self.eps, "draws": self.draws, "images": len(self.inputs), "seed": self.seed,
                "parent_accuracy": self.parent_accuracy}


def noise_prune_potential(ratios: Sequence[float], accuracy_per_ratio: Sequence[Sequence[float]],
                          parent_accuracy: Sequence[float], delta: float = 0.005) -> list[float]:
    """Prune potential under noise, one value per noise level: ``accuracy_per_ratio[i][l]`` is the
    accuracy of the network pruned to ``ratios[i]`` at level ``l``, ``parent_accuracy[l]`` the parent's."""
    levels = len(parent_accuracy)
    return [
        prune_potential_from_accuracy(ratios, [acc[level] for acc in accuracy_per_ratio], parent_accuracy[level], delta)
        for level in range(levels)
    ]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation; ``(nan, nan)`` for no values."""
    v = [float(x) for x in values]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / len(v))


def mean_curves(curves: Sequence[Mapping[str, Sequence[float]]]) -> dict[str, list[float]]:
    """Element-wise mean of dicts of equal-length lists (e.g. :meth:`NoiseProbe.evaluate` per parent)."""
    if not curves:
        return {}
    return {k: [sum(c[k][i] for c in curves) / len(curves) for i in range(len(curves[0][k]))] for k in curves[0]}
