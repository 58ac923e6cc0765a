"""The CUDA sources compile without a GPU and without torch.

* every ``csrc/**/*.cu`` with ``nvcc -c`` for sm_80 (A100) and sm_90 (H100 / H200), with ``-I csrc``
  as the only include path: the kernels must not depend on torch's headers (skipped without nvcc);
* the launcher header ``csrc/cuda/autoprune_kernels.h`` is plain C (a C compiler accepts it alone);
* the CUDA binding ``csrc/cuda/binding.cpp`` passes the host compiler's syntax check against torch's
  headers -- only where torch is a CUDA build (the CPU wheel ships no ``c10/cuda`` headers).

Nothing runs on a GPU here; the CUDA kernels' numerical tests live in ``test_cpp_backend.py`` and
run where a GPU is present.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CU_FILES = sorted(CSRC.rglob("*.cu"))
ARCHS = ("80", "90")


def _nvcc() -> str | None:
    exe = shutil.which("nvcc")
    if exe:
        return exe
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _nvcc()


def test_cuda_sources_exist():
    assert CU_FILES, "no .cu file under csrc/"
    for f in CU_FILES:
        text = f.read_text()
        for banned in ("<torch/", "<ATen/", "<c10/"):
            assert banned not in text, f"{f.name} includes a torch header ({banned})"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(cu, arch, tmp_path):
    cmd = [
        NVCC, "-c", str(cu), "-o", str(tmp_path / f"{cu.stem}_sm{arch}.o"),
        f"-I{CSRC}", "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
        "-gencode", f"arch=compute_{arch},code=sm_{arch}",
        # torch's own nvcc defines: the kernels must not rely on implicit half / bfloat16 conversions
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        "-Werror", "all-warnings",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    assert (tmp_path / f"{cu.stem}_sm{arch}.o").stat().st_size > 0


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_launcher_header_is_plain_c(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    src = tmp_path / "check.c"
    src.write_text('#include "cuda/autoprune_kernels.h"\nint main(void) { ap_adam_tensor t; (void)t; return 0; }\n')
    r = subprocess.run([cc, "-std=c99", "-Wall", "-Werror", f"-I{CSRC}", "-fsyntax-only", str(src)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU build: no c10/cuda headers")
def test_cuda_binding_syntax(tmp_path):
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None or cpp_extension.CUDA_HOME is None:
        pytest.skip("no host compiler or CUDA toolkit")
    includes = cpp_extension.include_paths(device_type="cuda") if "device_type" in (
        cpp_extension.include_paths.__code__.co_varnames) else cpp_extension.include_paths(cuda=True)
    errors = []
    for std in ("-std=c++17", "-std=c++20"):  # torch moved its headers to C++20 at some version
        cmd = [cxx, std, "-fsyntax-only", f"-I{CSRC}", *[f"-I{p}" for p in includes],
               f"-I{Path(cpp_extension.CUDA_HOME) / 'include'}", str(CSRC / "cuda" / "binding.cpp")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode == 0:
            return
        errors.append(f"{' '.join(cmd)}\n{r.stderr[-3000:]}")
    pytest.fail("\n\n".join(errors))

if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
