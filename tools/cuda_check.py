"""Compiles every csrc/cuda/*.cu file with nvcc for sm_80 and sm_90, without a GPU and
against the installed (possibly CPU-only) torch headers, so that a CUDA syntax or
template error fails `make test` and CI. Nothing is linked or run.

The CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h (generated at build time); a
one-line shim in build/ stands in for it.

Usage: python tools/cuda_check.py [--nvcc PATH] [--archs 80,90] [--jobs N]
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_nvcc(explicit):
    for cand in (explicit, shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"),
                 *sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True)):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def empty_block_programs(ptxas_log: str):
    """Entry points of the block programs (block_kernel<...>) that ptxas reports with no
    barrier: every program synchronises its phases, so none means the body was dropped."""
    empty, current = [], None
    for line in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = m.group(1)
        m = re.search(r"used (\d+) barriers", line)
        if m and current and "block_kernel" in current:
            if int(m.group(1)) == 0:
                empty.append(current)
            current = None
    return empty


# Instructions a file's PTX must contain: the fused dense GEMM's tensor-core MMAs for bfloat16
# and float16 (blend_gemm.h; a template slip could fall back to the scalar fragments).
REQUIRED_PTX = {
    "dense_cuda.cu": ["wmma.mma.sync.aligned.row.row.m16n16k16.f32.bf16.bf16.f32",
                      "wmma.mma.sync.aligned.row.row.m16n16k16.f32.f32"],  # f16 inputs are implied
}


def missing_instructions(src, keep_dir):
    """The REQUIRED_PTX entries of src that none of its kept .ptx files contain."""
    wanted = REQUIRED_PTX.get(os.path.basename(src), [])
    ptx = "".join(open(f).read() for f in glob.glob(os.path.join(keep_dir, "*.ptx")))
    return [w for w in wanted if w not in ptx]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nvcc")
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("cuda-check: nvcc not found, nothing compiled")
        return 0

    import torch
    from torch.utils.cpp_extension import include_paths

    out = os.path.join(ROOT, "build", "cuda-check")
    shim = os.path.join(out, "shim", "c10", "cuda", "impl")
    os.makedirs(shim, exist_ok=True)
    with open(os.path.join(shim, "cuda_cmake_macros.h"), "w") as f:
        f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [os.path.join(out, "shim"), os.path.join(ROOT, "csrc")] + include_paths()
    import sysconfig

    includes.append(sysconfig.get_paths()["include"])
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    jobs = [(src, arch) for src in sources for arch in args.archs.split(",")]

    def compile_one(job):
        src, arch = job
        obj = os.path.join(out, f"{os.path.basename(src)}.sm{arch}.o")
        # nvcc's intermediates (hundreds of MB) are kept only where the PTX is checked.
        keep = os.path.join(out, f"{os.path.basename(src)}.sm{arch}.keep")
        keep_args = ["-keep", "-keep-dir", keep] if os.path.basename(src) in REQUIRED_PTX else []
        os.makedirs(keep, exist_ok=True)
        cmd = [nvcc, "-c", src, "-o", obj, "-std=c++20", "-O1", "--expt-relaxed-constexpr",
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-DWITH_CUDA", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               "-Xcudafe", "--diag_suppress=20012",
               # A __host__ function called from __host__ __device__ code is only a warning by
               # default, and the device compiler then drops the caller's code: make it an error.
               "-Werror", "cross-execution-space-call", "-Xptxas", "-v"] + keep_args + [f"-I{p}" for p in includes]
        t0 = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True)
        missing = missing_instructions(src, keep)
        shutil.rmtree(keep, ignore_errors=True)
        return src, arch, res, time.time() - t0, missing

    failed = 0
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for src, arch, res, dt, missing in pool.map(compile_one, jobs):
            name = os.path.relpath(src, ROOT)
            empty = empty_block_programs(res.stdout + res.stderr)
            if res.returncode != 0:
                failed += 1
                print(f"cuda-check: FAILED {name} sm_{arch} ({dt:.0f} s)\n{res.stdout}{res.stderr}")
            elif empty:
                failed += 1
                print(f"cuda-check: FAILED {name} sm_{arch}: block programs compiled without a barrier "
                      f"(their code was dropped): {empty[:3]}")
            elif missing:
                failed += 1
                print(f"cuda-check: FAILED {name} sm_{arch}: no {missing} in its PTX")
            else:
                print(f"cuda-check: ok {name} sm_{arch} ({dt:.0f} s)")
    print(f"cuda-check: {len(jobs) - failed}/{len(jobs)} compiled with {nvcc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
