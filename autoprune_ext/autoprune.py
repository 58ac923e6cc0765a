"""The AutoPrune trainer: alternating bi-level steps of the masks ``M`` and the weights ``W``.

Usable two ways (``shared/docs/method.md`` section 4):

* from your own loop: ``trainer.step(train_batch, heldout_batch)`` (or :meth:`AutoPrune.aux_step`
  and :meth:`AutoPrune.weight_step` separately);
* ready-made: ``trainer.fit(train_set, heldout_set, steps=...)`` with evaluation, logging
  callbacks, tqdm progress and atomic checkpoints that resume exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from .convert import convert, masked_modules
from .optim import AuxAdam
from .training import Batch, BatchStream, LossFn, accuracy, make_optimizer, model_device

Callback = Callable[["AutoPrune", dict[str, Any]], None]
MODES = ("bilevel", "same_batch")


@dataclass
class AutoPruneConfig:
    """Hyper-parameters of an AutoPrune run (defaults: the authors' LeNet-5 settings, batch 200).

    ``penalty`` is ``lambda``: one float for every masked layer, or a mapping with keys ``linear`` /
    ``conv`` / module-name patterns (see :meth:`AuxAdam.from_model`). ``target_density`` replaces a
    fixed ``lambda`` by a controller that scales every group's ``lambda`` by
    ``exp(controller_gain * clip((density - target) / target, -1, 1))`` after each mask step.
    ``mask_init`` is ``(mean, std)`` of the truncated-normal init used when the trainer converts the
    model itself.
    """

    lr_weight: float = 2e-3
    lr_aux: float = 0.1
    weight_optimizer: str = "adam"
    weight_decay: float = 0.0
    aux_betas: tuple[float, float] = (0.9, 0.999)
    penalty: float | dict[str, float] = field(default_factory=lambda: {"linear": 0.4, "conv": 0.2})
    rho: float = 1e-3
    inv_abs_weight: bool = False
    surrogate: str = "softplus"
    rule: str = "sign"
    alpha: float = 0.1
    granularity: str = "weight"
    mask_init: tuple[float, float] = (0.5, 0.01)
    mode: str = "bilevel"
    target_density: float | None = None
    controller_gain: float = 0.02
    freeze_bn: bool = False
    batch_size: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.target_density is not None and not 0.0 < self.target_density <= 1.0:
            raise ValueError(f"target_density: expected a fraction in (0, 1], got {self.target_density}")
        lams = self.penalty.values() if isinstance(self.penalty, Mapping) else [self.penalty]
        for lam in lams:
            if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
                raise ValueError(f"penalty: expected non-negative finite lambda values, got {self.penalty!r}")
        for name in ("lr_weight", "lr_aux", "rho", "controller_gain"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: expected a non-negative finite float, got {value!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _norm_and_dropout(model: nn.Module) -> list[nn.Module]:
    kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    return [m for m in model.modules() if isinstance(m, kinds)]


class AutoPrune:
    """Alternating bi-level trainer of a masked model.

    Args:
        model: a model; converted with the config's mask options if it has no masked layers yet.
        config: hyper-parameters (keyword overrides of :class:`AutoPruneConfig` also accepted).
        weight_optimizer: any torch optimiser over the non-auxiliary parameters (default: built
            from ``config.weight_optimizer``, ``lr_weight``, ``weight_decay``).
        loss_fn: task loss ``loss_fn(logits, targets)``.
        callbacks: called as ``callback(trainer, record)`` after every step; ``record`` holds the
            step's losses, density and lambdas (and accuracy on evaluation steps).
    """

    def __init__(
        self,
        model: nn.Module,
        config: AutoPruneConfig | None = None,
        *,
        weight_optimizer: torch.optim.Optimizer | None = None,
        loss_fn: LossFn = F.cross_entropy,
        callbacks: Sequence[Callback] = (),
        **overrides: Any,
    ) -> None:
        config = config or AutoPruneConfig()
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        cfg = self.config
        if not any(True for _ in masked_modules(model)):
            model = convert(model, granularity=cfg.granularity, init=cfg.mask_init, surrogate=cfg.surrogate,
                            rule=cfg.rule, alpha=cfg.alpha)
        self.model = model
        self.aux_params = [m.weight_aux for _, m in masked_modules(model)]
        aux_ids = {id(p) for p in self.aux_params}
        self.weight_params = [p for p in model.parameters() if id(p) not in aux_ids]
        self.aux_optimizer = AuxAdam.from_model(
            model, lr=cfg.lr_aux, betas=cfg.aux_betas, penalty=cfg.penalty, rho=cfg.rho,
            inv_abs_weight=cfg.inv_abs_weight,
        )
        if cfg.target_density is not None:
            for group in self.aux_optimizer.param_groups:  # the controller needs a positive start
                group["penalty"] = max(float(group["penalty"]), 1e-3)
        self.weight_optimizer = weight_optimizer or make_optimizer(
            cfg.weight_optimizer, self.weight_params, cfg.lr_weight, cfg.weight_decay
        )
        self.loss_fn = loss_fn
        self.callbacks = list(callbacks)
        self.step_count = 0
        self.history: list[dict[str, Any]] = []

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

    def _forward_backward(self, batch: Batch) -> float:
        device = model_device(self.model)
        x, y = batch[0].to(device), batch[1].to(device)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        return float(loss.detach())

    def aux_step(self, batch: Batch) -> float:
        """One mask step on ``batch`` with ``W`` frozen (no ``dW`` is computed); returns the loss."""
        self._train_mode(train_aux=True)
        self.aux_optimizer.zero_grad(set_to_none=True)
        loss = self._forward_backward(batch)
        self.aux_optimizer.step()
        if self.config.target_density is not None:
            self._control_lambda()
        return loss

    def weight_step(self, batch: Batch) -> float:
        """One weight step on ``batch`` with ``M`` frozen (no ``dM`` is computed); returns the loss."""
        self._train_mode(train_aux=False)
        self.weight_optimizer.zero_grad(set_to_none=True)
        loss = self._forward_backward(batch)
        self.weight_optimizer.step()
        return loss

    def _control_lambda(self) -> None:
        target = float(self.config.target_density)  # type: ignore[arg-type]
        error = max(-1.0, min(1.0, (self.density() - target) / target))
        factor = math.exp(self.config.controller_gain * error)
        for group in self.aux_optimizer.param_groups:
            group["penalty"] = min(max(group["penalty"] * factor, 1e-6), 1e4)

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
        record = {
            "step": self.step_count,
            "aux_loss": aux_loss,
            "weight_loss": weight_loss,
            "density": self.density(),
            "penalty": self.aux_optimizer.penalty_value(),
            "lambda": {g["name"]: float(g["penalty"]) for g in self.aux_optimizer.param_groups},
        }
        return record

    def density(self) -> float:
        """Fraction of kept weights over all masked layers."""
        kept = sum(m.kept() for _, m in masked_modules(self.model))
        total = sum(m.weight.numel() for _, m in masked_modules(self.model))
        return kept / max(total, 1)

    # -- the ready loop -----------------------------------------------------------------------------
    def fit(
        self,
        train: Dataset,
        heldout: Dataset | None = None,
        steps: int = 1000,
        *,
        eval_data: TensorDataset | None = None,
        eval_every: int = 100,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 0,
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Run until ``steps`` iterations in total; returns the history (one record per step).

        With ``checkpoint`` set, an existing file there is resumed from, and the state is written
        (atomically) every ``checkpoint_every`` steps and at the end. Batches are a function of
        ``(config.seed, step)``, so a resumed run equals an uninterrupted one.
        """
        from tqdm.auto import tqdm

        if self.config.mode == "bilevel" and heldout is None:
            raise ValueError("heldout: the bilevel mode needs a held-out dataset (or use mode='same_batch')")
        if checkpoint is not None and Path(checkpoint).exists():
            self.load(checkpoint)
        train_stream = BatchStream(train, self.config.batch_size, self.config.seed)
        held_stream = BatchStream(heldout, self.config.batch_size, self.config.seed + 1) if heldout is not None else None
        # disable=None: bars only on a terminal, so logs and CI output stay readable
        bar = tqdm(total=steps, initial=self.step_count, desc="autoprune", disable=None if progress else True, leave=False)
        while self.step_count < steps:
            i = self.step_count
            record = self.step(train_stream.batch(i), held_stream.batch(i) if held_stream else None)
            if eval_data is not None and (record["step"] % eval_every == 0 or record["step"] == steps):
                record["accuracy"] = accuracy(self.model, eval_data)
            self.history.append(record)
            for cb in self.callbacks:
                cb(self, record)
            bar.update(1)
            bar.set_postfix(density=f"{record['density']:.4f}", loss=f"{record['weight_loss']:.3f}")
            if checkpoint is not None and checkpoint_every and self.step_count % checkpoint_every == 0:
                self.save(checkpoint)
        bar.close()
        if checkpoint is not None:
            self.save(checkpoint)
        return self.history

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: model, both optimisers (lambdas included), step, history, RNG."""
        state = {
            "model": self.model.state_dict(),
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
        self.model.load_state_dict(state["model"])
        self.aux_optimizer.load_state_dict(state["aux_optimizer"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.step_count = int(state["step"])
        self.history = list(state["history"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (temporary file, then rename)."""
        save_atomic(self.state_dict(), path)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Resume from a checkpoint written by :meth:`save`."""
        self.load_state_dict(torch.load(path, map_location=model_device(self.model), weights_only=False))


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``: a crash never
    leaves a truncated file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def freeze_masks(model: nn.Module) -> None:
    """Stop training every ``weight_aux`` (fine-tuning with the mask fixed)."""
    for _, m in masked_modules(model):
        m.weight_aux.requires_grad_(False)
