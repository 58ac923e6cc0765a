"""Multi-process helpers: whole (gathered) state dicts and ``finalize`` of sharded models.

Under DDP every rank holds the whole model, so :func:`autoprune_ext.finalize` works on it directly.
Under FSDP2 (``fully_shard``) every parameter is a DTensor holding one shard per rank: the model can
neither be deep-copied nor have its layers swapped, so finalizing goes through state dicts instead:

* :func:`full_state_dict` gathers the model's state dict into whole tensors (the checkpoint of a
  masked model, loadable into an unsharded model of the same architecture);
* :func:`finalize_state_dict` is the state dict :func:`autoprune_ext.finalize` would give: the dense
  architecture's keys (no ``weight_aux``) with ``W * h(M)`` baked into every masked weight.

Both are collective under FSDP2 (every rank must call them) and return the whole state on every rank.
For resuming an FSDP2 run with the same number of ranks, ``AutoPrune.save``/``load`` per rank (one
file each) are enough: the trainer's state holds the rank's DTensor shards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .nn import MaskedModule
from .sparsity import is_dtensor

__all__ = ["finalize_state_dict", "full_state_dict", "is_sharded", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper, or ``model`` itself (FSDP2 shards in
    place, so a sharded model is its own module)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is a DTensor (FSDP2 / tensor parallel)."""
    return any(is_dtensor(t) for t in (*model.parameters(), *model.buffers()))


def _whole(t: Tensor, cpu: bool) -> Tensor:
    t = t.detach()
    t = t.full_tensor() if is_dtensor(t) else t
    return t.cpu() if cpu else t


@torch.no_grad()
def full_state_dict(model: nn.Module, *, cpu: bool = True) -> dict[str, Tensor]:
    """``model.state_dict()`` with every DTensor shard gathered into its whole tensor.

    Keys are those of the unwrapped module (no DDP ``module.`` prefix), so the result loads with
    ``strict=True`` into an unsharded model of the same (masked) architecture. Collective under FSDP2;
    every rank gets the whole state (on CPU unless ``cpu=False``).
    """
    return {k: _whole(v, cpu) for k, v in unwrap(model).state_dict().items()}


def _baked_weight(module: MaskedModule, weight: Tensor, aux: Tensor) -> Tensor:
    """``module.masked_weight()`` computed from whole ``weight`` and ``aux`` tensors instead of the
    module's own (possibly sharded) parameters: a shallow stand-in shares the module's configuration
    and layout methods and holds the whole tensors."""
    stand_in: Any = object.__new__(type(module))
    stand_in.__dict__.update(module.__dict__)
    stand_in.__dict__["_parameters"] = {**module._parameters, "weight": weight, "weight_aux": aux}
    return stand_in.masked_weight()


@torch.no_grad()
def finalize_state_dict(model: nn.Module, *, cpu: bool = True) -> dict[str, Tensor]:
    """The state dict of ``autoprune_ext.finalize(model)`` without copying the model.

    Every masked layer's ``weight`` becomes ``W * h(M)`` and its ``weight_aux`` is dropped, so the
    result loads with ``strict=True`` into a fresh *dense* model of the original architecture. Works
    for FSDP2-sharded models (shards are gathered: collective, every rank must call it), DDP-wrapped
    and plain ones; every rank gets the whole state (on CPU unless ``cpu=False``).
    """
    module = unwrap(model)
    state = full_state_dict(module, cpu=cpu)
    # every name of every masked layer: a module registered twice appears twice in a state dict
    for name, layer in module.named_modules(remove_duplicate=False):
        if not isinstance(layer, MaskedModule):
            continue
        prefix = f"{name}." if name else ""
        aux = state.pop(prefix + "weight_aux")
        state[prefix + "weight"] = _baked_weight(layer, state[prefix + "weight"], aux).contiguous()
    return state
