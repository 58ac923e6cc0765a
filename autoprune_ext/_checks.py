"""Argument checks shared by the op layer, the functional API, the layers and the optimiser.

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, device, value
or name) with a message that starts with the argument's name and states the expected form.

All checks here read only sizes, strides, dtypes, devices and Python scalars (no device sync, no
kernel launch), except :func:`check_finite`, which reads the tensor's values and is therefore only
used off the op layer (functional API, layer init, ``finalize``).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .reference import GRANULARITIES, NM_MAX_M, RULES, SURROGATES, parse_nm

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: the largest ``|alpha|`` accepted: the ``leaky_relu`` surrogates materialise ``alpha`` in the aux
#: dtype (float16 holds up to 65504) and multiply it into gradients; ``1e4`` keeps every backend and
#: every float dtype free of overflow, far above any useful slope (which lies in ``[0, 1]``).
ALPHA_MAX = 1e4


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
    check_alpha(alpha)


def _symbolic(x: object) -> bool:
    # a traced scalar (torch.compile with dynamic scalars): its value is unknown here, and the eager
    # implementation that the compiled graph calls checks the concrete value at run time
    return isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool))


def check_alpha(alpha: object) -> None:
    """``alpha`` is a finite real number with ``|alpha| <= ALPHA_MAX`` (see :data:`ALPHA_MAX`)."""
    if _symbolic(alpha):
        return
    if (not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha)
            or abs(alpha) > ALPHA_MAX):
        raise ValueError(f"alpha: expected a finite float with |alpha| <= {ALPHA_MAX:g}, got {alpha!r}")


def check_scalar(
    x: object, name: str, *, low: float | None = None, high: float | None = None, high_open: bool = False
) -> float:
    """``x`` is a finite real number (not a bool) in ``[low, high]`` (``[low, high)`` if ``high_open``)."""
    if _symbolic(x):
        return x  # type: ignore[return-value]
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    if ok and low is not None and x < low:  # type: ignore[operator]
        ok = False
    if ok and high is not None and (x >= high if high_open else x > high):  # type: ignore[operator]
        ok = False
    if not ok:
        if low is None and high is None:
            want = "a finite float"
        elif high is None:
            want = f"a finite float >= {low:g}"
        else:
            want = f"a finite float in [{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name}: expected {want}, got {x!r}")
    return float(x)  # type: ignore[arg-type]


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


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` holds no NaN/inf, in one read pass without temporaries in the common case.

    A NaN or inf anywhere makes the sum NaN or inf, so a finite sum proves every entry finite; only
    a non-finite sum (a NaN/inf entry, or finite entries whose sum overflows) takes the exact test.
    ``isfinite(x).all()`` alone writes and reads a boolean copy of ``x``: about 25x slower on CPU.
    """
    half = x.dtype in (torch.float16, torch.bfloat16)
    if bool(torch.isfinite(x.sum(dtype=torch.float32) if half else x.sum())):
        return True
    return bool(torch.isfinite(x).all())


#: tensor types that are neither subclasses (DTensor) nor fake: their values can be read
PLAIN_TENSOR_TYPES: tuple[type, ...] = (Tensor, torch.nn.Parameter)


def _is_fake(x: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(x)


def check_finite(x: Tensor, name: str) -> None:
    """``x`` holds no NaN/inf (reads the values: one device sync; skipped for meta and fake tensors,
    which have none, while compiling and with ``AUTOPRUNE_CHECK_FINITE=0``)."""
    if x.device.type == "meta" or (type(x) not in PLAIN_TENSOR_TYPES and _is_fake(x)):
        return
    if _finite_checks_enabled() and x.numel() and not all_finite(x):
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


# --------------------------------------------------------------------------------------------------
# memory overlap (in-place ops): from sizes, strides and storage addresses only
# --------------------------------------------------------------------------------------------------
Label = str | tuple[str, ...]  # an argument's name, or its parts (joined only for an error message)


def _label(name: Label) -> str:
    return name if isinstance(name, str) else "".join(name)


def check_no_internal_overlap(x: Tensor, name: Label) -> None:
    """``x`` addresses every element at a distinct memory location (no stride-0 ``expand``, no
    overlapping ``as_strided`` view), as an in-place kernel needs.

    The test: with the dimensions of size > 1 sorted by stride, each stride must be at least the
    extent ``1 + sum((size - 1) * stride)`` of the dimensions with smaller strides. This accepts every
    contiguous, permuted or sliced layout and rejects every overlapping one (it may reject exotic
    non-overlapping interleavings, which no caller here builds).
    """
    if x.is_contiguous():
        return
    dims = sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz > 1)
    extent = 1
    for st, sz in dims:
        if st < extent:
            raise ValueError(
                f"{_label(name)}: expected a tensor whose elements do not overlap in memory (an in-place argument), "
                f"got shape {tuple(x.shape)} with strides {tuple(x.stride())} (e.g. an expand(); pass .contiguous())"
            )
        extent += (sz - 1) * st


def _byte_range(x: Tensor) -> tuple[int, int, int] | None:
    """``(device index, first byte address, one past the last)`` that ``x`` can touch, or ``None`` for
    a tensor without elements or addressable memory (meta, fake, storage-less subclasses).

    Absolute addresses: two allocations never overlap, so tensors of different storages can be
    compared directly, without asking for their storages."""
    try:
        start = x.data_ptr()
    except Exception:  # fake tensors, subclasses without a storage
        return None
    if x.is_contiguous():
        nbytes = x.nbytes
    elif x.numel():
        nbytes = (1 + sum((sz - 1) * st for sz, st in zip(x.shape, x.stride()))) * x.element_size()
    else:
        nbytes = 0
    if start == 0 or nbytes == 0:  # meta tensors, no elements
        return None
    return x.get_device(), start, start + nbytes


def check_no_overlap(inplace: list[tuple[Label, Tensor]], readonly: list[tuple[Label, Tensor]] = ()) -> None:
    """No tensor of ``inplace`` (written by the op) shares memory with another one of ``inplace`` or
    with one of ``readonly`` (read by the op); tensors of ``readonly`` may share memory among
    themselves. Compares the byte ranges each tensor can touch (conservative: two interleaved views
    of one buffer count as overlapping). ``O(n log n)``, no device work.

    Raises ``ValueError`` naming the written tensor (the later one in argument order when both are
    written) and the tensor it overlaps.
    """
    spans: list[tuple[int, int, int, int, bool]] = []
    names: list[Label] = []
    for written, items in ((True, inplace), (False, readonly)):
        for name, t in items:
            if t is None:
                continue
            r = _byte_range(t)
            if r is not None:
                spans.append((r[0], r[1], len(names), r[2], written))
            names.append(name)
    if len(spans) < 2:
        return
    spans.sort()
    device = None
    end_all = end_w = -1
    idx_all = idx_w = -1
    w_all = False
    found: tuple[int, int] | None = None  # the overlap to report: the earliest in argument order
    for dev, start, idx, end, written in spans:
        if dev != device:  # furthest end so far among all tensors / written ones, per device
            device, end_all, end_w = dev, -1, -1
        other = None
        if written and start < end_all:
            other = (idx_all, w_all)
        elif not written and start < end_w:
            other = (idx_w, True)
        if other is not None:
            o_idx, o_written = other
            # name first the tensor that is written (the later one in argument order if both are)
            first, second = idx, o_idx
            if not written or (o_written and o_idx > idx):
                first, second = o_idx, idx
            if found is None or first < found[0]:
                found = (first, second)
        if end > end_all:
            end_all, idx_all, w_all = end, idx, written
        if written and end > end_w:
            end_w, idx_w = end, idx
    if found is not None:
        raise ValueError(
            f"{_label(names[found[0]])}: expected memory that overlaps no other tensor argument of this in-place "
            f"op, but it overlaps {_label(names[found[1]])} (the same tensor passed twice, or views of one buffer)"
        )
