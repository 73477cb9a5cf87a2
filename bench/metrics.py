"""What a timing is measured against: the FLOPs of a layer call, the time the device's
own GEMM (or convolution) takes for the same products (the physical limit of a fused
kernel), and the peak memory of a forward+backward.

Legend: B batch, m width, C channels, P spatial points, k kernel, S stages, N steps.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bench.cases import Case, Inputs, default_impls, forward_backward, make_inputs

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


_FORKSERVER = None


def _fresh_process_context():
    """A forkserver that has imported torch, splinet_cuda and the bench modules once, and
    has run nothing: every measurement forks a fresh child from it (no memory cached by
    earlier work, no OpenMP state inherited), a second instead of a new interpreter's
    imports per implementation."""
    global _FORKSERVER
    if _FORKSERVER is None:
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "splinet_cuda", "bench.cases", "bench.peers", "bench.metrics"])
        _FORKSERVER = ctx
    return _FORKSERVER


def peak_memory_cpu(case: Case, impl_name: str, timeout: float = 600.0) -> Optional[float]:
    """MB of resident memory a forward+backward adds at its peak, measured in a fresh
    process forked from a clean forkserver (so nothing cached by earlier runs counts):
    libraries are loaded by a tiny warm-up, the peak-RSS counter is reset
    (/proc/self/clear_refs), then one call runs."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    spec = json.dumps({"case": case.__dict__, "impl": impl_name, "threads": torch.get_num_threads()})
    with _fresh_process_context().Pool(1, maxtasksperchild=1) as pool:
        return pool.apply_async(_measure_in_this_process, (spec,)).get(timeout)


def _measure_in_this_process(spec: str) -> float:
    from dataclasses import replace

    data = json.loads(spec)
    data["case"]["spatial"] = tuple(data["case"]["spatial"])
    case = Case(**data["case"])
    torch.set_num_threads(int(data["threads"]))
    (impl,) = [i for i in default_impls([data["impl"]], compile=False) if i.name == data["impl"]]
    tiny = replace(case, B=1, N=1, name=case.name + "-warmup")
    forward_backward(impl.build(tiny), make_inputs(tiny, "cpu"))
    inputs = make_inputs(case, "cpu")
    fn = impl.build(case)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = _status_kb("VmRSS")
    forward_backward(fn, inputs)
    return (_status_kb("VmHWM") - base) / 1024


