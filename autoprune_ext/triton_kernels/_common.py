"""Helpers shared by the Triton kernels: surrogate and rule codes, precision handling, scalars.

Precision rule (the one of :mod:`autoprune_ext.reference`): every kernel computes in float32, or in
float64 when any input is float64 (constexpr ``FP64``). Loaded values go through
:func:`to_compute` before any arithmetic or comparison -- this also sidesteps the interpreter, which
stores bfloat16 as raw ``uint16`` and would compare or multiply the bits.

Scalars. Triton passes a Python ``float`` argument as float32 (on the GPU and in the interpreter),
which is not enough for float64 runs compared at 1e-12. Every float scalar is therefore passed as a
``(hi, lo)`` pair of float32 values with ``hi + lo == x`` to about 2**-48 relative
(:func:`split`); :func:`scalar` rebuilds it inside the kernel in the compute dtype, so scalars are
float32 in float32 kernels (and never float64 by accident) and nearly exact in float64 kernels.
"""

from __future__ import annotations

import contextlib
import math
import struct

import torch
import triton
import triton.language as tl

#: surrogate name -> constexpr code used by :func:`surrogate`
SURROGATE_CODES: dict[str, int] = {
    "softplus": 0,
    "sigmoid": 1,
    "identity": 2,
    "leaky_relu": 3,
    "leaky_relu_reversed": 4,
    "relu": 5,
}
#: rule name -> constexpr code used by :func:`rule_factor`
RULE_CODES: dict[str, int] = {"sign": 0, "chain": 1}

#: ``inv_abs_weight`` threshold, as in the reference
INV_ABS_EPS = 1e-15


def _f32(x: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def split(x: float) -> tuple[float, float]:
    """``(hi, lo)``: two float32-representable floats with ``hi + lo`` ~= ``x`` (about 48 bits)."""
    x = float(x)
    hi = _f32(x)
    if not math.isfinite(hi):
        return hi, 0.0
    return hi, _f32(x - hi)


def compute_is_fp64(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU current while launching (Triton launches on the current device)."""
    if t.device.type == "cuda" and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _probe(x):
    pass


def _is_interpreted(fn) -> bool:
    while hasattr(fn, "fn") and type(fn).__name__ != "InterpretedFunction":
        fn = fn.fn
    return type(fn).__name__ == "InterpretedFunction"


#: whether these kernels were defined under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)
INTERPRETED: bool = _is_interpreted(triton.jit(_probe))
_INTERPRETED = tl.constexpr(INTERPRETED)


# --------------------------------------------------------------------------------------------------
# @triton.jit helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def scalar(hi, lo, FP64: tl.constexpr):
    """A float scalar argument passed as ``(hi, lo)`` (see :func:`split`) in the compute dtype."""
    if FP64:
        v = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        v = tl.cast(hi, tl.float32)
    return v


@triton.jit
def to_compute(x, FP64: tl.constexpr):
    """Convert loaded values to the compute dtype (float32, or float64 for float64 runs)."""
    if x.dtype.is_bf16():
        x = x.to(tl.float32)  # exact; also avoids the interpreter's raw bf16 -> fp64 cast
    if FP64:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _round_bf16_rne(x):
    """float32 ``x`` rounded to the nearest bfloat16 value (ties to even), still as float32."""
    bits = x.to(tl.uint32, bitcast=True)
    special = (bits & 0x7F800000) == 0x7F800000  # inf / nan: leave alone
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return tl.where(special, bits, rounded).to(tl.float32, bitcast=True)


@triton.jit
def cast_for(x, PTR):
    """``x`` converted to the element type of pointer(s) ``PTR``, for storing.

    GPU conversions round to nearest even. The interpreter truncates float32 -> bfloat16 and
    reinterprets bits for float64 -> bfloat16, so there the value goes through float32 and is
    rounded explicitly first (exactly what the GPU does, bar float64 double rounding).
    """
    if PTR.dtype.element_ty == tl.bfloat16:
        if x.dtype == tl.float64:
            x = x.to(tl.float32)
        if _INTERPRETED:
            x = _round_bf16_rne(x.to(tl.float32))
    return x.to(PTR.dtype.element_ty)


@triton.jit
def surrogate(m, alpha, SURR: tl.constexpr):
    """The surrogate value ``s(m)`` (``m`` in the compute dtype; ``alpha`` a compute-dtype scalar).

    softplus matches ``F.softplus`` (beta 1, threshold 20) and is stable for any ``|m|``:
    ``max(m, 0) + log1p(exp(-|m|))`` with an accurate ``log1p`` (``log(u) * z / (u - 1)``,
    ``u = 1 + z``), so small values far below 0 keep full relative precision; sigmoid is computed
    from ``exp(-|m|)`` as well (no overflow, accurate tails).
    """
    if SURR == 0:  # softplus
        z = tl.exp(-tl.abs(m))
        u = 1.0 + z
        den = u - 1.0
        l1p = tl.where(den == 0.0, z, tl.log(u) * (z / tl.where(den == 0.0, 1.0, den)))
        r = tl.where(m > 20.0, m, tl.maximum(m, 0.0) + l1p)
    elif SURR == 1:  # sigmoid
        z = tl.exp(-tl.abs(m))
        r = tl.where(m >= 0, 1.0 / (1.0 + z), z / (1.0 + z))
    elif SURR == 2:  # identity
        r = tl.full(m.shape, 1.0, m.dtype)
    elif SURR == 3:  # leaky_relu
        r = tl.where(m > 0, tl.full(m.shape, 1.0, m.dtype), alpha)
    elif SURR == 4:  # leaky_relu_reversed
        r = tl.where(m > 0, alpha, tl.full(m.shape, 1.0, m.dtype))
    else:  # relu
        r = (m > 0).to(m.dtype)
    return r


@triton.jit
def rule_factor(w, RULE: tl.constexpr):
    """``c(w)``: ``sign(w)`` (NaN stays NaN, as ``torch.sign``) or ``w`` itself (``chain``)."""
    if RULE == 0:
        c = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, w * 0.0))
    else:
        c = w
    return c


