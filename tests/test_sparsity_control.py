"""Sparsity control for big models: size-independent penalty, per-layer targets, the layer floor."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import autoprune_ext as ap
from autoprune_ext.autoprune import AutoPrune
from autoprune_ext.optim import AuxAdam
from autoprune_ext.sparsity import FLOOR_MARGIN, density, enforce_floor, layer_counts


def penalty_per_task_grad(n_out: int, n_in: int, mode: str, lam: float = 0.1) -> float:
    """Mean penalty gradient per entry over rms(dL/dM), read from Adam's first moment (beta1 = 0)."""
    layer = ap.convert(nn.Linear(n_in, n_out, bias=False), init=0.5)
    g = torch.Generator().manual_seed(n_in)
    grad = torch.randn(layer.weight_aux.shape, generator=g) * 1e-3
    layer.weight_aux.grad = grad.clone()
    opt = AuxAdam.from_model(layer, lr=1e-6, betas=(0.0, 0.999), penalty=lam, penalty_mode=mode, rho=0.0)
    opt.step()
    penalty = opt.state[layer.weight_aux]["exp_avg"] - grad
    return float(penalty.mean() / grad.square().mean().sqrt())


def test_relative_penalty_is_size_independent_and_mean_is_not():
    small, large = (16, 64), (1000, 1000)  # 1e3 and 1e6 mask entries
    s = torch.nn.functional.softplus(torch.tensor(0.5)).item()  # s(m) at the init
    rel_small, rel_large = (penalty_per_task_grad(*shape, "relative") for shape in (small, large))
    assert rel_small == pytest.approx(0.1 * s, rel=1e-4) and rel_large == pytest.approx(0.1 * s, rel=1e-4)
    mean_small, mean_large = (penalty_per_task_grad(*shape, "mean") for shape in (small, large))
    assert mean_small / mean_large == pytest.approx(1e6 / 1024, rel=0.05)  # lambda / N: ~1000x weaker (rms noise)


def test_enforce_floor_revives_exactly_the_largest_entries():
    model = ap.convert(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in ap.masked_modules(model):
            m.weight_aux.copy_(-torch.rand(m.weight_aux.shape, generator=g) - 0.1)  # everything pruned
    before = model[0].weight_aux.detach().clone()
    revived = enforce_floor(model, min_density=0.1)
    assert revived == ["0", "2"]
    need = math.ceil(0.1 * 80)
    kept = model[0].weight_aux >= 0
    assert int(kept.sum()) == need
    top = before.flatten().topk(need).indices
    assert kept.flatten()[top].all()
    assert torch.all(model[0].weight_aux[kept] == FLOOR_MARGIN)
    assert torch.equal(model[0].weight_aux[~kept], before[~kept])  # nothing else moved
    assert [c.kept for c in layer_counts(model)] == [need, math.ceil(0.1 * 24)]


def test_keep_rows_keeps_one_entry_per_output_row():
    layer = ap.convert(nn.Linear(6, 5))
    with torch.no_grad():
        layer.weight_aux.fill_(-1.0)
        layer.weight_aux[2, 3] = 0.5
        layer.weight_aux[4, 1] = -0.2  # row 4's best entry
    enforce_floor(layer, min_density=0.0, keep_rows=True)
    assert bool((layer.weight_aux >= 0).any(dim=1).all())
    assert layer.weight_aux[4, 1] == FLOOR_MARGIN and layer.weight_aux[2, 3] == 0.5
    assert int((layer.weight_aux >= 0).sum()) == 5


def blobs(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randn(n, 12, generator=gen)
    x[torch.arange(n), y] += 2.0
    return TensorDataset(x, y)


def test_trainer_floor_stops_layer_collapse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    # a penalty this large drives an unprotected layer to density 0 within the run
    trainer = AutoPrune(model, penalty=500.0, lr_aux=0.2, batch_size=32, min_density=0.05, keep_rows=True)
    trainer.fit(blobs(256, 0), blobs(64, 1), steps=40, progress=False)
    for name, d in trainer.layer_densities().items():
        n = dict(ap.masked_modules(trainer.model))[name].weight_aux.numel()
        assert d * n >= math.ceil(0.05 * n) - 1e-9, name
    for _, m in ap.masked_modules(trainer.model):
        assert bool(m.mask().any(dim=1).all())
    unprotected = AutoPrune(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)), penalty=500.0,
                            lr_aux=0.2, batch_size=32, min_density=0.0)
    unprotected.fit(blobs(256, 0), blobs(64, 1), steps=40, progress=False)
    assert min(unprotected.layer_densities().values()) == 0.0  # the floor is what prevented collapse


def test_per_layer_target_gets_its_own_group_and_controller():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    trainer = AutoPrune(model, penalty=0.5, lr_aux=0.05, batch_size=32, layer_target_density={"2": 0.5})
    names = [g["name"] for g in trainer.aux_optimizer.param_groups]
    assert "2" in names and len(names) == 2
    start = {g["name"]: g["penalty"] for g in trainer.aux_optimizer.param_groups}
    trainer.fit(blobs(128, 0), blobs(64, 1), steps=5, progress=False)
    lam = {g["name"]: g["penalty"] for g in trainer.aux_optimizer.param_groups}
    assert lam["2"] > start["2"]  # density 1 > target 0.5: the controller raised this layer's lambda
    others = [n for n in names if n != "2"]
    assert all(lam[n] == start[n] for n in others)  # no global target: the other lambdas are fixed
    with pytest.raises(ValueError, match="layer_target_density"):
        AutoPrune(nn.Sequential(nn.Linear(3, 2)), layer_target_density={"nope*": 0.5})


def test_density_counts_every_layer():
    model = ap.convert(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), init=1.0)
    with torch.no_grad():
        model[0].weight_aux[0].fill_(-1.0)
    assert density(model) == pytest.approx((12 - 4 + 6) / 18)


def test_below_target_the_penalty_is_off_and_density_recovers():
    """Below the target the penalty is off, so the lambda the controller built up on the way down
    stops pruning and the masks grow back towards the target (Adam's momentum still carries M past
    the target first: an undershoot remains, see the README)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3))
    trainer = AutoPrune(model, penalty=5.0, lr_aux=0.05, batch_size=32, target_density=0.5, controller_gain=0.2)
    history = trainer.fit(blobs(256, 0), blobs(64, 1), steps=150, progress=False)
    lowest = min(r["density"] for r in history)
    assert lowest < 0.5 and history[-1]["density"] > lowest + 0.1
    if history[-1]["density"] < 0.5:
        assert all(v == 0.0 for g in trainer.aux_optimizer.param_groups for v in g["layer_scale"])
