"""Triton kernels of the 2-D convolutional SpliNet layer (forward with the explicit Runge-Kutta
schemes and the fused adjoint of SpliNet paper eqs. 17-23), stride 1, "same" zero padding,
odd kernels, NCHW, C in = C out.

Legend: B batch, C channels, H x W image, KH x KW kernel, n = L + d coefficients,
d degree, N steps, S stages, K checkpoint interval, P = B H W pixels.

Three implicit-GEMM kernels, every one blending the filter taps from the d + 1
coefficient filters as it loads them (eq. 14; no per-step filter tensor is built):

* ``_conv_kernel``: out = [base +] coef [* lam] * act(conv(X, W(t)) [+ b(t)]) over a
  (pixels x out-channels) tile, K loop over (tap, in-channel block); optional store of the
  pre-activation. ``TRANS=True`` computes conv_transpose(X, W(t)) instead (the input
  gradient, and the symmetric variant's second product). Euler + standard fuses the whole
  step: x_{i+1} = x_i + h lam act(conv(x_i, W_i) + b_i).
* ``_conv_wgrad_kernel``: dW[o, c, u, v] = sum_pixels G[o] X[c] (shifted by the tap), one
  program per (out block, in block, tap), K loop over the pixels, and the eq. 23 scatter in
  the epilogue: grad_w[k + r] += coef [* lam] * b_r(u) * dW. Each element has one owner and
  the steps run in order, so no atomics: deterministic.

The host (``conv_forward`` / ``conv_backward``) walks the steps and RK stages, combining
stages with elementwise torch ops, and the adjoint N-1 .. 0 from the saved states
(recomputing checkpoint segments), like the dense kernels' convention.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (ACT_IDS, INTERPRET, TimeGrid, act_bwd, act_fwd, basis_tables, compute_dtype, device_guard,
                      dot_precision, num_saved_states)

__all__ = ["conv_forward", "conv_backward", "conv_blocks", "conv_options"]


# The stage index and the batch change from launch to launch: not specialised (one compiled
# kernel per configuration). C, H, W are layer constants and keep their specialisation.
@triton.jit(do_not_specialize=["idx", "Bn"])
def _conv_kernel(x_ptr, w_ptr, b_ptr, scale_ptr, par_ptr, kt_ptr, wt_ptr, base_ptr, out_ptr, a_ptr,
                 idx, Bn, C, H, W,
                 KH: tl.constexpr, KW: tl.constexpr, DP1: tl.constexpr, TRANS: tl.constexpr,
                 COEF: tl.constexpr, USE_H: tl.constexpr,
                 ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr, USE_LAM: tl.constexpr,
                 STORE_A: tl.constexpr, CT: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, WIDE: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)
    HW = H * W
    if WIDE:  # B H W >= 2^31 pixels: the flat pixel index in 64 bits (see conv_index_wide)
        P = tl.cast(Bn, tl.int64) * HW
        pix = tl.cast(pid_p, tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    else:
        P = Bn * HW
        pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pix < P
    b_idx = pix // HW
    rem = pix % HW
    py = rem // W
    px = rem % W
    co = pid_o * BLOCK_CO + tl.arange(0, BLOCK_CO)
    omask = co < C
    k = tl.load(kt_ptr + idx).to(tl.int64)
    CC = C * C * KH * KW  # elements of one coefficient filter
    xbase = b_idx.to(tl.int64) * C * HW
    acc = tl.zeros((BLOCK_P, BLOCK_CO), CT)
    # A runtime loop over the taps: unrolled, a 5 x 5 kernel repeats the K loop 25 times, which
    # multiplies the code, the live ranges ptxas must schedule (spills) and the compile time.
    for tap in range(KH * KW):
        u = tap // KW
        v = tap % KW
        if TRANS:  # conv_transpose: input pixel p - u + KH // 2
            iy = py - u + KH // 2
            ix = px - v + KW // 2
        else:
            iy = py + u - KH // 2
            ix = px + v - KW // 2
        inb = pmask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        sp = iy * W + ix
        for c0 in range(0, C, BLOCK_CI):
            ci = c0 + tl.arange(0, BLOCK_CI)
            cmask = ci < C
            xt = tl.load(x_ptr + xbase[:, None] + ci[None, :] * HW + sp[:, None],
                         mask=inb[:, None] & cmask[None, :], other=0.0).to(CT)
            # Tap tile (in, out), blended from the d + 1 coefficient filters as it is loaded.
            if TRANS:  # weight[o = in, c = out, u, v]
                woffs = ci[:, None] * (C * KH * KW) + co[None, :] * (KH * KW) + tap
            else:      # weight[o = out, c = in, u, v]
                woffs = co[None, :] * (C * KH * KW) + ci[:, None] * (KH * KW) + tap
            wmask = cmask[:, None] & omask[None, :]
            wt = tl.zeros((BLOCK_CI, BLOCK_CO), CT)
            for r in tl.static_range(DP1):
                c = tl.load(wt_ptr + idx * DP1 + r).to(CT)
                wt += c * tl.load(w_ptr + (k + r) * CC + woffs, mask=wmask, other=0.0).to(CT)
            acc += tl.dot(xt, wt, input_precision=PREC, out_dtype=CT).to(CT)
    if HAS_BIAS:
        bb = tl.zeros((BLOCK_CO,), CT)
        for r in tl.static_range(DP1):
            c = tl.load(wt_ptr + idx * DP1 + r).to(CT)
            bb += c * tl.load(b_ptr + (k + r) * C + co, mask=omask, other=0.0).to(CT)
        acc += bb[None, :]
    offs = xbase[:, None] + co[None, :] * HW + rem[:, None]
    mask = pmask[:, None] & omask[None, :]
    if STORE_A:
        tl.store(a_ptr + offs, acc.to(a_ptr.dtype.element_ty), mask=mask)
    y = act_fwd(acc, ACT)
    f = COEF * y
    if USE_H:  # h = 1 / N from the parameter table [gamma, h]
        f = tl.load(par_ptr + 1).to(CT) * f
    if USE_LAM:
        f = tl.load(scale_ptr).to(CT) * f
    if HAS_BASE:
        f = tl.load(base_ptr + offs, mask=mask, other=0.0).to(CT) + f
    tl.store(out_ptr + offs, f.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["idx", "Bn"])
def _conv_wgrad_kernel(g_ptr, x_ptr, scale_ptr, kt_ptr, wt_ptr, gw_ptr, idx, Bn, C, H, W,
                       KH: tl.constexpr, KW: tl.constexpr, DP1: tl.constexpr, COEF: tl.constexpr,
                       USE_LAM: tl.constexpr,
                       CT: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, WIDE: tl.constexpr):
    """grad_w[k + r, o, c, u, v] += coef [lam] b_r sum_pixels G[b, o, p] X[b, c, p + (u, v) - pad]."""
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1)
    tap = tl.program_id(2)
    u = tap // KW
    v = tap % KW
    HW = H * W
    if WIDE:  # see _conv_kernel
        P = tl.cast(Bn, tl.int64) * HW
    else:
        P = Bn * HW
    co = pid_o * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci = pid_c * BLOCK_CI + tl.arange(0, BLOCK_CI)
    omask = co < C
    cmask = ci < C
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), CT)
    for p0 in range(0, P, BLOCK_P):
        pix = p0 + tl.arange(0, BLOCK_P)
        pmask = pix < P
        b_idx = pix // HW
        rem = pix % HW
        py = rem // W
        px = rem % W
        iy = py + u - KH // 2
        ix = px + v - KW // 2
        inb = pmask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        xbase = b_idx.to(tl.int64) * C * HW
        gt = tl.load(g_ptr + xbase[None, :] + co[:, None] * HW + rem[None, :],
                     mask=omask[:, None] & pmask[None, :], other=0.0).to(CT)
        xt = tl.load(x_ptr + xbase[:, None] + ci[None, :] * HW + (iy * W + ix)[:, None],
                     mask=inb[:, None] & cmask[None, :], other=0.0).to(CT)
        acc += tl.dot(gt, xt, input_precision=PREC, out_dtype=CT).to(CT)
    acc = COEF * acc
    if USE_LAM:
        acc = tl.load(scale_ptr).to(CT) * acc
    # eq. 23: the d + 1 coefficient slots k .. k + d.
    k = tl.load(kt_ptr + idx).to(tl.int64)
    CC = C * C * KH * KW
    offs = co[:, None] * (C * KH * KW) + ci[None, :] * (KH * KW) + tap
    mask = omask[:, None] & cmask[None, :]
    for r in tl.static_range(DP1):
        c = tl.load(wt_ptr + idx * DP1 + r).to(CT)
        p = gw_ptr + (k + r) * CC + offs
        tl.store(p, tl.load(p, mask=mask, other=0.0) + c * acc, mask=mask)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------

def _identity(kernel):
    return kernel


def conv_index_wide(B: int, H: int, W: int) -> bool:
    """Whether the conv kernels index pixels in 64 bits: the flat index of a pixel over the
    batch, b H W + y W + x, and their count B H W pass int32 from 2^31 pixels (the offsets into
    the tensors, b C H W + c H W + ..., are 64-bit always). Below that the kernels keep 32-bit
    pixel arithmetic: a 64-bit division and remainder by H W and W per pixel cost several
    times a 32-bit one on the GPU."""
    return B * H * W >= 2**31


def conv_blocks(C: int, dtype: torch.dtype) -> Tuple[int, int, int]:
    """(BLOCK_P, BLOCK_CI, BLOCK_CO): 64 pixels; channel tiles pow2 >= C, 16 .. 64 (32 for
    float32 and float64, whose exact products run on FMA units, not tensor cores: at 64 the
    accumulator and the blended filter tile spill on sm_90, and float64 tiles also take
    twice the shared memory)."""
    top = 32 if dtype in (torch.float64, torch.float32) and not INTERPRET else 64
    BC = max(16, min(top, triton.next_power_of_2(max(C, 1))))
    return 64, BC, BC


def conv_options(dtype: torch.dtype) -> dict:
    """num_warps / num_stages of the conv kernels: two pipeline stages (the input tile and the
    d + 1 filter tiles of one K slice prefetched); Triton's default of three keeps up to
    360 KB of float64 tiles in flight at degree 3, over Hopper's 227 KB per block."""
    return dict(num_warps=4, num_stages=2)


class _Conv:
    """Launch helper of one layer call: the basis tables and the kernel meta-parameters."""

    def __init__(self, x, weight, bias, scale, steps, degree, activation, scheme, grid, wrap):
        self.B, self.C, self.H, self.W = x.shape
        self.KH, self.KW = weight.shape[3], weight.shape[4]
        self.weight = weight.contiguous()
        self.bias = bias.contiguous() if bias is not None else None
        self.scale = scale
        self.tab = grid.tableau
        self.h = 1.0 / steps
        self.ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.kt, self.wt, self.par = basis_tables(steps, weight.shape[0], degree, scheme, 0.0, self.ct, x.device,
                                                  grid)
        self.S = self.tab.stages
        self.DP1 = degree + 1
        self.act = ACT_IDS[activation]
        self.wrap = wrap
        self.BP, self.BCI, self.BCO = conv_blocks(self.C, weight.dtype)
        self.meta = dict(KH=self.KH, KW=self.KW, DP1=self.DP1, CT=compute_dtype(weight.dtype),
                         PREC=dot_precision(weight.dtype), BLOCK_P=self.BP, BLOCK_CI=self.BCI, BLOCK_CO=self.BCO,
                         WIDE=conv_index_wide(self.B, self.H, self.W),
                         **conv_options(weight.dtype))

    def conv(self, X, idx, *, out, trans=False, act=0, bias=False, base=None, coef=1.0, use_h=False, lam=False,
             a_out=None):
        """out = [base +] coef [h] [lam] act(conv(X, W_idx) [+ b_idx]) (conv_transpose with trans)."""
        P = self.B * self.H * self.W
        grid = (triton.cdiv(P, self.BP), triton.cdiv(self.C, self.BCO))
        self.wrap(_conv_kernel)[grid](
            X, self.weight, self.bias if bias else self.weight, self.scale, self.par, self.kt, self.wt,
            base if base is not None else X, out, a_out if a_out is not None else out,
            idx, self.B, self.C, self.H, self.W,
            TRANS=trans, COEF=float(coef), USE_H=use_h, ACT=act, HAS_BIAS=bias, HAS_BASE=base is not None, USE_LAM=lam,
            STORE_A=a_out is not None, **self.meta)
        return out

    def wgrad(self, G, X, idx, gw, *, coef=1.0, lam=False):
        grid = (triton.cdiv(self.C, self.BCO), triton.cdiv(self.C, self.BCI), self.KH * self.KW)
        self.wrap(_conv_wgrad_kernel)[grid](G, X, self.scale, self.kt, self.wt, gw, idx,
                                            self.B, self.C, self.H, self.W, COEF=float(coef), USE_LAM=lam,
                                            **self.meta)

    # One step from x (step i). Returns x_{i+1}; with keep=True also each stage's
    # (X_s, A_s, Y_s) for the adjoint.
    def step(self, x, i, variant, keep=False):
        h, tab, S = self.h, self.tab, self.S
        has_bias = self.bias is not None
        if S == 1 and variant == "standard" and not keep:  # fully fused Euler step
            return self.conv(x, i, out=torch.empty_like(x), act=self.act, bias=has_bias, base=x, use_h=True,
                             lam=True)
        Ks, saved = [], []
        for s in range(S):
            Xs = x
            for j, a in enumerate(tab.a[s]):
                if a != 0.0:
                    Xs = Xs + (h * a) * Ks[j]
            idx = i * S + s
            A = torch.empty(x.shape, dtype=self.ct, device=x.device) if keep else None
            if variant == "standard":
                K = self.conv(Xs, idx, out=torch.empty_like(x), act=self.act, bias=has_bias, lam=True, a_out=A)
                Y = None
            else:  # K = -lam conv_transpose(act(conv(X) + b), W)
                Y = self.conv(Xs, idx, out=torch.empty_like(x), act=self.act, bias=has_bias, a_out=A)
                K = self.conv(Y, idx, out=torch.empty_like(x), trans=True, coef=-1.0, lam=True)
            Ks.append(K)
            saved.append((Xs, A, Y))
        xn = x
        for b, K in zip(tab.b, Ks):
            if b != 0.0:
                xn = xn + (h * b) * K
        return (xn, saved) if keep else xn


def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor,
                 steps: int, degree: int, activation: str, scheme: str, variant: str, gamma: float,
                 checkpoint: int, *, grid: TimeGrid, wrap: Callable = _identity) -> torch.Tensor:
    """All N steps; returns the saved states (num_saved_states(N, K), B, C, H, W). ``grid``:
    the scheme's tableau and the basis at every step and stage (see TimeGrid)."""
    x = x.contiguous()
    states = torch.empty((num_saved_states(steps, checkpoint), *x.shape), dtype=x.dtype, device=x.device)
    states[0].copy_(x)
    if x.numel() == 0:
        states.copy_(x.expand_as(states))
        return states
    op = _Conv(x, weight, bias, scale, steps, degree, activation, scheme, grid, wrap)
    # The state and the stage values stay in the compute dtype (float32 for bf16 / fp16 layers)
    # from step to step; only the saved states are rounded to the layer's dtype.
    cur = x.to(op.ct)
    with device_guard(x):
        for i in range(steps):
            cur = op.step(cur, i, variant)
            if (i + 1) % checkpoint == 0 or i + 1 == steps:
                states[(i + checkpoint) // checkpoint].copy_(cur)
    return states


def _act_grad(A: torch.Tensor, Y: torch.Tensor, activation: str) -> torch.Tensor:
    """act'(a), PyTorch's formulas (from the output where PyTorch uses it)."""
    if activation == "identity":
        return torch.ones_like(A)
    if activation == "relu":
        return (A > 0).to(A.dtype)
    if activation == "tanh":
        return 1 - Y * Y
    if activation == "sigmoid":
        return Y * (1 - Y)
    e = torch.exp(A.clamp(max=20.0))
    return torch.where(A > 20.0, torch.ones_like(A), e / (e + 1))


def conv_backward(grad_states: torch.Tensor, states: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor], scale: torch.Tensor, steps: int, degree: int, activation: str,
                  scheme: str, variant: str, gamma: float, checkpoint: int, *, grid: TimeGrid,
                  wrap: Callable = _identity) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The adjoint sweep N-1 .. 0: (grad_x, grad_weight, grad_bias or empty (0,), grad_scale).
    ``grad_states``: dL/d(saved states), the shape of ``states``, or dL/dx_N alone (one state)."""
    last_only = grad_states.shape == states.shape[1:]
    states = states.contiguous()
    grad_states = grad_states.to(states.dtype).contiguous()
    has_bias = bias is not None
    ct = torch.float64 if states.dtype == torch.float64 else torch.float32
    gw = torch.zeros(weight.shape, dtype=ct, device=states.device)
    gb = torch.zeros(bias.shape, dtype=ct, device=states.device) if has_bias else None
    glam = torch.zeros((), dtype=torch.float64, device=states.device)
    z = (grad_states if last_only else grad_states[-1]).to(ct)
    x0 = states[0]
    with device_guard(x0):
        if x0.numel() > 0:
            op = _Conv(x0, weight, bias, scale, steps, degree, activation, scheme, grid, wrap)
            lam = scale.to(ct).reshape(())
            h, tab, S = op.h, op.tab, op.S
            slots = torch.arange(degree + 1, device=states.device)
            wtab = op.wt.view(-1, degree + 1)
            ktab = op.kt.view(-1).to(torch.int64)
            for seg in range((steps - 1) // checkpoint, -1, -1):
                i0, i1 = seg * checkpoint, min(seg * checkpoint + checkpoint, steps)
                xs = [states[seg].to(ct)]
                for i in range(i0, i1 - 1):
                    xs.append(op.step(xs[-1], i, variant))
                for i in range(i1 - 1, i0 - 1, -1):
                    _, saved = op.step(xs[i - i0], i, variant, keep=True)
                    Xbar = [None] * S
                    for s in range(S - 1, -1, -1):
                        kbar = (h * tab.b[s]) * z
                        for q in range(s + 1, S):
                            if tab.a[q][s] != 0.0:
                                kbar = kbar + (h * tab.a[q][s]) * Xbar[q]
                        idx = i * S + s
                        Xs, A, Y = saved[s]
                        if variant == "standard":
                            V = kbar
                        else:  # V = dL/d(lam act(a)) = -conv(kbar, W)
                            V = op.conv(kbar.contiguous(), idx, out=torch.empty_like(A), coef=-1.0)
                        Yv = Y if Y is not None else _act_from_a(A, activation)
                        glam += (Yv.double() * V.double()).sum()
                        G = (lam * _act_grad(A, Yv, activation) * V).contiguous()
                        Xbar[s] = op.conv(G, idx, out=torch.empty_like(G), trans=True)
                        op.wgrad(G, Xs.contiguous(), idx, gw)
                        if variant == "symmetric":  # K = -lam convT(Y, W): dW -= lam corr(Y, kbar)
                            op.wgrad(Y.contiguous(), kbar.contiguous(), idx, gw, coef=-1.0, lam=True)
                        if has_bias:
                            gsum = G.sum(dim=(0, 2, 3))
                            gb.index_add_(0, ktab[idx] + slots, wtab[idx][:, None] * gsum[None, :])
                    for s in range(S):
                        z = z + Xbar[s]
                    if not last_only and i % checkpoint == 0:
                        z = z + grad_states[i // checkpoint]
    grad_b = gb.to(bias.dtype) if has_bias else states.new_empty((0,))
    return (z.to(states.dtype), gw.to(weight.dtype), grad_b, glam.to(scale.dtype).reshape(scale.shape))


# act(a) in torch, PyTorch's own functions (as splinet_cuda's reference uses them).
_ACT_FNS = {"identity": lambda a: a, "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
            "softplus": torch.nn.functional.softplus}


def _act_from_a(A: torch.Tensor, activation: str) -> torch.Tensor:
    """act(a) in torch (the standard variant's stage output, for dL/dlam and act')."""
    return _ACT_FNS[activation](A)
