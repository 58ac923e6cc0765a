"""The AutoPrune trainer: sparsity with accuracy kept, recoverability, exact resume, options."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import autoprune_ext as ap
from autoprune_ext.autoprune import AutoPrune, AutoPruneConfig, save_atomic
from autoprune_ext.training import BatchStream, accuracy, train_supervised


def blobs(n: int, seed: int) -> TensorDataset:
    """A separable 4-class problem in 20 dimensions where only the first 4 inputs matter."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.randn(n, 20, generator=gen) * 0.5
    x[torch.arange(n), y] += 2.0
    return TensorDataset(x, y)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.fixture(scope="module")
def data():
    return blobs(600, 0), blobs(200, 1), blobs(400, 2)


def test_reaches_sparsity_and_keeps_accuracy(data):
    train, held, test = data
    model = tiny_model()
    train_supervised(model, train, 200, lr=1e-2, batch_size=50)
    dense = accuracy(model, test)
    assert dense > 0.95
    trainer = AutoPrune(model, penalty=2.0, lr_aux=0.05, lr_weight=1e-3, batch_size=50, mask_init=(0.5, 0.01))
    history = trainer.fit(train, held, 300, eval_data=test, eval_every=100, progress=False)
    assert history[-1]["density"] < 0.5
    assert accuracy(trainer.model, test) >= dense - 0.02
    # inputs 4..19 carry no signal: the first layer should keep mostly the first 4 columns
    first = trainer.model[0]
    assert first.mask()[:, :4].float().mean() > first.mask()[:, 4:].float().mean()
    assert [r["step"] for r in history if "accuracy" in r] == [100, 200, 300]


def test_switched_off_mask_switches_back_on_when_needed(data):
    """Recoverability: masks of the only useful inputs, switched off, come back through the
    softplus surrogate's gradient (and W was never overwritten)."""
    train, held, test = data
    model = tiny_model()
    train_supervised(model, train, 200, lr=1e-2, batch_size=50)
    trainer = AutoPrune(model, penalty=0.0, lr_aux=0.05, batch_size=50)
    first = trainer.model[0]
    with torch.no_grad():
        first.weight_aux[:, :4] = -0.2  # prune every weight reading the informative inputs
    assert first.mask()[:, :4].sum() == 0
    hurt = accuracy(trainer.model, test)
    trainer.fit(train, held, 100, progress=False)
    assert first.mask()[:, :4].float().mean() > 0.3
    assert accuracy(trainer.model, test) > hurt + 0.2


def test_relu_surrogate_is_not_recoverable(data):
    train, held, _ = data
    model = tiny_model()
    trainer = AutoPrune(model, penalty=0.0, lr_aux=0.05, batch_size=50, surrogate="relu")
    first = trainer.model[0]
    with torch.no_grad():
        first.weight_aux[:, :4] = -0.2
    trainer.fit(train, held, 30, progress=False)
    assert first.mask()[:, :4].sum() == 0


@pytest.mark.parametrize("mode", ["bilevel", "same_batch"])
def test_checkpoint_resume_equals_uninterrupted(data, tmp_path, mode):
    train, held, _ = data
    cfg = AutoPruneConfig(penalty=1.0, lr_aux=0.05, batch_size=40, mode=mode, seed=3, target_density=0.5)
    base = ap.convert(tiny_model(), init=(0.5, 0.01))
    full = AutoPrune(copy.deepcopy(base), cfg)
    full.fit(train, held, 24, progress=False)

    ckpt = tmp_path / "run.pt"
    first = AutoPrune(copy.deepcopy(base), cfg)
    first.fit(train, held, 11, checkpoint=ckpt, checkpoint_every=5, progress=False)
    torch.manual_seed(12345)  # a resumed process starts with other RNG state
    resumed = AutoPrune(copy.deepcopy(base), cfg)
    resumed.fit(train, held, 24, checkpoint=ckpt, progress=False)
    assert resumed.step_count == 24
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r["lambda"] for r in full.history] == [r["lambda"] for r in resumed.history]


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_atomic({"a": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_atomic({"a": torch.zeros(3), "b": Boom()}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(3))  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left behind


def test_target_density_controller(data):
    train, held, _ = data
    trainer = AutoPrune(tiny_model(), penalty=0.01, lr_aux=0.05, batch_size=50, target_density=0.3,
                        controller_gain=0.1)
    trainer.fit(train, held, 250, progress=False)
    assert 0.15 < trainer.density() < 0.45
    assert trainer.history[-1]["lambda"]["all"] > 0.01  # lambda grew to get there


def test_freeze_bn_keeps_running_stats():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 2, (16,))
    trainer = AutoPrune(model, mode="same_batch", freeze_bn=True)
    stats = trainer.model[1].running_mean.clone()
    trainer.step((x, y))
    assert torch.equal(trainer.model[1].running_mean, stats)
    trainer.config.freeze_bn = False
    trainer.step((x, y))
    assert not torch.equal(trainer.model[1].running_mean, stats)


def test_steps_compute_only_their_gradients():
    trainer = AutoPrune(tiny_model(), mode="same_batch")
    x, y = torch.randn(8, 20), torch.randint(0, 4, (8,))
    trainer.aux_step((x, y))
    assert all(p.grad is None for p in trainer.weight_params)
    assert all(p.grad is not None for p in trainer.aux_params)
    trainer.weight_step((x, y))
    assert all(p.grad is not None for p in trainer.weight_params)


def test_callbacks_and_bad_options(data):
    train, held, _ = data
    seen = []
    trainer = AutoPrune(tiny_model(), callbacks=[lambda t, r: seen.append(r["step"])], batch_size=50)
    trainer.fit(train, held, 3, progress=False)
    assert seen == [1, 2, 3]
    with pytest.raises(ValueError, match="heldout"):
        trainer.fit(train, None, 5, progress=False)
    with pytest.raises(ValueError, match="mode"):
        AutoPruneConfig(mode="alternate")
    with pytest.raises(ValueError, match="target_density"):
        AutoPruneConfig(target_density=1.5)
    with pytest.raises(ValueError, match="penalty"):
        AutoPruneConfig(penalty=-1.0)
    with pytest.raises(ValueError, match="lr_aux"):
        AutoPruneConfig(lr_aux=float("nan"))


def test_batch_stream_is_a_function_of_step():
    ds = TensorDataset(torch.arange(10).float().unsqueeze(1), torch.arange(10))
    a, b = BatchStream(ds, 3, seed=1), BatchStream(ds, 3, seed=1)
    seq = [a.batch(i)[1].tolist() for i in range(7)]
    assert [b.batch(i)[1].tolist() for i in reversed(range(7))][::-1] == seq
    assert sorted(sum(seq[:3], [])) == sorted(set(sum(seq[:3], [])))  # no repeats within an epoch
    assert BatchStream(ds, 3, seed=2).batch(0)[1].tolist() != seq[0] or BatchStream(ds, 3, seed=2).batch(1)[1].tolist() != seq[1]
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(ds, 0)


def test_nonfinite_mask_step_raise_or_skip(data):
    """A NaN in the mask step's loss: 'raise' names the layer; 'skip' leaves the masks untouched,
    counts the step in the record, and the weight step still runs."""
    train, held, _ = data
    calls = {"n": 0}

    def loss_fn(out, batch):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(out, batch[1])
        return loss * float("nan") if calls["n"] == 1 else loss  # the first call is the first mask step

    for policy in ("raise", "skip"):
        calls["n"] = 0
        torch.manual_seed(0)
        trainer = AutoPrune(tiny_model(), AutoPruneConfig(batch_size=16, aux_nonfinite=policy), loss_fn=loss_fn)
        before = [p.detach().clone() for p in trainer.aux_params]
        it = iter(torch.utils.data.DataLoader(train, batch_size=16))
        hb = next(iter(torch.utils.data.DataLoader(held, batch_size=16)))
        if policy == "raise":
            with pytest.raises(ValueError, match=r"grad: expected finite gradients.*weight_aux"):
                trainer.step(next(it), hb)
        else:
            record = trainer.step(next(it), hb)
            assert record["aux_skipped"] == 1
            assert all(torch.equal(a, b) for a, b in zip(before, trainer.aux_params))
            assert trainer.step(next(it), hb)["aux_skipped"] == 1  # later steps run
            assert not all(torch.equal(a, b) for a, b in zip(before, trainer.aux_params))
    with pytest.raises(ValueError, match="aux_nonfinite: expected one of"):
        AutoPruneConfig(aux_nonfinite="ignore")


@pytest.mark.parametrize("mode", ["bilevel", "same_batch"])
def test_fused_aux_step_trains_bit_for_bit_alike(data, mode):
    """fused_aux_step=True (the mask steps' update inside backward, cpp backend) changes nothing."""
    from autoprune_ext import backends
    from test_cpp_backend import ext  # noqa: F401  (builds the extension or skips)

    train, held, _ = data
    cfg = AutoPruneConfig(penalty=1.0, lr_aux=0.05, batch_size=40, mode=mode, seed=3, target_density=0.5)
    base = ap.convert(tiny_model(), init=(0.5, 0.01))
    runs, kept_grads = [], {}

    def spy(trainer, record):  # after each step: did the mask step leave gradients behind?
        kept_grads.setdefault(trainer.fused_aux_step, []).append(any(p.grad is not None for p in trainer.aux_params))

    for fused in (False, True):
        trainer = AutoPrune(copy.deepcopy(base), cfg, fused_aux_step=fused, callbacks=[spy])
        with backends.use("cpp"):
            trainer.fit(train, held, 12, progress=False)
        runs.append(trainer)
    plain, fused = runs
    for (k, a), b in zip(plain.model.state_dict().items(), fused.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r["lambda"] for r in plain.history] == [r["lambda"] for r in fused.history]
    assert all(kept_grads[False]) and not any(kept_grads[True])  # the fused mask steps made no gradients
    with pytest.raises(ValueError, match="fused_aux_step: needs aux_nonfinite='raise'"):
        AutoPrune(copy.deepcopy(base), cfg, fused_aux_step=True, aux_nonfinite="skip")
