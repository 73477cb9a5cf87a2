"""Triton kernels of the dense SpliNet layer (forward with the explicit Runge-Kutta schemes and
the fused adjoint of SpliNet paper eqs. 17-23), two paths chosen by width:

* m <= TRAJECTORY_MAX_WIDTH (64; 32 in some cases, see ``trajectory_max_width``): this
  module's trajectory kernel, which walks all N steps of a batch tile with the state in registers, and its adjoint kernel that walks back
  N-1 .. 0 with the eq. 23 accumulation of coefficient gradients (below).
* wider layers: the GEMM path of ``dense_gemm.py``, per-stage tiled GEMMs with the weight
  tile blended from the d + 1 coefficient tiles inside the K loop, the bias / activation /
  RK update fused in their epilogues, and an eq. 23 kernel that scatters each G^T X_s tile
  into the coefficient slots; ``FORCE_PATH`` forces either path (tests).

Legend: B batch, m width, n = L + d coefficients, d degree, N steps, S stages of the
scheme, K checkpoint interval, BB / BM the batch / width tile (BM = pow2 >= 16, >= m).

* Basis: the caller passes the basis table of the whole grid (``TimeGrid``: splinet_cuda
  computes it with ``basis_grid``, exactly what bspline.h computes; this package imports
  nothing of splinet_cuda), copied to the device once as int32 first coefficients k and
  d + 1 weights per step and stage; the kernels blend W(t) and b(t) from the d + 1
  coefficient tiles at every stage (eq. 14), never a per-step weight tensor.
* Forward (``_dense_fwd_kernel``): one program per batch tile, x in registers, every
  stage a = X W^T + b (tl.dot), act, f = act (standard) or -act W (symmetric), the RK
  update; writes the saved states (x_0, x_K, x_2K, ... below N, and x_N), the same
  convention as the C++ ops.
* Adjoint (``_dense_bwd_kernel``): persistent programs over batch tiles; per segment of
  K steps it recomputes the states from the saved one into a per-program workspace, then
  walks back recomputing each step's stages and applying the general explicit-RK adjoint.
  Coefficient gradients go to per-program partial buffers (P, n, m, m) / (P, n, m) / (P,)
  that the launcher sums in a fixed order, so gradients are deterministic.

The launchers take ``wrap``: identity for plain launches / torch.library.custom_op, or
``torch.library.wrap_triton`` inside a ``torch.library.triton_op``.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (ACT_IDS, INTERPRET, VARIANT_IDS, act_bwd, act_fwd, basis_tables, compute_dtype,
                      device_guard, dot_precision, num_saved_states, tableau_constexprs, TimeGrid)
from .dense_gemm import gemm_backward, gemm_forward

__all__ = ["dense_forward", "dense_backward", "dense_blocks", "trajectory_options", "uses_gemm",
           "TRAJECTORY_MAX_WIDTH"]

# Widest m the trajectory kernel takes: its blended m x m tiles (padded to a power of two)
# live in registers / shared memory, ~172 KB at m = 128. Wider layers take the GEMM path.
TRAJECTORY_MAX_WIDTH = 64

# Tests only: "trajectory" or "gemm" forces a path regardless of the width.
FORCE_PATH: Optional[str] = None

# Cap on the elements of the per-program partial weight gradients (P n m^2).
_PARTIAL_ELEMENTS = 1 << 25


# --------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------

@triton.jit
def _blend_w(w_ptr, kt_ptr, wt_ptr, idx, gamma, M, rows, cols, DP1: tl.constexpr, VARIANT: tl.constexpr,
             CT: tl.constexpr, BLOCK_M: tl.constexpr):
    """W of stage idx (out x in tile), blended from the d + 1 coefficients (eq. 14);
    A = W - W^T - gamma I for the antisymmetric variant."""
    k = tl.load(kt_ptr + idx).to(tl.int64)
    mm = M * M
    mask = (rows[:, None] < M) & (cols[None, :] < M)
    W = tl.zeros((BLOCK_M, BLOCK_M), CT)
    WT = tl.zeros((BLOCK_M, BLOCK_M), CT)
    for r in tl.static_range(DP1):
        c = tl.load(wt_ptr + idx * DP1 + r).to(CT)
        base = w_ptr + (k + r) * mm
        W += c * tl.load(base + rows[:, None] * M + cols[None, :], mask=mask, other=0.0).to(CT)
        if VARIANT == 2:
            WT += c * tl.load(base + cols[None, :] * M + rows[:, None], mask=mask, other=0.0).to(CT)
    if VARIANT == 2:
        eye = (rows[:, None] == cols[None, :]) & mask
        W = W - WT - tl.where(eye, gamma, 0.0).to(CT)
    return W


@triton.jit
def _blend_b(b_ptr, kt_ptr, wt_ptr, idx, M, cols, DP1: tl.constexpr, CT: tl.constexpr, BLOCK_M: tl.constexpr):
    k = tl.load(kt_ptr + idx).to(tl.int64)
    b = tl.zeros((BLOCK_M,), CT)
    for r in tl.static_range(DP1):
        c = tl.load(wt_ptr + idx * DP1 + r).to(CT)
        b += c * tl.load(b_ptr + (k + r) * M + cols, mask=cols < M, other=0.0).to(CT)
    return b


@triton.jit
def _stage(xs, idx, w_ptr, b_ptr, kt_ptr, wt_ptr, lam, gamma, M, wrows, cols,
           DP1: tl.constexpr, ACT: tl.constexpr, VARIANT: tl.constexpr, HAS_BIAS: tl.constexpr,
           CT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    """One stage: returns (K = lam f(xs), pre-activation a, act(a))."""
    W = _blend_w(w_ptr, kt_ptr, wt_ptr, idx, gamma, M, wrows, cols, DP1, VARIANT, CT, BLOCK_M)
    a = tl.dot(xs, tl.trans(W), input_precision=PREC, out_dtype=CT).to(CT)
    if HAS_BIAS:
        a += _blend_b(b_ptr, kt_ptr, wt_ptr, idx, M, cols, DP1, CT, BLOCK_M)[None, :]
    y = act_fwd(a, ACT)
    y = tl.where((cols < M)[None, :], y, 0.0).to(CT)  # keep the padded columns at zero
    if VARIANT == 1:
        f = -tl.dot(y, W, input_precision=PREC, out_dtype=CT).to(CT)
    else:
        f = y
    return lam * f, a, y


@triton.jit
def _step(x, i, w_ptr, b_ptr, kt_ptr, wt_ptr, lam, gamma, h, M, wrows, cols,
          DP1: tl.constexpr, S: tl.constexpr,
          A10: tl.constexpr, A20: tl.constexpr, A21: tl.constexpr,
          A30: tl.constexpr, A31: tl.constexpr, A32: tl.constexpr,
          B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
          ACT: tl.constexpr, VARIANT: tl.constexpr, HAS_BIAS: tl.constexpr,
          CT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    """One explicit RK step from x (step i). Returns x_{i+1} and every stage's input X_s,
    pre-activation A_s and activation Y_s (zeros for s >= S)."""
    zero = tl.zeros_like(x)
    X1 = zero
    A1 = zero
    Y1 = zero
    K1 = zero
    X2 = zero
    A2 = zero
    Y2 = zero
    K2 = zero
    X3 = zero
    A3 = zero
    Y3 = zero
    K3 = zero
    X0 = x
    K0, A0, Y0 = _stage(X0, i * S, w_ptr, b_ptr, kt_ptr, wt_ptr, lam, gamma, M, wrows, cols,
                        DP1, ACT, VARIANT, HAS_BIAS, CT, PREC, BLOCK_M)
    if S > 1:
        X1 = x + (A10 * h) * K0
        K1, A1, Y1 = _stage(X1, i * S + 1, w_ptr, b_ptr, kt_ptr, wt_ptr, lam, gamma, M, wrows, cols,
                            DP1, ACT, VARIANT, HAS_BIAS, CT, PREC, BLOCK_M)
    if S > 2:
        X2 = x
        if A20 != 0.0:
            X2 = X2 + (A20 * h) * K0
        if A21 != 0.0:
            X2 = X2 + (A21 * h) * K1
        K2, A2, Y2 = _stage(X2, i * S + 2, w_ptr, b_ptr, kt_ptr, wt_ptr, lam, gamma, M, wrows, cols,
                            DP1, ACT, VARIANT, HAS_BIAS, CT, PREC, BLOCK_M)
    if S > 3:
        X3 = x
        if A30 != 0.0:
            X3 = X3 + (A30 * h) * K0
        if A31 != 0.0:
            X3 = X3 + (A31 * h) * K1
        if A32 != 0.0:
            X3 = X3 + (A32 * h) * K2
        K3, A3, Y3 = _stage(X3, i * S + 3, w_ptr, b_ptr, kt_ptr, wt_ptr, lam, gamma, M, wrows, cols,
                            DP1, ACT, VARIANT, HAS_BIAS, CT, PREC, BLOCK_M)
    acc = zero
    if B0 != 0.0:
        acc += B0 * K0
    if S > 1:
        if B1 != 0.0:
            acc += B1 * K1
    if S > 2:
        if B2 != 0.0:
            acc += B2 * K2
    if S > 3:
        if B3 != 0.0:
            acc += B3 * K3
    xn = x + h * acc
    return xn, X0, A0, Y0, X1, A1, Y1, X2, A2, Y2, X3, A3, Y3


@triton.jit
def _stage_adjoint(kbar, Xs, A, Y, idx, glam, w_ptr, kt_ptr, wt_ptr, pw_ptr, pb_ptr, lam, gamma, M, wrows, cols,
                   DP1: tl.constexpr, ACT: tl.constexpr, VARIANT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   CT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    """Adjoint of one stage given kbar = dL/dK_s: returns (dL/dX_s, glam accumulator) and adds
    the stage's weight / bias gradients to the d + 1 coefficient slots (eq. 23)."""
    W = _blend_w(w_ptr, kt_ptr, wt_ptr, idx, gamma, M, wrows, cols, DP1, VARIANT, CT, BLOCK_M)
    if VARIANT == 1:  # K = -lam act(a) W: V = dL/d(lam act(a)) = -kbar W^T
        V = -tl.dot(kbar, tl.trans(W), input_precision=PREC, out_dtype=CT).to(CT)
    else:
        V = kbar
    glam += Y * V
    G = lam * act_bwd(A, Y, ACT) * V
    Xbar = tl.dot(G, W, input_precision=PREC, out_dtype=CT).to(CT)
    dW = tl.dot(tl.trans(G), Xs, input_precision=PREC, out_dtype=CT).to(CT)
    if VARIANT == 1:
        dW -= lam * tl.dot(tl.trans(Y), kbar, input_precision=PREC, out_dtype=CT).to(CT)
    if VARIANT == 2:  # A = W - W^T - gamma I
        dW = dW - tl.trans(dW)
    # eq. 23: scatter into the d + 1 slots k .. k + d of this program's partial buffers.
    k = tl.load(kt_ptr + idx).to(tl.int64)
    mm = M * M
    mask = (wrows[:, None] < M) & (cols[None, :] < M)
    woffs = wrows[:, None] * M + cols[None, :]
    if HAS_BIAS:
        gb = tl.sum(G, axis=0)
    for r in tl.static_range(DP1):
        c = tl.load(wt_ptr + idx * DP1 + r).to(CT)
        p = pw_ptr + (k + r) * mm + woffs
        tl.store(p, tl.load(p, mask=mask, other=0.0) + c * dW, mask=mask)
        if HAS_BIAS:
            q = pb_ptr + (k + r) * M + cols
            tl.store(q, tl.load(q, mask=cols < M, other=0.0) + c * gb, mask=cols < M)
        # The next read-modify-write of a slot may come from other threads of the program.
        tl.debug_barrier()
    return Xbar, glam


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------

# Integers that change from call to call (batch, steps, checkpoint and segment counts) are
# not specialised: Triton would otherwise compile a kernel for the value 1, one for multiples
# of 16 and one for the rest. The width M is a layer constant and keeps its specialisation.
@triton.jit(do_not_specialize=["B", "N", "CK"])
def _dense_fwd_kernel(x_ptr, w_ptr, b_ptr, scale_ptr, par_ptr, kt_ptr, wt_ptr, out_ptr,
                      B, M, N, CK,
                      DP1: tl.constexpr, S: tl.constexpr,
                      A10: tl.constexpr, A20: tl.constexpr, A21: tl.constexpr,
                      A30: tl.constexpr, A31: tl.constexpr, A32: tl.constexpr,
                      B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
                      ACT: tl.constexpr, VARIANT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      CT: tl.constexpr, PREC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_M)
    wrows = tl.arange(0, BLOCK_M)
    mask = (rows < B)[:, None] & (cols < M)[None, :]
    offs = rows.to(tl.int64)[:, None] * M + cols[None, :]
    BMs = tl.cast(B, tl.int64) * M
    lam = tl.load(scale_ptr).to(CT)
    gamma = tl.load(par_ptr).to(CT)
    h = tl.load(par_ptr + 1).to(CT)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(CT)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)
    for i in range(N):
        res = _step(x, i, w_ptr, b_ptr, kt_ptr, wt_ptr, lam, gamma, h, M, wrows, cols,
                    DP1, S, A10, A20, A21, A30, A31, A32, B0, B1, B2, B3, ACT, VARIANT, HAS_BIAS, CT, PREC, BLOCK_M)
        x = res[0]
        # x_{i+1} is saved when K divides i + 1 or i + 1 = N, in slot ceil((i + 1) / K).
        if ((i + 1) % CK == 0) | (i + 1 == N):
            slot = tl.cast((i + CK) // CK, tl.int64)
            tl.store(out_ptr + slot * BMs + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["B", "N", "CK", "NS", "NSEG", "NCOEF", "NTILES", "KSEG"])
def _dense_bwd_kernel(gs_ptr, st_ptr, w_ptr, b_ptr, scale_ptr, par_ptr, kt_ptr, wt_ptr,
                      gx_ptr, pw_ptr, pb_ptr, pl_ptr, ws_ptr,
                      B, M, N, CK, NS, NSEG, NCOEF, NTILES, KSEG,
                      DP1: tl.constexpr, S: tl.constexpr,
                      A10: tl.constexpr, A20: tl.constexpr, A21: tl.constexpr,
                      A30: tl.constexpr, A31: tl.constexpr, A32: tl.constexpr,
                      B0: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr,
                      ACT: tl.constexpr, VARIANT: tl.constexpr, HAS_BIAS: tl.constexpr, SAVED_ALL: tl.constexpr,
                      LAST_ONLY: tl.constexpr, CT: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    lrows = tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_M)
    wrows = tl.arange(0, BLOCK_M)
    BMs = tl.cast(B, tl.int64) * M
    lam = tl.load(scale_ptr).to(CT)
    gamma = tl.load(par_ptr).to(CT)
    h = tl.load(par_ptr + 1).to(CT)
    pid64 = tl.cast(pid, tl.int64)
    pw = pw_ptr + pid64 * NCOEF * M * M
    pb = pb_ptr + pid64 * NCOEF * M
    ws = ws_ptr + pid64 * KSEG * (BLOCK_B * BLOCK_M) + lrows[:, None] * BLOCK_M + cols[None, :]
    glam = tl.zeros((BLOCK_B, BLOCK_M), CT)
    for tile in range(pid, NTILES, P):
        rows = tile * BLOCK_B + lrows
        mask = (rows < B)[:, None] & (cols < M)[None, :]
        offs = rows.to(tl.int64)[:, None] * M + cols[None, :]
        if LAST_ONLY:  # gs holds dL/dx_N alone
            z = tl.load(gs_ptr + offs, mask=mask, other=0.0).to(CT)
        else:
            z = tl.load(gs_ptr + tl.cast(NS - 1, tl.int64) * BMs + offs, mask=mask, other=0.0).to(CT)
        for t in range(NSEG):
            seg = NSEG - 1 - t
            i0 = seg * CK
            i1 = tl.minimum(i0 + CK, N)
            if not SAVED_ALL:
                # Recompute the segment's states from its saved state into the workspace.
                x = tl.load(st_ptr + tl.cast(seg, tl.int64) * BMs + offs, mask=mask, other=0.0).to(CT)
                tl.store(ws, x)
                for j in range(1, i1 - i0):
                    res = _step(x, i0 + j - 1, w_ptr, b_ptr, kt_ptr, wt_ptr, lam, gamma, h, M, wrows, cols,
                                DP1, S, A10, A20, A21, A30, A31, A32, B0, B1, B2, B3, ACT, VARIANT, HAS_BIAS, CT,
                                PREC, BLOCK_M)
                    x = res[0]
                    tl.store(ws + j * (BLOCK_B * BLOCK_M), x)
                tl.debug_barrier()
            for q in range(i1 - i0):
                i = i1 - 1 - q
                if SAVED_ALL:
                    x = tl.load(st_ptr + tl.cast(i, tl.int64) * BMs + offs, mask=mask, other=0.0).to(CT)
                else:
                    x = tl.load(ws + (i - i0) * (BLOCK_B * BLOCK_M))
                xn, X0, A0, Y0, X1, A1, Y1, X2, A2, Y2, X3, A3, Y3 = _step(
                    x, i, w_ptr, b_ptr, kt_ptr, wt_ptr, lam, gamma, h, M, wrows, cols,
                    DP1, S, A10, A20, A21, A30, A31, A32, B0, B1, B2, B3, ACT, VARIANT, HAS_BIAS, CT, PREC, BLOCK_M)
                # Stages last to first: kbar_s = h b_s z + h sum_{q > s} a_qs Xbar_q.
                zero = tl.zeros_like(z)
                Xb1 = zero
                Xb2 = zero
                Xb3 = zero
                if S > 3:
                    kb = (B3 * h) * z
                    Xb3, glam = _stage_adjoint(kb, X3, A3, Y3, i * S + 3, glam, w_ptr, kt_ptr, wt_ptr, pw, pb, lam,
                                               gamma, M, wrows, cols, DP1, ACT, VARIANT, HAS_BIAS, CT, PREC, BLOCK_M)
                if S > 2:
                    kb = (B2 * h) * z
                    if S > 3:
                        kb += (A32 * h) * Xb3
                    Xb2, glam = _stage_adjoint(kb, X2, A2, Y2, i * S + 2, glam, w_ptr, kt_ptr, wt_ptr, pw, pb, lam,
                                               gamma, M, wrows, cols, DP1, ACT, VARIANT, HAS_BIAS, CT, PREC, BLOCK_M)
                if S > 1:
                    kb = (B1 * h) * z
                    if S > 2:
                        kb += (A21 * h) * Xb2
                    if S > 3:
                        kb += (A31 * h) * Xb3
                    Xb1, glam = _stage_adjoint(kb, X1, A1, Y1, i * S + 1, glam, w_ptr, kt_ptr, wt_ptr, pw, pb, lam,
                                               gamma, M, wrows, cols, DP1, ACT, VARIANT, HAS_BIAS, CT, PREC, BLOCK_M)
                kb = (B0 * h) * z
                if S > 1:
                    kb += (A10 * h) * Xb1
                if S > 2:
                    kb += (A20 * h) * Xb2
                if S > 3:
                    kb += (A30 * h) * Xb3
                Xb0, glam = _stage_adjoint(kb, X0, A0, Y0, i * S, glam, w_ptr, kt_ptr, wt_ptr, pw, pb, lam,
                                           gamma, M, wrows, cols, DP1, ACT, VARIANT, HAS_BIAS, CT, PREC, BLOCK_M)
                z = z + Xb0
                if S > 1:
                    z += Xb1
                if S > 2:
                    z += Xb2
                if S > 3:
                    z += Xb3
                # dL/dx_i also gets the loss gradient of x_i when x_i is a saved state.
                if not LAST_ONLY:
                    if i % CK == 0:
                        z += tl.load(gs_ptr + tl.cast(i // CK, tl.int64) * BMs + offs, mask=mask,
                                     other=0.0).to(CT)
            if not SAVED_ALL:
                tl.debug_barrier()  # the workspace is rewritten by the next segment
        tl.store(gx_ptr + offs, z.to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(pl_ptr + pid, tl.sum(tl.sum(glam, axis=1), axis=0))


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------

def trajectory_max_width(dtype: Optional[torch.dtype] = None, variant: str = "standard") -> int:
    """Widest m the trajectory kernels take: TRAJECTORY_MAX_WIDTH (bfloat16 / float16), and 32
    for float32 and float64. Their adjoints at BM = 64 (every stage's tiles and the 64 x 64
    weight and gradient tiles, products on FMA units: float32 is multiplied exactly, not on
    tensor cores) spill 300-590 B (float32, rk4 / rk4_38 at degree 3) and 1 KB (float64) per
    thread even with 8 warps (16 warps cap the registers at 128 and spill more)."""
    if not INTERPRET and dtype in (torch.float64, torch.float32):
        return min(32, TRAJECTORY_MAX_WIDTH)
    return TRAJECTORY_MAX_WIDTH


def uses_gemm(m: int, dtype: Optional[torch.dtype] = None, variant: str = "standard") -> bool:
    """Whether width m takes the GEMM path (m > trajectory_max_width(dtype, variant), or as
    FORCE_PATH says)."""
    if FORCE_PATH is not None:
        if FORCE_PATH not in ("trajectory", "gemm"):
            raise ValueError(f"FORCE_PATH must be None, 'trajectory' or 'gemm', got {FORCE_PATH!r}")
        return FORCE_PATH == "gemm"
    return m > trajectory_max_width(dtype, variant)


def dense_blocks(B: int, m: int, dtype: Optional[torch.dtype] = None) -> Tuple[int, int]:
    """(BLOCK_B, BLOCK_M): BM = pow2 >= max(16, m) (tl.dot needs >= 16); BB = 16 .. 64
    (16 in float64: the adjoint keeps every stage's input, pre-activation and activation
    tile live, in registers of twice the size)."""
    BM = max(16, triton.next_power_of_2(max(m, 1)))
    if INTERPRET:  # fewer, larger programs run faster in the interpreter
        BB = max(16, min(64, triton.next_power_of_2(max(B, 1))))
    else:
        BB = 16 if BM >= 64 or dtype == torch.float64 else 32
    return BB, BM


def trajectory_options(BM: int, dtype: torch.dtype) -> dict:
    """num_warps / num_stages of the trajectory kernels for width tile BM.

    No software pipelining (num_stages=1): the step loop is a chain of dependent stages, so
    prefetching the next iteration's weight tiles buys little, and Triton's default (3 stages)
    keeps that many copies of the d + 1 blended BM x BM tiles in shared memory, up to 1.09 MB
    at BM = 64 in float64 (Hopper allows 227 KB per block). 8 warps from BM = 64, and from
    BM = 32 in float64 (4 for narrower tiles): the BM x BM weight tile and the stage tiles of
    the adjoint then fit the 255 registers per thread."""
    return dict(num_warps=8 if BM >= 64 or (dtype == torch.float64 and BM >= 32) else 4, num_stages=1)


def _common_meta(x_dtype, degree, activation, tableau, variant, has_bias, BB, BM) -> dict:
    meta = dict(DP1=degree + 1, ACT=ACT_IDS[activation], VARIANT=VARIANT_IDS[variant], HAS_BIAS=has_bias,
                CT=compute_dtype(x_dtype), PREC=dot_precision(x_dtype), BLOCK_B=BB, BLOCK_M=BM)
    meta.update(tableau_constexprs(tableau))
    meta.update(trajectory_options(BM, x_dtype))
    return meta


def _identity(kernel):
    return kernel


def _ctype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dense_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor,
                  steps: int, degree: int, activation: str, scheme: str, variant: str, gamma: float,
                  checkpoint: int, *, grid: TimeGrid, wrap: Callable = _identity) -> torch.Tensor:
    """All N steps; returns the saved states (num_saved_states(N, K), B, m). ``grid``: the
    scheme's tableau and the basis at every step and stage (see TimeGrid)."""
    B, m = x.shape
    n = weight.shape[0]
    x = x.contiguous()
    weight = weight.contiguous()
    bias_c = bias.contiguous() if bias is not None else weight  # dummy pointer without bias
    ct = _ctype(x.dtype)
    kt, wt, par = basis_tables(steps, n, degree, scheme, gamma, ct, x.device, grid)
    states = torch.empty((num_saved_states(steps, checkpoint), B, m), dtype=x.dtype, device=x.device)
    if B == 0 or m == 0:
        return states
    with device_guard(x):
        if uses_gemm(m, x.dtype, variant):
            states[0].copy_(x)
            return gemm_forward(x, weight, bias.contiguous() if bias is not None else None, scale, kt, wt, par,
                                states, steps, degree, activation, grid.tableau, variant, checkpoint, wrap=wrap)
        BB, BM = dense_blocks(B, m, x.dtype)
        wrap(_dense_fwd_kernel)[(triton.cdiv(B, BB),)](
            x, weight, bias_c, scale, par, kt, wt, states, B, m, steps, checkpoint,
            **_common_meta(x.dtype, degree, activation, grid.tableau, variant, bias is not None, BB, BM))
    return states


def dense_backward(grad_states: torch.Tensor, states: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor], scale: torch.Tensor, steps: int, degree: int, activation: str,
                   scheme: str, variant: str, gamma: float, checkpoint: int, *, grid: TimeGrid,
                   wrap: Callable = _identity) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The adjoint sweep: (grad_x, grad_weight, grad_bias or empty (0,), grad_scale).
    ``grad_states``: dL/d(saved states), the shape of ``states``, or dL/dx_N alone (one state)."""
    NS, B, m = states.shape
    n = weight.shape[0]
    states = states.contiguous()
    last_only = grad_states.shape == states.shape[1:]
    grad_states = grad_states.to(states.dtype).contiguous()
    weight = weight.contiguous()
    has_bias = bias is not None
    bias_c = bias.contiguous() if has_bias else weight
    ct = _ctype(states.dtype)
    kt, wt, par = basis_tables(steps, n, degree, scheme, gamma, ct, states.device, grid)
    if B > 0 and m > 0 and uses_gemm(m, states.dtype, variant):
        with device_guard(states):
            z, gw, gb, pl = gemm_backward(grad_states, last_only, states, weight, bias_c if has_bias else None, scale,
                                          kt, wt, par, steps, degree, activation, grid.tableau, variant,
                                          checkpoint, wrap=wrap)
        return (z.to(states.dtype), gw.to(weight.dtype), gb.to(bias.dtype) if has_bias else states.new_empty((0,)),
                pl.to(torch.float64).sum().to(scale.dtype).reshape(scale.shape))
    BB, BM = dense_blocks(B, m, states.dtype)
    ntiles = triton.cdiv(B, BB) if B > 0 else 0
    P = max(1, min(ntiles, _PARTIAL_ELEMENTS // max(1, n * m * m)))
    kseg = min(checkpoint, steps)
    saved_all = checkpoint == 1
    pw = torch.zeros((P, n, m, m), dtype=ct, device=states.device)
    pb = torch.zeros((P, n, m) if has_bias else (P, 1, 1), dtype=ct, device=states.device)
    pl = torch.zeros((P,), dtype=ct, device=states.device)
    ws = torch.empty((P * kseg * BB * BM,) if not saved_all else (1,), dtype=ct, device=states.device)
    grad_x = torch.empty((B, m), dtype=states.dtype, device=states.device)
    if ntiles > 0 and m > 0:
        nseg = triton.cdiv(steps, checkpoint)
        with device_guard(states):
            wrap(_dense_bwd_kernel)[(P,)](grad_states, states, weight, bias_c, scale, par, kt, wt,
                                          grad_x, pw, pb, pl, ws, B, m, steps, checkpoint, NS, nseg, n, ntiles, kseg,
                                          SAVED_ALL=saved_all, LAST_ONLY=last_only,
                                          **_common_meta(states.dtype, degree, activation, grid.tableau, variant,
                                                         has_bias, BB, BM))
    # Fixed-order reductions of the per-program partials: deterministic.
    grad_w = pw.sum(0).to(weight.dtype)
    grad_b = pb.sum(0).to(bias.dtype) if has_bias else states.new_empty((0,))
    grad_scale = pl.to(torch.float64).sum().to(scale.dtype).reshape(scale.shape)
    return grad_x, grad_w, grad_b, grad_scale
