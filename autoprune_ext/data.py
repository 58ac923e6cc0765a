"""Datasets for autoprune_ext: loading, splitting, normalising, batching.

All loaders work offline from local files; nothing is ever downloaded.

* :func:`load_digits` — scikit-learn's bundled 8x8 digits, resized (CPU-friendly default).
* :func:`load_mnist` — the four MNIST idx files (optionally gzipped), read by our own parser.
* :func:`load_cifar10` — the CIFAR-10 python pickle batches.
* :func:`load_cifar10c`, :func:`load_cifar101` — shifted CIFAR-10 test sets, normalised with
  the caller's (training) statistics.
* :func:`load_dataset` dispatches by name; :func:`make_loaders` builds seeded DataLoaders.

Every split is a :class:`torch.utils.data.TensorDataset` of float32 images ``[N, C, H, W]``
and int64 labels ``[N]``. Images are first scaled to ``[0, 1]``, then normalised per
channel with the mean / std of the *train* split (the held-out split is excluded).

The held-out split is carved from the training data with a seeded, stratified (per
class) random split; the test split is the dataset's official test set where one exists.
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "Splits",
    "Loaders",
    "DATASETS",
    "CIFAR10C_CORRUPTIONS",
    "load_digits",
    "load_mnist",
    "load_cifar10",
    "load_cifar10c",
    "load_cifar101",
    "load_dataset",
    "make_loaders",
    "read_idx",
    "normalize",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Dataset names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = ("digits", "mnist", "cifar10")

#: The 19 corruptions of CIFAR-10-C (15 benchmark + 4 extra), file stems of ``<name>.npy``.
CIFAR10C_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
    "gaussian_blur", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "spatter", "brightness", "contrast", "saturate",
    "elastic_transform", "pixelate", "jpeg_compression",
)

MNIST_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_FILES: tuple[str, ...] = CIFAR10_TRAIN_FILES + (CIFAR10_TEST_FILE,)


@dataclass
class Splits:
    """A dataset split into train / held-out / test, normalised with train statistics.

    Attributes:
        train: Training split (images ``[N, C, H, W]`` float32, labels ``[N]`` int64).
        heldout: Held-out split carved from the training data (for the AutoPrune
            auxiliary-parameter steps, data-informed pruning scores, validation).
        test: Test split.
        num_classes: Number of classes.
        in_channels: Image channels ``C``.
        image_size: Image height = width.
        mean: Per-channel mean of the train split in ``[0, 1]`` pixel units.
        std: Per-channel standard deviation of the train split in ``[0, 1]`` units.
        name: Dataset name.
    """

    train: TensorDataset
    heldout: TensorDataset
    test: TensorDataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return (self.in_channels, self.image_size, self.image_size)

    def __repr__(self) -> str:
        return (
            f"Splits(name={self.name!r}, train={len(self.train)}, heldout={len(self.heldout)}, "
            f"test={len(self.test)}, num_classes={self.num_classes}, "
            f"input_shape={self.input_shape})"
        )


class Loaders(NamedTuple):
    """DataLoaders of a :class:`Splits` (unpackable as ``train, heldout, test``)."""

    train: DataLoader
    heldout: DataLoader
    test: DataLoader


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _check_fraction(name: str, value: float, *, allow_zero: bool = True) -> float:
    value = float(value)
    lo_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (lo_ok and value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def _stratified_split(
    labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Split indices ``0..len(labels)-1`` into ``len(fractions) + 1`` disjoint parts.

    Within every class, after a seeded shuffle, part ``k`` (``k < len(fractions)``) takes
    ``round(fractions[k] * n_c)`` of the class's ``n_c`` samples; the last part gets the
    rest. Each part is returned shuffled (not grouped by class).
    """
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        start = 0
        for k, frac in enumerate(fractions):
            n = int(round(frac * len(idx)))
            n = min(n, len(idx) - start)
            parts[k].append(idx[start : start + n])
            start += n
        parts[-1].append(idx[start:])
    out = []
    for p in parts:
        cat = np.concatenate(p) if p else np.zeros(0, dtype=np.int64)
        out.append(cat[rng.permutation(len(cat))].astype(np.int64))
    return out


def _channel_stats(images: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (population) of ``images`` ``[N, C, H, W]`` / ``scale``.

    Computed in float64 over chunks, so uint8 inputs are never fully converted at once.
    """
    n, c = images.shape[:2]
    if n == 0:
        raise ValueError("cannot compute normalisation statistics of an empty train split")
    s = np.zeros(c, dtype=np.float64)
    s2 = np.zeros(c, dtype=np.float64)
    chunk = 4096
    for i in range(0, n, chunk):
        x = images[i : i + chunk].astype(np.float64) / scale
        s += x.sum(axis=(0, 2, 3))
        s2 += np.square(x).sum(axis=(0, 2, 3))
    count = float(n * images.shape[2] * images.shape[3])
    mean = s / count
    var = np.maximum(s2 / count - mean**2, 0.0)
    std = np.sqrt(var)
    std = np.where(std < 1e-8, 1.0, std)  # constant channel: leave it centred, unscaled
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _as_stats(values: Union[Sequence[float], torch.Tensor, np.ndarray], name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(values, dtype=np.float32).reshape(-1))
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    return t


def normalize(
    images: Union[np.ndarray, torch.Tensor],
    mean: Union[Sequence[float], torch.Tensor, np.ndarray],
    std: Union[Sequence[float], torch.Tensor, np.ndarray],
    *,
    scale: float = 255.0,
) -> torch.Tensor:
    """Convert images ``[N, C, H, W]`` to float32, divide by ``scale``, normalise per channel.

    ``mean`` / ``std`` are per-channel (or a single value for all channels) in
    ``[0, 1]`` pixel units. Returns a new float32 tensor.
    """
    x = torch.tensor(np.asarray(images), dtype=torch.float32)  # always a copy
    if x.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(x.shape)}")
    m = _as_stats(mean, "mean")
    s = _as_stats(std, "std")
    c = x.shape[1]
    for t, name in ((m, "mean"), (s, "std")):
        if t.numel() not in (1, c):
            raise ValueError(f"{name} has {t.numel()} values but the images have {c} channels")
    if torch.any(s <= 0):
        raise ValueError("std values must be positive")
    x.div_(scale)
    x.sub_(m.view(1, -1, 1, 1)).div_(s.view(1, -1, 1, 1))
    return x


def _dataset(images: torch.Tensor, labels: np.ndarray) -> TensorDataset:
    return TensorDataset(images, torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def _build_splits(
    *,
    name: str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    heldout_fraction: float,
    seed: int,
    scale: float,
    num_classes: int,
) -> Splits:
    """Carve the held-out split out of the train data, compute stats, normalise everything."""
    rng = np.random.default_rng(seed)
    heldout_idx, train_idx = _stratified_split(train_labels, [heldout_fraction], rng)
    tr_x = train_images[train_idx]
    mean, std = _channel_stats(tr_x, scale)
    return Splits(
        train=_dataset(normalize(tr_x, mean, std, scale=scale), train_labels[train_idx]),
        heldout=_dataset(
            normalize(train_images[heldout_idx], mean, std, scale=scale), train_labels[heldout_idx]
        ),
        test=_dataset(normalize(test_images, mean, std, scale=scale), test_labels),
        num_classes=num_classes,
        in_channels=int(train_images.shape[1]),
        image_size=int(train_images.shape[2]),
        mean=mean,
        std=std,
        name=name,
    )


def _require_dir(root: PathLike, dataset: str, expected: Sequence[str]) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{dataset} directory '{path}' does not exist; it must contain: {', '.join(expected)}"
        )
    return path


def _missing_files_error(
    dataset: str, dirs: Sequence[Path], expected: Sequence[str], missing: Sequence[str]
) -> FileNotFoundError:
    where = f"'{dirs[0]}'"
    if len(dirs) > 1:
        where += " (also looked in " + ", ".join(f"'{d}'" for d in dirs[1:]) + ")"
    return FileNotFoundError(
        f"{dataset} files missing in directory {where}: missing {', '.join(missing)}; "
        f"expected files: {', '.join(expected)}"
    )


def _pick_dir(root: Path, subdirs: Sequence[str], present: Any) -> tuple[Path, list[Path]]:
    """Return the first of ``root`` and ``root/<subdir>`` for which ``present(dir)`` is true."""
    candidates = [root] + [root / s for s in subdirs]
    for d in candidates:
        if d.is_dir() and present(d):
            return d, candidates
    return root, candidates


# ---------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------


def load_digits(
    *,
    seed: int = 0,
    image_size: int = 28,
    heldout_fraction: float = 0.25,
    test_fraction: float = 0.2,
) -> Splits:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), offline.

    Pixel values 0..16 are scaled to ``[0, 1]`` and resized to ``image_size x image_size``
    with bilinear interpolation (``align_corners=False``); then the data is split with a
    seeded stratified random split: ``test_fraction`` of all samples go to test, and
    ``heldout_fraction`` of the remaining ones to held-out (fractions are applied per
    class and rounded). Train statistics normalise all three splits.

    Args:
        seed: Seed of the split.
        image_size: Output height / width (8 keeps the original resolution).
        heldout_fraction: Fraction of the non-test samples put in the held-out split.
        test_fraction: Fraction of all samples put in the test split.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    if int(image_size) < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    heldout_fraction = _check_fraction("heldout_fraction", heldout_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    bunch = _sk_load_digits()
    images = torch.as_tensor(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    if int(image_size) != images.shape[-1]:
        images = F.interpolate(
            images, size=(int(image_size), int(image_size)), mode="bilinear", align_corners=False
        )
    x = images.numpy()
    y = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    test_idx, rest = _stratified_split(y, [test_fraction], rng)
    held_rel, train_rel = _stratified_split(y[rest], [heldout_fraction], rng)
    train_idx, held_idx = rest[train_rel], rest[held_rel]
    mean, std = _channel_stats(x[train_idx], 1.0)
    return Splits(
        train=_dataset(normalize(x[train_idx], mean, std, scale=1.0), y[train_idx]),
        heldout=_dataset(normalize(x[held_idx], mean, std, scale=1.0), y[held_idx]),
        test=_dataset(normalize(x[test_idx], mean, std, scale=1.0), y[test_idx]),
        num_classes=10,
        in_channels=1,
        image_size=int(image_size),
        mean=mean,
        std=std,
        name="digits",
    )


# ---------------------------------------------------------------------------------------
# MNIST (idx format)
# ---------------------------------------------------------------------------------------

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as e:  # BadGzipFile is an OSError
            raise ValueError(f"corrupt gzip file '{path}': {e}") from None
    return path.read_bytes()


def read_idx(path: PathLike, *, expected_ndim: Optional[int] = None) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped if its name ends in ``.gz``.

    Header: two zero bytes, a type code (``0x08`` = uint8, ...), the number of
    dimensions, then one big-endian uint32 per dimension; then the data, row-major.

    Args:
        path: File to read.
        expected_ndim: If given, the number of dimensions the file must have.

    Raises:
        ValueError: bad magic number, unknown type code, wrong number of dimensions, or a
            data size that does not match the header.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"corrupt idx file '{path}': {len(raw)} bytes, too short for a header")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    magic = int.from_bytes(raw[:4], "big")
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"corrupt idx file '{path}': bad magic number 0x{magic:08x} "
            "(expected 0x0000TTDD: T = type code such as 08 for uint8, D = number of dims)"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        expected_magic = 0x0800 + expected_ndim
        raise ValueError(
            f"corrupt idx file '{path}': magic number 0x{magic:08x} says {ndim} dimensions, "
            f"expected {expected_ndim} (magic 0x{expected_magic:08x})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"corrupt idx file '{path}': truncated header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        raise ValueError(
            f"corrupt idx file '{path}': header says shape {dims} ({expected} data bytes) "
            f"but the file has {actual} data bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _find_variant(d: Path, stem: str) -> Optional[Path]:
    """Return ``d/stem`` or, failing that, ``d/stem.gz``; None if neither is a file."""
    for name in (stem, stem + ".gz"):
        p = d / name
        if p.is_file():
            return p
    return None


def load_mnist(
    root: PathLike, *, seed: int = 0, heldout_fraction: float = 0.1
) -> Splits:
    """MNIST from the four official idx files in ``root`` (or ``root/MNIST/raw``).

    Expected files (each may instead be gzipped, with a ``.gz`` suffix):
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``. Images become ``[N, 1, 28, 28]`` (any size stored in the
    files is accepted), pixels scaled to ``[0, 1]`` then normalised with train statistics.

    Args:
        root: Directory holding the files.
        seed: Seed of the held-out split.
        heldout_fraction: Fraction of the 60k training images (per class) held out.

    Raises:
        FileNotFoundError: ``root`` is missing or lacks a file.
        ValueError: a file is corrupt or images and labels disagree.
    """
    heldout_fraction = _check_fraction("heldout_fraction", heldout_fraction)
    expected = [f"{f}[.gz]" for f in MNIST_FILES]
    base = _require_dir(root, "MNIST", expected)
    d, candidates = _pick_dir(
        base, [os.path.join("MNIST", "raw")], lambda p: _find_variant(p, MNIST_FILES[0]) is not None
    )
    found = {f: _find_variant(d, f) for f in MNIST_FILES}
    missing = [f"{f}[.gz]" for f, p in found.items() if p is None]
    if missing:
        raise _missing_files_error("MNIST", candidates, expected, missing)
    paths = {f: p for f, p in found.items() if p is not None}

    def pair(images_file: str, labels_file: str) -> tuple[np.ndarray, np.ndarray]:
        x = read_idx(paths[images_file], expected_ndim=3)
        y = read_idx(paths[labels_file], expected_ndim=1)
        if x.dtype != np.uint8 or y.dtype != np.uint8:
            raise ValueError(
                f"MNIST idx files must hold uint8 data (magic 0x00000803 / 0x00000801): "
                f"'{paths[images_file]}', '{paths[labels_file]}'"
            )
        if len(x) != len(y):
            raise ValueError(
                f"MNIST size mismatch: '{paths[images_file]}' has {len(x)} images but "
                f"'{paths[labels_file]}' has {len(y)} labels"
            )
        if len(y) and int(y.max()) > 9:
            raise ValueError(f"MNIST labels out of range 0..9 in '{paths[labels_file]}'")
        return x[:, None, :, :], y.astype(np.int64)

    tr_x, tr_y = pair(MNIST_FILES[0], MNIST_FILES[1])
    te_x, te_y = pair(MNIST_FILES[2], MNIST_FILES[3])
    if tr_x.shape[1:] != te_x.shape[1:]:
        raise ValueError(f"MNIST train images {tr_x.shape[1:]} and test images {te_x.shape[1:]} differ")
    if tr_x.shape[2] != tr_x.shape[3]:
        raise ValueError(f"MNIST images must be square, got {tr_x.shape[2:]}")
    return _build_splits(
        name="mnist",
        train_images=tr_x,
        train_labels=tr_y,
        test_images=te_x,
        test_labels=te_y,
        heldout_fraction=heldout_fraction,
        seed=seed,
        scale=255.0,
        num_classes=10,
    )


# ---------------------------------------------------------------------------------------
# CIFAR-10 (python pickle batches)
# ---------------------------------------------------------------------------------------


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that only allows what CIFAR batches contain (dicts, lists, numpy arrays)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("copyreg", "_reconstructor"),
        ("builtins", "object"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR batch")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch; return uint8 images ``[N, 3, 32, 32]`` and int64 labels."""
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"corrupt CIFAR-10 batch '{path}': {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"corrupt CIFAR-10 batch '{path}': expected a dict, got {type(obj).__name__}")
    batch = {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"corrupt CIFAR-10 batch '{path}': keys 'data' and 'labels' required")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"corrupt CIFAR-10 batch '{path}': 'data' must be uint8 [N, 3072], "
            f"got {data.dtype} {tuple(data.shape)}"
        )
    if len(labels) != len(data):
        raise ValueError(
            f"corrupt CIFAR-10 batch '{path}': {len(data)} images but {len(labels)} labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"corrupt CIFAR-10 batch '{path}': labels out of range 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(
    root: PathLike, *, seed: int = 0, heldout_fraction: float = 0.1
) -> Splits:
    """CIFAR-10 from the python batches in ``root`` or ``root/cifar-10-batches-py``.

    Expected files: ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` (the
    official ``cifar-10-python.tar.gz``, extracted). Images ``[N, 3, 32, 32]``, pixels
    scaled to ``[0, 1]`` then normalised per channel with train statistics.

    Args:
        root: Directory holding the batches (or their ``cifar-10-batches-py`` folder).
        seed: Seed of the held-out split.
        heldout_fraction: Fraction of the 50k training images (per class) held out.

    Raises:
        FileNotFoundError: ``root`` is missing or lacks a batch file.
        ValueError: a batch is corrupt.
    """
    heldout_fraction = _check_fraction("heldout_fraction", heldout_fraction)
    base = _require_dir(root, "CIFAR-10", CIFAR10_FILES)
    d, candidates = _pick_dir(
        base, ["cifar-10-batches-py"], lambda p: (p / CIFAR10_TEST_FILE).is_file()
    )
    missing = [f for f in CIFAR10_FILES if not (d / f).is_file()]
    if missing:
        raise _missing_files_error("CIFAR-10", candidates, CIFAR10_FILES, missing)
    parts = [_read_cifar_batch(d / f) for f in CIFAR10_TRAIN_FILES]
    tr_x = np.concatenate([p[0] for p in parts])
    tr_y = np.concatenate([p[1] for p in parts])
    del parts
    te_x, te_y = _read_cifar_batch(d / CIFAR10_TEST_FILE)
    return _build_splits(
        name="cifar10",
        train_images=tr_x,
        train_labels=tr_y,
        test_images=te_x,
        test_labels=te_y,
        heldout_fraction=heldout_fraction,
        seed=seed,
        scale=255.0,
        num_classes=10,
    )


# ---------------------------------------------------------------------------------------
# shifted CIFAR-10 test sets (.npy)
# ---------------------------------------------------------------------------------------


def _load_npy(path: Path, *, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"corrupt .npy file '{path}': {e}") from None


def _nhwc_to_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    mean: Union[Sequence[float], torch.Tensor, np.ndarray],
    std: Union[Sequence[float], torch.Tensor, np.ndarray],
    source: Path,
) -> TensorDataset:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"'{source}' must hold uint8 images [N, 32, 32, 3], got {images.dtype} {images.shape}"
        )
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if len(labels) != len(images):
        raise ValueError(f"'{source}': {len(images)} images but {len(labels)} labels")
    x = normalize(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)), mean, std)
    return _dataset(x, labels)


def load_cifar10c(
    root: PathLike,
    corruption: str,
    severity: int,
    *,
    mean: Union[Sequence[float], torch.Tensor, np.ndarray],
    std: Union[Sequence[float], torch.Tensor, np.ndarray],
) -> TensorDataset:
    """One corruption / severity of CIFAR-10-C (Hendrycks & Dietterich), normalised.

    Reads ``<corruption>.npy`` (``[5 * n, 32, 32, 3]`` uint8; officially n = 10000, the
    five severities 1..5 stacked in order) and ``labels.npy`` from ``root`` or
    ``root/CIFAR-10-C``; returns the ``n`` images of ``severity``. The corruption file is
    memory-mapped, so only the requested slice is read.

    Args:
        root: Directory of the extracted ``CIFAR-10-C.tar``.
        corruption: File stem, e.g. ``"gaussian_noise"`` (see :data:`CIFAR10C_CORRUPTIONS`).
        severity: 1..5.
        mean: Per-channel normalisation mean in ``[0, 1]`` units (use the train split's).
        std: Per-channel normalisation std in ``[0, 1]`` units.

    Raises:
        FileNotFoundError: the directory or a file is missing.
        ValueError: bad severity or corruption name, or malformed files.
    """
    if not isinstance(severity, (int, np.integer)) or not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    if not corruption or os.sep in corruption or "/" in corruption or corruption.endswith(".npy"):
        raise ValueError(f"corruption must be a file stem such as 'gaussian_noise', got {corruption!r}")
    expected = [f"{corruption}.npy", "labels.npy"]
    base = _require_dir(root, "CIFAR-10-C", expected)
    d, candidates = _pick_dir(base, ["CIFAR-10-C"], lambda p: (p / "labels.npy").is_file())
    missing = [f for f in expected if not (d / f).is_file()]
    if missing:
        err = _missing_files_error("CIFAR-10-C", candidates, expected, missing)
        if corruption not in CIFAR10C_CORRUPTIONS:
            err = FileNotFoundError(
                f"{err.args[0]} (unknown corruption {corruption!r}; official names: "
                f"{', '.join(CIFAR10C_CORRUPTIONS)})"
            )
        raise err
    images = _load_npy(d / f"{corruption}.npy", mmap=True)
    labels = _load_npy(d / "labels.npy").reshape(-1)
    if len(images) != len(labels) or len(images) % 5 != 0:
        raise ValueError(
            f"CIFAR-10-C '{d / (corruption + '.npy')}' has {len(images)} images and "
            f"'{d / 'labels.npy'}' {len(labels)} labels; expected equal counts divisible by 5"
        )
    n = len(images) // 5
    lo, hi = (int(severity) - 1) * n, int(severity) * n
    return _nhwc_to_dataset(np.array(images[lo:hi]), labels[lo:hi], mean, std, d / f"{corruption}.npy")


def load_cifar101(
    root: PathLike,
    *,
    mean: Union[Sequence[float], torch.Tensor, np.ndarray],
    std: Union[Sequence[float], torch.Tensor, np.ndarray],
    version: Optional[str] = None,
) -> TensorDataset:
    """CIFAR-10.1 (Recht et al.), normalised with the caller's statistics.

    Reads ``cifar10.1_<version>_data.npy`` (uint8 ``[N, 32, 32, 3]``) and
    ``cifar10.1_<version>_labels.npy`` from ``root`` (or ``root/CIFAR-10.1``). With
    ``version=None``, ``v6`` is used if present, otherwise ``v4``.

    Args:
        root: Directory holding the files.
        mean: Per-channel normalisation mean in ``[0, 1]`` units (use the train split's).
        std: Per-channel normalisation std in ``[0, 1]`` units.
        version: ``"v6"``, ``"v4"`` or None (auto).

    Raises:
        FileNotFoundError: the directory or the files are missing.
        ValueError: unknown version or malformed files.
    """
    versions = ("v6", "v4") if version is None else (version,)
    for v in versions:
        if v not in ("v6", "v4"):
            raise ValueError(f"CIFAR-10.1 version must be 'v6' or 'v4', got {v!r}")

    def files(v: str) -> list[str]:
        return [f"cifar10.1_{v}_data.npy", f"cifar10.1_{v}_labels.npy"]

    all_expected = [f for v in versions for f in files(v)]
    base = _require_dir(root, "CIFAR-10.1", all_expected)
    candidates = [base, base / "CIFAR-10.1"]
    for d in candidates:
        for v in versions:
            data_f, labels_f = files(v)
            if (d / data_f).is_file() and (d / labels_f).is_file():
                images = _load_npy(d / data_f)
                labels = _load_npy(d / labels_f)
                return _nhwc_to_dataset(images, labels, mean, std, d / data_f)
    present = [f for f in all_expected if (base / f).is_file()]
    missing = [f for f in all_expected if f not in present]
    expected_txt = " or ".join(" + ".join(files(v)) for v in versions)
    raise FileNotFoundError(
        f"CIFAR-10.1 files missing in directory '{base}' (also looked in '{candidates[1]}'): "
        f"missing {', '.join(missing)}; expected files: {expected_txt}"
    )


# ---------------------------------------------------------------------------------------
# dispatch and loaders
# ---------------------------------------------------------------------------------------


def load_dataset(name: str, root: Optional[PathLike] = None, **kw: Any) -> Splits:
    """Load a dataset by name: ``digits`` (bundled, no ``root``), ``mnist`` or ``cifar10``.

    Extra keyword arguments go to the specific loader (``seed``, ``heldout_fraction``,
    and for digits ``image_size`` / ``test_fraction``).

    Raises:
        ValueError: unknown name, or ``root`` missing for a file-based dataset.
        FileNotFoundError: the directory or its files are missing.
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    if key == "digits":
        return load_digits(**kw)
    if key in ("mnist", "cifar10"):
        if root is None:
            raise ValueError(f"dataset {name!r} is read from local files: pass root=<directory>")
        return load_mnist(root, **kw) if key == "mnist" else load_cifar10(root, **kw)
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


def make_loaders(
    splits: Splits,
    batch_size: int,
    *,
    seed: int,
    eval_batch_size: Optional[int] = None,
    shuffle_heldout: bool = False,
    drop_last: bool = False,
    num_workers: int = 0,
) -> Loaders:
    """Seeded DataLoaders for ``splits``.

    The train loader shuffles with a ``torch.Generator`` seeded with ``seed`` (so the
    batch order is reproducible and independent of the global RNG); held-out and test
    are not shuffled unless ``shuffle_heldout`` (generator seeded with ``seed + 1``).

    Args:
        splits: The data.
        batch_size: Train (and, by default, held-out/test) batch size.
        seed: Seed of the shuffling generators.
        eval_batch_size: Batch size of the held-out and test loaders (default ``batch_size``).
        shuffle_heldout: Shuffle the held-out loader (e.g. for AutoPrune's mask steps).
        drop_last: Drop the last incomplete batch of the train (and shuffled held-out) loader.
        num_workers: DataLoader workers (0: load in the main process).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    ebs = batch_size if eval_batch_size is None else int(eval_batch_size)
    if ebs < 1:
        raise ValueError(f"eval_batch_size must be positive, got {ebs}")

    def loader(ds: TensorDataset, bs: int, shuffle: bool, gen_seed: int, drop: bool) -> DataLoader:
        shuffle = shuffle and len(ds) > 0  # RandomSampler rejects empty datasets
        gen = torch.Generator().manual_seed(int(gen_seed)) if shuffle else None
        return DataLoader(
            ds, batch_size=bs, shuffle=shuffle, generator=gen, drop_last=drop,
            num_workers=num_workers,
        )

    return Loaders(
        train=loader(splits.train, batch_size, True, seed, drop_last),
        heldout=loader(
            splits.heldout, batch_size if shuffle_heldout else ebs, shuffle_heldout, seed + 1,
            drop_last and shuffle_heldout,
        ),
        test=loader(splits.test, ebs, False, seed, False),
    )
