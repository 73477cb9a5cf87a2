"""Ahead-of-time compile check of the kernels for a CUDA target, without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels as numpy and accepts code that the
Triton compiler rejects; this compiles a set of configurations down to cubin with
``triton.compile`` so frontend / lowering errors show up on a machine with no GPU.
Run as ``python -m triton_kernels._aot_check [arch]`` with TRITON_INTERPRET unset; prints
one line per kernel and exits non-zero on a failure.
"""
from __future__ import annotations

import os
import sys

_TY = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16"}


def _signature(kernel, ptrs: dict, ints: list, consts: dict, ones=()):
    sig, consts = {}, dict(consts)
    for name in kernel.arg_names:
        if name in ptrs:
            sig[name] = "*" + ptrs[name]
        elif name in ints and name not in ones:
            sig[name] = "i32"
        else:
            if name in ones:
                consts[name] = 1
            sig[name] = "constexpr"
    return sig, consts


def main(arch: int = 90) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import conv, dense, dense_gemm

    target = GPUTarget("cuda", arch, 32)
    jobs = []
    for dt, d, act, scheme, variant, bias, BB, BM, saved_all, ones in [
        (torch.float32, 2, "tanh", "rk4", "symmetric", True, 32, 16, True, ()),
        (torch.float32, 3, "softplus", "euler", "antisymmetric", False, 32, 32, False, ("B", "N", "CK")),
        (torch.float64, 1, "sigmoid", "midpoint", "standard", True, 32, 16, False, ("M",)),
        (torch.bfloat16, 0, "relu", "rk4_38", "standard", True, 16, 64, True, ()),
    ]:
        t = _TY[str(dt).split(".")[1]]
        ct = "fp64" if dt == torch.float64 else "fp32"
        meta = dense._common_meta(dt, d, act, scheme, variant, bias, BB, BM)
        jobs.append((dense._dense_fwd_kernel, dict(x_ptr=t, w_ptr=t, b_ptr=t, scale_ptr=t, par_ptr=ct, kt_ptr="i32",
                                                   wt_ptr=ct, out_ptr=t), ["B", "M", "N", "CK"], meta, ones))
        jobs.append((dense._dense_bwd_kernel, dict(gs_ptr=t, st_ptr=t, w_ptr=t, b_ptr=t, scale_ptr=t, par_ptr=ct,
                                                   kt_ptr="i32", wt_ptr=ct, gx_ptr=t, pw_ptr=ct, pb_ptr=ct,
                                                   pl_ptr=ct, ws_ptr=ct),
                     ["B", "M", "N", "CK", "NS", "NSEG", "NCOEF", "NTILES", "KSEG"],
                     dict(meta, SAVED_ALL=saved_all, LAST_ONLY=not saved_all),
                     ones))
    # The GEMM path (dense_gemm): forward stage with prologue, update and save; the symmetric
    # adjoint epilogue; the dL/dx update; the eq. 23 kernels, direct and split; the elementwise prep.
    gemm_ptrs = ("x_ptr", "pro_ptr", "w_ptr", "b_ptr", "scale_ptr", "par_ptr", "kt_ptr", "wt_ptr", "out_ptr",
                 "a_ptr", "ubase_ptr", "ubuf_ptr", "uout_ptr", "save_ptr", "gs_ptr", "pl_ptr")
    input_typed = ("w_ptr", "b_ptr", "scale_ptr", "save_ptr", "gs_ptr")
    no_upd = dict(U0=0.0, U1=0.0, U2=0.0, U3=0.0, UF=1.0, UPD_H=False, UPDATE=False, SAVE=False, HAS_GS=False)
    for dt, variant, extra in [
        (torch.float32, 0, dict(P0=0.5, P1=0.0, P2=0.0, P3=0.0, TRANS_W=True, HAS_BIAS=True, ACT=2, COEF=1.0,
                                USE_LAM=True, STORE_A=True, ADJ=False, STORE_OUT=False, UPDATE=True, U0=1 / 6,
                                U1=1 / 3, U2=1 / 3, U3=0.0, UF=1 / 6, UPD_H=True, SAVE=True, HAS_GS=False)),
        (torch.bfloat16, 1, dict(no_upd, P0=0.0, P1=0.0, P2=0.0, P3=0.0, TRANS_W=True, HAS_BIAS=False, ACT=3,
                                 COEF=-1.0, USE_LAM=False, STORE_A=False, ADJ=True, STORE_OUT=True)),
        (torch.float64, 2, dict(P0=0.0, P1=0.0, P2=0.0, P3=0.0, TRANS_W=False, HAS_BIAS=False, ACT=0, COEF=1.0,
                                USE_LAM=False, STORE_A=False, ADJ=False, STORE_OUT=False, UPDATE=True, U0=0.0,
                                U1=1.0, U2=0.0, U3=0.0, UF=1.0, UPD_H=False, SAVE=False, HAS_GS=True)),
    ]:
        t = _TY[str(dt).split(".")[1]]
        ct = "fp64" if dt == torch.float64 else "fp32"
        BB, BN, BK = dense_gemm.gemm_blocks(64, 256, dt) if dt != torch.float64 else (32, 32, 16)
        base = dict(DP1=3, VARIANT=variant, CT=dense.compute_dtype(dt), PREC=dense.dot_precision(dt))
        ptrs = {p: ("i32" if p == "kt_ptr" else t if p in input_typed else ct) for p in gemm_ptrs}
        jobs.append((dense_gemm._gemm_kernel, ptrs, ["idx", "B", "M"],
                     dict(base, BLOCK_B=BB, BLOCK_N=BN, BLOCK_K=BK, **extra), ()))
        jobs.append((dense_gemm._wgrad_kernel,
                     {p: ("i32" if p == "kt_ptr" else t if p == "scale_ptr" else ct)
                      for p in ("g_ptr", "x_ptr", "pro_ptr", "a_ptr", "kb_ptr", "scale_ptr", "par_ptr", "kt_ptr",
                                "wt_ptr", "gw_ptr", "gb_ptr", "pw_ptr", "pb_ptr")},
                     ["idx", "B", "M", "BCHUNK"],
                     dict(base, P0=0.5, P1=0.0, P2=0.0, P3=0.0, ACT=4, HAS_BIAS=True, DIRECT=variant != 2,
                          BLOCK_B=BB, BLOCK_O=BN, BLOCK_I=BN), ()))
    jobs.append((dense_gemm._scatter_kernel, dict(pw_ptr="fp32", pb_ptr="fp32", kt_ptr="i32", wt_ptr="fp32",
                                                  gw_ptr="fp32", gb_ptr="fp32"), ["idx", "M", "SPLIT"],
                 dict(DP1=4, HAS_BIAS=True, CT=dense.compute_dtype(torch.float32), BLOCK_O=64, BLOCK_I=64), ()))
    jobs.append((dense_gemm._adj_prep_kernel, dict(z_ptr="fp32", xb_ptr="fp32", a_ptr="fp32", scale_ptr="bf16",
                                                   par_ptr="fp32", out_ptr="fp32", pl_ptr="fp32"), ["NEL", "BMs"],
                 dict(ZC=1 / 6, Q0=0.0, Q1=0.5, Q2=0.0, Q3=0.0, ACT=2, KBAR_ONLY=False,
                      CT=dense.compute_dtype(torch.float32), BLOCK=1024), ()))
    for dt, trans, act, bias, base in [(torch.float32, False, 1, True, True), (torch.bfloat16, True, 0, False, False),
                                       (torch.float64, False, 4, True, False)]:
        t = _TY[str(dt).split(".")[1]]
        ct = "fp64" if dt == torch.float64 else "fp32"
        meta = dict(KH=3, KW=3, DP1=3, CT=dense.compute_dtype(dt), PREC=dense.dot_precision(dt), BLOCK_P=64,
                    BLOCK_CI=16, BLOCK_CO=16)
        jobs.append((conv._conv_kernel, dict(x_ptr=t, w_ptr=t, b_ptr=t, scale_ptr=t, par_ptr=ct, kt_ptr="i32",
                                             wt_ptr=ct, base_ptr=t, out_ptr=t, a_ptr=ct),
                     ["idx", "Bn", "C", "H", "W"],
                     dict(meta, TRANS=trans, COEF=-1.0, USE_H=base, ACT=act, HAS_BIAS=bias, HAS_BASE=base,
                          USE_LAM=True, STORE_A=not base), ()))
        jobs.append((conv._conv_wgrad_kernel, dict(g_ptr=ct, x_ptr=t, scale_ptr=t, kt_ptr="i32", wt_ptr=ct,
                                                   gw_ptr=ct), ["idx", "Bn", "C", "H", "W"],
                     dict(meta, COEF=1.0, USE_LAM=bias), ()))
    failed = 0
    for kernel, ptrs, ints, consts, ones in jobs:
        consts = dict(consts)
        num_warps = consts.pop("num_warps", 4)
        sig, cst = _signature(kernel, ptrs, ints, consts, ones)
        try:
            triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=cst), target=target,
                           options={"num_warps": num_warps})
            print(f"ok   {kernel.fn.__name__} {ptrs[next(iter(ptrs))]}")
        except Exception as exc:  # report every failure
            failed += 1
            print(f"FAIL {kernel.fn.__name__}: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
