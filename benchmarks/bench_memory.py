"""Training bytes per masked weight for each aux memory option, measured from the tensors themselves.

After one real forward, backward and aux step of a model of masked linear layers, the bytes of every
``weight_aux``, its ``.grad`` and every optimiser state tensor (``exp_avg``, ``exp_avg_sq``) are summed
and divided by the number of masked weights. Options: ``standard`` with a float32 aux (the default),
``standard`` with a bfloat16 aux (half the bytes, but small updates are lost: AuxAdam warns),
``bf16_sr`` (bfloat16 aux and moments with stochastic rounding) and ``standard`` and ``bf16_sr``
stepped by ``AuxAdam.fused_step`` on the ``cpp`` backend (the step inside backward: no aux gradient is ever made).

``python benchmarks/bench_memory.py [--out benchmarks/results/memory_cpu.json]`` writes the table;
the ``test_*`` function below runs every option at a small size in the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import autoprune_ext as ap
from autoprune_ext import backends
from autoprune_ext.optim import AuxAdam

#: option -> (AuxAdam memory, aux dtype, stepped by fused_step)
OPTIONS: dict[str, tuple[str, torch.dtype, bool]] = {
    "standard (fp32 aux)": ("standard", torch.float32, False),
    "standard (bf16 aux, stalls)": ("standard", torch.bfloat16, False),
    "bf16_sr": ("bf16_sr", torch.bfloat16, False),
    "standard + fused_step (fp32 aux, cpp on CPU)": ("standard", torch.float32, True),
    "bf16_sr + fused_step (cpp on CPU)": ("bf16_sr", torch.bfloat16, True),
}


def measure(option: str, width: int = 1024, layers: int = 2, tokens: int = 64) -> dict[str, Any]:
    """Bytes per masked weight of ``option`` after one training step of ``layers`` ``width x width`` layers."""
    memory, aux_dtype, fused = OPTIONS[option]
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    ap.convert(model, aux_dtype=aux_dtype)
    opt = AuxAdam.from_model(model, lr=1e-3, penalty=0.5, memory=memory)
    loss = model(torch.randn(tokens, width)).square().mean()
    if fused:
        with backends.use("cpp"), opt.fused_step():
            loss.backward()
    else:
        loss.backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the stalling bf16 option warns, as it should
            opt.step()
    masked = sum(m.weight.numel() for _, m in ap.masked_modules(model))
    parts = {"aux": 0, "grad": 0, "exp_avg": 0, "exp_avg_sq": 0}
    for _, m in ap.masked_modules(model):
        aux = m.weight_aux
        parts["aux"] += aux.numel() * aux.element_size()
        if aux.grad is not None:  # never made under fused_step
            parts["grad"] += aux.grad.numel() * aux.grad.element_size()
        for key in ("exp_avg", "exp_avg_sq"):
            t = opt.state[aux][key]
            parts[key] += t.numel() * t.element_size()
    return {
        "option": option,
        "memory": memory,
        "aux_dtype": str(aux_dtype).removeprefix("torch."),
        "masked_weights": masked,
        "bytes_per_masked_weight": sum(parts.values()) / masked,
        "parts_per_weight": {k: v / masked for k, v in parts.items()},
    }


def run(width: int, layers: int) -> dict[str, Any]:
    return {
        "device": "cpu",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "method": "bytes of weight_aux + weight_aux.grad + AuxAdam state tensors after one real step, / masked weights",
        "rows": [measure(o, width, layers) for o in OPTIONS],
    }


def markdown(result: dict[str, Any]) -> str:
    lines = ["| option | aux | grad | exp_avg | exp_avg_sq | bytes / masked weight |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        p = r["parts_per_weight"]
        lines.append(f"| {r['option']} | {p['aux']:g} | {p['grad']:g} | {p['exp_avg']:g} | {p['exp_avg_sq']:g} "
                     f"| **{r['bytes_per_masked_weight']:g}** |")
    return "\n".join(lines)


def test_every_option_measures(tmp_path):
    result = run(width=32, layers=2)
    by = {r["option"]: r["bytes_per_masked_weight"] for r in result["rows"]}
    assert by == {"standard (fp32 aux)": 16.0, "standard (bf16 aux, stalls)": 12.0, "bf16_sr": 8.0,
                  "standard + fused_step (fp32 aux, cpp on CPU)": 12.0, "bf16_sr + fused_step (cpp on CPU)": 6.0}
    assert "bf16_sr" in markdown(result)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory_cpu.json")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args()
    result = run(args.width, args.layers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
