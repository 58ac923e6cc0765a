"""N:M scores (``autoprune_ext.reference.nm_scores``) as a Triton kernel, with its launcher.

One program handles ``BLOCK_G`` groups as a ``[BLOCK_G, MP]`` tile (``MP``: ``m`` rounded up to a
power of two, padding masked off). The rank of each entry (how many entries of its group beat it,
ties to the lower index) is counted with one pass per column, so no sort is needed; the ``n``-th and
``(n+1)``-th largest values are picked by rank with a max-reduction (exact, no rounding), and the
scores are clamped exactly as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import cast_for, compute_is_fp64, contiguous, device_guard, to_compute

BLOCK_G = 64  # groups per program


@triton.jit
def _nm_scores_kernel(AUX, OUT, groups, n, m, tiny, FP64: tl.constexpr, MP: tl.constexpr, BLOCK_G: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    g = pid * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    j = tl.arange(0, MP)
    gmask = g < groups
    msk = gmask[:, None] & (j[None, :] < m)
    offs = g[:, None] * m + j[None, :]
    v = to_compute(tl.load(AUX + offs, mask=msk, other=0), FP64)
    rank = tl.zeros((BLOCK_G, MP), dtype=tl.int32)
    for k in tl.static_range(MP):
        if k < m:
            vk = to_compute(tl.load(AUX + g * m + k, mask=gmask, other=0), FP64)[:, None]
            beats = (vk > v) | ((vk == v) & (k < j[None, :]))
            rank += beats.to(tl.int32)
    neg_inf = float("-inf")
    vn = tl.max(tl.where(msk & (rank == n - 1), v, neg_inf), axis=1)
    vn1 = tl.max(tl.where(msk & (rank == n), v, neg_inf), axis=1)
    t = tl.where(n == m, vn, vn / 2 + vn1 / 2)
    d = v - t[:, None]
    if FP64:
        tiny_c = tl.cast(tiny, tl.float64)
    else:
        tiny_c = tl.cast(tiny, tl.float32)
    s = tl.where(rank < n, tl.where(d < 0, 0.0, d), tl.where(d > -tiny_c, -tiny_c, d))
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
        _nm_scores_kernel[grid](a, out, groups, n, m, float(torch.finfo(a.dtype).tiny),
                                FP64=compute_is_fp64(a), MP=mp, BLOCK_G=BLOCK_G)
    return out
