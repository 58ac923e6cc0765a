"""One rank of the distributed tests (``tests/test_distributed.py`` starts two of them on gloo).

``python tests/_distributed_worker.py RANK WORLD PORT OUT_DIR`` runs every scenario below and
writes ``OUT_DIR/rank{RANK}.json``: scenario name -> list of failed checks (empty: passed). Checks
record failures instead of raising, so that a failing check never leaves the other rank waiting in
a collective; an unexpected exception is recorded as its traceback.

Each scenario trains the same tiny masked MLP (13 -> 7 -> 3: FSDP2 splits its rows 4/3 and 2/1)
twice: distributed, each rank on its half of every global batch, and in one process on the whole
batch. Cross-entropy is a mean, so the ranks' averaged gradient is the single-process one and both
runs must agree (to float rounding) step for step.
"""

from __future__ import annotations

import copy
import datetime
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autoprune_ext as ap  # noqa: E402
from autoprune_ext import distributed as apd  # noqa: E402
from autoprune_ext.autoprune import AutoPrune, AutoPruneConfig  # noqa: E402
from autoprune_ext.optim import AuxAdam  # noqa: E402
from autoprune_ext.sparsity import density, is_dtensor  # noqa: E402

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    from torch.distributed._composable.fsdp import fully_shard  # type: ignore[no-redef]

ATOL = 1e-5
Batch = tuple[Tensor, Tensor]


class Checks:
    """Failed checks of one scenario (messages), prefixed with the rank."""

    def __init__(self, rank: int) -> None:
        self.rank, self.failed = rank, []

    def __call__(self, ok: bool, what: str) -> None:
        if not ok:
            self.failed.append(f"rank {self.rank}: {what}")

    def close(self, a: Tensor, b: Tensor, what: str, atol: float = ATOL) -> None:
        diff = float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0
        self(a.shape == b.shape and diff <= atol, f"{what}: max |diff| {diff:.3g} > {atol} (shapes {a.shape}, {b.shape})")


def global_batch(seed: int, n: int = 8) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 13, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def half(batch: Batch) -> Batch:
    """This rank's share of a global batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    return tuple(t.chunk(world)[rank] for t in batch)  # type: ignore[return-value]


def dense_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 7), nn.ReLU(), nn.Linear(7, 8), nn.ReLU(), nn.Linear(8, 3))


def masked_mlp(seed: int = 0) -> nn.Module:
    # aux around 0.05: some entries start pruned and others cross zero within a few steps. One layer
    # of each granularity; 7 and 3 rows shard unevenly over 2 ranks (rows, and so 2:4 groups, stay whole)
    model = dense_mlp(seed)
    ap.convert(model, include=["0"], init=(0.05, 0.03))
    ap.convert(model, include=["2"], granularity="unit", init=(0.05, 0.03))
    ap.convert(model, include=["4"], granularity="2:4", init=(0.05, 0.03))
    return model


def shard(model: nn.Module) -> nn.Module:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def whole(t: Tensor) -> Tensor:
    t = t.detach()
    return t.full_tensor() if is_dtensor(t) else t


def same_on_all_ranks(t: Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(p, parts[0]) for p in parts)


def weight_params(model: nn.Module) -> list[Tensor]:
    return [p for n, p in model.named_parameters() if not n.endswith("weight_aux")]


def manual_step(model: nn.Module, aux_opt: AuxAdam, w_opt: torch.optim.Optimizer, batch: Batch) -> None:
    """A user's own loop: one joint step of the masks and the weights on ``batch``."""
    aux_opt.zero_grad(set_to_none=True)
    w_opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    aux_opt.step()
    w_opt.step()


def compare_models(check: Checks, model: nn.Module, ref: nn.Module) -> None:
    """``model`` (DDP-wrapped or sharded, trained distributed) against ``ref`` (trained in one
    process): parameters, masks (identical on every rank), density, report, finalize + reload."""
    module = apd.unwrap(model)
    for (name, m), (_, r) in zip(ap.masked_modules(module), ap.masked_modules(ref)):
        aux = whole(m.weight_aux)
        check.close(aux, r.weight_aux, f"{name}.weight_aux vs single process")
        check.close(whole(m.weight), r.weight, f"{name}.weight vs single process")
        check(torch.equal(aux >= 0, r.weight_aux.detach() >= 0), f"{name}: mask differs from single process")
        check(same_on_all_ranks(aux >= 0), f"{name}: masks differ between ranks")
    check(density(model) == density(ref), f"density {density(model)} != single process {density(ref)}")
    check(0.0 < density(ref) < 1.0, f"density {density(ref)}: expected some entries pruned, some kept")
    report, ref_report = ap.sparsity_report(module).to_dict(), ap.sparsity_report(ref).to_dict()
    check(report == ref_report, f"sparsity_report {report} != single process {ref_report}")
    x = global_batch(999)[0]
    exact = ap.sparsity_report(module, example_input=x).to_dict()  # runs the (sharded) model once
    check(exact == ap.sparsity_report(ref, example_input=x).to_dict(), f"sparsity_report(example_input) {exact}")

    ref.eval()
    expected = ref(x).detach()
    baked = apd.finalize_state_dict(model)
    check(not any(k.endswith("weight_aux") for k in baked), "finalize_state_dict kept weight_aux keys")
    fresh = dense_mlp(seed=1)
    fresh.load_state_dict(baked, strict=True)
    check.close(fresh(x), expected, "finalize_state_dict + strict reload: outputs")
    masked_copy = masked_mlp(seed=1)
    masked_copy.load_state_dict(apd.full_state_dict(model), strict=True)
    masked_copy.eval()
    check.close(masked_copy(x), expected, "full_state_dict + strict reload: outputs")
    model.eval()
    with torch.no_grad():
        check.close(model(x), expected, "distributed model outputs")
    model.train()
    if apd.is_sharded(module):
        try:
            ap.finalize(module)
            check(False, "finalize of an FSDP2 model: expected a TypeError")
        except TypeError as e:
            check("finalize_state_dict" in str(e), f"finalize error does not point to finalize_state_dict: {e}")
    else:
        plain = dense_mlp(seed=1)
        plain.load_state_dict(ap.finalize(model).state_dict(), strict=True)
        check.close(plain(x), expected, "finalize (DDP) + strict reload: outputs")


def ddp_manual(check: Checks, tmp: Path) -> None:
    ref = masked_mlp()
    model = DDP(copy.deepcopy(ref))
    opts = {}
    for key, net in (("ddp", model.module), ("ref", ref)):
        opts[key] = (AuxAdam.from_model(net, lr=0.05, penalty=2.0, penalty_mode="mean"),
                     torch.optim.Adam(weight_params(net), lr=1e-2))
    for step in range(4):
        batch = global_batch(step)
        manual_step(model, *opts["ddp"], half(batch))
        manual_step(ref, *opts["ref"], batch)
    compare_models(check, model, ref)


def trainer_config(**overrides: object) -> AutoPruneConfig:
    base = dict(penalty=2.0, lr_aux=0.05, lr_weight=1e-2, min_density=0.05, keep_rows=True)
    base.update(overrides)
    return AutoPruneConfig(**base)  # type: ignore[arg-type]


def run_trainers(check: Checks, trainer: AutoPrune, ref: AutoPrune, steps: range) -> list[dict]:
    """Steps ``steps`` of both trainers (each rank on its half batches); returns ``trainer``'s records."""
    records = []
    for step in steps:
        train, held = global_batch(100 + step), global_batch(200 + step)
        rec = trainer.step(half(train), half(held))
        want = ref.step(train, held)
        records.append(rec)
        check(rec["density"] == want["density"], f"step {step}: density {rec['density']} != {want['density']}")
        for key in ("aux_loss", "weight_loss"):
            check(abs(rec[key] - want[key]) <= ATOL, f"step {step}: {key} {rec[key]} != {want[key]}")
        for group, lam in want["lambda"].items():
            check(abs(rec["lambda"][group] - lam) <= ATOL * lam, f"step {step}: lambda[{group}] {rec['lambda'][group]} != {lam}")
    return records


def ddp_trainer(check: Checks, tmp: Path) -> None:
    cfg = trainer_config(penalty_mode="relative", penalty=0.5, target_density=0.6)
    ref_model = masked_mlp()
    model = DDP(copy.deepcopy(ref_model))  # no find_unused_parameters: the trainer syncs itself
    trainer, ref = AutoPrune(model, cfg), AutoPrune(ref_model, cfg)
    run_trainers(check, trainer, ref, range(4))
    compare_models(check, model, ref_model)


def fsdp_manual(check: Checks, tmp: Path) -> None:
    ref = masked_mlp()
    model = shard(copy.deepcopy(ref))
    check(all(is_dtensor(m.weight_aux) for _, m in ap.masked_modules(model)), "weight_aux is not sharded")
    opts = {}
    for key, net in (("fsdp", model), ("ref", ref)):
        opts[key] = (AuxAdam.from_model(net, lr=0.05, penalty=0.5, penalty_mode="relative", inv_abs_weight=True),
                     torch.optim.Adam(weight_params(net), lr=1e-2))
    for step in range(4):
        batch = global_batch(step)
        manual_step(model, *opts["fsdp"], half(batch))
        manual_step(ref, *opts["ref"], batch)
    compare_models(check, model, ref)


def fsdp_trainer(check: Checks, tmp: Path) -> None:
    """The trainer on an FSDP2 model, then a per-rank checkpoint resumed by a fresh trainer."""
    cfg = trainer_config(penalty_mode="mean", target_density=0.6, layer_target_density={"2": 0.7})
    ref_model = masked_mlp()
    model = shard(copy.deepcopy(ref_model))
    trainer, ref = AutoPrune(model, cfg), AutoPrune(ref_model, cfg)
    run_trainers(check, trainer, ref, range(3))
    ckpt = tmp / f"fsdp_trainer.rank{dist.get_rank()}.pt"
    trainer.save(ckpt)
    after = run_trainers(check, trainer, ref, range(3, 5))
    compare_models(check, model, ref_model)

    torch.manual_seed(1234)  # a resumed process starts from other weights and RNG state
    resumed = AutoPrune(shard(masked_mlp(seed=2)), cfg)
    resumed.load(ckpt)
    check(resumed.step_count == 3, f"resumed step {resumed.step_count} != 3")
    again = [resumed.step(half(global_batch(100 + step)), half(global_batch(200 + step))) for step in range(3, 5)]
    check(again == after, f"resumed records {again} != uninterrupted {after}")
    for (k, a), b in zip(model.state_dict().items(), resumed.model.state_dict().values()):
        check(torch.equal(a.to_local(), b.to_local()), f"resumed {k} differs from the uninterrupted run")
    # each step computes its own gradients only: requires_grad toggles reach FSDP2's unsharded params
    batch = half(global_batch(300))
    resumed.weight_optimizer.zero_grad(set_to_none=True)
    resumed.aux_step(batch)
    check(all(p.grad is None for p in resumed.weight_params), "aux step computed weight gradients")
    check(all(p.grad is not None and is_dtensor(p.grad) for p in resumed.aux_params), "aux step: no sharded aux grads")
    resumed.weight_step(batch)
    check(all(p.grad is not None for p in resumed.weight_params), "weight step: missing weight gradients")


SCENARIOS: dict[str, Callable[[Checks, Path], None]] = {
    "ddp_manual": ddp_manual,
    "ddp_trainer": ddp_trainer,
    "fsdp_manual": fsdp_manual,
    "fsdp_trainer": fsdp_trainer,
}


def main(rank: int, world: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    results: dict[str, list[str]] = {}
    try:
        for name, scenario in SCENARIOS.items():
            check = Checks(rank)
            try:
                scenario(check, out)
            except Exception:
                check.failed.append(f"rank {rank}: {traceback.format_exc()}")
            results[name] = check.failed
            (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
        dist.barrier()  # every rank done before the group is torn down (see examples/ddp_prune.py)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
