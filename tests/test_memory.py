"""Lean aux memory: stochastic rounding to bfloat16 and the bf16 aux optimiser option."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import autoprune_ext as ap
from autoprune_ext.optim import AuxAdam, stochastic_round_bf16


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


def test_bf16_aux_stalls_under_standard_and_moves_with_sr():
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


def test_bf16_sr_resumes_bit_identically():
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
