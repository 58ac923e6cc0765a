"""The prune-retrain loop (``shared/docs/evaluation.md`` section 2, algorithm "PruneRetrain").

Start from a trained dense parent and a decreasing list of keep ratios. For each ratio a
:class:`~autoprune_ext.pruners.base.Pruner` writes +1/-1 masks into the converted model, then the
weights are retrained with the mask fixed (``weight_aux`` frozen, the mask re-applied after every
optimiser step) on the full training schedule (learning-rate rewinding: the same steps and lr as the
parent). Two modes:

* ``"cascade"`` (iterative): cycle ``k`` prunes the *retrained network of cycle k-1* further, scores
  recomputed on its current weights;
* ``"one-shot"``: every ratio restarts from the parent.

Results are plain dicts (JSON-ready), one per ratio.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from ..convert import convert, masked_modules
from ..pruners.base import Pruner, keep_ratio
from ..training import train_supervised

MODES = ("cascade", "one-shot")


def geometric_ratios(first: float, last: float, n: int) -> list[float]:
    """``n`` keep ratios from ``first`` to ``last`` with a constant factor between neighbours:
    ``first * (last / first) ** (i / (n - 1))``. E.g. ``geometric_ratios(0.85, 0.15, 20)`` gives the
    paper's ResNet20 schedule (prune ratios 15%, 22.4%, 29.2%, ... 85%)."""
    first, last, n = float(first), float(last), int(n)
    for name, v in (("first", first), ("last", last)):
        if not (math.isfinite(v) and 0.0 < v <= 1.0):
            raise ValueError(f"{name}: expected a keep ratio in (0, 1], got {v}")
    if n < 1:
        raise ValueError(f"n: expected a positive integer, got {n}")
    if n == 1:
        return [first]
    return [first * (last / first) ** (i / (n - 1)) for i in range(n)]


@dataclass
class RetrainConfig:
    """The retraining schedule (by default the parent's: learning-rate rewinding)."""

    steps: int = 1000
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_parent(model: nn.Module, train: Dataset, config: RetrainConfig, *, progress: bool = False,
                 desc: str = "parent") -> nn.Module:
    """Train a dense parent (in place) with the schedule ``config``; ``torch.manual_seed(config.seed)``
    should have been set before building ``model`` for an independent, reproducible parent."""
    train_supervised(model, train, config.steps, lr=config.lr, batch_size=config.batch_size, seed=config.seed,
                     optimizer=config.optimizer, weight_decay=config.weight_decay, progress=progress, desc=desc)
    return model


def prepare(model: nn.Module, granularity: str = "weight") -> nn.Module:
    """A converted deep copy of ``model`` with every weight kept (``weight_aux = +1``); a model that is
    already converted is copied as is."""
    model = copy.deepcopy(model)
    if not any(True for _ in masked_modules(model)):
        model = convert(model, granularity=granularity, init=1.0)
    return model


@torch.no_grad()
def bake_masks(model: nn.Module) -> None:
    """Write ``W * h(M)`` into every masked layer's raw ``weight``: pruned weights become exactly zero
    (the effective network does not change), so a later pruner scoring ``|W|`` cannot revive them."""
    for _, m in masked_modules(model):
        m.weight.copy_(m.masked_weight())


@torch.no_grad()
def zero_entries(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """``(parameter, zero mask)`` for the parameters outside the masked weights that hold exact zeros
    (e.g. biases of units a structured pruner removed): retraining keeps those zeros."""
    skip = set()
    for _, m in masked_modules(model):
        skip.add(id(m.weight))
        skip.add(id(m.weight_aux))
    out = []
    for p in model.parameters():
        if id(p) in skip:
            continue
        zero = p == 0
        if bool(zero.any()):
            out.append((p, zero))
    return out


def freeze_masks(model: nn.Module) -> None:
    """Fix the mask: no gradient and no optimiser updates for any ``weight_aux``."""
    for _, m in masked_modules(model):
        m.weight_aux.requires_grad_(False)
        m.weight_aux.grad = None


def retrain(model: nn.Module, train: Dataset, config: RetrainConfig, *, progress: bool = False,
            desc: str = "retrain") -> list[float]:
    """Train the weights of a pruned, converted model with its mask enforced: ``weight_aux`` frozen,
    and after every optimiser step the pruned raw weights and the zeroed other parameters are set
    back to zero. Returns the loss per step."""
    freeze_masks(model)
    aux_ids = {id(m.weight_aux) for _, m in masked_modules(model)}
    for p in model.parameters():
        if id(p) not in aux_ids:
            p.requires_grad_(True)
    bake_masks(model)
    zeros = zero_entries(model)

    @torch.no_grad()
    def enforce(m: nn.Module) -> None:
        bake_masks(m)
        for p, zero in zeros:
            p.masked_fill_(zero, 0.0)

    if config.steps <= 0:
        return []
    return train_supervised(model, train, config.steps, lr=config.lr, batch_size=config.batch_size,
                            seed=config.seed, optimizer=config.optimizer, weight_decay=config.weight_decay,
                            after_step=enforce, progress=progress, desc=desc)


Evaluate = Callable[[nn.Module], dict[str, Any]]


def prune_retrain(
    parent: nn.Module,
    pruner: Pruner,
    keep_ratios: Sequence[float],
    *,
    train: Dataset,
    data: TensorDataset | None = None,
    retrain_config: RetrainConfig | None = None,
    mode: str = "cascade",
    evaluate: Evaluate | None = None,
    on_result: Callable[[dict[str, Any], nn.Module], None] | None = None,
    granularity: str = "weight",
    skip_errors: bool = False,
    progress: bool = False,
    desc: str = "",
) -> list[dict[str, Any]]:
    """Prune ``parent`` (left untouched) to every keep ratio of ``keep_ratios`` and retrain each time.

    Args:
        parent: the trained dense (or converted, all-kept) network.
        pruner: the method; ``pruner.prune(model, keep, data)`` sets the masks.
        keep_ratios: target fractions of nonzero parameters, decreasing for the cascade mode.
        train: training set of the retraining.
        data: held-out samples for data-informed scores (SiPP, PFP) and AutoPrune's mask steps.
        retrain_config: the retraining schedule (default :class:`RetrainConfig`).
        mode: ``"cascade"`` (prune the previous retrained network further) or ``"one-shot"``
            (restart from the parent for every ratio).
        evaluate: ``evaluate(model) -> dict`` on each retrained network; merged into its record.
        on_result: ``on_result(record, model)`` after each cycle (the model is the live network of
            that cycle; deep-copy it to keep it).
        skip_errors: when the pruner cannot reach a ratio (``ValueError``, e.g. a structured method
            that cannot keep that much), record ``{"error": message, ...}`` for it and go on (the
            cascade continues from the last successful network) instead of raising.

    Returns:
        one dict per ratio: ``cycle``, ``mode``, ``method``, ``keep_target``, ``keep`` (achieved after
        pruning), ``keep_after_retrain``, ``prune_ratio_target``, ``prune_ratio``, ``prune_seconds``,
        ``retrain_seconds``, ``final_loss``, plus what ``evaluate`` returned.
    """
    from tqdm.auto import tqdm

    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    ratios = [float(k) for k in keep_ratios]
    for k in ratios:
        if not (math.isfinite(k) and 0.0 < k <= 1.0):
            raise ValueError(f"keep_ratios: expected fractions in (0, 1], got {k}")
    if mode == "cascade" and any(b > a for a, b in zip(ratios, ratios[1:])):
        raise ValueError("keep_ratios: the cascade mode needs a non-increasing list of keep ratios")
    if getattr(pruner, "needs_data", False) and data is None:
        raise ValueError(f"data: the {getattr(pruner, 'name', 'given') or 'given'} pruner needs held-out samples")
    cfg = retrain_config or RetrainConfig()
    base = prepare(parent, granularity)
    current = base
    records: list[dict[str, Any]] = []
    bar = tqdm(ratios, desc=desc or f"{getattr(pruner, 'name', 'prune')} ({mode})", disable=None if progress else True,
               leave=False)
    for cycle, keep in enumerate(bar):
        model = copy.deepcopy(base) if mode == "one-shot" else current
        bake_masks(model)
        backup = copy.deepcopy(model) if skip_errors and mode == "cascade" else None
        t0 = time.perf_counter()
        try:
            pruner.prune(model, keep, data)
        except ValueError as exc:
            if not skip_errors:
                raise
            records.append({"cycle": cycle, "mode": mode, "method": getattr(pruner, "name", type(pruner).__name__),
                            "keep_target": keep, "prune_ratio_target": 1.0 - keep,
                            "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__})
            if backup is not None:
                current = backup
            continue
        prune_seconds = time.perf_counter() - t0
        achieved = keep_ratio(model)
        t0 = time.perf_counter()
        losses = retrain(model, train, cfg, progress=False)
        retrain_seconds = time.perf_counter() - t0
        model.eval()
        record: dict[str, Any] = {
            "cycle": cycle,
            "mode": mode,
            "method": getattr(pruner, "name", type(pruner).__name__),
            "keep_target": keep,
            "keep": achieved,
            "keep_after_retrain": keep_ratio(model),
            "prune_ratio_target": 1.0 - keep,
            "prune_ratio": 1.0 - achieved,
            "prune_seconds": prune_seconds,
            "retrain_seconds": retrain_seconds,
            "final_loss": losses[-1] if losses else None,
        }
        if evaluate is not None:
            record.update(evaluate(model))
        records.append(record)
        if on_result is not None:
            on_result(record, model)
        bar.set_postfix(prune=f"{100 * record['prune_ratio']:.1f}%")
        current = model
    bar.close()
    return records


def prune_retrain_parents(
    parents: dict[int, nn.Module],
    make_pruner: Callable[[], Pruner],
    keep_ratios: Sequence[float],
    **kwargs: Any,
) -> dict[int, list[dict[str, Any]]]:
    """:func:`prune_retrain` for several independently trained parents (keyed by seed); a fresh
    pruner per parent. The retraining seed follows the parent's seed."""
    cfg = kwargs.pop("retrain_config", None) or RetrainConfig()
    out = {}
    for seed, parent in parents.items():
        out[seed] = prune_retrain(parent, make_pruner(), keep_ratios,
                                  retrain_config=RetrainConfig(**{**cfg.to_dict(), "seed": int(seed)}), **kwargs)
    return out
