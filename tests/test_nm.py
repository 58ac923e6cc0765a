"""N:M structured masks: the nm_scores op on every backend, N:M layers, training, finalize and export."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import autoprune_ext as ap
from autoprune_ext import backends, export
from autoprune_ext import functional as F
from autoprune_ext import reference as ref
from autoprune_ext.autoprune import AutoPrune

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture(params=backends.NAMES)
def backend(request):
    ok, why = backends.availability(request.param, "cpu")
    if not ok:
        pytest.skip(f"backend {request.param} unavailable: {why}")
    with backends.use(request.param) as b:
        yield b


def brute_force(aux: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The spec in plain Python: keep the top n of each group (ties: lower index), S = v - threshold."""
    cd = torch.float64 if aux.dtype == torch.float64 else torch.float32
    tiny = torch.finfo(aux.dtype).tiny
    flat = aux.to(cd).reshape(-1, m).tolist()
    out = []
    for group in flat:
        order = sorted(range(m), key=lambda j: (-group[j], j))
        kept = set(order[:n])
        vals = [torch.tensor(group[j], dtype=cd) for j in order]
        t = vals[n - 1] if n == m else vals[n - 1] / 2 + vals[n] / 2
        for j in range(m):
            d = torch.tensor(group[j], dtype=cd) - t
            out.append(max(float(d), 0.0) if j in kept else min(float(d), -tiny))
    return torch.tensor(out, dtype=cd).to(aux.dtype).reshape(aux.shape)


def with_ties(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    flat = a.view(-1)
    if flat.numel() >= 12:
        flat[:4] = 0.25          # a group of equal values
        flat[4:8] = torch.tensor([-0.0, 0.0, -0.0, 0.0])
        flat[8:12] = torch.tensor([1.0, -1.0, 1.0, 1.0])
    return a.to(dtype)


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 8), (4, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_brute_force(n, m, dtype):
    a = with_ties((7, 2 * m), dtype)
    assert torch.equal(ref.nm_scores(a, n, m), brute_force(a, n, m))


@pytest.mark.parametrize("shape,n,m", [((1, 4), 2, 4), ((7, 8), 2, 4), ((129, 16), 2, 4), ((5, 3, 2, 2), 2, 4),
                                       ((0, 4), 2, 4), ((33, 24), 3, 8), ((9, 10), 2, 5), ((4, 64), 7, 32)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backends_bit_identical_and_exactly_n(backend, shape, n, m, dtype):
    a = with_ties(shape, dtype, seed=sum(shape))
    got = F.nm_scores(a, n, m)
    want = ref.nm_scores(a, n, m)
    assert got.dtype == dtype and got.shape == a.shape and got.is_contiguous()
    view = INT_VIEW[dtype.itemsize]
    assert torch.equal(got.view(view), want.view(view)), "not bit-identical to the reference (sign of zero included)"
    if a.numel():
        assert torch.all((got >= 0).reshape(-1, m).sum(1) == n)


def test_non_contiguous_input(backend):
    base = with_ties((16, 12), torch.float32)
    a = base.t()  # [12, 16], rows of 16 split into groups of 4
    assert not a.is_contiguous()
    assert torch.equal(F.nm_scores(a, 2, 4), ref.nm_scores(a.contiguous(), 2, 4))


def test_kept_entries_are_the_group_top_n():
    a = torch.tensor([[0.3, -0.1, 0.9, 0.2, 5.0, 4.0, -3.0, 4.0]])
    s = ref.nm_scores(a, 2, 4)
    assert (s >= 0).tolist() == [[True, False, True, False, True, True, False, False]]
    # distance to the midpoint of the 2nd and 3rd largest: 0.25 and 4.0
    assert s[0, 0] == pytest.approx(0.3 - 0.25) and s[0, 4] == pytest.approx(1.0)


def test_straight_through_gradient_and_opcheck():
    a = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 8, dtype=torch.float64)
    (F.nm_scores(a, 2, 4) * g).sum().backward()
    assert torch.equal(a.grad, g)
    torch.library.opcheck(torch.ops.autoprune.nm_scores.default, (torch.randn(4, 8), 2, 4))
    torch.library.opcheck(torch.ops.autoprune.nm_scores.default,
                          (torch.randn(4, 8, dtype=torch.float64, requires_grad=True), 1, 2))


def test_coarse_gradient_of_an_nm_masked_weight_matches_the_reference():
    w = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    a = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 8, dtype=torch.float64)
    t = F.apply_nm_mask(w, a, 2, 4)
    (t * g).sum().backward()
    s = ref.nm_scores(a.detach(), 2, 4)
    dW, dM = ref.mask_backward(g, w.detach(), s)
    assert torch.equal(w.grad, dW)
    torch.testing.assert_close(a.grad, dM, rtol=1e-12, atol=1e-12)  # the default backend's softplus
    assert export.is_nm(t.detach(), 2, 4)


@pytest.mark.parametrize("call,match", [
    (lambda: F.nm_scores(torch.randn(4, 6), 2, 4), "groups of m=4"),
    (lambda: F.nm_scores(torch.randn(4, 8), 5, 4), "n, m"),
    (lambda: F.nm_scores(torch.randn(4, 8), 0, 4), "n, m"),
    (lambda: F.nm_scores(torch.randn(4, 64), 2, 64), "n, m"),
    (lambda: F.nm_scores(torch.ones(4, 8, dtype=torch.int32), 2, 4), "aux: expected dtype"),
    (lambda: F.nm_scores(torch.randn(4, 8), 2.0, 4), "n: expected an int"),
    (lambda: F.nm_scores(torch.tensor(1.0), 1, 1), "aux: expected a tensor with at least one dimension"),
    (lambda: F.nm_scores(torch.full((2, 4), float("nan")), 2, 4), "aux: expected finite"),
    (lambda: ap.nn.MaskedLinear(6, 3, granularity="2:4"), "weight: expected rows"),
    (lambda: ap.nn.MaskedLinear(8, 3, granularity="4:2"), "granularity"),
    (lambda: ap.nn.MaskedLinear(8, 3, granularity="2:x"), "granularity"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize("granularity", ["2:4", "1:4", "4:8"])
def test_masked_linear_layer_is_exactly_nm_and_backends_agree(granularity):
    n, m = ref.parse_nm(granularity)
    torch.manual_seed(0)
    dense = nn.Linear(16, 7)
    layer = ap.convert(nn.Linear(16, 7), granularity=granularity, init=(0.0, 1.0))
    layer.weight.data.copy_(dense.weight.data)
    layer.bias.data.copy_(dense.bias.data)
    assert layer.weight_aux.shape == layer.weight.shape
    assert layer.kept() == 7 * 16 * n // m and layer.density() == pytest.approx(n / m)
    x = torch.randn(3, 16)
    results = {}
    for name in backends.NAMES:
        if not backends.availability(name, "cpu")[0]:
            continue
        layer.zero_grad()
        with backends.use(name):
            y = layer(x)
            y.square().sum().backward()
        results[name] = (y.detach(), layer.weight.grad.clone(), layer.weight_aux.grad.clone())
    want = torch.nn.functional.linear(x, dense.weight * layer.mask(), dense.bias)
    for name, (y, dw, dm) in results.items():
        torch.testing.assert_close(y, want, msg=name)
        torch.testing.assert_close(dw, results["reference"][1], msg=name)
        torch.testing.assert_close(dm, results["reference"][2], msg=name)
    assert export.is_nm(layer.masked_weight(), n, m)


def test_conv_and_unit_counts():
    conv = ap.convert(nn.Conv2d(3, 4, 2), granularity="2:4", init=(0.0, 1.0))  # rows of 3*2*2 = 12
    assert export.is_nm(conv.masked_weight(), 2, 4) and conv.kept() == 4 * 12 // 2
    from autoprune_ext.sparsity import layer_counts

    model = nn.Sequential(conv)
    assert [c.kept for c in layer_counts(model)] == [conv.kept()]
    assert ap.sparsity_report(model).kept == conv.kept()


def blobs(n: int, seed: int):
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 16, generator=g)
    x[torch.arange(n), y] += 2.0
    return TensorDataset(x, y)


def test_train_finalize_exact_2_4_and_export(tmp_path):
    torch.manual_seed(0)
    model = ap.convert(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), granularity="2:4")
    trainer = AutoPrune(model, lr_aux=0.05, batch_size=32, target_density=0.5)
    assert {g["name"]: g["penalty"] for g in trainer.aux_optimizer.param_groups} == {"n:m": 0.0}
    before = [m.weight_aux.detach().clone() for _, m in ap.masked_modules(model)]
    trainer.fit(blobs(128, 0), blobs(64, 1), steps=10, progress=False)
    after = [m.weight_aux.detach() for _, m in ap.masked_modules(model)]
    assert any(not torch.equal(b, a) for b, a in zip(before, after)), "aux did not learn"
    assert trainer.density() == pytest.approx(0.5)
    final = ap.finalize(model)
    for layer in (final[0], final[2]):
        assert type(layer) is nn.Linear
        assert export.nm_violations(layer.weight, 2, 4) == 0
        assert (layer.weight.reshape(-1, 4) != 0).sum(1).max() <= 2
    ok, why = export.semi_structured_support(final[0].weight.device)
    if not ok:
        with pytest.raises(RuntimeError, match="layer '0'"):
            export.to_semi_structured(final)
        pytest.skip(f"export to torch.sparse semi-structured: {why}")
    final = final.half().cuda()
    assert export.to_semi_structured(final) == ["0", "2"]


def test_is_nm_detects_a_violation():
    w = torch.tensor([[1.0, 2.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert export.nm_violations(w, 2, 4) == 1 and not export.is_nm(w) and export.is_nm(w, 3, 4)
    with pytest.raises(ValueError, match="groups of m=4"):
        export.nm_violations(torch.ones(2, 6), 2, 4)


def test_compile_fullgraph_nm_layer():
    layer = ap.convert(nn.Linear(8, 4), granularity="2:4", init=(0.0, 1.0))
    x = torch.randn(2, 8)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), layer(x))


def test_hf_conv1d_nm_groups_along_the_input_dimension():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    layer = ap.convert(Conv1D(6, 8), granularity="2:4", init=(0.0, 1.0))  # weight [8 in, 6 out]
    assert layer.weight_aux.shape == (6, 8)
    assert export.is_nm(layer.masked_weight().t(), 2, 4)  # groups of 4 inputs per output feature
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), x @ layer.masked_weight() + layer.bias)


@pytest.mark.parametrize("n,m", list(itertools.product([1, 2], [2, 4])))
def test_fuzz_specials(backend, n, m):
    """Huge values, subnormals, +-0 and repeated values: every backend equals the reference."""
    specials = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38, 1.0, 1.0, -1.0, 1e-30])
    g = torch.Generator().manual_seed(n * 10 + m)
    for _ in range(20):
        idx = torch.randint(0, len(specials), (6, 4 * m), generator=g)
        a = specials[idx]
        got, want = F.nm_scores(a, n, m), ref.nm_scores(a, n, m)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
        assert torch.all((got >= 0).reshape(-1, m).sum(1) == n)
