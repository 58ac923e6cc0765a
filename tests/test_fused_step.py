"""``AuxAdam.fused_step``: the aux Adam step taken inside the masked linear layer's backward.

The fused path must give bit for bit what ``backward()`` then ``step()`` give (the op
``autoprune_cpp::masked_linear_backward_adam_`` against ``masked_linear_backward`` +
``aux_adam_step_``, and the whole optimiser against its unfused self), fall back to the ordinary
step wherever it cannot fuse, never step an entry whose gradient is NaN/inf, and refuse what it
cannot do correctly (a second backward, skip mode, several processes).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import autoprune_ext as ap
from autoprune_ext import backends
from autoprune_ext.optim import AuxAdam

from test_cpp_backend import ext, rand  # noqa: F401  (the session fixture that builds the extension)

HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, penalty_scale=3e-3, rho=1e-3)


@pytest.fixture(autouse=True)
def _loaded(ext):  # noqa: F811
    yield
    assert ext.fused_aux_armed() == 0  # nothing stays armed after any test


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


# --------------------------------------------------------------------------------------------------
# the op
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", ["sign", "chain"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 129, 33), (0, 5, 3), (4, 1100, 33)])
@pytest.mark.parametrize("need", [(True, True, True), (False, True, False), (True, False, True), (False, False, False)])
def test_op_is_the_two_op_composition_bit_for_bit(ext, wdt, rule, shape, need):  # noqa: F811
    """dX, dW, db of masked_linear_backward and the aux_adam_step_ of its dM, on every CPU ISA."""
    tokens, out_f, in_f = shape
    need_x, need_w, need_b = need
    x = rand((tokens, in_f)).to(wdt)
    w = rand((out_f, in_f)).to(wdt)
    g = rand((tokens, out_f)).to(wdt)
    m0 = rand((out_f, in_f), scale=2.0)
    m0.view(-1)[::5] = 0.0
    m0.view(-1)[1::7] = -0.0
    e10, e20 = rand((out_f, in_f), scale=1e-2), rand((out_f, in_f), scale=1e-3).abs()
    isas, original = list(ext.cpu_isas()), ext.cpu_isa()
    try:
        for isa in isas:
            ext.set_cpu_isa(isa)
            m, e1, e2 = m0.clone(), e10.clone(), e20.clone()
            dX, dW, dM, db = ext.masked_linear_backward(g, x, w, m, "softplus", rule, 0.1, need_x, need_w, True, need_b)
            ext.aux_adam_step_(m, e1, e2, dM, None, 3, HP["lr"], HP["beta1"], HP["beta2"], HP["eps"],
                               HP["penalty_scale"], HP["rho"], "softplus", 0.1)
            fm, f1, f2 = m0.clone(), e10.clone(), e20.clone()
            fX, fW, fb, bad = ext.masked_linear_backward_adam_(
                g, x, w, fm, f1, f2, rule, need_x, need_w, need_b, 3, HP["lr"], HP["beta1"], HP["beta2"], HP["eps"],
                HP["penalty_scale"], HP["rho"])
            assert bad == 0
            for got, want in ((fm, m), (f1, e1), (f2, e2), (fX, dX), (fW, dW), (fb, db)):
                assert same_bits(got, want), isa
            if m.numel():
                assert not torch.equal(m, m0)  # it stepped
    finally:
        ext.set_cpu_isa(original)


def test_op_leaves_nonfinite_entries_unchanged(ext):  # noqa: F811
    x, w, g = rand((9, 40)), rand((30, 40)), rand((9, 30))
    g[3, 7] = float("nan")  # row 7 of dT (and so of dM) is NaN
    g[5, 11] = float("inf")
    m0, e10, e20 = rand((30, 40)), rand((30, 40), scale=1e-2), rand((30, 40), scale=1e-3).abs()
    m, e1, e2 = m0.clone(), e10.clone(), e20.clone()
    _, dW, _, bad = ext.masked_linear_backward_adam_(g, x, w, m, e1, e2, "sign", True, True, True, 1, *HP.values())
    assert bad == 80
    for a, a0 in ((m, m0), (e1, e10), (e2, e20)):
        assert torch.equal(a[[7, 11]], a0[[7, 11]])
        rest = [r for r in range(30) if r not in (7, 11)]
        assert not torch.equal(a[rest], a0[rest]) and torch.isfinite(a).all()
    g2 = g.clone()
    g2[3, 7] = g2[5, 11] = 0.0
    m_ref, r1, r2 = m0.clone(), e10.clone(), e20.clone()
    _, _, dM, _ = ext.masked_linear_backward(g2, x, w, m_ref, "softplus", "sign", 0.1, False, False, True, False)
    ext.aux_adam_step_(m_ref, r1, r2, dM, None, 1, *list(HP.values())[:4], HP["penalty_scale"], HP["rho"],
                       "softplus", 0.1)
    rest = [r for r in range(30) if r not in (7, 11)]
    assert torch.equal(m[rest], m_ref[rest]) and torch.equal(e2[rest], r2[rest])
    assert torch.isnan(dW[7]).any()  # dW is computed as usual


def test_op_errors(ext):  # noqa: F811
    x, w, g = rand((4, 6)), rand((5, 6)), rand((4, 5))
    m, e1, e2 = rand((5, 6)), rand((5, 6)), rand((5, 6)).abs()
    args = ("sign", True, True, True, 1, *HP.values())
    with pytest.raises(TypeError, match="aux: expected float32"):
        ext.masked_linear_backward_adam_(g, x, w, m.double(), e1, e2, *args)
    with pytest.raises(TypeError, match=r"aux: expected bfloat16 \(with sr_keys\)"):
        ext.masked_linear_backward_adam_(g, x, w, m, e1, e2, *args, [1, 2, 3])
    with pytest.raises(ValueError, match="sr_keys: expected none or 3"):
        ext.masked_linear_backward_adam_(g, x, w, m, e1, e2, *args, [1, 2])
    with pytest.raises(ValueError, match="exp_avg: expected a contiguous"):
        ext.masked_linear_backward_adam_(g, x, w, m, rand((6, 5)).t(), e2, *args)
    with pytest.raises(ValueError, match="aux, exp_avg: expected tensors that share no memory"):
        ext.masked_linear_backward_adam_(g, x, w, m, m, e2, *args)
    with pytest.raises(ValueError, match="weight granularity"):
        ext.masked_linear_backward_adam_(g, x, w, rand((5,)), rand((5,)), rand((5,)), *args)
    with pytest.raises(TypeError, match="input, grad_out: expected the dtype of weight"):
        ext.masked_linear_backward_adam_(g.double(), x, w, m, e1, e2, *args)
    with pytest.raises(ValueError, match="step: expected an integer >= 1"):
        ext.masked_linear_backward_adam_(g, x, w, m, e1, e2, "sign", True, True, True, 0, *HP.values())
    with pytest.raises(ValueError, match="input: expected last dimension 6"):
        ext.masked_linear_backward_adam_(g, rand((4, 7)), w, m, e1, e2, *args)
    with pytest.raises(ValueError, match="grad_out: expected 4 x 5 entries"):
        ext.masked_linear_backward_adam_(rand((3, 5)), x, w, m, e1, e2, *args)
    with pytest.raises(ValueError, match="aux: expected the parameter itself"):
        ext.fused_aux_arm(m, e1, e2, 1, *list(HP.values())[:4], 0.0, 1e-3)
    with pytest.raises(TypeError, match="aux: expected bfloat16"):
        ext.fused_aux_arm(m.requires_grad_(), e1, e2, 1, *list(HP.values())[:4], 0.0, 1e-3, [1, 2, 3])


# --------------------------------------------------------------------------------------------------
# the optimiser
# --------------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc1 = nn.Linear(48, 33)
        self.fc2 = nn.Linear(33, 7, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def run(model: nn.Module, opt: AuxAdam, w_opt: torch.optim.Optimizer, x: torch.Tensor, *, fused: bool,
        steps: int = 3, backend: str = "cpp") -> list[torch.Tensor]:
    """``steps`` training steps; returns the input gradients of each."""
    grads = []
    for k in range(steps):
        with backends.use(backend):
            loss_fn = lambda: model(x).square().mean() * (k + 1)  # noqa: E731
            if fused:
                with opt.fused_step():
                    loss_fn().backward()
            else:
                loss_fn().backward()
                opt.step()
        w_opt.step()
        grads.append(x.grad.clone())
        x.grad = None
        w_opt.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
    return grads


def twin_runs(dtype: torch.dtype, backend: str = "cpp", aux_dtype: torch.dtype | None = None,
              **opt_kw) -> tuple[dict, dict]:
    torch.manual_seed(0)
    base = ap.convert(Net().to(dtype), init=(0.3, 0.5), aux_dtype=aux_dtype)
    x = torch.randn(4, 2, 4, 4, dtype=dtype, requires_grad=True)
    out = {}
    for fused in (False, True):
        model = copy.deepcopy(base)
        opt = AuxAdam.from_model(model, lr=2e-2, penalty={"linear": 0.3, "conv": 0.1}, **opt_kw)
        opt.param_groups[0]["layer_scale"] = [0.5] + [1.0] * (len(opt.param_groups[0]["params"]) - 1)
        aux_ids = {id(m.weight_aux) for _, m in ap.masked_modules(model)}
        w_opt = torch.optim.Adam([p for p in model.parameters() if id(p) not in aux_ids], lr=1e-3)
        xs = x.detach().clone().requires_grad_()
        grads = run(model, opt, w_opt, xs, fused=fused, backend=backend)
        out[fused] = dict(model=model, opt=opt, grads=grads)
    return out[False], out[True]


@pytest.mark.parametrize("dtype, memory", [(torch.float32, "standard"), (torch.bfloat16, "standard"),
                                           (torch.bfloat16, "bf16_sr"), (torch.float32, "bf16_sr")])
def test_fused_step_is_backward_then_step_bit_for_bit(dtype, memory):
    """Linear layers fused, the convolution stepped at the block's exit: every tensor and count equal
    (bf16_sr: bfloat16 aux and moments, the same stochastic rounding noise)."""
    sr = memory == "bf16_sr"
    plain, fused = twin_runs(dtype, aux_dtype=torch.bfloat16 if sr else None, memory=memory, sr_seed=5)
    if sr:
        assert fused["model"].fc1.weight_aux.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(plain["model"].state_dict().items(), fused["model"].state_dict().items()):
        assert same_bits(a, b), name
    for ga, gb in zip(plain["grads"], fused["grads"]):
        assert same_bits(ga, gb)
    layers = zip(ap.masked_modules(plain["model"]), ap.masked_modules(fused["model"]))
    for (_, a), (_, b) in layers:
        p, q = plain["opt"].state[a.weight_aux], fused["opt"].state[b.weight_aux]
        assert int(p["step"]) == int(q["step"]) == 3
        assert same_bits(p["exp_avg"], q["exp_avg"]) and same_bits(p["exp_avg_sq"], q["exp_avg_sq"])
    sd_p, sd_f = plain["opt"].state_dict(), fused["opt"].state_dict()
    assert sd_p["param_groups"] == sd_f["param_groups"] and sd_p["state"].keys() == sd_f["state"].keys()
    for k, v in sd_p["state"].items():
        assert int(v["step"]) == int(sd_f["state"][k]["step"]) and same_bits(v["exp_avg"], sd_f["state"][k]["exp_avg"])


@pytest.mark.parametrize("memory", ["standard", "bf16_sr"])
def test_fused_step_really_fuses_the_linear_layers(memory):
    torch.manual_seed(0)
    model = ap.convert(Net(), aux_dtype=torch.bfloat16 if memory == "bf16_sr" else None)
    opt = AuxAdam.from_model(model, lr=1e-2, penalty=0.1, memory=memory)
    seen = {}
    for name in ("conv", "fc1", "fc2"):
        layer = getattr(model, name)
        layer.weight_aux.register_hook(lambda g, n=name: seen.setdefault(n, g))
    with backends.use("cpp"), opt.fused_step():
        model(torch.randn(2, 2, 4, 4)).sum().backward()
        assert model.fc1.weight_aux.grad is None and model.fc2.weight_aux.grad is None
        assert model.conv.weight_aux.grad is not None  # a convolution is not fused: stepped at exit
    # the fused layers' aux tensors get no gradient: their hooks see None
    assert seen["fc1"] is None and seen["fc2"] is None and isinstance(seen["conv"], torch.Tensor)
    assert all(int(s["step"]) == 1 for s in opt.state.values()) and len(opt.state) == 3


@pytest.mark.parametrize("case", ["reference", "relative", "inv_abs_weight", "create_graph", "has_grad", "compile"])
def test_fused_step_falls_back_to_the_ordinary_step(case):
    """Where the fused kernel does not apply, the block's exit takes the ordinary step: same result.
    (A compiled model runs the custom ops, not the C++ node.)"""
    kw = {"penalty_mode": "relative"} if case == "relative" else {}
    kw = {"inv_abs_weight": True} if case == "inv_abs_weight" else kw
    torch.manual_seed(0)
    base = ap.convert(nn.Linear(12, 5))
    x = torch.randn(3, 12)
    results = []
    for fused in (False, True):
        m = copy.deepcopy(base)
        opt = AuxAdam.from_model(m, lr=1e-2, penalty=0.2, **kw)
        with backends.use("reference" if case == "reference" else "cpp"):
            if case == "has_grad":  # a gradient already there: accumulated, then the ordinary step
                m(x).sum().backward()
            fwd = torch.compile(m, fullgraph=True, backend="aot_eager") if case == "compile" else m
            loss = fwd(x).square().sum()
            if fused:
                with opt.fused_step():
                    if case == "create_graph":
                        (g,) = torch.autograd.grad(loss, [m.weight_aux], create_graph=True)
                        m.weight_aux.grad = g.detach()
                    else:
                        loss.backward()
                    assert m.weight_aux.grad is not None  # not fused
            else:
                if case == "create_graph":
                    (g,) = torch.autograd.grad(loss, [m.weight_aux], create_graph=True)
                    m.weight_aux.grad = g.detach()
                else:
                    loss.backward()
                opt.step()
        results.append((m.weight_aux.detach().clone(), opt.state[m.weight_aux]["exp_avg_sq"].clone()))
    assert same_bits(results[0][0], results[1][0]) and same_bits(results[0][1], results[1][1])


def test_fused_step_nonfinite_gradient_raises_after_stepping_the_finite_entries():
    torch.manual_seed(0)
    m = ap.convert(nn.Linear(10, 6))
    opt = AuxAdam.from_model(m, lr=1e-2, penalty=0.1)
    before = m.weight_aux.detach().clone()
    x = torch.randn(4, 10)
    g = torch.randn(4, 6)
    g[2, 4] = float("nan")
    with backends.use("cpp"), pytest.raises(ValueError, match=r"NaN or inf in 10 entries of the gradient of "
                                                              r"param_groups\[0\]\['params'\]\[0\] \('weight_aux'\)"):
        with opt.fused_step():
            m(x).backward(g)
    after = m.weight_aux.detach()
    assert torch.equal(after[4], before[4]) and not torch.equal(after[:4], before[:4])
    assert torch.isfinite(after).all() and int(opt.state[m.weight_aux]["step"]) == 1


def test_fused_step_refuses_a_second_step_in_one_block():
    torch.manual_seed(0)
    m = ap.convert(nn.Linear(8, 8))
    opt = AuxAdam.from_model(m, lr=1e-2)
    x = torch.randn(3, 8)
    with backends.use("cpp"):
        # autograd's own version check meets the second backward first (the step bumped aux's
        # version); the optimiser's check stands behind it
        with pytest.raises((ValueError, RuntimeError), match="already taken|modified by an inplace operation"):
            with opt.fused_step():
                loss = m(x).sum()
                loss.backward(retain_graph=True)
                loss.backward()
        assert int(opt.state[m.weight_aux]["step"]) == 1  # the first backward's step is recorded


@pytest.mark.parametrize("case", ["twice", "loss_uses_aux", "shared_aux", "autograd_grad", "inputs_without_aux"])
def test_fused_step_does_not_fuse_a_gradient_with_other_sources(case):
    """Where aux's gradient also comes from elsewhere (or is not kept), the layer's dM alone is not the
    step's gradient: such aux tensors get their gradient as usual and the same step as step() gives."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    ap.convert(base)
    x = torch.randn(3, 8, requires_grad=True)
    results = []
    for fused in (False, True):
        model = copy.deepcopy(base)
        if case == "shared_aux":
            model[1].weight_aux = model[0].weight_aux
        opt = AuxAdam([model[0].weight_aux], lr=1e-2, penalty=0.1)
        a = model[0].weight_aux

        def run_backward():
            if case == "twice":
                model[0](model[0](x)).sum().backward()
            elif case == "loss_uses_aux":
                (model(x).sum() + 0.01 * a.square().sum()).backward()
            elif case == "autograd_grad":
                (ga,) = torch.autograd.grad(model(x).sum(), [a])
                a.grad = ga
            elif case == "inputs_without_aux":
                model(x).sum().backward(inputs=[x])
            else:
                model(x).sum().backward()

        with backends.use("cpp"):
            if fused:
                with opt.fused_step():
                    run_backward()
                    if case != "inputs_without_aux":
                        assert a.grad is not None  # not fused
            else:
                run_backward()
                if a.grad is not None:
                    opt.step()
        results.append((a.detach().clone(), int(opt.state[a]["step"]) if a in opt.state else 0))
    assert same_bits(results[0][0], results[1][0]) and results[0][1] == results[1][1]
    assert results[1][1] == (0 if case == "inputs_without_aux" else 1)


def test_fused_step_exception_in_the_block_disarms(ext):  # noqa: F811
    m = ap.convert(nn.Linear(8, 4))
    opt = AuxAdam.from_model(m, lr=1e-2)
    before = m.weight_aux.detach().clone()
    with pytest.raises(KeyError), opt.fused_step():
        assert ext.fused_aux_armed() == 1
        raise KeyError("boom")
    assert ext.fused_aux_armed() == 0 and not opt.state and torch.equal(m.weight_aux.detach(), before)
    with backends.use("cpp"), opt.fused_step():  # usable again
        m(torch.randn(2, 8)).sum().backward()
    assert int(opt.state[m.weight_aux]["step"]) == 1


def test_fused_step_refusals(monkeypatch):
    m = ap.convert(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="fused_step: needs nonfinite='raise'"):
        with AuxAdam.from_model(m, nonfinite="skip").fused_step():
            pass
    opt = AuxAdam.from_model(m)
    with pytest.raises(ValueError, match="already armed"):
        with opt.fused_step(), AuxAdam.from_model(m).fused_step():
            pass
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(RuntimeError, match="fused_step: single process only"):
        with opt.fused_step():
            pass


def test_fused_step_registry_survives_a_replaced_parameter_and_a_late_grad(ext):  # noqa: F811
    m = ap.convert(nn.Linear(8, 4))
    opt = AuxAdam.from_model(m, lr=1e-2)
    with opt.fused_step():
        m.weight_aux.data = m.weight_aux.data.clone()  # the armed alias still finds its entry
    assert ext.fused_aux_armed() == 0
    with backends.use("cpp"), pytest.raises(RuntimeError, match="was stepped in backward on its layer's gradient "
                                                              "and then got a .grad from elsewhere"):
        with opt.fused_step():
            m(torch.randn(2, 8)).sum().backward()
            m.weight_aux.grad = torch.zeros_like(m.weight_aux)
    assert int(opt.state[m.weight_aux]["step"]) == 1  # stepped once, not twice


def test_fused_step_nonfinite_steps_the_unfused_first_and_says_so():
    """A NaN that reaches a fused layer and a convolution: step() refuses the convolution's step and
    the message says the fused layers were stepped."""
    torch.manual_seed(0)
    model = ap.convert(Net())
    opt = AuxAdam.from_model(model, lr=1e-2, penalty=0.1)
    x = torch.randn(2, 2, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    with backends.use("cpp"), pytest.raises(ValueError, match="the 2 fused ones were stepped in backward"):
        with opt.fused_step():
            model(x).sum().backward()
    assert model.conv.weight_aux not in opt.state and int(opt.state[model.fc1.weight_aux]["step"]) == 1


@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16])
def test_op_bf16_sr_is_the_two_op_composition_and_keeps_nonfinite_entries(ext, wdt):  # noqa: F811
    """With sr_keys: bfloat16 aux and moments, dM rounded as the backward stores it, the same noise as
    aux_adam_step_sr_; rows whose dM is NaN keep their bits."""
    x, w, g = rand((9, 700)).to(wdt), rand((30, 700)).to(wdt), rand((9, 30)).to(wdt)
    g[4, 3] = float("nan")
    m0 = rand((30, 700), scale=0.5).bfloat16()
    e10, e20 = rand((30, 700), scale=1e-2).bfloat16(), rand((30, 700), scale=1e-3).abs().bfloat16()
    keys = [11, 2**32 - 1, 12345]
    m, e1, e2 = m0.clone(), e10.clone(), e20.clone()
    dX, dW, dM, db = ext.masked_linear_backward(g, x, w, m, "softplus", "sign", 0.1, True, True, True, True)
    ok = torch.isfinite(dM.float()).all(1)
    dM[~ok] = 0.0  # aux_adam_step_sr_ would take NaN; the fused op keeps those rows instead
    ext.aux_adam_step_sr_(m, e1, e2, dM, None, 2, *list(HP.values())[:4], HP["penalty_scale"], HP["rho"], "softplus",
                          0.1, keys)
    fm, f1, f2 = m0.clone(), e10.clone(), e20.clone()
    fX, fW, fb, bad = ext.masked_linear_backward_adam_(g, x, w, fm, f1, f2, "sign", True, True, True, 2, *HP.values(),
                                                       keys)
    assert bad == 700 and not bool(ok[3])
    for got, want, old in ((fm, m, m0), (f1, e1, e10), (f2, e2, e20)):
        assert same_bits(got[ok], want[ok]) and same_bits(got[~ok], old[~ok])
    for got, want in ((fX, dX), (fW, dW), (fb, db)):
        assert same_bits(got, want)


def test_fused_step_does_not_step_another_leaf_over_the_same_memory():
    """functional_call with a detached copy of weight_aux: the copy gets the gradient, the parameter
    must not be stepped (it is recognised by its gradient accumulator, not by its memory)."""
    torch.manual_seed(0)
    m = ap.convert(nn.Linear(8, 4))
    opt = AuxAdam.from_model(m, lr=1e-2, penalty=0.1)
    before = m.weight_aux.detach().clone()
    copy_ = m.weight_aux.detach().requires_grad_()
    with backends.use("cpp"), opt.fused_step():
        torch.func.functional_call(m, {"weight_aux": copy_}, (torch.randn(3, 8),)).sum().backward()
    assert copy_.grad is not None and torch.equal(m.weight_aux.detach(), before) and not opt.state


def test_fused_step_root_feeding_aux_raises_with_the_reason():
    """The documented blind spot: the root node itself feeds aux; the block says so."""
    torch.manual_seed(0)
    m = ap.convert(nn.Linear(8, 8))
    opt = AuxAdam.from_model(m, lr=1e-2)
    x = torch.randn(8, 8)
    with backends.use("cpp"), pytest.raises(RuntimeError, match="root node feeding it directly"):
        with opt.fused_step():
            torch.nn.functional.mse_loss(m(x), m.weight_aux).backward()


def test_fused_step_backward_on_another_thread_is_not_fused():
    """The arming thread's backwards only: one run on another thread gets its gradient as usual."""
    import threading

    torch.manual_seed(0)
    m = ap.convert(nn.Linear(8, 4))
    opt = AuxAdam.from_model(m, lr=1e-2)
    x = torch.randn(3, 8)
    seen = {}

    def work():
        with backends.use("cpp"):
            m(x).sum().backward()
        seen["grad"] = m.weight_aux.grad is not None

    with opt.fused_step():
        t = threading.Thread(target=work)
        t.start()
        t.join()
    assert seen["grad"] and int(opt.state[m.weight_aux]["step"]) == 1  # stepped once, at exit


@pytest.mark.parametrize("reentrant", [False, True])
def test_fused_step_under_activation_checkpointing(reentrant):
    """A checkpointed segment recomputes its forward inside backward; the fused step is still the
    unfused one, bit for bit."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    base = ap.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))
    x = torch.randn(5, 8, requires_grad=True)
    results = []
    for fused in (False, True):
        model = copy.deepcopy(base)
        opt = AuxAdam.from_model(model, lr=1e-2, penalty=0.1)
        with backends.use("cpp"):
            def run():
                checkpoint(model, x, use_reentrant=reentrant).square().sum().backward()
            if fused:
                with opt.fused_step():
                    run()
                    assert all(m.weight_aux.grad is None for _, m in ap.masked_modules(model))  # fused
            else:
                run()
                opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
        x.grad = None
    for a, b in zip(*results):
        assert same_bits(a, b)

