"""Argument checks shared by the op layer, the functional API and the layers.

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, device, value
or name) with a message that starts with the argument's name and states the expected form.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .reference import GRANULARITIES, NM_MAX_M, RULES, SURROGATES, parse_nm

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _finite_checks_enabled() -> bool:
    # The finiteness test of aux costs a device-to-host sync on GPU; it is skipped while compiling
    # and can be switched off with AUTOPRUNE_CHECK_FINITE=0 for maximum eager GPU throughput.
    if os.environ.get("AUTOPRUNE_CHECK_FINITE", "1") == "0":
        return False
    return not torch.compiler.is_compiling()


def check_tensor(x: object, name: str, *, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(x.dtype).removeprefix('torch.')}")
    return x


def check_same_device(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got {x.device}")


def check_names(surrogate: str, rule: str, alpha: float) -> None:
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate: expected one of {SURROGATES}, got {surrogate!r}")
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"alpha: expected a finite float, got {alpha!r}")


def check_granularity(granularity: str) -> None:
    if granularity in GRANULARITIES or parse_nm(granularity) is not None:
        return
    raise ValueError(f"granularity: expected one of {GRANULARITIES} or 'N:M' (e.g. '2:4'), got {granularity!r}")


def check_nm_args(aux: object, n: object, m: object, aux_name: str = "aux") -> Tensor:
    """``aux`` is a float tensor (at least 1-D) whose rows split into groups of ``m``; ``1 <= n <= m``."""
    a = check_tensor(aux, aux_name)
    for name, v in (("n", n), ("m", m)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if not 1 <= n <= m <= NM_MAX_M:  # type: ignore[operator]
        raise ValueError(f"n, m: expected 1 <= n <= m <= {NM_MAX_M}, got n={n}, m={m}")
    if a.dim() == 0:
        raise ValueError(f"{aux_name}: expected a tensor with at least one dimension, got a scalar")
    row = a.numel() // a.shape[0] if a.shape[0] else math.prod(a.shape[1:])
    if row % m:  # type: ignore[operator]
        raise ValueError(
            f"{aux_name}: expected rows (shape[1:] = {tuple(a.shape[1:])}, {row} entries) that split into "
            f"groups of m={m} for N:M granularity"
        )
    return a


def check_finite(x: Tensor, name: str) -> None:
    if _finite_checks_enabled() and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")


def check_mask_pair(
    weight: object, aux: object, *, weight_name: str = "weight", aux_name: str = "aux", finite: bool = True
) -> None:
    """``weight`` and ``aux`` are float tensors on one device with matching shapes; ``aux`` is finite."""
    w = check_tensor(weight, weight_name)
    a = check_tensor(aux, aux_name)
    check_same_device(aux_name, a, weight_name, w)
    if w.dim() == 0:
        raise ValueError(f"{weight_name}: expected a tensor with at least one dimension, got a scalar")
    if a.shape != w.shape and not (a.dim() == 1 and a.shape[0] == w.shape[0]):
        raise ValueError(
            f"{aux_name}: expected shape {tuple(w.shape)} (weight granularity) or ({w.shape[0]},) "
            f"(unit granularity) to match {weight_name}, got {tuple(a.shape)}"
        )
    if finite:
        check_finite(a, aux_name)


def check_like(x: object, name: str, ref: Tensor, ref_name: str, *, same_dtype: bool = False) -> Tensor:
    """``x`` is a float tensor with ``ref``'s shape and device (and dtype if asked)."""
    t = check_tensor(x, name)
    check_same_device(name, t, ref_name, ref)
    if t.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {tuple(ref.shape)} (that of {ref_name}), got {tuple(t.shape)}")
    if same_dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {t.dtype}")
    return t
