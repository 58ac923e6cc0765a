"""Every backend against the reference: the same tests, parametrised over backend names.

A backend that cannot run here is skipped with its reason (``triton`` runs on CPU through
``TRITON_INTERPRET=1``, set by conftest; ``cpp`` builds its extension on first use). Tensors live
on CUDA when a GPU is present, else on CPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from autoprune_ext import backends
from autoprune_ext import reference as ref

from tolerances import LOW, assert_matches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
W_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
AUX_DTYPES = (torch.float32, torch.bfloat16)
# (1,), (7,), odd 2-D, conv-shaped, empty
SHAPES = ((1,), (7,), (129, 33), (5, 3, 3, 3), (0, 5))


@pytest.fixture(params=backends.NAMES)
def backend(request):
    name = request.param
    ok, why = backends.availability(name, DEVICE)
    if not ok:
        pytest.skip(f"backend {name} unavailable on {DEVICE}: {why}")
    with backends.use(name) as b:
        yield b


def rand(shape, dtype, *, noncontig: bool = False, scale: float = 1.0) -> torch.Tensor:
    """Random tensor; non-contiguous variants are the transpose of a contiguous buffer."""
    if noncontig and len(shape) == 2:
        return (torch.randn(shape[::-1], dtype=torch.float64) * scale).to(DEVICE, dtype).t()
    return (torch.randn(shape, dtype=torch.float64) * scale).to(DEVICE, dtype)


def make_aux(weight: torch.Tensor, granularity: str, dtype: torch.dtype) -> torch.Tensor:
    shape = weight.shape if granularity == "weight" else weight.shape[:1]
    aux = rand(shape, dtype)
    if aux.numel():
        aux.view(-1)[0] = 0.0  # h(0) = 1: the boundary must agree everywhere
    return aux


# ------------------------------------------------------------------------------------------------
# apply_mask: exact (T is W or 0)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("wdt,adt", list(itertools.product(W_DTYPES, AUX_DTYPES)))
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_apply_mask_exact(backend, shape, wdt, adt, granularity):
    w = rand(shape, wdt)
    m = make_aux(w, granularity, adt)
    out = torch.ops.autoprune.apply_mask(w, m, "softplus", "sign", 0.1)
    expected = ref.apply_mask(w, m)
    assert out.dtype == wdt and out.shape == w.shape and out.is_contiguous()
    assert torch.equal(out, expected)


def test_apply_mask_noncontiguous(backend):
    w = rand((33, 129), torch.float32, noncontig=True)
    m = rand((33, 129), torch.float32, noncontig=True)
    assert not w.is_contiguous()
    assert torch.equal(torch.ops.autoprune.apply_mask(w, m, "softplus", "sign", 0.1), ref.apply_mask(w, m))


# ------------------------------------------------------------------------------------------------
# mask_backward
# ------------------------------------------------------------------------------------------------
def _eager_dM(g, w, m, surrogate, rule, alpha, granularity):
    """The coarse aux gradient computed naively in the tensors' own precision."""
    c = torch.sign(w) if rule == "sign" else w
    gc = g * c
    if granularity == "unit":
        gc = gc.flatten(1).sum(1) if gc.dim() > 1 else gc
    return (gc * ref.surrogate(m, surrogate, alpha)).to(m.dtype)


def _check_mask_backward(w, m, g, surrogate, rule, alpha, granularity, need_w=True, need_m=True):
    dW, dM = torch.ops.autoprune.mask_backward(g, w, m, surrogate, rule, alpha, need_w, need_m)
    e_dW, e_dM = ref.mask_backward(g.double(), w.double(), m.double(), surrogate, rule, alpha)
    if need_w:
        assert dW.dtype == w.dtype
        # dW = g * h(M) is exact in any precision
        assert torch.equal(dW, (g * ref.indicator(ref.broadcast_aux(m, w)).to(g.dtype)).to(w.dtype))
    else:
        assert dW.numel() == 0
    if need_m:
        assert dM.dtype == m.dtype
        eager = _eager_dM(g, w, m, surrogate, rule, alpha, granularity) if m.dtype in LOW else None
        assert_matches(dM, e_dM, eager, what=f"dM {surrogate}/{rule}/{granularity}")
    else:
        assert dM.numel() == 0


@pytest.mark.parametrize("surrogate", ref.SURROGATES)
@pytest.mark.parametrize("rule", ref.RULES)
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_mask_backward_surrogates(backend, surrogate, rule, granularity):
    w = rand((129, 33), torch.float32)
    m = make_aux(w, granularity, torch.float32)
    g = rand((129, 33), torch.float32)
    _check_mask_backward(w, m, g, surrogate, rule, 0.2, granularity)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("wdt,adt", list(itertools.product(W_DTYPES, AUX_DTYPES)))
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_mask_backward_dtypes_shapes(backend, shape, wdt, adt, granularity):
    w = rand(shape, wdt)
    m = make_aux(w, granularity, adt)
    g = rand(shape, wdt)
    _check_mask_backward(w, m, g, "softplus", "sign", 0.1, granularity)


@pytest.mark.parametrize("need_w,need_m", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_mask_backward_only_requested(backend, need_w, need_m, granularity):
    w = rand((17, 9), torch.float32)
    m = make_aux(w, granularity, torch.float32)
    _check_mask_backward(w, m, rand((17, 9), torch.float32), "sigmoid", "chain", 0.1, granularity, need_w, need_m)


def test_mask_backward_noncontiguous(backend):
    w = rand((33, 129), torch.float32, noncontig=True)
    m = rand((33, 129), torch.float32, noncontig=True)
    g = rand((33, 129), torch.float32, noncontig=True)
    _check_mask_backward(w, m, g, "softplus", "sign", 0.1, "weight")


def test_softplus_surrogate_large_values(backend):
    """s(m) stays finite and accurate far from 0 (a naive log(1 + exp(m)) overflows)."""
    w = rand((64,), torch.float32)
    m = torch.linspace(-200, 200, 64, device=DEVICE)
    _check_mask_backward(w, m, rand((64,), torch.float32), "softplus", "sign", 0.1, "weight")


# ------------------------------------------------------------------------------------------------
# aux_adam_step_
# ------------------------------------------------------------------------------------------------
def _adam_case(shape, adt, with_grad, with_weight):
    aux = rand(shape, adt)
    mdt = torch.float64 if adt == torch.float64 else torch.float32
    m1 = rand(shape, mdt, scale=0.1)
    m2 = rand(shape, mdt, scale=0.1).abs()
    grad = rand(shape, adt) if with_grad else None
    weight = rand(shape, adt, scale=0.05) if with_weight else None
    if weight is not None and weight.numel() > 1:
        weight.view(-1)[1] = 0.0  # |w| < 1e-15: no penalty push
    return aux, m1, m2, grad, weight


ADAM_HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, penalty_scale=0.37, rho=1e-3)


def _run_adam_ref(aux, m1, m2, grad, weight, step, surrogate, alpha):
    # .clone(): .double() of a float64 tensor is the tensor itself, which the step would mutate
    a, e1, e2 = aux.double().clone(), m1.double().clone(), m2.double().clone()
    ref.aux_adam_step_(
        a, e1, e2, None if grad is None else grad.double(), None if weight is None else weight.double(),
        step=step, lr=ADAM_HP["lr"], beta1=ADAM_HP["beta1"], beta2=ADAM_HP["beta2"], eps=ADAM_HP["eps"],
        penalty_scale=ADAM_HP["penalty_scale"], rho=ADAM_HP["rho"], surrogate_name=surrogate, alpha=alpha,
    )
    return a, e1, e2


def _compare_adam(aux, m1, m2, expected, before):
    """The low-precision "eager" result: the float64 update rounded once to the tensor's dtype."""
    for name, got, exp in zip(("aux", "exp_avg", "exp_avg_sq"), (aux, m1, m2), expected):
        eager = exp.to(got.dtype) if got.dtype in LOW else None
        assert_matches(got, exp, eager, what=name)


@pytest.mark.parametrize("adt", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("surrogate", ["softplus", "sigmoid", "leaky_relu_reversed"])
def test_aux_adam_step(backend, adt, with_grad, with_weight, surrogate):
    aux, m1, m2, grad, weight = _adam_case((129, 7), adt, with_grad, with_weight)
    expected = _run_adam_ref(aux, m1, m2, grad, weight, 3, surrogate, 0.3)
    before = aux.clone()
    torch.ops.autoprune.aux_adam_step_(
        aux, m1, m2, grad, weight, 3, ADAM_HP["lr"], ADAM_HP["beta1"], ADAM_HP["beta2"], ADAM_HP["eps"],
        ADAM_HP["penalty_scale"], ADAM_HP["rho"], surrogate, 0.3,
    )
    _compare_adam(aux, m1, m2, expected, before)


@pytest.mark.parametrize("shape", [(1,), (0,), (17, 3, 3)])
def test_aux_adam_step_shapes(backend, shape):
    aux, m1, m2, grad, weight = _adam_case(shape, torch.float32, True, True)
    expected = _run_adam_ref(aux, m1, m2, grad, weight, 1, "softplus", 0.1)
    torch.ops.autoprune.aux_adam_step_(aux, m1, m2, grad, weight, 1, *list(ADAM_HP.values())[:4],
                                       ADAM_HP["penalty_scale"], ADAM_HP["rho"], "softplus", 0.1)
    _compare_adam(aux, m1, m2, expected, None)


def test_aux_adam_step_multi(backend):
    shapes = [(1,), (129, 33), (7,), (0,), (5, 3, 3, 3)]
    cases = [_adam_case(s, torch.float32, i % 2 == 0, i % 3 == 0) for i, s in enumerate(shapes)]
    steps = [1, 2, 3, 4, 5]
    scales = [0.1, 0.2, 0.0, 0.4, 0.5]
    expected = []
    for (aux, m1, m2, grad, weight), step, scale in zip(cases, steps, scales):
        a, e1, e2 = aux.double().clone(), m1.double().clone(), m2.double().clone()
        ref.aux_adam_step_(a, e1, e2, None if grad is None else grad.double(),
                           None if weight is None else weight.double(), step=step, lr=1e-2, beta1=0.8,
                           beta2=0.99, eps=1e-6, penalty_scale=scale, rho=1e-2, surrogate_name="sigmoid")
        expected.append((a, e1, e2))
    lists = [list(x) for x in zip(*cases)]
    torch.ops.autoprune.aux_adam_step_multi_(*lists, steps, scales, 1e-2, 0.8, 0.99, 1e-6, 1e-2, "sigmoid", 0.1)
    for (aux, m1, m2, _, _), exp in zip(cases, expected):
        _compare_adam(aux, m1, m2, exp, None)


# ------------------------------------------------------------------------------------------------
# masked_linear
# ------------------------------------------------------------------------------------------------
LINEAR_CASES = [((7, 33), (17, 33)), ((2, 3, 5), (1, 5)), ((0, 4), (3, 4)), ((1, 1), (1, 1)), ((4, 130), (66, 130)),
                ((3, 0), (2, 0)), ((5, 4), (0, 4))]


@pytest.mark.parametrize("xshape,wshape", LINEAR_CASES)
@pytest.mark.parametrize("dtype", W_DTYPES)
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_masked_linear(backend, xshape, wshape, dtype, granularity):
    x, w = rand(xshape, dtype), rand(wshape, dtype)
    m = make_aux(w, granularity, torch.float32)
    b = rand(wshape[:1], dtype)
    y = torch.ops.autoprune.masked_linear(x, w, m, b, "softplus", "sign", 0.1)
    e_y = ref.masked_linear(x.double(), w.double(), m.double(), b.double())
    eager = F.linear(x, ref.apply_mask(w, m), b) if dtype in LOW else None
    assert y.dtype == dtype
    assert_matches(y, e_y, eager, what="masked_linear forward")

    g = rand(tuple(y.shape), dtype)
    got = torch.ops.autoprune.masked_linear_backward(g, x, w, m, "softplus", "sign", 0.1, True, True, True, True)
    exp = ref.masked_linear_backward(g.double(), x.double(), w.double(), m.double())
    if dtype in LOW:
        eg = ref.masked_linear_backward(g, x, w, m)  # GEMMs in low precision: the eager error
    for i, name in enumerate(("dX", "dW", "dM", "db")):
        assert_matches(got[i], exp[i], eg[i] if dtype in LOW else None, what=f"masked_linear {name}")


@pytest.mark.parametrize("flags", [(True, False, False, False), (False, True, False, True), (False, False, True, False)])
def test_masked_linear_backward_only_requested(backend, flags):
    x, w = rand((9, 12), torch.float32), rand((5, 12), torch.float32)
    m = make_aux(w, "weight", torch.float32)
    g = rand((9, 5), torch.float32)
    got = torch.ops.autoprune.masked_linear_backward(g, x, w, m, "softplus", "chain", 0.1, *flags)
    exp = ref.masked_linear_backward(g.double(), x.double(), w.double(), m.double(), "softplus", "chain", 0.1, *flags)
    for need, gt, ex in zip(flags, got, exp):
        if need:
            assert_matches(gt, ex)
        else:
            assert gt.numel() == 0


def test_masked_linear_noncontiguous_input(backend):
    x = rand((9, 12), torch.float32, noncontig=True)
    w = rand((5, 12), torch.float32, noncontig=True)
    m = rand((5, 12), torch.float32, noncontig=True)
    assert not (x.is_contiguous() or w.is_contiguous() or m.is_contiguous())
    y = torch.ops.autoprune.masked_linear(x, w, m, None, "softplus", "sign", 0.1)
    assert_matches(y, ref.masked_linear(x.double(), w.double(), m.double()))


# ------------------------------------------------------------------------------------------------
# autograd (gradcheck in float64) and torch.library.opcheck
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_gradcheck_apply_mask_weight(backend, granularity):
    """dW = g * h(M) is the true gradient of W * h(M) with respect to W."""
    w = rand((6, 5), torch.float64).requires_grad_()
    m = make_aux(w.detach(), granularity, torch.float64)
    assert torch.autograd.gradcheck(lambda w: torch.ops.autoprune.apply_mask(w, m, "softplus", "sign", 0.1), (w,))


@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_gradcheck_masked_linear(backend, granularity):
    x = rand((2, 3, 5), torch.float64).requires_grad_()
    w = rand((4, 5), torch.float64).requires_grad_()
    b = rand((4,), torch.float64).requires_grad_()
    m = make_aux(w.detach(), granularity, torch.float64)

    def f(x, w, b):
        return torch.ops.autoprune.masked_linear(x, w, m, b, "softplus", "sign", 0.1)

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("surrogate", ref.SURROGATES)
@pytest.mark.parametrize("rule", ref.RULES)
def test_autograd_coarse_gradient_formula(backend, surrogate, rule):
    """Autograd through the op gives the coarse gradients, written out here independently of the
    reference module: dW = g h(M), dM = g c(W) s(M)."""
    w = rand((6, 5), torch.float64).requires_grad_()
    m = rand((6, 5), torch.float64).requires_grad_()
    g = rand((6, 5), torch.float64)
    torch.ops.autoprune.apply_mask(w, m, surrogate, rule, 0.25).backward(g)
    md = m.detach()
    s = {"softplus": torch.log1p(torch.exp(md)), "sigmoid": 1 / (1 + torch.exp(-md)),
         "identity": torch.ones_like(md), "leaky_relu": torch.where(md > 0, 1.0, 0.25),
         "leaky_relu_reversed": torch.where(md > 0, 0.25, 1.0), "relu": (md > 0).double()}[surrogate]
    c = torch.sign(w.detach()) if rule == "sign" else w.detach()
    assert torch.allclose(w.grad, g * (md >= 0).double(), rtol=0, atol=0)
    assert torch.allclose(m.grad, g * c * s, rtol=1e-12, atol=1e-12)


def _op_samples():
    w = rand((6, 5), torch.float64).requires_grad_()
    m = rand((6, 5), torch.float64).requires_grad_()
    mu = rand((6,), torch.float64).requires_grad_()
    x = rand((3, 5), torch.float64).requires_grad_()
    b = rand((6,), torch.float64).requires_grad_()
    g = rand((6, 5), torch.float64)
    gy = rand((3, 6), torch.float64)
    aux, m1, m2, grad, weight = _adam_case((6, 5), torch.float64, True, True)
    return {
        "apply_mask": [(w, m, "softplus", "sign", 0.1), (w, mu, "sigmoid", "chain", 0.1)],
        "mask_backward": [(g, w.detach(), m.detach(), "softplus", "sign", 0.1, True, True),
                          (g, w.detach(), mu.detach(), "relu", "chain", 0.1, False, True)],
        "masked_linear": [(x, w, m, b, "softplus", "sign", 0.1), (x, w, mu, None, "identity", "sign", 0.1)],
        "masked_linear_backward": [(gy, x.detach(), w.detach(), m.detach(), "softplus", "sign", 0.1,
                                    True, True, True, False)],
        "aux_adam_step_": [(aux, m1, m2, grad, weight, 2, 1e-2, 0.9, 0.999, 1e-8, 0.1, 1e-3, "softplus", 0.1)],
        "aux_adam_step_multi_": [([aux.clone()], [m1.clone()], [m2.clone()], [grad], [None], [3], [0.2],
                                  1e-2, 0.9, 0.999, 1e-8, 1e-3, "softplus", 0.1)],
    }


@pytest.mark.parametrize("op", ["apply_mask", "mask_backward", "masked_linear", "masked_linear_backward",
                                "aux_adam_step_", "aux_adam_step_multi_"])
def test_opcheck(backend, op):
    for args in _op_samples()[op]:
        torch.library.opcheck(getattr(torch.ops.autoprune, op).default, args)
