"""Large-width path of the dense SpliNet layer (forward with the explicit Runge-Kutta schemes
and the fused adjoint of SpliNet paper eqs. 17-23): tiled GEMM kernels that
blend the weight tile from the d + 1 nonzero coefficient tiles inside their K loop
(eq. 14), launched per stage by a host loop over the steps. ``dense.py`` picks this path
above ``dense.GEMM_MIN_WIDTH``, where the trajectory kernel's m x m tiles no longer fit.

Legend: B batch, m width, n = L + d coefficients, d degree, N steps, S stages of the
scheme, K checkpoint interval; BB / BN / BK the batch / output / reduction tiles.

* ``_gemm_kernel``: out = epilogue(prologue(X) @ T) over a (BB x BN) tile, K loop over
  BK columns. T is the effective weight A (W, or W - W^T - gamma I for the antisymmetric
  variant) or its transpose, each K tile blended as sum_r w_r weight[k + r] from the d + 1
  coefficient tiles (and their transposes for A). Prologue: X = x + h sum_j a_sj K_j (the
  RK stage input, formed as the tiles load). Epilogues: bias, activation, K_s = lam act(a)
  or -lam (.) (symmetric second product), the pre-activation store; the RK update
  x_{i+1} = x + h sum_j b_j K_j on the last stage (and the saved-state store); in the
  adjoint G = lam act'(A) V with the per-program dL/dlam partial, or the dL/dx update
  z += sum_s dL/dX_s (+ the loss gradient of a saved state).
* ``_wgrad_kernel``: the eq. 23 accumulation. One program owns an (out x in) tile of
  G^T X_s (X_s formed as it loads; minus lam Y^T kbar for the symmetric variant, minus the
  transposed product for the antisymmetric one) and loops over a batch range; its
  epilogue scatters the tile into the d + 1 coefficient slots, grad_w[k + r] += w_r tile,
  and the bias gradient (column sums of G) likewise. With the batch split over programs,
  the partial tiles go to a buffer that ``_scatter_kernel`` sums in a fixed order.
* ``_adj_prep_kernel``: elementwise kbar_s = h b_s z + h sum_{q > s} a_qs dL/dX_q, and
  G = lam act'(A) kbar with the dL/dlam partial (or kbar alone for the symmetric variant,
  whose G comes out of the V = -kbar W^T GEMM's epilogue).

Every output element has one owner per launch and the launches run in order; dL/dlam
partials are per program and summed in a fixed order: gradients are deterministic.
The state is kept in the compute dtype (float32, float64 for float64) between steps.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import ACT_IDS, INTERPRET, VARIANT_IDS, act_bwd, act_fwd, compute_dtype, dot_precision

__all__ = ["gemm_forward", "gemm_backward", "gemm_blocks", "gemm_options"]

# Tests set these to force small tiles / a split batch reduction under the interpreter.
BLOCKS_OVERRIDE: Optional[Tuple[int, int, int]] = None  # (BB, BN, BK)
WGRAD_SPLIT_OVERRIDE: Optional[int] = None

_ELEM_BLOCK = 1024


# --------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------

@triton.jit
def _combo(base_ptr, buf_ptr, offs, mask, BMs, h, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
           C3: tl.constexpr, USE_H: tl.constexpr, CT: tl.constexpr):
    """base + [h] sum_j C_j buf[j] at offs (buf: slots of B m elements); zero terms are skipped."""
    v = tl.load(base_ptr + offs, mask=mask, other=0.0).to(CT)
    if C0 != 0.0:
        c = C0 * h if USE_H else C0
        v += c * tl.load(buf_ptr + offs, mask=mask, other=0.0).to(CT)
    if C1 != 0.0:
        c = C1 * h if USE_H else C1
        v += c * tl.load(buf_ptr + BMs + offs, mask=mask, other=0.0).to(CT)
    if C2 != 0.0:
        c = C2 * h if USE_H else C2
        v += c * tl.load(buf_ptr + 2 * BMs + offs, mask=mask, other=0.0).to(CT)
    if C3 != 0.0:
        c = C3 * h if USE_H else C3
        v += c * tl.load(buf_ptr + 3 * BMs + offs, mask=mask, other=0.0).to(CT)
    return v


@triton.jit
def _weight_tile(w_ptr, kt_ptr, wt_ptr, idx, gamma, M, kk, nn, DP1: tl.constexpr, TRANS_W: tl.constexpr,
                 VARIANT: tl.constexpr, CT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """T[kk, nn] = A[nn, kk] (TRANS_W, for X A^T) or A[kk, nn] (for X A), blended from the d + 1
    coefficient tiles (eq. 14); A = W, or W - W^T - gamma I for the antisymmetric variant."""
    k = tl.load(kt_ptr + idx).to(tl.int64)
    mm = tl.cast(M, tl.int64) * M
    mask = (kk[:, None] < M) & (nn[None, :] < M)
    if TRANS_W:
        direct = nn[None, :] * M + kk[:, None]
        swapped = kk[:, None] * M + nn[None, :]
    else:
        direct = kk[:, None] * M + nn[None, :]
        swapped = nn[None, :] * M + kk[:, None]
    T = tl.zeros((BLOCK_K, BLOCK_N), CT)
    for r in tl.static_range(DP1):
        c = tl.load(wt_ptr + idx * DP1 + r).to(CT)
        base = w_ptr + (k + r) * mm
        T += c * tl.load(base + direct, mask=mask, other=0.0).to(CT)
        if VARIANT == 2:
            T -= c * tl.load(base + swapped, mask=mask, other=0.0).to(CT)
    if VARIANT == 2:
        T -= tl.where((kk[:, None] == nn[None, :]) & mask, gamma, 0.0).to(CT)
    return T


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------

# Per-launch integers (stage index, batch, batch chunk, split count, element counts) are not
# specialised, so one configuration is one compiled kernel whatever the step or batch.
@triton.jit(do_not_specialize=["idx", "B"])
def _gemm_kernel(x_ptr, pro_ptr, w_ptr, b_ptr, scale_ptr, par_ptr, kt_ptr, wt_ptr,
                 out_ptr, a_ptr, ubase_ptr, ubuf_ptr, uout_ptr, save_ptr, gs_ptr, pl_ptr,
                 idx, B, M,
                 P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
                 TRANS_W: tl.constexpr, DP1: tl.constexpr, VARIANT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ACT: tl.constexpr, COEF: tl.constexpr, USE_LAM: tl.constexpr,
                 STORE_A: tl.constexpr, ADJ: tl.constexpr, STORE_OUT: tl.constexpr,
                 UPDATE: tl.constexpr, U0: tl.constexpr, U1: tl.constexpr, U2: tl.constexpr, U3: tl.constexpr,
                 UF: tl.constexpr, UPD_H: tl.constexpr, SAVE: tl.constexpr, HAS_GS: tl.constexpr,
                 CT: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc = X @ T with X = x + h sum_j P_j pro[j] (prologue) and T the blended weight tile; then
    forward (ADJ=False): a = acc [+ b(t)], [store a], out = COEF [lam] act(a);
    adjoint (ADJ=True): V = COEF acc, out = G = lam act'(A) V with A read from a_ptr, and
    pl[program] += sum act(A) V. [store out]. UPDATE: uout = ubase + [h] (sum_j U_j ubuf[j] + UF out)
    [+ gs], [save it to save_ptr in the output dtype]."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < B
    rbase = rows.to(tl.int64)[:, None] * M
    BMs = tl.cast(B, tl.int64) * M
    h = tl.load(par_ptr + 1).to(CT)
    gamma = tl.load(par_ptr).to(CT)
    acc = tl.zeros((BLOCK_B, BLOCK_N), CT)
    for k0 in range(0, M, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        xmask = rmask[:, None] & (kk < M)[None, :]
        X = _combo(x_ptr, pro_ptr, rbase + kk[None, :], xmask, BMs, h, P0, P1, P2, P3, True, CT)
        T = _weight_tile(w_ptr, kt_ptr, wt_ptr, idx, gamma, M, kk, cols, DP1, TRANS_W, VARIANT, CT, BLOCK_K,
                         BLOCK_N)
        acc = tl.dot(X, T, acc, input_precision=PREC, out_dtype=CT)
    acc = acc.to(CT)
    cmask = cols < M
    mask = rmask[:, None] & cmask[None, :]
    offs = rbase + cols[None, :]
    lam = tl.load(scale_ptr).to(CT)
    if HAS_BIAS:
        k = tl.load(kt_ptr + idx).to(tl.int64)
        bb = tl.zeros((BLOCK_N,), CT)
        for r in tl.static_range(DP1):
            c = tl.load(wt_ptr + idx * DP1 + r).to(CT)
            bb += c * tl.load(b_ptr + (k + r) * M + cols, mask=cmask, other=0.0).to(CT)
        acc += bb[None, :]
    if STORE_A:
        tl.store(a_ptr + offs, acc, mask=mask)
    if ADJ:
        V = COEF * acc
        A = tl.load(a_ptr + offs, mask=mask, other=0.0).to(CT)
        Y = act_fwd(A, ACT)
        out = lam * act_bwd(A, Y, ACT) * V
        part = tl.sum(tl.sum(tl.where(mask, Y * V, 0.0), axis=1), axis=0)
        p = pl_ptr + pid_b * tl.num_programs(1) + pid_n
        tl.store(p, tl.load(p) + part)
    else:
        out = COEF * act_fwd(acc, ACT)
        if USE_LAM:
            out = lam * out
    if STORE_OUT:
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if UPDATE:
        u = UF * out
        if U0 != 0.0:
            u += U0 * tl.load(ubuf_ptr + offs, mask=mask, other=0.0).to(CT)
        if U1 != 0.0:
            u += U1 * tl.load(ubuf_ptr + BMs + offs, mask=mask, other=0.0).to(CT)
        if U2 != 0.0:
            u += U2 * tl.load(ubuf_ptr + 2 * BMs + offs, mask=mask, other=0.0).to(CT)
        if U3 != 0.0:
            u += U3 * tl.load(ubuf_ptr + 3 * BMs + offs, mask=mask, other=0.0).to(CT)
        if UPD_H:
            u = h * u
        xn = tl.load(ubase_ptr + offs, mask=mask, other=0.0).to(CT) + u
        if HAS_GS:
            xn += tl.load(gs_ptr + offs, mask=mask, other=0.0).to(CT)
        tl.store(uout_ptr + offs, xn.to(uout_ptr.dtype.element_ty), mask=mask)
        if SAVE:
            tl.store(save_ptr + offs, xn.to(save_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["idx", "B", "BCHUNK"])
def _wgrad_kernel(g_ptr, x_ptr, pro_ptr, a_ptr, kb_ptr, scale_ptr, par_ptr, kt_ptr, wt_ptr,
                  gw_ptr, gb_ptr, pw_ptr, pb_ptr, idx, B, M, BCHUNK,
                  P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
                  DP1: tl.constexpr, VARIANT: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                  DIRECT: tl.constexpr, CT: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """dW[o, i] = sum_b G[b, o] X_s[b, i] over this program's batch range (symmetric: - lam sum_b
    Y[b, o] kbar[b, i]; antisymmetric: dW - dW^T), X_s = x + h sum_j P_j pro[j] formed as it loads.
    DIRECT: grad_w[k + r] += w_r dW (eq. 23) and grad_b[k + r] += w_r colsum(G); else the partial
    tiles go to pw / pb [split]."""
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_s = tl.program_id(2)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    omask = o < M
    imask = i < M
    BMs = tl.cast(B, tl.int64) * M
    h = tl.load(par_ptr + 1).to(CT)
    acc = tl.zeros((BLOCK_O, BLOCK_I), CT)
    acc2 = tl.zeros((BLOCK_O, BLOCK_I), CT)
    gsum = tl.zeros((BLOCK_O,), CT)
    b_start = pid_s * BCHUNK
    b_end = tl.minimum(b_start + BCHUNK, B)
    for b0 in range(b_start, b_end, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rmask = rows < b_end
        rbase = rows.to(tl.int64)[:, None] * M
        mo = rmask[:, None] & omask[None, :]
        mi = rmask[:, None] & imask[None, :]
        Go = tl.load(g_ptr + rbase + o[None, :], mask=mo, other=0.0).to(CT)
        Xi = _combo(x_ptr, pro_ptr, rbase + i[None, :], mi, BMs, h, P0, P1, P2, P3, True, CT)
        acc = tl.dot(tl.trans(Go), Xi, acc, input_precision=PREC, out_dtype=CT)
        if VARIANT == 1:  # K = -lam act(a) W: dW -= lam Y^T kbar
            Ao = tl.load(a_ptr + rbase + o[None, :], mask=mo, other=0.0).to(CT)
            Yo = tl.where(mo, act_fwd(Ao, ACT), 0.0).to(CT)
            Ki = tl.load(kb_ptr + rbase + i[None, :], mask=mi, other=0.0).to(CT)
            acc2 = tl.dot(tl.trans(Yo), Ki, acc2, input_precision=PREC, out_dtype=CT)
        if VARIANT == 2:  # A = W - W^T - gamma I: dW = dA - dA^T
            Xo = _combo(x_ptr, pro_ptr, rbase + o[None, :], mo, BMs, h, P0, P1, P2, P3, True, CT)
            Gi = tl.load(g_ptr + rbase + i[None, :], mask=mi, other=0.0).to(CT)
            acc2 = tl.dot(tl.trans(Xo), Gi, acc2, input_precision=PREC, out_dtype=CT)
        if HAS_BIAS:
            gsum += tl.sum(Go, axis=0)
    acc = acc.to(CT)
    if VARIANT == 1:
        acc -= tl.load(scale_ptr).to(CT) * acc2.to(CT)
    if VARIANT == 2:
        acc -= acc2.to(CT)
    mask = omask[:, None] & imask[None, :]
    woffs = o.to(tl.int64)[:, None] * M + i[None, :]
    # The bias gradient of an out tile: its first in tile's program.
    bmask = omask & ((tl.arange(0, BLOCK_O) * 0 + pid_i) == 0)
    if DIRECT:
        k = tl.load(kt_ptr + idx).to(tl.int64)
        mm = tl.cast(M, tl.int64) * M
        for r in tl.static_range(DP1):
            c = tl.load(wt_ptr + idx * DP1 + r).to(CT)
            p = gw_ptr + (k + r) * mm + woffs
            tl.store(p, tl.load(p, mask=mask, other=0.0) + c * acc, mask=mask)
            if HAS_BIAS:
                q = gb_ptr + (k + r) * M + o
                tl.store(q, tl.load(q, mask=bmask, other=0.0) + c * gsum, mask=bmask)
    else:
        ps = tl.cast(pid_s, tl.int64)
        tl.store(pw_ptr + ps * M * M + woffs, acc, mask=mask)
        if HAS_BIAS:
            tl.store(pb_ptr + ps * M + o, gsum, mask=bmask)


@triton.jit(do_not_specialize=["idx", "SPLIT"])
def _scatter_kernel(pw_ptr, pb_ptr, kt_ptr, wt_ptr, gw_ptr, gb_ptr, idx, M, SPLIT,
                    DP1: tl.constexpr, HAS_BIAS: tl.constexpr, CT: tl.constexpr,
                    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """Sums the SPLIT partial tiles in order and scatters into the d + 1 slots (eq. 23)."""
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    omask = o < M
    mask = omask[:, None] & (i < M)[None, :]
    bmask = omask & ((tl.arange(0, BLOCK_O) * 0 + pid_i) == 0)
    woffs = o.to(tl.int64)[:, None] * M + i[None, :]
    mm = tl.cast(M, tl.int64) * M
    acc = tl.zeros((BLOCK_O, BLOCK_I), CT)
    gsum = tl.zeros((BLOCK_O,), CT)
    for s in range(SPLIT):
        acc += tl.load(pw_ptr + s * mm + woffs, mask=mask, other=0.0)
        if HAS_BIAS:
            gsum += tl.load(pb_ptr + s * M + o, mask=bmask, other=0.0)
    k = tl.load(kt_ptr + idx).to(tl.int64)
    for r in tl.static_range(DP1):
        c = tl.load(wt_ptr + idx * DP1 + r).to(CT)
        p = gw_ptr + (k + r) * mm + woffs
        tl.store(p, tl.load(p, mask=mask, other=0.0) + c * acc, mask=mask)
        if HAS_BIAS:
            q = gb_ptr + (k + r) * M + o
            tl.store(q, tl.load(q, mask=bmask, other=0.0) + c * gsum, mask=bmask)


@triton.jit(do_not_specialize=["NEL", "BMs"])
def _adj_prep_kernel(z_ptr, xb_ptr, a_ptr, scale_ptr, par_ptr, out_ptr, pl_ptr, NEL, BMs,
                     ZC: tl.constexpr, Q0: tl.constexpr, Q1: tl.constexpr, Q2: tl.constexpr, Q3: tl.constexpr,
                     ACT: tl.constexpr, KBAR_ONLY: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr):
    """kbar = h (ZC z + sum_q Q_q xb[q]); out = kbar (KBAR_ONLY) or G = lam act'(A) kbar with
    pl[program] += sum act(A) kbar."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NEL
    h = tl.load(par_ptr + 1).to(CT)
    kb = (ZC * h) * tl.load(z_ptr + offs, mask=mask, other=0.0).to(CT)
    if Q0 != 0.0:
        kb += (Q0 * h) * tl.load(xb_ptr + offs, mask=mask, other=0.0).to(CT)
    if Q1 != 0.0:
        kb += (Q1 * h) * tl.load(xb_ptr + BMs + offs, mask=mask, other=0.0).to(CT)
    if Q2 != 0.0:
        kb += (Q2 * h) * tl.load(xb_ptr + 2 * BMs + offs, mask=mask, other=0.0).to(CT)
    if Q3 != 0.0:
        kb += (Q3 * h) * tl.load(xb_ptr + 3 * BMs + offs, mask=mask, other=0.0).to(CT)
    if KBAR_ONLY:
        tl.store(out_ptr + offs, kb, mask=mask)
    else:
        A = tl.load(a_ptr + offs, mask=mask, other=0.0).to(CT)
        Y = act_fwd(A, ACT)
        G = tl.load(scale_ptr).to(CT) * act_bwd(A, Y, ACT) * kb
        tl.store(out_ptr + offs, G, mask=mask)
        tl.store(pl_ptr + pid, tl.load(pl_ptr + pid) + tl.sum(tl.where(mask, Y * kb, 0.0), axis=0))


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------

def gemm_blocks(B: int, m: int, dtype: torch.dtype) -> Tuple[int, int, int]:
    """(BB, BN, BK) of the GEMM kernels (the wgrad kernel uses BN x BN output tiles, BB batch rows)."""
    if BLOCKS_OVERRIDE is not None:
        return BLOCKS_OVERRIDE
    if INTERPRET:  # few, large programs run faster in the interpreter
        bn = max(16, min(64, triton.next_power_of_2(max(m, 1))))
        return max(16, min(64, triton.next_power_of_2(max(B, 1)))), bn, bn
    if dtype == torch.float64:
        return 32, 32, 16
    return 64, 64, 32


def gemm_options(dtype: torch.dtype, degree: int, variant: str) -> dict:
    """num_warps / num_stages of the GEMM kernels.

    Each K step loads the input tile and the d + 1 coefficient tiles it blends (twice that
    for the antisymmetric variant, which also reads the transposes), and software pipelining
    keeps num_stages - 1 of those sets in flight in shared memory. Two stages (one slice
    prefetched while the current one is multiplied) keep every configuration under Hopper's
    227 KB per block with the tiles of ``gemm_blocks``; deeper pipelines would only fit for
    low degrees. float32 takes 8 warps: its exact (ieee) products run on FMA units, not tensor
    cores, and with 4 warps the 64 x 64 accumulator plus the blended operand tiles exceed 255
    registers per thread and spill."""
    return dict(num_warps=8 if dtype == torch.float32 else 4, num_stages=2)


def _wgrad_split(B: int, m: int, BB: int, BN: int) -> int:
    """Batch chunks of the weight-gradient reduction: enough programs to fill a GPU."""
    if WGRAD_SPLIT_OVERRIDE is not None:
        return max(1, min(WGRAD_SPLIT_OVERRIDE, triton.cdiv(B, BB)))
    if INTERPRET:
        return 1
    tiles = triton.cdiv(m, BN) ** 2
    return max(1, min(triton.cdiv(B, BB), 256 // tiles))


def _identity(kernel):
    return kernel


def _pad4(vals) -> list:
    vals = [float(v) for v in vals]
    return vals + [0.0] * (4 - len(vals))


class _Gemm:
    """Launch helper of one layer call on the GEMM path."""

    def __init__(self, B, m, weight, bias, scale, kt, wt, par, tab, degree, activation, variant, dtype, wrap):
        self.B, self.m = B, m
        self.weight, self.bias, self.scale = weight, bias, scale
        self.kt, self.wt, self.par = kt, wt, par
        self.tab, self.S = tab, tab.stages
        self.variant = VARIANT_IDS[variant]
        self.act = ACT_IDS[activation]
        self.wrap = wrap
        self.ct = torch.float64 if dtype == torch.float64 else torch.float32
        self.BB, self.BN, self.BK = gemm_blocks(B, m, dtype)
        # Batch rows per step of the eq. 23 kernel's reduction: 16 in float32, whose FMA
        # products with the prologue's stage loads and the second accumulator of the symmetric
        # / antisymmetric variants spilled at 64 rows (and, with triton 3.9, at 32) even with
        # 8 warps.
        self.WB = min(self.BB, 16) if dtype == torch.float32 else self.BB
        self.grid = (triton.cdiv(B, self.BB), triton.cdiv(m, self.BN))
        self.base = dict(DP1=degree + 1, CT=compute_dtype(dtype), PREC=dot_precision(dtype))
        self.options = gemm_options(dtype, degree, variant)

    def gemm(self, X, idx, *, pro=None, pro_coef=(), trans_w=True, variant=None, bias=False, act=0, coef=1.0,
             lam=False, a=None, store_a=False, adj=False, pl=None, out=None, ubase=None, ubuf=None, ucoef=(),
             ufresh=1.0, upd_h=False, uout=None, save=None, gs=None):
        """out = epilogue(prologue(X) @ T(idx)); see _gemm_kernel."""
        variant = self.variant if variant is None else variant
        dummy = X
        p = _pad4(pro_coef)
        u = _pad4(ucoef)
        self.wrap(_gemm_kernel)[self.grid](
            X, pro if pro is not None else dummy, self.weight, self.bias if bias else self.weight, self.scale,
            self.par, self.kt, self.wt, out if out is not None else dummy, a if a is not None else dummy,
            ubase if ubase is not None else dummy, ubuf if ubuf is not None else dummy,
            uout if uout is not None else dummy, save if save is not None else dummy,
            gs if gs is not None else dummy, pl if pl is not None else dummy,
            idx, self.B, self.m,
            P0=p[0], P1=p[1], P2=p[2], P3=p[3], TRANS_W=trans_w, VARIANT=variant, HAS_BIAS=bias, ACT=act,
            COEF=float(coef), USE_LAM=lam, STORE_A=store_a, ADJ=adj, STORE_OUT=out is not None,
            UPDATE=uout is not None, U0=u[0], U1=u[1], U2=u[2], U3=u[3], UF=float(ufresh), UPD_H=upd_h,
            SAVE=save is not None, HAS_GS=gs is not None,
            BLOCK_B=self.BB, BLOCK_N=self.BN, BLOCK_K=self.BK, **self.options, **self.base)

    def stage(self, x, K, s, i, *, A=None, Y=None, store_k=True, update=None, save=None):
        """Stage s of step i from x with the earlier slopes in K (S, B, m): K[s] = lam f(X_s)
        [A[s] = pre-activation]; update=(x_out) also writes x_{i+1} (and save, the saved state)."""
        tab, idx = self.tab, i * self.S + s
        has_bias = self.bias is not None
        pro = dict(pro=K, pro_coef=tab.a[s][:s]) if s > 0 else {}
        upd = {}
        if update is not None:
            upd = dict(ubase=x, ubuf=K, ucoef=tab.b[:s], ufresh=tab.b[s], upd_h=True, uout=update, save=save)
        a_kw = dict(a=A[s], store_a=True) if A is not None else {}
        kout = K[s] if store_k else None
        if self.variant == 1:  # K = -lam act(X W^T + b) W
            self.gemm(x, idx, bias=has_bias, act=self.act, out=Y, **pro, **a_kw)
            if store_k or update is not None:
                self.gemm(Y, idx, trans_w=False, coef=-1.0, lam=True, out=kout, **upd)
        else:
            self.gemm(x, idx, bias=has_bias, act=self.act, lam=True, out=kout, **pro, **a_kw, **upd)

    def step(self, x, i, K, Y, out, save=None):
        for s in range(self.S):
            last = s == self.S - 1
            self.stage(x, K, s, i, Y=Y, store_k=not last, update=out if last else None,
                       save=save if last else None)
        return out

    def wgrad(self, G, x, K, A, kbar, s, i, gw, gb, pw, pb, split):
        idx = i * self.S + s
        pro = _pad4(self.tab.a[s][:s])
        BO = self.BN
        has_bias = self.bias is not None
        bchunk = triton.cdiv(triton.cdiv(self.B, split), self.BB) * self.BB
        grid = (triton.cdiv(self.m, BO), triton.cdiv(self.m, BO), split)
        self.wrap(_wgrad_kernel)[grid](
            G, x, K, A, kbar if kbar is not None else G, self.scale, self.par, self.kt, self.wt,
            gw, gb if gb is not None else gw, pw if pw is not None else gw, pb if pb is not None else gw,
            idx, self.B, self.m, bchunk, P0=pro[0], P1=pro[1], P2=pro[2], P3=pro[3], VARIANT=self.variant,
            ACT=self.act, HAS_BIAS=has_bias, DIRECT=split == 1, BLOCK_B=self.WB, BLOCK_O=BO, BLOCK_I=BO,
            **self.options, **self.base)
        if split > 1:
            self.wrap(_scatter_kernel)[grid[:2]](pw, pb if pb is not None else pw, self.kt, self.wt, gw,
                                                 gb if gb is not None else gw, idx, self.m, split,
                                                 DP1=self.base["DP1"], HAS_BIAS=has_bias, CT=self.base["CT"],
                                                 BLOCK_O=BO, BLOCK_I=BO, **self.options)

    def prep(self, z, Xbar, A, s, out, pl, kbar_only):
        S, tab = self.S, self.tab
        q = [tab.a[r][s] if r > s else 0.0 for r in range(S)]
        q = _pad4(q)
        nel = self.B * self.m
        self.wrap(_adj_prep_kernel)[(triton.cdiv(nel, _ELEM_BLOCK),)](
            z, Xbar, A, self.scale, self.par, out, pl, nel, nel, ZC=float(tab.b[s]), Q0=q[0], Q1=q[1], Q2=q[2],
            Q3=q[3], ACT=self.act, KBAR_ONLY=kbar_only, CT=self.base["CT"], BLOCK=_ELEM_BLOCK)


def gemm_forward(x, weight, bias, scale, kt, wt, par, states, steps, degree, activation, tableau, variant,
                 checkpoint, wrap: Callable = _identity) -> torch.Tensor:
    """Fills the saved states (num_saved_states(N, K), B, m) (states[0] = x already);
    ``tableau``: the scheme's Runge-Kutta tableau (``TimeGrid.tableau``)."""
    B, m = x.shape
    op = _Gemm(B, m, weight, bias, scale, kt, wt, par, tableau, degree, activation, variant, x.dtype, wrap)
    ct = op.ct
    cur = x.to(ct, copy=True).contiguous()  # a fresh buffer: the step loop writes into it
    nxt = torch.empty_like(cur)
    K = torch.empty((op.S, B, m), dtype=ct, device=x.device)
    Y = torch.empty((B, m), dtype=ct, device=x.device) if op.variant == 1 else None
    for i in range(steps):
        saved = (i + 1) % checkpoint == 0 or i + 1 == steps
        op.step(cur, i, K, Y, nxt, save=states[(i + checkpoint) // checkpoint] if saved else None)
        cur, nxt = nxt, cur
    return states


def gemm_backward(grad_states, last_only, states, weight, bias, scale, kt, wt, par, steps, degree, activation,
                  tableau, variant, checkpoint, wrap: Callable = _identity):
    """The adjoint sweep N-1 .. 0: (grad_x, grad_w, grad_b or None, grad_scale) in the compute dtype
    (grad_scale: per-program partials, summed by the caller)."""
    NS, B, m = states.shape
    dev = states.device
    op = _Gemm(B, m, weight, bias, scale, kt, wt, par, tableau, degree, activation, variant, states.dtype, wrap)
    ct, S = op.ct, op.S
    has_bias = bias is not None
    gw = torch.zeros(weight.shape, dtype=ct, device=dev)
    gb = torch.zeros(bias.shape, dtype=ct, device=dev) if has_bias else None
    split = _wgrad_split(B, m, op.BB, op.BN)
    pw = torch.empty((split, m, m), dtype=ct, device=dev) if split > 1 else None
    pb = torch.empty((split, m), dtype=ct, device=dev) if split > 1 and has_bias else None
    nprog = max(op.grid[0] * op.grid[1], triton.cdiv(B * m, _ELEM_BLOCK))
    pl = torch.zeros((nprog,), dtype=ct, device=dev)
    z = (grad_states if last_only else grad_states[-1]).to(ct).clone()
    K = torch.empty((S, B, m), dtype=ct, device=dev)
    A = torch.empty((S, B, m), dtype=ct, device=dev)
    Xbar = torch.empty((S, B, m), dtype=ct, device=dev)
    G = torch.empty((B, m), dtype=ct, device=dev)
    sym = op.variant == 1
    kbar = torch.empty((B, m), dtype=ct, device=dev) if sym else None
    Y = torch.empty((B, m), dtype=ct, device=dev) if sym else None
    kseg = min(checkpoint, steps)
    ws = [torch.empty((B, m), dtype=ct, device=dev) for _ in range(kseg)] if checkpoint > 1 else []
    for seg in range((steps - 1) // checkpoint, -1, -1):
        i0, i1 = seg * checkpoint, min(seg * checkpoint + checkpoint, steps)
        if checkpoint > 1:  # recompute the segment's states from its saved one
            ws[0].copy_(states[seg])
            for j in range(1, i1 - i0):
                op.step(ws[j - 1], i0 + j - 1, K, Y, ws[j])
        for i in range(i1 - 1, i0 - 1, -1):
            x = ws[i - i0] if checkpoint > 1 else states[i].to(ct).contiguous()
            for s in range(S):  # the step's stages again, keeping A_s and the slopes
                op.stage(x, K, s, i, A=A, Y=Y, store_k=s < S - 1)
            for s in range(S - 1, -1, -1):
                idx = i * S + s
                if sym:  # V = -kbar W^T, G = lam act'(A) V
                    op.prep(z, Xbar, A[s], s, kbar, pl, kbar_only=True)
                    op.gemm(kbar, idx, coef=-1.0, a=A[s], adj=True, act=op.act, pl=pl, out=G)
                else:
                    op.prep(z, Xbar, A[s], s, G, pl, kbar_only=False)
                op.wgrad(G, x, K, A[s], kbar, s, i, gw, gb, pw, pb, split)
                if s > 0:
                    op.gemm(G, idx, trans_w=False, out=Xbar[s])
                else:  # z = z + sum_s dL/dX_s [+ dL/dx_i of a saved state]
                    gs = None
                    if not last_only and i % checkpoint == 0:
                        gs = grad_states[i // checkpoint]
                    op.gemm(G, idx, trans_w=False, ubase=z, ubuf=Xbar, ucoef=[0.0] + [1.0] * (S - 1), ufresh=1.0,
                            uout=z, gs=gs)
    return z, gw, gb, pl
