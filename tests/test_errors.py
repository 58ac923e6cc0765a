"""Bad input gets a clear error naming the argument and the expected form: one test per path."""

from __future__ import annotations

import pytest
import torch

import autoprune_ext as ap
from autoprune_ext import functional as APF

W = torch.randn(4, 3)
M = torch.randn(4, 3)


def test_weight_not_a_tensor():
    with pytest.raises(TypeError, match=r"weight: expected a torch.Tensor"):
        APF.apply_mask([[1.0]], M)


def test_integer_dtype():
    with pytest.raises(TypeError, match=r"aux: expected dtype in \(float16, bfloat16, float32, float64\), got int64"):
        APF.apply_mask(W, torch.ones(4, 3, dtype=torch.long))


def test_scalar_weight():
    with pytest.raises(ValueError, match="weight: expected a tensor with at least one dimension"):
        APF.apply_mask(torch.tensor(1.0), torch.tensor(1.0))


def test_aux_shape_mismatch():
    with pytest.raises(ValueError, match=r"aux: expected shape \(4, 3\) \(weight granularity\) or \(4,\)"):
        APF.apply_mask(W, torch.randn(3, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_aux(bad):
    m = M.clone()
    m[1, 2] = bad
    with pytest.raises(ValueError, match="aux: expected finite values"):
        APF.apply_mask(W, m)


def test_non_finite_check_can_be_disabled(monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_CHECK_FINITE", "0")
    m = M.clone()
    m[0, 0] = float("nan")
    assert APF.apply_mask(W, m)[0, 0] == 0.0  # NaN >= 0 is false: pruned


def test_device_mismatch():
    with pytest.raises(ValueError, match="aux: expected a tensor on cpu"):
        APF.apply_mask(W, M.to("meta"))


def test_unknown_surrogate():
    with pytest.raises(ValueError, match=r"surrogate: expected one of \('softplus'"):
        APF.apply_mask(W, M, surrogate="tanh")


def test_unknown_rule():
    with pytest.raises(ValueError, match=r"rule: expected one of \('sign', 'chain'\)"):
        APF.apply_mask(W, M, rule="straight")


def test_bad_alpha():
    with pytest.raises(ValueError, match="alpha: expected a finite float"):
        APF.apply_mask(W, M, alpha=float("nan"))


def test_linear_input_features_mismatch():
    with pytest.raises(ValueError, match=r"input: expected shape \[\.\.\., 3\]"):
        APF.masked_linear(torch.randn(2, 5), W, M)


def test_linear_weight_not_2d():
    with pytest.raises(ValueError, match="weight: expected a 2-D tensor"):
        APF.masked_linear(torch.randn(2, 3), torch.randn(4, 3, 1), torch.randn(4, 3, 1))


def test_linear_input_dtype_mismatch():
    with pytest.raises(TypeError, match="input: expected dtype torch.float32"):
        APF.masked_linear(torch.randn(2, 3, dtype=torch.float64), W, M)


def test_linear_bias_shape():
    with pytest.raises(ValueError, match=r"bias: expected shape \(4,\)"):
        APF.masked_linear(torch.randn(2, 3), W, M, torch.randn(3))


def test_mask_backward_grad_shape():
    with pytest.raises(ValueError, match=r"grad: expected shape \(4, 3\)"):
        torch.ops.autoprune.mask_backward(torch.randn(3, 4), W, M, "softplus", "sign", 0.1, True, True)


def test_adam_moment_shape():
    with pytest.raises(ValueError, match=r"exp_avg: expected shape \(4, 3\)"):
        torch.ops.autoprune.aux_adam_step_(M.clone(), torch.zeros(3), torch.zeros(4, 3), None, None, 1,
                                           0.1, 0.9, 0.999, 1e-8, 0.0, 0.0, "softplus", 0.1)


def test_adam_step_zero():
    with pytest.raises(ValueError, match="step: expected an integer >= 1"):
        torch.ops.autoprune.aux_adam_step_(M.clone(), torch.zeros(4, 3), torch.zeros(4, 3), None, None, 0,
                                           0.1, 0.9, 0.999, 1e-8, 0.0, 0.0, "softplus", 0.1)


def test_adam_multi_list_lengths():
    with pytest.raises(ValueError, match="steps: expected a list of 1 entries"):
        torch.ops.autoprune.aux_adam_step_multi_([M.clone()], [torch.zeros(4, 3)], [torch.zeros(4, 3)], [None],
                                                 [None], [1, 2], [0.0], 0.1, 0.9, 0.999, 1e-8, 0.0, "softplus", 0.1)


def test_masked_conv_checks_too():
    with pytest.raises(ValueError, match="aux: expected shape"):
        APF.masked_conv2d(torch.randn(1, 1, 5, 5), torch.randn(2, 1, 3, 3), torch.randn(1, 1, 3, 3))


def test_layer_with_nan_aux_fails_at_forward():
    layer = ap.nn.MaskedLinear(3, 2)
    with torch.no_grad():
        layer.weight_aux[0, 0] = float("nan")
    with pytest.raises(ValueError, match="aux: expected finite values"):
        layer(torch.randn(1, 3))


def test_linear_bias_dtype():
    with pytest.raises(TypeError, match="bias: expected dtype torch.float32"):
        APF.masked_linear(torch.randn(2, 3), W, M, torch.randn(4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_fast_path_is_exact(dtype):
    from autoprune_ext._checks import all_finite

    fi = torch.finfo(dtype)
    x = torch.randn(64, 33).to(dtype)
    assert all_finite(x) and all_finite(x.t()[::2]) and all_finite(x[:0])
    huge = torch.full((257,), fi.max, dtype=dtype)  # the sum overflows, every entry is finite
    assert all_finite(huge) and all_finite(-huge)
    for value in (float("nan"), float("inf"), -float("inf")):
        for base in (x.flatten(), huge):
            y = base.clone()
            y[y.numel() // 2] = value
            assert not all_finite(y), (value, base.abs().max())
    y = huge.clone()
    y[0], y[1] = float("inf"), -float("inf")  # a sum of NaN, not inf
    assert not all_finite(y)
