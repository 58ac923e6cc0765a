"""Prune a causal language model with AutoPrune on a local text file, and compare perplexities.

    python examples/prune_causal_lm.py --text-file FILE [--density 0.3] [--out result.json]

Byte-level tokens (vocabulary 256, no tokenizer to download) and a small Llama built from a config
(random init, then trained dense here): the last ``--heldout`` fraction of the file is held out.
Steps:

1. dense training of the Llama on the first part of the file;
2. AutoPrune (``autoprune_ext.hf.prepare`` + the trainer on dict batches with ``labels``) towards
   ``--density`` with the size-independent penalty and the layer floor, mask steps on a held-out
   slice of the training part (bi-level), weight steps on the rest;
3. finalize (zeros baked in) and the perplexity of dense, AutoPrune, and one-shot global magnitude
   pruning at the density AutoPrune reached, each without and with the same number of fine-tuning
   steps (mask fixed), and of the dense model trained for as many steps in all, on the held-out text.

Every number printed is measured in the run; ``--out`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset


class Windows(Dataset):
    """Byte windows of ``length + 1`` tokens from ``data`` every ``stride`` bytes, as HF batches."""

    def __init__(self, data: torch.Tensor, length: int, stride: int) -> None:
        if data.numel() < length + 1:
            raise ValueError(f"text-file: needs more than {length} bytes in each part, got {data.numel()}")
        self.data, self.length = data, length
        self.starts = list(range(0, data.numel() - length, stride))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.data[self.starts[i] : self.starts[i] + self.length]
        return {"input_ids": ids, "labels": ids}


def make_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=args.context, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: Windows, batch: int = 32) -> float:
    """``exp`` of the mean next-token loss over every window of ``data`` (HF shifts the labels)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch):
        ids = torch.stack([data[j]["input_ids"] for j in range(i, min(i + batch, len(data)))])
        loss = model(input_ids=ids, labels=ids).loss
        n = ids.numel() - ids.shape[0]  # predicted tokens
        total += float(loss) * n
        count += n
    model.train(was)
    return math.exp(total / max(count, 1))


def train_dense(model: torch.nn.Module, data: Windows, steps: int, batch: int, lr: float, seed: int) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g).tolist()
        ids = torch.stack([data[i]["input_ids"] for i in idx])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import copy

    from autoprune_ext import finalize, hf
    from autoprune_ext.autoprune import AutoPrune
    from autoprune_ext.convert import masked_modules
    from autoprune_ext.pruners.magnitude import global_magnitude_prune

    torch.manual_seed(args.seed)
    raw = torch.tensor(list(Path(args.text_file).read_bytes()), dtype=torch.long)
    cut = int(raw.numel() * (1 - args.heldout))
    train_bytes, test_bytes = raw[:cut], raw[cut:]
    mask_cut = int(train_bytes.numel() * 0.9)  # the bi-level mask steps see a slice the weights do not
    train = Windows(train_bytes[:mask_cut], args.context, args.context // 2)
    mask_set = Windows(train_bytes[mask_cut:], args.context, args.context // 2)
    test = Windows(test_bytes, args.context, args.context)
    t0 = time.time()
    model = make_model(args)
    train_dense(model, train, args.dense_steps, args.batch, args.lr, args.seed)
    dense = copy.deepcopy(model)
    import platform

    import transformers

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "text_file": str(args.text_file), "bytes": raw.numel(), "heldout_bytes": test_bytes.numel(),
        "model": {"hidden": args.hidden, "layers": args.layers, "context": args.context,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "dense_steps": args.dense_steps, "prune_steps": args.prune_steps, "target_density": args.density,
        "ppl_dense": perplexity(dense, test),
    }

    hf.prepare(model)
    masked = sum(m.weight.numel() for _, m in masked_modules(model))
    trainer = AutoPrune(
        model, lr_weight=args.lr / 3, lr_aux=args.lr_aux, penalty=args.penalty, penalty_mode="relative",
        target_density=args.density, controller_gain=0.05, min_density=0.01, keep_rows=True,
        batch_size=args.batch, seed=args.seed,
    )
    trainer.fit(train, mask_set, steps=args.prune_steps)
    result["masked_weights"] = masked
    result["density_autoprune"] = trainer.density()
    result["layer_density_min"] = min(trainer.layer_densities().values())
    result["ppl_autoprune"] = perplexity(finalize(model), test)
    # fine-tune with the mask fixed: the same budget the magnitude baseline gets below
    for _, m in masked_modules(model):
        m.weight_aux.requires_grad_(False)
    train_dense(model, train, args.prune_steps, args.batch, args.lr / 3, args.seed + 7)
    result["ppl_autoprune_finetuned"] = perplexity(finalize(model), test)

    # one-shot global magnitude at the density AutoPrune reached, then the same fine-tuning budget
    magnitude = copy.deepcopy(dense)
    global_magnitude_prune(magnitude, result["density_autoprune"])
    result["ppl_magnitude_oneshot"] = perplexity(magnitude, test)
    train_dense(magnitude, train, args.prune_steps, args.batch, args.lr / 3, args.seed + 7)
    result["ppl_magnitude_finetuned"] = perplexity(magnitude, test)
    # the dense model trained for as many steps as the pruned ones got in all (prune + fine-tune)
    longer = copy.deepcopy(dense)
    train_dense(longer, train, 2 * args.prune_steps, args.batch, args.lr / 3, args.seed + 11)
    result["ppl_dense_same_budget"] = perplexity(longer, test)
    result["seconds"] = round(time.time() - t0, 1)
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text-file", required=True, type=Path, help="a local UTF-8 or binary text file")
    p.add_argument("--density", type=float, default=0.3, help="target fraction of kept masked weights")
    p.add_argument("--heldout", type=float, default=0.1, help="fraction of the file held out for perplexity")
    p.add_argument("--dense-steps", type=int, default=600)
    p.add_argument("--prune-steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-aux", type=float, default=0.02)
    p.add_argument("--penalty", type=float, default=0.3, help="lambda (penalty_mode='relative')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not 0.0 < args.density <= 1.0:
        p.error(f"--density: expected a fraction in (0, 1], got {args.density}")
    if not args.text_file.is_file():
        p.error(f"--text-file: {args.text_file} is not a file")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    result = run(args)
    for key in ("ppl_dense", "ppl_dense_same_budget", "ppl_autoprune", "ppl_autoprune_finetuned",
                "ppl_magnitude_oneshot", "ppl_magnitude_finetuned"):
        print(f"{key:>24}: {result[key]:.3f}")
    print(f"{'density_autoprune':>24}: {result['density_autoprune']:.4f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
