"""Kernel-specific tests of the ``cpp`` backend (``csrc/``, ops ``torch.ops.autoprune_cpp.*``).

The backend-generic checks (the shared dtype / shape matrix through ``torch.ops.autoprune``,
gradcheck, opcheck of the ``autoprune`` ops) live in ``test_conformance.py``. This module calls the
compiled ops directly and covers what is specific to them: every dtype pair (fp16 and fp64 aux too,
mixed grad dtypes), block boundaries of the CPU kernels (512-element blocks, 16384-column reduction
tasks, the multi-tensor task split), every CPU instruction-set variant compiled in, the vectorised
softplus / sigmoid against float64 over the whole range, only-requested gradients, in-place updates
of non-contiguous tensors, opcheck of the ``autoprune_cpp`` ops, the build / fallback logic and,
when a GPU and the CUDA part are present, the CUDA kernels against the same reference.

The extension is compiled once per session (the ``ext`` fixture; cached under
``~/.cache/autoprune_ext`` for later sessions). Without a C++ compiler the module is skipped.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from autoprune_ext import _build, backends
from autoprune_ext import reference as ref

from tolerances import LOW, assert_matches

ROOT = Path(__file__).resolve().parents[1]
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SHAPES = ((1,), (17,), (129, 33), (5, 3, 3, 3), (0, 5), (3, 0))
HAS_GPU = torch.cuda.is_available()


@pytest.fixture(scope="session")
def ext():
    """Build (once) and load the extension; skip the module where no compiler exists."""
    if _build.disabled():
        pytest.skip("AUTOPRUNE_NO_EXT=1")
    if not _build.load():
        ok, why = _build.can_build()
        if not ok:
            pytest.skip(f"the C++ extension cannot be built here: {why}")
        _build.build()  # a build failure with a compiler present is a test failure
    backends.clear_cache()
    return torch.ops.autoprune_cpp


@pytest.fixture(autouse=True)
def _loaded(ext):
    yield


def devices() -> list[str]:
    out = ["cpu"]
    if HAS_GPU and _build.load() and _build.has_cuda_kernels():
        out.append("cuda")
    return out


def rand(shape, dtype=torch.float32, *, device="cpu", scale=1.0, noncontig=False) -> torch.Tensor:
    if noncontig:
        return (torch.randn(tuple(shape)[::-1], dtype=torch.float64) * scale).to(device, dtype).t()
    return (torch.randn(shape, dtype=torch.float64) * scale).to(device, dtype)


def make_aux(w: torch.Tensor, granularity: str, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    shape = tuple(w.shape) if granularity == "weight" else tuple(w.shape[:1])
    aux = rand(shape, dtype, device=w.device, scale=scale)
    if aux.numel():
        aux.view(-1)[0] = 0.0  # h(0) = 1
    if aux.numel() > 1:
        aux.view(-1)[1] = -0.0  # h(-0) = 1 too
    return aux


def eager_dM(g, w, m, surrogate, rule, alpha, granularity):
    """dM computed naively in the tensors' own (low) precision: the yardstick of the 2x rule."""
    c = torch.sign(w) if rule == "sign" else w
    gc = (g * c).to(m.dtype)
    if granularity == "unit":
        gc = gc.flatten(1).sum(1) if gc.dim() > 1 else gc
    return (gc * ref.surrogate(m, surrogate, alpha)).to(m.dtype)


def check_backward(ext, g, w, m, surrogate, rule, alpha, granularity, need_w=True, need_m=True):
    dW, dM = ext.mask_backward(g, w, m, surrogate, rule, alpha, need_w, need_m)
    if need_w:
        assert dW.dtype == w.dtype and dW.shape == w.shape and dW.is_contiguous()
        expected = ref.mask_backward(g, w, m, surrogate, rule, alpha, True, False)[0]
        assert torch.equal(dW, expected)  # g * h(M): exact, signed zeros included
        assert torch.equal(torch.signbit(dW), torch.signbit(expected))
    else:
        assert dW.numel() == 0
    if need_m:
        assert dM.dtype == m.dtype and dM.shape == m.shape and dM.is_contiguous()
        e64 = ref.mask_backward(g.double(), w.double(), m.double(), surrogate, rule, alpha, False, True)[1]
        # a low-precision dM: the 2x rule; else float32 / float64 accuracy (inputs convert exactly)
        eager = eager_dM(g, w, m, surrogate, rule, alpha, granularity) if m.dtype in LOW else None
        assert_matches(dM, e64, eager, what=f"dM {surrogate}/{rule}/{granularity}")
    else:
        assert dM.numel() == 0


# ------------------------------------------------------------------------------------------------
# apply_mask
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_apply_mask_all_dtype_pairs(ext, device, shape, granularity):
    if device not in devices():
        pytest.skip("no GPU or no CUDA kernels in the extension")
    for wdt, adt in itertools.product(FLOATS, FLOATS):
        w = rand(shape, wdt, device=device)
        m = make_aux(w, granularity, adt)
        out = ext.apply_mask(w, m, "softplus", "sign", 0.1)
        assert out.dtype == wdt and out.shape == w.shape and out.is_contiguous()
        assert torch.equal(out, ref.apply_mask(w, m)), (wdt, adt)
        # the pattern is exactly h(M) (a pruned weight is +0, a kept one bit-identical)
        keep = ref.broadcast_aux(m, w) >= 0
        assert torch.equal(out == 0, ~keep | (w == 0))


@pytest.mark.parametrize("n", [511, 512, 513, 4097, 70001])
def test_apply_mask_block_boundaries(ext, n):
    w = rand((n,), torch.bfloat16)
    m = rand((n,), torch.float32)
    assert torch.equal(ext.apply_mask(w, m, "softplus", "sign", 0.1), ref.apply_mask(w, m))
    w2 = rand((n, 3), torch.float32)
    m2 = rand((n,), torch.float16)
    assert torch.equal(ext.apply_mask(w2, m2, "softplus", "sign", 0.1), ref.apply_mask(w2, m2))


def test_apply_mask_noncontiguous_and_special_values(ext):
    w = rand((33, 129), torch.float32, noncontig=True)
    m = rand((33, 129), torch.float32, noncontig=True)
    assert not w.is_contiguous() and not m.is_contiguous()
    assert torch.equal(ext.apply_mask(w, m, "softplus", "sign", 0.1), ref.apply_mask(w, m))
    w = torch.tensor([1.0, -2.0, float("nan"), float("inf"), -0.0, 3.0])
    m = torch.tensor([float("nan"), -1e-30, 1.0, 0.0, 5.0, -0.0])
    out = ext.apply_mask(w, m, "softplus", "sign", 0.1)
    expected = ref.apply_mask(w, m)
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())
    assert torch.equal(out.signbit(), expected.signbit())
    # a float64 aux is compared in float64: -1e-300 prunes even though it rounds to -0.0 in float32
    m64 = torch.tensor([-1e-300, 1e-300], dtype=torch.float64)
    assert torch.equal(ext.apply_mask(torch.ones(2), m64, "softplus", "sign", 0.1), torch.tensor([0.0, 1.0]))


# ------------------------------------------------------------------------------------------------
# mask_backward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("surrogate", ref.SURROGATES)
@pytest.mark.parametrize("rule", ref.RULES)
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_mask_backward_surrogates_rules(ext, device, surrogate, rule, granularity):
    if device not in devices():
        pytest.skip("no GPU or no CUDA kernels in the extension")
    w = rand((129, 33), device=device)
    m = make_aux(w, granularity, torch.float32, scale=3.0)
    check_backward(ext, rand((129, 33), device=device), w, m, surrogate, rule, 0.23, granularity)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("wdt,adt", list(itertools.product(FLOATS, FLOATS)))
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_mask_backward_dtype_pairs(ext, device, wdt, adt, granularity):
    if device not in devices():
        pytest.skip("no GPU or no CUDA kernels in the extension")
    for shape in ((17,), (129, 33), (0, 5), (3, 0)):
        w = rand(shape, wdt, device=device)
        m = make_aux(w, granularity, adt)
        check_backward(ext, rand(shape, wdt, device=device), w, m, "softplus", "sign", 0.1, granularity)
        check_backward(ext, rand(shape, wdt, device=device), w, m, "sigmoid", "chain", 0.1, granularity)


@pytest.mark.parametrize("gdt", [torch.float32, torch.bfloat16, torch.float64])
def test_mask_backward_grad_dtype_differs(ext, gdt):
    """grad may come in another dtype than W (the op layer allows it): computed as the reference."""
    w = rand((40, 9), torch.bfloat16)
    m = make_aux(w, "weight", torch.float32)
    g = rand((40, 9), gdt)
    dW, dM = ext.mask_backward(g, w, m, "softplus", "sign", 0.1, True, True)
    e_dW, e_dM = ref.mask_backward(g, w, m, "softplus", "sign", 0.1)
    assert torch.equal(dW, e_dW)
    torch.testing.assert_close(dM.double(), e_dM.double(), rtol=1e-5, atol=1e-6 if gdt != torch.float64 else 1e-12)


@pytest.mark.parametrize("need_w,need_m", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_mask_backward_only_requested(ext, need_w, need_m, granularity):
    w = rand((17, 9))
    m = make_aux(w, granularity, torch.float32)
    check_backward(ext, rand((17, 9)), w, m, "leaky_relu", "sign", 0.1, granularity, need_w, need_m)


@pytest.mark.parametrize("rows,cols", [(1, 16384), (2, 16385), (3, 40000), (700, 1), (5, 513)])
def test_mask_backward_unit_reduction_tasks(ext, rows, cols):
    """Rows split into several 16384-column tasks, partial sums combined in order."""
    w = rand((rows, cols))
    m = make_aux(w, "unit", torch.float32)
    g = rand((rows, cols))
    check_backward(ext, g, w, m, "softplus", "chain", 0.1, "unit")
    # deterministic: the same bits on a second call (sums do not depend on the thread split)
    a = ext.mask_backward(g, w, m, "softplus", "chain", 0.1, False, True)[1]
    b = ext.mask_backward(g, w, m, "softplus", "chain", 0.1, False, True)[1]
    assert torch.equal(a, b)


def test_mask_backward_noncontiguous(ext):
    w = rand((33, 129), noncontig=True)
    m = rand((33, 129), noncontig=True)
    g = rand((33, 129), noncontig=True)
    check_backward(ext, g, w, m, "softplus", "sign", 0.1, "weight")
    wu = rand((33, 129), torch.bfloat16, noncontig=True)
    check_backward(ext, rand((33, 129), torch.bfloat16, noncontig=True), wu, make_aux(wu, "unit", torch.float32),
                   "sigmoid", "sign", 0.1, "unit")


@pytest.mark.parametrize("surrogate", ["softplus", "sigmoid"])
def test_vectorised_surrogates_accuracy(ext, surrogate):
    """s(m) through dM = 1 * sign(1) * s(m): within a few float32 ulps of float64 over [-120, 120]."""
    m = torch.cat([
        torch.linspace(-120.0, 120.0, 200003),
        torch.tensor([0.0, -0.0, 1e-8, -1e-8, 20.0, 20.0001, 19.9999, -87.5, -88.8, -103.9, -104.5,
                      float("inf"), -float("inf"), float("nan")]),
    ])
    ones = torch.ones_like(m)
    dM = ext.mask_backward(ones, ones, m, surrogate, "sign", 0.1, False, True)[1]
    exact = ref.surrogate(m.double(), surrogate)
    assert torch.equal(dM.isnan(), exact.isnan())
    inf = exact.isinf()
    assert torch.equal(dM[inf].double(), exact[inf])
    finite = exact.isfinite()
    got, want = dM[finite].double(), exact[finite]
    tiny = torch.finfo(torch.float32).tiny
    rel = (got - want).abs() / want.abs().clamp_min(tiny)
    normal = want.abs() >= tiny
    assert float(rel[normal].max()) < 6e-7, f"max relative error {float(rel[normal].max()):.3g}"
    # float32 denormal results: within one denormal step
    sub = (got - want).abs()[~normal]
    assert sub.numel() == 0 or float(sub.max()) <= 1.5e-45


# ------------------------------------------------------------------------------------------------
# aux_adam_step_ / aux_adam_step_multi_
# ------------------------------------------------------------------------------------------------
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, penalty_scale=0.37, rho=1e-3)


def adam_case(shape, adt, sdt, gdt, wdt, *, device="cpu", noncontig=False):
    aux = rand(shape, adt, device=device, scale=2.0, noncontig=noncontig)
    m1 = rand(shape, sdt, device=device, scale=0.1, noncontig=noncontig)
    m2 = rand(shape, sdt, device=device, scale=0.1, noncontig=noncontig).abs()
    grad = None if gdt is None else rand(shape, gdt, device=device)
    weight = None if wdt is None else rand(shape, wdt, device=device, scale=0.05)
    if weight is not None and weight.numel() > 1:
        weight.view(-1)[1] = 0.0  # |w| < 1e-15: no penalty push
    return aux, m1, m2, grad, weight


def adam_expected(aux, m1, m2, grad, weight, step, surrogate, alpha):
    a, e1, e2 = aux.double().clone(), m1.double().clone(), m2.double().clone()  # .double() may alias
    ref.aux_adam_step_(
        a, e1, e2, None if grad is None else grad.double(), None if weight is None else weight.double(),
        step=step, lr=HP["lr"], beta1=HP["beta1"], beta2=HP["beta2"], eps=HP["eps"],
        penalty_scale=HP["penalty_scale"], rho=HP["rho"], surrogate_name=surrogate, alpha=alpha,
    )
    return a, e1, e2


def adam_eager(aux, m1, m2, grad, weight, step, surrogate, alpha):
    """The reference run on the tensors as they are (float32 math, rounded to each dtype)."""
    a, e1, e2 = aux.clone(), m1.clone(), m2.clone()
    ref.aux_adam_step_(a, e1, e2, grad, weight, step=step, lr=HP["lr"], beta1=HP["beta1"], beta2=HP["beta2"],
                       eps=HP["eps"], penalty_scale=HP["penalty_scale"], rho=HP["rho"], surrogate_name=surrogate,
                       alpha=alpha)
    return a, e1, e2


def check_adam(got, expected, eager):
    for name, g, e, lo in zip(("aux", "exp_avg", "exp_avg_sq"), got, expected, eager):
        assert_matches(g, e, lo if g.dtype in LOW else None, what=name)


def run_adam(ext, aux, m1, m2, grad, weight, step, surrogate, alpha):
    ext.aux_adam_step_(aux, m1, m2, grad, weight, step, HP["lr"], HP["beta1"], HP["beta2"], HP["eps"],
                       HP["penalty_scale"], HP["rho"], surrogate, alpha)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("surrogate", ref.SURROGATES)
@pytest.mark.parametrize("with_grad,with_weight", [(True, True), (True, False), (False, True), (False, False)])
def test_aux_adam_step_surrogates(ext, device, surrogate, with_grad, with_weight):
    if device not in devices():
        pytest.skip("no GPU or no CUDA kernels in the extension")
    case = adam_case((129, 7), torch.float32, torch.float32, torch.float32 if with_grad else None,
                     torch.float32 if with_weight else None, device=device)
    expected = adam_expected(*case, 3, surrogate, 0.3)
    run_adam(ext, *case, 3, surrogate, 0.3)
    check_adam(case[:3], expected, expected)


@pytest.mark.parametrize("adt", FLOATS)
@pytest.mark.parametrize("sdt", [torch.float32, torch.float64, torch.bfloat16])
def test_aux_adam_step_dtypes(ext, adt, sdt):
    for gdt, wdt in [(adt, adt), (torch.float32, torch.bfloat16), (None, None)]:
        case = adam_case((515,), adt, sdt, gdt, wdt)
        expected = adam_expected(*case, 7, "softplus", 0.1)
        eager = adam_eager(*case, 7, "softplus", 0.1)
        run_adam(ext, *case, 7, "softplus", 0.1)
        check_adam(case[:3], expected, eager)


@pytest.mark.parametrize("with_grad", [True, False])
def test_aux_adam_step_f32_softplus_loop_edges(ext, with_grad):
    """The one-loop float32 softplus kernel, entry by entry against float64: values around the
    softplus threshold (20), huge and tiny (denormal) aux, signed zeros, NaN / inf (propagated as the
    reference does), over several parallel tasks with an odd tail."""
    n = 3 * 65536 + 13
    aux, m1, m2, grad, _ = adam_case((n,), torch.float32, torch.float32, torch.float32 if with_grad else None, None)
    edges = torch.tensor([0.0, -0.0, 19.99, 20.0, 20.01, -19.99, -20.0, -20.01, 88.0, -88.0, 104.0, -104.0, 1e4, -1e4,
                          1e-38, -1e-38, 1e-45, -1e-45, 1e18, -1e18, float("nan"), float("inf"), float("-inf")])
    aux[-len(edges):] = edges
    aux[65536 - 3:65536 - 3 + len(edges)] = edges  # across a task boundary
    expected = adam_expected(aux, m1, m2, grad, None, 4, "softplus", 0.1)
    run_adam(ext, aux, m1, m2, grad, None, 4, "softplus", 0.1)
    for name, got, want in zip(("aux", "exp_avg", "exp_avg_sq"), (aux, m1, m2), expected):
        # the moments are sums that may cancel: their error is relative to the largest finite moment
        atol = 1e-30 if name == "aux" else 1e-6 * float(want[want.isfinite()].abs().max())
        torch.testing.assert_close(got.double(), want, rtol=4e-6, atol=atol, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_aux_adam_step_noncontiguous_in_place(ext):
    case = adam_case((33, 65), torch.float32, torch.float32, torch.float32, None, noncontig=True)
    assert not case[0].is_contiguous()
    ids = [t.data_ptr() for t in case[:3]]
    expected = adam_expected(*case, 2, "sigmoid", 0.1)
    run_adam(ext, *case, 2, "sigmoid", 0.1)
    assert [t.data_ptr() for t in case[:3]] == ids  # updated in place, not replaced
    check_adam(case[:3], expected, expected)


def test_aux_adam_step_multi_matches_single(ext):
    shapes = [(3,), (70001,), (0,), (129, 33), (1,), (600, 300)]
    dts = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float64, torch.float32]
    sets = [adam_case(s, d, torch.float64 if d == torch.float64 else torch.float32, d if i % 2 else None,
                      d if i % 3 == 0 else None) for i, (s, d) in enumerate(zip(shapes, dts))]
    clones = [[None if t is None else t.clone() for t in s] for s in sets]
    steps = [1, 5, 2, 9, 3, 4]
    scales = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    ext.aux_adam_step_multi_([s[0] for s in sets], [s[1] for s in sets], [s[2] for s in sets],
                             [s[3] for s in sets], [s[4] for s in sets], steps, scales,
                             HP["lr"], HP["beta1"], HP["beta2"], HP["eps"], HP["rho"], "softplus", 0.1)
    for c, step, scale in zip(clones, steps, scales):
        ext.aux_adam_step_(*c, step, HP["lr"], HP["beta1"], HP["beta2"], HP["eps"], scale, HP["rho"], "softplus", 0.1)
    for s, c in zip(sets, clones):
        for a, b in zip(s[:3], c[:3]):
            assert torch.equal(a, b)  # same kernels, same arithmetic: bit-identical


def test_adam_many_steps_tracks_reference(ext):
    """Fifty steps: errors do not accumulate beyond float32 rounding."""
    a, m1, m2, _, w = adam_case((1000,), torch.float32, torch.float32, None, torch.float32)
    ra, r1, r2 = a.double().clone(), m1.double().clone(), m2.double().clone()
    for step in range(1, 51):
        g = rand((1000,))
        run_adam(ext, a, m1, m2, g, w, step, "softplus", 0.1)
        ref.aux_adam_step_(ra, r1, r2, g.double(), w.double(), step=step, lr=HP["lr"], penalty_scale=HP["penalty_scale"],
                           rho=HP["rho"])
    torch.testing.assert_close(a.double(), ra, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_misaligned_views_and_tails(ext, device):
    """Views starting one element in (no 16-byte alignment: the element-wise paths) and odd tails."""
    if device not in devices():
        pytest.skip("no GPU or no CUDA kernels in the extension")
    n = 1000 * 8 + 5
    for wdt in (torch.float32, torch.bfloat16, torch.float16):
        w = rand((n + 1,), wdt, device=device)[1:]
        m = rand((n + 1,), torch.float32, device=device)[1:]
        g = rand((n + 1,), wdt, device=device)[1:]
        assert w.is_contiguous() and w.data_ptr() % 16 != 0
        assert torch.equal(ext.apply_mask(w, m, "softplus", "sign", 0.1), ref.apply_mask(w, m))
        check_backward(ext, g, w, m, "softplus", "sign", 0.1, "weight")
        a, e1, e2, gr, wt = adam_case((n + 1,), wdt, torch.float32, wdt, wdt, device=device)
        case = (a[1:], e1[1:], e2[1:], gr[1:], wt[1:])
        expected = adam_expected(*case, 2, "softplus", 0.1)
        eager = adam_eager(*case, 2, "softplus", 0.1)
        run_adam(ext, *case, 2, "softplus", 0.1)
        check_adam(case[:3], expected, eager)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_cuda_unit_reduction_and_multi_tensor(ext):
    if "cuda" not in devices():
        pytest.skip("the extension has no CUDA kernels")
    for rows, cols in [(1, 4096), (2, 4097), (3, 50000), (70000, 3), (5, 0)]:
        w = rand((rows, cols), device="cuda")
        m = make_aux(w, "unit", torch.float32)
        check_backward(ext, rand((rows, cols), device="cuda"), w, m, "softplus", "chain", 0.1, "unit")
    # more tensors and blocks than one multi-tensor launch holds (20 tensors / 160 blocks)
    sizes = [1, 8193, 3, 2_000_000] + [777] * 30
    sets = [adam_case((n,), torch.bfloat16 if i % 3 == 0 else torch.float32, torch.float32, torch.float32, None,
                      device="cuda") for i, n in enumerate(sizes)]
    clones = [[None if t is None else t.clone() for t in s] for s in sets]
    steps = [i + 1 for i in range(len(sizes))]
    scales = [0.01 * (i + 1) for i in range(len(sizes))]
    ext.aux_adam_step_multi_([s[0] for s in sets], [s[1] for s in sets], [s[2] for s in sets], [s[3] for s in sets],
                             [s[4] for s in sets], steps, scales, HP["lr"], HP["beta1"], HP["beta2"], HP["eps"],
                             HP["rho"], "sigmoid", 0.1)
    for c, step, scale in zip(clones, steps, scales):
        ext.aux_adam_step_(*c, step, HP["lr"], HP["beta1"], HP["beta2"], HP["eps"], scale, HP["rho"], "sigmoid", 0.1)
    for s, c in zip(sets, clones):
        for a, b in zip(s[:3], c[:3]):
            assert torch.equal(a, b)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_cuda_matches_cpu_kernels(ext):
    """The CUDA and CPU kernels agree (same formulas; transcendental functions differ by ulps)."""
    if "cuda" not in devices():
        pytest.skip("the extension has no CUDA kernels")
    w = rand((257, 31), torch.bfloat16)
    m = make_aux(w, "weight", torch.float32, scale=3.0)
    g = rand((257, 31), torch.bfloat16)
    for surrogate in ref.SURROGATES:
        c = ext.mask_backward(g, w, m, surrogate, "sign", 0.1, True, True)
        d = ext.mask_backward(g.cuda(), w.cuda(), m.cuda(), surrogate, "sign", 0.1, True, True)
        assert torch.equal(c[0], d[0].cpu())
        torch.testing.assert_close(c[1], d[1].cpu(), rtol=2e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# masked linear (C++ composition) and the backend object
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_masked_linear_composition(ext, granularity):
    x = rand((4, 5, 33))
    w = rand((17, 33))
    m = make_aux(w, granularity, torch.float32)
    b = rand((17,))
    torch.testing.assert_close(ext.masked_linear(x, w, m, b, "softplus", "sign", 0.1), ref.masked_linear(x, w, m, b))
    go = rand((4, 5, 17))
    got = ext.masked_linear_backward(go, x, w, m, "sigmoid", "chain", 0.1, True, True, True, True)
    exp = ref.masked_linear_backward(go, x, w, m, "sigmoid", "chain", 0.1)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    got = ext.masked_linear_backward(go, x, w, m, "sigmoid", "chain", 0.1, False, True, False, False)
    assert got[0].numel() == 0 and got[2].numel() == 0 and got[3].numel() == 0 and got[1].shape == w.shape


@pytest.mark.parametrize("wdt, adt", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                      (torch.float16, torch.bfloat16), (torch.float64, torch.float32),
                                      (torch.float32, torch.float64)])
@pytest.mark.parametrize("need", list(itertools.product([True, False], repeat=3)))
def test_fused_cpu_linear_backward_is_the_composition_bit_for_bit(ext, wdt, adt, need):
    """The CPU kernel of masked_linear_backward (one pass writing dM, T and dW in place of dT) gives
    exactly what the dispatcher-level composition of mm, apply_mask and mask_backward gives."""
    need_w, need_m, need_b = need
    x = rand((3, 7, 33)).to(wdt)
    w = rand((1100, 33)).to(wdt).t().contiguous().t()  # non-contiguous; 36,300 entries: two chunks
    m = rand((1100, 33)).to(adt)
    m.view(-1)[::5] = 0.0
    m.view(-1)[1::7] = -0.0
    go = rand((3, 7, 1100)).to(wdt)
    got = ext.masked_linear_backward(go, x, w, m, "softplus", "sign", 0.1, True, need_w, need_m, need_b)
    g2, x2 = go.reshape(-1, 1100), x.reshape(-1, 33)
    t = ext.apply_mask(w, m, "softplus", "sign", 0.1)
    dW, dM = ext.mask_backward(g2.t().mm(x2), w, m, "softplus", "sign", 0.1, need_w, need_m)
    assert torch.equal(got[0], g2.mm(t).reshape(x.shape))
    for g, e, needed in ((got[1], dW, need_w), (got[2], dM, need_m), (got[3], g2.sum(0), need_b)):
        if needed:
            assert g.dtype == e.dtype and g.shape == e.shape and torch.equal(g.view(torch.uint8), e.view(torch.uint8))
        else:
            assert g.numel() == 0


def test_backend_through_autoprune_ops(ext):
    backend = backends.get("cpp")
    assert backend is not None and backend.name == "cpp"
    ok, why = backend.availability("cpu")
    assert ok and "C++ CPU kernels" in why, why
    w = rand((20, 8)).requires_grad_()
    m = make_aux(w.detach(), "weight", torch.float32).requires_grad_()
    with backends.use("cpp"):
        assert backends.select(w.device) is backend
        y = torch.ops.autoprune.apply_mask(w, m, "softplus", "sign", 0.1)
        (y * y).sum().backward()
    e_dW, e_dM = ref.mask_backward(2 * ref.apply_mask(w.detach(), m.detach()), w.detach(), m.detach())
    torch.testing.assert_close(w.grad, e_dW)
    torch.testing.assert_close(m.grad, e_dM)
    # the backend object returns None for unrequested gradients (base.py contract)
    dW, dM = backend.mask_backward(rand((20, 8)), w.detach(), m.detach(), "softplus", "sign", 0.1, False, True)
    assert dW is None and dM is not None


def test_every_cpu_isa_variant_agrees(ext):
    """The default / AVX2 / AVX-512 copies of the kernels give the same results (within rounding)."""
    isas = list(ext.cpu_isas())
    assert isas[0] == "default"
    original = ext.cpu_isa()
    w = rand((300, 77), torch.bfloat16)
    m = make_aux(w, "weight", torch.float32, scale=4.0)
    mu = make_aux(w, "unit", torch.float16)
    g = rand((300, 77), torch.bfloat16)
    adam_inputs = adam_case((1111,), torch.float32, torch.float32, torch.float32, torch.float32)
    results = {}
    try:
        for isa in isas:
            assert ext.set_cpu_isa(isa) == isa
            a, e1, e2, gr, wt = (t.clone() for t in adam_inputs)
            run_adam(ext, a, e1, e2, gr, wt, 4, "softplus", 0.1)
            results[isa] = [ext.apply_mask(w, m, "softplus", "sign", 0.1),
                            *ext.mask_backward(g, w, m, "softplus", "sign", 0.1, True, True),
                            *ext.mask_backward(g, w, mu, "sigmoid", "chain", 0.1, True, True), a]
    finally:
        ext.set_cpu_isa(original)
    base = results["default"]
    for isa in isas[1:]:
        for x, y in zip(base, results[isa]):
            if x.dtype in LOW:
                assert (x.double() - y.double()).abs().max() <= (x.double().abs().max() * 2 ** -7), isa
            else:
                torch.testing.assert_close(x, y, rtol=2e-6, atol=1e-7)
    with pytest.raises(ValueError):
        ext.set_cpu_isa("sse9")


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="torch runs one thread here")
def test_kernels_run_on_all_torch_threads(ext):
    """at::parallel_for in the extension splits work over torch's threads (it ran on one thread when the
    extension was compiled without OpenMP: ATen's parallel_for is an inline `#pragma omp parallel`)."""
    threads = torch.get_num_threads()
    assert ext.parallel_threads(1 << 22) == min(threads, (1 << 22) // 32768)
    assert ext.parallel_threads(1000) == 1  # below the grain: no fork
    assert ext.parallel_threads(0) == 0
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert ext.parallel_threads(1 << 22) == 1
    finally:
        torch.set_num_threads(old)
    with pytest.raises(ValueError, match="numel"):
        ext.parallel_threads(-1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_one_openmp_runtime_in_the_process(ext):
    """The extension's libgomp.so.1 resolves to the copy torch loaded: one OpenMP thread pool for torch
    and our kernels. (Other packages' vendored copies, e.g. scikit-learn's, are theirs and ignored.)"""
    torch_dir = Path(torch.__file__).resolve().parent
    site = torch_dir.parent
    libs = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = Path(line.split()[-1])
        if ("libgomp" in path.name or "libiomp" in path.name) and (
                path.is_relative_to(torch_dir) or not path.is_relative_to(site)):
            libs.add(str(path))
    assert len(libs) <= 1, libs


# ------------------------------------------------------------------------------------------------
# argument checks and opcheck of the autoprune_cpp ops
# ------------------------------------------------------------------------------------------------
def test_argument_errors(ext):
    w = rand((4, 3))
    with pytest.raises(ValueError, match="aux"):
        ext.apply_mask(w, rand((3,)), "softplus", "sign", 0.1)
    with pytest.raises(TypeError, match="weight"):
        ext.apply_mask(torch.ones(4, 3, dtype=torch.int32), rand((4, 3)), "softplus", "sign", 0.1)
    with pytest.raises(ValueError, match="surrogate"):
        ext.mask_backward(w, w, w, "tanh", "sign", 0.1, True, True)
    with pytest.raises(ValueError, match="rule"):
        ext.mask_backward(w, w, w, "softplus", "abs", 0.1, True, True)
    with pytest.raises(ValueError, match="grad"):
        ext.mask_backward(rand((3, 4)), w, w, "softplus", "sign", 0.1, True, True)
    with pytest.raises(ValueError, match="step"):
        ext.aux_adam_step_(w, w.clone(), w.clone(), None, None, 0, 0.1, 0.9, 0.999, 1e-8, 0.1, 1e-3, "softplus", 0.1)
    with pytest.raises(ValueError, match="exp_avg"):
        ext.aux_adam_step_(w, rand((3,)), w.clone(), None, None, 1, 0.1, 0.9, 0.999, 1e-8, 0.1, 1e-3, "softplus", 0.1)


@pytest.mark.parametrize("dtype", FLOATS)
def test_nonfinite_indices_is_exact(ext, dtype):
    """Every tensor's NaN/inf found wherever it sits (first, last, across a 65536-entry task boundary,
    in a non-contiguous view), none reported for huge finite values, denormals or empty tensors."""
    gen = torch.Generator().manual_seed(7)
    fi = torch.finfo(dtype)
    specials = (float("nan"), -float("nan"), float("inf"), -float("inf"))
    sizes = (1, 7, 129, 65536 + 3, 200001)
    tensors, want = [], []
    for i, n in enumerate(sizes * 2):
        t = (torch.randn(n, generator=gen) * 3).to(dtype)
        t[torch.randint(0, n, (min(n, 5),), generator=gen)] = fi.max  # huge but finite
        t[0] = fi.tiny / 4 if dtype != torch.bfloat16 else fi.tiny  # a denormal (bf16: the smallest normal)
        if i % 2:  # every other tensor gets one special value somewhere
            pos = (0, n - 1, 65535 if n > 65536 else n // 2)[i % 3]
            t[pos] = specials[i % 4]
            want.append(i)
        tensors.append(t)
    tensors.insert(3, torch.empty(0, dtype=dtype))  # empty: finite, and the indices after it shift
    want = [k + (k >= 3) for k in want]
    assert ext.nonfinite_indices(tensors) == want
    assert want == [k for k, t in enumerate(tensors) if not bool(torch.isfinite(t).all())]
    base = torch.randn(50, 40, generator=gen).to(dtype)
    view = base.t()[::3]  # non-contiguous
    assert ext.nonfinite_indices([view]) == []
    base[11, 3 * 7] = float("inf")  # inside the view only: base's column 21 is the view's row 7
    assert ext.nonfinite_indices([base.t()[1::3], view]) == [1]
    assert ext.nonfinite_indices([torch.ones(3, dtype=dtype)]) == []


def test_nonfinite_indices_errors(ext):
    with pytest.raises(TypeError, match=r"tensors\[1\]: expected dtype in"):
        ext.nonfinite_indices([torch.ones(2), torch.ones(2, dtype=torch.int32)])


def _opcheck_cases():
    w = rand((9, 5))
    m = rand((9, 5))
    mu = rand((9,))
    g = rand((9, 5))
    x = rand((2, 3, 5))
    go = rand((2, 3, 9))
    b = rand((9,))
    a, e1, e2, gr, wt = adam_case((9, 5), torch.float32, torch.float32, torch.float32, torch.float32)
    a2, f1, f2, _, _ = adam_case((4,), torch.bfloat16, torch.float32, None, None)
    return [
        ("apply_mask", (w, m, "softplus", "sign", 0.1)),
        ("apply_mask", (w.bfloat16(), mu, "softplus", "sign", 0.1)),
        ("mask_backward", (g, w, m, "softplus", "sign", 0.1, True, True)),
        ("mask_backward", (g, w, mu, "sigmoid", "chain", 0.2, False, True)),
        ("mask_backward", (g, w, m, "relu", "sign", 0.1, True, False)),
        ("masked_linear", (x, w, m, b, "softplus", "sign", 0.1)),
        ("masked_linear", (x, w, mu, None, "softplus", "sign", 0.1)),
        ("masked_linear_backward", (go, x, w, m, "softplus", "sign", 0.1, True, True, True, True)),
        ("masked_linear_backward", (go, x, w, mu, "softplus", "sign", 0.1, False, True, False, True)),
        ("aux_adam_step_", (a, e1, e2, gr, wt, 3, 1e-2, 0.9, 0.999, 1e-8, 0.1, 1e-3, "softplus", 0.1)),
        ("aux_adam_step_multi_", ([a, a2], [e1, f1], [e2, f2], [gr, None], [wt, None], [3, 1], [0.1, 0.2],
                                  1e-2, 0.9, 0.999, 1e-8, 1e-3, "sigmoid", 0.1)),
        ("apply_mask_checked", (w, m)),
        ("masked_linear_checked", (x, w, mu, b)),
        ("aux_adam_step_sr_", (a.bfloat16(), e1.bfloat16(), e2.bfloat16(), gr.bfloat16(), None, 3, 1e-2, 0.9, 0.999,
                               1e-8, 0.1, 1e-3, "softplus", 0.1, [1, 2, 3])),
    ]


@pytest.mark.parametrize("index", range(14))
def test_opcheck_autoprune_cpp_ops(ext, index):
    name, args = _opcheck_cases()[index]
    torch.library.opcheck(getattr(ext, name).default, args)


def test_schemas_match_autoprune_ops(ext):
    import autoprune_ext.ops  # noqa: F401  (registers torch.ops.autoprune)

    for name in ("apply_mask", "mask_backward", "masked_linear", "masked_linear_backward", "aux_adam_step_",
                 "aux_adam_step_multi_"):
        ours = str(getattr(ext, name).default._schema).split("::", 1)[1]
        theirs = str(getattr(torch.ops.autoprune, name).default._schema).split("::", 1)[1]
        assert ours == theirs


# ------------------------------------------------------------------------------------------------
# build / fallback logic (fresh interpreters, so this session's loaded library does not interfere)
# ------------------------------------------------------------------------------------------------
def _run(code: str, env_extra: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("AUTOPRUNE_BACKEND", None)
    # an empty JIT cache and no ahead-of-time module (make installs one): these tests are about the JIT path
    env.update({"AUTOPRUNE_EXT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT), "AUTOPRUNE_IGNORE_AOT": "1"})
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=str(tmp_path))


FALLBACK_CODE = """
import warnings, torch
warnings.simplefilter("always")
import autoprune_ext.ops
from autoprune_ext import backends, reference as ref, _build
w = torch.randn(6, 4); m = torch.randn(6, 4)
with warnings.catch_warnings(record=True) as caught:
    with backends.use("cpp"):
        a = torch.ops.autoprune.apply_mask(w, m, "softplus", "sign", 0.1)
        b = torch.ops.autoprune.apply_mask(w, m, "softplus", "sign", 0.1)
assert torch.equal(a, ref.apply_mask(w, m)) and torch.equal(b, a)
n = sum(str(c.message).startswith("autoprune_ext") for c in caught)
print("WARNINGS", n)
print("LOADED", _build.loaded())
print("STATUS", backends.status()["cpp"]["cpu"])
"""


def test_failed_build_falls_back_with_one_warning(tmp_path):
    """No usable compiler: an explicit use('cpp') warns once and runs the reference, never crashes."""
    fake = tmp_path / "bin"
    fake.mkdir()
    cxx = fake / "c++"
    cxx.write_text("#!/bin/sh\necho 'fake compiler: error' >&2\nexit 1\n")
    cxx.chmod(0o755)
    r = _run(FALLBACK_CODE, {"CXX": str(cxx), "AUTOPRUNE_NO_CUDA_EXT": "1"}, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WARNINGS 1" in r.stdout and "LOADED False" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "compiling failed" in r.stdout
    assert r.stderr.count("autoprune_ext: compiling the C++") == 1  # one notice line


def test_no_ext_switch_and_auto_selection_never_compiles(tmp_path):
    code = """
    import torch, autoprune_ext.ops
    from autoprune_ext import backends, _build
    w = torch.randn(6, 4); m = torch.randn(6, 4)
    print("AVAIL", backends.availability("cpp", "cpu"))
    torch.ops.autoprune.apply_mask(w, m, "softplus", "sign", 0.1)   # automatic selection
    print("LOADED", _build.loaded())
    """
    r = _run(code, {"AUTOPRUNE_NO_EXT": "1"}, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "AVAIL (False, 'disabled by AUTOPRUNE_NO_EXT=1')" in r.stdout
    r = _run(code, {}, tmp_path)  # empty cache: automatic selection must not compile
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LOADED False" in r.stdout and "compiling" not in r.stderr, r.stdout + r.stderr[-2000:]
    assert "not compiled yet" in r.stdout


def test_cached_build_is_found_without_compiling(ext, tmp_path):
    """A process whose cache holds the build loads it directly (auto-selection uses it)."""
    if not str(_build.origin()).startswith(str(_build.cache_root())):
        pytest.skip("the extension in use is not a JIT build of this cache")
    code = """
    import torch, autoprune_ext.ops
    from autoprune_ext import backends, _build
    ok, why = backends.availability("cpp", "cpu")
    print("AVAIL", ok, why)
    print("LOADED", _build.loaded())
    """
    env = {"AUTOPRUNE_EXT_CACHE": str(_build.cache_root())}
    r = _run(code, env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LOADED True" in r.stdout and "C++ CPU kernels" in r.stdout and "compiling" not in r.stderr
