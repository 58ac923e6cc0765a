"""Full training step benchmark: masked layers against dense layers and PyTorch's own pruning.

One *step* is forward, backward (``out.backward(g)`` with a fixed ``g``; the input requires grad, as an
interior layer's does, so dX is computed), the weight optimiser step (``torch.optim.Adam`` over every
parameter but the aux tensors), the aux step (:class:`autoprune_ext.optim.AuxAdam`, masked models only)
and ``zero_grad(set_to_none=True)``. Implementations, each a fresh copy of the same seeded model:

* ``dense``               -- the plain model (Adam);
* ``dense_repeat``        -- the same dense model once more: a control, whose ratio to ``dense`` shows how
  far two identical steps differ on this machine (the noise floor of every ratio);
* ``masked_<backend>``    -- ``autoprune_ext.convert(model)`` run under ``backends.use(<backend>)`` for
  ``reference`` and ``cpp``, and ``triton`` on CUDA only (on CPU its interpreter is far too slow: skipped,
  with the reason recorded);
* ``masked_cpp_fused``    -- the ``masked_cpp`` model stepped with ``with aux_opt.fused_step(): backward``
  (the aux step taken inside backward, opt-in; CPU only), then the weight step: bit for bit the same training;
* ``masked_cpp_bf16sr``   -- ``masked_cpp`` with bfloat16 aux tensors and ``AuxAdam(memory="bf16_sr")`` (the lean
  memory option: 8 bytes per masked weight); ``masked_cpp_bf16sr_fused`` the same stepped by ``fused_step``;
* ``torch_prune_l1``      -- ``torch.nn.utils.prune.l1_unstructured(amount=0.5)`` on every Linear / Conv2d:
  the mask is fixed, only the weights step;
* ``torch_ao_sparsifier`` -- ``torch.ao.pruning.WeightNormSparsifier`` (unstructured, 50%) ``prepare`` +
  one ``step()``: a fixed parametrization mask, only the weights step (where the API cannot handle a
  layer, the error is recorded);
* ``<impl>+compile``      -- MLP case: ``torch.compile(model)`` (forward + backward), optimisers eager,
  for dense and the masked model; the ratio is to the compiled dense step.

Cases: ``mlp`` (one 1024x1024 Linear, 4096 tokens), ``conv`` (64->64 3x3 on a 32x64x32x32 batch),
``transformer`` (pre-LN block built from nn.Linear: d=512, 4 heads, MLP 2048, seq 256, batch 8), ``lenet300``
(LeNet-300-100 on 8x8 digits, batch 64: a small model, whose step is mostly per-layer fixed costs), and on
CUDA only ``mlp_4096`` (4096x4096, 16k tokens, bf16). Plus ``apply_mask`` forward + backward at 16M
elements, cpp against reference. All impls of one case and dtype are timed in interleaved rounds whose
order rotates (as in ``bench_cpp``); median and IQR over rounds. The cases the 1.05x target judges
(``mlp``, ``mlp_4096``) get ``TARGET_ROUNDS_FACTOR`` times the rounds.

``python benchmarks/bench_step.py --out benchmarks/results/step_cpu_vm.json [--quick] [--heap steady]`` measures
and writes the JSON; ``--markdown FILE.json`` prints its Markdown table. Every row records the mean minor page
faults per step: on a small VM a fault costs several microseconds, and with glibc's default heap (``--heap
default``) how many pages a step faults in again depends on the heap's history, which moves every step time by
several percent between runs; ``--heap steady`` keeps freed memory in the heap (see :data:`HEAPS`).
``pytest benchmarks/bench_step.py`` runs a tiny smoke of every implementation and of the writer.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __name__ == "__main__":  # script mode: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autoprune_ext as ap  # noqa: E402
from autoprune_ext import _build, backends  # noqa: E402
from autoprune_ext.optim import AuxAdam  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
# masked_cpp right after dense: the pair the 1.05x target compares runs back to back in most rotations.
# dense_repeat is a second, identical dense model: its ratio to dense is the noise floor of the ratios.
EAGER_IMPLS = ("dense", "masked_cpp", "dense_repeat", "masked_cpp_fused", "masked_cpp_bf16sr", "masked_cpp_bf16sr_fused",
               "masked_reference", "masked_triton", "torch_prune_l1", "torch_ao_sparsifier")
#: the suffix of an implementation that steps the aux tensors inside backward (AuxAdam.fused_step)
FUSED = "_fused"
#: the suffix of an implementation with bfloat16 aux tensors and AuxAdam(memory="bf16_sr")
SR = "_bf16sr"
#: the target case gets this many times the rounds: its ratio is judged against 1.05 on a machine whose
#: per-step noise (IQR 5-10%) is larger than the masked overhead itself
TARGET_ROUNDS_FACTOR = 3
#: the masked implementations the step target judges (triton on CUDA only)
TARGET_IMPLS = ("masked_cpp", "masked_cpp+compile", "masked_cpp_fused", "masked_cpp_bf16sr", "masked_cpp_bf16sr_fused",
                "masked_triton", "masked_triton+compile")
COMPILED_IMPLS = ("dense+compile", "masked_cpp+compile", "masked_triton+compile")
LOAD_NOTE_ABOVE = 1.5
TRITON_CPU_SKIP = "CPU: the Triton interpreter (TRITON_INTERPRET=1) is far too slow for a training-step benchmark"


class Skip(Exception):
    """An implementation that cannot run here; the message is the recorded reason."""


# --------------------------------------------------------------------------------------------------
# models and cases
# --------------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-LN transformer block from nn.Linear (qkv, proj, fc1, fc2), causal SDPA, GELU MLP."""

    def __init__(self, d: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


@dataclass(frozen=True)
class Case:
    name: str
    desc: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    cuda_only: bool = False
    compiled: bool = False
    target: bool = False  # a case the 1.05x step target judges: TARGET_ROUNDS_FACTOR x the rounds
    rounds_factor: int = 1  # more rounds for steps of a few milliseconds (cheap, and noisier per step)


def cases(tiny: bool = False) -> list[Case]:
    """The benchmark cases; ``tiny`` shrinks every shape for the smoke test."""
    if tiny:
        return [
            Case("mlp", "Linear 32x32, 64 tokens", lambda: nn.Linear(32, 32), (64, 32), compiled=True, target=True),
            Case("conv", "Conv2d 4->4 3x3, batch 2x4x8x8", lambda: nn.Conv2d(4, 4, 3, padding=1), (2, 4, 8, 8)),
            Case("transformer", "block d=32, 2 heads, MLP 64, seq 8, batch 2", lambda: Block(32, 2, 64), (2, 8, 32)),
            Case("lenet300", "LeNet-300-100 on 4x4 inputs, batch 4", lambda: _lenet300(4), (4, 1, 4, 4), ("fp32",)),
            Case("mlp_4096", "Linear 64x64, 128 tokens", lambda: nn.Linear(64, 64), (128, 64), ("bf16",), True,
                 target=True),
        ]
    return [
        Case("mlp", "Linear 1024x1024, 4096 tokens", lambda: nn.Linear(1024, 1024), (4096, 1024), compiled=True,
             target=True),
        Case("conv", "Conv2d 64->64 3x3 pad 1, batch 32x64x32x32", lambda: nn.Conv2d(64, 64, 3, padding=1),
             (32, 64, 32, 32)),
        Case("transformer", "pre-LN block d=512, 4 heads, MLP 2048, seq 256, batch 8", lambda: Block(512, 4, 2048),
             (8, 256, 512)),
        Case("lenet300", "LeNet-300-100 on 8x8 digits, batch 64", lambda: _lenet300(8), (64, 1, 8, 8), ("fp32",),
             rounds_factor=20),
        Case("mlp_4096", "Linear 4096x4096, 16384 tokens", lambda: nn.Linear(4096, 4096), (16384, 4096), ("bf16",),
             cuda_only=True, target=True),
    ]


def _lenet300(image_size: int) -> nn.Module:
    from autoprune_ext.models import get_model

    return get_model("lenet300", num_classes=10, in_channels=1, image_size=image_size)


# --------------------------------------------------------------------------------------------------
# one training step per implementation
# --------------------------------------------------------------------------------------------------
@dataclass
class Step:
    fn: Callable[[], None]
    state_bytes: int
    note: str = ""
    compile_s: float | None = None
    keep: list[Any] = field(default_factory=list)  # objects the closure needs alive


def _prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]


def _state_bytes(model: nn.Module, opts: Iterable[torch.optim.Optimizer]) -> int:
    """Bytes of everything a step keeps between steps: parameters, buffers, optimiser states."""
    seen: dict[int, int] = {}
    tensors = list(model.parameters()) + list(model.buffers())
    for opt in opts:
        for st in opt.state.values():
            tensors += [v for v in st.values() if isinstance(v, Tensor)]
    for t in tensors:
        seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
    return sum(seen.values())


def _sparsify_ao(model: nn.Module) -> str:
    from torch.ao.pruning import WeightNormSparsifier

    sp = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1), zeros_per_block=1)
    layers = _prunable(model)
    sp.prepare(model, [{"tensor_fqn": f"{n}.weight" if n else "weight"} for n, _ in layers])
    sp.step()
    cast = False
    for _, m in layers:
        for p in m.parametrizations.weight:
            if p.mask.dtype != m.parametrizations.weight.original.dtype:  # fp32 mask would promote a bf16 weight
                p.mask = p.mask.to(m.parametrizations.weight.original.dtype)
                cast = True
    return "WeightNormSparsifier(0.5, block 1x1) prepare + one step(): mask fixed, weight step only" + (
        "; its fp32 mask buffer cast to the weight dtype (else bf16 F.linear fails on mixed dtypes)" if cast else "")


def availability(impl: str, device: torch.device) -> str | None:
    """``None`` if ``impl`` can run on ``device``, else the reason it is skipped."""
    base = impl.removesuffix("+compile")
    if base.startswith("masked_"):
        name = base.removeprefix("masked_").removesuffix(FUSED).removesuffix(SR)
        if base.endswith(FUSED) and (name != "cpp" or device.type != "cpu"):
            return "AuxAdam.fused_step fuses on the cpp backend's CPU path only"
        if name == "triton" and device.type == "cpu":
            return TRITON_CPU_SKIP
        ok, why = backends.availability(name, device.type)
        return None if ok else f"backend {name!r}: {why}"
    return None


def make_step(case: Case, impl: str, dtype: torch.dtype, device: torch.device, *,
              compile_backend: str = "inductor") -> Step:
    """A ready (warmed-up: two steps done) training step of ``impl`` on ``case``; raises Skip."""
    why = availability(impl, device)
    if why is not None:
        raise Skip(why)
    base, compiled = impl.removesuffix("+compile"), impl.endswith("+compile")
    torch.manual_seed(0)
    model = case.build().to(device=device, dtype=dtype)
    x = torch.randn(case.input_shape, device=device, dtype=dtype, requires_grad=True)
    aux_opt: AuxAdam | None = None
    aux_ids: set[int] = set()
    backend: str | None = None
    note = ""
    fused, sr = base.endswith(FUSED), base.removesuffix(FUSED).endswith(SR)
    if base.startswith("masked_"):
        backend = base.removeprefix("masked_").removesuffix(FUSED).removesuffix(SR)
        model = ap.convert(model, aux_dtype=torch.bfloat16 if sr else None)  # a bare layer comes back as a new one
        aux_ids = {id(m.weight_aux) for _, m in ap.masked_modules(model)}
        aux_opt = AuxAdam.from_model(model, lr=1e-2, penalty=0.1, memory="bf16_sr" if sr else "standard")
    elif base == "torch_prune_l1":
        import torch.nn.utils.prune as prune

        for _, m in _prunable(model):
            prune.l1_unstructured(m, "weight", amount=0.5)
        note = "l1_unstructured(0.5) once: mask fixed, weight step only"
    elif base == "torch_ao_sparsifier":
        try:
            note = _sparsify_ao(model)
        except Exception as exc:  # the API is missing or rejects this layer type
            raise Skip(f"torch.ao.pruning.WeightNormSparsifier: {type(exc).__name__}: {str(exc)[:160]}") from exc
    elif base not in ("dense", "dense_repeat"):
        raise ValueError(f"impl: unknown {impl!r}")
    w_opt = torch.optim.Adam([p for p in model.parameters() if id(p) not in aux_ids], lr=1e-4)
    opts: list[torch.optim.Optimizer] = [w_opt] + ([aux_opt] if aux_opt is not None else [])
    fwd = torch.compile(model, backend=compile_backend) if compiled else model
    with torch.no_grad():
        g = torch.randn_like(model(x))  # eager: the shape only
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        with backends.use(backend) if backend is not None else contextlib.nullcontext():
            if fused:  # the aux step inside backward, then the weights'
                with aux_opt.fused_step():  # type: ignore[union-attr]
                    fwd(x).backward(g)
                w_opt.step()
            else:
                fwd(x).backward(g)
                for opt in opts:
                    opt.step()
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            x.grad = None
        sync()

    t0 = time.perf_counter()
    step()
    first_s = time.perf_counter() - t0
    step()
    return Step(step, _state_bytes(model, opts), note, round(first_s, 2) if compiled else None, [model, fwd, x, g])


# --------------------------------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------------------------------
def minor_faults() -> int | None:
    """Minor page faults of this process so far (``None`` where ``getrusage`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(fns: dict[str, Callable[[], object]], rounds: int,
                faults: dict[str, list[int]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each callable over ``rounds`` rounds; the order rotates every round.

    Callers warm up first. Interleaving spreads machine noise (other jobs, page-fault state) over
    every implementation instead of biasing whichever runs during a noisy stretch. ``faults``, if
    given, receives each call's minor page faults (first touches of fresh pages: on a small VM
    several microseconds each, and how many a step takes depends on the malloc heap's state).
    """
    from bench_cpp import timed_round  # same directory: the one rotation rule of both benchmarks

    def counted(name: str, fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            before = minor_faults()
            out = fn()
            after = minor_faults()
            if before is not None and after is not None:
                faults.setdefault(name, []).append(after - before)  # type: ignore[union-attr]
            return out
        return call

    if faults is not None:
        fns = {n: counted(n, f) for n, f in fns.items()}
    times: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(rounds):
        timed_round(fns, times, r)
    return times


def paired_ci90(ts: list[float], base: list[float], resamples: int = 2000) -> list[float] | None:
    """90% bootstrap interval (rounds resampled with replacement, fixed seed) of the median over rounds
    of ``ts[r] / base[r]``: how far the paired ratio could move on this machine's noise."""
    import random

    ratios = [a / b for a, b in zip(ts, base)]
    if len(ratios) < 5:
        return None
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return [round(meds[int(0.05 * resamples)], 3), round(meds[int(0.95 * resamples) - 1], 3)]


def summary_ms(ts: list[float]) -> tuple[float, float, float, float]:
    """(median, IQR, q1, q3) in ms."""
    ms = [t * 1e3 for t in ts]
    if len(ms) < 2:
        return ms[0], 0.0, ms[0], ms[0]
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    return statistics.median(ms), q3 - q1, q1, q3


def _status_kib(key: str) -> int | None:
    from bench_cpp import _status_kib as status_kib  # one /proc/self/status reader for both benchmarks

    return status_kib(key)


_libc: Any = None
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def _glibc() -> Any:
    """The C library with glibc's malloc controls, or ``None`` (not Linux / not glibc)."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
            _libc = lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


def _malloc(trim: bool = True, exact: bool = False) -> None:
    """glibc: ``exact`` maps every block >= 128 KiB separately (freed at once, so RSS follows live
    memory); ``trim`` returns free heap pages to the kernel (reused ones then count as new)."""
    libc = _glibc()
    if libc is None:
        return
    if exact:
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)  # also stops its dynamic growth
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
    if trim:
        libc.malloc_trim(0)


#: ``--heap`` settings: glibc's default (frees above a dynamic threshold go back to the kernel, so
#: the next step faults those pages in again; how many depends on the heap's history), or a steady
#: heap (freed memory stays in the heap for reuse, as jemalloc / tcmalloc keep it): neither trims
#: nor maps blocks below 32 MiB separately
HEAPS = ("default", "steady")


def set_heap(heap: str) -> str:
    """Apply a :data:`HEAPS` setting to this process; returns what is in effect (glibc only)."""
    if heap not in HEAPS:
        raise ValueError(f"heap: expected one of {HEAPS}, got {heap!r}")
    if heap == "default":
        return heap
    libc = _glibc()
    if libc is None or not (libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) and libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)):
        raise RuntimeError("heap='steady' needs glibc's mallopt (Linux)")
    return heap


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory one step adds on top of what is held between steps (max of two steps).

    CUDA: ``max_memory_allocated`` above ``memory_allocated``. CPU (Linux): VmHWM above VmRSS after
    trimming the heap (``/proc/self/clear_refs`` resets the high-water mark).
    """
    peaks: list[float] = []
    for _ in range(2):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            peaks.append((torch.cuda.max_memory_allocated() - before) / 2**20)
            continue
        _malloc()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return None
        before = _status_kib("VmRSS")
        fn()
        peak = _status_kib("VmHWM")
        if before is None or peak is None:
            return None
        peaks.append(max(peak - before, 0) / 1024)
    return round(max(peaks), 1)


# --------------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------------
def measure_steps(case_list: list[Case], device: torch.device, rounds: int, *, compile_backend: str = "inductor",
                  log: Callable[[str], None] = print) -> tuple[list[dict], list[dict], dict[tuple, Step]]:
    """Rows (timings; memory filled in by :func:`measure_memory`), skipped entries, and the steps."""
    rows: list[dict] = []
    skipped: list[dict] = []
    steps: dict[tuple, Step] = {}
    for case in case_list:
        if case.cuda_only and device.type != "cuda":
            skipped.append({"case": case.name, "dtype": ",".join(case.dtypes), "impl": "*",
                            "reason": "CUDA only (shape too large for a CPU step benchmark)"})
            continue
        for dname in case.dtypes:
            groups = [EAGER_IMPLS] + ([COMPILED_IMPLS] if case.compiled else [])
            for impls in groups:
                group: dict[str, Step] = {}
                for impl in impls:
                    try:
                        group[impl] = make_step(case, impl, DTYPES[dname], device, compile_backend=compile_backend)
                    except Skip as exc:
                        skipped.append({"case": case.name, "dtype": dname, "impl": impl, "reason": str(exc)})
                gc.collect()
                n_rounds = rounds * (TARGET_ROUNDS_FACTOR if case.target else 1) * case.rounds_factor
                faults: dict[str, list[int]] = {}
                times = interleaved({k: s.fn for k, s in group.items()}, n_rounds, faults)
                base = "dense+compile" if impls is COMPILED_IMPLS else "dense"
                dense_ms = statistics.median(times[base]) * 1e3 if base in times else None
                dense_t = times.get(base)
                for impl, st in group.items():
                    med, iqr, q1, q3 = summary_ms(times[impl])
                    rows.append({
                        "case": case.name, "shape": case.desc, "impl": impl, "dtype": dname,
                        "compiled": impl.endswith("+compile"), "ms_median": round(med, 3), "ms_iqr": round(iqr, 3),
                        "ms_q1": round(q1, 3), "ms_q3": round(q3, 3), "rounds": len(times[impl]),
                        "ratio_to_dense": round(med / dense_ms, 3) if dense_ms else None,
                        # the same round's dense step is its pair: slow drifts of the machine cancel
                        "ratio_paired": round(statistics.median(a / b for a, b in zip(times[impl], dense_t)), 3)
                        if dense_t else None,
                        "ratio_paired_ci90": paired_ci90(times[impl], dense_t) if dense_t else None,
                        # the mean: a step that faults a buffer in again costs its pages' time once
                        "faults_per_step": round(statistics.fmean(faults[impl])) if faults.get(impl) else None,
                        "peak_extra_MB": None, "state_MB": round(st.state_bytes / 2**20, 3),
                        "compile_s": st.compile_s, "note": st.note,
                    })
                    steps[(case.name, dname, impl)] = st
                    r = rows[-1]
                    log(f"{case.name:12s} {dname} {impl:22s} {r['ms_median']:9.2f} ms  IQR {r['ms_iqr']:7.2f}  "
                        f"x{r['ratio_to_dense']}")
    return rows, skipped, steps


def measure_memory(rows: list[dict], steps: dict[tuple, Step], device: torch.device) -> None:
    """Fills ``peak_extra_MB`` of every row (run last on CPU: it changes malloc's settings)."""
    if device.type == "cpu":
        _malloc(exact=True)
    for r in rows:
        r["peak_extra_MB"] = peak_extra_mb(steps[(r["case"], r["dtype"], r["impl"])].fn, device)


def apply_mask_micro(numel: int, device: torch.device, rounds: int) -> list[dict]:
    """``functional.apply_mask(W, M)`` forward + backward (dW and dM), cpp against reference, interleaved."""
    ok, why = backends.availability("cpp", device.type)
    if not ok:
        return [{"numel": numel, "dtype": d, "skipped": f"cpp: {why}"} for d in DTYPES]
    out = []
    rows_n = 4096 if numel % 4096 == 0 else 1
    for dname, dtype in DTYPES.items():
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(rows_n, numel // rows_n, generator=gen).to(device, dtype).requires_grad_()
        m = torch.randn(rows_n, numel // rows_n, generator=gen).to(device).requires_grad_()
        g = torch.randn(w.shape, generator=gen).to(device, dtype)

        def run(name: str) -> Callable[[], None]:
            def fn() -> None:
                with backends.use(name):
                    ap.functional.apply_mask(w, m).backward(g)
                w.grad = m.grad = None
                if device.type == "cuda":
                    torch.cuda.synchronize()
            return fn

        fns = {"reference": run("reference"), "cpp": run("cpp")}
        for f in fns.values():
            f(), f()
        times = interleaved(fns, rounds)
        ref_ms, cpp_ms = (summary_ms(times[k]) for k in ("reference", "cpp"))
        out.append({"numel": numel, "dtype": dname, "reference_ms": round(ref_ms[0], 3),
                    "reference_iqr": round(ref_ms[1], 3), "cpp_ms": round(cpp_ms[0], 3),
                    "cpp_iqr": round(cpp_ms[1], 3), "speedup": round(ref_ms[0] / cpp_ms[0], 2)})
    return out


#: the library matmuls/convolutions, identical work in dense and masked steps (their run-to-run noise
#: on a shared VM is larger than the whole masked overhead)
GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_convolution",
                      "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_scaled_dot_product_flash_attention_for_cpu",
                      "aten::_scaled_dot_product_flash_attention_for_cpu_backward"})


def overhead(prof: dict[str, dict]) -> dict[str, dict]:
    """Per dtype: the masked step's self CPU time outside the GEMMs minus the dense step's, and that
    as a fraction of the dense step (a noise-robust estimate of the masked overhead)."""
    out: dict[str, dict] = {}
    for key, masked in prof.items():
        if not key.endswith("_masked_cpp"):
            continue
        dense = prof.get(key.removesuffix("_masked_cpp") + "_dense")
        if dense is None:
            continue
        extra = masked["non_gemm_self_cpu_ms"] - dense["non_gemm_self_cpu_ms"]
        out[key.removesuffix("_masked_cpp")] = {
            "dense_non_gemm_ms": dense["non_gemm_self_cpu_ms"], "masked_non_gemm_ms": masked["non_gemm_self_cpu_ms"],
            "extra_ms": round(extra, 2), "extra_over_dense_step": round(extra / dense["self_cpu_ms_per_step_total"], 4)}
    return out


def profile(steps: dict[str, Step], n: int = 9, top: int = 12) -> dict[str, dict]:
    """Top ops by self CPU time (torch.profiler) per step of each named step.

    Every step is profiled on its own, the named steps in turn (``n`` each); each figure is the median
    over those ``n`` single-step profiles, so one step disturbed by the machine does not count.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    per_op: dict[str, list[dict[str, float]]] = {name: [] for name in steps}
    calls: dict[str, dict[str, int]] = {name: {} for name in steps}
    walls: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(n):
        for name, st in steps.items():
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                st.fn()
                walls[name].append(time.perf_counter() - t0)
            ev = prof.key_averages()
            per_op[name].append({e.key: e.self_cpu_time_total / 1e3 for e in ev})
            calls[name].update({e.key: e.count for e in ev})
    out: dict[str, dict] = {}
    for name, profiles in per_op.items():
        def med(f: Callable[[dict[str, float]], float]) -> float:
            return statistics.median(f(p) for p in profiles)

        keys = {k for p in profiles for k in p}
        ops = sorted(((med(lambda p, k=k: p.get(k, 0.0)), k) for k in keys), reverse=True)
        gemm = med(lambda p: sum(v for k, v in p.items() if k in GEMM_OPS))
        total = med(lambda p: sum(p.values()))
        out[name] = {
            "wall_ms_per_step_profiled": round(statistics.median(walls[name]) * 1e3, 2),
            "gemm_self_cpu_ms": round(gemm, 2),
            "non_gemm_self_cpu_ms": round(med(lambda p: sum(v for k, v in p.items() if k not in GEMM_OPS)), 2),
            "self_cpu_ms_per_step_total": round(total, 2),
            "profiled_steps": n,
            "top_ops": [{"op": k, "self_cpu_ms": round(v, 3), "calls": calls[name][k]} for v, k in ops[:top]],
        }
    return out


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------
def _slug(s: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", s).strip("_").lower() or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return _slug(torch.cuda.get_device_name(device))
    return "cpu_" + _slug(platform.node() or "host")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The vector / matrix extensions that decide CPU GEMM speed (bf16 GEMMs without avx512_bf16 or
    AMX run emulated, orders of magnitude slower, which swamps every other cost of a step)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(re.findall(r"\b(avx2|avx512f|avx512_bf16|amx_bf16|amx_tile)\b", text))
    return sorted(flags)


def _versions() -> dict[str, str | None]:
    try:
        import triton

        tv: str | None = triton.__version__
    except Exception as exc:
        tv = f"unavailable ({type(exc).__name__})"
    return {"torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda, "python": platform.python_version(),
            "autoprune_ext": ap.__version__, "extension": _build.origin()}


def targets(rows: list[dict], micro: list[dict], device: torch.device) -> dict[str, dict]:
    """The issue's targets, evaluated (never adjusted): masked step <= 1.05x dense (MLP, eager and
    compiled; on CUDA also the 4096x4096 bf16 case), apply_mask forward + backward >= 3x the
    reference at 16M elements. Judged on the
    paired ratio (median over rounds of masked / the same round's dense); the ratio of medians is
    kept beside it."""
    out: dict[str, dict] = {}
    for r in rows:
        if r["case"] in ("mlp", "mlp_4096") and r["impl"] in TARGET_IMPLS and r["ratio_paired"]:
            control = next((c["ratio_paired"] for c in rows if c["impl"] == "dense_repeat" and not r["compiled"]
                            and (c["case"], c["dtype"]) == (r["case"], r["dtype"])), None)
            out[f"step_{r['case']}_{r['dtype']}_{r['impl']}_within_1.05x_dense"] = {
                "ratio": r["ratio_paired"], "ci90": r["ratio_paired_ci90"], "ratio_of_medians": r["ratio_to_dense"],
                "dense_repeat_ratio": control,
                "met": r["ratio_paired"] <= 1.05, "device": device.type}
    for m in micro:
        if "speedup" in m:
            out[f"apply_mask_fwd_bwd_{m['dtype']}_{m['numel']}_ge_3x_reference"] = {
                "speedup": m["speedup"], "met": m["speedup"] >= 3.0}
    return out


def write_results(path: str | os.PathLike, *, device: torch.device, rounds: int, tiny: bool = False,
                  case_names: Iterable[str] | None = None, dtypes: Iterable[str] | None = None, micro_numel: int = 16 * 2**20, do_profile: bool = True,
                  compile_backend: str = "inductor", heap: str = "default",
                  log: Callable[[str], None] = print) -> dict:
    heap = set_heap(heap)  # before any model exists: the whole run sees one heap policy
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    _build.load(build=True)
    backends.clear_cache()
    wanted = set(case_names) if case_names else None
    case_list = [c for c in cases(tiny) if wanted is None or c.name in wanted]
    if dtypes is not None:
        keep = tuple(dtypes)
        case_list = [dataclasses.replace(c, dtypes=tuple(d for d in c.dtypes if d in keep)) for c in case_list]
    rows, skipped, steps = measure_steps(case_list, device, rounds, compile_backend=compile_backend, log=log)
    micro = apply_mask_micro(micro_numel, device, rounds)
    for m in micro:
        log(f"apply_mask fwd+bwd {m['dtype']} {m['numel']}: {m}")
    prof: dict[str, dict] = {}
    if do_profile:
        for dname in ("fp32", "bf16"):
            chosen = {f"mlp_{dname}_{impl}": steps[("mlp", dname, impl)] for impl in ("dense", "masked_cpp")
                      if ("mlp", dname, impl) in steps}
            prof.update(profile(chosen, n=1 if tiny else 9))
    measure_memory(rows, steps, device)
    load_end = os.getloadavg()
    data: dict[str, Any] = {
        "device": {"name": device_name(device), "type": device.type, "cpu": _cpu_model(), "cpu_flags": _cpu_flags(),
                   "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                   "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                   "platform": platform.platform()},
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": {"start": [round(v, 2) for v in load_start], "end": [round(v, 2) for v in load_end]},
        "note": (f"other processes were running: 1-min load average {load_start[0]:.2f} > {LOAD_NOTE_ABOVE} at start "
                 f"on {os.cpu_count()} logical CPUs, timings are noisy" if load_start[0] > LOAD_NOTE_ABOVE else ""),
        "method": (f"one step = forward, out.backward(g) (input requires grad: dX computed), Adam on the weights, "
                   f"AuxAdam (penalty 0.1) on the aux tensors of masked models, zero_grad(set_to_none). Each impl is a "
                   f"fresh seeded model, warmed up by two steps (compile_s: the first compiled step), then "
                   f"{rounds} interleaved rounds ({TARGET_ROUNDS_FACTOR * rounds} for the mlp target case, "
                   f"{rounds} x rounds_factor for small cases) with "
                   f"rotating order per case/dtype group; ms_median and "
                   f"ms_iqr (q3 - q1) over rounds. ratio_to_dense: median / the group's dense median (compiled rows: "
                   f"/ dense+compile). +compile: torch.compile(model, backend={compile_backend!r}), optimisers eager. "
                   f"peak_extra_MB: " + ("CUDA max_memory_allocated above memory_allocated over one step"
                                         if device.type == "cuda" else
                                         "VmHWM above VmRSS over one step after malloc_trim, measured last with glibc "
                                         "mmap-ing every block >= 128 KiB") +
                   "; state_MB: parameters, buffers and optimiser states held between steps. faults_per_step: "
                   "mean minor page faults per timed step (getrusage). heap: 'default' is glibc's malloc as "
                   "configured; 'steady' never trims the heap nor maps blocks below 32 MiB on their own (freed "
                   "memory is reused without new page faults, as jemalloc / tcmalloc do)."),
        "config": {"rounds": rounds, "tiny": tiny, "heap": heap, "cases": {c.name: c.desc for c in case_list},
                   "wall_s": round(time.perf_counter() - t_start, 1)},
        "rows": rows,
        "skipped": skipped,
        "apply_mask_fwd_bwd": micro,
        "targets": targets(rows, micro, device),
        "profile_mlp": prof,
        "overhead_mlp": overhead(prof),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def _f(v: object, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def _ci(ci: list[float] | None) -> str:
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def render_markdown(data: dict) -> str:
    """The README table (and the apply_mask microbenchmark, targets, skips) from a results JSON."""
    d, v = data["device"], data["versions"]
    la = data["load_average"]["start"]
    lines = [f"Device `{d['name']}` ({d['gpu'] or d['cpu']}, {d['torch_threads']} threads), torch {v['torch']}, "
             f"triton {v['triton']}, {data['date']}, load average at start {la[0]:.2f}, "
             f"heap {data['config'].get('heap', 'default')}."
             + (f" **{data['note']}.**" if data.get("note") else ""), "",
             "| case | dtype | impl | ms (median) | IQR | × dense (paired) [90% CI] | × dense (medians) | faults/step "
             "| peak extra MB | state MB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['case']} | {r['dtype']} | {r['impl']} | {_f(r['ms_median'])} | {_f(r['ms_iqr'])} | "
                     f"{_f(r.get('ratio_paired'), '.3f')}{_ci(r.get('ratio_paired_ci90'))} | "
                     f"{_f(r['ratio_to_dense'], '.3f')} | {_f(r.get('faults_per_step'), '.0f')} | "
                     f"{_f(r['peak_extra_MB'], '.1f')} | {_f(r['state_MB'], '.1f')} |")
    micro = [m for m in data["apply_mask_fwd_bwd"] if "speedup" in m]
    if micro:
        lines += ["", "`apply_mask` forward + backward:", "",
                  "| elements | dtype | reference ms | cpp ms | speed-up |", "|---:|---|---:|---:|---:|"]
        lines += [f"| {m['numel']} | {m['dtype']} | {_f(m['reference_ms'])} | {_f(m['cpp_ms'])} | {_f(m['speedup'])}x |"
                  for m in micro]
    for dt, o in data.get("overhead_mlp", {}).items():
        lines += ["", f"Profiled overhead, {dt.replace('_', ' ')} masked_cpp: {o['extra_ms']:.2f} ms per step of self "
                      f"CPU time outside the GEMMs beyond the dense step's ({100 * o['extra_over_dense_step']:.1f}% "
                      "of the dense step)."]
    if data["targets"]:
        def judged(t: dict) -> str:
            extra = _ci(t.get("ci90")) + (f", dense_repeat {t['dense_repeat_ratio']:.3f}"
                                          if t.get("dense_repeat_ratio") else "")
            return f"{'met' if t['met'] else 'NOT met'} ({t.get('ratio', t.get('speedup'))}{extra})"

        lines += ["", "Targets: " + "; ".join(f"{k}: {judged(t)}" for k, t in data["targets"].items())]
    notes = sorted({f"{r['impl']}: {r['note']}" for r in data["rows"] if r["note"]})
    skips = [f"{s['case']} {s['dtype']} {s['impl']}: {s['reason']}" for s in data["skipped"]]
    lines += [""] + [f"- {n}" for n in notes] + [f"- skipped {s}" for s in skips]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# smoke tests (pytest benchmarks)
# --------------------------------------------------------------------------------------------------
def test_paired_ci90() -> None:
    base = [1.0 + 0.01 * (i % 7) for i in range(30)]
    assert paired_ci90([1.1 * b for b in base], base) == [1.1, 1.1]  # every round the same ratio
    noisy = [b * (1.05 + 0.04 * ((i * 37) % 11 - 5) / 5) for i, b in enumerate(base)]
    lo, hi = paired_ci90(noisy, base)
    med = statistics.median(a / b for a, b in zip(noisy, base))
    assert lo < med < hi and hi - lo < 0.08
    assert paired_ci90(base[:4], base[:4]) is None


def test_smoke_every_impl_and_writer(tmp_path: Path) -> None:
    """Every implementation once at a tiny shape, the JSON writer and the Markdown renderer."""
    dev = torch.device("cpu")
    data = write_results(tmp_path / "step.json", device=dev, rounds=1, tiny=True, micro_numel=4099,
                         compile_backend="aot_eager", log=lambda s: None)
    assert json.loads((tmp_path / "step.json").read_text()) == data
    got = {(r["case"], r["dtype"], r["impl"]) for r in data["rows"]}
    skipped = {(s["case"], s["dtype"], s["impl"]): s["reason"] for s in data["skipped"]}
    for c in cases(tiny=True):
        if c.cuda_only:
            assert (c.name, ",".join(c.dtypes), "*") in skipped
            continue
        for dname in c.dtypes:
            for impl in EAGER_IMPLS + (COMPILED_IMPLS if c.compiled else ()):
                assert ((c.name, dname, impl) in got) != ((c.name, dname, impl) in skipped), (c.name, dname, impl)
        assert (c.name, "fp32", "masked_triton") in skipped and (c.name, "fp32", "dense") in got
    for r in data["rows"]:
        assert r["ms_median"] > 0 and r["ms_iqr"] >= 0 and r["state_MB"] > 0 and r["ratio_to_dense"] > 0
        assert r["ratio_paired"] > 0
        assert r["ratio_paired_ci90"] is None  # one round: too few for an interval
        assert r["peak_extra_MB"] is None or r["peak_extra_MB"] >= 0
        assert r["faults_per_step"] is None or r["faults_per_step"] >= 0
    masked, dense = (next(r for r in data["rows"] if r["case"] == "mlp" and r["dtype"] == "fp32" and r["impl"] == i)
                     for i in ("masked_reference", "dense"))
    assert masked["state_MB"] > dense["state_MB"]  # aux and its two moments
    assert all(m["speedup"] > 0 for m in data["apply_mask_fwd_bwd"] if "speedup" in m)
    assert data["versions"]["torch"] == torch.__version__ and len(data["load_average"]["start"]) == 3
    for dt in ("mlp_fp32", "mlp_bf16"):
        o = data["overhead_mlp"][dt]
        assert o["masked_non_gemm_ms"] > 0 and o["dense_non_gemm_ms"] > 0
        assert o["extra_ms"] == round(o["masked_non_gemm_ms"] - o["dense_non_gemm_ms"], 2)
    if minor_faults() is not None:
        assert all(r["faults_per_step"] is not None for r in data["rows"])
    assert data["config"]["heap"] == "default"
    md = render_markdown(data)
    assert "Profiled overhead, mlp fp32 masked_cpp" in md and "heap default" in md and "faults/step" in md
    assert md.count("\n| mlp |") == sum(r["case"] == "mlp" for r in data["rows"]) and "× dense" in md


def test_set_heap() -> None:
    import pytest

    assert set_heap("default") == "default"  # a no-op
    with pytest.raises(ValueError, match="heap: expected one of"):
        set_heap("huge")
    if not sys.platform.startswith("linux"):
        return
    # 'steady' changes this process's malloc for good: try it in a child. Freed 4 MiB blocks are reused
    # there without new page faults (glibc's default maps each one afresh at first)
    code = ("import ctypes, resource, sys; sys.path.insert(0, sys.argv[1]); import bench_step as b; "
            "print(b.set_heap('steady')); libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p; "
            "libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]; n = 4 << 20; f = []\n"
            "for _ in range(3):\n"
            "    p = libc.malloc(n); f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; libc.memset(p, 1, n)\n"
            "    f.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0); libc.free(ctypes.c_void_p(p))\n"
            "print(f)")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[0] == "steady"
    first, *again = eval(out[1])
    assert first > 500 and max(again) < 50, out[1]  # 1024 pages faulted once, then reused


def test_interleaved_rotates() -> None:
    calls: list[str] = []
    faults: dict[str, list[int]] = {}
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, faults)
    assert calls == ["a", "b", "b", "a", "a", "b"] and all(len(t) == 3 for t in times.values())
    if minor_faults() is not None:
        assert sorted(faults) == ["a", "b"] and all(len(f) == 3 and min(f) >= 0 for f in faults.values())
    assert summary_ms([0.001, 0.002, 0.003, 0.004, 0.005]) == (3.0, 2.0, 2.0, 4.0)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def _print_profile(prof: dict[str, dict]) -> None:
    for name, p in prof.items():
        print(f"\n{name}: wall {p['wall_ms_per_step_profiled']} ms/step (profiled), "
              f"self CPU total {p['self_cpu_ms_per_step_total']} ms/step")
        for e in p["top_ops"]:
            print(f"  {e['self_cpu_ms']:9.3f} ms  x{e['calls']:<6g} {e['op']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output JSON (default benchmarks/results/step_<device>.json)")
    p.add_argument("--quick", action="store_true", help="5 rounds instead of 15")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--cases", default=None, help="comma-separated subset of mlp,conv,transformer,lenet300,mlp_4096")
    p.add_argument("--dtypes", default=None, help="comma-separated subset of fp32,bf16 for the step cases")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--heap", choices=HEAPS, default="default",
                   help="malloc policy for the run (steady: no trimming; default output name gets _steady_heap)")
    p.add_argument("--markdown", metavar="JSON", default=None, help="print the Markdown table of a results file")
    a = p.parse_args(argv)
    if a.markdown:
        print(render_markdown(json.loads(Path(a.markdown).read_text())), end="")
        return 0
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    suffix = "" if a.heap == "default" else f"_{a.heap}_heap"
    out = Path(a.out) if a.out else RESULTS_DIR / f"step_{device_name(dev)}{suffix}.json"
    rounds = a.rounds or (5 if a.quick else 15)
    data = write_results(out, device=dev, rounds=rounds, do_profile=not a.no_profile, heap=a.heap,
                         case_names=a.cases.split(",") if a.cases else None,
                         dtypes=a.dtypes.split(",") if a.dtypes else None)
    _print_profile(data["profile_mlp"])
    print()
    print(render_markdown(data), end="")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
