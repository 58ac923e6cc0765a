"""Benchmarks of the ``triton`` backend against eager PyTorch, ``torch.compile`` and dense layers.

Cases (each a pytest-benchmark test; metrics in ``benchmark.extra_info``):

* every kernel -- ``apply_mask``, ``mask_backward`` (dW and dM), ``aux_adam_step_``,
  ``aux_adam_step_multi_`` -- as ``triton`` (the registered op on the triton backend), ``eager``
  (:mod:`autoprune_ext.reference`) and ``compiled`` (``torch.compile`` of the reference);
  W bf16, M fp32. Metrics: ms, GB/s of the bytes that must move, % of a same-size ``clone()``;
* masked linear forward + backward (bf16, weight-granularity fp32 mask, with bias) at LLM shapes --
  W ``[4096, 4096]`` and ``[4096, 11008]`` (out x in), 4k and 16k tokens -- as ``triton``, ``eager``
  and ``compiled`` (the reference ``masked_linear`` + ``masked_linear_backward``: dX, dW, dM, db),
  ``prune`` (``torch.nn.utils.prune.custom_from_mask`` on ``nn.Linear``: weight_orig * mask, autograd;
  no mask gradient) and ``dense`` (``nn.Linear``, autograd). Metrics: ms, TFLOP/s (3 GEMMs), peak
  memory above the inputs, and for ``triton`` the number of weight-sized temporaries.

GPU timings use ``triton.testing.do_bench`` (median); pytest-benchmark's own timing wraps the call with
``torch.cuda.synchronize()``. Without a GPU the module is a *smoke test*: every case runs once at a
tiny shape through the Triton interpreter (``torch.compile`` with the ``eager`` backend, so no C++
compile), which keeps ``pytest benchmarks/bench_triton.py --benchmark-disable`` under a minute and
catches rot; the GPU-size cases are skipped.

``python benchmarks/bench_triton.py`` (GPU only) runs every GPU case and writes
``benchmarks/results/triton_<device>.json`` (device, torch/triton/CUDA versions, date, metrics and
the issue's targets evaluated): see :func:`write_results`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.utils.prune

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

if __name__ == "__main__":  # script mode: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import triton
    import triton.testing
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

import pytest  # noqa: E402

from autoprune_ext import backends  # noqa: E402
from autoprune_ext import reference as ref  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
SMOKE = not HAS_CUDA
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _triton_usable() -> tuple[bool, str]:
    if triton is None:
        return False, "triton is not installed"
    return backends.availability("triton", DEVICE)


# --------------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------------
_clone_ms: dict[int, float] = {}


def _time_ms(fn: Callable[[], object]) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def clone_ms(nbytes: int) -> float:
    """Time of ``clone()`` of a tensor moving ``nbytes`` in total (read + write)."""
    key = max(nbytes // 2, 1)
    if key not in _clone_ms:
        x = torch.empty(key, dtype=torch.uint8, device=DEVICE)
        _clone_ms[key] = _time_ms(lambda: x.clone())
        del x
    return _clone_ms[key]


def peak_extra_mb(fn: Callable[[], object]) -> float:
    """Peak device memory allocated during one call, above what was allocated before it (MiB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def measure(fn: Callable[[], object], *, nbytes: int | None = None, flops: float | None = None) -> dict:
    """ms, GB/s, % of clone, TFLOP/s, peak memory (GPU); on CPU (smoke) one untimed run."""
    if SMOKE:
        fn()
        return {"smoke": True}
    fn()  # warm-up / compile / autotune outside the timings
    torch.cuda.synchronize()
    ms = _time_ms(fn)
    info: dict = {"ms": ms, "peak_extra_MiB": peak_extra_mb(fn)}
    if nbytes is not None:
        gbps = nbytes / ms / 1e6
        info["GB/s"] = gbps
        info["pct_of_clone"] = 100.0 * clone_ms(nbytes) / ms
    if flops is not None:
        info["TFLOP/s"] = flops / ms / 1e9
    return info


# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------
_compiled: dict[tuple, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)`` (inductor on GPU; the cheap ``eager`` backend in smoke mode)."""
    key = (fn,)
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, backend="eager" if SMOKE else "inductor")
    return _compiled[key]


def _rand(shape, dtype, scale=1.0):
    return torch.randn(shape, device=DEVICE, dtype=torch.float32).mul_(scale).to(dtype)


@dataclass
class Case:
    kernel: str
    impl: str
    shape: tuple
    gpu_only: bool
    extra: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.kernel}-{self.impl}-{'x'.join(map(str, self.shape))}"


def _on_triton(op):
    def run(*args):
        with backends.use("triton"):
            return op(*args)

    return run


def build_apply_mask(case: Case):
    w, m = _rand(case.shape, torch.bfloat16), _rand(case.shape, torch.float32)
    if case.impl == "triton":
        op = _on_triton(torch.ops.autoprune.apply_mask)
        fn = lambda: op(w, m, "softplus", "sign", 0.1)  # noqa: E731
    elif case.impl == "eager":
        fn = lambda: ref.apply_mask(w, m)  # noqa: E731
    else:
        c = compiled(ref.apply_mask)
        fn = lambda: c(w, m)  # noqa: E731
    return fn, dict(nbytes=w.numel() * (2 + 4 + 2))


def build_mask_backward(case: Case):
    w, m, g = _rand(case.shape, torch.bfloat16), _rand(case.shape, torch.float32), _rand(case.shape, torch.bfloat16)
    if case.impl == "triton":
        op = _on_triton(torch.ops.autoprune.mask_backward)
        fn = lambda: op(g, w, m, "softplus", "sign", 0.1, True, True)  # noqa: E731
    elif case.impl == "eager":
        fn = lambda: ref.mask_backward(g, w, m, "softplus", "sign", 0.1)  # noqa: E731
    else:
        c = compiled(ref.mask_backward)
        fn = lambda: c(g, w, m, "softplus", "sign", 0.1)  # noqa: E731
    # read g, W (bf16), M (fp32); write dW (bf16), dM (fp32)
    return fn, dict(nbytes=w.numel() * (2 + 2 + 4 + 2 + 4))


_ADAM = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, rho=1e-3)


def _adam_tensors(n):
    aux = _rand((n,), torch.float32)
    return aux, torch.zeros_like(aux), torch.zeros_like(aux), _rand((n,), torch.float32, 1e-3)


def build_adam(case: Case):
    aux, m1, m2, g = _adam_tensors(case.shape[0])
    hp = dict(step=1, penalty_scale=1e-6, surrogate_name="softplus", alpha=0.1, **_ADAM)
    if case.impl == "triton":
        op = _on_triton(torch.ops.autoprune.aux_adam_step_)
        fn = lambda: op(aux, m1, m2, g, None, 1, hp["lr"], hp["beta1"], hp["beta2"], hp["eps"],  # noqa: E731
                        hp["penalty_scale"], hp["rho"], "softplus", 0.1)
    elif case.impl == "eager":
        fn = lambda: ref.aux_adam_step_(aux, m1, m2, g, None, **hp)  # noqa: E731
    else:
        c = compiled(ref.aux_adam_step_)
        fn = lambda: c(aux, m1, m2, g, None, **hp)  # noqa: E731
    return fn, dict(nbytes=aux.numel() * 4 * (4 + 3))  # read aux, m1, m2, grad; write aux, m1, m2


def _ref_multi(auxes, m1s, m2s, grads, steps, scales):
    for a, e1, e2, g, st, sc in zip(auxes, m1s, m2s, grads, steps, scales):
        ref.aux_adam_step_(a, e1, e2, g, None, step=st, penalty_scale=sc, surrogate_name="softplus", alpha=0.1,
                           **_ADAM)


def build_adam_multi(case: Case):
    sizes = case.extra["sizes"]
    ts = [_adam_tensors(n) for n in sizes]
    auxes, m1s, m2s, grads = (list(x) for x in zip(*ts))
    steps, scales = [1] * len(sizes), [1e-6] * len(sizes)
    if case.impl == "triton":
        op = _on_triton(torch.ops.autoprune.aux_adam_step_multi_)
        fn = lambda: op(auxes, m1s, m2s, grads, [None] * len(sizes), steps, scales,  # noqa: E731
                        _ADAM["lr"], _ADAM["beta1"], _ADAM["beta2"], _ADAM["eps"], _ADAM["rho"], "softplus", 0.1)
    elif case.impl == "eager":
        fn = lambda: _ref_multi(auxes, m1s, m2s, grads, steps, scales)  # noqa: E731
    else:
        c = compiled(_ref_multi)
        fn = lambda: c(auxes, m1s, m2s, grads, steps, scales)  # noqa: E731
    return fn, dict(nbytes=sum(sizes) * 4 * (4 + 3))


def _dense_fwd_bwd(layer, x, g):
    x.grad = None
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(g)
    return y, x.grad


def build_masked_linear(case: Case):
    tokens, n_out, n_in = case.shape
    dt = torch.bfloat16
    x = _rand((tokens, n_in), dt)
    w = _rand((n_out, n_in), dt, n_in**-0.5)
    m = _rand((n_out, n_in), torch.float32)
    b = _rand((n_out,), dt)
    g = _rand((tokens, n_out), dt)
    flops = 3 * 2.0 * tokens * n_out * n_in
    if case.impl in ("triton", "eager", "compiled"):
        if case.impl == "triton":
            fwd = _on_triton(torch.ops.autoprune.masked_linear)
            bwd = _on_triton(torch.ops.autoprune.masked_linear_backward)

            def fn():
                y = fwd(x, w, m, b, "softplus", "sign", 0.1)
                return y, bwd(g, x, w, m, "softplus", "sign", 0.1, True, True, True, True)

        else:

            def eager_fn(x, w, m, b, g):
                y = ref.masked_linear(x, w, m, b)
                return y, ref.masked_linear_backward(g, x, w, m, "softplus", "sign", 0.1)

            f = eager_fn if case.impl == "eager" else compiled(eager_fn)
            fn = lambda: f(x, w, m, b, g)  # noqa: E731
    else:
        layer = torch.nn.Linear(n_in, n_out, device=DEVICE, dtype=dt)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        if case.impl == "prune":
            torch.nn.utils.prune.custom_from_mask(layer, "weight", (m >= 0).to(dt))
        xr = x.clone().requires_grad_()
        fn = lambda: _dense_fwd_bwd(layer, xr, g)  # noqa: E731
    # outputs of the masked variants: y, dX (bf16), dW (bf16), dM (fp32), db
    outputs = tokens * n_out * 2 + tokens * n_in * 2 + n_out * n_in * (2 + 4) + n_out * 2
    return fn, dict(flops=flops, weight_bytes=n_out * n_in * 2, output_bytes=outputs)


BUILDERS = {
    "apply_mask": build_apply_mask,
    "mask_backward": build_mask_backward,
    "aux_adam_step_": build_adam,
    "aux_adam_step_multi_": build_adam_multi,
    "masked_linear_fwd_bwd": build_masked_linear,
}

ELEMENTWISE_SMOKE = [(129, 33)]
ELEMENTWISE_GPU = [(4096, 4096), (8192, 8192)]  # 16M and 64M elements
ADAM_SMOKE = [(4257,)]
ADAM_GPU = [(16 * 2**20,), (64 * 2**20,)]
MULTI_SMOKE = dict(sizes=[17, 4257, 135, 1])
MULTI_GPU = dict(sizes=[1024 * 1024] * 24 + [1024 * 2752] * 12 + [1024] * 28 + [1] * 4)  # ~58M, 68 tensors
LINEAR_SMOKE = [(16, 24, 32)]  # (tokens, out, in)
LINEAR_GPU = [(t, o, i) for (o, i) in ((4096, 4096), (4096, 11008)) for t in (4096, 16384)]


def all_cases() -> list[Case]:
    cases: list[Case] = []
    impls = ("triton", "eager", "compiled")
    for kernel in ("apply_mask", "mask_backward"):
        for shape in ELEMENTWISE_SMOKE:
            cases += [Case(kernel, i, shape, False) for i in impls]
        for shape in ELEMENTWISE_GPU:
            cases += [Case(kernel, i, shape, True) for i in impls]
    for shape in ADAM_SMOKE:
        cases += [Case("aux_adam_step_", i, shape, False) for i in impls]
    for shape in ADAM_GPU:
        cases += [Case("aux_adam_step_", i, shape, True) for i in impls]
    for extra, gpu in ((MULTI_SMOKE, False), (MULTI_GPU, True)):
        shape = (len(extra["sizes"]), sum(extra["sizes"]))
        cases += [Case("aux_adam_step_multi_", i, shape, gpu, extra) for i in impls]
    linear_impls = impls + ("prune", "dense")
    for shape in LINEAR_SMOKE:
        cases += [Case("masked_linear_fwd_bwd", i, shape, False) for i in linear_impls]
    for shape in LINEAR_GPU:
        cases += [Case("masked_linear_fwd_bwd", i, shape, True) for i in linear_impls]
    return cases


def run_case(case: Case) -> tuple[Callable[[], object], dict]:
    """Build the case's callable and measure it: ``(fn, metrics)``."""
    fn, static = BUILDERS[case.kernel](case)
    info = measure(fn, nbytes=static.get("nbytes"), flops=static.get("flops"))
    info.update({k: v for k, v in static.items() if k not in ("flops",)})
    info.update(kernel=case.kernel, impl=case.impl, shape=list(case.shape), device=DEVICE)
    if (
        not SMOKE
        and case.impl == "triton"
        and "weight_bytes" in static
        and "peak_extra_MiB" in info
    ):
        extra = info["peak_extra_MiB"] * 2**20 - static["output_bytes"]
        info["weight_sized_temporaries"] = max(extra, 0.0) / static["weight_bytes"]
    return fn, info


# --------------------------------------------------------------------------------------------------
# pytest entry points
# --------------------------------------------------------------------------------------------------
def _params():
    out = []
    for c in all_cases():
        marks = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="GPU-size case: needs CUDA")] if c.gpu_only else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


@pytest.mark.parametrize("case", _params())
def test_bench(benchmark, case):
    ok, why = _triton_usable()
    if case.impl == "triton" and not ok:
        pytest.skip(f"triton backend unavailable: {why}")
    if case.impl == "compiled" and SMOKE and sys.platform == "win32":
        pytest.skip("torch.compile unsupported here")
    fn, info = run_case(case)
    benchmark.extra_info.update(info)
    benchmark.group = f"{case.kernel}-{'x'.join(map(str, case.shape))}"
    if SMOKE:
        benchmark.pedantic(fn, rounds=1, iterations=1)
    else:

        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=10, iterations=1, warmup_rounds=2)


# --------------------------------------------------------------------------------------------------
# results file (GPU only)
# --------------------------------------------------------------------------------------------------
def _targets(results: list[dict]) -> dict:
    """The issue's targets, evaluated from the measured results (None: not measured)."""

    def find(kernel, impl, shape):
        for r in results:
            if r["kernel"] == kernel and r["impl"] == impl and tuple(r["shape"]) == tuple(shape):
                return r
        return None

    out: dict = {}
    big = [r for r in results if r["impl"] == "triton" and r["kernel"] != "masked_linear_fwd_bwd"
           and "pct_of_clone" in r and (r["shape"][-1] if r["kernel"] == "aux_adam_step_multi_"
                                        else int(torch.tensor(r["shape"]).prod())) >= 64 * 2**20 * 0.9]
    out["elementwise_ge_85pct_of_clone_at_64M"] = {
        r["kernel"]: {"pct_of_clone": r["pct_of_clone"], "met": r["pct_of_clone"] >= 85.0} for r in big
    } or None
    shape = (16384, 4096, 4096)
    t, d, e = (find("masked_linear_fwd_bwd", i, shape) for i in ("triton", "dense", "eager"))
    if t and d and e:
        out["masked_linear_bf16_4096x4096_16k"] = {
            "vs_dense": t["ms"] / d["ms"], "vs_dense_met": t["ms"] / d["ms"] <= 1.15,
            "speedup_vs_eager": e["ms"] / t["ms"], "speedup_vs_eager_met": e["ms"] / t["ms"] >= 1.5,
            "weight_sized_temporaries": t.get("weight_sized_temporaries"),
            "no_weight_sized_temporary_met": (t.get("weight_sized_temporaries") or 0.0) < 0.5,
        }
    else:
        out["masked_linear_bf16_4096x4096_16k"] = None
    return out


def write_results(path: str | os.PathLike | None = None) -> Path:
    """Run every GPU case and write the JSON results file; returns its path. GPU only."""
    if not HAS_CUDA:
        raise RuntimeError("write_results needs a CUDA device: GPU numbers are never produced on CPU")
    ok, why = _triton_usable()
    if not ok:
        raise RuntimeError(f"triton backend unavailable: {why}")
    name = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    path = Path(path) if path is not None else RESULTS_DIR / f"triton_{slug}.json"
    results = []
    for case in all_cases():
        if not case.gpu_only:
            continue
        try:
            _, info = run_case(case)
        except Exception as exc:  # keep going: record the failure
            info = dict(kernel=case.kernel, impl=case.impl, shape=list(case.shape), error=f"{type(exc).__name__}: {exc}")
        results.append(info)
        print(json.dumps(info), flush=True)
        torch.cuda.empty_cache()
    doc = {
        "device": name,
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", None),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timing": "triton.testing.do_bench, median, warmup 25 ms, rep 100 ms",
        "targets": _targets([r for r in results if "error" not in r]),
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


if __name__ == "__main__":
    t0 = time.time()
    out = write_results(sys.argv[1] if len(sys.argv) > 1 else None)
    print(f"wrote {out} in {time.time() - t0:.0f} s")
