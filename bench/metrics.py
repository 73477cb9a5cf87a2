"""What a timing is measured against: FLOPs, the device's own GEMM time, peak memory.

The FLOPs of a layer call, the time the device's own GEMM (or convolution) takes for the
same products (the physical limit of a fused kernel), and the peak memory of a
forward+backward.

Legend: B batch, m width, C channels, P spatial points, k kernel, S stages, N steps.
"""
from __future__ import annotations

import json
import math
import os
import select
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bench.cases import Case, Inputs, forward_backward, make_inputs
from bench.impls import default_impls

REPO = Path(__file__).resolve().parent.parent

_STAGES = {"euler": 1, "midpoint": 2, "rk4": 4, "rk4_38": 4}
# Products per forward product: the backward does one for the input gradient and one for
# the weight gradient.
MODE_FACTOR = {"fwd": 1, "bwd": 2, "fwd+bwd": 3, "train": 3}  # train: the layer's products only


def products_per_call(case: Case) -> int:
    """Matrix (or convolution) products in one forward: N steps x S stages, two per
    stage for the symmetric variant (x W^T, then act(.) W)."""
    return case.N * _STAGES[case.scheme] * (2 if case.variant == "symmetric" else 1)


def flops(case: Case, mode: str) -> float:
    """Multiply-adds x 2 of the layer's products (elementwise work is not counted)."""
    if case.kind == "dense":
        one = 2.0 * case.B * case.m * case.m
    else:
        one = 2.0 * case.B * case.C * case.C * case.kernel ** len(case.spatial) * math.prod(case.spatial)
    return one * products_per_call(case) * MODE_FACTOR[mode]


def product_fn(case: Case, inputs: Inputs) -> Callable[[], object]:
    """All forward products of one call, as the device's GEMM/convolution runs them
    back to back (no blend, no activation): the floor a fused kernel can approach."""
    x, w = inputs.x.detach(), inputs.weight.detach()[0]
    count = products_per_call(case)
    if case.kind == "dense":
        return lambda: [torch.mm(x, w.t()) for _ in range(count)]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(case.spatial)]
    pad = case.kernel // 2
    return lambda: [conv(x, w, padding=pad) for _ in range(count)]


# --------------------------------------------------------------------------------------
# Peak memory of a forward+backward
# --------------------------------------------------------------------------------------

def peak_memory_cuda(fn: Callable, inputs: Inputs) -> float:
    """MB allocated at the peak of one forward+backward beyond what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    forward_backward(fn, inputs)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class _MeasureServer:
    """A child interpreter (``python -m bench.metrics``) that imports torch, splinet_cuda
    and the bench modules once and then runs nothing itself: for every measurement it forks
    a fresh process, which measures one implementation and exits. Each measurement thus
    starts from the same clean state (no memory cached by earlier work, no OpenMP threads
    inherited: the server never ran a parallel region), in a fraction of a second instead
    of a new interpreter's imports. Requests and answers are JSON lines on its stdin/stdout."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.metrics"], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def measure(self, spec: str, timeout: float) -> float:
        if self.proc.poll() is not None:
            raise RuntimeError(f"memory server exited with {self.proc.returncode}")
        self.proc.stdin.write(spec + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            raise RuntimeError(f"memory measurement took more than {timeout:g} s")
        answer = json.loads(self.proc.stdout.readline() or '{"error": "no answer"}')
        if "error" in answer:
            raise RuntimeError(f"memory measurement failed: {answer['error']}")
        return float(answer["peak_mb"])


_SERVER: Optional[_MeasureServer] = None


def peak_memory_cpu(case: Case, impl_name: str, timeout: float = 600.0) -> Optional[float]:
    """MB of resident memory a forward+backward adds at its peak, measured in a fresh
    process (forked from a clean server, so nothing cached by earlier runs counts): a
    one-step warm-up of the same shape loads the libraries and sets up what stays for the
    process whatever the steps (OpenMP's workers, per-thread GEMM and scratch buffers: 2.5
    MB for the fused layer at B=512 m=64, 0.4 MB for the reference, which a B=1 warm-up
    left in the figure), the peak-RSS counter is reset (/proc/self/clear_refs), then one
    call of all the steps runs."""
    global _SERVER
    if not Path("/proc/self/clear_refs").exists():
        return None
    if _SERVER is None or _SERVER.proc.poll() is not None:
        _SERVER = _MeasureServer()
    spec = json.dumps({"case": case.__dict__, "impl": impl_name, "threads": torch.get_num_threads()})
    return _SERVER.measure(spec, timeout)


def _serve() -> None:
    """The server's loop: one forked child per request line, its answer relayed."""
    for line in sys.stdin:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, answer, exit without running the parent's cleanup
            os.close(r)
            try:
                answer = {"peak_mb": _measure_in_this_process(line)}
            except BaseException as err:  # reported to the parent, which raises
                answer = {"error": f"{type(err).__name__}: {err}"}
            os.write(w, json.dumps(answer).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            answer = f.read()
        os.waitpid(pid, 0)
        sys.stdout.write((answer or '{"error": "the measuring process died"}') + "\n")
        sys.stdout.flush()


def _fixed_malloc():
    """glibc only: a fixed mmap threshold, so every block of 64 KB or more is mapped when
    allocated and unmapped when freed. glibc's default threshold moves up after the first
    frees, after which large tensors come from the heap and reuse freed, still-resident
    pages: the peak then depends on the allocation history (the same eager call measured
    19 MB in one process and 44 MB in another). Returns libc, or None elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        if not (libc.mallopt(m_mmap_threshold, 64 << 10) and libc.mallopt(m_trim_threshold, 128 << 10)):
            return None
        return libc
    except (OSError, AttributeError):
        return None


def _measure_in_this_process(spec: str) -> float:
    data = json.loads(spec)
    data["case"]["spatial"] = tuple(data["case"]["spatial"])
    case = Case(**data["case"])
    torch.set_num_threads(int(data["threads"]))
    (impl,) = [i for i in default_impls([data["impl"]], compile=False) if i.name == data["impl"]]
    libc = _fixed_malloc()
    warm = replace(case, N=1, name=case.name + "-warmup")
    forward_backward(impl.build(warm), make_inputs(warm, "cpu"))
    inputs = make_inputs(case, "cpu")
    fn = impl.build(case)
    if libc is not None:
        libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = _status_kb("VmRSS")
    forward_backward(fn, inputs)
    return (_status_kb("VmHWM") - base) / 1024


if __name__ == "__main__":
    _serve()
