"""Checkpoints are data, checked before use: no code runs on load, damage and config changes are
refused by name, writes are atomic, and a killed ``autoprune-ext prune`` resumes bit-identically."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from autoprune_ext.autoprune import AutoPrune, AutoPruneConfig
from autoprune_ext.checkpoint import (
    CheckpointError,
    config_differences,
    load_checkpoint,
    read_header,
    remove_stale_temps,
    save_atomic,
    save_checkpoint,
)


class _Exploit:
    """Unpickling this with weights_only=False would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def ckpt(tmp_path) -> Path:
    path = tmp_path / "c.ckpt"
    save_checkpoint({"w": torch.randn(64, 33), "step": 3, "history": [{"loss": 0.5}]}, path,
                    config={"lr": 0.1, "model": {"layers": [3, 4]}})
    return path


def test_round_trip_and_header(ckpt):
    state = load_checkpoint(ckpt, config={"lr": 0.1, "model": {"layers": [3, 4]}})
    assert state["step"] == 3 and state["w"].shape == (64, 33) and state["history"] == [{"loss": 0.5}]
    header = read_header(ckpt)
    assert header["config"] == {"lr": 0.1, "model": {"layers": [3, 4]}} and len(header["payload_sha256"]) == 64


def test_malicious_payload_does_not_execute(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    save_checkpoint({"x": _Exploit(marker)}, path, config={})  # a valid container and checksum
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: the payload cannot be loaded safely"):
        load_checkpoint(path)
    assert not marker.exists()
    # the same through the trainer, and a bare pickle / plain torch.save file at the path
    plain = tmp_path / "plain.pt"
    torch.save({"x": _Exploit(marker)}, plain)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError, match=r"plain\.pt: a plain torch\.save file"):
        load_checkpoint(plain)
    with pytest.raises(CheckpointError, match=r"raw\.pkl: not an autoprune_ext checkpoint"):
        load_checkpoint(raw)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["payload_start", "payload_middle", "payload_end", "header", "lengths", "digest"])
def test_every_flipped_bit_is_detected(ckpt, where):
    data = bytearray(ckpt.read_bytes())
    header = read_header(ckpt)
    n = header["payload_bytes"]
    pos = {"payload_start": 16, "payload_middle": 16 + n // 2, "payload_end": 16 + n - 1,
           "header": 16 + n + 5, "lengths": 9, "digest": len(data) - 1}[where]
    data[pos] ^= 0x10
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"c\.ckpt: (damaged|truncated)"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("keep", [0, 5, 16, 100, -41, -1])
def test_truncated_file_is_named(ckpt, keep):
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=r"c\.ckpt: (not an autoprune_ext checkpoint|truncated|damaged)"):
        load_checkpoint(ckpt)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.ckpt: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_config_mismatch_is_refused_by_field_and_can_be_allowed(ckpt):
    with pytest.raises(CheckpointError, match=r"different config: lr: saved 0\.1, now 0\.2; model\.layers"):
        load_checkpoint(ckpt, config={"lr": 0.2, "model": {"layers": [3, 5]}})
    with pytest.raises(CheckpointError, match=r"model\.layers"):
        load_checkpoint(ckpt, config={"lr": 0.2, "model": {"layers": [3, 5]}}, allow_config_change=["lr"])
    assert load_checkpoint(ckpt, config={"lr": 0.2, "model": {"layers": [3, 5]}}, allow_config_change=["lr", "model"])
    assert load_checkpoint(ckpt, config={"other": 1}, allow_config_change=True)
    assert config_differences({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == {"a.c": (None, 2)}


def test_config_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="config: expected a JSON-serialisable mapping"):
        save_checkpoint({}, tmp_path / "x", config={"t": torch.ones(1)})
    with pytest.raises(TypeError, match="config: expected a JSON-serialisable mapping"):
        save_checkpoint({}, tmp_path / "x", config={"lr": float("nan")})


def test_stale_temp_files_are_removed_and_live_ones_kept(tmp_path):
    path = tmp_path / "c.ckpt"
    dead = tmp_path / f".c.ckpt.{_dead_pid()}.deadbeef.tmp"
    live = tmp_path / f".c.ckpt.{os.getppid()}.cafef00d.tmp"  # a writer that still runs
    other = tmp_path / ".d.ckpt.1.aa.tmp"  # another target's
    for f in (dead, live, other):
        f.write_bytes(b"partial")
    save_checkpoint({"a": torch.ones(2)}, path, config={})
    assert not dead.exists() and live.exists() and other.exists()
    assert remove_stale_temps(path) == []
    save_atomic({"a": 1}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c.ckpt", live.name, other.name])


def test_failed_write_leaves_old_checkpoint_and_no_temp(ckpt):
    before = ckpt.read_bytes()

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"x": Boom()}, ckpt, config={})
    assert ckpt.read_bytes() == before
    assert [p.name for p in ckpt.parent.iterdir()] == ["c.ckpt"]


# -- the trainer ------------------------------------------------------------------------------------
def _trainer(**overrides) -> tuple[AutoPrune, TensorDataset]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    cfg = AutoPruneConfig(**{"batch_size": 16, "mode": "same_batch", **overrides})
    return AutoPrune(model, cfg), data


def test_trainer_refuses_other_config_and_model(tmp_path):
    path = tmp_path / "t.ckpt"
    trainer, data = _trainer()
    trainer.fit(data, steps=3, checkpoint=path, run_config={"data": "toy"}, progress=False)
    other, _ = _trainer(batch_size=8, seed=1)
    with pytest.raises(CheckpointError, match=r"autoprune\.batch_size: saved 16, now 8; autoprune\.seed: saved 0, now 1"):
        other.fit(data, steps=4, checkpoint=path, run_config={"data": "toy"}, progress=False)
    assert other.step_count == 0  # nothing was loaded
    same, _ = _trainer()
    with pytest.raises(CheckpointError, match=r"run\.data: saved 'toy', now 'digits'"):
        same.load(path, run_config={"data": "digits"})
    allowed, _ = _trainer(lr_aux=0.05)
    allowed.load(path, run_config={"data": "toy"}, allow_config_change=["autoprune.lr_aux"])
    assert allowed.step_count == 3
    torch.manual_seed(0)
    wider = AutoPrune(nn.Sequential(nn.Linear(8, 17), nn.ReLU(), nn.Linear(17, 3)),
                      AutoPruneConfig(batch_size=16, mode="same_batch"))
    with pytest.raises(CheckpointError, match=r"model\.tensors\.0\.weight: saved '\[16, 8\] float32', now '\[17, 8\] float32'"):
        wider.load(path, run_config={"data": "toy"})
    with pytest.raises(CheckpointError, match="does not fit this trainer"):
        wider.load(path, run_config={"data": "toy"}, allow_config_change=True)


def test_trainer_checkpoint_loads_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "t.ckpt"
    trainer, data = _trainer()
    trainer.fit(data, steps=2, checkpoint=path, progress=False)
    seen = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    fresh, _ = _trainer()
    fresh.load(path)
    assert seen == [True] and fresh.step_count == 2


# -- autoprune-ext prune --resume: kill, resume, compare -------------------------------------------
_ARGS = ["prune", "--model", "lenet300", "--data", "digits", "--dense-steps", "20", "--steps", "200",
         "--finetune-steps", "10", "--eval-every", "100", "--checkpoint-every", "5", "--batch-size", "32", "--quiet"]


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "autoprune_ext.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def _step_on_disk(path: Path) -> int:
    try:
        return int(load_checkpoint(path)["step"])
    except CheckpointError:
        return -1


def test_prune_killed_then_resumed_is_bit_identical(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    ref = _cli(*_ARGS, "--out", str(whole))
    victim = _cli(*_ARGS, "--out", str(cut))
    ckpt = cut / "autoprune.ckpt"
    deadline = time.monotonic() + 240
    killed_at = -1
    while time.monotonic() < deadline and victim.poll() is None:
        if ckpt.exists() and (killed_at := _step_on_disk(ckpt)) >= 10:
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, f"the run ended before it was killed: {victim.stderr.read()}"
    assert 10 <= killed_at < 200
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err
    stale = cut / f".autoprune.ckpt.{_dead_pid()}.0badf00d.tmp"
    stale.write_bytes(b"half a checkpoint")
    resumed = _cli(*_ARGS, "--out", str(cut), "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    resumed_at = int(out.split("at AutoPrune step ")[1].split()[0])  # it continued, did not start over
    assert resumed_at >= killed_at and not stale.exists()
    a = torch.load(whole / "model.pt", weights_only=True)
    b = torch.load(cut / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (whole, cut))
    for key in ("dense_accuracy", "pruned_accuracy", "pruned_accuracy_before_finetune", "density", "layers"):
        assert ra[key] == rb[key], key
    assert rb["resumed"] and not ra["resumed"]
    # a resume with other flags is refused by field name, one line, status 2
    bad = _cli(*[a if a != "32" else "64" for a in _ARGS], "--out", str(cut), "--resume")
    _, err = bad.communicate(timeout=300)
    assert bad.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "autoprune.batch_size: saved 32, now 64" in err
