"""Evaluation beyond test accuracy: metrics against hand-made numbers, the noise probe, the
prune-retrain loop (cascade vs one-shot, mask enforced, geometric schedule), AutoPrune and global
magnitude as pruners, and the ``potential`` command (smoke run and bad arguments)."""

from __future__ import annotations

import copy
import json
import math
import sys
import types

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from autoprune_ext.cli import main
from autoprune_ext.convert import masked_modules
from autoprune_ext.evaluation import (
    NoiseProbe,
    RetrainConfig,
    excess_error,
    fit_zero_intercept,
    geometric_ratios,
    noise_levels,
    noise_prune_potential,
    prepare,
    prune_potential,
    prune_potential_from_accuracy,
    prune_retrain,
    retrain,
)
from autoprune_ext.evaluation.study import potential_table
from autoprune_ext.pruners import autoprune_pruner
from autoprune_ext.pruners.autoprune_pruner import AutoPrunePruner, GlobalMagnitudePruner, keep_top
from autoprune_ext.pruners.base import Pruner, keep_ratio, set_mask


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: much faster than oversubscribing a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 160), nn.ReLU(), nn.Linear(160, 3))  # 1603 parameters


def tiny_data(n: int = 96, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


# ---------------------------------------------------------------------------------------------------
# metrics against hand-made curves
# ---------------------------------------------------------------------------------------------------
def test_prune_potential_hand_made_curve():
    ratios = [0.2, 0.4, 0.6, 0.8]
    errors = [0.050, 0.058, 0.052, 0.070]  # 0.4 fails by 0.8 points, 0.6 passes again
    # delta 0.5%: threshold 0.055 -> 0.2 and 0.6 pass; the failing 0.4 does not disqualify 0.6
    assert prune_potential(ratios, errors, parent_error=0.050, delta=0.005) == 0.6
    # delta 0: threshold 0.050 -> only 0.2
    assert prune_potential(ratios, errors, parent_error=0.050, delta=0.0) == 0.2
    # a worse parent: 0.8 passes at 0.066 + 0.005 = 0.071
    assert prune_potential(ratios, errors, parent_error=0.066, delta=0.005) == 0.8
    # nothing passes: 0
    assert prune_potential(ratios, errors, parent_error=0.030, delta=0.005) == 0.0
    # exactly on the threshold passes (error counted from the same images)
    assert prune_potential([0.5], [0.055], parent_error=0.050, delta=0.005) == 0.5
    # the same through accuracies
    assert prune_potential_from_accuracy(ratios, [1 - e for e in errors], 0.95, 0.005) == 0.6
    with pytest.raises(ValueError):
        prune_potential([0.1, 0.2], [0.1], 0.1)


def test_noise_prune_potential_per_level():
    ratios = [0.5, 0.9]
    acc = [[0.95, 0.90, 0.50], [0.96, 0.80, 0.40]]  # [ratio][level]
    parent = [0.95, 0.92, 0.60]
    # level 0: both pass (0.95 >= 0.945, 0.96) -> 0.9; level 1: 0.90 < 0.915, 0.80 -> none -> 0;
    # level 2: both far below -> 0
    assert noise_prune_potential(ratios, acc, parent, 0.005) == [0.9, 0.0, 0.0]


def test_excess_error_hand_made():
    # pruned: nominal 4%, shifted 10% and 20% (mean 15%): loses 11 points; parent: 3% -> 8%, 10% (mean 9%):
    # loses 6 points; excess = 11 - 6 = 5 points
    value = excess_error(0.04, [0.10, 0.20], 0.03, [0.08, 0.10])
    assert value == pytest.approx(0.05, abs=1e-12)
    assert excess_error(0.04, 0.15, 0.03, 0.09) == pytest.approx(0.05, abs=1e-12)
    assert excess_error(0.03, [0.08, 0.10], 0.03, [0.08, 0.10]) == 0.0  # the parent itself: no excess


def test_zero_intercept_fit_hand_made():
    # sum(xy) = 0.2*0.01 + 0.4*0.03 + 0.8*0.05 = 0.054; sum(x^2) = 0.04 + 0.16 + 0.64 = 0.84
    fit = fit_zero_intercept([0.2, 0.4, 0.8], [0.01, 0.03, 0.05])
    assert fit["slope"] == pytest.approx(0.054 / 0.84, rel=1e-12)
    exact = fit_zero_intercept([0.1, 0.5, 0.9], [0.02, 0.10, 0.18])
    assert exact["slope"] == pytest.approx(0.2) and exact["r2"] == pytest.approx(1.0)
    # no intercept: a constant offset is not absorbed
    assert fit_zero_intercept([1.0, 2.0], [1.0, 1.0])["slope"] == pytest.approx(3.0 / 5.0)
    with pytest.raises(ValueError):
        fit_zero_intercept([0.0, 0.0], [1.0, 2.0])


def test_noise_levels_are_the_papers():
    eps = noise_levels()
    assert len(eps) == 15 and eps[0] == 0.0 and eps[-1] == pytest.approx(0.7)
    assert all(b - a == pytest.approx(0.05) for a, b in zip(eps, eps[1:]))


# ---------------------------------------------------------------------------------------------------
# noise probe
# ---------------------------------------------------------------------------------------------------
def test_noise_identical_nets_agree_and_have_zero_distance():
    net = tiny_net()
    data = tiny_data(40)
    probe = NoiseProbe(net, *data.tensors, eps=[0.0, 0.3, 0.7], draws=3, seed=5, chunk=16)
    for twin in (net, copy.deepcopy(net)):  # a copy gets the same noisy inputs as the parent did
        res = probe.evaluate(twin)
        assert res["agreement"] == [1.0, 1.0, 1.0]
        for key in ("softmax_l2", "softmax_linf", "logit_l2", "logit_linf"):
            assert res[key] == [0.0, 0.0, 0.0], key
        assert res["accuracy"] == pytest.approx(probe.parent_accuracy)


def test_noise_is_uniform_fixed_and_fed_identically():
    net = tiny_net()
    x, y = tiny_data(20).tensors
    probe = NoiseProbe(net, x, y, eps=[0.0, 0.25], draws=4, seed=1, chunk=8)
    first = [b for b, _ in probe.noisy_batches(1)]
    second = [b for b, _ in probe.noisy_batches(1)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # the same inputs on every call
    noisy = torch.cat(first).reshape(len(x), 4, 6)
    diff = noisy - x.unsqueeze(1)
    assert diff.abs().max() <= 0.25 + 1e-6 and diff.abs().max() > 0.2  # U[-eps, eps]
    assert diff.mean().abs() < 0.05
    assert not torch.equal(noisy[:, 0], noisy[:, 1])  # independent draws per image
    clean = torch.cat([b for b, _ in probe.noisy_batches(0)]).reshape(len(x), 4, 6)
    assert torch.equal(clean, x.unsqueeze(1).expand_as(clean))  # eps 0: the clean inputs
    # a different network is compared on the same inputs: nonzero distance, eps-0 accuracy = clean accuracy
    other = tiny_net(seed=3)
    res = probe.evaluate(other)
    assert res["logit_l2"][1] > 0 and res["agreement"][0] < 1.0
    assert res["accuracy"][0] == pytest.approx(float((other(x).argmax(1) == y).float().mean()))


# ---------------------------------------------------------------------------------------------------
# the prune-retrain loop
# ---------------------------------------------------------------------------------------------------
def test_geometric_ratios():
    ks = geometric_ratios(0.8, 0.05, 6)
    assert ks[0] == pytest.approx(0.8) and ks[-1] == pytest.approx(0.05) and len(ks) == 6
    factors = [b / a for a, b in zip(ks, ks[1:])]
    assert all(f == pytest.approx(factors[0]) for f in factors)
    assert factors[0] == pytest.approx((0.05 / 0.8) ** (1 / 5))
    # the paper's ResNet20 prune ratios 15, 22.4, 29.2, ..., 85 (%)
    paper = [15, 22.4, 29.2, 35.4, 41, 46.2, 50.8, 55.1, 59.1, 62.6, 65.9, 68.9, 71.6, 74.1, 76.3, 78.4, 80.3, 82, 83.6, 85]
    assert [round(100 * (1 - k), 1) for k in geometric_ratios(0.85, 0.15, 20)] == paper
    assert geometric_ratios(0.5, 0.1, 1) == [0.5]
    with pytest.raises(ValueError):
        geometric_ratios(0.0, 0.1, 3)


class RecordingMagnitude(GlobalMagnitudePruner):
    """Global magnitude pruning that records the effective weights of every model it is given."""

    def __init__(self) -> None:
        self.seen: list[list[torch.Tensor]] = []

    def prune(self, model, keep, data=None):
        self.seen.append([m.masked_weight().clone() for _, m in masked_modules(model)])
        super().prune(model, keep, data)


def _effective(model: nn.Module) -> list[torch.Tensor]:
    return [m.masked_weight().clone() for _, m in masked_modules(model)]


@pytest.mark.parametrize("mode", ["cascade", "one-shot"])
def test_loop_cascade_prunes_retrained_net_one_shot_restarts(mode):
    parent = tiny_net()
    data = tiny_data()
    pruner = RecordingMagnitude()
    outputs, masks = [], []

    def on_result(record, model):
        outputs.append(_effective(model))
        masks.append([m.mask().clone() for _, m in masked_modules(model)])

    keeps = [0.6, 0.3, 0.15]
    records = prune_retrain(parent, pruner, keeps, train=data, retrain_config=RetrainConfig(steps=15, lr=1e-2, batch_size=32),
                            mode=mode, on_result=on_result)
    parent_w = [layer.weight.detach() for layer in (parent[0], parent[2])]
    assert [r["keep_target"] for r in records] == keeps
    for r in records:
        assert abs(r["keep"] - r["keep_target"]) <= 0.005 * r["keep_target"]
        assert r["prune_ratio"] == pytest.approx(1 - r["keep"]) and r["mode"] == mode
    assert all(torch.equal(a, b) for a, b in zip(pruner.seen[0], parent_w))  # cycle 0 starts from the parent
    for k in (1, 2):
        if mode == "cascade":  # the previous cycle's retrained network, pruned further
            assert all(torch.equal(a, b) for a, b in zip(pruner.seen[k], outputs[k - 1]))
            assert all(bool((new <= old).all()) for new, old in zip(masks[k], masks[k - 1]))  # nested masks
        else:  # back to the parent every time
            assert all(torch.equal(a, b) for a, b in zip(pruner.seen[k], parent_w))
    assert torch.equal(parent[0].weight, parent_w[0]) and not any(True for _ in masked_modules(parent))


def test_retraining_enforces_the_mask():
    model = prepare(tiny_net())
    layers = [m for _, m in masked_modules(model)]
    keep_top(model, {n: torch.rand(m.weight_aux.shape) for n, m in masked_modules(model)}, 0.3)  # random mask
    with torch.no_grad():
        model[0].bias[:4] = 0.0  # a structured pruner removed these units' biases
    aux_before = [m.weight_aux.detach().clone() for m in layers]
    w_before = [m.weight.detach().clone() for m in layers]
    pruned = [~m.mask() for m in layers]
    checks = []
    import autoprune_ext.evaluation.loop as loop

    real = loop.train_supervised

    def spy(*args, after_step=None, **kwargs):  # check the mask after every optimiser step
        def wrapped(m):
            after_step(m)
            checks.append(all(bool((layer.masked_weight()[p] == 0).all() and (layer.weight[p] == 0).all())
                              for layer, p in zip(layers, pruned)) and bool((model[0].bias[:4] == 0).all()))
        return real(*args, after_step=wrapped, **kwargs)

    loop.train_supervised = spy
    try:
        losses = retrain(model, tiny_data(), RetrainConfig(steps=20, lr=1e-2, batch_size=32))
    finally:
        loop.train_supervised = real
    assert len(losses) == 20 and len(checks) == 20 and all(checks)
    for m, aux, w, p in zip(layers, aux_before, w_before, pruned):
        assert torch.equal(m.weight_aux, aux) and not m.weight_aux.requires_grad  # mask frozen
        assert not torch.equal(m.weight[~p], w[~p])  # the kept weights were trained
    assert keep_ratio(model) <= 0.3 * 1.005


def test_loop_rejects_increasing_cascade_and_missing_data():
    with pytest.raises(ValueError, match="non-increasing"):
        prune_retrain(tiny_net(), GlobalMagnitudePruner(), [0.2, 0.5], train=tiny_data())
    with pytest.raises(ValueError, match="needs held-out"):
        prune_retrain(tiny_net(), AutoPrunePruner(steps=2), [0.5], train=tiny_data())


# ---------------------------------------------------------------------------------------------------
# AutoPrune and global magnitude as pruners
# ---------------------------------------------------------------------------------------------------
def test_keep_top_hand_example():
    model = prepare(nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)))
    # 6 weights in all, keep 3: the three best scores over both layers
    scores = {"0": torch.tensor([[0.9, 0.1], [0.5, 0.2]]), "1": torch.tensor([[0.3, 0.8]])}
    achieved = keep_top(model, scores, 0.5)
    assert achieved == pytest.approx(0.5)
    assert model[0].weight_aux.tolist() == [[1.0, -1.0], [1.0, -1.0]] and model[1].weight_aux.tolist() == [[-1.0, 1.0]]


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.15])
def test_magnitude_and_autoprune_match_the_ratio(keep):
    data = tiny_data()
    mag = prepare(tiny_net())
    GlobalMagnitudePruner().prune(mag, keep)
    assert abs(keep_ratio(mag) - keep) <= 0.005 * keep
    kept = torch.cat([m.masked_weight().abs().flatten() for _, m in masked_modules(mag)])
    pruned_max = float(torch.cat([m.weight.detach().abs()[~m.mask()] for _, m in masked_modules(mag)]).max())
    assert float(kept[kept > 0].min()) >= pruned_max  # the largest magnitudes are kept
    ap = prepare(tiny_net())
    pruner = AutoPrunePruner(train=data, steps=12, batch_size=32)
    pruner.prune(ap, keep, data)
    assert abs(keep_ratio(ap) - keep) <= 0.005 * keep
    assert len(pruner.history) == 12 and pruner.history[-1]["density"] < 1.0  # the trainer ran, toward the target
    for _, m in masked_modules(ap):
        assert set(m.weight_aux.unique().tolist()) <= {-1.0, 1.0}


def test_pruners_register_when_a_registry_exists(monkeypatch):
    registered = {}
    fake = types.ModuleType("autoprune_ext.pruners.registry")
    fake.register_pruner = lambda name, cls: registered.__setitem__(name, cls)
    monkeypatch.setitem(sys.modules, "autoprune_ext.pruners.registry", fake)
    import autoprune_ext.pruners as pkg

    monkeypatch.setattr(pkg, "registry", fake, raising=False)
    assert autoprune_pruner.register()
    assert registered == {"autoprune": AutoPrunePruner, "magnitude": GlobalMagnitudePruner}
    assert issubclass(AutoPrunePruner, Pruner) and AutoPrunePruner.needs_data


# ---------------------------------------------------------------------------------------------------
# the potential command
# ---------------------------------------------------------------------------------------------------
SMOKE = ["potential", "--model", "lenet300", "--data", "digits", "--methods", "autoprune,magnitude", "--quick",
         "--dense-steps", "60", "--retrain-steps", "30", "--autoprune-steps", "10", "--ratios", "0.5,0.9",
         "--corruptions", "gaussian_noise,gaussian_blur", "--noise-draws", "2", "--noise-images", "32",
         "--quiet", "--threads", "1"]


def test_potential_cli_smoke_writes_json_and_pngs(tmp_path, capsys):
    out = tmp_path / "pot"
    assert main(SMOKE + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for text in ("nominal", "gaussian_noise-s3", "gaussian_blur-s3", "mean shifted", "min shifted", "autoprune", "magnitude"):
        assert text in printed, text
    result = json.loads((out / "potential.json").read_text())
    for key in ("prune_potential", "accuracy", "excess_error", "noise", "parent_accuracy", "prune_potential_delta0"):
        assert key in result, key
    dists = ["nominal", "gaussian_noise-s3", "gaussian_blur-s3"]
    assert result["distributions"] == dists
    for m in ("autoprune", "magnitude"):
        assert set(result["prune_potential"][m]) == set(dists)
        assert all(v in (0.0, 0.5, 0.9) for v in result["prune_potential"][m].values())
        assert set(result["accuracy"][m]["nominal"]) == {"0.5000", "0.9000"}
        assert all(0.0 <= a <= 1.0 for a in result["accuracy"][m]["gaussian_noise-s3"].values())
        assert math.isfinite(result["excess_error"]["methods"][m]["slope"])
        assert len(result["noise"]["prune_potential"][m]) == len(result["noise"]["eps"])
        for rec in result["runs"]["0"][m]:
            assert abs(rec["keep"] - rec["keep_target"]) <= 0.005 * rec["keep_target"]
    assert result["noise"]["eps"] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert result["noise"]["separate"]["agreement"][0] < 1.0 or result["separate_accuracy"]["nominal"] > 0
    for png in ("accuracy.png", "potential.png", "excess_error.png", "noise.png"):
        assert (out / png).stat().st_size > 5000, png
    assert "mean shifted" in potential_table(result, markdown=True)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--methods", "autoprune,bogus"], "--methods: unknown method 'bogus'"),
        (["--model", "alexnet"], "--model: unknown model 'alexnet'"),
        (["--data", "mnist", "--data-dir", "/nonexistent/dir"], "--data-dir: /nonexistent/dir is not a directory"),
        (["--data", "cifar10"], "--data-dir: the cifar10 dataset is read from local files"),
        (["--data", "imagenet"], "--data: unknown dataset 'imagenet'"),
        (["--corruptions", "rain"], "--corruptions: unknown corruption 'rain'"),
        (["--severity", "7"], "--severity: expected integers in 1..5"),
        (["--ratios", "0.5,150"], "--ratios"),
        (["--ratios", "0.5,abc"], "--ratios"),
        (["--seeds", "a,b"], "--seeds"),
    ],
)
def test_potential_bad_arguments_exit_2(extra, message, capsys, tmp_path):
    try:
        code = main(["potential", "--quiet", "--out", str(tmp_path / "x")] + extra)
    except SystemExit as exc:  # argparse type errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_registered_methods_share_the_loop():
    registry = pytest.importorskip("autoprune_ext.pruners.registry")
    autoprune_pruner.register()
    assert isinstance(registry.get_pruner("autoprune", steps=3), AutoPrunePruner)
    assert isinstance(registry.get_pruner("magnitude"), GlobalMagnitudePruner)
    data, held = tiny_data(), tiny_data(40, seed=1)
    for name in ("wt", "sipp", "ft", "pfp", "autoprune"):
        pruner = registry.get_pruner(name, steps=3) if name == "autoprune" else registry.get_pruner(name)
        records = prune_retrain(tiny_net(), pruner, [0.6, 0.3], train=data, data=held,
                                retrain_config=RetrainConfig(steps=3, batch_size=32))
        for r in records:
            assert abs(r["keep"] - r["keep_target"]) <= 0.005 * r["keep_target"], (name, r)
            assert r["keep_after_retrain"] <= r["keep"] + 1e-9, (name, r)  # retraining revives nothing
