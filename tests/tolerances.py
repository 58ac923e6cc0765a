"""Per-dtype comparison rules shared by the backend tests.

* float64: 1e-12 relative to the largest reference magnitude;
* float32: 1e-5 relative to the largest reference magnitude;
* float16 / bfloat16: the error against a float64 reference may be at most twice the error of the
  same computation done eagerly in that precision (flash-attention's rule), plus a floor of one
  unit in the last place of the largest value, for cases where eager happens to be exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOW = (torch.float16, torch.bfloat16)


def max_err(actual: Tensor, expected: Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return float((actual.double() - expected.double()).abs().max())


def assert_matches(actual: Tensor, expected64: Tensor, eager: Tensor | None = None, *, what: str = "") -> None:
    """``actual`` (a backend's output) against the float64 reference ``expected64``.

    ``eager``: the same quantity computed eagerly in the inputs' precision; when given, the 2x rule
    applies (needed whenever the inputs are fp16/bf16, even for a float32 output).
    """
    assert actual.shape == expected64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    if actual.numel() == 0:
        return
    scale = float(expected64.double().abs().max()) or 1.0
    err = max_err(actual, expected64)
    if eager is not None:
        floor = torch.finfo(eager.dtype if eager.dtype in LOW else actual.dtype).eps * scale
        bound = 2 * max_err(eager, expected64) + floor
        assert err <= bound, f"{what}: error {err:.3g} > 2 x eager same-precision error + ulp = {bound:.3g}"
    elif actual.dtype == torch.float64:
        assert err <= 1e-12 * scale, f"{what}: float64 error {err:.3g} (scale {scale:.3g})"
    elif actual.dtype == torch.float32:
        assert err <= 1e-5 * scale, f"{what}: float32 error {err:.3g} > 1e-5 x {scale:.3g}"
    else:
        raise AssertionError(f"{what}: a {actual.dtype} result needs the eager same-precision result")
