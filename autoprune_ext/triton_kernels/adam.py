"""The auxiliary Adam step in one pass: ``aux_adam_step_`` and the multi-tensor ``aux_adam_step_multi_``.

Per element, in the compute dtype (float32, float64 when ``aux``/``exp_avg``/``grad``/``weight`` is
float64, as in the reference)::

    g  = scale * (s(m) - rho * s(-m))                      # density-penalty gradient
    g  = where(|w| < 1e-15, 0, g / max(|w|, 1e-15))        # inv_abs_weight (optional)
    g += grad                                              # task gradient (optional)
    m1 = beta1 * m1 + (1 - beta1) * g
    m2 = beta2 * m2 + (1 - beta2) * g * g
    m  = m - (lr / bias1) * m1 / (sqrt(m2) / sqrt(bias2) + eps)

Special values follow the reference: the surrogate branches test signs on the bits (subnormal
``m`` counts with its sign), ``-m`` flips the sign bit, a NaN ``|w|`` gives a NaN gradient, and an
update of exactly 0 leaves ``m`` bit-identical (a negative subnormal stays pruned).

``aux``, ``exp_avg`` and ``exp_avg_sq`` are read once and written once, in place, each in its own dtype
(``grad`` and ``weight`` are only read). The bias corrections depend on the step only, so the host
computes ``lr / bias1`` and ``sqrt(bias2)`` in float64 and passes them as scalars.

Multi-tensor design (:func:`aux_adam_step_multi_`)
--------------------------------------------------
Tensors are grouped by their dtype signature ``(aux, exp_avg, exp_avg_sq, grad or None, weight or
None)`` -- a model whose masks share one dtype is stepped by **one launch**. For each group:

* a *metadata* table, one row per tensor: the five data pointers (int64), the element count, then the
  per-tensor float64 scalars ``penalty_scale``, ``lr / bias1`` and ``sqrt(bias2)`` (so tensors may be
  at different steps). It is built on the host in one buffer (pinned on CUDA) and copied with a single
  non-blocking H2D copy -- no device sync;
* a *chunk* table, one row per program: ``(tensor index, chunk index)``, where a chunk is
  ``CHUNK_BLOCKS * BLOCK`` elements of one tensor. It depends only on the element counts, so it is
  cached on the device and reused every step (no per-step host work proportional to the model size).

Each program reads its chunk row, loads the tensor's pointers from the metadata table, casts them to
typed pointers (``int64 -> pointer`` with the element types taken from the first tensors of the
group, passed as typed "carrier" arguments) and sweeps its chunk in ``BLOCK``-sized steps with the
same body as the single-tensor kernel. Pointers 16-byte aligned (checked on the host) get a
``multiple_of`` hint for vectorised access. Non-contiguous tensors are stepped through a contiguous
copy written back afterwards; empty tensors are skipped.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    SURROGATE_CODES,
    cast_for,
    compute_is_fp64,
    device_guard,
    inv_abs_eps,
    negate,
    scalar,
    split,
    surrogate,
    to_compute,
)

BLOCK = 1024
NUM_WARPS = 4
CHUNK_BLOCKS = 16  # BLOCK-sized steps per program of the multi-tensor kernel
_META_INTS = 6  # aux, exp_avg, exp_avg_sq, grad, weight pointers; numel
_META_FLOATS = 3  # penalty_scale, lr / bias1, sqrt(bias2)
_META_ROW = 10  # int64 slots per tensor row (ints, then floats as float64 bits, padded)


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _sqrt(x, FP64: tl.constexpr):
    """``sqrt(x)``; float32 subnormals are scaled into the normal range first, since the GPU's fast
    float32 square root flushes them to zero (``sqrt.approx.ftz.f32``: with ``eps = 0`` a subnormal
    second moment would divide by 0)."""
    if FP64:
        r = tl.sqrt(x)
    else:
        r = tl.where(x < 1.1754943508222875e-38, tl.sqrt(x * 18446744073709551616.0) * 2.3283064365386963e-10,
                     tl.sqrt(x))
    return r


@triton.jit
def _adam_body(
    AUX, M1, M2, G, WM, offs, msk,
    scale, lr_b, b2s, beta1, omb1, beta2, omb2, eps, rho, alpha,
    SURR: tl.constexpr, HAS_G: tl.constexpr, HAS_W: tl.constexpr, FP64: tl.constexpr,
):
    m = to_compute(tl.load(AUX + offs, mask=msk, other=0), FP64)
    g = scale * (surrogate(m, alpha, SURR) - rho * surrogate(negate(m), alpha, SURR))
    if HAS_W:
        # where(|w| < 1e-15, 0, g / max(|w|, 1e-15)) of the reference, with max() spelled out: a NaN
        # |w| gives NaN (torch.clamp_min propagates it; the GPU's max.f32 would return 1e-15)
        w = tl.abs(to_compute(tl.load(WM + offs, mask=msk, other=0), FP64))
        g = tl.where(w < inv_abs_eps(FP64), 0.0, g / w)
    if HAS_G:
        g = g + to_compute(tl.load(G + offs, mask=msk, other=0), FP64)
    m1 = to_compute(tl.load(M1 + offs, mask=msk, other=0), FP64) * beta1 + omb1 * g
    m2 = to_compute(tl.load(M2 + offs, mask=msk, other=0), FP64) * beta2 + omb2 * g * g
    delta = lr_b * m1 / (_sqrt(m2, FP64) / b2s + eps)
    new = tl.where(delta == 0.0, m, m - delta)  # m - 0 == m bit for bit, even where subnormals flush
    tl.store(M1 + offs, cast_for(m1, M1), mask=msk)
    tl.store(M2 + offs, cast_for(m2, M2), mask=msk)
    tl.store(AUX + offs, cast_for(new, AUX), mask=msk)


@triton.jit
def _adam_kernel(
    AUX, M1, M2, G, WM, n,
    scale_hi, scale_lo, lrb_hi, lrb_lo, b2s_hi, b2s_lo,
    b1_hi, b1_lo, omb1_hi, omb1_lo, b2_hi, b2_lo, omb2_hi, omb2_lo, eps_hi, eps_lo,
    rho_hi, rho_lo, alpha_hi, alpha_lo,
    SURR: tl.constexpr, HAS_G: tl.constexpr, HAS_W: tl.constexpr, FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    _adam_body(
        AUX, M1, M2, G, WM, offs, offs < n,
        scalar(scale_hi, scale_lo, FP64), scalar(lrb_hi, lrb_lo, FP64), scalar(b2s_hi, b2s_lo, FP64),
        scalar(b1_hi, b1_lo, FP64), scalar(omb1_hi, omb1_lo, FP64), scalar(b2_hi, b2_lo, FP64),
        scalar(omb2_hi, omb2_lo, FP64), scalar(eps_hi, eps_lo, FP64), scalar(rho_hi, rho_lo, FP64),
        scalar(alpha_hi, alpha_lo, FP64), SURR, HAS_G, HAS_W, FP64,
    )


@triton.jit
def _adam_multi_kernel(
    META, META_F, CHUNKS, AUX0, M10, M20, G0, WM0,
    b1_hi, b1_lo, omb1_hi, omb1_lo, b2_hi, b2_lo, omb2_hi, omb2_lo, eps_hi, eps_lo,
    rho_hi, rho_lo, alpha_hi, alpha_lo,
    SURR: tl.constexpr, HAS_G: tl.constexpr, HAS_W: tl.constexpr, FP64: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr,
    META_ROW: tl.constexpr, META_INTS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tid = tl.load(CHUNKS + 2 * pid)
    chunk = tl.load(CHUNKS + 2 * pid + 1)
    row = META + tid * META_ROW
    frow = META_F + tid * META_ROW + META_INTS
    # int64 -> typed pointers (element types from the carrier arguments)
    aux = tl.load(row + 0).to(AUX0.dtype)
    m1 = tl.load(row + 1).to(M10.dtype)
    m2 = tl.load(row + 2).to(M20.dtype)
    g = tl.load(row + 3).to(G0.dtype)
    wm = tl.load(row + 4).to(WM0.dtype)
    if ALIGNED:  # 16-byte aligned (checked on the host): lets the loads and stores vectorise
        aux = tl.multiple_of(aux, 16)
        m1 = tl.multiple_of(m1, 16)
        m2 = tl.multiple_of(m2, 16)
        g = tl.multiple_of(g, 16)
        wm = tl.multiple_of(wm, 16)
    n = tl.load(row + 5)
    if FP64:
        scale = tl.load(frow + 0)
        lr_b = tl.load(frow + 1)
        b2s = tl.load(frow + 2)
    else:
        scale = tl.load(frow + 0).to(tl.float32)
        lr_b = tl.load(frow + 1).to(tl.float32)
        b2s = tl.load(frow + 2).to(tl.float32)
    beta1 = scalar(b1_hi, b1_lo, FP64)
    omb1 = scalar(omb1_hi, omb1_lo, FP64)
    beta2 = scalar(b2_hi, b2_lo, FP64)
    omb2 = scalar(omb2_hi, omb2_lo, FP64)
    eps = scalar(eps_hi, eps_lo, FP64)
    rho = scalar(rho_hi, rho_lo, FP64)
    alpha = scalar(alpha_hi, alpha_lo, FP64)
    start = chunk * (CHUNK_BLOCKS * BLOCK)
    # full blocks: bounded by a multiple of BLOCK, so the masks are provably uniform per vector and
    # the accesses vectorise (n itself, loaded at run time, has no known divisibility)
    nfull = tl.minimum((n - start) // BLOCK, CHUNK_BLOCKS)
    full_end = start + nfull * BLOCK
    for b in range(0, nfull):
        offs = start + b * BLOCK + tl.arange(0, BLOCK)
        _adam_body(
            aux, m1, m2, g, wm, offs, offs < full_end,
            scale, lr_b, b2s, beta1, omb1, beta2, omb2, eps, rho, alpha, SURR, HAS_G, HAS_W, FP64,
        )
    if nfull < CHUNK_BLOCKS:  # the partial block at the end of the tensor (possibly empty)
        offs = full_end + tl.arange(0, BLOCK)
        _adam_body(
            aux, m1, m2, g, wm, offs, offs < n,
            scale, lr_b, b2s, beta1, omb1, beta2, omb2, eps, rho, alpha, SURR, HAS_G, HAS_W, FP64,
        )


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------
def _bias_terms(step: int, lr: float, beta1: float, beta2: float) -> tuple[float, float]:
    bias1 = 1 - beta1**step
    return lr / bias1, math.sqrt(1 - beta2**step)


def _flat_inplace(t: Tensor) -> tuple[Tensor, bool]:
    """A contiguous tensor to update in place, and whether it must be copied back into ``t``."""
    if t.is_contiguous():
        return t, False
    return t.contiguous(), True


def aux_adam_step_(
    aux: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    grad: Tensor | None,
    weight: Tensor | None,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    penalty_scale: float = 0.0,
    rho: float = 1e-3,
    surrogate_name: str = "softplus",
    alpha: float = 0.1,
    block: int = BLOCK,
) -> None:
    """One in-place Adam step of ``aux`` (see the module docstring), one launch."""
    n = aux.numel()
    if n == 0:
        return
    fp64 = compute_is_fp64(aux, exp_avg, grad, weight)
    a, a_back = _flat_inplace(aux)
    e1, e1_back = _flat_inplace(exp_avg)
    e2, e2_back = _flat_inplace(exp_avg_sq)
    g = None if grad is None else grad.contiguous()
    w = None if weight is None else weight.contiguous()
    lr_b, b2s = _bias_terms(step, lr, beta1, beta2)
    scalars = [penalty_scale, lr_b, b2s, beta1, 1 - beta1, beta2, 1 - beta2, eps, rho, alpha]
    args = [x for v in scalars for x in split(v)]
    with device_guard(a):
        _adam_kernel[(triton.cdiv(n, block),)](
            a, e1, e2, a if g is None else g, a if w is None else w, n, *args,
            SURR=SURROGATE_CODES[surrogate_name], HAS_G=g is not None, HAS_W=w is not None, FP64=fp64,
            BLOCK=block, num_warps=NUM_WARPS,
        )
    for dst, src, back in ((aux, a, a_back), (exp_avg, e1, e1_back), (exp_avg_sq, e2, e2_back)):
        if back:
            dst.copy_(src)


# chunk tables on the device, keyed by (device, BLOCK, CHUNK_BLOCKS, element counts)
_CHUNK_CACHE: OrderedDict[tuple, Tensor] = OrderedDict()
_CHUNK_CACHE_SIZE = 32


def _chunk_table(device: torch.device, numels: tuple[int, ...], chunk: int) -> Tensor:
    key = (str(device), chunk, numels)
    table = _CHUNK_CACHE.get(key)
    if table is not None:
        _CHUNK_CACHE.move_to_end(key)
        return table
    counts = torch.tensor([triton.cdiv(n, chunk) for n in numels], dtype=torch.int64)
    tid = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(tid.numel(), dtype=torch.int64) - first[tid]
    table = torch.stack([tid, local], dim=1).contiguous().to(device)
    _CHUNK_CACHE[key] = table
    if len(_CHUNK_CACHE) > _CHUNK_CACHE_SIZE:
        _CHUNK_CACHE.popitem(last=False)
    return table


def _group_key(aux, m1, m2, g, w) -> tuple:
    return (aux.dtype, m1.dtype, m2.dtype, None if g is None else g.dtype, None if w is None else w.dtype)


def aux_adam_step_multi_(
    aux: Sequence[Tensor],
    exp_avg: Sequence[Tensor],
    exp_avg_sq: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    weights: Sequence[Tensor | None],
    steps: Sequence[int],
    penalty_scales: Sequence[float],
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    rho: float = 1e-3,
    surrogate_name: str = "softplus",
    alpha: float = 0.1,
    block: int = BLOCK,
    chunk_blocks: int = CHUNK_BLOCKS,
) -> None:
    """Step every ``aux[i]`` in place: one launch per dtype signature (see the module docstring)."""
    groups: dict[tuple, list[int]] = {}
    for i in range(len(aux)):
        if aux[i].numel() == 0:
            continue
        groups.setdefault(_group_key(aux[i], exp_avg[i], exp_avg_sq[i], grads[i], weights[i]), []).append(i)
    if not groups:
        return
    device = aux[0].device
    scalar_args = [x for v in (beta1, 1 - beta1, beta2, 1 - beta2, eps, rho, alpha) for x in split(v)]
    chunk = block * chunk_blocks
    for key, idx in groups.items():
        has_g, has_w = key[3] is not None, key[4] is not None
        fp64 = torch.float64 in (key[0], key[1], key[3], key[4])
        work: list[tuple[Tensor, ...]] = []  # (aux, m1, m2, g, w) contiguous, per tensor
        write_back: list[tuple[Tensor, Tensor]] = []
        ints: list[int] = []
        floats: list[float] = []
        aligned = True
        for i in idx:
            ts = []
            for t in (aux[i], exp_avg[i], exp_avg_sq[i]):
                c, back = _flat_inplace(t)
                if back:
                    write_back.append((t, c))
                ts.append(c)
            g = grads[i].contiguous() if has_g else ts[0]
            w = weights[i].contiguous() if has_w else ts[0]
            ts += [g, w]
            work.append(tuple(ts))
            ptrs = [t.data_ptr() for t in ts]
            aligned = aligned and all(p % 16 == 0 for p in ptrs)
            ints.extend(ptrs + [ts[0].numel()] + [0] * (_META_ROW - _META_INTS))
            lr_b, b2s = _bias_terms(int(steps[i]), lr, beta1, beta2)
            floats.extend([float(penalty_scales[i]), lr_b, b2s])
        n = len(idx)
        meta_host = torch.tensor(ints, dtype=torch.int64).view(n, _META_ROW)
        meta_host[:, _META_INTS:_META_INTS + _META_FLOATS] = (
            torch.tensor(floats, dtype=torch.float64).view(n, _META_FLOATS).view(torch.int64)
        )
        if device.type == "cuda":
            meta = meta_host.pin_memory().to(device, non_blocking=True)
        else:
            meta = meta_host.to(device)
        meta_f = meta.view(torch.float64)
        chunks = _chunk_table(device, tuple(t[0].numel() for t in work), chunk)
        first = work[0]
        with device_guard(first[0]):
            _adam_multi_kernel[(chunks.shape[0],)](
                meta, meta_f, chunks, *first, *scalar_args,
                SURR=SURROGATE_CODES[surrogate_name], HAS_G=has_g, HAS_W=has_w, FP64=fp64,
                ALIGNED=aligned, BLOCK=block, CHUNK_BLOCKS=chunk_blocks,
                META_ROW=_META_ROW, META_INTS=_META_INTS, num_warps=NUM_WARPS,
            )
        for dst, src in write_back:
            dst.copy_(src)
