"""Export of finalized N:M weights: check the pattern, and hand 2:4 weights to PyTorch's
semi-structured sparse tensors (``torch.sparse.to_sparse_semi_structured``, sparse tensor cores).

The check is exact and runs anywhere; the conversion needs what PyTorch needs for it: a CUDA device
of compute capability 8.0 or newer and a float16/bfloat16 (or int8) weight. On other machines
:func:`semi_structured_support` says why not, and :func:`to_semi_structured` raises with that reason.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def nm_violations(weight: Tensor, n: int, m: int) -> int:
    """Number of groups of ``m`` consecutive entries (along the input dimension, each row of
    ``weight.reshape(out, -1)``) holding more than ``n`` nonzeros; ``0`` means the weight is N:M."""
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n <= m):
        raise ValueError(f"n, m: expected integers with 1 <= n <= m, got {n!r}, {m!r}")
    if weight.dim() < 2:
        raise ValueError(f"weight: expected at least 2 dimensions [out, in, ...], got shape {tuple(weight.shape)}")
    row = math.prod(weight.shape[1:])
    if row % m:
        raise ValueError(f"weight: each row ({row} entries) must split into groups of m={m}")
    groups = (weight.detach().reshape(-1, m) != 0).sum(dim=1)
    return int((groups > n).sum())


def is_nm(weight: Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of ``m`` entries of every row of ``weight`` has at most ``n`` nonzeros."""
    return nm_violations(weight, n, m) == 0


def semi_structured_support(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether ``to_sparse_semi_structured`` can run here (on ``device``), and why not."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        if not torch.cuda.is_available():
            return False, "semi-structured sparsity needs a CUDA GPU (none here)"
        if device is not None:
            return False, f"semi-structured sparsity needs a CUDA tensor, got one on {device}"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"semi-structured sparsity needs compute capability >= 8.0, got {major}.x"
    return True, ""


@torch.no_grad()
def to_semi_structured(model: nn.Module) -> list[str]:
    """Replace the weight of every ``nn.Linear`` of a finalized ``model`` that is exactly 2:4 by a
    semi-structured sparse tensor, in place; returns the names of the converted layers.

    Layers that are not 2:4 are left dense. Raises ``RuntimeError`` with the reason when this machine
    cannot run semi-structured sparsity (see :func:`semi_structured_support`).
    """
    converted: list[str] = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not is_nm(module.weight, 2, 4):
            continue
        ok, why = semi_structured_support(module.weight.device)
        if not ok:
            raise RuntimeError(f"model: layer {name!r}: {why}")
        module.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(module.weight.detach()),
                                     requires_grad=False)
        converted.append(name)
    return converted
