"""Lean aux memory: stochastic rounding to bfloat16 and the bf16 aux optimiser option."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import autoprune_ext as ap
from autoprune_ext import _build, optim
from autoprune_ext.optim import AuxAdam, stochastic_round_bf16

#: memory="bf16_sr" runs the C++ step where the extension is loaded, else the PyTorch one
SR_PATHS = ("cpp", "python")


@pytest.fixture(params=SR_PATHS)
def sr_path(request, monkeypatch):
    if request.param == "cpp":
        from test_cpp_backend import ext  # noqa: F401
        if not _build.load(build=True):
            pytest.skip("the C++ extension is not available")
    else:
        monkeypatch.setattr(optim, "_sr_kernel", lambda: None)
    return request.param


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    x = torch.full((200_000,), 1.0 + 2**-10)  # between the bf16 neighbours 1 and 1 + 2^-7
    g = torch.Generator().manual_seed(0)
    r = stochastic_round_bf16(x, g).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert float(r.mean()) == pytest.approx(1.0 + 2**-10, abs=2e-5)
    neg = stochastic_round_bf16(-x, g).float()
    assert float(neg.mean()) == pytest.approx(-(1.0 + 2**-10), abs=2e-5)
    exact = torch.tensor([0.5, -2.0, float("inf"), 0.0])
    assert torch.equal(stochastic_round_bf16(exact, g).float(), exact)
    assert torch.isnan(stochastic_round_bf16(torch.tensor([float("nan")]), g)).all()


def small_update_model(aux_dtype: torch.dtype):
    layer = ap.convert(nn.Linear(64, 64), init=1.0, aux_dtype=aux_dtype)
    layer.weight_aux.grad = torch.full_like(layer.weight_aux, 1e-3)
    return layer


def test_bf16_aux_stalls_under_standard_and_moves_with_sr(sr_path):
    # lr 1e-4 per step is 1/80 of bf16's ulp at 1.0: rounded to nearest, every update is lost
    stalled = small_update_model(torch.bfloat16)
    opt = AuxAdam.from_model(stalled, lr=1e-4)
    with pytest.warns(UserWarning, match="bf16_sr"):
        for _ in range(50):
            opt.step()
    assert torch.all(stalled.weight_aux == 1.0)
    moving = small_update_model(torch.bfloat16)
    opt = AuxAdam.from_model(moving, lr=1e-4, memory="bf16_sr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(50):
            opt.step()
    mean = float(moving.weight_aux.detach().float().mean())
    assert mean == pytest.approx(1.0 - 50 * 1e-4, abs=1e-3)  # what an fp32 aux would reach
    assert opt.state[moving.weight_aux]["exp_avg"].dtype == torch.bfloat16


def test_bf16_sr_resumes_bit_identically(sr_path):
    def run(steps, opt_state=None, aux=None):
        torch.manual_seed(0)
        layer = small_update_model(torch.bfloat16)
        opt = AuxAdam.from_model(layer, lr=1e-3, memory="bf16_sr", penalty=0.5, sr_seed=7)
        if opt_state is not None:
            layer.weight_aux.data.copy_(aux)
            opt.load_state_dict(opt_state)
        for _ in range(steps):
            layer.weight_aux.grad = torch.full_like(layer.weight_aux, 1e-3)
            opt.step()
        return layer, opt

    full, _ = run(6)
    half, opt = run(3)
    resumed, _ = run(3, opt.state_dict(), half.weight_aux.detach().clone())
    assert torch.equal(full.weight_aux, resumed.weight_aux)


def test_bf16_sr_rejects_a_float32_aux():
    layer = ap.convert(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="memory"):
        AuxAdam.from_model(layer, memory="bf16_sr")
    with pytest.raises(ValueError, match="memory"):
        AuxAdam.from_model(layer, memory="fp8")


def test_trainer_with_bf16_sr():
    from torch.utils.data import TensorDataset

    from autoprune_ext.autoprune import AutoPrune

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 6, generator=g), torch.randint(0, 2, (64,), generator=g))
    trainer = AutoPrune(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)), aux_memory="bf16_sr",
                        batch_size=16, penalty=1.0)
    assert all(m.weight_aux.dtype == torch.bfloat16 for _, m in ap.masked_modules(trainer.model))
    trainer.fit(data, data, steps=3, progress=False)


def test_keyed_noise_is_the_hash_and_unbiased():
    keys = optim._sr_keys(12345)
    assert len(set(keys)) == 3 and all(0 <= k < 2**32 for k in keys)
    noise = optim._sr_noise(torch.Size([4, 5000]), keys[0], torch.device("cpu"))
    flat = noise.flatten().tolist()
    for k in (0, 1, 777, 19_999):  # the scalar hash, entry by entry
        assert flat[k] == optim._lowbias32(k ^ keys[0]) >> 16
    assert noise.min() >= 0 and noise.max() < 2**16
    assert float(noise.double().mean()) == pytest.approx(2**15, rel=0.02)
    x = torch.full((200_000,), 1.0 + 2**-10)
    r = optim._round_bf16_with(x, optim._sr_noise(x.shape, keys[2], x.device)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert float(r.mean()) == pytest.approx(1.0 + 2**-10, abs=2e-5)
    assert not torch.equal(noise, optim._sr_noise(noise.shape, keys[1], noise.device))


@pytest.mark.parametrize("surrogate", ["softplus", "sigmoid"])
@pytest.mark.parametrize("grad_dtype", [None, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_weight", [False, True])
def test_sr_kernel_matches_the_pytorch_step(monkeypatch, surrogate, grad_dtype, with_weight):
    """The C++ bf16_sr step draws the same noise as the PyTorch one: every entry equal or, where the
    last-bit float32 differences put the value on the other side of the noise, one bfloat16 step off."""
    from test_cpp_backend import ext  # noqa: F401
    if not _build.load(build=True):
        pytest.skip("the C++ extension is not available")
    torch.manual_seed(0)
    shape = (1000, 37)
    aux = (torch.randn(shape) * 0.3).bfloat16()
    e1 = (torch.randn(shape) * 1e-3).bfloat16()
    e2 = (torch.rand(shape) * 1e-5).bfloat16()
    grad = None if grad_dtype is None else (torch.randn(shape) * 1e-3).to(grad_dtype)
    weight = torch.randn(shape).bfloat16() if with_weight else None
    if grad is not None:
        grad.view(-1)[7] = float("nan")
    args = (grad, weight, 3, 1e-2, 0.9, 0.999, 1e-8, 1e-3, 1e-3, surrogate, 0.1)
    outs = []
    for path in SR_PATHS:
        a, m1, m2 = aux.clone(), e1.clone(), e2.clone()
        if path == "python":
            monkeypatch.setattr(optim, "_sr_kernel", lambda: None)
        optim._sr_adam_step_(a, m1, m2, *args, seed=optim._sr_seed(7, 3, 0, 0))
        outs.append((a, m1, m2))
    assert not torch.equal(outs[0][0], aux) and not torch.equal(outs[0][2], e2)  # it stepped
    for got, want in zip(outs[0], outs[1]):
        g, w = got.float(), want.float()
        assert torch.equal(torch.isnan(g), torch.isnan(w))
        ok = ~torch.isnan(w)
        diff = (g[ok] - w[ok]).abs()
        ulp = torch.maximum(g[ok].abs(), w[ok].abs()) * 2**-7
        assert bool((diff <= ulp).all()), float((diff / ulp.clamp_min(1e-30)).max())
        assert float((diff == 0).double().mean()) > 0.99


def test_sr_kernel_errors():
    from test_cpp_backend import ext  # noqa: F401
    if not _build.load(build=True):
        pytest.skip("the C++ extension is not available")
    op = torch.ops.autoprune_cpp.aux_adam_step_sr_
    a = torch.zeros(4, dtype=torch.bfloat16)
    hp = (1, 1e-2, 0.9, 0.999, 1e-8, 0.0, 1e-3, "softplus", 0.1)
    with pytest.raises(TypeError, match="aux: expected bfloat16"):
        op(a.float(), a.clone(), a.clone(), None, None, *hp, [1, 2, 3])
    with pytest.raises(ValueError, match="keys: expected 3 noise keys"):
        op(a, a.clone(), a.clone(), None, None, *hp, [1, 2])
    with pytest.raises(ValueError, match="keys: expected 32-bit unsigned"):
        op(a, a.clone(), a.clone(), None, None, *hp, [1, 2, 2**32])
