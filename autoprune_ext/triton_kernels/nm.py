"""N:M scores (``autoprune_ext.reference.nm_scores``) as a Triton kernel, with its launcher.

One program handles ``BLOCK_G`` groups as a ``[BLOCK_G, MP]`` tile (``MP``: ``m`` rounded up to a
power of two, padding masked off). The rank of each entry (how many entries of its group beat it,
ties to the lower index) is counted with one pass per column on integer keys with ``torch.sort``'s
order (``-0 == +0``, NaN above ``+inf``, subnormals exact), so no sort is needed; the ``n``-th and
``(n+1)``-th largest values are picked by rank (exact, NaN included), and the scores are clamped
exactly as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import cast_for, compute_is_fp64, contiguous, device_guard, is_neg, order_key, to_compute

BLOCK_G = 64  # groups per program


@triton.jit
def _nm_scores_kernel(AUX, OUT, groups, n, m, FP64: tl.constexpr, MP: tl.constexpr, BLOCK_G: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    g = pid * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    j = tl.arange(0, MP)
    gmask = g < groups
    msk = gmask[:, None] & (j[None, :] < m)
    offs = g[:, None] * m + j[None, :]
    v = to_compute(tl.load(AUX + offs, mask=msk, other=0), FP64)
    key = order_key(v)  # torch.sort's order on the bits: -0 == +0, NaN largest, subnormals exact
    rank = tl.zeros((BLOCK_G, MP), dtype=tl.int32)
    for k in tl.static_range(MP):
        if k < m:
            kk = order_key(to_compute(tl.load(AUX + g * m + k, mask=gmask, other=0), FP64))[:, None]
            beats = (kk > key) | ((kk == key) & (k < j[None, :]))
            rank += beats.to(tl.int32)
    # the n-th / (n+1)-th largest: exactly one entry per group has each rank, so an integer sum of
    # its bits and zeros is that value bit for bit (-0, NaN, inf and subnormals included; a float
    # max-reduction would drop a NaN on the GPU, a float sum would turn -0 into +0)
    if FP64:
        vb = v.to(tl.int64, bitcast=True)
    else:
        vb = v.to(tl.int32, bitcast=True)
    vn = tl.sum(tl.where(msk & (rank == n - 1), vb, 0), axis=1).to(v.dtype, bitcast=True)
    vn1 = tl.sum(tl.where(msk & (rank == n), vb, 0), axis=1).to(v.dtype, bitcast=True)
    t = tl.where(n == m, vn, vn * 0.5 + vn1 * 0.5)  # == the reference's x / 2 bit for bit (an IEEE mul)
    d = v - t[:, None]
    # clamps as the reference: kept >= +0 (negative subnormals too: decided on the bits), others
    # <= -tiny of the output dtype; NaN stays NaN
    if OUT.dtype.element_ty == tl.float64:
        tiny = 2.2250738585072014e-308  # a float64 literal (outside float32's range)
    elif OUT.dtype.element_ty == tl.float16:
        tiny = 6.103515625e-05
    else:
        tiny = 1.1754943508222875e-38
    s = tl.where(rank < n, tl.where(is_neg(d), 0.0, d), tl.where(d > -tiny, -tiny, d))
    tl.store(OUT + offs, cast_for(s, OUT), mask=msk)


def nm_scores(aux: Tensor, n: int, m: int) -> Tensor:
    """Launch :func:`_nm_scores_kernel` over every group of ``aux`` (checked by the op layer)."""
    a = contiguous(aux)
    out = torch.empty_like(a, memory_format=torch.contiguous_format)
    groups = a.numel() // m
    if groups == 0:
        return out
    mp = triton.next_power_of_2(m)
    grid = (triton.cdiv(groups, BLOCK_G),)
    with device_guard(a):
        _nm_scores_kernel[grid](a, out, groups, n, m, FP64=compute_is_fp64(a), MP=mp, BLOCK_G=BLOCK_G)
    return out
