"""DDP and FSDP2 end to end: two processes on gloo (CPU), compared with one process.

The scenarios live in ``tests/_distributed_worker.py``; this module starts its two ranks once (on a
free 127.0.0.1 port) and reports every scenario as a test of its own. Each scenario checks that the
distributed run matches a single-process run of the same steps on the same global data (aux values
within 1e-5, identical masks on every rank), that density and ``sparsity_report`` equal the unsharded
model's, and that the finalized state dict reloads strictly into a fresh dense model with identical
outputs; the FSDP2 trainer's per-rank checkpoint must also resume exactly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).with_name("_distributed_worker.py")
WORLD = 2
SCENARIOS = ["ddp_manual", "ddp_trainer", "fsdp_manual", "fsdp_trainer"]

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, list[str]]]:
    """Run both ranks once; rank -> scenario -> failed checks."""
    out = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(rank), str(WORLD), str(port), str(out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(WORLD)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed workers timed out:\n" + "\n".join(logs))
    found = {}
    for rank, (p, log) in enumerate(zip(procs, logs)):
        path = out / f"rank{rank}.json"
        if p.returncode != 0 or not path.exists():
            pytest.fail(f"rank {rank} exited with {p.returncode}:\n{log[-4000:]}")
        found[rank] = json.loads(path.read_text())
    return found


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_distributed_matches_single_process(results: dict[int, dict[str, list[str]]], scenario: str) -> None:
    failed = [msg for rank in range(WORLD) for msg in results[rank].get(scenario, [f"rank {rank}: did not run"])]
    assert not failed, "\n".join(failed)


def test_torchrun_example_fsdp() -> None:
    """``torchrun --nproc_per_node=2 examples/ddp_prune.py --fsdp`` runs and prints the density."""
    example = Path(__file__).resolve().parents[1] / "examples" / "ddp_prune.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(example), "--fsdp", "--steps", "3"]
    run = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "FSDP2, 2 process(es): density" in run.stdout
