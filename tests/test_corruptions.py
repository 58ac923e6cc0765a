"""Tests for autoprune_ext.corruptions: the 19 CIFAR-10-C corruptions at severities 1..5."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from autoprune_ext.corruptions import (
    BLUR_CORRUPTIONS,
    CORRUPTIONS,
    NOISE_CORRUPTIONS,
    corrupt,
    corrupt_dataset,
)

EXPECTED_NAMES = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur", "defocus_blur",
    "glass_blur", "motion_blur", "zoom_blur", "snow", "frost", "fog", "spatter", "brightness", "contrast",
    "saturate", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
# Corruptions that draw random numbers (the others are deterministic functions of the image).
STOCHASTIC = NOISE_CORRUPTIONS + (
    "glass_blur", "motion_blur", "snow", "frost", "fog", "spatter", "elastic_transform", "pixelate",
)  # fmt: skip
SHAPES = {"8x8x1": (1, 8), "28x28x1": (1, 28), "32x32x3": (3, 32)}  # id -> (channels, size)
SEVERITIES = (1, 2, 3, 4, 5)
N_IMAGES = 6


def natural_batch(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Natural-ish test images in [0.1, 0.9]: 1/f ('pink') random fields plus a straight step edge and
    a rectangle, so blurs have edges and texture to act on. Colour images mix a shared field with a
    per-channel one (moderate saturation)."""
    rng = np.random.default_rng(seed)
    freq = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij"))
    amplitude = 1.0 / np.maximum(freq, 1.0 / size)

    def pink() -> np.ndarray:
        field = np.real(np.fft.ifft2(amplitude * np.exp(2j * np.pi * rng.random((size, size)))))
        return (field - field.mean()) / field.std()

    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5
    out = np.empty((n, channels, size, size))
    for i in range(n):
        angle = rng.uniform(0, 2 * np.pi)
        edge = (np.cos(angle) * xx + np.sin(angle) * yy > rng.uniform(-0.2, 0.2)) - 0.5
        top, left = rng.integers(0, size // 2, 2)
        rect = np.zeros((size, size))
        rect[top : top + size // 3 + 1, left : left + size // 3 + 1] = rng.choice([-1.0, 1.0])
        common = pink()
        for c in range(channels):
            own = 0.6 * pink() if channels == 3 else 0.0
            out[i, c] = common + own + 1.2 * edge + 0.8 * rect
        out[i] = (out[i] - out[i].min()) / np.ptp(out[i]) * 0.8 + 0.1
    return torch.tensor(out, dtype=torch.float32)


@functools.cache
def clean(shape_id: str) -> torch.Tensor:
    channels, size = SHAPES[shape_id]
    return natural_batch(N_IMAGES, channels, size)


@functools.cache
def corrupted(name: str, shape_id: str) -> tuple[torch.Tensor, ...]:
    """The clean batch under all five severities (computed once, shared by several tests)."""
    return tuple(corrupt(clean(shape_id), name, severity) for severity in SEVERITIES)


def mean_abs_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().mean().item()


# ---- names -----------------------------------------------------------------------------------------
def test_names_and_groups() -> None:
    assert CORRUPTIONS == EXPECTED_NAMES
    assert NOISE_CORRUPTIONS == ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")
    assert BLUR_CORRUPTIONS == ("gaussian_blur", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur")


# ---- output contract and severity ordering -----------------------------------------------------------
@pytest.mark.parametrize("shape_id", SHAPES)
@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_output_keeps_shape_dtype_range_and_changes_image(name: str, severity: int, shape_id: str) -> None:
    x = clean(shape_id)
    y = corrupted(name, shape_id)[severity - 1]
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    assert torch.isfinite(y).all()
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert mean_abs_distance(y, x) > 1e-3, "the corruption left the images (almost) unchanged"


@pytest.mark.parametrize("shape_id", SHAPES)
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_distance_from_clean_grows_with_severity(name: str, shape_id: str) -> None:
    x = clean(shape_id)
    distances = [mean_abs_distance(y, x) for y in corrupted(name, shape_id)]
    assert all(b > a for a, b in zip(distances, distances[1:])), distances


# ---- dtypes and calling conventions -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float64])
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_other_dtypes_keep_dtype_and_range(name: str, dtype: torch.dtype) -> None:
    x = clean("32x32x3")[:2]
    x = torch.round(x * 255).to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    before = x.clone()
    y = corrupt(x, name, 3)
    assert torch.equal(x, before), "the input was modified in place"
    assert y.dtype == dtype and y.shape == x.shape
    limit = 255 if dtype == torch.uint8 else 1.0
    assert y.min() >= 0 and y.max() <= limit
    assert not torch.equal(y, x)
    if dtype == torch.uint8:  # same corruption as on the float image, up to rounding
        reference = corrupt(x.float() / 255, name, 3)
        assert mean_abs_distance(y.float() / 255, reference) < 2.0 / 255


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_single_image_and_dataset_match_batch(name: str) -> None:
    x = clean("8x8x1")
    batch = corrupted(name, "8x8x1")[1]
    assert torch.equal(corrupt(x[0], name, 2), batch[0])
    labels = torch.arange(N_IMAGES)
    images, out_labels = corrupt_dataset(x, labels, name, 2, batch_size=4)
    assert torch.equal(images, batch)  # an image's randomness depends on its index, not its batch
    assert out_labels is labels


def test_empty_batch() -> None:
    x = torch.empty(0, 3, 32, 32)
    y = corrupt(x, "fog", 3)
    assert y.shape == x.shape and y.dtype == x.dtype


# ---- seeds ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_same_seed_gives_same_result(name: str) -> None:
    x = clean("28x28x1")
    assert torch.equal(corrupt(x, name, 4, seed=7), corrupt(x, name, 4, seed=7))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_different_seed_changes_result(name: str) -> None:
    x = clean("28x28x1")
    assert not torch.equal(corrupt(x, name, 4, seed=0), corrupt(x, name, 4, seed=1))


# ---- bad input -----------------------------------------------------------------------------------------
def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="gaussian_noise") as info:
        corrupt(clean("8x8x1"), "gaussian", 1)
    assert all(name in str(info.value) for name in CORRUPTIONS)


@pytest.mark.parametrize("severity", [0, 6, -1])
def test_severity_out_of_range(severity: int) -> None:
    with pytest.raises(ValueError, match="severity"):
        corrupt(clean("8x8x1"), "fog", severity)


def test_non_integer_severity() -> None:
    with pytest.raises(TypeError, match="severity"):
        corrupt(clean("8x8x1"), "fog", 2.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(8, 8), (1, 1, 1, 8, 8)])
def test_wrong_rank(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"images.*\[N, C, H, W\]"):
        corrupt(torch.rand(shape), "fog", 1)


@pytest.mark.parametrize("channels", [2, 4])
def test_wrong_channel_count(channels: int) -> None:
    with pytest.raises(ValueError, match=r"images.*\[N, C, H, W\]"):
        corrupt(torch.rand(2, channels, 8, 8), "fog", 1)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_wrong_dtype(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match="images"):
        corrupt(torch.zeros(2, 1, 8, 8, dtype=dtype), "fog", 1)


def test_not_a_tensor() -> None:
    with pytest.raises(TypeError, match="images"):
        corrupt(np.zeros((2, 1, 8, 8), dtype=np.float32), "fog", 1)  # type: ignore[arg-type]


def test_dataset_label_count_mismatch() -> None:
    with pytest.raises(ValueError, match="labels"):
        corrupt_dataset(clean("8x8x1"), torch.zeros(N_IMAGES - 1), "fog", 1)


def test_dataset_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        corrupt_dataset(clean("8x8x1"), torch.zeros(N_IMAGES), "fog", 1, batch_size=0)
