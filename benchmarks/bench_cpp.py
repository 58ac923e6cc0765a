"""Benchmarks of the ``cpp`` backend: C++ CPU kernels (and CUDA kernels where a GPU exists).

CPU cases (pytest-benchmark; metrics in ``benchmark.extra_info``): ``apply_mask``, ``mask_backward``
(dW and dM, softplus / sign) and ``aux_adam_step_`` (penalty + Adam, in place) as

* ``cpp``      -- the compiled op ``torch.ops.autoprune_cpp.<op>``,
* ``eager``    -- :mod:`autoprune_ext.reference` (what the tests compare against),
* ``compiled`` -- ``torch.compile`` of that reference (inductor),

for W (mask ops) or aux (Adam) in fp32 and bf16 (M and the Adam moments fp32), at 1M, 16M and 64M
elements. Metrics: median ms, GB/s of the bytes that must move, and for ``cpp`` the speed-up against
``eager`` and ``compiled`` (measured on the spot if their cases did not run first).

* ``pytest benchmarks/bench_cpp.py --benchmark-disable`` (``make test``) runs a tiny smoke case of every
  op / impl / dtype once, plus the 1M cases once (``torch.compile`` then uses its cheap ``eager``
  backend: no C++ code generation), in well under a minute;
* the 16M / 64M cases are marked ``slow``: they run under ``make bench`` (``-m ""``);
* GPU cases (``cuda`` = the cpp backend's CUDA kernels, ``triton``, ``eager``; 16M and 64M) are skipped
  without a GPU -- no GPU number is ever produced on CPU.

``python benchmarks/bench_cpp.py [--sizes 1M,16M,64M] [--no-thp-run]`` measures the CPU matrix directly and
writes ``benchmarks/results/cpu_<host>.json`` (device, torch, date, numbers, the issue's targets): see
:func:`write_results`. Fresh output buffers of tens of MiB are new pages the kernel must fault in; by
default a second run with ``THP_MEM_ALLOC_ENABLE=1`` (torch's switch for transparent huge pages on
every CPU allocation) is recorded as well, since that cost is paid by eager and compiled code alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __name__ == "__main__":  # script mode: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

from autoprune_ext import _build, backends  # noqa: E402
from autoprune_ext import reference as ref  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
RESULTS_DIR = Path(__file__).resolve().parent / "results"
OPS = ("apply_mask", "mask_backward", "aux_adam_step_")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIZES = {"smoke": 4099, "1M": 2**20, "16M": 16 * 2**20, "64M": 64 * 2**20}
CPU_IMPLS = ("eager", "compiled", "cpp")
GPU_IMPLS = ("eager", "triton", "cuda")
ADAM = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, penalty_scale=1e-6, rho=1e-3)


# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------
def ext_ready() -> tuple[bool, str]:
    """Build / load the extension (the benchmarks ask for the cpp backend explicitly)."""
    if _build.load(build=True):
        backends.clear_cache()
        return True, "ok"
    return False, str(_build.last_error())


def bytes_moved(op: str, n: int, dtype: torch.dtype) -> int:
    s = torch.finfo(dtype).bits // 8
    if op == "apply_mask":  # read W, M (fp32); write T
        return n * (2 * s + 4)
    if op == "mask_backward":  # read g, W, M; write dW, dM
        return n * (3 * s + 2 * 4)
    return n * (3 * s + 16)  # Adam: read aux, grad, m1, m2 (fp32); write aux, m1, m2


def make_inputs(op: str, n: int, dtype: torch.dtype, device: str) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(dt, scale=1.0):
        return (torch.randn(n, generator=gen) * scale).to(device, dt)

    if op == "aux_adam_step_":
        return dict(aux=rnd(dtype), m1=torch.zeros(n, device=device), m2=torch.zeros(n, device=device),
                    grad=rnd(dtype, 1e-3))
    return dict(w=rnd(dtype), m=rnd(torch.float32), g=rnd(dtype))


_compiled: dict[tuple[str, str], Callable] = {}


def _compiled_ref(op: str, cheap: bool) -> Callable:
    key = (op, "eager" if cheap else "inductor")
    if key not in _compiled:
        fn = {"apply_mask": ref.apply_mask, "mask_backward": ref.mask_backward, "aux_adam_step_": ref.aux_adam_step_}[op]
        _compiled[key] = torch.compile(fn, backend=key[1])
    return _compiled[key]


def make_fn(op: str, impl: str, x: dict, *, cheap_compile: bool = False) -> Callable[[], object]:
    """The callable of one case; ``impl`` in cpp / cuda (compiled ops), eager, compiled, triton."""
    if impl in ("cpp", "cuda"):
        ops = torch.ops.autoprune_cpp
        if op == "apply_mask":
            return lambda: ops.apply_mask(x["w"], x["m"], "softplus", "sign", 0.1)
        if op == "mask_backward":
            return lambda: ops.mask_backward(x["g"], x["w"], x["m"], "softplus", "sign", 0.1, True, True)
        return lambda: ops.aux_adam_step_(x["aux"], x["m1"], x["m2"], x["grad"], None, 1, ADAM["lr"], ADAM["beta1"],
                                          ADAM["beta2"], ADAM["eps"], ADAM["penalty_scale"], ADAM["rho"],
                                          "softplus", 0.1)
    if impl == "triton":
        op_fn = getattr(torch.ops.autoprune, op)

        def run():
            with backends.use("triton"):
                if op == "apply_mask":
                    return op_fn(x["w"], x["m"], "softplus", "sign", 0.1)
                if op == "mask_backward":
                    return op_fn(x["g"], x["w"], x["m"], "softplus", "sign", 0.1, True, True)
                return op_fn(x["aux"], x["m1"], x["m2"], x["grad"], None, 1, ADAM["lr"], ADAM["beta1"], ADAM["beta2"],
                             ADAM["eps"], ADAM["penalty_scale"], ADAM["rho"], "softplus", 0.1)

        return run
    f = _compiled_ref(op, cheap_compile) if impl == "compiled" else {
        "apply_mask": ref.apply_mask, "mask_backward": ref.mask_backward, "aux_adam_step_": ref.aux_adam_step_}[op]
    if op == "apply_mask":
        return lambda: f(x["w"], x["m"])
    if op == "mask_backward":
        return lambda: f(x["g"], x["w"], x["m"], "softplus", "sign", 0.1)
    return lambda: f(x["aux"], x["m1"], x["m2"], x["grad"], None, step=1, lr=ADAM["lr"], beta1=ADAM["beta1"],
                     beta2=ADAM["beta2"], eps=ADAM["eps"], penalty_scale=ADAM["penalty_scale"], rho=ADAM["rho"],
                     surrogate_name="softplus", alpha=0.1)


def synced(fn: Callable[[], object], device: str) -> Callable[[], object]:
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def time_ms(fn: Callable[[], object], device: str = "cpu", *, min_s: float = 1.0, max_reps: int = 25) -> float:
    """Median wall time of ``fn`` (after two warm-up calls), repeating for at least ``min_s``."""
    return time_interleaved({"fn": synced(fn, device)}, min_s=min_s, min_reps=3, max_reps=max_reps)["fn"]


# --------------------------------------------------------------------------------------------------
# pytest entry points
# --------------------------------------------------------------------------------------------------
_medians: dict[tuple, float] = {}


def _cpu_params():
    out = []
    for size in ("smoke", "1M", "16M", "64M"):
        marks = [pytest.mark.slow] if size in ("16M", "64M") else []
        for op in OPS:
            for dname in DTYPES:
                for impl in CPU_IMPLS:
                    out.append(pytest.param(op, dname, size, impl, id=f"{op}-{dname}-{size}-{impl}", marks=marks))
    return out


@pytest.mark.parametrize("op,dname,size,impl", _cpu_params())
def test_cpu(benchmark, op, dname, size, impl):
    if impl == "cpp":
        ok, why = ext_ready()
        if not ok:
            pytest.skip(f"C++ extension unavailable: {why}")
    n, dtype = SIZES[size], DTYPES[dname]
    disabled = getattr(benchmark, "disabled", False)
    x = make_inputs(op, n, dtype, "cpu")
    fn = make_fn(op, impl, x, cheap_compile=disabled)
    nbytes = bytes_moved(op, n, dtype)
    benchmark.group = f"cpu-{op}-{dname}-{size}"
    benchmark.extra_info.update(op=op, dtype=dname, numel=n, impl=impl, bytes=nbytes, device="cpu",
                                torch_threads=torch.get_num_threads())
    if disabled:
        benchmark(fn)
        return
    rounds = 3 if n >= SIZES["64M"] else (5 if n >= SIZES["16M"] else 20)
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=2)
    ms = benchmark.stats.stats.median * 1e3
    _medians[(op, dname, size, impl)] = ms
    benchmark.extra_info.update(ms=ms, GBps=nbytes / ms / 1e6)
    if impl == "cpp":
        for base in ("eager", "compiled"):
            key = (op, dname, size, base)
            if key not in _medians:
                _medians[key] = time_ms(make_fn(op, base, x), min_s=0.5, max_reps=rounds)
            benchmark.extra_info[f"speedup_vs_{base}"] = _medians[key] / ms


def _gpu_params():
    out = []
    for size in ("16M", "64M"):
        for op in OPS:
            for dname in DTYPES:
                for impl in GPU_IMPLS:
                    out.append(pytest.param(op, dname, size, impl, id=f"{op}-{dname}-{size}-{impl}",
                                            marks=[pytest.mark.gpu]))
    return out


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("op,dname,size,impl", _gpu_params())
def test_gpu(benchmark, op, dname, size, impl):
    if impl == "cuda":
        ok, why = ext_ready()
        if not ok or not _build.has_cuda_kernels():
            pytest.skip(f"CUDA kernels of the C++ extension unavailable: {why}")
    if impl == "triton":
        ok, why = backends.availability("triton", "cuda")
        if not ok:
            pytest.skip(f"triton backend unavailable: {why}")
    n, dtype = SIZES[size], DTYPES[dname]
    x = make_inputs(op, n, dtype, "cuda")
    fn = synced(make_fn(op, impl, x), "cuda")
    nbytes = bytes_moved(op, n, dtype)
    benchmark.group = f"gpu-{op}-{dname}-{size}"
    benchmark.extra_info.update(op=op, dtype=dname, numel=n, impl=impl, bytes=nbytes, device=torch.cuda.get_device_name())
    if getattr(benchmark, "disabled", False):
        benchmark(fn)
        return
    benchmark.pedantic(fn, rounds=20, iterations=1, warmup_rounds=3)
    ms = benchmark.stats.stats.median * 1e3
    _medians[("gpu", op, dname, size, impl)] = ms
    benchmark.extra_info.update(ms=ms, GBps=nbytes / ms / 1e6)
    if impl == "cuda":
        for base in ("eager", "triton"):
            key = ("gpu", op, dname, size, base)
            if key not in _medians and (base != "triton" or backends.availability("triton", "cuda")[0]):
                _medians[key] = time_ms(make_fn(op, base, x), "cuda", min_s=0.2)
            if key in _medians:
                benchmark.extra_info[f"speedup_vs_{base}"] = _medians[key] / ms


# --------------------------------------------------------------------------------------------------
# results file (CPU)
# --------------------------------------------------------------------------------------------------
def cpu_description() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    thp = None
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    return {
        "cpu": model, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_GiB": mem_gib, "kernel_isa": _build.cpu_isa(), "transparent_hugepage": thp,
        "platform": platform.platform(),
    }


def timed_round(fns: dict[str, Callable[[], object]], times: dict[str, list[float]], r: int) -> None:
    """Round ``r`` of interleaved timing: every callable once, the order rotated by ``r``; seconds
    appended to ``times[name]``."""
    names = list(fns)
    k = r % len(names)
    for name in names[k:] + names[:k]:
        t0 = time.perf_counter()
        fns[name]()
        times[name].append(time.perf_counter() - t0)


def time_interleaved(fns: dict[str, Callable[[], object]], *, min_s: float = 1.0, min_reps: int = 5,
                     max_reps: int = 15) -> dict[str, float]:
    """Median ms of each callable, timed in interleaved rounds (the order rotates every round).

    On a small VM the cost of faulting in fresh pages depends on what ran just before (the kernel
    compacts memory for huge pages after a burst of small ones), so timing one implementation after
    the other biases whichever runs second; interleaving spreads that noise over all of them.
    """
    names = list(fns)
    for name in names:  # warm-up (compiles torch.compile's code)
        fns[name]()
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    r = 0
    while True:
        timed_round(fns, times, r)
        r += 1
        if r >= max_reps or (r >= min_reps and time.perf_counter() - start >= min_s * len(names)):
            break
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_extra_mib(fn: Callable[[], object]) -> float | None:
    """Peak resident memory one call adds on top of its inputs (Linux: VmHWM after resetting it)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark to the current RSS
    except OSError:
        return None
    before = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    if before is None or peak is None:
        return None
    return round(max(peak - before, 0) / 1024, 1)


def copy_gbps(n: int) -> float:
    """Measured copy bandwidth (GB/s): ``out.copy_(x)`` of n float32s into a buffer touched before.

    8n bytes (read + write) with no page faults: the memory system's limit, which ops that allocate
    a fresh output (all of them, and eager / compiled alike) cannot fully reach.
    """
    x, out = torch.randn(n), torch.empty(n)
    out.zero_()
    ms = time_interleaved({"copy": lambda: out.copy_(x)}, min_s=0.5, max_reps=25)["copy"]
    return round(8 * n / ms / 1e6, 2)


# below this, outputs come from heap memory already resident and the RSS high-water mark misses them
PEAK_MIN_NUMEL = SIZES["16M"]


def measure_cpu(sizes: list[str], *, min_s: float = 1.0, cheap_compile: bool = False) -> list[dict]:
    """Every CPU case at ``sizes``: ms, GB/s, fraction of copy bandwidth, peak memory, speed-ups of cpp."""
    ok, why = ext_ready()
    if not ok:
        raise RuntimeError(f"C++ extension unavailable: {why}")
    rows = []
    for size in sizes:
        n = SIZES[size]
        copy = copy_gbps(n)
        for op in OPS:
            for dname, dtype in DTYPES.items():
                x = make_inputs(op, n, dtype, "cpu")
                nbytes = bytes_moved(op, n, dtype)
                fns = {impl: make_fn(op, impl, x, cheap_compile=cheap_compile) for impl in CPU_IMPLS}
                ms = time_interleaved(fns, min_s=min_s)
                row = {"op": op, "dtype": dname, "size": size, "numel": n, "bytes": nbytes, "copy_GB/s": copy}
                for impl in CPU_IMPLS:
                    gbps = nbytes / ms[impl] / 1e6
                    row[impl] = {"ms": round(ms[impl], 4), "GB/s": round(gbps, 2),
                                 "fraction_of_copy": round(gbps / copy, 3),
                                 "peak_extra_MiB": peak_extra_mib(fns[impl]) if n >= PEAK_MIN_NUMEL else None}
                row["speedup_vs_eager"] = round(ms["eager"] / ms["cpp"], 2)
                row["speedup_vs_compiled"] = round(ms["compiled"] / ms["cpp"], 2)
                rows.append(row)
                print(f"{op:15s} {dname} {size:>4s}: cpp {ms['cpp']:8.2f} ms ({row['cpp']['GB/s']:5.1f} GB/s, "
                      f"{row['cpp']['fraction_of_copy']:.0%} of copy)  eager {ms['eager']:8.2f}  "
                      f"compiled {ms['compiled']:8.2f}  x{row['speedup_vs_eager']:.1f} vs eager, "
                      f"x{row['speedup_vs_compiled']:.2f} vs compiled; peak MiB cpp/eager/compiled "
                      f"{row['cpp']['peak_extra_MiB']}/{row['eager']['peak_extra_MiB']}/"
                      f"{row['compiled']['peak_extra_MiB']}", flush=True)
                del x, fns
    return rows


def targets(rows: list[dict]) -> dict:
    """The issue's CPU targets at 16M elements: >= 3x eager, no slower than torch.compile(reference)."""
    out = {}
    for r in rows:
        if r["size"] != "16M":
            continue
        out[f"{r['op']}-{r['dtype']}"] = {
            "speedup_vs_eager": r["speedup_vs_eager"], "ge_3x_eager": r["speedup_vs_eager"] >= 3.0,
            "speedup_vs_compiled": r["speedup_vs_compiled"], "not_slower_than_compiled": r["speedup_vs_compiled"] >= 1.0,
        }
    return out


def write_results(sizes: list[str], path: str | os.PathLike | None = None, *, thp_run: bool = True,
                  min_s: float = 1.0, cheap_compile: bool = False) -> Path:
    host = re.sub(r"[^a-zA-Z0-9]+", "_", platform.node() or "host").strip("_").lower() or "host"
    path = Path(path) if path is not None else RESULTS_DIR / f"cpu_{host}.json"
    rows = measure_cpu(sizes, min_s=min_s, cheap_compile=cheap_compile)
    configs = {"default": {"rows": rows, "targets_16M": targets(rows)}}
    if thp_run and os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":
        tmp = path.with_suffix(".thp.json")
        env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1")
        cmd = [sys.executable, __file__, "--sizes", ",".join(sizes), "--no-thp-run", "--out", str(tmp), "--rows-only"]
        print("-- again with THP_MEM_ALLOC_ENABLE=1 --", flush=True)
        subprocess.run(cmd, env=env, check=True)
        thp_rows = json.loads(tmp.read_text())
        tmp.unlink()
        configs["THP_MEM_ALLOC_ENABLE=1"] = {"rows": thp_rows, "targets_16M": targets(thp_rows)}
    result = {
        "device": cpu_description(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extension": _build.origin(),
        "method": "median wall time over 5-15 interleaved rounds (order rotated each round, >= 1 s per impl "
                  "and case) after 2 warm-up calls; torch.compile (inductor) compiled during warm-up; every impl "
                  "allocates its outputs like the op does. copy_GB/s: out.copy_(x) of n float32s into a buffer "
                  "already touched (8n bytes; no page faults, so an op with a fresh output stays below it). "
                  "peak_extra_MiB: VmHWM - VmRSS around one call (Linux), i.e. outputs and temporaries; "
                  "only from 16M elements up (smaller buffers reuse resident heap memory).",
        "note": "2 logical CPUs: timings are noisy when other jobs share them. "
                "Fresh outputs > 32 MiB are mmap-ed pages faulted in on first touch; the cpp ops request "
                "transparent huge pages for their outputs (AUTOPRUNE_CPU_HUGEPAGES=0 disables), eager and "
                "compiled do not unless THP_MEM_ALLOC_ENABLE=1, hence the second configuration.",
        "bytes": "apply_mask: 2*sizeof(W) + 4 per element; mask_backward: 3*sizeof(W) + 8; "
                 "aux_adam_step_: 3*sizeof(aux) + 16 (M and moments fp32)",
        "configs": configs,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def test_results_file(tmp_path):
    """The results writer end to end at the smoke size: every row, impl and target field is there."""
    ok, why = ext_ready()
    if not ok:
        pytest.skip(f"C++ extension unavailable: {why}")
    path = write_results(["smoke"], tmp_path / "cpu.json", thp_run=False, min_s=0.0, cheap_compile=True)
    data = json.loads(path.read_text())
    rows = data["configs"]["default"]["rows"]
    assert [(r["op"], r["dtype"]) for r in rows] == [(op, d) for op in OPS for d in DTYPES]
    for r in rows:
        assert r["copy_GB/s"] > 0
        for impl in CPU_IMPLS:
            assert r[impl]["ms"] > 0 and r[impl]["GB/s"] > 0 and r[impl]["peak_extra_MiB"] is None
        assert r["speedup_vs_eager"] == pytest.approx(r["eager"]["ms"] / r["cpp"]["ms"], rel=0.05, abs=0.01)
    assert data["device"]["logical_cpus"] == os.cpu_count() and data["torch"] == torch.__version__


def test_time_interleaved_rotates_and_counts():
    calls: list[str] = []
    med = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, min_s=0.0,
                           min_reps=3, max_reps=3)
    assert set(med) == {"a", "b"} and all(v >= 0 for v in med.values())
    assert calls == ["a", "a", "b", "b"] + ["a", "b", "b", "a", "a", "b"]  # warm-up, then rotated rounds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1M,16M,64M", help="comma-separated among smoke,1M,16M,64M")
    p.add_argument("--out", default=None, help="output JSON (default benchmarks/results/cpu_<host>.json)")
    p.add_argument("--no-thp-run", action="store_true", help="skip the second run with THP_MEM_ALLOC_ENABLE=1")
    p.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    if a.rows_only:
        Path(a.out).write_text(json.dumps(measure_cpu(sizes)))
        return 0
    print(write_results(sizes, a.out, thp_run=not a.no_thp_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
