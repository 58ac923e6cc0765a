"""Prune a small MLP with AutoPrune on several processes: DDP (default) or FSDP2 (``--fsdp``).

Run with torchrun (gloo on CPU, NCCL when CUDA is available)::

    torchrun --nproc_per_node=2 examples/ddp_prune.py            # DDP
    torchrun --nproc_per_node=2 examples/ddp_prune.py --fsdp     # FSDP2 (fully_shard)

or as a plain script (one process). Every rank trains on its share of each global batch (the
global batch is ``--batch-size``), so the result does not depend on the number of processes.
Rank 0 prints the density and the sparsity report; ``--out dense.pt`` writes the finalized dense
state dict (``W * h(M)`` baked in, no ``weight_aux``), which loads into the plain model strictly.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import autoprune_ext as ap  # noqa: E402
from autoprune_ext.autoprune import AutoPrune, AutoPruneConfig  # noqa: E402
from autoprune_ext.distributed import finalize_state_dict  # noqa: E402
from autoprune_ext.training import BatchStream  # noqa: E402


def blobs(n: int, seed: int) -> TensorDataset:
    """A separable 4-class problem in 20 dimensions where only the first 4 inputs matter."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.randn(n, 20, generator=gen) * 0.5
    x[torch.arange(n), y] += 2.0
    return TensorDataset(x, y)


def dense_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial model on every rank (FSDP2 shards each rank's copy)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))


def share(batch: tuple[Tensor, ...], rank: int, world: int) -> tuple[Tensor, ...]:
    """This rank's part of a global batch."""
    return tuple(t.chunk(world)[rank] for t in batch)


def wrap(model: nn.Module, fsdp: bool, device: torch.device) -> nn.Module:
    """DDP or FSDP2 around a model that is already converted to masked layers."""
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard  # type: ignore[no-redef]
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    # no find_unused_parameters needed: the trainer synchronises each step's gradients itself
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (split over the ranks)")
    parser.add_argument("--target-density", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=None, help="write the finalized dense state dict here")
    args = parser.parse_args()

    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of the number of processes ({world})")

    model = ap.convert(dense_model(), init=(0.5, 0.01)).to(device)  # convert before wrapping
    if distributed:
        model = wrap(model, args.fsdp, device)
    config = AutoPruneConfig(penalty=1.0, lr_aux=0.05, lr_weight=1e-3, target_density=args.target_density,
                             controller_gain=0.1, keep_rows=True)
    trainer = AutoPrune(model, config)
    train = BatchStream(blobs(2000, 0), args.batch_size, seed=1)
    held = BatchStream(blobs(500, 1), args.batch_size, seed=2)
    for step in range(args.steps):
        record = trainer.step(share(train.batch(step), rank, world), share(held.batch(step), rank, world))
        if rank == 0 and (step + 1) % 50 == 0:
            print(f"step {record['step']}: density {record['density']:.4f}, loss {record['weight_loss']:.4f}")

    # collective under FSDP2: every rank calls these, rank 0 prints
    density = trainer.density()  # global count over the shards
    report = ap.sparsity_report(trainer.module)
    dense = finalize_state_dict(trainer.model)  # gathers the shards, bakes W * h(M)
    if rank == 0:
        mode = ("FSDP2" if args.fsdp else "DDP") if distributed else "single process"
        print(f"{mode}, {world} process(es): density {density:.4f}")
        print(report.table())
        if args.out is not None:
            torch.save(dense, args.out)
            print(f"finalized dense state dict -> {args.out}")
    trainer.restore_trainable()
    if distributed:
        # every rank done before any tears the group down: a rank that exits while its peer is still
        # in a collective or mid-teardown can take gloo's threads down with it (an abort at exit)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
