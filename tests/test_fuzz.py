"""Seeded differential fuzz test: every available backend against the ``reference`` backend, on every op.

Each seed builds one random case (:func:`make_case`) and runs it through the raw ops
(``torch.ops.autoprune.*``, which accept non-finite ``aux``; the functional API rejects it) on the
``reference`` backend and on every other usable backend (``triton`` -- the interpreter on CPU --
and ``cpp``):

* ops: ``apply_mask`` + ``mask_backward`` (weight / unit granularity), ``masked_linear`` +
  ``masked_linear_backward``, ``aux_adam_step_`` and ``aux_adam_step_multi_`` (in place),
  ``nm_scores`` (N:M) followed by the mask ops on the scores;
* inputs: every float dtype, mixed dtypes, odd and empty shapes (1, 7, 129, 0), contiguous /
  transposed / sliced / misaligned views, every surrogate and rule, random gradient subsets, and
  values salted with subnormals, +-0, NaN, +-inf, huge values and the smallest normals (NaN/inf in
  ``aux`` only in some cases; no huge values inside GEMMs, whose overflow would depend on the
  summation order);
* comparison: the mask decision is exact -- ``T = W * h(M)`` and ``dW = g * h(M)`` bit for bit, the
  pruned entries of the fused ``dW``, ``h`` of the N:M scores, ``h`` of the Adam-updated ``aux`` away
  from rounding distance of 0 (everywhere when ``lr == 0``) -- and so are the positions of NaN and
  +-inf; finite values follow :mod:`tolerances` (float32 / float64: relative to the largest value;
  float16 / bfloat16: twice the reference's own rounding error), plus a per-element bound for the
  elementwise results.

The default run covers seeds ``range(N_FAST)``; ``-m slow`` (``make test-slow``) adds
``range(N_FAST, N_SLOW)``. A failure names its seed and prints the case. The ``test_rule_*`` tests
at the end spell out the special-value rules of :mod:`autoprune_ext.reference` on fixed inputs.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import autoprune_ext  # noqa: E402,F401  (registers torch.ops.autoprune)
from autoprune_ext import backends  # noqa: E402
from autoprune_ext import reference as ref  # noqa: E402

from tolerances import LOW, assert_matches  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: the backends compared with the reference (``AUTOPRUNE_FUZZ_BACKENDS=cpp`` narrows it down, for debugging)
OTHERS = [
    b for b in os.environ.get("AUTOPRUNE_FUZZ_BACKENDS", "triton,cpp").split(",")
    if b in ("triton", "cpp") and backends.availability(b, DEVICE)[0]
]
N_FAST = 500
N_SLOW = 4000

pytestmark = [
    pytest.mark.skipif(not OTHERS, reason=f"no backend besides the reference on {DEVICE}"),
    # NaN/inf inputs make numpy (the Triton interpreter) warn about invalid values and overflow
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

OPS = ("mask", "mask", "linear", "adam", "adam_multi", "nm")
ODD = (1, 7, 129)
SMALL = (0, 1, 2, 3, 7)


# ------------------------------------------------------------------------------------------------
# value generation
# ------------------------------------------------------------------------------------------------
def _specials(dtype: torch.dtype, kinds: tuple[str, ...], rng: random.Random) -> list[float]:
    """A pool of special values of ``dtype`` (as Python floats, exactly representable)."""
    fi = torch.finfo(dtype)
    sub_min = fi.smallest_normal * fi.eps  # the smallest subnormal
    pool: list[float] = []
    for kind in kinds:
        if kind == "sub":
            vals = [sub_min, fi.smallest_normal - sub_min] + [fi.smallest_normal * rng.random() for _ in range(4)]
        elif kind == "zero":
            vals = [0.0]
        elif kind == "tiny":
            vals = [fi.smallest_normal, fi.smallest_normal * (1 + 3 * rng.random())]
        elif kind == "huge":
            vals = [fi.max, fi.max * (0.5 + 0.5 * rng.random())]
        elif kind == "nan":
            vals = [math.nan]
        elif kind == "inf":
            vals = [math.inf]
        else:
            raise AssertionError(kind)
        pool += [v for x in vals for v in (x, -x)]
    return pool


@dataclass
class Case:
    seed: int
    rng: random.Random
    gen: torch.Generator
    log: list[str] = field(default_factory=list)

    def note(self, **kw) -> None:
        self.log.append(", ".join(f"{k}={v}" for k, v in kw.items()))

    def choice(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def values(self, shape, dtype, kinds, *, scale=None, p=None, abs_=False, discrete=False) -> torch.Tensor:
        """Random values of ``dtype`` (on the CPU, contiguous), salted with ``kinds`` of special values."""
        shape = tuple(shape)
        scale = self.choice((1e-3, 0.1, 1.0, 4.0)) if scale is None else scale
        if discrete:  # many ties (N:M ranking)
            base = torch.randint(-2, 3, shape, generator=self.gen).to(torch.float64) * scale
        else:
            base = torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale
        p = self.choice((0.0, 0.05, 0.3, 0.8)) if p is None else p
        if kinds and p > 0 and base.numel():
            pool = torch.tensor(_specials(dtype, kinds, self.rng), dtype=torch.float64)
            pick = pool[torch.randint(0, pool.numel(), shape, generator=self.gen)]
            salt = torch.rand(shape, generator=self.gen, dtype=torch.float64) < p
            base = torch.where(salt, pick, base)
        if abs_:
            base = base.abs()
        return base.to(dtype)

    def layout(self, shape) -> str:
        opts = ["contig", "contig", "offset"]
        if len(shape) == 2:
            opts.append("T")
        if len(shape) >= 1:
            opts.append("strided")
        return self.choice(opts)


def view_as(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to ``t`` laid out as ``layout``, on the test device (fresh memory)."""
    t = t.to(DEVICE, copy=True)  # never a view of ``t``: the in-place ops get one copy per backend
    if layout == "T" and t.dim() == 2:
        return t.t().contiguous().t()
    if layout == "strided" and t.dim() >= 1:
        big = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=DEVICE)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "offset":
        flat = torch.zeros(t.numel() + 1, dtype=t.dtype, device=DEVICE)
        flat[1:] = t.reshape(-1)
        return flat[1:].view(t.shape)
    return t


def _odd_shape(case: Case, dims: int | None = None) -> tuple[int, ...]:
    dims = case.choice((1, 1, 2, 2, 3)) if dims is None else dims
    if dims == 1:
        return (case.choice(ODD + (0,)),)
    if dims == 2:
        return (case.choice(SMALL + ODD[:2]), case.choice(ODD + (0, 3)))
    return (case.choice((0, 1, 3)), case.choice((1, 2)), case.choice((1, 5, 7)))


def _cd(*dtypes) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _up(t, dtype):
    """``t`` in the compute dtype (the reference on these gives unrounded results)."""
    return None if t is None else t.to(dtype)


# ------------------------------------------------------------------------------------------------
# comparison
# ------------------------------------------------------------------------------------------------
def h(t: torch.Tensor) -> torch.Tensor:
    return t >= 0


def same_specials(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    for name, f in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        a, b = f(got), f(want)
        if not torch.equal(a, b):
            idx = (a != b).nonzero()[:5].tolist()
            raise AssertionError(
                f"{what}: {name} positions differ at {idx}: got {got[a != b][:5].tolist()}, "
                f"reference {want[a != b][:5].tolist()}"
            )


def exact(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal values (+0 == -0), NaN where the reference has NaN; same dtype and shape."""
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    got, want = got.cpu(), want.cpu()
    same_specials(what, got, want)
    fin = ~torch.isnan(want)
    bad = got[fin] != want[fin]
    if bad.any():
        raise AssertionError(
            f"{what}: not exact: got {got[fin][bad][:5].tolist()}, reference {want[fin][bad][:5].tolist()}"
        )


def _bound(expected64: torch.Tensor, eager: torch.Tensor | None, dtype: torch.dtype) -> float:
    """The error bound of :func:`tolerances.assert_matches` for these values."""
    scale = float(expected64.double().abs().max()) if expected64.numel() else 0.0
    scale = scale or 1.0
    if eager is not None:
        err = float((eager.double() - expected64.double()).abs().max()) if eager.numel() else 0.0
        return 2 * err + torch.finfo(eager.dtype if eager.dtype in LOW else dtype).eps * scale
    return (1e-12 if dtype == torch.float64 else 1e-5) * scale


def close(what: str, got: torch.Tensor, native: torch.Tensor, unrounded: torch.Tensor, *, pointwise=False,
          decision=False, exact_decision=False, low_inputs=False) -> None:
    """``got`` against the reference backend's result ``native`` (same dtype; the spec) and the same
    computation unrounded (``unrounded``, in the compute dtype).

    Non-finite positions must match ``native`` exactly; finite values follow :mod:`tolerances`
    (2x the reference's own rounding error for float16 / bfloat16). ``pointwise``: also a
    per-element bound (elementwise results: the global scale must not hide small entries).
    ``decision``: ``h(got) == h(native)`` wherever the value is farther than the error bound from 0;
    ``exact_decision``: everywhere. ``low_inputs``: the reference rounds intermediates to float16 /
    bfloat16 (the GEMMs of ``masked_linear``), so the 2x rule applies whatever the output dtype.
    """
    assert got.dtype == native.dtype and got.shape == native.shape, (
        what, got.dtype, native.dtype, tuple(got.shape), tuple(native.shape))
    got, native, unrounded = got.cpu(), native.cpu(), unrounded.cpu().to(_cd(native.dtype, unrounded.dtype))
    same_specials(what, got, native)
    fin = torch.isfinite(native) & torch.isfinite(unrounded)
    g, n, u = got[fin], native[fin], unrounded[fin]
    rounded = low_inputs or got.dtype != u.dtype  # rounded below the compute precision: the 2x-eager rule
    assert_matches(g, u, n if rounded else None, what=what)
    if pointwise and g.numel():
        fi = torch.finfo(got.dtype)
        rtol = 1e-12 if got.dtype == torch.float64 else 1e-5 + (fi.eps if rounded else 0.0)
        err = (g.double() - u.double()).abs()
        lim = rtol * u.double().abs() + 2 * fi.smallest_normal
        if rounded:  # never stricter than the reference's own error
            lim = torch.maximum(lim, 2 * (n.double() - u.double()).abs() + 2 * fi.smallest_normal)
        bad = err > lim
        if bad.any():
            raise AssertionError(
                f"{what}: elementwise error: got {g[bad][:5].tolist()}, expected {u[bad][:5].tolist()}"
            )
    if exact_decision:
        exact(what + " decision", h(got), h(native))
    elif decision and g.numel():
        far = u.double().abs() > _bound(u, n if rounded else None, got.dtype)
        exact(what + " decision", h(g[far]), h(n[far]))


def run(name: str, fn):
    with backends.use(name):
        return fn()


# ------------------------------------------------------------------------------------------------
# the cases
# ------------------------------------------------------------------------------------------------
ALL = ("sub", "zero", "tiny", "huge", "nan", "inf")
FINITE = ("sub", "zero", "tiny", "huge")
GEMM = ("sub", "zero", "tiny", "nan", "inf")  # no huge values: overflow inside a sum depends on the order


def _names(case: Case):
    surrogate = case.choice(ref.SURROGATES)
    rule = case.choice(ref.RULES)
    alpha = case.choice((0.1, 0.3, 1.0, 0.0))
    case.note(surrogate=surrogate, rule=rule, alpha=alpha)
    return surrogate, rule, alpha


def _aux_kinds(case: Case) -> tuple[str, ...]:
    nonfinite = case.rng.random() < 0.3  # the raw ops accept NaN/inf aux
    case.note(aux_nonfinite=nonfinite)
    return ALL if nonfinite else FINITE


def _check_mask_ops(case, label, w, m, g, surrogate, rule, alpha, need_w, need_m, m_for):
    """apply_mask + mask_backward on every backend; ``m_for(name)`` gives each backend's aux."""
    unit = m.shape != w.shape
    ops = torch.ops.autoprune

    def call(name):
        mm = m_for(name)
        return run(name, lambda: (ops.apply_mask(w, mm, surrogate, rule, alpha),
                                  *ops.mask_backward(g, w, mm, surrogate, rule, alpha, need_w, need_m)))

    want = call("reference")
    cd = _cd(g.dtype, w.dtype, m.dtype)
    _, dM_u = ref.mask_backward(_up(g, cd), _up(w, cd), _up(m_for("reference"), cd), surrogate, rule, alpha,
                                False, need_m)
    for name in OTHERS:
        T, dW, dM = call(name)
        exact(f"{label} T [{name}]", T, want[0])
        if need_w:
            exact(f"{label} dW [{name}]", dW, want[1])
        else:
            assert dW.numel() == 0
        if need_m:
            close(f"{label} dM [{name}]", dM, want[2], dM_u, pointwise=not unit)
        else:
            assert dM.numel() == 0


def case_mask(case: Case) -> None:
    gran = case.choice(("weight", "unit"))
    shape = _odd_shape(case)
    if gran == "unit" and case.rng.random() < 0.15:
        shape = (case.choice((1, 3, 7)), 0)  # rows of no element: dM = 0 * s(M) (NaN for s = NaN / inf)
    wdt, adt = case.choice(FLOATS), case.choice(FLOATS)
    gdt = wdt  # the op checks: grad has weight's dtype (autograd's gradient of T)
    surrogate, rule, alpha = _names(case)
    need_w, need_m = case.rng.random() < 0.8, case.rng.random() < 0.8
    ashape = shape if gran == "weight" else shape[:1]
    lw, la, lg = case.layout(shape), case.layout(ashape), case.layout(shape)
    case.note(op="mask", gran=gran, shape=shape, w=wdt, aux=adt, grad=gdt, need=(need_w, need_m), layouts=(lw, la, lg))
    kinds = ALL if gran == "weight" else GEMM  # unit: dM sums g * c(W) over a row (no huge values)
    w = view_as(case.values(shape, wdt, kinds), lw)
    m = view_as(case.values(ashape, adt, _aux_kinds(case)), la)
    g = view_as(case.values(shape, gdt, kinds), lg)
    _check_mask_ops(case, "mask", w, m, g, surrogate, rule, alpha, need_w, need_m, lambda name: m)


def case_nm(case: Case) -> None:
    mgrp = case.choice((1, 2, 4, 7, 8, 16, 32))
    n = case.rng.randint(1, mgrp)
    rows = case.choice((0, 1, 3, 7))
    shape = case.choice(((rows, mgrp * case.choice((1, 2, 3))), (rows, 2, mgrp)))
    adt, wdt = case.choice(FLOATS), case.choice(FLOATS)
    discrete = case.rng.random() < 0.4
    surrogate, rule, alpha = _names(case)
    la = case.layout(shape)
    case.note(op="nm", n=n, m=mgrp, shape=shape, aux=adt, w=wdt, discrete=discrete, layout=la)
    a = view_as(case.values(shape, adt, _aux_kinds(case), discrete=discrete), la)
    ops = torch.ops.autoprune
    scores = {name: run(name, lambda: ops.nm_scores(a, n, mgrp)) for name in ["reference", *OTHERS]}
    s_ref = scores["reference"]
    s_u = ref.nm_scores(a, n, mgrp)  # computed in the compute dtype; rounding to aux's dtype is exact here
    for name in OTHERS:
        close(f"nm S [{name}]", scores[name], s_ref, s_u, exact_decision=True)
        if a.numel():
            kept = h(scores[name]).cpu().reshape(-1, mgrp).sum(1)
            finite_groups = torch.isfinite(a.cpu()).reshape(-1, mgrp).all(1)
            assert (kept[finite_groups] == n).all(), f"nm [{name}]: not exactly n kept per finite group"
    # the mask ops on each backend's own scores
    w = view_as(case.values(shape, wdt, ALL), "contig")
    g = view_as(case.values(shape, wdt, ALL), "contig")
    _check_mask_ops(case, "nm", w, s_ref, g, surrogate, rule, alpha, True, True, lambda name: scores[name])


def case_linear(case: Case) -> None:
    N, K = case.choice((1, 7, 9, 33)), case.choice((1, 7, 16, 33))
    lead = case.choice(((0,), (1,), (5,), (2, 3)))
    dt = case.choice(FLOATS)
    adt = case.choice(FLOATS)
    gran = case.choice(("weight", "unit"))
    has_bias = case.rng.random() < 0.6
    surrogate, rule, alpha = _names(case)
    need = tuple(case.rng.random() < 0.75 for _ in range(4))
    ashape = (N, K) if gran == "weight" else (N,)
    lx, lw, la = case.layout((*lead, K)), case.layout((N, K)), case.layout(ashape)
    case.note(op="linear", N=N, K=K, lead=lead, dtype=dt, aux=adt, gran=gran, bias=has_bias, need=need,
              layouts=(lx, lw, la))
    x = view_as(case.values((*lead, K), dt, GEMM, scale=1.0), lx)
    w = view_as(case.values((N, K), dt, GEMM, scale=1.0), lw)
    m = view_as(case.values(ashape, adt, _aux_kinds(case)), la)
    b = view_as(case.values((N,), dt, GEMM, scale=1.0), "contig") if has_bias else None
    gy = view_as(case.values((*lead, N), dt, GEMM, scale=1.0), case.layout((*lead, N)))
    ops = torch.ops.autoprune

    def call(name):
        return run(name, lambda: (ops.masked_linear(x, w, m, b, surrogate, rule, alpha),
                                  *ops.masked_linear_backward(gy, x, w, m, surrogate, rule, alpha, *need)))

    want = call("reference")
    cd = _cd(dt)  # the GEMMs compute in the inputs' precision (float32 accumulation for float16 / bfloat16)
    y_u = ref.masked_linear(_up(x, cd), _up(w, cd), m, _up(b, cd))
    grads_u = ref.masked_linear_backward(_up(gy, cd), _up(x, cd), _up(w, cd), _up(m, _cd(dt, adt)), surrogate, rule,
                                         alpha)
    keep = h(ref.broadcast_aux(m, w)).expand(w.shape).cpu()
    for name in OTHERS:
        got = call(name)
        close(f"linear Y [{name}]", got[0], want[0], y_u, low_inputs=dt in LOW)
        for i, what in enumerate(("dX", "dW", "dM", "db")):
            if not need[i]:
                assert got[1 + i].numel() == 0, what
                continue
            close(f"linear {what} [{name}]", got[1 + i], want[1 + i], grads_u[i], low_inputs=dt in LOW)
        if need[1]:  # pruned entries: dW = dT * 0 exactly (0, or NaN for a non-finite dT)
            exact(f"linear dW pruned [{name}]", got[2].cpu()[~keep], want[2].cpu()[~keep])


def _adam_tensors(case: Case, shape, adt):
    mdt = case.choice((torch.float32, torch.float32, torch.float64, adt))
    has_g, has_w = case.rng.random() < 0.7, case.rng.random() < 0.4
    gdt, wdt = case.choice(FLOATS), case.choice(FLOATS)
    layout = case.layout(shape)
    case.note(shape=shape, aux=adt, moments=mdt, grad=gdt if has_g else None, weight=wdt if has_w else None,
              layout=layout)
    vals = [
        case.values(shape, adt, _aux_kinds(case)),
        case.values(shape, mdt, FINITE, scale=0.1),
        case.values(shape, mdt, FINITE, scale=0.1, abs_=True),
        case.values(shape, gdt, ALL) if has_g else None,
        case.values(shape, wdt, ALL) if has_w else None,
    ]
    return vals, layout


def _adam_hyper(case: Case) -> dict:
    hp = dict(
        lr=case.choice((0.0, 1e-3, 1e-2, 0.5)),
        beta1=case.choice((0.0, 0.9)),
        beta2=case.choice((0.0, 0.99, 0.999)),
        eps=case.choice((0.0, 1e-8, 1e-3)),
        rho=case.choice((0.0, 1e-3, 0.5)),
    )
    case.note(**hp)
    return hp


def _adam_copies(vals, layout):
    """Fresh tensors for one backend: in-place ones laid out as ``layout``."""
    return [view_as(v, layout) if i < 3 else (None if v is None else v.to(DEVICE)) for i, v in enumerate(vals)]


def _adam_unrounded(vals, cd, step, hp, scale, surrogate, alpha):
    a, e1, e2, g, w = [None if v is None else v.to(DEVICE) for v in vals]
    a, e1, e2 = (t.to(cd, copy=True) for t in (a, e1, e2))  # never in place on the shared inputs
    ref.aux_adam_step_(a, e1, e2, g, w, step=step, penalty_scale=scale, surrogate_name=surrogate, alpha=alpha, **hp)
    return a, e1, e2


def _compare_adam(label, got, want, unrounded, lr):
    for i, what in enumerate(("aux", "exp_avg", "exp_avg_sq")):
        close(f"{label} {what}", got[i], want[i], unrounded[i], decision=i == 0, exact_decision=i == 0 and lr == 0)


def case_adam(case: Case) -> None:
    adt = case.choice(FLOATS)
    shape = _odd_shape(case)
    case.note(op="adam")
    vals, layout = _adam_tensors(case, shape, adt)
    hp = _adam_hyper(case)
    step = case.choice((1, 2, 10, 1000))
    scale = case.choice((0.0, 0.37, -1.0, 1e3))
    surrogate, _, alpha = _names(case)
    case.note(step=step, penalty_scale=scale)

    def call(name):
        t = _adam_copies(vals, layout)
        run(name, lambda: torch.ops.autoprune.aux_adam_step_(
            *t, step, hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], scale, hp["rho"], surrogate, alpha))
        return t[:3]

    want = call("reference")
    cd = _cd(*(v.dtype for v in vals if v is not None))
    unrounded = _adam_unrounded(vals, cd, step, hp, scale, surrogate, alpha)
    for name in OTHERS:
        _compare_adam(f"adam [{name}]", call(name), want, unrounded, hp["lr"])


def case_adam_multi(case: Case) -> None:
    count = case.choice((1, 2, 3))
    case.note(op="adam_multi", count=count)
    sets = []
    for _ in range(count):
        adt = case.choice(FLOATS)
        vals, layout = _adam_tensors(case, _odd_shape(case), adt)
        step, scale = case.choice((1, 3, 100)), case.choice((0.0, 0.5, -2.0))
        case.note(step=step, penalty_scale=scale)
        sets.append((vals, layout, step, scale))
    hp = _adam_hyper(case)
    surrogate, _, alpha = _names(case)

    def call(name):
        ts = [_adam_copies(v, lay) for v, lay, _, _ in sets]
        lists = [list(x) for x in zip(*ts)]
        run(name, lambda: torch.ops.autoprune.aux_adam_step_multi_(
            *lists, [s[2] for s in sets], [s[3] for s in sets], hp["lr"], hp["beta1"], hp["beta2"], hp["eps"],
            hp["rho"], surrogate, alpha))
        return [t[:3] for t in ts]

    want = call("reference")
    unrounded = [
        _adam_unrounded(v, _cd(*(x.dtype for x in v if x is not None)), st, hp, sc, surrogate, alpha)
        for v, _, st, sc in sets
    ]
    for name in OTHERS:
        for i, (got, w, u) in enumerate(zip(call(name), want, unrounded)):
            _compare_adam(f"adam_multi[{i}] [{name}]", got, w, u, hp["lr"])


CASES = {"mask": case_mask, "linear": case_linear, "adam": case_adam, "adam_multi": case_adam_multi, "nm": case_nm}


def make_case(seed: int) -> tuple[Case, str]:
    case = Case(seed, random.Random(seed), torch.Generator().manual_seed(seed))
    return case, case.choice(OPS)


def run_seed(seed: int) -> None:
    case, op = make_case(seed)
    try:
        CASES[op](case)
    except AssertionError as exc:
        raise AssertionError(f"seed {seed} ({op}): {exc}\n  case: " + "\n        ".join(case.log)) from None


@pytest.mark.parametrize("seed", range(N_FAST))
def test_fuzz(seed):
    run_seed(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(N_FAST, N_SLOW))
def test_fuzz_slow(seed):
    run_seed(seed)


def test_fuzz_covers_every_op():
    """The default seeds draw every op (guards against a generator change that silently drops one)."""
    ops = {make_case(s)[1] for s in range(N_FAST)}
    assert ops == set(CASES)


# ------------------------------------------------------------------------------------------------
# the rules of reference.py's docstring, spelled out (what the fuzz cases above found)
# ------------------------------------------------------------------------------------------------
def _edge_aux(dtype: torch.dtype) -> torch.Tensor:
    sub = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the smallest subnormal
    vals = [-sub, sub, -3 * sub, 3 * sub, -0.0, 0.0, math.nan, -math.inf, math.inf, -1.0, 1.0]
    return torch.tensor(vals, dtype=torch.float64).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", OTHERS)
def test_rule_mask_decision_on_special_aux(name, dtype):
    """h: -subnormal pruned, +subnormal / +-0 / +inf kept, NaN / -inf pruned -- every op, every dtype."""
    m = _edge_aux(dtype)
    want = [False, True, False, True, True, True, False, False, True, False, True]
    w = torch.arange(1, m.numel() + 1, dtype=torch.float32, device=DEVICE)
    g = torch.ones_like(w)
    with backends.use(name):
        T = torch.ops.autoprune.apply_mask(w, m, "softplus", "sign", 0.1)
        dW, _ = torch.ops.autoprune.mask_backward(g, w, m, "softplus", "sign", 0.1, True, False)
        x = torch.eye(m.numel(), dtype=torch.float32, device=DEVICE)
        # weight granularity: W = diag(w), M = diag(m) (off the diagonal W is 0 anyway); y = T^T
        y = torch.ops.autoprune.masked_linear(x, torch.diag(w), torch.diag(m), None, "softplus", "sign", 0.1)
        # unit granularity: row i of W is w_i, kept by m_i; y[0, i] = T[i, 0]
        wu = w[:, None].expand(-1, m.numel()).contiguous()
        yu = torch.ops.autoprune.masked_linear(x, wu, m, None, "softplus", "sign", 0.1)
    assert (T != 0).cpu().tolist() == want
    assert (dW != 0).cpu().tolist() == want
    assert (torch.diagonal(y) != 0).cpu().tolist() == want
    assert (yu[0] != 0).cpu().tolist() == want


@pytest.mark.parametrize("name", OTHERS)
def test_rule_sign_of_nan_weight_and_subnormal_surrogates(name):
    """sign(NaN) = 0 (dM = 0, not NaN), sign(+-subnormal) = +-1; leaky_relu/relu branch on the sign of a
    subnormal aux; a NaN |w| makes the inv_abs_weight penalty NaN."""
    w = torch.tensor([math.nan, 1e-45, -1e-45, 0.0], device=DEVICE)
    g = torch.ones_like(w)
    m = torch.tensor([1.0, 1.0, 1.0, 1.0], device=DEVICE)
    ms = torch.tensor([1e-45, -1e-45, 1e-45, -1e-45], device=DEVICE, dtype=torch.float32)
    ones = torch.ones(4, device=DEVICE)
    with backends.use(name):
        _, dM = torch.ops.autoprune.mask_backward(g, w, m, "identity", "sign", 0.1, False, True)
        _, dMs = torch.ops.autoprune.mask_backward(ones, ones, ms, "leaky_relu", "chain", 0.25, False, True)
        _, dMr = torch.ops.autoprune.mask_backward(ones, ones, ms, "relu", "chain", 0.25, False, True)
        aux, e1, e2 = torch.zeros(2, device=DEVICE), torch.zeros(2, device=DEVICE), torch.zeros(2, device=DEVICE)
        wt = torch.tensor([math.nan, 1e-20], device=DEVICE)
        torch.ops.autoprune.aux_adam_step_(aux, e1, e2, None, wt, 1, 0.1, 0.9, 0.999, 1e-8, 1.0, 0.0,
                                           "identity", 0.1)
    assert dM.cpu().tolist() == [0.0, 1.0, -1.0, 0.0]
    assert dMs.cpu().tolist() == [1.0, 0.25, 1.0, 0.25]
    assert dMr.cpu().tolist() == [1.0, 0.0, 1.0, 0.0]
    assert math.isnan(aux[0].item()) and aux[1].item() == 0.0  # NaN |w| -> NaN; |w| < 1e-15 -> no push


@pytest.mark.parametrize("name", OTHERS)
def test_rule_nm_order_of_special_values(name):
    """N:M ranks as torch.sort (descending, stable): NaN first, -0 == +0 tie by index, subnormals by value."""
    a = torch.tensor([[0.0, -0.0, 1e-45, -1e-45], [-0.0, 0.0, -1.0, -2.0], [1.0, math.nan, 2.0, -1.0]],
                     device=DEVICE)
    with backends.use(name):
        s = torch.ops.autoprune.nm_scores(a, 2, 4)
    want = ref.nm_scores(a.cpu(), 2, 4)
    same_specials("nm", s.cpu(), want)
    assert (s.cpu() >= 0).tolist() == (want >= 0).tolist()
    # row 3: NaN ranks first and is kept by rank, but its score is NaN (pruned); 2.0 is kept
    assert (want >= 0).tolist() == [[True, False, True, False], [True, True, False, False],
                                    [False, False, True, False]]
