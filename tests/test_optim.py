"""AuxAdam: Adam semantics, penalty groups, inv_abs_weight, state round-trip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import autoprune_ext as ap
from autoprune_ext import reference as ref
from autoprune_ext.optim import AuxAdam


def model() -> nn.Module:
    return ap.convert(nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 4), nn.Linear(4, 2)))


def loss(m: nn.Module) -> torch.Tensor:
    torch.manual_seed(5)
    return m(torch.randn(8, 1, 6, 6)).square().mean()


@pytest.mark.parametrize("foreach", [True, False])
def test_without_penalty_equals_torch_adam(foreach):
    a, b = model(), None
    b = copy.deepcopy(a)
    opt_a = AuxAdam.from_model(a, lr=0.05, betas=(0.8, 0.9), eps=1e-7, foreach=foreach)
    opt_b = torch.optim.Adam([m.weight_aux for _, m in ap.masked_modules(b)], lr=0.05, betas=(0.8, 0.9), eps=1e-7)
    for _ in range(3):
        for mdl, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            loss(mdl).backward()
            opt.step()
    for (_, x), (_, y) in zip(ap.masked_modules(a), ap.masked_modules(b)):
        assert torch.allclose(x.weight_aux, y.weight_aux, atol=1e-6)


def test_penalty_groups_scale_by_group_size():
    m = model()
    opt = AuxAdam.from_model(m, lr=0.1, penalty={"linear": 0.4, "conv": 0.2, "3": 1.0}, rho=0.0)
    names = sorted(g["name"] for g in opt.param_groups)
    assert names == ["3", "conv", "linear"]
    # one step from zero moments moves every entry by ~lr in the direction of -(dL + dP)
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    opt.step()
    after = [p.detach() for g in opt.param_groups for p in g["params"]]
    for b, a in zip(before, after):
        assert torch.allclose(b - a, torch.full_like(a, 0.1), atol=1e-4)  # Adam's first step: lr * sign


def test_penalty_alone_prunes_and_rho_recovers():
    lin = ap.nn.MaskedLinear(10, 10)
    opt = AuxAdam.from_model(lin, lr=0.05, penalty=1.0, rho=0.0)
    for _ in range(30):
        lin.weight_aux.grad = torch.zeros_like(lin.weight_aux)
        opt.step()
    assert lin.kept() == 0
    assert opt.penalty_value() == pytest.approx(0.0)
    # with a large recovery weight the push reverses: pruned masks come back
    opt.param_groups[0]["rho"] = 5.0
    for _ in range(60):
        lin.weight_aux.grad = torch.zeros_like(lin.weight_aux)
        opt.step()
    assert lin.kept() == 100


def test_inv_abs_weight_prunes_small_weights_first():
    """Adam normalises each coordinate, so 1/|w| matters against the task gradient: with a uniform
    task gradient holding every mask up, only entries whose penalty push (~1/|w|) exceeds it fall."""
    lin = ap.nn.MaskedLinear(20, 20, init=(0.5, 0.0))
    with torch.no_grad():
        lin.weight.copy_(torch.linspace(0.01, 1.0, 400).reshape(20, 20))
    opt = AuxAdam.from_model(lin, lr=0.02, penalty=50.0, rho=0.0, inv_abs_weight=True)
    for _ in range(40):
        lin.weight_aux.grad = torch.full_like(lin.weight_aux, -0.24)  # holds masks up with force 0.24
        opt.step()
    kept = lin.mask()
    assert 100 < lin.kept() < 300
    assert lin.weight[kept].min() > lin.weight[~kept].max()
    with pytest.raises(ValueError, match="inv_abs_weight"):
        AuxAdam([lin.weight_aux], inv_abs_weight=True)


def test_params_without_grad_are_skipped_and_state_roundtrips():
    m = model()
    opt = AuxAdam.from_model(m, lr=0.01, penalty=0.1)
    loss(m).backward()
    frozen = m[3].weight_aux
    frozen.grad = None
    before = frozen.detach().clone()
    opt.step()
    assert torch.equal(frozen, before) and frozen not in opt.state
    sd = copy.deepcopy(opt.state_dict())
    assert all("weights" not in g for g in sd["param_groups"])
    m2 = copy.deepcopy(m)
    opt2 = AuxAdam.from_model(m2, lr=0.01, penalty=0.1)
    opt2.load_state_dict(sd)
    for o, mdl in ((opt, m), (opt2, m2)):
        o.zero_grad()
        loss(mdl).backward()
        o.step()
    for (_, x), (_, y) in zip(ap.masked_modules(m), ap.masked_modules(m2)):
        assert torch.equal(x.weight_aux, y.weight_aux)


def test_bad_arguments():
    lin = ap.nn.MaskedLinear(3, 3)
    with pytest.raises(ValueError, match="lr"):
        AuxAdam([lin.weight_aux], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        AuxAdam([lin.weight_aux], betas=(1.0, 0.5))
    with pytest.raises(ValueError, match="eps"):
        AuxAdam([lin.weight_aux], eps=-1.0)
    with pytest.raises(ValueError, match="penalty"):
        AuxAdam([lin.weight_aux], penalty=-0.1)
    with pytest.raises(ValueError, match="rho"):
        AuxAdam([lin.weight_aux], rho=-0.1)
    with pytest.raises(ValueError, match="surrogate"):
        AuxAdam([lin.weight_aux], surrogate="tanh")
    with pytest.raises(TypeError, match="penalty"):
        AuxAdam.from_model(lin, penalty="big")
    with pytest.raises(ValueError, match="masked layers"):
        AuxAdam.from_model(nn.Linear(2, 2))


def test_density_and_penalty_value_match_reference():
    m = model()
    with torch.no_grad():
        for _, layer in ap.masked_modules(m):
            layer.weight_aux.copy_(torch.randn_like(layer.weight_aux))
    opt = AuxAdam.from_model(m, penalty=0.3, rho=0.01)
    auxes = [layer.weight_aux for _, layer in ap.masked_modules(m)]
    assert opt.density() == pytest.approx(float(ref.density(auxes)))
    assert opt.penalty_value() == pytest.approx(float(ref.density_penalty(auxes, 0.3, 0.01)))
