"""Training utilities: deterministic batch streams, evaluation, and plain supervised training.

The stream makes step ``i``'s batch a pure function of ``(seed, i)``, which is what lets a resumed
run reproduce an uninterrupted one exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset, default_collate

#: a batch: a tensor, a tuple/list ``(inputs, targets, ...)`` or a mapping of keyword inputs
Batch = Any
LossFn = Callable[[Tensor, Tensor], Tensor]
#: ``forward_fn(model, batch) -> output``
ForwardFn = Callable[[nn.Module, Any], Any]
#: ``loss_fn(output, batch) -> scalar loss``
BatchLossFn = Callable[[Any, Any], Tensor]


def move_to(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with every tensor in it (nested in tuples, lists and mappings) on ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):  # a plain dict (also for BatchEncoding and other mappings)
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def default_forward(model: nn.Module, batch: Batch) -> Any:
    """``model(**batch)`` for a mapping (Hugging Face style), ``model(batch[0])`` for a tuple or list
    ``(inputs, targets, ...)``, ``model(batch)`` for a tensor."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("batch: expected a non-empty tuple (inputs, targets, ...), got an empty one")
        return model(batch[0])
    return model(batch)


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: the output itself, its ``.logits``, or its first element."""
    if isinstance(output, Tensor):
        return output
    logits = _field(output, "logits")
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"output: expected a tensor or an output with .logits, got {type(output).__name__}")


def default_loss(output: Any, batch: Batch) -> Tensor:
    """The loss of ``output`` on ``batch``: the output's own ``.loss`` when it has one (Hugging Face
    models given ``labels``), else cross-entropy of its logits against the targets (``batch[1]``, or
    ``batch["labels"]``), over the last dimension (classification and per-token logits alike)."""
    loss = _field(output, "loss")
    if isinstance(loss, Tensor):
        return loss
    targets = None
    if isinstance(batch, Mapping):
        targets = batch.get("labels", batch.get("label"))
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        targets = batch[1]
    if not isinstance(targets, Tensor):
        raise ValueError(
            "loss_fn: cannot infer the loss: the output has no .loss and the batch no targets "
            "(batch[1] or batch['labels']); pass loss_fn=lambda output, batch: ..."
        )
    logits = logits_of(output)
    if logits.dim() > 2:  # per-token logits [..., classes] and targets [...]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return F.cross_entropy(logits, targets)


class BatchStream:
    """Endless, reproducible mini-batches of a dataset: epoch ``e`` uses the permutation drawn from
    ``seed`` and ``e``; :meth:`batch` gives the batch of any global step without replaying the
    earlier ones. Incomplete last batches are dropped (fixed batch shapes)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
        if n < 1:
            raise ValueError("dataset: expected at least one sample, got an empty dataset")
        self.dataset, self.seed, self.shuffle = dataset, int(seed), shuffle
        self.batch_size = min(int(batch_size), n)
        self.per_epoch = n // self.batch_size
        self._epoch, self._perm = -1, torch.arange(n)

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            n = len(self.dataset)  # type: ignore[arg-type]
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = torch.randperm(n, generator=gen)
            self._epoch = epoch
        return self._perm

    def batch(self, step: int) -> Batch:
        """The batch of global step ``step`` (0-based)."""
        epoch, index = divmod(int(step), self.per_epoch)
        idx = self._permutation(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        if isinstance(self.dataset, TensorDataset):
            return tuple(t[idx] for t in self.dataset.tensors)
        return default_collate([self.dataset[int(i)] for i in idx])

    def __iter__(self) -> Iterator[Batch]:
        step = 0
        while True:
            yield self.batch(step)
            step += 1


def _to(batch: Batch, device: torch.device) -> Batch:
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless model)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, inputs: Tensor, batch_size: int = 1024) -> Tensor:
    """Logits of ``model`` (in eval mode) on ``inputs``, in batches; the mode is restored."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        outs = [model(inputs[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(inputs), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy(model: nn.Module, dataset: TensorDataset, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on a ``TensorDataset`` of (images, labels), in [0, 1]."""
    x, y = dataset.tensors[:2]
    if len(y) == 0:
        raise ValueError("dataset: expected at least one sample, got an empty dataset")
    return float((predict(model, x, batch_size).argmax(1) == y).float().mean())


def make_optimizer(name: str, params: Any, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``adam`` or ``sgd`` (momentum 0.9, Nesterov) over ``params``."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"optimizer: expected 'adam' or 'sgd', got {name!r}")


def train_supervised(
    model: nn.Module,
    dataset: Dataset,
    steps: int,
    *,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    loss_fn: LossFn = F.cross_entropy,
    after_step: Callable[[nn.Module], None] | None = None,
    progress: bool = False,
    desc: str = "train",
) -> list[float]:
    """Train every parameter that requires grad for ``steps`` steps; returns the loss per step.

    ``after_step`` runs after each optimiser step (e.g. to re-apply a fixed pruning mask). Freeze
    ``weight_aux`` first to fine-tune a masked model with its mask fixed.
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: has no parameter that requires grad")
    opt = make_optimizer(optimizer, params, lr, weight_decay)
    stream = BatchStream(dataset, batch_size, seed)
    device = model_device(model)
    model.train()
    losses = []
    for step in tqdm(range(steps), desc=desc, disable=None if progress else True, leave=False):
        x, y = _to(stream.batch(step), device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(model)
        losses.append(float(loss.detach()))
    return losses
