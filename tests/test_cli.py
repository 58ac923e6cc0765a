"""The command line: help, info, a small prune run end to end, and every bad-argument path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from autoprune_ext.cli import main
from autoprune_ext.models import get_model


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoprune_ext.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_help_lists_commands_and_prune_options():
    top = run_cli("--help")
    assert top.returncode == 0 and "info" in top.stdout and "prune" in top.stdout
    prune = run_cli("prune", "--help")
    assert prune.returncode == 0
    for flag in ("--model", "--data", "--data-dir", "--out", "--parent", "--steps", "--lambda-fc", "--lambda-conv",
                 "--target-density", "--finetune-steps", "--baseline", "--backend", "--seed"):
        assert flag in prune.stdout, flag


def test_info_reports_backends():
    out = run_cli("info")
    assert out.returncode == 0, out.stderr
    assert "reference" in out.stdout and "triton" in out.stdout and "cpp" in out.stdout
    assert "autoprune::apply_mask" in out.stdout


def test_prune_small_run_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["prune", "--model", "lenet300", "--data", "digits", "--out", str(out), "--dense-steps", "30",
                 "--steps", "20", "--finetune-steps", "5", "--eval-every", "10", "--baseline", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "kept / total" in printed and "fc1" in printed and "compression" in printed
    report = json.loads((out / "report.json").read_text())
    for key in ("dense_accuracy", "pruned_accuracy", "compression", "flops_fraction", "layers", "config", "seconds",
                "magnitude_accuracy"):
        assert key in report, key
    assert report["compression"] > 1.0 and 0 < report["flops_fraction"] < 1
    assert [layer["name"] for layer in report["layers"]] == ["fc1", "fc2", "fc3"]
    plain = get_model("lenet300")
    plain.load_state_dict(torch.load(out / "model.pt", weights_only=True), strict=True)
    assert (plain.fc1.weight == 0).float().mean() > 0
    assert (out / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "args,message",
    [
        (["prune", "--model", "alexnet"], "--model: unknown model 'alexnet'"),
        (["prune", "--data", "imagenet"], "--data: unknown dataset 'imagenet'"),
        (["prune", "--data", "mnist"], "--data-dir: the mnist dataset is read from local files"),
        (["prune", "--data", "mnist", "--data-dir", "/nonexistent/dir"], "--data-dir: /nonexistent/dir is not a directory"),
        (["prune", "--lambda-fc", "-1"], "argument --lambda-fc: expected a finite non-negative number"),
        (["prune", "--lambda-conv", "abc"], "argument --lambda-conv: expected a number"),
        (["prune", "--target-density", "2"], "argument --target-density: expected a fraction in (0, 1]"),
        (["prune", "--parent", "/nonexistent.pt"], "--parent: /nonexistent.pt is not a file"),
        (["prune", "--surrogate", "tanh"], "argument --surrogate: invalid choice"),
        (["frobnicate"], "invalid choice"),
        (["prune", "--device", "meta"], "--device: meta tensors hold no data"),
        (["prune", "--device", "tpu9"], "--device: expected cpu, cuda or cuda:N"),
        (["prune", "--device", "cuda:7"], "--device: cuda:7 requested"),
        (["prune", "--out", "/dev/null/run"], "--out: /dev/null/run cannot be created: /dev/null is a file"),
        (["prune", "--allow-config-change", "autoprune.seed"], "--allow-config-change: only meaningful with --resume"),
        (["potential", "--device", "meta"], "--device: meta tensors hold no data"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message, capsys):
    try:
        code = main(args)
    except SystemExit as exc:  # argparse-level errors exit directly
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert message in err, err


@pytest.mark.parametrize("content,message", [
    (b"not a torch file at all", "cannot be read as a state_dict"),
    (None, "holds a list, expected a state_dict"),
])
def test_corrupt_parent_exits_2_naming_parent(tmp_path, capsys, content, message):
    parent = tmp_path / "parent.pt"
    if content is None:
        torch.save([1, 2, 3], parent)
    else:
        parent.write_bytes(content)
    assert main(["prune", "--parent", str(parent), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--parent:" in err and message in err, err
    assert not (tmp_path / "run").exists()  # nothing created before the error


def test_parent_of_another_model_exits_2(tmp_path, capsys):
    parent = tmp_path / "parent.pt"
    torch.save(get_model("lenet5").state_dict(), parent)
    code = main(["prune", "--parent", str(parent), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--finetune-steps", "0", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "parent:" in err and "lenet300" in err, err


def test_missing_data_files_exit_2(tmp_path, capsys):
    assert main(["prune", "--data", "mnist", "--data-dir", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and len(err.strip().splitlines()) == 1
