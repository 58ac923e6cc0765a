"""Fused elementwise mask kernels: ``apply_mask`` and ``mask_backward``, with their launchers.

Two layouts, chosen by granularity (:func:`autoprune_ext.reference.granularity_of`):

* weight granularity -- ``W`` and ``M`` flattened, one 1-D block of ``BLOCK`` elements per program;
* unit granularity -- ``W`` viewed as ``[rows, cols]`` (``rows = W.shape[0]``), one program per block
  of ``BLOCK_R`` rows looping over the columns in chunks of ``BLOCK_C``: ``M[row]`` is loaded once per
  row and ``dM[row] = s(M[row]) * sum_cols g * c(W)`` is reduced in registers (deterministic, no
  atomics, no second pass), while ``dW`` is written in the same sweep.

The mask decision ``h(M)`` is read off ``M``'s bits (:func:`._common.keep`: ``-0`` kept, NaN and
negative subnormals pruned, whatever the target's flush-to-zero mode); ``dW = g * h`` is a product,
as in the reference (NaN/inf in ``g`` give NaN where pruned).

Bytes per element (W bf16, M fp32, weight granularity): ``apply_mask`` reads 2 + 4 and writes 2;
``mask_backward`` reads ``g`` and ``M`` (+ ``W`` only when ``dM`` is requested) and writes only the
requested gradients. Offsets are int64 (``program_id`` widened first), inputs are made contiguous on
the host, empty tensors launch nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from ._common import (
    RULE_CODES,
    cast_for,
    SURROGATE_CODES,
    compute_is_fp64,
    contiguous,
    device_guard,
    keep,
    rule_factor,
    scalar,
    split,
    surrogate,
    to_compute,
)

BLOCK = 2048  # elements per program of the flat kernels
NUM_WARPS = 8
ROW_TILE = 2048  # elements per loop iteration of the row kernels (BLOCK_R * BLOCK_C)


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _apply_mask_flat_kernel(W, AUX, T, n, FP64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    msk = offs < n
    w = tl.load(W + offs, mask=msk)
    kept = keep(tl.load(AUX + offs, mask=msk, other=0))
    tl.store(T + offs, tl.where(kept, w, 0.0).to(T.dtype.element_ty), mask=msk)


@triton.jit
def _apply_mask_rows_kernel(
    W, AUX, T, R, C, FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    kept = keep(tl.load(AUX + rows, mask=rmask, other=0))[:, None]
    base = rows[:, None] * C
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        msk = rmask[:, None] & (cols < C)[None, :]
        offs = base + cols[None, :]
        w = tl.load(W + offs, mask=msk)
        tl.store(T + offs, tl.where(kept, w, 0.0).to(T.dtype.element_ty), mask=msk)


@triton.jit
def _mask_backward_flat_kernel(
    G, W, AUX, DW, DM, n, alpha_hi, alpha_lo,
    SURR: tl.constexpr, RULE: tl.constexpr, NEED_DW: tl.constexpr, NEED_DM: tl.constexpr,
    FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    msk = offs < n
    g = to_compute(tl.load(G + offs, mask=msk, other=0), FP64)
    m = to_compute(tl.load(AUX + offs, mask=msk, other=0), FP64)
    if NEED_DW:
        tl.store(DW + offs, cast_for(g * keep(m).to(g.dtype), DW), mask=msk)
    if NEED_DM:
        alpha = scalar(alpha_hi, alpha_lo, FP64)
        w = to_compute(tl.load(W + offs, mask=msk, other=0), FP64)
        dm = g * rule_factor(w, RULE) * surrogate(m, alpha, SURR)
        tl.store(DM + offs, cast_for(dm, DM), mask=msk)


@triton.jit
def _mask_backward_rows_kernel(
    G, W, AUX, DW, DM, R, C, alpha_hi, alpha_lo,
    SURR: tl.constexpr, RULE: tl.constexpr, NEED_DW: tl.constexpr, NEED_DM: tl.constexpr,
    FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    m = to_compute(tl.load(AUX + rows, mask=rmask, other=0), FP64)
    h = keep(m).to(m.dtype)[:, None]
    base = rows[:, None] * C
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=m.dtype)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        msk = rmask[:, None] & (cols < C)[None, :]
        offs = base + cols[None, :]
        g = to_compute(tl.load(G + offs, mask=msk, other=0), FP64)
        if NEED_DW:
            tl.store(DW + offs, cast_for(g * h, DW), mask=msk)
        if NEED_DM:
            w = to_compute(tl.load(W + offs, mask=msk, other=0), FP64)
            acc += tl.where(msk, g * rule_factor(w, RULE), 0.0)
    if NEED_DM:
        alpha = scalar(alpha_hi, alpha_lo, FP64)
        dm = tl.sum(acc, axis=1) * surrogate(m, alpha, SURR)
        tl.store(DM + rows, cast_for(dm, DM), mask=rmask)


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------
def _row_tiles(rows: int, cols: int, tile: int = ROW_TILE) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(max(cols, 1)), tile)
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), tile // block_c))
    return block_r, block_c


def apply_mask(weight: Tensor, aux: Tensor) -> Tensor:
    """``T = where(M >= 0, W, 0)`` (``M`` broadcast per row for unit granularity), contiguous."""
    unit = reference.granularity_of(weight, aux) == "unit"
    w, a = contiguous(weight), contiguous(aux)
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    n = w.numel()
    if n == 0:
        return out
    fp64 = compute_is_fp64(w, a)
    with device_guard(w):
        if unit:
            rows = w.shape[0]
            cols = n // rows
            br, bc = _row_tiles(rows, cols)
            _apply_mask_rows_kernel[(triton.cdiv(rows, br),)](
                w, a, out, rows, cols, FP64=fp64, BLOCK_R=br, BLOCK_C=bc, num_warps=NUM_WARPS
            )
        else:
            _apply_mask_flat_kernel[(triton.cdiv(n, BLOCK),)](w, a, out, n, FP64=fp64, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def mask_backward(
    grad: Tensor,
    weight: Tensor,
    aux: Tensor,
    surrogate_name: str = "softplus",
    rule: str = "sign",
    alpha: float = 0.1,
    need_weight_grad: bool = True,
    need_aux_grad: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """``(dW, dM)`` from ``g = dL/dT``: ``dW = g h(M)``, ``dM = g c(W) s(M)`` (summed per row for unit
    granularity). Only the requested gradients are computed; the other is ``None``. ``W`` is not
    even read when only ``dW`` is requested."""
    unit = reference.granularity_of(weight, aux) == "unit"
    if not (need_weight_grad or need_aux_grad):
        return None, None
    g, w, a = contiguous(grad), contiguous(weight), contiguous(aux)
    dW = torch.empty(w.shape, dtype=w.dtype, device=w.device) if need_weight_grad else None
    dM = torch.empty(a.shape, dtype=a.dtype, device=a.device) if need_aux_grad else None
    n = w.numel()
    fp64 = compute_is_fp64(g, w, a)
    ahi, alo = split(alpha)
    if n == 0:
        if dM is not None and unit and dM.numel():  # rows of zero columns: dM = 0 * s(M), NaN for s = NaN/inf
            br, bc = _row_tiles(w.shape[0], 0)
            with device_guard(w):
                _mask_backward_rows_kernel[(triton.cdiv(w.shape[0], br),)](
                    g, w, a, g, dM, w.shape[0], 0, ahi, alo, SURR=SURROGATE_CODES[surrogate_name],
                    RULE=RULE_CODES[rule], NEED_DW=False, NEED_DM=True, FP64=fp64, BLOCK_R=br, BLOCK_C=bc,
                    num_warps=NUM_WARPS,
                )
        return dW, dM
    dw_arg = dW if dW is not None else g  # never written when not requested
    dm_arg = dM if dM is not None else a
    flags = dict(
        SURR=SURROGATE_CODES[surrogate_name], RULE=RULE_CODES[rule], NEED_DW=need_weight_grad,
        NEED_DM=need_aux_grad, FP64=fp64, num_warps=NUM_WARPS,
    )
    with device_guard(w):
        if unit:
            rows = w.shape[0]
            cols = n // rows
            br, bc = _row_tiles(rows, cols)
            _mask_backward_rows_kernel[(triton.cdiv(rows, br),)](
                g, w, a, dw_arg, dm_arg, rows, cols, ahi, alo, BLOCK_R=br, BLOCK_C=bc, **flags
            )
        else:
            _mask_backward_flat_kernel[(triton.cdiv(n, BLOCK),)](
                g, w, a, dw_arg, dm_arg, n, ahi, alo, BLOCK=BLOCK, **flags
            )
    return dW, dM
