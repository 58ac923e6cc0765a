"""Tests of autoprune_ext.data on the bundled digits and on tiny files in the real formats."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from autoprune_ext.data import (
    Splits,
    load_cifar10,
    load_cifar101,
    load_cifar10c,
    load_dataset,
    load_digits,
    load_mnist,
    make_loaders,
    read_idx,
)

# ------------------------------------------------------------------------------ helpers


def _raw(ds: TensorDataset, mean, std, scale: float) -> np.ndarray:
    """Undo the normalisation; return rounded raw pixel values [N, C, H, W]."""
    x = ds.tensors[0].double()
    m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    return torch.round((x * s + m) * scale).long().numpy()


def _rows(x: np.ndarray, y: np.ndarray) -> list[tuple[int, ...]]:
    """One sortable tuple (label, pixels...) per sample."""
    flat = x.reshape(len(x), -1)
    return sorted(tuple([int(lbl)] + row.tolist()) for lbl, row in zip(y, flat))


def _write_idx(path: Path, arr: np.ndarray, *, gz: bool = False, magic: int | None = None) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    m = 0x0800 + arr.ndim if magic is None else magic
    payload = struct.pack(">I", m) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _fake_mnist(root: Path, *, gz: bool = False, n_train: int = 40, n_test: int = 10):
    rng = np.random.default_rng(123)
    tr_x = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    tr_y = (np.arange(n_train) % 10).astype(np.uint8)
    te_x = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    te_y = (np.arange(n_test) % 10).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    _write_idx(root / "train-images-idx3-ubyte", tr_x, gz=gz)
    _write_idx(root / "train-labels-idx1-ubyte", tr_y, gz=gz)
    _write_idx(root / "t10k-images-idx3-ubyte", te_x, gz=gz)
    _write_idx(root / "t10k-labels-idx1-ubyte", te_y, gz=gz)
    return tr_x, tr_y, te_x, te_y


def _fake_cifar(root: Path, *, per_batch: int = 10, n_test: int = 6, protocol: int = 2):
    rng = np.random.default_rng(7)
    root.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        batch = {b"batch_label": f"training batch {i} of 5".encode(), b"labels": y, b"data": x,
                 b"filenames": [b"x.png"] * per_batch}
        with open(root / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        xs.append(x)
        ys.extend(y)
    te_x = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    te_y = [int(v) for v in rng.integers(0, 10, size=n_test)]
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"labels": te_y, b"data": te_x}, f, protocol=protocol)
    return (np.concatenate(xs).reshape(-1, 3, 32, 32), np.array(ys),
            te_x.reshape(-1, 3, 32, 32), np.array(te_y))


# ------------------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_digits(seed=0)


def test_digits_shapes_and_normalisation(digits: Splits) -> None:
    assert digits.name == "digits"
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, 28)
    for ds in (digits.train, digits.heldout, digits.test):
        x, y = ds.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 28, 28)
        assert len(x) == len(y) > 0
        assert set(y.tolist()) == set(range(10))  # stratified: every class in every split
    assert len(digits.train) + len(digits.heldout) + len(digits.test) == 1797
    assert abs(len(digits.test) - 0.2 * 1797) <= 10
    assert abs(len(digits.heldout) - 0.25 * 0.8 * 1797) <= 10
    xt = digits.train.tensors[0]
    assert abs(xt.mean().item()) < 1e-4
    assert abs(xt.std().item() - 1.0) < 1e-2
    assert len(digits.mean) == len(digits.std) == 1 and digits.std[0] > 0


def test_digits_splits_partition_the_dataset() -> None:
    from sklearn.datasets import load_digits as sk_digits

    s = load_digits(seed=3, image_size=8)  # native size: raw values are recoverable exactly
    bunch = sk_digits()
    parts = [(_raw(ds, s.mean, s.std, 16.0), ds.tensors[1].numpy()) for ds in (s.train, s.heldout, s.test)]
    got = _rows(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    want = _rows(bunch.images.astype(np.int64)[:, None], bunch.target)
    assert got == want  # together the splits hold every sample exactly once
    train, held, test = (set(_rows(*p)) for p in parts)
    assert not (train & held) and not (train & test) and not (held & test)


def test_digits_deterministic_per_seed_and_seed_dependent(digits: Splits) -> None:
    again = load_digits(seed=0)
    other = load_digits(seed=1)
    for a, b in zip((digits.train, digits.heldout, digits.test), (again.train, again.heldout, again.test)):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(digits.test.tensors[1], other.test.tensors[1])


def test_load_dataset_dispatch_digits() -> None:
    s = load_dataset("digits", seed=0, image_size=16)
    assert s.train.tensors[0].shape[1:] == (1, 16, 16)


def test_make_loaders_seeded() -> None:
    s = load_digits(seed=0, image_size=8)

    def first_labels(seed: int) -> torch.Tensor:
        return next(iter(make_loaders(s, 32, seed=seed).train))[1]

    torch.manual_seed(0)
    a = first_labels(5)
    torch.manual_seed(99)  # global RNG must not matter
    b = first_labels(5)
    assert torch.equal(a, b)
    assert not torch.equal(a, first_labels(6))
    loaders = make_loaders(s, 32, seed=0, eval_batch_size=100)
    train, held, test = loaders
    assert train is loaders.train
    xb, yb = next(iter(test))  # not shuffled: dataset order
    assert len(yb) == 100 and torch.equal(yb, s.test.tensors[1][:100])
    assert torch.equal(next(iter(held))[1], s.heldout.tensors[1][:100])
    assert sum(len(y) for _, y in train) == len(s.train)


# ------------------------------------------------------------------------------ MNIST


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    tr_x, tr_y, te_x, te_y = _fake_mnist(tmp_path, gz=gz)
    s = load_mnist(tmp_path, seed=0, heldout_fraction=0.25)
    assert s.name == "mnist" and s.input_shape == (1, 28, 28)
    assert (len(s.train), len(s.heldout), len(s.test)) == (30, 10, 10)
    assert np.array_equal(_raw(s.test, s.mean, s.std, 255.0)[:, 0], te_x)
    assert np.array_equal(s.test.tensors[1].numpy(), te_y)
    got = _rows(np.concatenate([_raw(s.train, s.mean, s.std, 255.0), _raw(s.heldout, s.mean, s.std, 255.0)]),
                np.concatenate([s.train.tensors[1].numpy(), s.heldout.tensors[1].numpy()]))
    assert got == _rows(tr_x[:, None], tr_y)
    assert abs(s.train.tensors[0].mean().item()) < 1e-4
    assert abs(s.train.tensors[0].std().item() - 1.0) < 1e-2


def test_mnist_torchvision_layout_via_load_dataset(tmp_path: Path) -> None:
    _fake_mnist(tmp_path / "MNIST" / "raw", gz=True, n_train=20, n_test=5)
    s = load_dataset("mnist", tmp_path, heldout_fraction=0.5)
    assert (len(s.train), len(s.heldout), len(s.test)) == (10, 10, 5)


def test_read_idx_shapes(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a", arr)
    assert np.array_equal(read_idx(tmp_path / "a"), arr)


def test_mnist_corrupt_magic(tmp_path: Path) -> None:
    _fake_mnist(tmp_path)
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((40, 28, 28), np.uint8), magic=0x12345678)
    with pytest.raises(ValueError, match="magic"):
        load_mnist(tmp_path)


def test_mnist_truncated_file(tmp_path: Path) -> None:
    _fake_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        load_mnist(tmp_path)


def test_mnist_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as exc:
        load_mnist(missing)
    msg = str(exc.value)
    assert str(missing) in msg and "train-images-idx3-ubyte" in msg and "\n" not in msg


def test_mnist_missing_file(tmp_path: Path) -> None:
    _fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as exc:
        load_mnist(tmp_path)
    msg = str(exc.value)
    assert str(tmp_path) in msg and "t10k-labels-idx1-ubyte" in msg and "\n" not in msg
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        assert name in msg  # the full list of expected files


# ------------------------------------------------------------------------------ CIFAR-10


@pytest.mark.parametrize("subdir,protocol", [("", 2), ("cifar-10-batches-py", 4)])
def test_cifar10_batches(tmp_path: Path, subdir: str, protocol: int) -> None:
    tr_x, tr_y, te_x, te_y = _fake_cifar(tmp_path / subdir if subdir else tmp_path, protocol=protocol)
    s = load_dataset("cifar10", tmp_path, seed=1, heldout_fraction=0.2)
    assert s.name == "cifar10" and s.input_shape == (3, 32, 32) and s.num_classes == 10
    assert len(s.train) + len(s.heldout) == 50 and len(s.test) == 6
    assert len(s.mean) == len(s.std) == 3
    assert np.array_equal(_raw(s.test, s.mean, s.std, 255.0), te_x)
    assert np.array_equal(s.test.tensors[1].numpy(), te_y)
    got = _rows(np.concatenate([_raw(s.train, s.mean, s.std, 255.0), _raw(s.heldout, s.mean, s.std, 255.0)]),
                np.concatenate([s.train.tensors[1].numpy(), s.heldout.tensors[1].numpy()]))
    assert got == _rows(tr_x, tr_y)
    per_channel = s.train.tensors[0].transpose(0, 1).reshape(3, -1)
    assert per_channel.mean(1).abs().max().item() < 1e-4
    assert (per_channel.std(1) - 1).abs().max().item() < 1e-2


def test_cifar10_missing_batch(tmp_path: Path) -> None:
    _fake_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError) as exc:
        load_cifar10(tmp_path)
    msg = str(exc.value)
    assert "data_batch_3" in msg and "test_batch" in msg and str(tmp_path) in msg


def test_cifar10_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_dataset("cifar10", tmp_path / "absent")


def test_cifar10_rejects_foreign_pickle(tmp_path: Path) -> None:
    _fake_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": Path("x"), b"labels": []}, f)
    with pytest.raises(ValueError, match="test_batch"):
        load_cifar10(tmp_path)


# ------------------------------------------------------------------------------ shifted sets


def test_cifar10c_severity_slice(tmp_path: Path) -> None:
    n = 4
    images = np.stack([np.full((32, 32, 3), 10 * k + i, np.uint8) for k in range(5) for i in range(n)])
    labels = np.tile(np.arange(n, dtype=np.uint8), 5)
    np.save(tmp_path / "gaussian_noise.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ds = load_cifar10c(tmp_path, "gaussian_noise", 3, mean=mean, std=std)
    x, y = ds.tensors
    assert x.shape == (n, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert np.array_equal(_raw(ds, mean, std, 255.0), images[2 * n : 3 * n].transpose(0, 3, 1, 2))
    assert y.tolist() == list(range(n))
    with pytest.raises(ValueError, match="severity"):
        load_cifar10c(tmp_path, "gaussian_noise", 6, mean=mean, std=std)
    with pytest.raises(FileNotFoundError, match="fog.npy"):
        load_cifar10c(tmp_path, "fog", 1, mean=mean, std=std)


@pytest.mark.parametrize("version", ["v6", "v4"])
def test_cifar101(tmp_path: Path, version: str) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 9], dtype=np.int64)
    np.save(tmp_path / f"cifar10.1_{version}_data.npy", images)
    np.save(tmp_path / f"cifar10.1_{version}_labels.npy", labels)
    ds = load_cifar101(tmp_path, mean=[0.5] * 3, std=[0.25] * 3)
    assert np.array_equal(_raw(ds, [0.5] * 3, [0.25] * 3, 255.0), images.transpose(0, 3, 1, 2))
    assert ds.tensors[1].tolist() == labels.tolist()


def test_cifar101_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        load_cifar101(tmp_path, mean=[0.5] * 3, std=[0.25] * 3)
    assert "cifar10.1_v6_data.npy" in str(exc.value) and str(tmp_path) in str(exc.value)


# ------------------------------------------------------------------------------ dispatch errors


def test_unknown_dataset_name() -> None:
    with pytest.raises(ValueError) as exc:
        load_dataset("imagenet")
    msg = str(exc.value)
    assert "imagenet" in msg and all(n in msg for n in ("digits", "mnist", "cifar10"))


def test_file_dataset_needs_root() -> None:
    with pytest.raises(ValueError, match="root"):
        load_dataset("mnist")
