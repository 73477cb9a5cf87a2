"""The CUDA conv kernels (csrc/cuda/conv_driver.h, conv_cuda.cu; elementwise pieces in
step_functors.h).

Without a GPU the driver runs on the CPU through the test-only emulation ops
(tests/cpp/cuda_emulated.cpp: the same code, each kernel a loop, convolutions through ATen),
checked against the fused CPU conv kernel, which test_fused_conv.py checks against the
reference. With a GPU the real ops are checked against the reference and the CPU kernel
(1-3 spatial dims, variants, schemes, activations, gradcheck, opcheck, bf16/fp16).

Legend: B batch, C channels, n = L + d coefficients, d degree, N steps, K checkpoint interval.
"""
import itertools

import pytest
import torch

import splinet_cuda as sc
from helpers import (ACTS, CONV_VARIANTS, HALF_TOL, OP_RESULTS, assert_all_close,
                     assert_all_close_scaled, conv_inputs, gpu_test, outputs_and_grads, requires, tolerance)

import emulation  # tests/emulation.py: the test-only extension

ops = torch.ops.splinet_cuda
emu = emulation.ops
needs_emu = requires("cuda-emulated")
needs_gpu = gpu_test("cuda", "spline_conv_fwd")
F64, F32 = tolerance(torch.float64, "cuda-emulated"), tolerance(torch.float32, "cuda-emulated")

SPATIAL = {1: (9,), 2: (5, 4), 3: (3, 4, 3)}
KERNEL = {1: (3,), 2: (3, 1), 3: (3, 3, 1)}


def make(sd, **kw):
    """Inputs without grad (the ops are called directly) on these spatial sizes and kernels."""
    return conv_inputs(sd, spatial=SPATIAL[sd], k=KERNEL[sd], wscale=0.3, scale=1.2, requires_grad=False, **kw)


def cpu_op(args, cfg, grad=None):
    states = ops.spline_conv_fwd(*args, *cfg)
    grad = torch.randn_like(states) if grad is None else grad
    return states, grad, ops.spline_conv_bwd(grad, states, *args[1:], *cfg)


def assert_ops_close(got, ref, **tol):
    assert_all_close(got, ref, OP_RESULTS, **tol)


GRID = [(sd, v, s, a, i % 4, i % 3 != 0) for i, (sd, v, s, a) in enumerate(
    itertools.product([1, 2, 3], CONV_VARIANTS, ["euler", "rk4", "midpoint"], ACTS))]


DIRECT, CUDNN = 1, 2


def emulated(args, cfg, grad, states, path, blocks=0, threads=1):
    """The CUDA driver on the CPU: one thread per block, or `threads` host threads at a barrier."""
    got_states = emu.cuda_conv_fwd_emulated(*args, *cfg, path, blocks, threads)
    return [got_states, *emu.cuda_conv_bwd_emulated(grad, states, *args[1:], *cfg, path, blocks, threads)]


@needs_emu
@pytest.mark.parametrize("path", [DIRECT, CUDNN])
@pytest.mark.parametrize("sd,variant,scheme,activation,degree,bias", GRID)
def test_emulated_matches_cpu_kernel(path, sd, variant, scheme, activation, degree, bias):
    """Both paths, every dims x variant x scheme x activation, degrees 0-3, checkpoint K = 2;
    the direct program with fewer blocks than samples (the persistent loop)."""
    args = make(sd, B=3, d=degree, bias=bias)
    cfg = (5, degree, activation, scheme, variant, 0.0, 2)
    states, grad, ref = cpu_op(args, cfg)
    got = emulated(args, cfg, grad, states, path, blocks=2)
    assert_ops_close(got, [states, *ref], **F64)


@needs_emu
@pytest.mark.parametrize("sd,variant,scheme,activation,bias,checkpoint",
                         [(1, "standard", "rk4", "tanh", True, 1), (2, "symmetric", "midpoint", "relu", True, 3),
                          (3, "standard", "euler", "softplus", False, 2)])
def test_emulated_direct_program_with_thread_teams(sd, variant, scheme, activation, bias, checkpoint):
    """The direct program run by teams of 3 and 8 host threads per block meeting at a barrier
    at every sync() (shared memory poisoned with NaN first), 3 samples over 2 blocks."""
    args = make(sd, B=3, d=2, bias=bias, seed=5)
    cfg = (5, 2, activation, scheme, variant, 0.0, checkpoint)
    states, grad, ref = cpu_op(args, cfg)
    for threads in (3, 8):
        got = emulated(args, cfg, grad, states, DIRECT, blocks=2, threads=threads)
        assert_ops_close(got, [states, *ref], **F64)


@needs_emu
@pytest.mark.parametrize("path", [DIRECT, CUDNN])
@pytest.mark.parametrize("B,C,N,K", [(1, 1, 1, 1), (1, 2, 3, 5), (3, 1, 4, 2)])
def test_emulated_edge_shapes_and_last_only(path, B, C, N, K):
    args = make(2, B=B, C=C, d=1, seed=B + C)
    cfg = (N, 1, "tanh", "rk4_38", "standard", 0.0, K)
    states, grad, ref = cpu_op(args, cfg)
    assert_ops_close(emulated(args, cfg, grad, states, path), [states, *ref], **F64)
    g_last = torch.randn_like(states[-1])
    full = torch.zeros_like(states)
    full[-1] = g_last
    a = emu.cuda_conv_bwd_emulated(g_last, states, *args[1:], *cfg, path, 0, 1)
    c = emu.cuda_conv_bwd_emulated(full, states, *args[1:], *cfg, path, 0, 1)
    assert_ops_close(a, c, rtol=0, atol=0)


@needs_emu
@pytest.mark.parametrize("path", [DIRECT, CUDNN])
def test_emulated_float32_and_wide_kernels(path):
    args = make(2, C=4, d=3, dtype=torch.float32)
    cfg = (6, 3, "relu", "rk4", "symmetric", 0.0, 1)
    states, grad, ref = cpu_op(args, cfg)
    assert_ops_close(emulated(args, cfg, grad, states, path), [states, *ref], **F32)
    # 5 x 5 kernel wider than the 5 x 4 plane: every offset clipped on some side.
    g = torch.Generator().manual_seed(3)
    x, w, b, s = make(2, C=2, d=1)
    w = torch.randn(3, 2, 2, 5, 5, generator=g, dtype=torch.float64) * 0.2
    cfg = (3, 1, "softplus", "midpoint", "standard", 0.0, 1)
    states, grad, ref = cpu_op((x, w, b, s), cfg)
    assert_ops_close(emulated((x, w, b, s), cfg, grad, states, path), [states, *ref], **F64)


def test_tf32_is_off_in_tests():
    """conftest pins TF32 off, so float32 CUDA references (cuDNN convolutions, cuBLAS) and the
    backend's cuDNN path compute in float32 (PyTorch enables TF32 for cuDNN by default)."""
    assert not torch.backends.cudnn.allow_tf32
    assert not torch.backends.cuda.matmul.allow_tf32


@needs_emu
@pytest.mark.parametrize("path", [DIRECT, CUDNN])
def test_emulated_accepts_scale_of_another_dtype(path):
    """A scale whose dtype differs from x's is taken as by the CPU op: lam in x's dtype, its
    gradient returned in the scale's dtype."""
    x, w, b, _ = make(2, dtype=torch.float32)
    cfg = (3, 2, "tanh", "rk4", "standard", 0.0, 2)
    s = torch.tensor(1.3, dtype=torch.float64)
    states, grad, ref = cpu_op((x, w, b, s), cfg)
    got = emulated((x, w, b, s), cfg, grad, states, path)
    assert ref[3].dtype == got[4].dtype == torch.float64
    assert_ops_close(got, [states, *ref], **F32)


@needs_emu
def test_emulated_ops_reject_bad_args():
    """(Their opcheck is in test_contract.py.)"""
    x, w, b, s = make(1, d=1)
    cfg = (3, 1, "tanh", "euler", "standard", 0.0, 2)
    with pytest.raises(ValueError, match="antisymmetric"):
        emu.cuda_conv_fwd_emulated(x, w, b, s, 3, 1, "tanh", "euler", "antisymmetric", 0.0, 1, 0, 0, 1)
    with pytest.raises(ValueError, match="odd"):
        emu.cuda_conv_fwd_emulated(x, torch.zeros(3, 3, 3, 2, dtype=x.dtype), b, s, *cfg, 0, 0, 1)
    with pytest.raises(TypeError, match="scale"):
        emu.cuda_conv_fwd_emulated(x, w, b, torch.tensor(1), *cfg, 0, 0, 1)
    with pytest.raises(ValueError, match="path"):
        emu.cuda_conv_fwd_emulated(x, w, b, s, *cfg, 5, 0, 1)
    with pytest.raises(ValueError, match="shared memory"):  # 64^2 * 9 doubles > 100 KB
        big = torch.zeros(3, 64, 64, 3, 3, dtype=x.dtype)
        emu.cuda_conv_fwd_emulated(torch.zeros(1, 64, 3, 3, dtype=x.dtype), big, None, s, *cfg, DIRECT, 0, 1)


# --------------------------------------------------------------------------- on a GPU


def _run(backend, *args, **kw):
    return outputs_and_grads(sc.spline_ode_conv, *args, backend=backend, **kw)


@needs_gpu
@pytest.mark.parametrize("C", [3, 40])  # the direct path and the cuDNN path under "auto"
@pytest.mark.parametrize("sd,variant,scheme,activation,degree,bias", GRID[::3])
def test_cuda_matches_reference(C, sd, variant, scheme, activation, degree, bias):
    args = [None if t is None else t.cuda().requires_grad_() for t in make(sd, C=C, d=degree, bias=bias)]
    kw = dict(steps=4, degree=degree, activation=activation, scheme=scheme, variant=variant)
    for g, r in zip(_run("cuda", *args, **kw), _run("reference", *args, **kw)):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


@needs_gpu
def test_cuda_gradcheck():
    """(The CUDA ops' opcheck is in test_contract.py.)"""
    x, w, b, s = [t.cuda().requires_grad_() for t in make(2, d=2)]
    kw = dict(steps=3, degree=2, activation="tanh", scheme="rk4", variant="symmetric", backend="cuda")
    assert torch.autograd.gradcheck(lambda *a: sc.spline_ode_conv(*a, **kw), (x, w, b, s))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision(dtype):
    ref_args = [t.cuda().requires_grad_() for t in make(2, B=4, C=8, d=3)]
    args = [t.detach().to(dtype).requires_grad_() for t in ref_args]
    kw = dict(steps=8, degree=3, activation="relu", scheme="euler")
    got, ref = _run("cuda", *args, **kw), _run("reference", *ref_args, **kw)
    assert_all_close_scaled(got, ref, **HALF_TOL[dtype])
