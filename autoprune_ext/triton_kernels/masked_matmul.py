"""Masked matmul for ``masked_linear``: the mask is applied while ``W`` tiles are loaded, ``T`` is
never materialised, and the weight-gradient GEMM ends in a fused mask epilogue.

Shapes: ``x`` is ``[..., K]`` viewed as ``X [Mt, K]``; ``W`` and (weight granularity) ``M`` are
``[N, K]``; unit granularity has ``M`` of shape ``[N]``. ``T = where(M >= 0, W, 0)``.

Kernels
-------
``_masked_mm_kernel`` -- ``C = A @ B~`` where ``B~`` is a masked view of ``W`` given by strides:

* forward ``Y = X @ T^T (+ b)``: ``A = X``, ``B[k, n] = W[n, k]`` (``stride_bk = 1``,
  ``stride_bn = K``), bias added in the fp32 epilogue; unit mask indexed by the output column;
* ``dX = dY @ T``: ``A = dY``, ``B[k, n] = W[k, n]`` (``stride_bk = K``, ``stride_bn = 1``); unit
  mask indexed by the reduction index.

Each ``W`` tile is loaded together with its ``M`` tile (weight granularity) or the ``M`` entries of
its rows (unit granularity, loaded once per program when they index the output), and
``where(M >= 0, W, 0)`` is applied in registers before ``tl.dot``: exactly ``T``'s values (NaN/inf
in pruned weights are dropped as by the reference), with no ``T`` buffer and no extra pass. The
decision is read off ``M``'s bits (:func:`._common.keep`: ``-0`` kept, NaN and negative subnormals
pruned, on any target).

``_masked_dt_kernel`` -- ``dT = dY^T X`` tile by tile (``[BLOCK_N, BLOCK_K]`` tiles of ``[N, K]``,
reduction over the tokens), and in the epilogue, with ``dT`` still in fp32 registers: ``dW = dT h(M)``
and/or ``dM = dT c(W) s(M)`` (weight granularity), stored directly in ``W``'s / ``M``'s dtype -- no
``dT`` buffer. For unit granularity ``dM[n] = s(M[n]) sum_k dT[n, k] c(W[n, k])`` needs a reduction
over ``K`` across programs: each program writes its row partial sums into a small fp32 (fp64) buffer
``[N, ceil(K / 16)]`` at column ``pid_k`` (deterministic, no atomics; the buffer is zeroed and reset
between autotuning trials), and ``_unit_finish_kernel`` sums the columns and applies ``s(M)``.

Both GEMM kernels accumulate in fp32 (fp64 for fp64 inputs); fp32 inputs use IEEE products unless
``torch.backends.cuda.matmul.allow_tf32`` is set, bf16/fp16 use the tensor cores. Programs are
ordered in groups of ``GROUP`` row tiles (L2 reuse of ``W``). Row offsets are int64; tile rows/cols
past the edge are wrapped (``% M``) so only the reduction tail needs masks (none when it divides
evenly: ``EVEN_K`` heuristic). ``triton.autotune`` picks among configurations for Ampere (A100) and
Hopper (H100/H200) keyed by the shape (token count bucketed to a power of two); tiles much larger
than the problem are pruned before benchmarking (a tiny GEMM gets one configuration, no tuning), as
are float64 tiles that would not fit in shared memory. Under ``TRITON_INTERPRET=1`` a single small
configuration is used.

``db = sum dY`` is a plain ``torch`` reduction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from . import elementwise
from ._common import (
    INTERPRETED,
    _INTERPRETED,
    RULE_CODES,
    SURROGATE_CODES,
    _bf16_to_f32,
    cast_for,
    contiguous,
    device_guard,
    keep,
    rule_factor,
    scalar,
    split,
    surrogate,
    to_compute,
)

#: the smallest reduction tile of any dT configuration (sizes the unit-granularity partial buffer)
MIN_BLOCK_K = 16

MASK_WEIGHT, MASK_UNIT_N, MASK_UNIT_K = 0, 1, 2
DOT_DEFAULT, DOT_IEEE, DOT_TF32 = 0, 1, 2


def _mm_configs(m: str, n: str, k: str, group: str) -> list[triton.Config]:
    """Tile configurations: output tile ``(m, n)``, reduction tile ``k``."""
    if INTERPRETED:
        return [triton.Config({m: 32, n: 32, k: 32, group: 4}, num_warps=4, num_stages=1)]
    shapes = [
        # (BM, BN, BK, warps, stages): Hopper-friendly large tiles first, then Ampere staples
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 5),
        (32, 128, 64, 4, 4),  # few tokens
        (32, 64, 16, 2, 5),  # tiny problems / fp64
    ]
    return [
        triton.Config({m: bm, n: bn, k: bk, group: 8}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in shapes
    ]


def _pruner(m: str, n: str, size_m: str, size_n: str, first_tensor: str):
    """``early_config_prune`` for the autotuner: drop tiles much larger than the problem (tiny GEMMs
    then need no benchmarking at all) and, for float64, tiles too large for shared memory."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        cap_m = max(32, triton.next_power_of_2(int(args[size_m])))
        cap_n = max(32, triton.next_power_of_2(int(args[size_n])))
        fp64 = getattr(args.get(first_tensor), "dtype", None) == torch.float64
        kept = [
            c for c in configs
            if c.kwargs[m] <= cap_m and c.kwargs[n] <= cap_n and (not fp64 or c.kwargs[m] * c.kwargs[n] <= 64 * 64)
        ]
        if not kept:
            kept = [min(configs, key=lambda c: c.kwargs[m] * c.kwargs[n])]
        return kept

    return prune


@triton.jit
def _grouped_pids(pid, num_a, num_b, GROUP: tl.constexpr):
    """Program id -> (tile index along a, tile index along b), ``GROUP`` a-tiles at a time."""
    per_group = GROUP * num_b
    group_id = pid // per_group
    first_a = group_id * GROUP
    group_size = tl.minimum(num_a - first_a, GROUP)
    pid_a = first_a + (pid % per_group) % group_size
    pid_b = (pid % per_group) // group_size
    return pid_a, pid_b


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr):
    if _INTERPRETED:
        if a.dtype.is_bf16():  # the interpreter multiplies raw bf16 bits; fp32 products are exact
            a = _bf16_to_f32(a)  # on the bits: the interpreter's own conversion garbles subnormals
            b = _bf16_to_f32(b)
    if DOT_PREC == 1:
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    elif DOT_PREC == 2:
        acc = tl.dot(a, b, acc, input_precision="tf32", out_dtype=acc.dtype)
    else:
        acc = tl.dot(a, b, acc, out_dtype=acc.dtype)
    return acc


# --------------------------------------------------------------------------------------------------
# C = A @ mask(B): forward and dX
# --------------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_mm_configs("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"),
    key=["M_BUCKET", "N", "K", "stride_bk", "MASK_MODE", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _pruner("BLOCK_M", "BLOCK_N", "M_BUCKET", "N", "A")},
)
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _masked_mm_kernel(
    A, B, AUX, BIAS, C, M, N, K, M_BUCKET, stride_bk, stride_bn,
    MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, FP64: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # A: [M, K] contiguous; B[k, n] = B + k * stride_bk + n * stride_bn; C: [M, N] contiguous
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_pids(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm.to(tl.int64)[:, None] * K + rk[None, :]
    b_off = rk[:, None].to(tl.int64) * stride_bk + rn.to(tl.int64)[None, :] * stride_bn
    b_ptrs = B + b_off
    if MASK_MODE == 0:
        x_ptrs = AUX + b_off
    if MASK_MODE == 1:
        keep_n = keep(tl.load(AUX + rn))
    if FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        if MASK_MODE == 0:
            if EVEN_K:
                mx = tl.load(x_ptrs)
            else:
                mx = tl.load(x_ptrs, mask=rk[:, None] < k_left, other=0.0)
            b = tl.where(keep(mx), b, 0.0)
            x_ptrs += BLOCK_K * stride_bk
        elif MASK_MODE == 1:
            b = tl.where(keep_n[None, :], b, 0.0)
        else:
            if EVEN_K:
                mk = tl.load(AUX + kt * BLOCK_K + rk)
            else:
                mk = tl.load(AUX + kt * BLOCK_K + rk, mask=rk < k_left, other=0.0)
            b = tl.where(keep(mk)[:, None], b, 0.0)
        acc = _dot(a, b, acc, DOT_PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        acc += to_compute(tl.load(BIAS + rn), FP64)[None, :]
    cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = C + cm.to(tl.int64)[:, None] * N + cn[None, :]
    tl.store(c_ptrs, cast_for(acc, C), mask=(cm < M)[:, None] & (cn < N)[None, :])


# --------------------------------------------------------------------------------------------------
# dT = dY^T X with the dW / dM epilogue
# --------------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_mm_configs("BLOCK_N", "BLOCK_K", "BLOCK_T", "GROUP_N"),
    key=["T_BUCKET", "N", "K", "MASK_MODE", "NEED_DW", "NEED_DM"],
    reset_to_zero=["DMP"],
    prune_configs_by={"early_config_prune": _pruner("BLOCK_N", "BLOCK_K", "N", "K", "G")},
)
@triton.heuristics({"EVEN_T": lambda a: a["T"] % a["BLOCK_T"] == 0})
@triton.jit
def _masked_dt_kernel(
    G, X, W, AUX, DW, DM, DMP, N, K, T, T_BUCKET, dmp_cols, alpha_hi, alpha_lo,
    MASK_MODE: tl.constexpr, SURR: tl.constexpr, RULE: tl.constexpr, NEED_DW: tl.constexpr,
    NEED_DM: tl.constexpr, FP64: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_N: tl.constexpr,
    EVEN_T: tl.constexpr,
):
    # G: [T, N] contiguous (dY), X: [T, K] contiguous; W, DW: [N, K]; AUX, DM: [N, K] or [N]
    pid = tl.program_id(0)
    pid_n, pid_k = _grouped_pids(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_N)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)) % K
    rt = tl.arange(0, BLOCK_T)
    g_ptrs = G + rn[:, None] + rt.to(tl.int64)[None, :] * N  # [BLOCK_N, BLOCK_T] view of dY^T
    x_ptrs = X + rt.to(tl.int64)[:, None] * K + rk[None, :]  # [BLOCK_T, BLOCK_K]
    if FP64:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for tt in range(0, tl.cdiv(T, BLOCK_T)):
        if EVEN_T:
            gt = tl.load(g_ptrs)
            x = tl.load(x_ptrs)
        else:
            t_left = T - tt * BLOCK_T
            gt = tl.load(g_ptrs, mask=rt[None, :] < t_left, other=0.0)
            x = tl.load(x_ptrs, mask=rt[:, None] < t_left, other=0.0)
        acc = _dot(gt, x, acc, DOT_PREC)
        g_ptrs += BLOCK_T * N
        x_ptrs += BLOCK_T * K

    # epilogue: acc = dT tile, still in fp32 / fp64
    en = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ek = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask = en < N
    msk = nmask[:, None] & (ek < K)[None, :]
    w_off = en.to(tl.int64)[:, None] * K + ek[None, :]
    if MASK_MODE == 0:
        m = to_compute(tl.load(AUX + w_off, mask=msk, other=0.0), FP64)
    else:
        m_row = to_compute(tl.load(AUX + en, mask=nmask, other=0.0), FP64)
        m = m_row[:, None]
    if NEED_DW:
        tl.store(DW + w_off, cast_for(acc * keep(m).to(acc.dtype), DW), mask=msk)
    if NEED_DM:
        w = to_compute(tl.load(W + w_off, mask=msk, other=0.0), FP64)
        gc = acc * rule_factor(w, RULE)
        if MASK_MODE == 0:
            alpha = scalar(alpha_hi, alpha_lo, FP64)
            tl.store(DM + w_off, cast_for(gc * surrogate(m, alpha, SURR), DM), mask=msk)
        else:
            part = tl.sum(tl.where(msk, gc, 0.0), axis=1)
            tl.store(DMP + en.to(tl.int64) * dmp_cols + pid_k, part, mask=nmask)


@triton.jit
def _unit_finish_kernel(
    DMP, AUX, DM, N, cols, alpha_hi, alpha_lo,
    SURR: tl.constexpr, FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    if FP64:
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, cols, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        acc += tl.load(DMP + rows[:, None] * cols + cc[None, :], mask=rmask[:, None] & (cc < cols)[None, :], other=0.0)
    alpha = scalar(alpha_hi, alpha_lo, FP64)
    m = to_compute(tl.load(AUX + rows, mask=rmask, other=0.0), FP64)
    tl.store(DM + rows, cast_for(tl.sum(acc, axis=1) * surrogate(m, alpha, SURR), DM), mask=rmask)


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------
def _dot_precision(dtype: torch.dtype, device: torch.device) -> int:
    if dtype == torch.float64:
        return DOT_IEEE
    if dtype == torch.float32:
        tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        return DOT_TF32 if tf32 else DOT_IEEE
    return DOT_DEFAULT


def supports(input: Tensor, weight: Tensor, aux: Tensor, grad_out: Tensor | None = None) -> bool:
    """Whether the fused kernels handle these dtypes (else the caller composes the reference):
    matching input/weight (/grad_out) dtypes, and a float64 aux only with float64 inputs."""
    if input.dtype != weight.dtype or (grad_out is not None and grad_out.dtype != input.dtype):
        return False
    return not (aux.dtype == torch.float64 and weight.dtype != torch.float64)


def _rows(t: Tensor, cols: int) -> Tensor:
    """``t`` as ``[prod(leading dims), cols]`` (well defined for empty tensors too)."""
    return t.reshape(math.prod(t.shape[:-1]), cols)


def _bucket(m: int) -> int:
    return triton.next_power_of_2(max(int(m), 1))


def _mask_mode(weight: Tensor, aux: Tensor, unit_mode: int) -> int:
    return unit_mode if reference.granularity_of(weight, aux) == "unit" else MASK_WEIGHT


def masked_matmul(a: Tensor, weight: Tensor, aux: Tensor, bias: Tensor | None, transpose_w: bool) -> Tensor:
    """``a @ T^T (+ bias)`` (``transpose_w``, the forward) or ``a @ T`` (``dX``); ``a`` is 2-D."""
    a = contiguous(a)
    w, m = contiguous(weight), contiguous(aux)
    n_w, k_w = w.shape
    Mt = a.shape[0]
    if transpose_w:  # C[Mt, n_w] = A[Mt, k_w] @ W^T
        N, K, stride_bk, stride_bn, mode = n_w, k_w, 1, k_w, _mask_mode(w, m, MASK_UNIT_N)
    else:  # C[Mt, k_w] = A[Mt, n_w] @ W
        N, K, stride_bk, stride_bn, mode = k_w, n_w, k_w, 1, _mask_mode(w, m, MASK_UNIT_K)
    out = torch.empty((Mt, N), dtype=a.dtype, device=a.device)
    b = contiguous(bias) if bias is not None else None

    def grid(meta):
        return (triton.cdiv(Mt, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    with device_guard(a):
        _masked_mm_kernel[grid](
            a, w, m, b if b is not None else a, out, Mt, N, K, _bucket(Mt), stride_bk, stride_bn,
            MASK_MODE=mode, HAS_BIAS=b is not None, FP64=a.dtype == torch.float64,
            DOT_PREC=_dot_precision(a.dtype, a.device),
        )
    return out


def masked_dt_epilogue(
    g2: Tensor,
    x2: Tensor,
    weight: Tensor,
    aux: Tensor,
    surrogate_name: str,
    rule: str,
    alpha: float,
    need_weight_grad: bool,
    need_aux_grad: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """``(dW, dM)`` from ``dT = g2^T x2`` without materialising ``dT``."""
    if not (need_weight_grad or need_aux_grad):
        return None, None
    g2, x2 = contiguous(g2), contiguous(x2)
    w, m = contiguous(weight), contiguous(aux)
    N, K = w.shape
    T = g2.shape[0]
    unit = reference.granularity_of(w, m) == "unit"
    fp64 = g2.dtype == torch.float64
    acc_dtype = torch.float64 if fp64 else torch.float32
    dW = torch.empty_like(w) if need_weight_grad else None
    dM = torch.empty_like(m) if need_aux_grad else None
    dmp_cols = triton.cdiv(K, MIN_BLOCK_K)
    dmp = (
        torch.zeros((N, dmp_cols), dtype=acc_dtype, device=w.device) if (need_aux_grad and unit) else None
    )
    ahi, alo = split(alpha)
    surr, rl = SURROGATE_CODES[surrogate_name], RULE_CODES[rule]

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)

    with device_guard(w):
        _masked_dt_kernel[grid](
            g2, x2, w, m, dW if dW is not None else w, dM if dM is not None else m,
            dmp if dmp is not None else torch.zeros(1, dtype=acc_dtype, device=w.device),  # reset by autotune
            N, K, T, _bucket(T), dmp_cols, ahi, alo,
            MASK_MODE=MASK_UNIT_N if unit else MASK_WEIGHT, SURR=surr, RULE=rl, NEED_DW=need_weight_grad,
            NEED_DM=need_aux_grad, FP64=fp64, DOT_PREC=_dot_precision(g2.dtype, g2.device),
        )
        if dmp is not None:
            block_c = min(triton.next_power_of_2(dmp_cols), 256)
            block_r = max(1, min(triton.next_power_of_2(N), 4096 // block_c))
            _unit_finish_kernel[(triton.cdiv(N, block_r),)](
                dmp, m, dM, N, dmp_cols, ahi, alo, SURR=surr, FP64=fp64, BLOCK_R=block_r, BLOCK_C=block_c,
            )
    return dW, dM


def masked_linear(input: Tensor, weight: Tensor, aux: Tensor, bias: Tensor | None) -> Tensor:
    """``input @ (W * h(M))^T + bias`` for ``input`` of any leading shape."""
    N, K = weight.shape
    x2 = _rows(input, K)
    if x2.shape[0] == 0 or N == 0 or K == 0:  # nothing to multiply: no launch
        y = F.linear(x2, reference.apply_mask(weight, aux), bias)
    else:
        y = masked_matmul(x2, weight, aux, bias, transpose_w=True)
    return y.reshape(*input.shape[:-1], N)


def masked_linear_backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor,
    aux: Tensor,
    surrogate_name: str = "softplus",
    rule: str = "sign",
    alpha: float = 0.1,
    need_input_grad: bool = True,
    need_weight_grad: bool = True,
    need_aux_grad: bool = True,
    need_bias_grad: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(dX, dW, dM, db)``; unrequested ones are ``None``."""
    N, K = weight.shape
    g2, x2 = _rows(grad_out, N), _rows(input, K)
    dX = dW = dM = db = None
    if g2.shape[0] == 0 or N == 0 or K == 0:  # degenerate: plain composition (at most an elementwise launch)
        if need_input_grad:
            dX = torch.mm(g2, reference.apply_mask(weight, aux).to(g2.dtype)).reshape(input.shape)
        if need_weight_grad or need_aux_grad:
            dT = torch.mm(g2.t(), x2.to(g2.dtype))
            dW, dM = elementwise.mask_backward(
                dT, weight, aux, surrogate_name, rule, alpha, need_weight_grad, need_aux_grad
            )
    else:
        if need_input_grad:
            dX = masked_matmul(g2, weight, aux, None, transpose_w=False).reshape(input.shape)
        if need_weight_grad or need_aux_grad:
            dW, dM = masked_dt_epilogue(
                g2, x2, weight, aux, surrogate_name, rule, alpha, need_weight_grad, need_aux_grad
            )
    if need_bias_grad:
        db = g2.sum(dim=0)
    return dX, dW, dM, db
