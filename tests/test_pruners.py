"""Baseline pruners WT, SiPP, FT, PFP: scores against hand-computed values, ratio matching, structure
(FT keeps the logits layer and a uniform fraction, PFP prunes whole input channels), dead-unit removal,
the registry and argument errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from autoprune_ext import convert
from autoprune_ext.models import get_model
from autoprune_ext.pruners import _scores as S
from autoprune_ext.pruners.base import Pruner, keep_ratio, masked_layers
from autoprune_ext.pruners.ft import FTPruner, ft_scores
from autoprune_ext.pruners.pfp import PFPPruner, budget_constant, expected_distinct, pfp_scores, sample_count
from autoprune_ext.pruners.registry import PRUNERS, get_pruner, register_pruner
from autoprune_ext.pruners.sipp import SiPPPruner, sipp_scores
from autoprune_ext.pruners.wt import WTPruner, wt_scores

# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> TensorDataset:
    """A few held-out digits (28x28): |S| is capped at half of them, which keeps the tests fast."""
    from autoprune_ext.data import load_digits

    held = load_digits().heldout
    return TensorDataset(*[t[:16] for t in held.tensors])


@pytest.fixture(scope="module")
def resnet20_graph() -> tuple[nn.Module, S.Graph]:
    """A converted ResNet20 and its dataflow graph on one 32x32 image."""
    model = _converted("resnet20")
    return model, S.trace(model, torch.zeros(1, 3, 32, 32))


def _converted(name: str) -> nn.Module:
    torch.manual_seed(0)
    return convert(get_model(name), init=1.0)


def _linear(weight: list[list[float]]) -> nn.Module:
    """A converted one-layer model with the given weight and no bias."""
    w = torch.tensor(weight, dtype=torch.float64)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(w)
    return convert(nn.Sequential(lin), init=1.0)


def _rows_cols(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = layer.mask().reshape(layer.weight.shape[0], layer.weight.shape[1], -1)
    return mask, mask.any(2).any(1), mask.any(2).any(0)


def _within(model: nn.Module, keep: float) -> bool:
    return abs(keep_ratio(model) - keep) <= 0.005 * keep


# ---------------------------------------------------------------------------------------------
# scores against hand-computed values
# ---------------------------------------------------------------------------------------------

# W = [[1, -2, -1], [2, 1, -3]], S = {x1 = [1, 2, 1], x2 = [3, 1, 2]}.
# g_ij = W+_ij a_j / z+_i for W_ij > 0, W-_ij a_j / z-_i for W_ij < 0:
#   x1: row 0: z+ = 1, z- = -4 - 1 = -5          -> g = [1,   4/5, 1/5]
#       row 1: z+ = 2 + 2 = 4, z- = -3            -> g = [1/2, 1/2, 1  ]
#   x2: row 0: z+ = 3, z- = -2 - 2 = -4           -> g = [1,   1/2, 1/2]
#       row 1: z+ = 6 + 1 = 7, z- = -6            -> g = [6/7, 1/7, 1  ]
W_HAND = [[1.0, -2.0, -1.0], [2.0, 1.0, -3.0]]
S_HAND = torch.tensor([[1.0, 2.0, 1.0], [3.0, 1.0, 2.0]], dtype=torch.float64)


def test_wt_scores_are_magnitudes() -> None:
    model = _linear(W_HAND)
    (score,) = wt_scores(model).values()
    torch.testing.assert_close(score, torch.tensor(W_HAND, dtype=torch.float64).abs())


def test_sipp_scores_linear_by_hand() -> None:
    (s,) = sipp_scores(_linear(W_HAND), S_HAND).values()
    # one patch per sample; max over the two samples
    expected = torch.tensor([[1.0, 4 / 5, 1 / 2], [6 / 7, 1 / 2, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(s, expected)


def test_sipp_negative_inputs_split_and_zero_denominators() -> None:
    # x = [-1, 2, 0] gives the points a+ = [0, 2, 0] and a- = [1, 0, 0]:
    #   a+: row 0: z+ = 0 (terms 0), z- = -4 -> g = [0, 1, 0]; row 1: z+ = 2 -> g1 = 1, z- = 0 -> g = [0, 1, 0]
    #   a-: row 0: z+ = 1 -> g0 = 1, z- = 0 -> g = [1, 0, 0]; row 1: z+ = 2 -> g = [1, 0, 0]
    (s,) = sipp_scores(_linear(W_HAND), torch.tensor([[-1.0, 2.0, 0.0]], dtype=torch.float64)).values()
    torch.testing.assert_close(s, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64))


def test_sipp_scores_conv1d_patches_by_hand() -> None:
    # W row 0 = [1, 2], row 1 = [-1, -3]; inputs x1 = [1, 2, 3] (patches [1,2], [2,3]), x2 = [3, 1, 0].
    #   x1 row 0: [1/5, 4/5], [2/8, 6/8] -> mean [0.225, 0.775]; row 1: [1/7, 6/7], [2/11, 9/11]
    #   x2 row 0: [3/5, 2/5], [1, 0]     -> mean [0.8, 0.2];     row 1: [1/2, 1/2], [1, 0] -> [0.75, 0.25]
    conv = nn.Conv1d(1, 2, 2, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[1.0, 2.0]], [[-1.0, -3.0]]]))
    model = convert(nn.Sequential(conv), init=1.0)
    x = torch.tensor([[[1.0, 2.0, 3.0]], [[3.0, 1.0, 0.0]]], dtype=torch.float64)
    (s,) = sipp_scores(model, x).values()
    row1_x1 = [(1 / 7 + 2 / 11) / 2, (6 / 7 + 9 / 11) / 2]
    expected = torch.tensor([[[0.8, 0.775]], [[max(row1_x1[0], 0.75), max(row1_x1[1], 0.25)]]], dtype=torch.float64)
    torch.testing.assert_close(s, expected)


def test_pfp_scores_linear_by_hand() -> None:
    # s_j = max over samples and rows of g_ij (table above): [max(1, 1/2, 1, 6/7), max(4/5, 1/2, 1/2, 1/7),
    # max(1/5, 1, 1/2, 1)]
    (s,) = pfp_scores(_linear(W_HAND), S_HAND).values()
    torch.testing.assert_close(s, torch.tensor([1.0, 4 / 5, 1.0], dtype=torch.float64))


def _brute_force_g(weight: torch.Tensor, x: torch.Tensor, stride: int, pad: int) -> torch.Tensor:
    """``g[x, i, c, kh, kw, p]`` of a 2-d convolution by explicit loops over patches."""
    n, cin, h, w = x.shape
    cout, _, k, _ = weight.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    hp = (h + 2 * pad - k) // stride + 1
    wp = (w + 2 * pad - k) // stride + 1
    g = torch.zeros(n, cout, cin, k, k, hp * wp, dtype=torch.float64)
    for b in range(n):
        for oy in range(hp):
            for ox in range(wp):
                patch = xp[b, :, oy * stride:oy * stride + k, ox * stride:ox * stride + k]
                for i in range(cout):
                    wi = weight[i]
                    zp = (wi.clamp(min=0) * patch).sum()
                    zn = (wi.clamp(max=0) * patch).sum()
                    for c in range(cin):
                        for ky in range(k):
                            for kx in range(k):
                                v = wi[c, ky, kx] * patch[c, ky, kx]
                                den = zp if wi[c, ky, kx] > 0 else zn
                                g[b, i, c, ky, kx, oy * wp + ox] = v / den if abs(float(den)) > 1e-30 else 0.0
    return g


def test_sipp_and_pfp_conv2d_match_explicit_patch_loops() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 2, stride=2, padding=1, bias=False).double()
    model = convert(nn.Sequential(conv), init=1.0)
    x = torch.rand(2, 2, 3, 3, dtype=torch.float64)  # non-negative: no split
    g = _brute_force_g(conv.weight.detach(), x, stride=2, pad=1)
    (s_sipp,) = sipp_scores(model, x).values()
    torch.testing.assert_close(s_sipp, g.mean(-1).amax(0))
    (s_pfp,) = pfp_scores(model, x).values()
    torch.testing.assert_close(s_pfp, g.permute(2, 0, 1, 3, 4, 5).reshape(2, -1).amax(1))


def test_ft_scores_are_filter_l1_norms() -> None:
    conv = nn.Conv2d(1, 3, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([
            [[[1.0, -1.0], [0.0, 2.0]]], [[[0.5, 0.5], [0.5, 0.5]]], [[[-3.0, 0.0], [0.0, 0.0]]],
        ]))
    (norms,) = ft_scores(convert(nn.Sequential(conv), init=1.0)).values()
    torch.testing.assert_close(norms, torch.tensor([4.0, 2.0, 3.0]))


def test_pfp_budget_formulas_by_hand() -> None:
    # p = [1/4, 1/4, 1/2], m = 2: 2 * (1 - (3/4)^2) + (1 - (1/2)^2) = 0.875 + 0.75
    assert expected_distinct(torch.tensor([1.0, 1.0, 2.0]), 2) == pytest.approx(1.625)
    assert expected_distinct(torch.tensor([1.0, 0.0, 3.0]), 1e30) == pytest.approx(2.0)  # zero score: never drawn
    assert sample_count(1.0, 1.0) == 24.0  # ceil(3 * 8 * 1 / 1)
    assert sample_count(2.0, 0.5) == 168.0  # ceil(3 * 7 * 2 / 0.25)
    assert budget_constant(torch.tensor([0.5, 0.5]), 3, 1) == pytest.approx(6 * math.log(8 * 4 / 1e-16))
    c = budget_constant(torch.tensor([1.0, 2.0]), 9, 4, delta=1e-2)
    assert c == pytest.approx(6 * math.log(8 * 10 * 4 / 1e-2) * 3)


def test_sample_size_resnet20_is_183(resnet20_graph: tuple[nn.Module, S.Graph]) -> None:
    _, graph = resnet20_graph
    sizes = [graph.out_numel[m] for m in graph.order]
    assert sum(sizes) == 7 * 16384 + 7 * 8192 + 7 * 4096 + 10 and max(sizes) == 16384
    assert S.sample_size(sum(sizes), max(sizes)) == 183
    # capped at half of the data
    assert S.choose_samples(torch.zeros(40, 3, 32, 32), graph, S.DELTA, None).shape[0] == 20


# ---------------------------------------------------------------------------------------------
# selection and structure
# ---------------------------------------------------------------------------------------------


def test_wt_is_a_global_threshold_and_never_revives() -> None:
    model = _converted("lenet300")
    WTPruner().prune(model, 0.3)
    assert _within(model, 0.3)
    kept = torch.cat([m.weight.detach().abs()[m.mask()] for _, m in masked_layers(model)])
    dropped = torch.cat([m.weight.detach().abs()[~m.mask()] for _, m in masked_layers(model)])
    assert kept.min() >= dropped.max()
    before = {n: m.mask().clone() for n, m in masked_layers(model)}
    WTPruner().prune(model, 0.1)  # cascade: prune further
    assert _within(model, 0.1)
    for n, m in masked_layers(model):
        assert not bool((m.mask() & ~before[n]).any())


def test_sipp_keeps_the_top_scores(digits: TensorDataset) -> None:
    model = _converted("lenet300")
    pruner = SiPPPruner()
    scores = pruner.scores(model, digits)
    pruner.prune(model, 0.2, digits)
    assert _within(model, 0.2)
    kept = torch.cat([scores[n][m.mask()] for n, m in masked_layers(model)])
    dropped = torch.cat([scores[n][~m.mask()] for n, m in masked_layers(model)])
    assert kept.min() >= dropped.max()


def test_ft_small_model_prunes_lowest_norm_filters_and_removes_dead() -> None:
    torch.manual_seed(0)
    model = convert(nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 3),
    ), init=1.0)
    conv1, conv2, fc = (m for _, m in masked_layers(model))
    with torch.no_grad():
        model[1].bias.fill_(0.1)  # every parameter nonzero
    norms = [n.clone() for n in ft_scores(model).values()]
    # parameters: conv1 8*9+8, bn 16, conv2 6*8*9+6, fc 3*24+3 = 609. Keeping 4 of 8 and 3 of 6 filters
    # (f = 1/2) leaves conv1 4*9+4, bn 8, conv2 3*4*9+3, fc 3*12+3 = 198 (a tiny model has few exact ratios)
    assert sum(p.numel() for n, p in model.named_parameters() if "aux" not in n) == 609
    FTPruner(input_shape=(1, 10, 10)).prune(model, 198 / 609)
    assert keep_ratio(model) == 198 / 609
    bn = model[1]
    for layer, norm, nxt, block in ((conv1, norms[0], conv2, 1), (conv2, norms[1], fc, 4)):
        _, rows, _ = _rows_cols(layer)
        assert int(rows.sum()) == rows.numel() // 2
        assert norm[rows].min() >= norm[~rows].max()  # the lowest-norm filters go
        _, _, cols = _rows_cols(nxt)
        assert torch.equal(cols, rows.repeat_interleave(block))  # the constant inputs they fed are pruned
        assert torch.all(layer.bias.detach()[~rows] == 0) and torch.all(layer.bias.detach()[rows] != 0)
    _, rows1, _ = _rows_cols(conv1)
    assert torch.all(bn.weight.detach()[~rows1] == 0) and torch.all(bn.bias.detach()[~rows1] == 0)
    assert torch.all(bn.weight.detach()[rows1] != 0) and torch.all(bn.bias.detach()[rows1] != 0)
    assert bool(fc.mask().reshape(3, -1).any(1).all())  # logits layer: every class kept


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_ft_uniform_fraction_and_logits_kept(name: str) -> None:
    model = _converted(name)
    FTPruner().prune(model, 0.3)
    assert _within(model, 0.3)
    layers = [m for _, m in masked_layers(model)]
    fractions = [float(_rows_cols(m)[1].float().mean()) for m in layers[:-1]]
    assert max(fractions) - min(fractions) <= 0.05, fractions
    assert bool(_rows_cols(layers[-1])[1].all())  # logits layer: all rows
    for a, b in zip(layers[:-1], layers[1:]):  # pruned filters' inputs are gone downstream
        rows = _rows_cols(a)[1]
        cols = _rows_cols(b)[2]
        assert not bool(cols.reshape(rows.numel(), -1)[~rows].any())


def test_ft_unit_granularity_writes_unit_masks() -> None:
    torch.manual_seed(0)
    model = convert(get_model("lenet300"), granularity="unit", init=1.0)
    FTPruner().prune(model, 0.4)
    assert _within(model, 0.4)
    layers = [m for _, m in masked_layers(model)]
    assert all(m.weight_aux.shape == (m.weight.shape[0],) for m in layers)
    assert bool((layers[-1].weight_aux >= 0).all())


def test_pfp_prunes_whole_input_channels_and_dead_filters(digits: TensorDataset) -> None:
    model = _converted("lenet300")
    scores = PFPPruner().scores(model, digits)
    PFPPruner().prune(model, 0.3, digits)
    assert _within(model, 0.3)
    layers = list(masked_layers(model))
    for name, m in layers:
        mask, rows, cols = _rows_cols(m)
        assert torch.equal(mask, (rows[:, None, None] & cols[None, :, None]).expand_as(mask))  # whole rows / cols
        s = scores[name]
        if not bool(cols.all()):
            assert s[cols].min() >= s[~cols].max()  # top channels by s_j
    for (_, prev), (_, nxt) in zip(layers[:-1], layers[1:]):  # a pruned input channel kills its filter
        rows, cols = _rows_cols(prev)[1], _rows_cols(nxt)[2]
        assert torch.equal(rows, cols)
        assert torch.all(prev.bias.detach()[~rows] == 0)


def test_pfp_lenet5_conv_channels_and_flatten(digits: TensorDataset) -> None:
    model = _converted("lenet5")
    PFPPruner().prune(model, 0.2, digits)
    assert _within(model, 0.2)
    conv1, conv2, fc1, _ = (m for _, m in masked_layers(model))
    mask, rows, cols = _rows_cols(conv2)
    assert torch.equal(mask, (rows[:, None, None] & cols[None, :, None]).expand_as(mask))
    assert torch.equal(_rows_cols(conv1)[1], cols)  # conv1 filters feeding pruned conv2 channels are dead
    fc_cols = _rows_cols(fc1)[2].reshape(50, 16)  # conv2 filter c feeds fc1 features 16c..16c+15
    assert torch.equal(rows, fc_cols.any(1))


def test_pruners_are_deterministic(digits: TensorDataset) -> None:
    base = _converted("lenet300")
    for pruner in (SiPPPruner(), PFPPruner()):
        a, b = copy.deepcopy(base), copy.deepcopy(base)
        pruner.prune(a, 0.25, digits)
        pruner.prune(b, 0.25, digits)
        for (_, ma), (_, mb) in zip(masked_layers(a), masked_layers(b)):
            assert torch.equal(ma.weight_aux, mb.weight_aux)


def test_graph_of_resnet_marks_residual_paths(resnet20_graph: tuple[nn.Module, S.Graph]) -> None:
    model, graph = resnet20_graph
    block = model.layer1[0]
    d1, d2 = graph.down[block.conv1], graph.down[block.conv2]
    assert not d1.escapes and [e.consumer for e in d1.edges] == [block.conv2]
    assert {p is block.bn1.weight for p, _, _ in d1.params} == {True, False}
    assert d2.escapes and not d2.edges  # conv2 -> bn2 -> residual add
    assert graph.down[model.conv1].escapes  # the stem feeds block 1 and the identity shortcut
    assert graph.output_layer is model.fc


# ---------------------------------------------------------------------------------------------
# ratio matching
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
@pytest.mark.parametrize("method", ["wt", "sipp", "ft", "pfp"])
def test_ratio_matching(name: str, method: str, digits: TensorDataset) -> None:
    base = _converted(name)
    for keep in (0.6, 0.25, 0.08):
        model = copy.deepcopy(base)
        get_pruner(method).prune(model, keep, digits)
        assert _within(model, keep), (method, name, keep, keep_ratio(model))


@pytest.mark.parametrize("method", ["wt", "ft"])
def test_ratio_matching_resnet20(method: str) -> None:
    model = _converted("resnet20")
    get_pruner(method).prune(model, 0.4)
    assert _within(model, 0.4), keep_ratio(model)


def test_keep_below_non_prunable_raises() -> None:
    model = _converted("lenet300")  # biases: 410 of 266,610 parameters
    with pytest.raises(ValueError, match="keep"):
        WTPruner().prune(model, 0.001)
    with pytest.raises(ValueError, match="keep"):
        FTPruner().prune(model, 0.001)  # the logits layer alone needs more
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep"):
            WTPruner().prune(model, bad)


# ---------------------------------------------------------------------------------------------
# registry and argument errors
# ---------------------------------------------------------------------------------------------


def test_registry() -> None:
    assert {"wt", "sipp", "ft", "pfp"} <= set(PRUNERS)
    assert isinstance(get_pruner("WT"), WTPruner) and isinstance(get_pruner("pfp"), PFPPruner)
    assert get_pruner("sipp", max_samples=5).max_samples == 5
    with pytest.raises(ValueError, match="valid names: .*wt.*sipp.*ft.*pfp"):
        get_pruner("nope")

    class Dummy(Pruner):
        name = "dummy"

    try:
        register_pruner("dummy", Dummy)
        assert isinstance(get_pruner("dummy"), Dummy)
        with pytest.raises(ValueError, match="already registered"):
            register_pruner("wt", Dummy)
        with pytest.raises(TypeError):
            register_pruner("x", int)  # type: ignore[arg-type]
    finally:
        PRUNERS.pop("dummy", None)


@pytest.mark.parametrize("method", ["sipp", "pfp"])
def test_data_informed_methods_need_data(method: str) -> None:
    pruner = get_pruner(method)
    assert pruner.needs_data
    with pytest.raises(ValueError, match="data"):
        pruner.prune(_converted("lenet300"), 0.5)


def test_unconverted_model_and_unit_granularity_errors(digits: TensorDataset) -> None:
    with pytest.raises(ValueError, match="convert"):
        WTPruner().prune(get_model("lenet300"), 0.5)
    unit = convert(get_model("lenet300"), granularity="unit", init=1.0)
    for pruner in (WTPruner(), SiPPPruner(), PFPPruner()):
        with pytest.raises(ValueError, match="granularity"):
            pruner.prune(unit, 0.5, digits)
