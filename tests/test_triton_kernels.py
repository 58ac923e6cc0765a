"""Kernel-specific tests of the ``triton`` backend (:mod:`autoprune_ext.triton_kernels`).

The backend-generic checks (opcheck, gradcheck, the shared dtype/shape matrix) live in
``test_conformance.py``; this module covers what is specific to the Triton kernels: block and tile
boundaries, every dtype pair including fp16 aux, the unit-granularity reductions, the multi-tensor
launch (groups, chunks, per-tensor steps), scalar precision, softplus stability, and the mask-fused
matmul (no ``T`` buffer, partial-sum buffer, tails, every gradient subset).

Without a GPU the kernels run on CPU tensors through the Triton interpreter: ``TRITON_INTERPRET=1``
must be set before the kernels are defined, hence before any import below. Shapes are small, so the
module runs in well under a minute on one core.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import autoprune_ext  # noqa: E402,F401  (registers torch.ops.autoprune)
from autoprune_ext import backends  # noqa: E402
from autoprune_ext import reference as ref  # noqa: E402
from autoprune_ext.backends import triton as triton_backend  # noqa: E402
from autoprune_ext.triton_kernels import _common, adam, elementwise, masked_matmul  # noqa: E402

from tolerances import LOW, assert_matches  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SHAPES = ((1,), (17,), (129, 33), (5, 3, 3, 3), (0, 5), (3, 0))

_ok, _why = backends.availability("triton", DEVICE)
pytestmark = pytest.mark.skipif(not _ok, reason=f"triton backend unavailable on {DEVICE}: {_why}")


def rand(shape, dtype=torch.float32, *, scale: float = 1.0, noncontig: bool = False) -> torch.Tensor:
    if noncontig:
        assert len(shape) == 2
        return (torch.randn(shape[::-1], dtype=torch.float64) * scale).to(DEVICE, dtype).t()
    return (torch.randn(shape, dtype=torch.float64) * scale).to(DEVICE, dtype)


def make_aux(w: torch.Tensor, granularity: str, dtype: torch.dtype) -> torch.Tensor:
    shape = tuple(w.shape) if granularity == "weight" else tuple(w.shape[:1])
    aux = rand(shape, dtype)
    if aux.numel():
        aux.view(-1)[0] = 0.0  # h(0) = 1: the boundary must agree everywhere
    if aux.numel() > 1:
        aux.view(-1)[1] = -0.0  # h(-0) = 1 as well
    return aux


def d64(*ts):
    return [None if t is None else t.double() for t in ts]


# ------------------------------------------------------------------------------------------------
# registration and availability
# ------------------------------------------------------------------------------------------------
def test_backend_registered_and_available():
    backend = backends.get("triton")
    assert isinstance(backend, triton_backend.TritonBackend) and backend.name == "triton"
    assert "triton" in backends.available()
    ok, why = backend.availability(DEVICE)
    assert ok, why
    assert backend.availability("mps")[0] is False


def test_cpu_needs_interpreter(monkeypatch):
    backend = backends.get("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = backend.availability("cpu")
    assert not ok and "TRITON_INTERPRET=1" in why


def test_make_backend_without_triton(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(ImportError, match="triton is not installed"):
        triton_backend.make_backend()


@pytest.mark.skipif(not _common.INTERPRETED, reason="interpreter only")
def test_single_autotune_config_under_interpreter():
    assert len(masked_matmul._masked_mm_kernel.configs) == 1
    assert len(masked_matmul._masked_dt_kernel.configs) == 1


def test_split_scalars_roundtrip():
    for x in (0.1, 1e-3, 0.999, 1 - 0.999, 1e-8, 123456.789, -3.3e-20, 0.0):
        hi, lo = _common.split(x)
        assert _common._f32(hi) == hi and _common._f32(lo) == lo
        assert abs((hi + lo) - x) <= 1e-14 * abs(x)
    assert _common.split(1e300)[0] == float("inf")


# ------------------------------------------------------------------------------------------------
# apply_mask
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_apply_mask_all_dtypes(shape, granularity):
    for wdt, adt in itertools.product(FLOATS, FLOATS):
        w = rand(shape, wdt)
        m = make_aux(w, granularity, adt)
        out = elementwise.apply_mask(w, m)
        assert out.dtype == wdt and out.shape == w.shape and out.is_contiguous()
        assert torch.equal(out, ref.apply_mask(w, m)), (wdt, adt)


@pytest.mark.parametrize("n", [elementwise.BLOCK - 1, elementwise.BLOCK, elementwise.BLOCK + 1])
def test_apply_mask_block_boundaries(n):
    w, m = rand((n,)), rand((n,))
    with backends.use("triton"):
        out = torch.ops.autoprune.apply_mask(w, m, "softplus", "sign", 0.1)
    assert torch.equal(out, ref.apply_mask(w, m))


@pytest.mark.parametrize("shape", [(3, 2500), (2, 5, 300), (700, 1)])
def test_apply_mask_unit_row_loop(shape):
    """Rows longer than a row tile (column loop) and many one-element rows."""
    w = rand(shape, torch.bfloat16)
    m = rand(shape[:1])
    assert torch.equal(elementwise.apply_mask(w, m), ref.apply_mask(w, m))


def test_apply_mask_semantics_edge_values():
    """where(m >= 0, w, 0): -0.0 keeps, NaN/inf weights are dropped when pruned and kept otherwise,
    and a float64 aux below the float32 range still prunes (compared in float64)."""
    w = torch.tensor([float("nan"), float("inf"), 1.0, float("nan"), 2.0, 3.0], device=DEVICE)
    m = torch.tensor([-1.0, -1.0, -0.0, 0.0, -1e-300, 1e-300], dtype=torch.float64, device=DEVICE)
    out = elementwise.apply_mask(w, m)
    assert torch.equal(out.isnan(), ref.apply_mask(w, m).isnan())
    assert out[:3].tolist() == [0.0, 0.0, 1.0] and out[4:].tolist() == [0.0, 3.0]


def test_apply_mask_noncontiguous_through_op():
    w = rand((33, 129), torch.float16, noncontig=True)
    m = rand((33, 129), torch.bfloat16, noncontig=True)
    mu = rand((80,))[::2]  # strided unit aux
    wu = rand((40, 4), noncontig=True)
    with backends.use("triton"):
        assert torch.equal(torch.ops.autoprune.apply_mask(w, m, "softplus", "sign", 0.1), ref.apply_mask(w, m))
        assert torch.equal(torch.ops.autoprune.apply_mask(wu, mu, "relu", "chain", 0.1), ref.apply_mask(wu, mu))


# ------------------------------------------------------------------------------------------------
# mask_backward
# ------------------------------------------------------------------------------------------------
def _eager_dM(g, w, m, surrogate, rule, alpha, granularity):
    """dM computed naively in the tensors' own (promoted) precision: the low-precision yardstick."""
    c = torch.sign(w) if rule == "sign" else w
    gc = g * c
    if granularity == "unit":
        gc = gc.reshape(gc.shape[0], math.prod(gc.shape[1:])).sum(1)
    return (gc.to(m.dtype) * ref.surrogate(m, surrogate, alpha)).to(m.dtype)


def _check_backward(g, w, m, surrogate, rule, alpha, granularity, need_w=True, need_m=True, via_op=False):
    """Kernel (or op) against the float64 reference; dW must be exact."""
    if via_op:
        with backends.use("triton"):
            dW, dM = torch.ops.autoprune.mask_backward(g, w, m, surrogate, rule, alpha, need_w, need_m)
        dW = dW if need_w else None
        dM = dM if need_m else None
    else:
        dW, dM = elementwise.mask_backward(g, w, m, surrogate, rule, alpha, need_w, need_m)
    e_dW, e_dM = ref.mask_backward(*d64(g, w, m), surrogate, rule, alpha)
    if need_w:
        assert dW.dtype == w.dtype and dW.shape == w.shape
        assert torch.equal(dW, ref.mask_backward(g, w, m, surrogate, rule, alpha, True, False)[0])
    else:
        assert dW is None or dW.numel() == 0
    if need_m:
        assert dM.dtype == m.dtype and dM.shape == m.shape
        eager = _eager_dM(g, w, m, surrogate, rule, alpha, granularity) if m.dtype in LOW else None
        assert_matches(dM, e_dM, eager, what=f"dM {surrogate}/{rule}/{granularity}/{w.dtype}/{m.dtype}")
    else:
        assert dM is None or dM.numel() == 0


@pytest.mark.parametrize("surrogate", ref.SURROGATES)
@pytest.mark.parametrize("rule", ref.RULES)
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_mask_backward_every_surrogate_and_rule(surrogate, rule, granularity):
    w = rand((129, 33))
    m = make_aux(w, granularity, torch.float32)
    g = rand((129, 33))
    _check_backward(g, w, m, surrogate, rule, 0.3, granularity)
    # float64 end to end (what gradcheck through backends.use("triton") needs)
    _check_backward(*d64(g, w, m), surrogate, rule, 0.3, granularity, via_op=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_mask_backward_all_dtypes(shape, granularity):
    for wdt, adt in itertools.product(FLOATS, FLOATS):
        w = rand(shape, wdt)
        m = make_aux(w, granularity, adt)
        g = rand(shape, wdt)
        _check_backward(g, w, m, "softplus", "sign", 0.1, granularity)


@pytest.mark.parametrize("granularity", ["weight", "unit"])
@pytest.mark.parametrize("need_w,need_m", [(True, False), (False, True), (False, False)])
def test_mask_backward_only_requested(granularity, need_w, need_m):
    w = rand((17, 9))
    m = make_aux(w, granularity, torch.bfloat16)
    _check_backward(rand((17, 9)), w, m, "sigmoid", "chain", 0.1, granularity, need_w, need_m)
    _check_backward(rand((17, 9)), w, m, "leaky_relu", "sign", 0.1, granularity, need_w, need_m, via_op=True)


@pytest.mark.parametrize("shape", [(3, 2500), (700, 1), (2, 5, 300)])
def test_mask_backward_unit_row_reduction(shape):
    """Per-row reduction over more columns than one row tile, and rows of one element."""
    w, g = rand(shape), rand(shape)
    _check_backward(g, w, rand(shape[:1]), "softplus", "sign", 0.1, "unit")
    _check_backward(g.bfloat16(), w.bfloat16(), rand(shape[:1], torch.bfloat16), "identity", "chain", 0.1, "unit")


@pytest.mark.parametrize("n", [elementwise.BLOCK - 1, elementwise.BLOCK + 1])
def test_mask_backward_block_boundaries(n):
    _check_backward(rand((n,)), rand((n,)), rand((n,)), "softplus", "sign", 0.1, "weight", via_op=True)


def test_mask_backward_noncontiguous():
    w = rand((33, 129), noncontig=True)
    m = rand((33, 129), noncontig=True)
    g = rand((33, 129), noncontig=True)
    _check_backward(g, w, m, "softplus", "sign", 0.1, "weight", via_op=True)
    mu = rand((66,))[::2]
    _check_backward(g, w, mu, "sigmoid", "sign", 0.1, "unit", via_op=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softplus_and_sigmoid_stable_for_large_values(dtype):
    """No overflow for large |m|, full relative precision in the tails."""
    m = torch.cat([torch.linspace(-200, 200, 61, dtype=torch.float64), torch.tensor([-1e4, -30.0, 25.0, 1e4])])
    m = m.to(DEVICE, dtype)
    ones = torch.ones_like(m)
    for surrogate in ("softplus", "sigmoid"):
        _, dM = elementwise.mask_backward(ones, ones, m, surrogate, "chain", 0.1, False, True)
        expected = ref.surrogate(m.double(), surrogate)
        assert torch.isfinite(dM).all()
        tiny = torch.finfo(dtype).tiny
        sel = expected.abs() > tiny * 1e3  # representable with full precision in dtype
        rel = ((dM.double() - expected).abs() / expected.abs())[sel].max().item()
        assert rel < (1e-6 if dtype == torch.float32 else 1e-14), (surrogate, rel)


# ------------------------------------------------------------------------------------------------
# aux_adam_step_
# ------------------------------------------------------------------------------------------------
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, penalty_scale=0.37, rho=1e-3)


def _adam_case(shape, adt, with_grad, with_weight, noncontig=False):
    aux = rand(shape, adt, noncontig=noncontig)
    mdt = torch.float64 if adt == torch.float64 else torch.float32
    m1 = rand(shape, mdt, scale=0.1, noncontig=noncontig)
    m2 = rand(shape, mdt, scale=0.1, noncontig=noncontig).abs()
    grad = rand(shape, adt) if with_grad else None
    weight = rand(shape, adt, scale=0.05) if with_weight else None
    if weight is not None and weight.numel() > 1:
        weight.view(-1)[1] = 0.0  # |w| < 1e-15: no penalty push
    return aux, m1, m2, grad, weight


def _adam_expected(case, step, surrogate, alpha, **hp):
    a, e1, e2, g, w = d64(*case)
    ref.aux_adam_step_(a, e1, e2, g, w, step=step, surrogate_name=surrogate, alpha=alpha, **hp)
    return a, e1, e2


def _compare_adam(case, expected):
    for name, got, exp in zip(("aux", "exp_avg", "exp_avg_sq"), case[:3], expected):
        eager = exp.to(got.dtype) if got.dtype in LOW else None
        assert_matches(got, exp, eager, what=name)


@pytest.mark.parametrize("adt", FLOATS)
@pytest.mark.parametrize("surrogate", ref.SURROGATES)
def test_aux_adam_step_dtypes_and_surrogates(adt, surrogate):
    for with_grad, with_weight in itertools.product([True, False], [True, False]):
        case = _adam_case((129, 7), adt, with_grad, with_weight)
        expected = _adam_expected(case, 3, surrogate, 0.3, **HP)
        adam.aux_adam_step_(*case, step=3, surrogate_name=surrogate, alpha=0.3, **HP)
        _compare_adam(case, expected)


@pytest.mark.parametrize("n", [1, adam.BLOCK - 1, adam.BLOCK + 1])
def test_aux_adam_step_block_boundaries_through_op(n):
    case = _adam_case((n,), torch.float32, True, True)
    expected = _adam_expected(case, 1, "softplus", 0.1, **HP)
    with backends.use("triton"):
        torch.ops.autoprune.aux_adam_step_(*case, 1, HP["lr"], HP["beta1"], HP["beta2"], HP["eps"],
                                           HP["penalty_scale"], HP["rho"], "softplus", 0.1)
    _compare_adam(case, expected)


def test_aux_adam_step_noncontiguous_in_place():
    case = _adam_case((33, 20), torch.float32, True, False, noncontig=True)
    assert not case[0].is_contiguous()
    ids = [t.data_ptr() for t in case[:3]]
    expected = _adam_expected(case, 5, "sigmoid", 0.1, **HP)
    adam.aux_adam_step_(*case, step=5, surrogate_name="sigmoid", alpha=0.1, **HP)
    assert [t.data_ptr() for t in case[:3]] == ids
    _compare_adam(case, expected)


def test_aux_adam_step_empty():
    case = _adam_case((0, 3), torch.float32, True, True)
    adam.aux_adam_step_(*case, step=1, **HP)


def test_aux_adam_step_many_steps_fp64_matches_reference():
    """Repeated steps in float64 (scalars passed as hi/lo pairs stay within 1e-12)."""
    case = _adam_case((50,), torch.float64, True, True)
    exp = list(d64(*case))
    for step in range(1, 6):
        ref.aux_adam_step_(*exp, step=step, surrogate_name="softplus", alpha=0.1, **HP)
        adam.aux_adam_step_(*case, step=step, surrogate_name="softplus", alpha=0.1, **HP)
    _compare_adam(case, exp[:3])


# ------------------------------------------------------------------------------------------------
# aux_adam_step_multi_
# ------------------------------------------------------------------------------------------------
def _multi_cases():
    specs = [  # (shape, aux dtype, grad, weight, noncontig)
        ((1,), torch.float32, True, True, False),
        ((129, 33), torch.float32, True, False, False),
        ((7,), torch.bfloat16, False, True, False),
        ((0,), torch.float32, True, True, False),
        ((5, 3, 3, 3), torch.float32, True, False, False),
        ((33, 40), torch.float32, True, False, True),
        ((3000,), torch.bfloat16, False, True, False),
        ((20,), torch.float64, True, True, False),
        ((9,), torch.float16, True, True, False),
    ]
    return [_adam_case(shape, adt, g, w, nc) for shape, adt, g, w, nc in specs]


def _run_multi(cases, steps, scales, via_op, **kw):
    hp = dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, rho=1e-2)
    expected = [_adam_expected(c, st, "sigmoid", 0.1, penalty_scale=sc, **hp) for c, st, sc in zip(cases, steps, scales)]
    lists = [list(x) for x in zip(*cases)]
    if via_op:
        with backends.use("triton"):
            torch.ops.autoprune.aux_adam_step_multi_(*lists, steps, scales, hp["lr"], hp["beta1"], hp["beta2"],
                                                     hp["eps"], hp["rho"], "sigmoid", 0.1)
    else:
        adam.aux_adam_step_multi_(*lists, steps, scales, surrogate_name="sigmoid", alpha=0.1, **hp, **kw)
    for c, e in zip(cases, expected):
        _compare_adam(c, e)


def test_aux_adam_step_multi_vs_reference_loop_through_op():
    cases = _multi_cases()
    _run_multi(cases, list(range(1, len(cases) + 1)), [0.1 * i for i in range(len(cases))], via_op=True)


def test_aux_adam_step_multi_small_chunks_and_cache():
    """Several chunks per tensor and several blocks per chunk; the cached chunk table is reused on
    the next step (same sizes) and the per-tensor scalars still change."""
    cases = _multi_cases()
    n = len(cases)
    _run_multi(cases, [1] * n, [0.3] * n, via_op=False, block=128, chunk_blocks=3)
    cached = len(adam._CHUNK_CACHE)
    _run_multi(cases, [2 + i for i in range(n)], [0.5 - 0.05 * i for i in range(n)], via_op=False,
               block=128, chunk_blocks=3)
    assert len(adam._CHUNK_CACHE) == cached


def test_aux_adam_step_multi_one_launch_per_dtype_group(monkeypatch):
    launches = []
    kernel = adam._adam_multi_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(adam, "_adam_multi_kernel", Spy())
    cases = [_adam_case((s,), torch.float32, True, False) for s in (5, 300, 7000, 1)]
    cases += [_adam_case((s,), torch.bfloat16, True, False) for s in (11, 13)]
    _run_multi(cases, [1] * 6, [0.2] * 6, via_op=False)
    assert len(launches) == 2


# ------------------------------------------------------------------------------------------------
# masked matmul
# ------------------------------------------------------------------------------------------------
LINEAR_SHAPES = [((2, 7, 33), (17, 33)), ((70, 64), (40, 64)), ((5, 70), (40, 70)), ((1, 1), (1, 1))]


def _eager_linear(x, w, m, b, g):
    """Forward and backward with the GEMMs in the inputs' precision (the low-precision yardstick)."""
    y = ref.masked_linear(x, w, m, b)
    return y, ref.masked_linear_backward(g, x, w, m)


@pytest.mark.parametrize("xshape,wshape", LINEAR_SHAPES)
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_masked_linear_fwd_bwd_vs_reference(xshape, wshape, granularity):
    for dtype, adt in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                       (torch.float16, torch.bfloat16), (torch.float64, torch.float64)]:
        x, w, b = rand(xshape, dtype), rand(wshape, dtype), rand(wshape[:1], dtype)
        m = make_aux(w, granularity, adt)
        y = masked_matmul.masked_linear(x, w, m, b)
        g = rand(tuple(y.shape), dtype)
        got = masked_matmul.masked_linear_backward(g, x, w, m, "softplus", "sign", 0.1)
        e_y = ref.masked_linear(*d64(x, w, m, b))
        exp = ref.masked_linear_backward(*d64(g, x, w, m), "softplus", "sign", 0.1)
        low = dtype in LOW
        ey, eb = _eager_linear(x, w, m, b, g) if low else (None, (None,) * 4)
        assert y.dtype == dtype and y.shape == (*xshape[:-1], wshape[0])
        assert_matches(y, e_y, ey, what=f"y {dtype}")
        for i, name in enumerate(("dX", "dW", "dM", "db")):
            assert got[i].dtype == (m.dtype if name == "dM" else dtype)
            assert_matches(got[i], exp[i], eb[i], what=f"{name} {dtype}/{adt}/{granularity}")


@pytest.mark.parametrize("granularity", ["weight", "unit"])
@pytest.mark.parametrize("surrogate,rule", [("sigmoid", "chain"), ("leaky_relu_reversed", "sign"), ("relu", "chain")])
def test_masked_linear_surrogates_rules(granularity, surrogate, rule):
    x, w = rand((9, 70)), rand((20, 70))
    m = make_aux(w, granularity, torch.float32)
    g = rand((9, 20))
    got = masked_matmul.masked_linear_backward(g, x, w, m, surrogate, rule, 0.25, False, True, True, False)
    exp = ref.masked_linear_backward(*d64(g, x, w, m), surrogate, rule, 0.25, False, True, True, False)
    assert got[0] is None and got[3] is None
    assert_matches(got[1], exp[1], what="dW")
    assert_matches(got[2], exp[2], what="dM")


@pytest.mark.parametrize("flags", list(itertools.product([True, False], repeat=4)))
def test_masked_linear_backward_only_requested_through_op(flags):
    x, w = rand((3, 9, 12)), rand((5, 12))
    m = make_aux(w, "unit" if flags[0] else "weight", torch.float32)
    g = rand((3, 9, 5))
    with backends.use("triton"):
        got = torch.ops.autoprune.masked_linear_backward(g, x, w, m, "softplus", "chain", 0.1, *flags)
    exp = ref.masked_linear_backward(*d64(g, x, w, m), "softplus", "chain", 0.1, *flags)
    for need, gt, ex in zip(flags, got, exp):
        if need:
            assert_matches(gt, ex)
        else:
            assert gt.numel() == 0


def test_masked_linear_never_materialises_T(monkeypatch):
    """Forward and backward go through the fused kernels: apply_mask / mask_backward are not used."""

    def boom(*args, **kwargs):
        raise AssertionError("T or dT materialised")

    monkeypatch.setattr(elementwise, "apply_mask", boom)
    monkeypatch.setattr(elementwise, "mask_backward", boom)
    monkeypatch.setattr(ref, "apply_mask", boom)
    x = rand((4, 6, 33)).requires_grad_()
    w = rand((17, 33)).requires_grad_()
    m = rand((17, 33)).requires_grad_()
    b = rand((17,)).requires_grad_()
    with backends.use("triton"):
        y = torch.ops.autoprune.masked_linear(x, w, m, b, "softplus", "sign", 0.1)
        y.sum().backward()
    assert x.grad is not None and w.grad is not None and m.grad is not None and b.grad is not None


def test_masked_linear_autograd_matches_reference():
    x = rand((2, 7, 33), noncontig=False).requires_grad_()
    w = rand((17, 33)).requires_grad_()
    m = rand((17,)).requires_grad_()
    b = rand((17,)).requires_grad_()
    with backends.use("triton"):
        y = torch.ops.autoprune.masked_linear(x, w, m, b, "sigmoid", "sign", 0.1)
        g = rand(tuple(y.shape))
        y.backward(g)
    exp = ref.masked_linear_backward(*d64(g, x.detach(), w.detach(), m.detach()), "sigmoid", "sign", 0.1)
    assert_matches(y.detach(), ref.masked_linear(*d64(x.detach(), w.detach(), m.detach(), b.detach())))
    for got, e in zip((x.grad, w.grad, m.grad, b.grad), exp):
        assert_matches(got, e)


def test_masked_linear_noncontiguous():
    x = rand((9, 40), noncontig=True)
    w = rand((20, 40), noncontig=True)
    m = rand((20, 40), noncontig=True)
    g = rand((9, 20), noncontig=True)
    assert_matches(masked_matmul.masked_linear(x, w, m, None), ref.masked_linear(*d64(x, w, m)))
    got = masked_matmul.masked_linear_backward(g, x, w, m)
    exp = ref.masked_linear_backward(*d64(g, x, w, m))
    for a, e in zip(got, exp):
        assert_matches(a, e)


@pytest.mark.parametrize("xshape,wshape", [((0, 4), (3, 4)), ((2, 0, 4), (3, 4)), ((5, 4), (0, 4)), ((5, 0), (3, 0))])
def test_masked_linear_empty(xshape, wshape):
    """Degenerate shapes (no tokens, no outputs, no inputs) give the right shapes and values."""
    x, w = rand(xshape), rand(wshape)
    for granularity in ("weight", "unit"):
        m = make_aux(w, granularity, torch.float32)
        b = rand(wshape[:1])
        with backends.use("triton"):
            y = torch.ops.autoprune.masked_linear(x, w, m, b, "softplus", "sign", 0.1)
            g = rand(tuple(y.shape))
            dX, dW, dM, db = torch.ops.autoprune.masked_linear_backward(
                g, x, w, m, "softplus", "sign", 0.1, True, True, True, True
            )
        T = ref.apply_mask(w, m)
        x2 = x.reshape(math.prod(xshape[:-1]), wshape[1])
        g2 = g.reshape(x2.shape[0], wshape[0])
        assert torch.allclose(y, torch.nn.functional.linear(x, T, b))
        assert dX.shape == x.shape and torch.allclose(dX, (g2 @ T).reshape(x.shape))
        e_dW, e_dM = ref.mask_backward(g2.t() @ x2, w, m)
        assert torch.allclose(dW, e_dW) and torch.allclose(dM, e_dM)
        assert torch.allclose(db, g2.sum(0))


def test_masked_linear_unit_partial_buffer_many_k_tiles():
    """Unit dM summed over several K tiles (partial-sum buffer columns) with a K tail."""
    x, w = rand((37, 150)), rand((23, 150))
    m = make_aux(w, "unit", torch.float32)
    g = rand((37, 23))
    dW, dM = masked_matmul.masked_dt_epilogue(g, x, w, m, "softplus", "sign", 0.1, True, True)
    g64, x64, w64, m64 = d64(g, x, w, m)
    e_dW, e_dM = ref.mask_backward(g64.t() @ x64, w64, m64, "softplus", "sign", 0.1)
    assert_matches(dW, e_dW, what="dW")
    assert_matches(dM, e_dM, what="dM")


# ------------------------------------------------------------------------------------------------
# GPU compilation without a GPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kernels_compile_for_hopper_without_gpu(tmp_path):
    """The real compiler pipeline (TTIR -> PTX -> ptxas) accepts every kernel family for sm_90: the
    interpreter alone does not catch GPU compile errors. Runs in a subprocess without TRITON_INTERPRET."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "autoprune_ext.triton_kernels.compile_check", "--arch", "90"],
        cwd=root, env=env, capture_output=True, text=True, timeout=1200,
    )
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
