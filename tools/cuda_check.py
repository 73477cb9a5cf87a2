"""Compiles every csrc/cuda/*.cu file with nvcc for sm_80 and sm_90, without a GPU and
against the installed (possibly CPU-only) torch headers, so that a CUDA syntax or
template error fails `make test` and CI. Nothing is linked or run. The 16-bit files, whose
device code differs below sm_80 (no bfloat16 tensor cores), are also compiled device-only
for sm_75 (Turing), the oldest architecture of the default build (splinet_cuda/_cuda_archs.py);
the other files' code does not depend on the architecture.

Each file's device code is also checked (from nvcc's PTX and ptxas's report):
  - every block program (block_kernel<...>) synchronises its phases: one with no barrier had
    its body dropped by the device compiler;
  - no host function is called from device code (an error here, a warning by default);
  - the bfloat16 / float16 dense files hold the tensor-core MMAs of the fused GEMM where the
    architecture has them (float16 from sm_70, bfloat16 from sm_80), and none below;
  - float64 arithmetic is not contracted to fused multiply-adds (fma.rn.f64) where the kernels
    promise the CPU's rounding: the basis (csrc/common/bspline.h) in every kernel, the float64
    programs and functors, the scale-gradient sums. Only float64 kernels of the tanh, sigmoid
    and softplus activations may contain them (libdevice's tanh, exp and log1p use FMAs;
    those activations are not bitwise equal to the CPU's anyway);
  - per-file budgets (PTX_BUDGET): kernel entries and PTX size, so that no translation unit
    grows back into one that takes many minutes; both are deterministic, unlike wall time,
    which is printed per file.

The CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h (generated at build time); a
one-line shim in build/ stands in for it.

Usage: python tools/cuda_check.py [--nvcc PATH] [--archs 80,90] [--old-archs 75] [--jobs N] [--files GLOB]
"""
import argparse
import fnmatch
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


def empty_block_programs(ptxas_log: str, old_arch: bool = False):
    """Entry points of the block programs (block_kernel<...>) that ptxas reports with no
    barrier: every program synchronises its phases, so none means the body was dropped.
    Below sm_80 (``old_arch``) the bfloat16 fused GEMM (its plain and split-K bodies) is a
    trap by design (blend_gemm.h)."""
    empty, current = [], None
    for line in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = m.group(1)
        m = re.search(r"used (\d+) barriers", line)
        if m and current and "block_kernel" in current:
            gemm = "BlendGemmBody" in current or "SplitKGemmBody" in current
            trap = old_arch and gemm and "BFloat16" in current
            if int(m.group(1)) == 0 and not trap:
                empty.append(current)
            current = None
    return empty


def register_report(ptxas_log: str):
    """(most registers of a kernel, total spill-store bytes) from ptxas -v."""
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", ptxas_log)]
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill stores", ptxas_log))
    return (max(regs) if regs else 0), spills


# Instructions a file's PTX must contain from an architecture on, and must not contain below
# it: the fused dense GEMM's tensor-core MMAs (blend_gemm.h: wmma_min_arch; a template slip
# could fall back to the scalar fragments, or emit bfloat16 fragments where there are none).
WMMA_BF16 = "wmma.mma.sync.aligned.row.row.m16n16k16.f32.bf16.bf16.f32"
WMMA_F16 = "wmma.mma.sync.aligned.row.row.m16n16k16.f32.f32"  # f16 inputs are implied
REQUIRED_PTX = {
    "dense_fwd_bf16.cu": [(WMMA_BF16, 80)], "dense_bwd_bf16.cu": [(WMMA_BF16, 80)],
    "dense_fwd_f16.cu": [(WMMA_F16, 70)], "dense_bwd_f16.cu": [(WMMA_F16, 70)],
}
# The files compiled for the older architectures too (--old-archs).
OLD_ARCH_FILES = ("*16.cu", "*_half.cu")

# Per-file budgets for one architecture: (kernel entries, PTX bytes). The largest files,
# dense_bwd_bf16.cu and dense_bwd_f16.cu, have 37 kernels and 3.2 MB of PTX each (as this
# script prints them, nvcc 13.0); the budgets leave about 1.4x room. The single file the
# dense layer once was had 152 kernels and 31 MB of PTX and took 11-12 minutes per
# architecture on 2 cores: compile time grows with the PTX.
PTX_BUDGET = (50, 4_500_000)


def ptx_entries(ptx: str):
    """(mangled name, body) of every kernel entry of a PTX module."""
    starts = [m.start() for m in re.finditer(r"^(?:\.\w+[ \t]+)*\.entry[ \t]", ptx, re.M)]
    out = []
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(ptx)
        name = re.match(r"(?:\.\w+\s+)*\.entry\s+([^\s(]+)", ptx[s:end])
        out.append((name.group(1) if name else "?", ptx[s:end]))
    return out


def demangle(names):
    if not names:
        return []
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return list(names)
    res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    out = res.stdout.splitlines()
    return out if len(out) == len(names) else list(names)


# Activations whose float64 device code calls libdevice functions built on FMAs.
LIBDEVICE_ACTS = ("(splinet::Act)2", "(splinet::Act)3", "(splinet::Act)4")


def contracted_f64(entries):
    """Entries with a float64 fused multiply-add where the CPU's rounding is promised: all but
    float64 entries of the tanh / sigmoid / softplus activations."""
    bad = []
    names = demangle([n for n, _ in entries])
    for (mangled, body), name in zip(entries, names):
        if "fma.rn.f64" not in body:
            continue
        if "double" in name and any(a in name for a in LIBDEVICE_ACTS):
            continue
        bad.append(name)
    return bad


def check_ptx(src, keep_dir, n_archs):
    """Problems found in the PTX nvcc kept for src (one module per architecture), and
    (entries, bytes) of one architecture's."""
    modules = [open(f).read() for f in sorted(glob.glob(os.path.join(keep_dir, "*.ptx")))]
    ptx = "".join(modules)
    problems = []
    if len(modules) != n_archs:
        return [f"{len(modules)} PTX modules kept, expected {n_archs}"], (0, 0)
    for module in modules:
        target = re.search(r"^\.target\s+sm_(\d+)", module, re.M)
        arch = int(target.group(1)) if target else 0
        for instr, since in REQUIRED_PTX.get(os.path.basename(src), []):
            if arch >= since and instr not in module:
                problems.append(f"no {instr} in its sm_{arch} PTX")
            elif arch < since and instr in module:
                problems.append(f"{instr} in its sm_{arch} PTX (needs sm_{since})")
    entries = ptx_entries(ptx)
    fma = contracted_f64(entries)
    if fma:
        problems.append(f"float64 multiply-adds contracted to fma.rn.f64 in {len(fma)} kernels, e.g. {fma[:2]}")
    size = (len(entries) // n_archs, max(len(m.encode()) for m in modules))
    if size[0] > PTX_BUDGET[0] or size[1] > PTX_BUDGET[1]:
        problems.append(f"{size[0]} kernels / {size[1]} PTX bytes exceed the budget {PTX_BUDGET}: split the file")
    return problems, size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nvcc")
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--old-archs", default="75", help="device-only compiles of the 16-bit files ('' for none)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--files", default="*.cu", help="only the csrc/cuda files matching this glob")
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
    sources = sorted(s for s in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
                     if fnmatch.fnmatch(os.path.basename(s), args.files))
    # Largest first, so that the parallel jobs finish together.
    sources.sort(key=lambda s: (not os.path.basename(s).startswith("dense_bwd"), not "16" in s, s))
    archs = args.archs.split(",")

    old_archs = [a for a in args.old_archs.split(",") if a]
    jobs = [(src, archs, False) for src in sources]
    jobs += [(src, old_archs, True) for src in sources
             if old_archs and any(fnmatch.fnmatch(os.path.basename(src), g) for g in OLD_ARCH_FILES)]

    # One nvcc call per file for every architecture, as the extension's build makes it: the
    # host side (most of a small file's time) is compiled once. The older architectures'
    # calls compile the device code only (--fatbin): its host side is the same.
    def compile_one(job):
        src, archs, device_only = job
        tag = os.path.basename(src) + ("." + "_".join(archs) if device_only else "")
        obj = os.path.join(out, f"{tag}.fatbin" if device_only else f"{tag}.o")
        # nvcc's intermediates, for the PTX checks; removed once read.
        keep = os.path.join(out, f"{tag}.keep")
        shutil.rmtree(keep, ignore_errors=True)
        os.makedirs(keep, exist_ok=True)
        # -O0: the host side is compiled for its errors only (device code is optimised by
        # cicc/ptxas whatever the host level), and unoptimised it compiles faster.
        cmd = [nvcc, "--fatbin" if device_only else "-c", src, "-o", obj, "-std=c++20", "-O0", "--expt-relaxed-constexpr",
               *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs], "-DWITH_CUDA", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               "-Xcudafe", "--diag_suppress=20012",
               # A __host__ function called from __host__ __device__ code is only a warning by
               # default, and the device compiler then drops the caller's code: make it an error.
               "-Werror", "cross-execution-space-call", "-Xptxas", "-v", "-keep", "-keep-dir", keep]
        cmd += [f"-I{p}" for p in includes]
        t0 = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.time() - t0
        problems, size = check_ptx(src, keep, len(archs)) if res.returncode == 0 else ([], (0, 0))
        shutil.rmtree(keep, ignore_errors=True)
        return src, archs, device_only, res, dt, problems, size

    failed = 0
    t_all = time.time()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for src, archs, device_only, res, dt, problems, size in pool.map(compile_one, jobs):
            name = os.path.relpath(src, ROOT) + " sm_" + "+".join(archs) + (" (device code)" if device_only else "")
            empty = empty_block_programs(res.stdout + res.stderr, old_arch=device_only)
            regs, spills = register_report(res.stdout + res.stderr)
            stats = (f"{dt:.0f} s, {size[0]} kernels, {size[1] / 1e6:.1f} MB PTX, "
                     f"<= {regs} registers, {spills} bytes spilled")
            if res.returncode != 0:
                failed += 1
                print(f"cuda-check: FAILED {name} ({dt:.0f} s)\n{res.stdout}{res.stderr}")
            elif empty:
                failed += 1
                print(f"cuda-check: FAILED {name}: block programs compiled without a barrier "
                      f"(their code was dropped): {empty[:3]}")
            elif problems:
                failed += 1
                print(f"cuda-check: FAILED {name} ({stats}): " + "; ".join(problems))
            else:
                print(f"cuda-check: ok {name} ({stats})", flush=True)
    print(f"cuda-check: {len(jobs) - failed}/{len(jobs)} compiled with {nvcc} in {time.time() - t_all:.0f} s "
          f"({args.jobs} jobs)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
