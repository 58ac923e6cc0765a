"""Helpers shared by the Triton kernels: surrogate and rule codes, precision handling, scalars.

Precision rule (the one of :mod:`autoprune_ext.reference`): every kernel computes in float32, or in
float64 when any input is float64 (constexpr ``FP64``). Loaded values go through
:func:`to_compute` before any arithmetic -- this also sidesteps the interpreter, which stores
bfloat16 as raw ``uint16`` and would compare or multiply the bits.

Special values (the rules of :mod:`autoprune_ext.reference`'s docstring). Every *decision* --
``h(m) = m >= 0`` (:func:`keep`), ``m > 0`` / ``m < 0`` in the surrogates and in ``sign``
(:func:`is_pos`, :func:`is_neg`) -- is read off the integer bits (sign bit, magnitude, NaN test),
never from a float compare: a GPU compare or conversion in flush-to-zero mode would turn a negative
subnormal into ``-0`` (kept), and the interpreter's own bfloat16 <-> float32 conversion garbles
subnormals. So ``-0`` is kept, NaN is not, subnormals count with their sign. Conversions that could
lose subnormals are done on the bits as well: bfloat16 -> float32 (:func:`to_compute`), float32 ->
float64 (rebuilt exactly if the target flushed it) and float32 -> bfloat16 (:func:`cast_for`, round
to nearest even, NaN -> ``0x7FC0`` as ``c10::BFloat16``).

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
def _fclass(x):
    """``(bits, magnitude bits, not NaN)`` of float ``x`` (any float dtype; 16-bit types widened to
    int32): the raw material of every decision, exact whatever the target does with subnormals."""
    if x.dtype == tl.float64:
        b = x.to(tl.int64, bitcast=True)
        mag = b & 0x7FFFFFFFFFFFFFFF
        ordered = mag <= 0x7FF0000000000000
    elif x.dtype == tl.float32:
        b = x.to(tl.int32, bitcast=True)
        mag = b & 0x7FFFFFFF
        ordered = mag <= 0x7F800000
    elif x.dtype == tl.bfloat16:
        b = x.to(tl.int16, bitcast=True).to(tl.int32)
        mag = b & 0x7FFF
        ordered = mag <= 0x7F80
    else:
        b = x.to(tl.int16, bitcast=True).to(tl.int32)
        mag = b & 0x7FFF
        ordered = mag <= 0x7C00
    return b, mag, ordered


@triton.jit
def keep(x):
    """``h(x) = x >= 0`` as a boolean, from the bits: ``+-0`` and positive values (subnormals and
    ``+inf`` included) are kept; negative values (subnormals and ``-inf`` included) and NaN are not."""
    b, mag, ordered = _fclass(x)
    return ((b >= 0) | (mag == 0)) & ordered


@triton.jit
def is_pos(x):
    """``x > 0`` from the bits (``+-0`` and NaN: False; positive subnormals: True)."""
    b, mag, ordered = _fclass(x)
    return (b >= 0) & (mag != 0) & ordered


@triton.jit
def is_neg(x):
    """``x < 0`` from the bits (``+-0`` and NaN: False; negative subnormals: True)."""
    b, mag, ordered = _fclass(x)
    return (b < 0) & (mag != 0) & ordered


@triton.jit
def negate(x):
    """``-x`` exactly (the sign bit flipped; a float negation may flush subnormals on the GPU)."""
    if x.dtype == tl.float64:
        y = (x.to(tl.int64, bitcast=True) ^ -9223372036854775808).to(tl.float64, bitcast=True)
    else:
        y = (x.to(tl.int32, bitcast=True) ^ -2147483648).to(tl.float32, bitcast=True)
    return y


@triton.jit
def order_key(x):
    """An integer with the order of ``torch.sort`` on float ``x`` (compute dtype): ``-0 == +0``, every
    NaN equal and above ``+inf``; exact for subnormals."""
    b, mag, ordered = _fclass(x)
    if x.dtype == tl.float64:
        top = 0x7FFFFFFFFFFFFFFF
    else:
        top = 0x7FFFFFFF
    return tl.where(ordered, tl.where(b < 0, -mag, mag), top)


@triton.jit
def inv_abs_eps(FP64: tl.constexpr):
    """``1e-15`` (:data:`INV_ABS_EPS`) in the compute dtype: float32 as the reference rounds it, the
    exact double in float64 kernels (a float literal would be the float32 value)."""
    if FP64:
        e = tl.full((1,), 0x3CD203AF9EE75616, tl.int64).to(tl.float64, bitcast=True)
    else:
        e = tl.full((1,), 1e-15, tl.float32)
    return e


@triton.jit
def _bf16_to_f32(x):
    """bfloat16 -> float32 on the bits (exact, subnormals kept: no conversion instruction)."""
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_f64(x):
    """float32 -> float64, exact for subnormals even where the target flushes them on conversion."""
    y = x.to(tl.float64)
    b = x.to(tl.int32, bitcast=True)
    mag = b & 0x7FFFFFFF
    sub = (mag != 0) & (mag < 0x00800000)
    exact = mag.to(tl.float64) * 2.0**-75 * 2.0**-74  # mag * 2^-149, two normal float32 factors
    return tl.where(sub, tl.where(b < 0, -exact, exact), y)


@triton.jit
def to_compute(x, FP64: tl.constexpr):
    """Convert loaded values to the compute dtype (float32, or float64 for float64 runs), exactly
    (subnormals included, see the module docstring)."""
    if x.dtype == tl.bfloat16:
        x = _bf16_to_f32(x)
    if FP64:
        if x.dtype == tl.float32:
            y = _f32_to_f64(x)
        else:
            y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _round_bf16_rne(x):
    """The bfloat16 bits (``uint16``) of float32 ``x`` rounded to nearest even, as ``c10::BFloat16``:
    subnormals rounded like any value, inf kept, NaN -> ``0x7FC0``."""
    bits = x.to(tl.uint32, bitcast=True)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return tl.where(nan, 0x7FC0, rounded).to(tl.uint16)


@triton.jit
def cast_for(x, PTR):
    """``x`` converted to the element type of pointer(s) ``PTR``, for storing.

    Round to nearest even. bfloat16 is produced from the bits (:func:`_round_bf16_rne`) on every
    target: the interpreter's conversion truncates and garbles subnormals, and a GPU conversion must
    not flush them either; float64 goes through float32 first, as ``c10::BFloat16(double)`` does.
    """
    if PTR.dtype.element_ty == tl.bfloat16:
        if x.dtype == tl.float64:
            x = x.to(tl.float32)
        y = _round_bf16_rne(x.to(tl.float32)).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(PTR.dtype.element_ty)
    return y


@triton.jit
def surrogate(m, alpha, SURR: tl.constexpr):
    """The surrogate value ``s(m)`` (``m`` in the compute dtype; ``alpha`` a compute-dtype scalar).

    softplus matches ``F.softplus`` (beta 1, threshold 20) and is stable for any ``|m|``:
    ``max(m, 0) + log1p(exp(-|m|))`` with an accurate ``log1p`` (``log(u) * z / (u - 1)``,
    ``u = 1 + z``), so small values far below 0 keep full relative precision; sigmoid is computed
    from ``exp(-|m|)`` as well (no overflow, accurate tails). The branches test the sign on the bits
    (:func:`is_pos`, :func:`keep`): a subnormal ``m`` counts with its sign, NaN as in the reference
    (``NaN > 0`` is False: leaky_relu gives ``alpha``, relu 0; softplus and sigmoid give NaN).
    """
    if SURR == 0:  # softplus
        z = tl.exp(-tl.abs(m))
        u = 1.0 + z
        den = u - 1.0
        l1p = tl.where(den == 0.0, z, tl.log(u) * (z / tl.where(den == 0.0, 1.0, den)))
        r = tl.where(m > 20.0, m, tl.where(is_pos(m), m, 0.0) + l1p)
    elif SURR == 1:  # sigmoid
        z = tl.exp(-tl.abs(m))
        r = tl.where(keep(m), 1.0 / (1.0 + z), z / (1.0 + z))
    elif SURR == 2:  # identity
        r = tl.full(m.shape, 1.0, m.dtype)
    elif SURR == 3:  # leaky_relu
        r = tl.where(is_pos(m), tl.full(m.shape, 1.0, m.dtype), alpha)
    elif SURR == 4:  # leaky_relu_reversed
        r = tl.where(is_pos(m), alpha, tl.full(m.shape, 1.0, m.dtype))
    else:  # relu
        r = is_pos(m).to(m.dtype)
    return r


@triton.jit
def rule_factor(w, RULE: tl.constexpr):
    """``c(w)``: ``sign(w)`` as ``torch.sign`` (0 for ``+-0`` and NaN, +-1 for subnormals, decided on
    the bits) or ``w`` itself (``chain``: NaN propagates)."""
    if RULE == 0:
        c = tl.where(is_pos(w), 1.0, tl.where(is_neg(w), -1.0, 0.0)).to(w.dtype)
    else:
        c = w
    return c
