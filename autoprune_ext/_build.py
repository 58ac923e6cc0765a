"""Build and load the compiled kernels of the ``cpp`` backend (``csrc/``, op namespace ``autoprune_cpp``).

Where the library comes from, first match wins:

1. ``AUTOPRUNE_NO_EXT=1``: nowhere; the ``cpp`` backend is unavailable and nothing is compiled.
2. Ahead of time: ``setup.py`` built ``autoprune_ext/_C*.so`` (``pip install --no-build-isolation -e .``).
3. The JIT cache: a library compiled earlier from the same sources, flags, Python and torch, under
   ``$AUTOPRUNE_EXT_CACHE``, else ``$TORCH_EXTENSIONS_DIR/autoprune_ext``, else
   ``~/.cache/autoprune_ext`` (one sub-directory per content hash, so stale builds are never loaded).
4. Compiling now with ``torch.utils.cpp_extension.load`` and ninja -- only when asked explicitly
   (:func:`build`, ``load(build=True)``, which the ``cpp`` backend calls under ``backends.use("cpp")``):
   it prints one line, takes 10-40 s on two cores (a few minutes with the CUDA part), and lands in
   the cache for every later process. CUDA sources are added when torch is a CUDA build and ``nvcc``
   exists (``AUTOPRUNE_NO_CUDA_EXT=1`` leaves them out); if they fail to compile, the CPU part is
   built alone.

A library that exists is loaded with ``torch.ops.load_library`` (it is a plain shared library that
registers the ops; no Python module, no pybind11), at most one per process.

A failed build or load emits one warning per process (the full log is kept next to the build) and
leaves the reference implementation in charge; only :func:`build` raises, since it is an explicit
request. This module has no package-relative imports so that ``setup.py`` can load it standalone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

NAMESPACE = "autoprune_cpp"
AOT_MODULE = "autoprune_ext._C"
JIT_NAME = "autoprune_ext_cpp"

CPU_SOURCES: tuple[str, ...] = (
    "ops.cpp",
    "autograd.cpp",
    "cpu/kernels_dispatch.cpp",
    "cpu/kernels_isa_default.cpp",
    "cpu/kernels_isa_avx2.cpp",
    "cpu/kernels_isa_avx512.cpp",
)
CUDA_SOURCES: tuple[str, ...] = ("cuda/binding.cpp", "cuda/autoprune_kernels.cu")

#: rough first-build times (seconds) printed in the one-line notice, measured on 2 shared cores
_ESTIMATE_S = {"cpu": 20, "cuda": 90}


class BuildError(RuntimeError):
    """The extension could not be compiled or loaded (the message says why and what to do)."""


_lock = threading.RLock()
_state: dict[str, object] = {"origin": None, "error": None, "warned": False}


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def disabled() -> bool:
    """``AUTOPRUNE_NO_EXT=1``: never build or load the extension."""
    return _env_flag("AUTOPRUNE_NO_EXT")


def source_dir() -> Path | None:
    """The ``csrc`` tree: ``$AUTOPRUNE_CSRC``, the copy shipped in a wheel, or the repository's."""
    here = Path(__file__).resolve().parent
    candidates = [os.environ.get("AUTOPRUNE_CSRC"), here / "_csrc", here.parent / "csrc"]
    for c in candidates:
        if c and (Path(c) / "ops.cpp").is_file():
            return Path(c)
    return None


def openmp_flags() -> list[str]:
    """Compiler and linker flags that make ``at::parallel_for`` parallel in our code.

    ATen's OpenMP ``parallel_for`` is a header template around ``#pragma omp parallel``: compiled
    without ``-fopenmp`` it silently runs every kernel on one thread. With it, our library links
    ``libgomp.so.1``, which resolves to the copy torch has already loaded (one thread pool).
    """
    if sys.platform == "win32":
        return ["/openmp"] if torch.backends.openmp.is_available() else []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []  # e.g. macOS wheels use ATen's native thread pool: parallel without OpenMP


def cxx_flags() -> list[str]:
    if sys.platform == "win32":
        return ["/O2", "/std:c++17", *openmp_flags()]
    # -fno-math-errno lets sqrt vectorise; no -ffast-math: results must follow IEEE like the reference
    return ["-O3", "-fno-math-errno", "-fno-trapping-math", *openmp_flags()]


def ld_flags() -> list[str]:
    return [] if sys.platform == "win32" else openmp_flags()


def nvcc_flags() -> list[str]:
    return ["-O3", "-lineinfo"]


def nvcc_path() -> str | None:
    """nvcc of the CUDA toolkit torch would use, when torch itself is a CUDA build."""
    if torch.version.cuda is None:
        return None
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # pragma: no cover - broken torch install
        CUDA_HOME = None
    if CUDA_HOME:
        exe = Path(CUDA_HOME) / "bin" / ("nvcc.exe" if sys.platform == "win32" else "nvcc")
        if exe.is_file():
            return str(exe)
    return shutil.which("nvcc")


def want_cuda() -> bool:
    """Whether builds include the CUDA kernels: a CUDA torch, nvcc, and no ``AUTOPRUNE_NO_CUDA_EXT``."""
    return not _env_flag("AUTOPRUNE_NO_CUDA_EXT") and nvcc_path() is not None


def cache_root() -> Path:
    if os.environ.get("AUTOPRUNE_EXT_CACHE"):
        return Path(os.environ["AUTOPRUNE_EXT_CACHE"]).expanduser()
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser() / "autoprune_ext"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "autoprune_ext"


def _variant_name(with_cuda: bool) -> str:
    return JIT_NAME + ("_cuda" if with_cuda else "")


def _build_key(src: Path, with_cuda: bool) -> str:
    h = hashlib.sha256()
    files = sorted(
        p for p in src.rglob("*")
        if p.is_file() and p.suffix in (".h", ".cuh", ".cpp", ".cu")
        and (with_cuda or "cuda" not in p.relative_to(src).parts)  # CPU builds ignore csrc/cuda
    )
    for p in files:
        h.update(str(p.relative_to(src)).encode())
        h.update(p.read_bytes())
    parts = [
        torch.__version__, str(torch.version.cuda), sys.version, platform.machine(), str(with_cuda),
        " ".join(cxx_flags()), " ".join(ld_flags()), " ".join(nvcc_flags()) if with_cuda else "",
        os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else "", os.environ.get("CXX", ""),
    ]
    h.update("\0".join(parts).encode())
    return h.hexdigest()[:16]


def build_dir(with_cuda: bool, src: Path | None = None) -> Path | None:
    src = src or source_dir()
    if src is None:
        return None
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__.split('+')[0]}"
    tag += "-cuda" if with_cuda else "-cpu"
    return cache_root() / f"{tag}-{_build_key(src, with_cuda)}"


def _library_file(directory: Path, name: str) -> Path:
    return directory / f"{name}{'.pyd' if sys.platform == 'win32' else '.so'}"


# --------------------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------------------
def _ops_registered() -> bool:
    try:
        torch.ops.autoprune_cpp.apply_mask  # noqa: B018 - raises AttributeError when not registered
        return True
    except (AttributeError, RuntimeError):
        return False


def loaded() -> bool:
    """Whether the ``autoprune_cpp`` ops are registered in this process."""
    return _state["origin"] is not None


def origin() -> str | None:
    """Path of the loaded library (or ``"preloaded"``), ``None`` when not loaded."""
    return _state["origin"]  # type: ignore[return-value]


def last_error() -> str | None:
    """Why the library is not loaded (``None`` when it is)."""
    return _state["error"]  # type: ignore[return-value]


def build_failed(device_type: str = "cpu") -> str | None:
    """The error of a failed build attempt in this process for ``device_type``'s kernels, else ``None``."""
    if _state.get("build_failed"):
        return str(_state["error"])
    if device_type == "cuda" and _state.get("cuda_failed"):
        return str(_state["cuda_failed"])
    return None


def has_cuda_kernels() -> bool:
    """Whether the loaded library registered CUDA kernels (built with nvcc against a CUDA torch)."""
    if not loaded():
        return False
    if "cuda_kernels" not in _state:  # fixed once loaded; ops ask on every call
        try:
            _state["cuda_kernels"] = bool(
                torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::apply_mask", "CUDA")
            )
        except Exception:
            _state["cuda_kernels"] = False
    return bool(_state["cuda_kernels"])


def cpu_isa() -> str | None:
    """The CPU instruction set the kernels run with (``default``, ``avx2``, ``avx512``)."""
    return str(torch.ops.autoprune_cpp.cpu_isa()) if loaded() else None


def _warn_once(message: str) -> None:
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _find_ninja() -> str | None:
    """ninja on PATH, else next to this interpreter (a venv run without activation): put it on PATH."""
    exe = shutil.which("ninja")
    if exe:
        return exe
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # type: ignore[import-not-found]

        candidates.append(Path(ninja.BIN_DIR))
    except Exception:
        pass
    for d in candidates:
        for name in ("ninja", "ninja.exe"):
            if (d / name).is_file():
                os.environ["PATH"] = str(d) + os.pathsep + os.environ.get("PATH", "")
                return str(d / name)
    return None


def _find_cxx() -> str | None:
    if sys.platform == "win32":
        return shutil.which("cl")
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx.split()[0])
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def can_build() -> tuple[bool, str]:
    """Whether :func:`build` can compile here (sources, a C++ compiler and ninja), and why not."""
    if disabled():
        return False, "disabled by AUTOPRUNE_NO_EXT=1"
    if source_dir() is None:
        return False, "the C++ sources (csrc/) are not installed with this copy of autoprune_ext"
    if _find_cxx() is None:
        return False, (
            "no C++ compiler found (looked for $CXX, c++, g++, clang++); install one, e.g. "
            "`apt install g++` or `conda install -c conda-forge gxx`"
        )
    if _find_ninja() is None:
        return False, "ninja is needed to compile the extension: `pip install ninja`"
    return True, "can be compiled on first explicit use"


# --------------------------------------------------------------------------------------------------
# loading and building
# --------------------------------------------------------------------------------------------------
def _load_library(path: str) -> None:
    torch.ops.load_library(path)
    if not _ops_registered():
        raise BuildError(f"{path} loaded but registered no {NAMESPACE} ops")
    _state["origin"] = path
    _state["error"] = None


def _try_prebuilt() -> bool:
    """Load the ahead-of-time module or a cached JIT build; never compiles."""
    errors = []
    try:
        # AUTOPRUNE_IGNORE_AOT=1: use only JIT builds (tests of the JIT path, or a stale AOT module)
        spec = None if _env_flag("AUTOPRUNE_IGNORE_AOT") else importlib.util.find_spec(AOT_MODULE)
    except Exception:
        spec = None
    if spec is not None and spec.origin and os.path.isfile(spec.origin):
        try:
            _load_library(spec.origin)
            return True
        except Exception as exc:
            errors.append(f"{spec.origin}: {type(exc).__name__}: {exc}")
    src = source_dir()
    if src is not None:
        variants = [True, False] if want_cuda() else [False]
        for with_cuda in variants:
            d = build_dir(with_cuda, src)
            lib = _library_file(d, _variant_name(with_cuda)) if d else None
            if lib is not None and lib.is_file():
                try:
                    _load_library(str(lib))
                    return True
                except Exception as exc:
                    errors.append(f"{lib}: {type(exc).__name__}: {exc}")
    if errors:
        _state["error"] = "a built library exists but cannot be loaded (" + "; ".join(errors) + ")"
        _warn_once(f"autoprune_ext: {_state['error']}; using the reference implementation")
    return False


def _compile(with_cuda: bool, src: Path) -> None:
    from torch.utils import cpp_extension

    directory = build_dir(with_cuda, src)
    assert directory is not None
    directory.mkdir(parents=True, exist_ok=True)
    sources = [str(src / s) for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    kwargs = dict(
        name=_variant_name(with_cuda),
        sources=sources,
        extra_cflags=cxx_flags(),
        extra_ldflags=ld_flags(),
        extra_include_paths=[str(src)],
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
    if with_cuda:
        kwargs["extra_cuda_cflags"] = nvcc_flags()
        kwargs["with_cuda"] = True
    try:
        cpp_extension.load(**kwargs)
    except Exception as exc:
        log = directory / "build_error.log"
        try:
            log.write_text(f"{type(exc).__name__}: {exc}\n")
        except OSError:
            pass
        text = str(exc).strip()
        tail = text[-1500:] if len(text) > 1500 else text
        raise BuildError(f"compiling the {'C++/CUDA' if with_cuda else 'C++'} extension failed (log: {log}):\n{tail}") from exc
    lib = _library_file(directory, _variant_name(with_cuda))
    if not _ops_registered():
        _load_library(str(lib))
    _state["origin"] = str(lib)
    _state["error"] = None


def load(build: bool = False) -> bool:
    """Make the ``autoprune_cpp`` ops available; ``build=True`` compiles them if needed.

    Returns whether they are loaded. Never raises: a failure is recorded (:func:`last_error`) and
    warned about once per process.
    """
    with _lock:
        if loaded():
            return True
        if disabled():
            _state["error"] = "disabled by AUTOPRUNE_NO_EXT=1"
            return False
        if _ops_registered():  # registered by someone else (e.g. torch.ops.load_library by hand)
            _state["origin"] = "preloaded"
            return True
        if _state.get("build_failed"):  # no second attempt (and no second warning) in this process
            return False
        if _try_prebuilt():
            return True
        if not build:
            if _state["error"] is None:
                ok, why = can_build()
                _state["error"] = "not compiled yet" if ok else why
            return False
        try:
            _build_locked()
            return True
        except BuildError as exc:
            _state["error"] = str(exc)
            _state["build_failed"] = True
            _warn_once(f"autoprune_ext: {exc}\nautoprune_ext: using the reference implementation instead")
            return False


def _build_locked() -> None:
    ok, why = can_build()
    if not ok:
        raise BuildError(f"cannot compile the C++ extension: {why}")
    src = source_dir()
    assert src is not None
    with_cuda = want_cuda()
    kind = "C++/CUDA" if with_cuda else "C++"
    print(
        f"autoprune_ext: compiling the {kind} extension (first use, about "
        f"{_ESTIMATE_S['cuda' if with_cuda else 'cpu']} s)...",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.perf_counter()
    try:
        _compile(with_cuda, src)
    except BuildError as exc:
        if not with_cuda:
            raise
        # CUDA part broken (toolkit / host compiler mismatch, say): keep the CPU kernels at least
        _state["cuda_failed"] = str(exc)
        _warn_once(f"autoprune_ext: {exc}\nautoprune_ext: building the CPU kernels alone")
        _compile(False, src)
    _state["build_seconds"] = time.perf_counter() - t0


def build() -> str:
    """Compile (if needed) and load the extension now; returns the library's path.

    Raises :class:`BuildError` with the reason when that is impossible (unlike :func:`load`).
    """
    with _lock:
        if not load(build=True):
            raise BuildError(str(_state["error"]))
        return str(_state["origin"])


def info() -> dict[str, object]:
    """Where the library came from, what it contains and why it is missing, for ``autoprune-ext info``."""
    ok, why = can_build()
    out: dict[str, object] = {
        "loaded": loaded(),
        "origin": origin(),
        "error": last_error(),
        "can_build": ok if not loaded() else None,
        "can_build_reason": why,
        "cache_dir": str(cache_root()),
        "want_cuda": want_cuda(),
        "nvcc": nvcc_path(),
    }
    if loaded():
        out["cpu_isa"] = cpu_isa()
        out["cpu_isas"] = list(torch.ops.autoprune_cpp.cpu_isas())
        out["cuda_kernels"] = has_cuda_kernels()
    if "build_seconds" in _state:
        out["build_seconds"] = round(float(_state["build_seconds"]), 1)  # type: ignore[arg-type]
    return out

