"""Checkpoint files: data that is checked before use, never code, written atomically.

A checkpoint is one file::

    b"APCKPT01" | payload length (8 bytes, little endian) | payload | header | header length (8) | SHA-256 of header (32)

* the **payload** is a ``torch.save`` archive, read back with ``torch.load(weights_only=True)``: a
  crafted file cannot run code on load;
* the **header** is JSON: format version, torch version, the payload's SHA-256 and byte count, and
  the run's **config** (any JSON-able mapping), so a resume with different settings is refused by
  field name (:func:`config_differences`) before any tensor is read;
* the checksum of every byte is verified before ``torch.load`` sees it: a flipped bit, a truncated
  copy or another file at the path gives one :class:`CheckpointError` naming the file and the defect.

Writes go to a temporary file in the same directory (named after the target, the writer's PID and
``.tmp``), are fsync'ed, then renamed over the target: a kill leaves the old checkpoint intact. Temp
files of writers that no longer run are removed by the next write or read of the same target.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

MAGIC = b"APCKPT01"
FORMAT_VERSION = 1
_LEN = struct.Struct("<Q")
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: damaged, foreign, or written with another config."""


# --------------------------------------------------------------------------------------------------
# atomic writes and stale temporary files
# --------------------------------------------------------------------------------------------------
def _temp_pattern(path: Path) -> str:
    return f".{path.name}.*.tmp"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers (an earlier failed write in this process)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that killed writers of ``path`` left behind; returns them."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(_temp_pattern(path)):
        parts = tmp.name[len(path.name) + 2 : -len(".tmp")].split(".")
        if parts and parts[0].isdigit() and not _pid_alive(int(parts[0])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _atomic_write(path: str | os.PathLike[str], write: Any) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to ``path`` atomically: a crash never leaves a truncated file there.

    For plain state dicts meant for ``torch.load(path, weights_only=True)`` elsewhere (no header);
    trainer checkpoints use :func:`save_checkpoint`.
    """
    _atomic_write(path, lambda f: torch.save(obj, f))


# --------------------------------------------------------------------------------------------------
# the checkpoint format
# --------------------------------------------------------------------------------------------------
class _HashingWriter:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.n += view.nbytes
        return self.f.write(view)

    def flush(self) -> None:
        self.f.flush()


class _Window(io.RawIOBase):
    """Read-only view of ``size`` bytes of ``f`` starting at ``start`` (what ``torch.load`` reads)."""

    def __init__(self, f: BinaryIO, start: int, size: int) -> None:
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self.size - self.pos))
        if n == 0:
            return 0
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got


def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(config), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"config: expected a JSON-serialisable mapping of finite values ({exc})") from None


def save_checkpoint(payload: Mapping[str, Any], path: str | os.PathLike[str], *, config: Mapping[str, Any]) -> None:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts) and ``config`` to ``path`` atomically."""
    header_config = _jsonable(config)

    def write(f: BinaryIO) -> None:
        f.write(MAGIC)
        f.write(_LEN.pack(0))  # payload length, filled in once known
        body = _HashingWriter(f)
        torch.save(dict(payload), body)
        header = json.dumps(
            {"format": FORMAT_VERSION, "torch": torch.__version__, "payload_bytes": body.n,
             "payload_sha256": body.sha.hexdigest(), "config": header_config},
            sort_keys=True,
        ).encode()
        f.write(header)
        f.write(_LEN.pack(len(header)))
        f.write(hashlib.sha256(header).digest())
        f.seek(len(MAGIC))
        f.write(_LEN.pack(body.n))

    _atomic_write(path, write)


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked header of the checkpoint at ``path`` (``config`` included); no tensor is read."""
    path = Path(path)
    with open(path, "rb") as f:
        return _read_header(f, path)


def _read_header(f: BinaryIO, path: Path) -> dict[str, Any]:
    size = os.fstat(f.fileno()).st_size
    head = f.read(len(MAGIC) + _LEN.size)
    if not head.startswith(MAGIC):
        if head.startswith(b"PK"):
            raise CheckpointError(
                f"{path}: a plain torch.save file, not an autoprune_ext checkpoint (no checksum, no config); "
                "if you trust it, load it with torch.load(path, weights_only=True) and load_state_dict"
            )
        raise CheckpointError(f"{path}: not an autoprune_ext checkpoint (wrong leading bytes)")
    if len(head) < len(MAGIC) + _LEN.size or size < len(head) + _LEN.size + 32:
        raise CheckpointError(f"{path}: truncated ({size} bytes)")
    (payload_bytes,) = _LEN.unpack(head[len(MAGIC):])
    f.seek(size - 32 - _LEN.size)
    (header_bytes,) = _LEN.unpack(f.read(_LEN.size))
    digest = f.read(32)
    if len(head) + payload_bytes + header_bytes + _LEN.size + 32 != size:
        raise CheckpointError(
            f"{path}: truncated or damaged (its lengths say {len(head) + payload_bytes + header_bytes + 40} bytes, "
            f"the file has {size})"
        )
    f.seek(len(head) + payload_bytes)
    raw = f.read(header_bytes)
    if hashlib.sha256(raw).digest() != digest:
        raise CheckpointError(f"{path}: damaged header (checksum mismatch)")
    header = json.loads(raw)
    if header.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {header.get('format')!r}, this version reads {FORMAT_VERSION}")
    if header.get("payload_bytes") != payload_bytes:
        raise CheckpointError(f"{path}: damaged header (payload length disagrees)")
    return header


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key in sorted(value):
            out.update(_flatten(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``field -> (saved, current)`` for every dotted field whose value differs (missing = ``None``)."""
    a, b = _flatten(_jsonable(saved)), _flatten(_jsonable(current))
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _allowed(field: str, allow: Iterable[str]) -> bool:
    return any(field == p or field.startswith(p + ".") for p in allow)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    config: Mapping[str, Any] | None = None,
    allow_config_change: bool | Iterable[str] = (),
    map_location: Any = None,
) -> dict[str, Any]:
    """The payload of the checkpoint at ``path``, after checking it.

    Args:
        config: the current run's config; a field that differs from the saved one raises
            :class:`CheckpointError` naming every differing field, unless allowed.
        allow_config_change: ``True`` to accept any difference, or the dotted field names (or
            prefixes, e.g. ``"autoprune.lr_aux"``, ``"run"``) allowed to differ.
        map_location: as for ``torch.load``.
    """
    path = Path(path)
    remove_stale_temps(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    with f:
        header = _read_header(f, path)
        if config is not None and allow_config_change is not True:
            allow = () if allow_config_change is False else tuple(allow_config_change)
            diff = {k: v for k, v in config_differences(header["config"], config).items() if not _allowed(k, allow)}
            if diff:
                shown = "; ".join(f"{k}: saved {s!r}, now {c!r}" for k, (s, c) in list(diff.items())[:8])
                more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
                raise CheckpointError(
                    f"{path}: written with a different config: {shown}{more}. Resume with the saved settings, "
                    f"or allow the change explicitly (allow_config_change=[{', '.join(repr(k) for k in diff)}])"
                )
        start, size = len(MAGIC) + _LEN.size, header["payload_bytes"]
        sha = hashlib.sha256()
        f.seek(start)
        left = size
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            sha.update(chunk)
            left -= len(chunk)
        if left or sha.hexdigest() != header["payload_sha256"]:
            raise CheckpointError(f"{path}: damaged payload (checksum mismatch): the file was altered after it was written")
        window = io.BufferedReader(_Window(f, start, size), buffer_size=_CHUNK)
        try:
            payload = torch.load(window, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 — a checksummed file that still fails: name file and cause
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: the payload cannot be loaded safely (weights_only=True): {first}") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a dict payload, got {type(payload).__name__}")
    return payload
