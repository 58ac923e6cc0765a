"""Ahead-of-time compile of the Triton kernels for GPU targets, without a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, but it is lenient about what
the GPU compiler rejects (types of scalars, layouts, shared memory, pointer casts). This module runs
the real compiler pipeline -- Triton IR, TritonGPU, LLVM, PTX and ``ptxas`` to a cubin -- for
representative variants of every kernel on Ampere (sm_80) and Hopper (sm_90) targets, so GPU
compile errors show up on a CPU-only machine::

    python -m autoprune_ext.triton_kernels.compile_check [--arch 80 --arch 90] [--full]

It must run with ``TRITON_INTERPRET`` unset (the kernels must be real ``JITFunction`` objects) and
needs Triton's NVIDIA backend (``ptxas`` ships with the wheel); it does not need a driver or a
device. It reports, per variant, the shared memory used and (``--verbose``) the PTX global memory
instructions, e.g. to confirm vectorised ``ld.global.v4`` accesses. The ``ASTSource`` API it uses is
that of recent Triton releases; on older ones it exits with status 3 ("unsupported").

Exit status: 0 all compiled, 1 a variant failed, 2 interpreter mode, 3 unsupported Triton.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import traceback

import triton

PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "fp64": "*fp64"}


def _jit(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def compile_variant(kernel, sig: dict, consts: dict, arch: int, num_warps: int = 4, num_stages: int = 3):
    """Compile one specialisation of ``kernel`` for ``sm_<arch>``: pointers 16-byte aligned and integer
    arguments multiples of 16, as Triton specialises them at run time for typical sizes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit(kernel)
    names = fn.arg_names
    full = {n: ("constexpr" if n in consts else sig[n]) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in sig and sig[n][0] in "*i"}
    src = ASTSource(fn, full, consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def variants(full: bool):
    """Yield ``(label, kernel, signature, constexprs, num_warps, num_stages)``."""
    from . import adam, elementwise, masked_matmul, nm

    ew_dtypes = [("bf16", "fp32"), ("fp16", "bf16"), ("fp32", "fp32"), ("fp64", "bf16")]
    surr_rules = [(s, r) for s in range(6) for r in range(2)] if full else [(0, 0), (1, 1), (3, 0)]
    for wd, ad in ew_dtypes:
        fp64 = "fp64" in (wd, ad)
        yield (f"apply_mask_flat {wd}/{ad}", elementwise._apply_mask_flat_kernel,
               dict(W=PTR[wd], AUX=PTR[ad], T=PTR[wd], n="i32"), dict(FP64=fp64, BLOCK=elementwise.BLOCK), 8, 3)
        yield (f"apply_mask_rows {wd}/{ad}", elementwise._apply_mask_rows_kernel,
               dict(W=PTR[wd], AUX=PTR[ad], T=PTR[wd], R="i32", C="i32"),
               dict(FP64=fp64, BLOCK_R=2, BLOCK_C=1024), 8, 3)
        for surr, rule in surr_rules:
            for ndw, ndm in ((True, True), (True, False), (False, True)):
                flags = dict(SURR=surr, RULE=rule, NEED_DW=ndw, NEED_DM=ndm, FP64=fp64)
                sig = dict(G=PTR[wd], W=PTR[wd], AUX=PTR[ad], DW=PTR[wd], DM=PTR[ad], alpha_hi="fp32", alpha_lo="fp32")
                yield (f"mask_backward_flat {wd}/{ad} {flags}", elementwise._mask_backward_flat_kernel,
                       dict(sig, n="i64"), dict(flags, BLOCK=elementwise.BLOCK), 8, 3)
                yield (f"mask_backward_rows {wd}/{ad} {flags}", elementwise._mask_backward_rows_kernel,
                       dict(sig, R="i32", C="i32"), dict(flags, BLOCK_R=4, BLOCK_C=512), 8, 3)
            if not full and wd != "bf16":
                break

    scalars = {n: "fp32" for n in _jit(adam._adam_kernel).arg_names if n.endswith(("_hi", "_lo"))}
    mscalars = {n: "fp32" for n in _jit(adam._adam_multi_kernel).arg_names if n.endswith(("_hi", "_lo"))}
    for ad, md in (("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"), ("fp64", "fp64")):
        fp64 = ad == "fp64"
        for surr in range(6) if (full or ad == "fp32") else (0,):
            for hg, hw in ((True, True), (False, False)):
                flags = dict(SURR=surr, HAS_G=hg, HAS_W=hw, FP64=fp64)
                yield (f"adam {ad}/{md} {flags}", adam._adam_kernel,
                       dict(AUX=PTR[ad], M1=PTR[md], M2=PTR[md], G=PTR[ad], WM=PTR[ad], n="i32", **scalars),
                       dict(flags, BLOCK=adam.BLOCK), adam.NUM_WARPS, 3)
                for aligned in (True, False):
                    yield (f"adam_multi {ad}/{md} {flags} aligned={aligned}", adam._adam_multi_kernel,
                           dict(META="*i64", META_F="*fp64", CHUNKS="*i64", AUX0=PTR[ad], M10=PTR[md],
                                M20=PTR[md], G0=PTR[ad], WM0=PTR[ad], **mscalars),
                           dict(flags, ALIGNED=aligned, BLOCK=adam.BLOCK, CHUNK_BLOCKS=adam.CHUNK_BLOCKS,
                                META_ROW=adam._META_ROW, META_INTS=adam._META_INTS), adam.NUM_WARPS, 3)

    if full:
        tiles = [tuple(c.kwargs.values())[:3] + (c.num_warps, c.num_stages)
                 for c in masked_matmul._mm_configs("a", "b", "c", "g")]
    else:
        tiles = [(64, 64, 32, 4, 3)]
    mm_dtypes = [("bf16", "fp32"), ("fp16", "bf16"), ("fp32", "fp32"), ("fp64", "fp64")]
    for dt, ad in mm_dtypes if full else [mm_dtypes[0], mm_dtypes[2], mm_dtypes[3]]:
        fp64 = dt == "fp64"
        prec = masked_matmul.DOT_IEEE if dt in ("fp32", "fp64") else masked_matmul.DOT_DEFAULT
        acc = "fp64" if fp64 else "fp32"
        for bm, bn, bk, warps, stages in tiles:
            if fp64 and bm * bn > 64 * 64:
                continue
            for mode, transposed in ((0, True), (1, True), (0, False), (2, False)):
                for even in (True, False):
                    sig = dict(A=PTR[dt], B=PTR[dt], AUX=PTR[ad], BIAS=PTR[dt], C=PTR[dt], M="i32", N="i32",
                               K="i32", M_BUCKET="i32")
                    consts = dict(MASK_MODE=mode, HAS_BIAS=transposed, FP64=fp64,
                                  DOT_PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EVEN_K=even)
                    if transposed:  # forward: B[k, n] = W[n, k]
                        consts["stride_bk"], sig["stride_bn"] = 1, "i32"
                    else:  # dX: B[k, n] = W[k, n]
                        consts["stride_bn"], sig["stride_bk"] = 1, "i32"
                    yield (f"masked_mm {dt}/{ad} {bm}x{bn}x{bk} mode={mode} fwd={transposed} even={even}",
                           masked_matmul._masked_mm_kernel, sig, consts, warps, stages)
            for mode in (0, 1):
                for ndw, ndm in ((True, True), (False, True), (True, False)):
                    for even in (True, False):
                        sig = dict(G=PTR[dt], X=PTR[dt], W=PTR[dt], AUX=PTR[ad], DW=PTR[dt], DM=PTR[ad],
                                   DMP=PTR[acc], N="i32", K="i32", T="i32", T_BUCKET="i32", dmp_cols="i32",
                                   alpha_hi="fp32", alpha_lo="fp32")
                        consts = dict(MASK_MODE=mode, SURR=0, RULE=0, NEED_DW=ndw, NEED_DM=ndm, FP64=fp64,
                                      DOT_PREC=prec, BLOCK_N=bm, BLOCK_K=bn, BLOCK_T=bk, GROUP_N=8, EVEN_T=even)
                        yield (f"masked_dt {dt}/{ad} {bm}x{bn}x{bk} mode={mode} dW={ndw} dM={ndm} even={even}",
                               masked_matmul._masked_dt_kernel, sig, consts, warps, stages)
        yield (f"unit_finish {dt}/{ad}", masked_matmul._unit_finish_kernel,
               dict(DMP=PTR[acc], AUX=PTR[ad], DM=PTR[ad], N="i32", cols="i32", alpha_hi="fp32", alpha_lo="fp32"),
               dict(SURR=0, FP64=fp64, BLOCK_R=16, BLOCK_C=256), 4, 3)

    for ad in ("bf16", "fp16", "fp32", "fp64"):
        for mp in (4, 32) if full else (4,):
            yield (f"nm_scores {ad} MP={mp}", nm._nm_scores_kernel,
                   dict(AUX=PTR[ad], OUT=PTR[ad], groups="i32", n="i32", m="i32"),
                   dict(FP64=ad == "fp64", MP=mp, BLOCK_G=nm.BLOCK_G), 4, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="sm arch (default: 80 and 90)")
    parser.add_argument("--full", action="store_true", help="every surrogate/rule and every autotune tile")
    parser.add_argument("--verbose", action="store_true",
                        help="print global memory instructions and flush-to-zero (.ftz) instructions per variant")
    args = parser.parse_args(argv)
    from . import _common

    if _common.INTERPRETED:
        print("compile_check: TRITON_INTERPRET=1 is set; unset it to compile for a GPU target")
        return 2
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        print(f"compile_check: unsupported triton {triton.__version__}: {exc}")
        return 3
    archs = args.arch or [80, 90]
    failed = 0
    total = 0
    t0 = time.time()
    for label, kernel, sig, consts, warps, stages in variants(args.full):
        for arch in archs:
            total += 1
            try:
                k = compile_variant(kernel, sig, consts, arch, warps, stages)
            except TypeError as exc:
                if total == 1:  # the very first compile: an API mismatch, not a kernel bug
                    print(f"compile_check: unsupported triton {triton.__version__} ASTSource API: {exc}")
                    return 3
                failed += 1
                print(f"FAIL sm_{arch} {label}\n{traceback.format_exc()}")
                continue
            except Exception:
                failed += 1
                print(f"FAIL sm_{arch} {label}\n{traceback.format_exc()}")
                continue
            line = f"ok   sm_{arch} {label} (shared {k.metadata.shared} B)"
            if args.verbose:
                mem = sorted(set(re.findall(r"(?:ld|st)\.global[\.\w]*", k.asm["ptx"])))
                ftz = sorted(set(re.findall(r"\b[a-z0-9]+(?:\.[a-z0-9]+)*\.ftz(?:\.[a-z0-9]+)*", k.asm["ptx"])))
                line += f" {mem} ftz={ftz}"
            print(line, flush=True)
    print(f"compile_check: {total - failed}/{total} compiled for sm_{archs} in {time.time() - t0:.0f} s "
          f"(triton {triton.__version__})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
