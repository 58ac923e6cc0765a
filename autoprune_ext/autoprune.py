"""The AutoPrune trainer: alternating bi-level steps of the masks ``M`` and the weights ``W``.

Usable two ways (``shared/docs/method.md`` section 4):

* from your own loop: ``trainer.step(train_batch, heldout_batch)`` (or :meth:`AutoPrune.aux_step`
  and :meth:`AutoPrune.weight_step` separately);
* ready-made: ``trainer.fit(train_set, heldout_set, steps=...)`` with evaluation, logging
  callbacks, tqdm progress and atomic checkpoints that resume exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .checkpoint import save_atomic as save_atomic  # re-exported: its home before autoprune_ext.checkpoint
from .convert import convert, masked_modules
from .optim import NONFINITE_MODES, PENALTY_MODES, AuxAdam
from .sparsity import LayerCount, enforce_floor, is_dtensor, layer_counts, several_processes
from .training import (
    Batch,
    BatchLossFn,
    BatchStream,
    ForwardFn,
    accuracy,
    default_forward,
    default_loss,
    make_optimizer,
    model_device,
    move_to,
)

Callback = Callable[["AutoPrune", dict[str, Any]], None]
MODES = ("bilevel", "same_batch")


@dataclass
class AutoPruneConfig:
    """Hyper-parameters of an AutoPrune run (defaults: the authors' LeNet-5 settings, batch 200).

    ``penalty`` is ``lambda``: one float for every masked layer, or a mapping with keys ``linear`` /
    ``conv`` / module-name patterns (see :meth:`AuxAdam.from_model`); ``penalty_mode`` says how it
    scales with layer size (``"mean"``, the paper's ``lambda / N``, or the size-independent
    ``"relative"``; see :class:`AuxAdam`).

    Density control. ``target_density`` replaces a fixed ``lambda`` by a controller that scales every
    group's ``lambda`` by ``exp(controller_gain * clip((density - target) / target, -1, 1))`` after each
    mask step, ``density`` taken over the layers without a target of their own.
    ``layer_target_density`` maps module-name patterns (``fnmatch``) to per-layer targets: each
    matching layer gets a penalty group and a controller of its own. The floor: no layer keeps fewer
    than ``min_density`` of its mask entries (at least one); a layer at its floor gets no penalty,
    and entries are revived (largest ``weight_aux`` first) when it falls below. ``keep_rows`` also
    keeps one entry in every output row (recommended for classifier heads and transformer
    projections, where a dead row is a dead feature).

    ``mask_init`` is ``(mean, std)`` of the truncated-normal init used when the trainer converts the
    model itself.
    """

    lr_weight: float = 2e-3
    lr_aux: float = 0.1
    weight_optimizer: str = "adam"
    weight_decay: float = 0.0
    aux_betas: tuple[float, float] = (0.9, 0.999)
    penalty: float | dict[str, float] = field(default_factory=lambda: {"linear": 0.4, "conv": 0.2})
    penalty_mode: str = "mean"
    #: AuxAdam storage: "standard" or "bf16_sr" (bfloat16 aux and moments, stochastic rounding)
    aux_memory: str = "standard"
    #: a mask step whose gradient holds NaN/inf: "raise" (naming the layer) or "skip" it and count it
    #: (``record["aux_skipped"]``), as AMP's grad scaler does; see :class:`AuxAdam`
    aux_nonfinite: str = "raise"
    rho: float = 1e-3
    inv_abs_weight: bool = False
    surrogate: str = "softplus"
    rule: str = "sign"
    alpha: float = 0.1
    granularity: str = "weight"
    mask_init: tuple[float, float] = (0.5, 0.01)
    mode: str = "bilevel"
    target_density: float | None = None
    layer_target_density: dict[str, float] | None = None
    controller_gain: float = 0.02
    min_density: float = 1e-3
    keep_rows: bool = False
    freeze_bn: bool = False
    batch_size: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.penalty_mode not in PENALTY_MODES:
            raise ValueError(f"penalty_mode: expected one of {PENALTY_MODES}, got {self.penalty_mode!r}")
        if self.target_density is not None and not 0.0 < self.target_density <= 1.0:
            raise ValueError(f"target_density: expected a fraction in (0, 1], got {self.target_density}")
        if self.layer_target_density is not None:
            if not isinstance(self.layer_target_density, Mapping):
                raise TypeError("layer_target_density: expected a mapping of module-name pattern -> density")
            for key, value in self.layer_target_density.items():
                if not (isinstance(key, str) and isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                    raise ValueError(
                        f"layer_target_density: expected pattern -> fraction in (0, 1], got {key!r}: {value!r}"
                    )
            self.layer_target_density = dict(self.layer_target_density)
        if not (isinstance(self.min_density, (int, float)) and 0.0 <= self.min_density <= 1.0):
            raise ValueError(f"min_density: expected a fraction in [0, 1], got {self.min_density!r}")
        lams = self.penalty.values() if isinstance(self.penalty, Mapping) else [self.penalty]
        for lam in lams:
            if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
                raise ValueError(f"penalty: expected non-negative finite lambda values, got {self.penalty!r}")
        for name in ("lr_weight", "lr_aux", "rho", "controller_gain"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: expected a non-negative finite float, got {value!r}")
        if self.aux_nonfinite not in NONFINITE_MODES:
            raise ValueError(f"aux_nonfinite: expected one of {NONFINITE_MODES}, got {self.aux_nonfinite!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _norm_and_dropout(model: nn.Module) -> list[nn.Module]:
    kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    return [m for m in model.modules() if isinstance(m, kinds)]


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


@torch.no_grad()
def _all_reduce_mean(tensors: Sequence[Tensor], group: Any = None, bucket_bytes: int = 64 << 20) -> None:
    """Average ``tensors`` in place over the ranks of ``group``, in flat buckets (one collective per
    bucket and dtype, not one per tensor)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for same in by_dtype.values():
        bucket: list[Tensor] = []
        size = 0
        for t in [*same, None]:
            if t is not None and (not bucket or size + t.numel() * t.element_size() <= bucket_bytes):
                bucket.append(t)
                size += t.numel() * t.element_size()
                continue
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat, group=group)
            flat.div_(world)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = ([t], t.numel() * t.element_size()) if t is not None else ([], 0)


class AutoPrune:
    """Alternating bi-level trainer of a masked model.

    Args:
        model: a model; converted with the config's mask options if it has no masked layers yet. It
            may be wrapped in ``DistributedDataParallel`` (the trainer then synchronises the gradients
            of each step itself, so the wrapper needs no ``find_unused_parameters``) or sharded with
            FSDP2's ``fully_shard`` (gradients are reduced by FSDP; densities are counted over all ranks).
        config: hyper-parameters (keyword overrides of :class:`AutoPruneConfig` also accepted).
        weight_optimizer: any torch optimiser over the non-auxiliary parameters (default: built
            from ``config.weight_optimizer``, ``lr_weight``, ``weight_decay``).
        forward_fn: ``forward_fn(model, batch) -> output``; default :func:`~autoprune_ext.training.default_forward`
            (``model(**batch)`` for mappings, ``model(batch[0])`` for tuples, ``model(batch)`` for tensors).
        loss_fn: ``loss_fn(output, batch) -> loss``; default :func:`~autoprune_ext.training.default_loss`
            (the output's ``.loss``, else cross-entropy of the logits against ``batch[1]`` / ``batch["labels"]``).
        callbacks: called as ``callback(trainer, record)`` after every step; ``record`` holds the
            step's losses, density and lambdas (and evaluation results on evaluation steps).
        fused_aux_step: take each mask step's Adam update inside its backward
            (:meth:`AuxAdam.fused_step`): the same training bit for bit, with less memory traffic and
            no mask gradients in memory, on the ``cpp`` backend's CPU path (elsewhere it changes
            nothing). Single process and ``aux_nonfinite="raise"`` only (checked here); a NaN/inf mask
            gradient still raises, after the finite entries were stepped.

    Parameters the user froze (``requires_grad=False`` when the trainer is built) stay frozen: they
    are left out of both optimisers and never switched on.
    """

    def __init__(
        self,
        model: nn.Module,
        config: AutoPruneConfig | None = None,
        *,
        weight_optimizer: torch.optim.Optimizer | None = None,
        forward_fn: ForwardFn = default_forward,
        loss_fn: BatchLossFn = default_loss,
        callbacks: Sequence[Callback] = (),
        fused_aux_step: bool = False,
        **overrides: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        config = config or AutoPruneConfig()
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        cfg = self.config
        module = model.module if _is_ddp(model) else model
        if not any(True for _ in masked_modules(module)):
            if _is_ddp(model) or any(is_dtensor(p) for p in model.parameters()):
                raise ValueError(
                    "model: convert it (autoprune_ext.convert) before wrapping it in DistributedDataParallel "
                    "or sharding it with fully_shard"
                )
            module = model = convert(model, granularity=cfg.granularity, init=cfg.mask_init,
                                     surrogate=cfg.surrogate, rule=cfg.rule, alpha=cfg.alpha,
                                     aux_dtype=torch.bfloat16 if cfg.aux_memory == "bf16_sr" else None)
        #: the model as given (possibly DDP-wrapped) and the module inside it (names, state dicts)
        self.model, self.module = model, module
        layers = list(masked_modules(module))
        self.layer_names = [name for name, _ in layers]
        self.aux_params = [m.weight_aux for _, m in layers if m.weight_aux.requires_grad]
        aux_ids = {id(m.weight_aux) for _, m in layers}
        self.weight_params = [p for p in module.parameters() if id(p) not in aux_ids and p.requires_grad]
        self._layer_targets = self._match_layer_targets(cfg.layer_target_density or {})
        self.aux_optimizer = AuxAdam.from_model(
            module, lr=cfg.lr_aux, betas=cfg.aux_betas, penalty=cfg.penalty, penalty_mode=cfg.penalty_mode,
            rho=cfg.rho, inv_abs_weight=cfg.inv_abs_weight, per_layer=self._layer_targets, memory=cfg.aux_memory,
            sr_seed=cfg.seed, nonfinite=cfg.aux_nonfinite,
        )
        if cfg.target_density is not None or self._layer_targets:
            for group in self.aux_optimizer.param_groups:  # a controller needs a positive start
                if group["name"] == "n:m":  # fixed density: never penalised
                    continue
                if cfg.target_density is not None or group["name"] in self._layer_targets:
                    group["penalty"] = max(float(group["penalty"]), 1e-3)
        if not self.aux_params:
            raise ValueError("model: every weight_aux is frozen (requires_grad=False); there is no mask to train")
        if weight_optimizer is not None and not isinstance(weight_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"weight_optimizer: expected a torch.optim.Optimizer (for a name, set config.weight_optimizer), "
                f"got {type(weight_optimizer).__name__}"
            )
        if weight_optimizer is None and not self.weight_params:
            raise ValueError("model: has no trainable parameter besides the masks (nothing for the weight steps)")
        self.weight_optimizer = weight_optimizer or make_optimizer(
            cfg.weight_optimizer, self.weight_params, cfg.lr_weight, cfg.weight_decay
        )
        if fused_aux_step:
            if cfg.aux_nonfinite != "raise":
                raise ValueError("fused_aux_step: needs aux_nonfinite='raise' (a step taken inside backward cannot "
                                 f"be skipped afterwards), got {cfg.aux_nonfinite!r}")
            if _is_ddp(model) or self._sharded() or several_processes():
                raise ValueError("fused_aux_step: single process only (the mask gradients must be averaged over the "
                                 "ranks before the step)")
        self.fused_aux_step = bool(fused_aux_step)
        self.forward_fn, self.loss_fn = forward_fn, loss_fn
        self.callbacks = list(callbacks)
        self.step_count = 0
        self.history: list[dict[str, Any]] = []
        self._counts: list[LayerCount] | None = None

    def _match_layer_targets(self, targets: Mapping[str, float]) -> dict[str, float]:
        """Layer name -> target density (first matching pattern wins); every pattern must match."""
        out: dict[str, float] = {}
        for pattern, value in targets.items():
            hits = [n for n in self.layer_names if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise ValueError(f"layer_target_density: pattern {pattern!r} matches no masked layer")
            for name in hits:
                out.setdefault(name, float(value))
        return out

    # -- single steps ---------------------------------------------------------------------------
    def _train_mode(self, train_aux: bool) -> None:
        for p in self.aux_params:
            p.requires_grad_(train_aux)
        for p in self.weight_params:
            p.requires_grad_(not train_aux)
        self.model.train()
        if self.config.freeze_bn:
            for m in _norm_and_dropout(self.model):
                m.eval()

    def restore_trainable(self) -> None:
        """Make every parameter the trainer trains (weights and masks) trainable again."""
        for p in (*self.aux_params, *self.weight_params):
            p.requires_grad_(True)

    def _forward_backward(self, batch: Batch, params: Sequence[Tensor]) -> float:
        batch = move_to(batch, model_device(self.module))
        ddp = _is_ddp(self.model)
        # Under DDP each step trains only its own parameters, which DDP's reducer would see as unused
        # ones: the trainer runs forward/backward outside DDP's reducer and averages the gradients itself.
        with self.model.no_sync() if ddp else contextlib.nullcontext():
            loss = self.loss_fn(self.forward_fn(self.model, batch), batch)
            loss.backward()
        loss = loss.detach().reshape(()).float()
        if ddp:
            grads = [p.grad for p in params if p.grad is not None]
            _all_reduce_mean([*grads, loss.reshape(1)], group=self.model.process_group)
        elif self._sharded():
            _all_reduce_mean([loss.reshape(1)])
        return float(loss)

    def _sharded(self) -> bool:
        return any(is_dtensor(p) for p in self.aux_params)

    def aux_step(self, batch: Batch) -> float:
        """One mask step on ``batch`` with ``W`` frozen (no ``dW`` is computed); returns the loss."""
        self._train_mode(train_aux=True)
        self.aux_optimizer.zero_grad(set_to_none=True)
        if self.fused_aux_step:
            with self.aux_optimizer.fused_step():
                loss = self._forward_backward(batch, self.aux_params)
        else:
            loss = self._forward_backward(batch, self.aux_params)
            self.aux_optimizer.step()
        self._after_aux_step()
        return loss

    def weight_step(self, batch: Batch) -> float:
        """One weight step on ``batch`` with ``M`` frozen (no ``dM`` is computed); returns the loss."""
        self._train_mode(train_aux=False)
        self.weight_optimizer.zero_grad(set_to_none=True)
        loss = self._forward_backward(batch, self.weight_params)
        self.weight_optimizer.step()
        return loss

    def _after_aux_step(self) -> None:
        """Density controllers and the floor, from one count of every layer's kept entries."""
        cfg = self.config
        counts = layer_counts(self.module)
        by_name = {c.name: c for c in counts}
        groups = self.aux_optimizer.param_groups
        # layers whose penalty is off for the next step: below their target (the lambda a controller
        # built up while above it would otherwise keep pruning far past the target) or at their floor
        penalty_off: set[str] = set()
        if cfg.target_density is not None:
            rest = [c for c in counts if c.name not in self._layer_targets]
            if rest:
                d = sum(c.kept for c in rest) / max(sum(c.total for c in rest), 1)
                factor = self._factor(d, cfg.target_density)
                for group in groups:
                    if group["name"] not in self._layer_targets and group["name"] != "n:m":
                        group["penalty"] = min(max(group["penalty"] * factor, 1e-6), 1e4)
                if d < cfg.target_density:
                    penalty_off.update(c.name for c in rest)
        for group in groups:
            if group["name"] in self._layer_targets:
                c = by_name[group["name"]]
                factor = self._factor(c.density, self._layer_targets[c.name])
                group["penalty"] = min(max(group["penalty"] * factor, 1e-6), 1e4)
                if c.density < self._layer_targets[c.name]:
                    penalty_off.add(c.name)
        revived: list[str] = []
        if cfg.min_density > 0 or cfg.keep_rows:
            revived = enforce_floor(self.module, cfg.min_density, cfg.keep_rows, counts)
            penalty_off.update(c.name for c in counts
                               if c.kept <= max(1, math.ceil(cfg.min_density * c.module.weight_aux.numel()))
                               * (c.total // max(c.module.weight_aux.numel(), 1)))
        if penalty_off or any(0.0 in g.get("layer_scale", ()) for g in groups):
            aux_name = {id(m.weight_aux): n for n, m in masked_modules(self.module)}
            for group in groups:  # back on once the layer is above its target and its floor
                group["layer_scale"] = [0.0 if aux_name.get(id(p)) in penalty_off else 1.0 for p in group["params"]]
        if revived:
            counts = layer_counts(self.module)
        self._counts = counts

    def _factor(self, density: float, target: float) -> float:
        error = max(-1.0, min(1.0, (density - target) / target))
        return math.exp(self.config.controller_gain * error)

    def step(self, train_batch: Batch, heldout_batch: Batch | None = None) -> dict[str, Any]:
        """One iteration: a mask step (on ``heldout_batch`` in ``bilevel`` mode, on ``train_batch``
        in ``same_batch`` mode), then a weight step on ``train_batch``. Returns the step's record."""
        if self.config.mode == "bilevel":
            if heldout_batch is None:
                raise ValueError("heldout_batch: the bilevel mode needs a held-out batch (or use mode='same_batch')")
            aux_loss = self.aux_step(heldout_batch)
        else:
            aux_loss = self.aux_step(train_batch)
        weight_loss = self.weight_step(train_batch)
        self.step_count += 1
        counts = self._counts if self._counts is not None else layer_counts(self.module)
        record = {
            "step": self.step_count,
            "aux_loss": aux_loss,
            "weight_loss": weight_loss,
            "density": sum(c.kept for c in counts) / max(sum(c.total for c in counts), 1),
            "penalty": self.aux_optimizer.penalty_value(),
            "lambda": {g["name"]: float(g["penalty"]) for g in self.aux_optimizer.param_groups},
            "aux_skipped": self.aux_optimizer.skipped_steps,
        }
        return record

    def density(self) -> float:
        """Fraction of kept weights over all masked layers (all ranks, under FSDP2)."""
        counts = layer_counts(self.module)
        return sum(c.kept for c in counts) / max(sum(c.total for c in counts), 1)

    def layer_densities(self) -> dict[str, float]:
        """Kept fraction of every masked layer, by qualified name (all ranks, under FSDP2)."""
        return {c.name: c.density for c in layer_counts(self.module)}

    # -- the ready loop -----------------------------------------------------------------------------
    def fit(
        self,
        train: Dataset,
        heldout: Dataset | None = None,
        steps: int = 1000,
        *,
        eval_data: TensorDataset | None = None,
        eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
        eval_every: int = 100,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 0,
        resume: bool = True,
        run_config: Mapping[str, Any] | None = None,
        allow_config_change: bool | Iterable[str] = (),
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Run until ``steps`` iterations in total; returns the history (one record per step).

        ``train``/``heldout`` are map-style datasets whose items are tensors, tuples or dicts (collated
        with ``default_collate``). Every ``eval_every`` steps (and at the end) ``eval_data`` (a
        classification ``TensorDataset``) adds ``accuracy`` to the record, and ``eval_fn(model)`` adds
        the metrics it returns. With ``checkpoint`` set, an existing file there is resumed from, and
        the state is written (atomically) every ``checkpoint_every`` steps and at the end
        (``resume=False``: an existing file is overwritten, not read). A resume
        checks the file (checksum, ``weights_only`` load) and refuses one written with another config,
        model or ``run_config`` by field name unless ``allow_config_change`` allows it (see
        :meth:`load`). Batches are a function of ``(config.seed, step)``, so a resumed run equals an
        uninterrupted one. Every parameter the trainer trains is trainable again when it returns.
        """
        from tqdm.auto import tqdm

        if self.config.mode == "bilevel" and heldout is None:
            raise ValueError("heldout: the bilevel mode needs a held-out dataset (or use mode='same_batch')")
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every: expected a non-negative integer, got {checkpoint_every}")
        if resume and checkpoint is not None and Path(checkpoint).exists():
            self.load(checkpoint, run_config=run_config, allow_config_change=allow_config_change)
        train_stream = BatchStream(train, self.config.batch_size, self.config.seed)
        held_stream = BatchStream(heldout, self.config.batch_size, self.config.seed + 1) if heldout is not None else None
        # disable=None: bars only on a terminal, so logs and CI output stay readable
        bar = tqdm(total=steps, initial=self.step_count, desc="autoprune", disable=None if progress else True, leave=False)
        try:
            while self.step_count < steps:
                i = self.step_count
                record = self.step(train_stream.batch(i), held_stream.batch(i) if held_stream else None)
                if record["step"] % eval_every == 0 or record["step"] == steps:
                    if eval_data is not None:
                        record["accuracy"] = accuracy(self.model, eval_data)
                    if eval_fn is not None:
                        record.update(eval_fn(self.model))
                self.history.append(record)
                for cb in self.callbacks:
                    cb(self, record)
                bar.update(1)
                bar.set_postfix(density=f"{record['density']:.4f}", loss=f"{record['weight_loss']:.3f}")
                if checkpoint is not None and checkpoint_every and self.step_count % checkpoint_every == 0:
                    self.save(checkpoint, run_config=run_config)
        finally:
            bar.close()
            self.restore_trainable()
        if checkpoint is not None:
            self.save(checkpoint, run_config=run_config)
        return self.history

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: model, both optimisers (lambdas included), step, history, RNG."""
        state = {
            "model": self.module.state_dict(),
            "aux_optimizer": self.aux_optimizer.state_dict(),
            "weight_optimizer": self.weight_optimizer.state_dict(),
            "step": self.step_count,
            "history": self.history,
            "config": self.config.to_dict(),
            "rng_cpu": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.aux_optimizer.load_state_dict(state["aux_optimizer"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.step_count = int(state["step"])
        self.history = list(state["history"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    def checkpoint_config(self, run_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What a checkpoint records of this run and a resume compares by field: the trainer's
        config (``autoprune.*``), the model's class and parameter names/shapes/dtypes
        (``model.*``) and the caller's ``run_config`` (``run.*``, e.g. data set and seed)."""
        structure = {name: f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"
                     for name, t in self.module.state_dict().items() if isinstance(t, Tensor)}
        config = {"autoprune": self.config.to_dict(),
                  "model": {"class": type(self.module).__name__, "tensors": structure}}
        if run_config:
            config["run"] = dict(run_config)
        return config

    def save(self, path: str | os.PathLike[str], *, run_config: Mapping[str, Any] | None = None) -> None:
        """Write :meth:`state_dict` to ``path`` atomically, with a checksum and the run's config
        (:meth:`checkpoint_config`); see :mod:`autoprune_ext.checkpoint`."""
        save_checkpoint(self.state_dict(), path, config=self.checkpoint_config(run_config))

    def load(
        self,
        path: str | os.PathLike[str],
        *,
        run_config: Mapping[str, Any] | None = None,
        allow_config_change: bool | Iterable[str] = (),
    ) -> None:
        """Resume from a checkpoint written by :meth:`save`.

        The file is verified (checksum) and read with ``torch.load(weights_only=True)``; a checkpoint
        written with a different config, model or ``run_config`` raises
        :class:`~autoprune_ext.checkpoint.CheckpointError` naming the differing fields unless
        ``allow_config_change`` lists them (or is ``True``).
        """
        state = load_checkpoint(path, config=self.checkpoint_config(run_config),
                                allow_config_change=allow_config_change, map_location=model_device(self.model))
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: does not fit this trainer: {first}") from exc


def freeze_masks(model: nn.Module) -> None:
    """Stop training every ``weight_aux`` (fine-tuning with the mask fixed)."""
    for _, m in masked_modules(model):
        m.weight_aux.requires_grad_(False)
