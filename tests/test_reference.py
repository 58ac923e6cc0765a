"""The reference against independent statements of the method (torch.optim.Adam, hand formulas)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoprune_ext import reference as ref


def test_indicator_is_step_at_zero():
    m = torch.tensor([-1.0, -1e-30, 0.0, 1e-30, 2.0])
    assert ref.indicator(m).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "name,expected",
    [
        ("softplus", lambda m, a: math.log1p(math.exp(m))),
        ("sigmoid", lambda m, a: 1 / (1 + math.exp(-m))),
        ("identity", lambda m, a: 1.0),
        ("leaky_relu", lambda m, a: 1.0 if m > 0 else a),
        ("leaky_relu_reversed", lambda m, a: a if m > 0 else 1.0),
        ("relu", lambda m, a: 1.0 if m > 0 else 0.0),
    ],
)
def test_surrogate_values(name, expected):
    values = [-3.0, -0.5, 0.0, 0.25, 4.0]
    got = ref.surrogate(torch.tensor(values, dtype=torch.float64), name, 0.3).tolist()
    assert got == pytest.approx([expected(v, 0.3) for v in values], rel=1e-12)


def test_unknown_surrogate_and_rule():
    with pytest.raises(ValueError, match="surrogate"):
        ref.surrogate(torch.zeros(2), "tanh")
    with pytest.raises(ValueError, match="rule"):
        ref.mask_backward(torch.ones(2), torch.ones(2), torch.ones(2), rule="straight")


def test_unit_granularity_sums_over_rows():
    w = torch.randn(4, 3, 2, dtype=torch.float64)
    g = torch.randn(4, 3, 2, dtype=torch.float64)
    m = torch.tensor([0.5, -0.2, 0.0, 1.5], dtype=torch.float64)
    dW, dM = ref.mask_backward(g, w, m, "sigmoid", "sign")
    keep = (m >= 0).double().view(4, 1, 1)
    assert torch.equal(dW, g * keep)
    expected = (g * torch.sign(w)).sum(dim=(1, 2)) * torch.sigmoid(m)
    assert torch.allclose(dM, expected, rtol=1e-12)
    assert torch.equal(ref.apply_mask(w, m), w * keep)


def test_penalty_grad_formula_and_inv_abs_weight():
    m = torch.randn(50, dtype=torch.float64)
    w = torch.randn(50, dtype=torch.float64)
    w[3] = 1e-20
    lam, n, rho = 0.7, 50, 1e-2
    base = (lam / n) * (torch.nn.functional.softplus(m) - rho * torch.nn.functional.softplus(-m))
    assert torch.allclose(ref.penalty_grad(m, lam / n, rho), base, rtol=1e-12)
    scaled = ref.penalty_grad(m, lam / n, rho, weight=w)
    assert scaled[3] == 0.0
    keep = torch.arange(50) != 3
    assert torch.allclose(scaled[keep], base[keep] / w[keep].abs(), rtol=1e-12)


def test_density_penalty_value():
    a = torch.tensor([1.0, -1.0, 0.0, -2.0])
    b = torch.tensor([3.0, 4.0])
    # kept: 1, 0, 3, 4 -> 4 of 6; off (m <= 0): -1, 0, -2 -> 3 of 6
    assert float(ref.density([a, b])) == pytest.approx(4 / 6)
    assert float(ref.density_penalty([a, b], 0.6, 0.1)) == pytest.approx(0.6 * 4 / 6 + 0.1 * 0.6 * 3 / 6)


@pytest.mark.parametrize("steps", [1, 5])
def test_aux_adam_matches_torch_adam(steps):
    """With the penalty off, the fused step is exactly torch.optim.Adam; with it on, it is Adam on
    dL/dM + dP/dM."""
    torch.manual_seed(1)
    aux0 = torch.randn(30, dtype=torch.float64)
    grads = [torch.randn(30, dtype=torch.float64) for _ in range(steps)]
    for scale in (0.0, 0.05):
        p = torch.nn.Parameter(aux0.clone())
        opt = torch.optim.Adam([p], lr=0.01, betas=(0.8, 0.95), eps=1e-6)
        aux, m1, m2 = aux0.clone(), torch.zeros(30, dtype=torch.float64), torch.zeros(30, dtype=torch.float64)
        for t, g in enumerate(grads, start=1):
            p.grad = g + ref.penalty_grad(p.detach(), scale, 1e-3)
            opt.step()
            ref.aux_adam_step_(aux, m1, m2, g, None, step=t, lr=0.01, beta1=0.8, beta2=0.95, eps=1e-6,
                               penalty_scale=scale, rho=1e-3)
        assert torch.allclose(aux, p.detach(), rtol=1e-12, atol=1e-14)
        assert torch.allclose(m1, opt.state[p]["exp_avg"], rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    surrogate=st.sampled_from(ref.SURROGATES),
    rule=st.sampled_from(ref.RULES),
    seed=st.integers(0, 2**16),
)
def test_mask_backward_elementwise_formula(rows, cols, surrogate, rule, seed):
    """Property: each dM entry is g * c(w) * s(m) of its own entries and nothing else."""
    gen = torch.Generator().manual_seed(seed)
    g, w, m = (torch.randn(rows, cols, generator=gen, dtype=torch.float64) for _ in range(3))
    _, dM = ref.mask_backward(g, w, m, surrogate, rule, 0.2)
    i, j = seed % rows, (seed // rows) % cols
    c = math.copysign(1.0, w[i, j]) if rule == "sign" else float(w[i, j])
    s = float(ref.surrogate(m[i, j].reshape(1), surrogate, 0.2))
    assert float(dM[i, j]) == pytest.approx(float(g[i, j]) * c * s, rel=1e-12, abs=1e-300)
