"""The CUDA dense kernels (csrc/cuda/dense_program.h, dense_driver.h, dense_cuda.cu).

Without a GPU their block programs and the large-width path run on the CPU through the
test-only emulation ops (tests/cpp/cuda_emulated.cpp: one thread per block, the same code),
checked against the fused CPU kernel, which test_fused_dense.py checks against the
reference. With a GPU the real kernels are checked against the CPU kernel here (bf16/fp16
tolerances, bitwise float64) and by the whole of test_fused_dense.py (backend "cuda").

Legend: B batch, m width, n = L + d coefficients, d degree, N steps, K checkpoint interval.
"""
import pytest
import torch

import splinet_cuda as sc
from helpers import (HALF_TOL, OP_RESULTS, TOL, VARIANTS, assert_all_close, assert_all_close_scaled,
                     dense_inputs, gpu_test, grid, num_threads, requires, tolerance)

import emulation  # tests/emulation.py: the test-only extension

ops = torch.ops.splinet_cuda
emu = emulation.ops
needs_emu = requires("cuda-emulated")
needs_gpu = gpu_test("cuda", "spline_dense_fwd")

SMALL, LARGE, FUSED = 1, 2, 3  # FUSED: the large path through the blended GEMM (blend_gemm.h)
PATHS = [SMALL, LARGE, FUSED]
F64, F32 = tolerance(torch.float64, "cuda-emulated"), tolerance(torch.float32, "cuda-emulated")


def tile_of(path, rows):
    """The tile_rows argument: batch rows of a small-path tile, or 64 / 128 for the fused GEMM."""
    return 64 if path == FUSED else rows


def make(B, m, L, d, **kw):
    """Inputs without grad: the ops are called directly."""
    return dense_inputs(B, m, L, d, requires_grad=False, **kw)


def cpu_op(x, w, b, s, cfg, grad=None):
    """States and gradients of the fused CPU kernel."""
    states = ops.spline_dense_fwd(x, w, b, s, *cfg)
    grad = torch.randn_like(states) if grad is None else grad
    return states, grad, ops.spline_dense_bwd(grad, states, w, b, s, *cfg)


def emulated(x, w, b, s, cfg, grad, path, tile_rows=0, blocks=0, states=None, threads=1):
    """The CUDA driver on the CPU: one thread per block, or `threads` host threads at a barrier."""
    got = emu.cuda_dense_fwd_emulated(x, w, b, s, *cfg, path, tile_rows, blocks, threads)
    states = got if states is None else states
    return got, emu.cuda_dense_bwd_emulated(grad, states, w, b, s, *cfg, path, tile_rows, blocks, threads)


def assert_ops_close(got, ref, **tol):
    assert_all_close(got, ref, OP_RESULTS, **tol)


GRID = grid(VARIANTS)


@needs_emu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("variant,scheme,activation,degree,bias", GRID)
def test_emulated_matches_cpu_kernel(path, variant, scheme, activation, degree, bias):
    """Every variant x scheme x activation, degrees 0-3: several tiles of uneven size spread
    over fewer blocks than tiles (the persistent loop), checkpointing with K = 3."""
    x, w, b, s = make(7, 5, 3, degree, bias=bias)
    cfg = (8, degree, activation, scheme, variant, 0.25, 3)
    states, grad, ref = cpu_op(x, w, b, s, cfg)
    got_states, got = emulated(x, w, b, s, cfg, grad, path, tile_rows=tile_of(path, 3), blocks=2, states=states)
    assert_ops_close([got_states, *got], [states, *ref], **F64)


@needs_emu
@pytest.mark.parametrize("variant,scheme,activation,bias,checkpoint",
                         [("standard", "rk4", "tanh", True, 1), ("symmetric", "rk4_38", "relu", True, 3),
                          ("antisymmetric", "midpoint", "softplus", False, 2), ("standard", "euler", "sigmoid", True, 4)])
def test_emulated_small_program_with_thread_teams(variant, scheme, activation, bias, checkpoint):
    """The small-width program run by teams of 3 and 7 host threads per block that meet at a
    barrier at every sync() (shared memory poisoned with NaN first): the thread-to-data
    mapping and the barriers, besides the arithmetic. Tiles of 3 rows over 2 blocks."""
    x, w, b, s = make(8, 5, 3, 2, bias=bias, seed=4)
    cfg = (6, 2, activation, scheme, variant, 0.3, checkpoint)
    states, grad, ref = cpu_op(x, w, b, s, cfg)
    for threads in (3, 7):
        got_states, got = emulated(x, w, b, s, cfg, grad, SMALL, tile_rows=3, blocks=2, states=states, threads=threads)
        assert_ops_close([got_states, *got], [states, *ref], **F64)


@needs_emu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("B,m,N,L,K", [(1, 1, 1, 1, 1), (1, 4, 3, 2, 2), (5, 1, 4, 4, 1), (3, 2, 1, 1, 4),
                                       (4, 3, 6, 2, 6), (2, 3, 7, 3, 10)])
def test_emulated_edge_shapes(path, B, m, N, L, K):
    for degree in (0, 3):
        x, w, b, s = make(B, m, L, degree, seed=B + m + N)
        cfg = (N, degree, "tanh", "rk4", "standard", 0.0, K)
        states, grad, ref = cpu_op(x, w, b, s, cfg)
        got_states, got = emulated(x, w, b, s, cfg, grad, path, states=states)
        assert_ops_close([got_states, *got], [states, *ref], **F64)


@needs_emu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("checkpoint", [1, 4])
def test_emulated_last_only_gradient(path, checkpoint):
    """dLoss/dx_N alone (the layer's usual backward) equals the full form with zeros elsewhere."""
    x, w, b, s = make(6, 4, 2, 2)
    cfg = (9, 2, "sigmoid", "midpoint", "symmetric", 0.0, checkpoint)
    states = ops.spline_dense_fwd(x, w, b, s, *cfg)
    g_last = torch.randn_like(states[-1])
    full = torch.zeros_like(states)
    full[-1] = g_last
    _, a = emulated(x, w, b, s, cfg, g_last, path, tile_rows=tile_of(path, 4), states=states)
    _, c = emulated(x, w, b, s, cfg, full, path, tile_rows=tile_of(path, 4), states=states)
    _, _, ref = cpu_op(x, w, b, s, cfg, grad=full)
    assert_ops_close(a, c, rtol=0, atol=0)
    assert_ops_close(a, ref, **F64)


@needs_emu
@pytest.mark.parametrize("path", PATHS)
def test_emulated_float32(path):
    x, w, b, s = make(9, 6, 2, 3, dtype=torch.float32)
    cfg = (12, 3, "tanh", "rk4", "standard", 0.0, 1)
    states, grad, ref = cpu_op(x, w, b, s, cfg)
    got_states, got = emulated(x, w, b, s, cfg, grad, path, states=states)
    assert_ops_close([got_states, *got], [states, *ref], **F32)


@needs_emu
@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("variant,scheme", [("standard", "rk4"), ("symmetric", "euler"), ("antisymmetric", "rk4_38")])
def test_emulated_small_path_bitwise_float64(activation, variant, scheme):
    """With one tile in one block the small-width program sums in the CPU kernel's order
    (single chunk, raw loops for m < 16, no FMA in float64), so states and every gradient
    but the scale's (summed in another order) agree bit for bit."""
    x, w, b, s = make(6, 5, 3, 2)
    cfg = (10, 2, activation, scheme, variant, 0.5, 2)
    with num_threads(1):  # one CPU chunk
        states, grad, ref = cpu_op(x, w, b, s, cfg)
    got_states, got = emulated(x, w, b, s, cfg, grad, SMALL, tile_rows=6, blocks=1)
    for name, g, r in zip(["states", "grad_x", "grad_weight", "grad_bias"], [got_states, *got[:3]], [states, *ref[:3]]):
        assert torch.equal(g, r), name
    torch.testing.assert_close(got[3], ref[3], rtol=1e-13, atol=0)


@needs_emu
@pytest.mark.parametrize("path", PATHS)
def test_emulated_noncontiguous_inputs(path):
    x, w, b, s = make(6, 4, 2, 1)
    xn = x.t().contiguous().t()  # same values, column-major
    wn = w.transpose(1, 2).contiguous().transpose(1, 2)
    bn = torch.stack([b, b], dim=-1)[..., 0]
    assert not (xn.is_contiguous() or wn.is_contiguous() or bn.is_contiguous())
    cfg = (4, 1, "tanh", "rk4", "symmetric", 0.0, 2)
    states, grad, ref = cpu_op(x, w, b, s, cfg)
    got_states, got = emulated(xn, wn, bn, s, cfg, grad.transpose(1, 2).contiguous().transpose(1, 2), path,
                               states=states.transpose(1, 2).contiguous().transpose(1, 2))
    assert_ops_close([got_states, *got], [states, *ref], **F64)


@needs_emu
@pytest.mark.parametrize("tile", [64, 128])
@pytest.mark.parametrize("degree", [0, 3])
@pytest.mark.parametrize("variant,scheme,activation", [("standard", "rk4", "tanh"), ("symmetric", "midpoint", "relu"),
                                                       ("antisymmetric", "euler", "sigmoid")])
def test_emulated_fused_gemm_ragged_tiles(tile, degree, variant, scheme, activation):
    """The fused GEMM over several ragged output tiles (B = 130 rows, m = 67 columns) and K
    slices (the weight gradients sum over the 130 batch rows), tiles spread over fewer blocks,
    run by one host thread per block (all 8 warps) and by teams of 3, 8 and 11 threads that
    play the warps between barriers, shared memory poisoned with NaN. With degree 0 W(t) is
    blended as the tiles load; with degree 3 and 2-3 row tiles it is pre-blended once
    (dense_driver.h's traffic rule); the one-row-tile tests above blend on load at every degree."""
    x, w, b, s = make(130, 67, 2, degree, seed=11)
    cfg = (3, degree, activation, scheme, variant, 0.1, 2)
    states, grad, ref = cpu_op(x, w, b, s, cfg)
    for threads in (1, 3, 8, 11):
        got_states, got = emulated(x, w, b, s, cfg, grad, FUSED, tile_rows=tile, blocks=2, states=states,
                                   threads=threads)
        assert_ops_close([got_states, *got], [states, *ref], rtol=1e-10, atol=1e-11)


@needs_emu
def test_emulated_large_width_paths_agree():
    """m = 70 > 64: auto takes the GEMM path; the small program forced on it agrees."""
    x, w, b, s = make(5, 70, 2, 1)
    cfg = (3, 1, "softplus", "euler", "symmetric", 0.0, 1)
    states, grad, ref = cpu_op(x, w, b, s, cfg)
    for path in (0, *PATHS):
        got_states, got = emulated(x, w, b, s, cfg, grad, path, states=states)
        assert_ops_close([got_states, *got], [states, *ref], rtol=1e-10, atol=1e-11)


@needs_emu
def test_emulated_ops_reject_bad_args():
    """(Their opcheck is in test_contract.py.)"""
    x, w, b, s = make(3, 4, 2, 1)
    cfg = (4, 1, "tanh", "rk4", "standard", 0.0, 2)
    with pytest.raises(ValueError, match="path"):
        emu.cuda_dense_fwd_emulated(x, w, b, s, *cfg, 4, 0, 0, 1)
    with pytest.raises(ValueError, match="tile"):
        emu.cuda_dense_fwd_emulated(x, w, b, s, *cfg, FUSED, 32, 0, 1)
    with pytest.raises(ValueError, match="weight"):
        emu.cuda_dense_fwd_emulated(x, w[:, :3], b, s, *cfg, SMALL, 0, 0, 1)
    with pytest.raises(TypeError, match="scale"):
        emu.cuda_dense_fwd_emulated(x, w, b, torch.tensor(1), *cfg, SMALL, 0, 0, 1)
    with pytest.raises(ValueError, match="threads"):
        emu.cuda_dense_fwd_emulated(x, w, b, s, *cfg, SMALL, 0, 0, 0)
    with pytest.raises(ValueError, match="shared memory"):  # one row of m = 200 needs > 100 KB
        big = make(1, 200, 1, 0)
        emu.cuda_dense_fwd_emulated(*big, 1, 0, "tanh", "euler", "standard", 0.0, 1, SMALL, 0, 0, 1)


@needs_emu
@pytest.mark.parametrize("path", PATHS)
def test_emulated_accepts_scale_of_another_dtype(path):
    """A scale whose dtype differs from x's (as the Python validator allows) is taken by the
    CUDA driver as by the CPU op: lam in x's dtype, its gradient returned in the scale's."""
    x, w, b, _ = make(5, 4, 2, 2, dtype=torch.float32)
    cfg = (6, 2, "tanh", "rk4", "standard", 0.0, 2)
    for s in (torch.tensor(1.3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float16)):
        states, grad, ref = cpu_op(x, w, b, s, cfg)
        got_states, got = emulated(x, w, b, s, cfg, grad, path, tile_rows=tile_of(path, 2), states=states)
        assert ref[3].dtype == got[3].dtype == s.dtype
        assert_ops_close([got_states, *got], [states, *ref], **F32)
    for op in (lambda s: ops.spline_dense_fwd(x, w, b, s, *cfg),
               lambda s: emu.cuda_dense_fwd_emulated(x, w, b, s, *cfg, path, tile_of(path, 2), 0, 1)):
        with pytest.raises(TypeError, match="scale"):
            op(torch.tensor(2))


@needs_emu
@pytest.mark.parametrize("B,blocks,threads", [(37, 8, 4), (20, 16, 1), (5, 32, 3)])
def test_emulated_small_rows_spread_over_multiprocessors(B, blocks, threads):
    """The small path's automatic tile rows (tile_rows = 0) on a grid of `blocks` blocks that
    plays a device of as many multiprocessors: ceil(B / blocks) rows per tile, so a small batch
    reaches every block, with teams of host threads; against the CPU kernel."""
    x, w, b, s = make(B, 4, 3, 3, seed=B)
    cfg = (9, 3, "softplus", "rk4", "symmetric", 0.0, 4)
    states, grad, ref = cpu_op(x, w, b, s, cfg)
    got_states, got = emulated(x, w, b, s, cfg, grad, SMALL, blocks=blocks, states=states, threads=threads)
    assert_ops_close([got_states, *got], [states, *ref], **F64)


# --------------------------------------------------------------------------- on a GPU


@needs_gpu
@pytest.mark.parametrize("m", [4, 48, 96])
@pytest.mark.parametrize("variant,scheme,activation", [("standard", "rk4", "tanh"), ("symmetric", "euler", "relu"),
                                                       ("antisymmetric", "midpoint", "softplus")])
def test_cuda_matches_cpu_kernel(m, variant, scheme, activation):
    x, w, b, s = make(37, m, 3, 3)
    cfg = (7, 3, activation, scheme, variant, 0.2, 2)
    states, grad, ref = cpu_op(x, w, b, s, cfg)
    dev = [t.cuda() for t in (x, w, b, s)]
    got_states = ops.spline_dense_fwd(*dev, *cfg)
    got = ops.spline_dense_bwd(grad.cuda(), states.cuda(), *dev[1:], *cfg)
    assert_ops_close([t.cpu() for t in (got_states, *got)], [states, *ref], rtol=1e-10, atol=1e-11)


@needs_gpu
@pytest.mark.parametrize("degree", [2, 3])
def test_cuda_basis_table_bitwise(degree):
    """The device basis (csrc/common/bspline.h) equals the CPU's bit for bit at thousands of
    times: with contracted multiply-adds it differed in the last bit at 15% (d = 2) and 39%
    (d = 3) of times."""
    g = torch.Generator().manual_seed(degree)
    t = torch.cat([torch.rand(8192, generator=g, dtype=torch.float64), torch.linspace(0, 1, 4097, dtype=torch.float64)])
    for knots in (3, 7, 64):
        k, w = ops.basis_table(t, knots, degree)
        kc, wc = ops.basis_table(t.cuda(), knots, degree)
        assert torch.equal(kc.cpu(), k) and torch.equal(wc.cpu(), w), f"knots = {knots}"


@needs_gpu
@pytest.mark.parametrize("degree", [2, 3])
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_cuda_bitwise_float64(activation, degree):
    """One tile (B <= TB) in one block: the GPU kernel sums in the CPU kernel's order and
    never fuses a float64 multiply-add, so it matches the CPU backend bit for bit; 1000 rk4
    steps over 7 knot intervals evaluate the basis at 4000 stage times."""
    x, w, b, s = make(6, 5, 7, degree)
    cfg = (1000, degree, activation, "rk4", "standard", 0.0, 1)
    with num_threads(1):
        states, grad, ref = cpu_op(x, w, b, s, cfg)
    dev = [t.cuda() for t in (x, w, b, s)]
    got_states = ops.spline_dense_fwd(*dev, *cfg)
    got = ops.spline_dense_bwd(grad.cuda(), states.cuda(), *dev[1:], *cfg)
    for name, g, r in zip(["states", "grad_x", "grad_weight", "grad_bias"], [got_states, *got[:3]], [states, *ref[:3]]):
        assert torch.equal(g.cpu(), r), name


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [8, 64, 256])
def test_cuda_half_precision(dtype, m):
    """bf16/fp16 storage with float32 accumulation against the float64 reference."""
    x, w, b, s = make(64, m, 4, 3)
    kw = dict(steps=16, degree=3, activation="tanh", scheme="euler")
    ref_args = [t.cuda().requires_grad_() for t in (x, w, b, s)]
    args = [t.to(dtype).cuda().requires_grad_() for t in (x, w, b, s)]
    y_ref = sc.spline_ode(*ref_args, backend="reference", **kw)
    y = sc.spline_ode(*args, backend="cuda", **kw)
    probe = torch.randn_like(y_ref)
    y_ref.backward(probe)
    y.backward(probe.to(dtype))
    tol = HALF_TOL[dtype]
    torch.testing.assert_close(y.double(), y_ref.detach(), **tol)
    assert_all_close_scaled([a.grad for a in args], [r.grad for r in ref_args], ["grad x", "grad weight", "grad bias",
                                                                                 "grad scale"], **tol)


@needs_gpu
@pytest.mark.parametrize("gemm", ["fused", "cublas"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant,scheme,activation", [("standard", "rk4", "tanh"), ("symmetric", "euler", "relu"),
                                                       ("antisymmetric", "midpoint", "softplus")])
def test_cuda_large_width_gemm_paths(monkeypatch, gemm, dtype, variant, scheme, activation):
    """m = 200 > 64 (ragged against both GEMM tiles), B = 300: the bf16/fp16 large path through
    the fused blended GEMM (tensor cores) and through cuBLAS, chosen with SPLINET_DENSE_GEMM,
    against the float64 CPU kernel; float32/float64 take cuBLAS whatever the variable says
    (the fused GEMM is not built for them on the GPU)."""
    monkeypatch.setenv("SPLINET_DENSE_GEMM", gemm)
    x, w, b, s = make(300, 200, 3, 3)
    cfg = (5, 3, activation, scheme, variant, 0.2, 2)
    states, grad, ref = cpu_op(x, w, b, s, cfg)
    dev = [t.to(dtype).cuda() for t in (x, w, b, s)]
    got_states = ops.spline_dense_fwd(*dev, *cfg)
    got = ops.spline_dense_bwd(grad.to(dtype).cuda(), states.to(dtype).cuda(), *dev[1:], *cfg)
    tol = {**TOL, torch.float32: dict(rtol=1e-4, atol=1e-4)}[dtype]
    assert_all_close_scaled([got_states, *got], [states, *ref], OP_RESULTS, **tol)


@needs_gpu
def test_cuda_gemm_env_rejects_unknown(monkeypatch):
    monkeypatch.setenv("SPLINET_DENSE_GEMM", "cutlass")
    x, w, b, s = [t.cuda() for t in make(4, 100, 2, 1)]
    with pytest.raises(ValueError, match="SPLINET_DENSE_GEMM"):
        ops.spline_dense_fwd(x, w, b, s, 2, 1, "tanh", "euler", "standard", 0.0, 1)


@needs_emu
@pytest.mark.parametrize("tile", [64, 128])
@pytest.mark.parametrize("variant", VARIANTS)
def test_emulated_split_k_weight_gradient(tile, variant):
    """Weight gradients with fewer output tiles than multiprocessors (m = 67: 4 tiles of 64,
    1 of 128; 16 multiprocessors) split the batch (K = 300) into K-slices of whole BK
    slices, the last one ragged, and add the slices' partials in slice order: the same
    gradients as the CPU kernel, bit for bit the same on every run and for every team of
    host threads, and (a different summation order) not bit for bit those of the unsplit
    product on 1 multiprocessor, which shows the split ran."""
    x, w, b, s = make(300, 67, 2, 2, seed=5)
    cfg = (3, 2, "tanh", "midpoint", variant, 0.1, 2)
    states, grad, ref = cpu_op(x, w, b, s, cfg)
    runs = [emulated(x, w, b, s, cfg, grad, FUSED, tile_rows=tile, blocks=16, states=states, threads=t)[1]
            for t in (1, 1, 8)]
    assert_ops_close([states, *runs[0]], [states, *ref], rtol=1e-10, atol=1e-11)
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert torch.equal(a, c)
    unsplit = emulated(x, w, b, s, cfg, grad, FUSED, tile_rows=tile, blocks=1, states=states)[1]
    assert_ops_close([states, *unsplit], [states, *ref], rtol=1e-10, atol=1e-11)
    assert not torch.equal(unsplit[1], runs[0][1])
