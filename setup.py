"""Ahead-of-time build of the optional C++ / CUDA extension ``autoprune_ext._C`` (the ``cpp`` backend).

Package metadata lives in ``pyproject.toml``; this file only adds the extension.

* ``pip install --no-build-isolation -e .`` (what ``make install`` runs) compiles ``csrc/`` against
  the torch already installed: a CppExtension, or a CUDAExtension when torch is a CUDA build and
  ``nvcc`` exists (``AUTOPRUNE_NO_CUDA_EXT=1`` keeps it CPU-only). ``MAX_JOBS`` limits ninja's jobs.
* The extension is **optional**: installing must never fail because of it. Without torch in the build
  environment (plain ``pip install .`` uses build isolation, whose environment has no torch), without a
  compiler, or when compilation fails, the package installs without it and prints one warning; the
  ``cpp`` backend then compiles the same sources just in time on first explicit use
  (``autoprune_ext.backends.use("cpp")``), and every other backend works regardless.
  ``AUTOPRUNE_EXT_REQUIRED=1`` turns a failed build into an error (CI, wheel builds).
* ``AUTOPRUNE_NO_EXT=1`` skips the extension entirely.
* Non-editable builds copy ``csrc/`` into the package (``autoprune_ext/_csrc``) so that the just-in-time
  build works from an installed wheel too.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _say(message: str) -> None:
    print(f"autoprune_ext: {message}", file=sys.stderr, flush=True)


class BuildPyWithSources(build_py):
    """Also ship ``csrc/`` inside the package (``autoprune_ext/_csrc``) for just-in-time builds."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the repository's csrc/ directly
        src = ROOT / "csrc"
        if src.is_dir():
            dst = Path(self.build_lib) / "autoprune_ext" / "_csrc"
            shutil.copytree(src, dst, dirs_exist_ok=True)


def _load_build_module():
    """autoprune_ext/_build.py alone (importing the package would import all of it)."""
    spec = importlib.util.spec_from_file_location("_autoprune_build", ROOT / "autoprune_ext" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _extension_setup() -> tuple[list, dict]:
    if _flag("AUTOPRUNE_NO_EXT"):
        _say("AUTOPRUNE_NO_EXT=1: installing without the C++ extension")
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # build isolation, or no torch at all
        message = (
            f"torch is not importable in this build environment ({type(exc).__name__}); installing without "
            "the compiled extension. It is compiled on first use of backends.use('cpp'), or reinstall with "
            "`pip install --no-build-isolation -e .` to build it now."
        )
        if _flag("AUTOPRUNE_EXT_REQUIRED"):
            raise RuntimeError(message) from exc
        _say(message)
        return [], {}

    b = _load_build_module()
    with_cuda = b.want_cuda()
    sources = [f"csrc/{s}" for s in b.CPU_SOURCES + (b.CUDA_SOURCES if with_cuda else ())]
    kwargs = dict(
        name="autoprune_ext._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": b.cxx_flags(), "nvcc": b.nvcc_flags()} if with_cuda else {"cxx": b.cxx_flags()},
        extra_link_args=b.ld_flags(),
    )
    ext = CUDAExtension(**kwargs) if with_cuda else CppExtension(**kwargs)

    class OptionalBuildExtension(BuildExtension):
        """Build the extension, but never let a failure abort the installation (unless required)."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # e.g. no compiler at all: fails before build_extension
                self._skip(exc)

        def build_extension(self, extension) -> None:
            try:
                super().build_extension(extension)
            except Exception as exc:
                self._skip(exc)

        @staticmethod
        def _skip(exc: Exception) -> None:
            if _flag("AUTOPRUNE_EXT_REQUIRED"):
                raise exc
            text = str(exc).strip().splitlines()
            _say(
                "WARNING: compiling the C++ extension failed "
                f"({type(exc).__name__}: {text[-1] if text else ''}); installed without it. The reference "
                "backend is used meanwhile; backends.use('cpp') retries the build just in time."
            )

    b._find_ninja()  # a venv's ninja is not on PATH when pip runs without activation
    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extension_setup()
cmdclass["build_py"] = BuildPyWithSources

setup(ext_modules=ext_modules, cmdclass=cmdclass)
