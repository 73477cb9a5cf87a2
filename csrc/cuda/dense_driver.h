// Host side of the CUDA dense SpliNet layer: path choice, buffers, launches, large-width runs.
//
// The choice between the small-width trajectory program (dense_program.h) and the large-width
// GEMM paths, their buffers, launches and final reductions, and the op entry points. Templated
// on an executor (driver_common.h), so that the same driver runs on the GPU and in the tests'
// CPU emulation.
//
// Large widths (m > kSmallMaxWidth), two ways (DenseLarge):
//  - fused (default for bfloat16 / float16 on the GPU): every product is one launch of the
//    blended GEMM (blend_gemm.h, tensor cores), which forms W(t) from the d + 1 coefficient
//    tiles as it loads them; its epilogue does bias, activation, slope and the next stage's
//    input or the update (forward), and eq. 23's scatter into the d + 1 slots (backward).
//  - cuBLAS (float32 / float64): per stage a blend kernel writes W(t) (m x m, in the GEMM
//    dtype) and b(t); the products go through ATen's GEMM; bias, activation and the slope are
//    one elementwise kernel after it, and eq. 23 is one scatter kernel into float32 (float64)
//    coefficient-gradient accumulators. The blend reads (d + 1) m^2 values per stage against
//    the GEMM's 2 B m^2 flops, so it is negligible from B of a few hundred on.
//
// Legend: B batch, m width, n = L + d coefficients, d degree, N steps, S stages, K checkpoint
// interval, TB rows of a tile.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>
#include <tuple>

#include "../common/checks.h"
#include "../common/layer_config.h"
#include "blend_gemm.h"
#include "dense_program.h"
#include "driver_common.h"
#include "step_functors.h"

namespace splinet {

// Paths: 0 chooses (small when m <= kSmallMaxWidth and its shared memory fits, else large:
// fused for bfloat16 / float16 where the executor has tensor cores, cuBLAS otherwise), 1 small,
// 2 large through cuBLAS, 3 large through the fused blended GEMM. On the GPU the environment
// variable SPLINET_DENSE_GEMM=cublas|fused overrides the bfloat16 / float16 large path's choice.
enum DensePath : int64_t { kPathAuto = 0, kPathSmall = 1, kPathLarge = 2, kPathFused = 3 };

// Whether the fused GEMM is compiled for a dtype: on the GPU only for bfloat16 / float16 (tensor
// cores). For float32 / float64 it would multiply on scalar fragments, which cuBLAS beats, and
// its bodies (two tiles x every epilogue x every activation) would dominate the device code
// and build time; so float32 / float64 always take cuBLAS there. The CPU emulation compiles it
// for every dtype: path 3 is how the tests reach its tiling, blend and epilogues.
template <typename scalar_t, typename Exec>
constexpr bool dense_fused_compiled() {
  return !Exec::kTensorCores || sizeof(scalar_t) == 2;
}

// On the GPU the fused GEMM also needs tensor cores for the dtype in the image the driver
// loaded (wmma_min_arch): a float16 run on a Turing build, or bfloat16 on one whose newest
// image predates sm_80, takes cuBLAS.
template <typename scalar_t, typename Exec>
bool dense_use_fused(const Exec& ex, int64_t path) {
  const bool tensor_cores = Exec::kTensorCores && ex.image_arch() >= wmma_min_arch<scalar_t>();
  if (path == kPathFused) {
    TORCH_CHECK_VALUE((dense_fused_compiled<scalar_t, Exec>()),
                      "spline_dense: the fused GEMM is built for bfloat16 / float16 only");
    TORCH_CHECK_VALUE(!Exec::kTensorCores || tensor_cores, "spline_dense: the fused GEMM needs tensor cores for this "
                      "dtype, which the loaded image (compute_", ex.image_arch(), ") lacks");
    return true;
  }
  if (path == kPathLarge) return false;
  const char* env = Exec::kTensorCores ? std::getenv("SPLINET_DENSE_GEMM") : nullptr;
  const std::string gemm = env ? env : "";
  TORCH_CHECK_VALUE(gemm.empty() || gemm == "fused" || gemm == "cublas",
                    "SPLINET_DENSE_GEMM must be 'fused' or 'cublas', got '", gemm, "'");
  if (!dense_fused_compiled<scalar_t, Exec>()) return false;
  if (Exec::kTensorCores && !tensor_cores) return false;  // cuBLAS, whatever SPLINET_DENSE_GEMM asks
  if (!gemm.empty()) return gemm == "fused";
  return Exec::kTensorCores && sizeof(scalar_t) == 2;
}

// Tile rows for the small path: enough rows that a tile has ~1024 elements, but no more than
// spread the batch over every multiprocessor (`sms`): a block walks all N steps of its tile
// in sequence, so B = 256, m = 4 in one tile of 256 rows would run on one SM while the others
// idle; ceil(B / sms) rows make one tile per SM. Then halved until the backward's shared
// memory (the larger) fits the budget. Returns 0 when even one row does not fit.
inline int64_t dense_small_tile_rows(LayerParams p, int64_t elem_bytes, int64_t smem_budget, int64_t sms) {
  int64_t tb = std::max<int64_t>(1, std::min<int64_t>(256, 1024 / std::max<int64_t>(p.m, 1)));
  const int64_t spread = (p.B + std::max<int64_t>(sms, 1) - 1) / std::max<int64_t>(sms, 1);
  tb = std::max<int64_t>(1, std::min(tb, spread));
  for (; tb >= 1; tb /= 2) {
    p.TB = tb;
    if (dense_small_smem_elems(p, true) * elem_bytes <= smem_budget) return tb;
  }
  return 0;
}

// K-slices of a weight-gradient GEMM with `tiles` output tiles and K = B (DenseLarge::
// weight_gemm): enough that the tiles x slices work items cover the `sms` multiprocessors,
// each slice at least 4 BK deep; 1 (no split) when the tiles already cover them.
inline int64_t weight_gemm_splits(int64_t tiles, int64_t K, int64_t bk, int64_t sms) {
  if (tiles >= sms) return 1;
  const int64_t want = (sms + tiles - 1) / tiles, deepest = K / (4 * bk);
  return std::max<int64_t>(1, std::min(want, deepest));
}

// ---------------------------------------------------------------------------------------
// The large-width path (all tensors on x's device; T = scalar_t, the GEMM dtype).

template <typename scalar_t, typename acc_t, Act ACT, typename Exec>
class DenseLarge {
 public:
  using scalar_type = scalar_t;
  // fused: the products run in the blended GEMM (blend_gemm.h) with the epilogues fused, else
  // a blend kernel, ATen's GEMM and elementwise kernels. keep: the stages' pre-activations are
  // kept for an adjoint (the backward's replays). gemm_tile: 64 or 128 forces the fused
  // GEMM's tile, 0 chooses.
  // Whether this instantiation contains the fused GEMM's code (dense_fused_compiled).
  static constexpr bool kFused = dense_fused_compiled<scalar_t, Exec>();

  DenseLarge(Exec& ex, const LayerParams& p, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& scale,
             bool fused, bool keep, int64_t gemm_tile)
      : ex_(ex), p_(p), weight_(weight), bias_(bias), scale_(scale), fused_(kFused && fused), keep_(keep || !fused_),
        gemm_tile_(gemm_tile) {
    const auto st = weight.options(), at_ = weight.options().dtype(acc_type_of<acc_t>());
    const int64_t B = p.B, m = p.m, S = p.S;
    cur_ = at::empty({B, m}, at_);
    for (int s = 0; s < S; ++s) X_.push_back(at::empty({B, m}, st));
    A_ = at::empty({keep_ ? S : 1, B, m}, at_);
    K_ = at::empty({S, B, m}, at_);
    Y_ = at::empty({B, m}, st);
    if (fused_) {
      Xn_ = at::empty({B, m}, st);
    } else {
      W_ = at::empty({S, m, m}, st);
      bv_ = at::empty({S, m}, at_);
      prod_ = at::empty({B, m}, st);
    }
  }

  // The state; whoever writes it through here invalidates the next stage input made by the
  // last step's epilogue.
  at::Tensor& cur() {
    x0_ready_ = false;
    return cur_;
  }

  // One step from cur_ (x_i) to cur_ (x_{i+1}), keeping every stage's X_s (and A_s, W_s, b_s
  // as needed by the adjoint); x_{i+1} also to save (GEMM dtype) when set.
  void step(int64_t i, scalar_t* save = nullptr) {
    if constexpr (kFused) {
      if (fused_) return fused_step(i, save);
    }
    const int64_t Bm = p_.B * p_.m;
    const bool sym = p_.variant == kSymmetric;
    for (int s = 0; s < p_.S; ++s) {
      blend(i, s);
      ex_.for_each(Bm, combination(Rk::StageInput, s, cur_, nullptr, X_[s].data_ptr<scalar_t>()));
      at::mm_out(prod_, X_[s], W_[s].t());
      EpilogueFn<scalar_t, acc_t, ACT> epi{prod_.data_ptr<scalar_t>(), p_.has_bias ? bv_[s].data_ptr<acc_t>() : nullptr,
                                           p_.m, 1, scale_.data_ptr<scalar_t>(), A_[s].data_ptr<acc_t>(),
                                           K_[s].data_ptr<acc_t>(), sym ? Y_.data_ptr<scalar_t>() : nullptr};
      ex_.for_each(Bm, epi);
      if (sym) {
        at::mm_out(prod_, Y_, W_[s]);
        ex_.for_each(Bm, NegScaleFn<scalar_t, acc_t>{prod_.data_ptr<scalar_t>(), scale_.data_ptr<scalar_t>(),
                                                     K_[s].data_ptr<acc_t>()});
      }
    }
    ex_.for_each(Bm, combination(Rk::Update, 0, cur_, cur_.data_ptr<acc_t>(), save));
  }

  // Adjoint of the step just run by step(i): z (acc_t) from dL/dx_{i+1} to dL/dx_i.
  void adjoint(int64_t i, at::Tensor& z, at::Tensor& gW, at::Tensor& gb, at::Tensor& glam) {
    const int64_t B = p_.B, m = p_.m, Bm = B * m;
    const bool sym = p_.variant == kSymmetric, antisym = p_.variant == kAntisymmetric;
    const auto at_ = cur_.options();
    if (!kbar_st_.defined()) {
      kbar_st_ = at::empty({B, m}, weight_.options());
      G_ = at::empty({B, m}, weight_.options());
      P_ = at::empty({B, m}, at_);
      if (!fused_) {
        dW_ = at::empty({m, m}, weight_.options());
        dW2_ = at::empty({m, m}, weight_.options());
      } else {
        prod_ = at::empty({B, m}, weight_.options());
      }
    }
    // K_ holds the slopes; from here on K_[s] is overwritten with dL/dX_s, last stage first.
    for (int s = p_.S - 1; s >= 0; --s) {
      const CombineFn<scalar_t, acc_t> kbar = combination(Rk::StageAdjoint, s, z, nullptr, ptr(kbar_st_));
      if (sym) {  // kbar W(t)^T
        ex_.for_each(Bm, kbar);
        if constexpr (kFused) {
          if (fused_) gemm(B, m, m, kbar_st_, kRows, nullptr, kBlendT, i, s, StoreEpi<scalar_t, acc_t>{m, nullptr, ptr(prod_)});
        }
        if (!fused_) at::mm_out(prod_, kbar_st_, W_[s].t());
      }
      AdjointActFn<scalar_t, acc_t, ACT> adj{A_[s].data_ptr<acc_t>(), kbar,
                                             sym ? prod_.data_ptr<scalar_t>() : nullptr, scale_.data_ptr<scalar_t>(),
                                             G_.data_ptr<scalar_t>(), P_.data_ptr<acc_t>(),
                                             sym ? Y_.data_ptr<scalar_t>() : nullptr};
      ex_.for_each(Bm, adj);
      glam.add_(at::sum(P_, at::kDouble));
      at::Tensor colsum;
      if (p_.has_bias) colsum = at::sum(G_, {0}, false, acc_type_of<acc_t>());
      ScatterFn<scalar_t, acc_t> sc{p_.d, 0, {}, m * m, m, antisym ? m : 0, nullptr, nullptr,
                                    p_.has_bias ? colsum.data_ptr<acc_t>() : nullptr, scale_.data_ptr<scalar_t>(),
                                    gW.data_ptr<acc_t>(), p_.has_bias ? gb.data_ptr<acc_t>() : nullptr};
      sc.k = stage_basis(p_, i, s, sc.w);
      if constexpr (kFused) {
        if (fused_) {
          // dL/dX_s = G W(t) (blended on load) into K_[s]; eq. 23 in the epilogues of G^T X_s
          // (and - (G^T X_s)^T for the antisymmetric variant, - lam act(a)^T kbar for the
          // symmetric one); the bias gradient from the column sums of G.
          gemm(B, m, m, G_, kRows, nullptr, kBlend, i, s, StoreEpi<scalar_t, acc_t>{m, ptr_acc(K_[s]), nullptr});
          SlotScatterEpi<scalar_t, acc_t> gw{sc, m, acc_t(1), nullptr};
          weight_gemm(G_, X_[s], gw);
          if (antisym) {
            gw.sign = acc_t(-1);
            weight_gemm(X_[s], G_, gw);
          }
          if (sym) {
            gw.sign = acc_t(-1);
            gw.scale = scale_.data_ptr<scalar_t>();
            weight_gemm(Y_, kbar_st_, gw);
          }
          sc.wsize = 0;  // the bias part only
          if (p_.has_bias) ex_.for_each(m, sc);
          continue;
        }
      }
      if (std::is_same<scalar_t, acc_t>::value) {
        at::Tensor xbar = K_[s];
        at::mm_out(xbar, G_, W_[s]);
      } else {
        at::mm_out(prod_, G_, W_[s]);
        K_[s].copy_(prod_);
      }
      at::mm_out(dW_, G_.t(), X_[s]);
      if (sym) at::mm_out(dW2_, Y_.t(), kbar_st_);
      sc.dW = dW_.data_ptr<scalar_t>();
      sc.dW2 = sym ? dW2_.data_ptr<scalar_t>() : nullptr;
      ex_.for_each(m * m + (p_.has_bias ? m : 0), sc);
    }
    ex_.for_each(Bm, combination(Rk::AdjointSum, 0, z, z.data_ptr<acc_t>(), nullptr));
  }

 private:
  static scalar_t* ptr(const at::Tensor& t) { return t.data_ptr<scalar_t>(); }
  static acc_t* ptr_acc(const at::Tensor& t) { return t.data_ptr<acc_t>(); }

  // A Runge-Kutta combination over the stage buffers K_.
  CombineFn<scalar_t, acc_t> combination(Rk kind, int s, const at::Tensor& base, acc_t* out_acc,
                                         scalar_t* out_st) const {
    return stage_combination(p_, K_, kind, s, base, out_acc, out_st);
  }

  void blend(int64_t i, int s) {
    BlendFn<scalar_t, acc_t> bl{p_, weight_.data_ptr<scalar_t>(), p_.has_bias ? bias_.data_ptr<scalar_t>() : nullptr,
                                0, {}, W_[s].data_ptr<scalar_t>(), bv_[s].data_ptr<acc_t>()};
    bl.k = stage_basis(p_, i, s, bl.w);
    ex_.for_each(p_.m * p_.m + (p_.has_bias ? p_.m : 0), bl);
  }

  // The fused step: one blended GEMM per product, whose epilogue also forms the next stage's
  // input (or the update); the first stage input comes from the last step's epilogue unless
  // the state was set from outside.
  void fused_step(int64_t i, scalar_t* save) {
    const int64_t B = p_.B, m = p_.m;
    const bool sym = p_.variant == kSymmetric;
    if (x0_ready_) std::swap(X_[0], Xn_);
    else ex_.for_each(B * m, combination(Rk::StageInput, 0, cur_, nullptr, ptr(X_[0])));
    for (int s = 0; s < p_.S; ++s) {
      StageEpi<scalar_t, acc_t, ACT> epi{p_, p_.has_bias ? ptr(bias_) : nullptr, 0, {}, scale_.data_ptr<scalar_t>(),
                                         false, keep_ ? ptr_acc(A_[s]) : nullptr, nullptr, ptr_acc(K_[s]), {}, nullptr};
      epi.k = stage_basis(p_, i, s, epi.w);
      const bool last = s + 1 == p_.S;
      epi.next = last ? combination(Rk::Update, 0, cur_, ptr_acc(cur_), ptr(Xn_))
                      : combination(Rk::StageInput, s + 1, cur_, nullptr, ptr(X_[s + 1]));
      epi.save = last ? save : nullptr;
      if (sym) {  // act(a) into Y, then K_s = -lam act(a) W(t)
        StageEpi<scalar_t, acc_t, ACT> first = epi;
        first.Y = ptr(Y_);
        gemm(B, m, m, X_[s], kRows, nullptr, kBlendT, i, s, first);
        epi.neg = true;
        gemm(B, m, m, Y_, kRows, nullptr, kBlend, i, s, epi);
      } else {
        gemm(B, m, m, X_[s], kRows, nullptr, kBlendT, i, s, epi);
      }
    }
    x0_ready_ = true;
  }

  // C (M x N) = A (M x K) B (K x N) through the fused GEMM; every operand has rows of m.
  // A blended B operand (kBlend / kBlendT) is formed as its tiles load when that reads no
  // more than blending W(t) once into a buffer first: each of the M / BM row tiles of blocks
  // reads (d + 1) coefficient values per entry of W(t) (twice that for the antisymmetric
  // variant), against (d + 1) reads + 1 write + one read per row tile when pre-blended.
  template <typename Epi>
  void gemm(int64_t M, int64_t N, int64_t K, const at::Tensor& a, int a_mode, const at::Tensor* b, int b_mode,
            int64_t i, int s, const Epi& epi) {
    const bool big = gemm_tile_ == 128 ||
                     (gemm_tile_ != 64 && ((M + 127) / 128) * ((N + 127) / 128) >= ex_.multiprocessors());
    GemmArgs<scalar_t, acc_t> g{};
    g.M = M;
    g.N = N;
    g.K = K;
    g.a = ptr(a);
    g.lda = p_.m;
    g.a_mode = a_mode;
    g.b = b ? ptr(*b) : nullptr;
    g.ldb = p_.m;
    g.b_mode = b_mode;
    if (b_mode == kBlend || b_mode == kBlendT) {
      g.p = p_;
      g.weight = ptr(weight_);
      g.kc = stage_basis(p_, i, s, g.w);
      const int64_t row_tiles = (M + (big ? 127 : 63)) / (big ? 128 : 64);
      const int64_t reads = (p_.d + 1) * (p_.variant == kAntisymmetric ? 2 : 1);
      if (row_tiles * reads > reads + 1 + row_tiles) {
        g.b = ptr(blended(i, s));
        g.b_mode = b_mode == kBlend ? kRows : kCols;  // B(k, j) = W[k][j], or W[j][k]
      }
    }
    if (big) launch_gemm<GemmTile<scalar_t, 128, 128>>(g, epi);
    else launch_gemm<GemmTile<scalar_t, 64, 64>>(g, epi);
  }

  // A weight gradient P^T Q (m x m, summed over the batch: K = B) into the epilogue. Its m x m
  // output has few tiles (4 at m = 128 with 64 x 64 tiles): below one tile per
  // multiprocessor the batch is split into K-slices (SplitKGemmBody), each slice at least
  // 4 BK deep, and their partials summed in slice order (deterministic).
  template <typename Epi>
  void weight_gemm(const at::Tensor& P, const at::Tensor& Q, const Epi& epi) {
    if (gemm_tile_ == 128) weight_gemm_tiled<GemmTile<scalar_t, 128, 128>>(P, Q, epi);
    else weight_gemm_tiled<GemmTile<scalar_t, 64, 64>>(P, Q, epi);
  }

  template <typename Tile, typename Epi>
  void weight_gemm_tiled(const at::Tensor& P, const at::Tensor& Q, const Epi& epi) {
    const int64_t m = p_.m, B = p_.B, sms = ex_.multiprocessors();
    const int64_t tiles = ((m + Tile::BM - 1) / Tile::BM) * ((m + Tile::BN - 1) / Tile::BN);
    const int64_t splits = weight_gemm_splits(tiles, B, Tile::BK, sms);
    if (splits == 1) {
      gemm(m, m, B, P, kCols, &Q, kRows, 0, 0, epi);
      return;
    }
    GemmArgs<scalar_t, acc_t> g{};
    g.M = m;
    g.N = m;
    g.K = B;
    g.a = ptr(P);
    g.lda = m;
    g.a_mode = kCols;
    g.b = ptr(Q);
    g.ldb = m;
    g.b_mode = kRows;
    // Equal slices rounded up to whole BK slices; the last one takes the rest.
    const int64_t k_chunk = ((B + splits - 1) / splits + Tile::BK - 1) / Tile::BK * Tile::BK;
    const int64_t used = (B + k_chunk - 1) / k_chunk;
    if (!splitk_.defined() || splitk_.numel() < used * m * m) splitk_ = at::empty({used * m * m}, cur_.options());
    using Body = SplitKGemmBody<scalar_t, acc_t, Tile>;
    const int64_t grid = ex_.template grid<Body>(tiles * used, kGemmThreads, Tile::kSmemBytes);
    ex_.launch(Body{g, used, k_chunk, ptr_acc(splitk_)}, grid, kGemmThreads, Tile::kSmemBytes);
    ex_.for_each(m * m, SplitSumFn<acc_t, Epi>{ptr_acc(splitk_), used, m * m, m, epi});
  }

  // W(t) of step i, stage s in the GEMM dtype (blended once for the products that share it).
  const at::Tensor& blended(int64_t i, int s) {
    if (wt_step_ == i && wt_stage_ == s) return Wt_;
    if (!Wt_.defined()) Wt_ = at::empty({p_.m, p_.m}, weight_.options());
    BlendFn<scalar_t, acc_t> bl{p_, ptr(weight_), nullptr, 0, {}, ptr(Wt_), nullptr};
    bl.k = stage_basis(p_, i, s, bl.w);
    ex_.for_each(p_.m * p_.m, bl);
    wt_step_ = i;
    wt_stage_ = s;
    return Wt_;
  }

  template <typename Tile, typename Epi>
  void launch_gemm(const GemmArgs<scalar_t, acc_t>& g, const Epi& epi) {
    using Body = BlendGemmBody<scalar_t, acc_t, Tile, Epi>;
    const int64_t tiles = ((g.M + Tile::BM - 1) / Tile::BM) * ((g.N + Tile::BN - 1) / Tile::BN);
    const int64_t grid = ex_.template grid<Body>(tiles, kGemmThreads, Tile::kSmemBytes);
    ex_.launch(Body{g, epi}, grid, kGemmThreads, Tile::kSmemBytes);
  }

  Exec& ex_;
  LayerParams p_;
  at::Tensor weight_, bias_, scale_;
  bool fused_, keep_, x0_ready_ = false;
  int64_t gemm_tile_, wt_step_ = -1;
  int wt_stage_ = -1;
  std::vector<at::Tensor> X_;  // stage inputs (GEMM dtype)
  at::Tensor cur_, Xn_, Wt_, A_, K_, W_, bv_, prod_, Y_, kbar_st_, G_, P_, dW_, dW2_, splitk_;
};

// ---------------------------------------------------------------------------------------
// The ops.

// Whether the small-width program runs (path as in DensePath; 0: when m <= kSmallMaxWidth and
// a tile fits the shared memory).
inline bool dense_use_small(int64_t path, const LayerParams& p, int64_t elem_bytes, int64_t smem_budget) {
  TORCH_CHECK_VALUE(path >= kPathAuto && path <= kPathFused, "spline_dense: path must be 0, 1, 2 or 3, got ", path);
  if (path == kPathLarge || path == kPathFused) return false;
  const bool fits = dense_small_tile_rows(p, elem_bytes, smem_budget, 1) > 0;
  if (path == kPathSmall) {
    TORCH_CHECK_VALUE(fits, "spline_dense: width ", p.m, " does not fit the small-width kernel's shared memory");
    return true;
  }
  return p.m <= kSmallMaxWidth && fits;
}

// The fused GEMM's tile forced by the tile_rows argument (64 or 128; 0 chooses).
inline int64_t gemm_tile(int64_t path, int64_t tile_rows) {
  if (path != kPathFused) return 0;
  TORCH_CHECK_VALUE(tile_rows == 0 || tile_rows == 64 || tile_rows == 128,
                    "spline_dense: the fused GEMM's tile must be 0, 64 or 128, got ", tile_rows);
  return tile_rows;
}

template <typename scalar_t, Act ACT, typename Exec>
at::Tensor dense_forward(Exec& ex, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& scale, LayerParams p, int64_t path, int64_t tile_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Ns = num_saved_states(p.N, p.K);
  at::Tensor states = at::empty({Ns, p.B, p.m}, x.options());
  if (p.B == 0) return states;
  if (dense_use_small(path, p, sizeof(acc_t), ex.max_smem_bytes())) {
    p.TB = tile_rows > 0 ? tile_rows
                         : dense_small_tile_rows(p, sizeof(acc_t), ex.max_smem_bytes(), ex.multiprocessors());
    const int64_t smem = dense_small_smem_elems(p, false) * sizeof(acc_t);
    const int64_t tiles = (p.B + p.TB - 1) / p.TB;
    using Body = SmallFwdBody<scalar_t, acc_t, ACT>;
    const int64_t grid = ex.template grid<Body>(tiles, ex.threads(), smem);
    Body body{};
    body.args.p = p;
    body.args.x = x.data_ptr<scalar_t>();
    body.args.weight = weight.data_ptr<scalar_t>();
    body.args.bias = p.has_bias ? bias.data_ptr<scalar_t>() : nullptr;
    body.args.scale = scale.data_ptr<scalar_t>();
    body.args.states = states.data_ptr<scalar_t>();
    ex.launch(body, grid, ex.threads(), smem);
    return states;
  }
  DenseLarge<scalar_t, acc_t, ACT, Exec> run(ex, p, weight, bias, scale, dense_use_fused<scalar_t, Exec>(ex, path), false,
                                             gemm_tile(path, tile_rows));
  large_forward(run, p, x, states);
  return states;
}

template <typename scalar_t, Act ACT, typename Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_backward(
    Exec& ex, const at::Tensor& grad_states, bool last_only, const at::Tensor& states, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& scale, LayerParams p, int64_t path, int64_t tile_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_opts = states.options().dtype(acc_type_of<acc_t>());
  const int64_t Ns = num_saved_states(p.N, p.K);
  at::Tensor grad_x = at::empty({p.B, p.m}, states.options());
  at::Tensor grad_b_out = p.has_bias ? at::zeros_like(bias) : at::empty({0}, states.options());
  if (p.B == 0)
    return {grad_x, at::zeros_like(weight), grad_b_out, at::zeros(scale.sizes(), scale.options())};
  at::Tensor gW, gb, glam;
  if (dense_use_small(path, p, sizeof(acc_t), ex.max_smem_bytes())) {
    // The current interval's gradient slots go to shared memory when they take at most half
    // the budget and a tile still fits beside them.
    p.cache_slots = dense_slot_cache_elems(p) * static_cast<int64_t>(sizeof(acc_t)) <= ex.max_smem_bytes() / 2;
    if (dense_small_tile_rows(p, sizeof(acc_t), ex.max_smem_bytes(), 1) == 0) p.cache_slots = false;
    p.TB = tile_rows > 0 ? tile_rows
                         : dense_small_tile_rows(p, sizeof(acc_t), ex.max_smem_bytes(), ex.multiprocessors());
    const int64_t smem = dense_small_smem_elems(p, true) * sizeof(acc_t);
    const int64_t tiles = (p.B + p.TB - 1) / p.TB, threads = ex.threads();
    using Body = SmallBwdBody<scalar_t, acc_t, ACT>;
    const int64_t per_block = (p.n * p.m * (p.m + 1) + segment_states(p) * p.TB * p.m) * sizeof(acc_t) + threads * 8;
    const int64_t grid = cap_grid(ex.template grid<Body>(tiles, threads, smem), per_block);
    // Per-block partial gradients, summed over blocks below in block order.
    at::Tensor pW = at::zeros({grid, p.n, p.m, p.m}, acc_opts);
    at::Tensor pb = p.has_bias ? at::zeros({grid, p.n, p.m}, acc_opts) : at::Tensor();
    at::Tensor plam = at::zeros({grid * threads}, states.options().dtype(at::kDouble));
    at::Tensor seg = segment_states(p) > 0 ? at::empty({grid, segment_states(p), p.TB, p.m}, acc_opts) : at::Tensor();
    Body body{};
    body.args.p = p;
    body.args.weight = weight.data_ptr<scalar_t>();
    body.args.bias = p.has_bias ? bias.data_ptr<scalar_t>() : nullptr;
    body.args.scale = scale.data_ptr<scalar_t>();
    body.args.states = states.data_ptr<scalar_t>();
    body.args.grad_states = grad_states.data_ptr<scalar_t>();
    body.args.last_only = last_only;
    body.args.grad_x = grad_x.data_ptr<scalar_t>();
    body.args.pW = pW.data_ptr<acc_t>();
    body.args.pb = p.has_bias ? pb.data_ptr<acc_t>() : nullptr;
    body.args.plam = plam.data_ptr<double>();
    body.args.seg = seg.defined() ? seg.data_ptr<acc_t>() : nullptr;
    ex.launch(body, grid, threads, smem);
    gW = pW.sum(0);
    if (p.has_bias) gb = pb.sum(0);
    glam = plam.sum();
  } else {
    DenseLarge<scalar_t, acc_t, ACT, Exec> run(ex, p, weight, bias, scale, dense_use_fused<scalar_t, Exec>(ex, path),
                                               true, gemm_tile(path, tile_rows));
    gW = at::zeros({p.n, p.m, p.m}, acc_opts);
    gb = p.has_bias ? at::zeros({p.n, p.m}, acc_opts) : at::Tensor();
    glam = at::zeros({}, states.options().dtype(at::kDouble));
    at::Tensor z = at::empty({p.B, p.m}, acc_opts);  // dL/dx_i, from i = N down
    z.copy_(last_only ? grad_states : grad_states[Ns - 1]);
    large_backward(run, p, states, grad_states, last_only, z, gW, gb, glam);
    grad_x.copy_(z);
  }
  if (p.has_bias) grad_b_out.copy_(gb);
  return {grad_x, gW.to(weight.scalar_type()), grad_b_out, glam.to(scale.scalar_type()).reshape(scale.sizes())};
}

// One dtype's forward / backward with the activation made a compile-time constant. Each is one
// unit of compilation: the CUDA build instantiates every dtype in its own translation unit
// (csrc/cuda/cuda_instances.h), so the units compile in parallel; the emulation instantiates
// them where it includes this file.
template <typename scalar_t, typename Exec>
at::Tensor dense_forward_typed(Exec& ex, Act act, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, const at::Tensor& scale, const LayerParams& p, int64_t path,
                               int64_t tile_rows) {
  at::Tensor out;
  SPLINET_DISPATCH_ACT(act, [&] { out = dense_forward<scalar_t, ACT>(ex, x, weight, bias, scale, p, path, tile_rows); });
  return out;
}

template <typename scalar_t, typename Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_backward_typed(
    Exec& ex, Act act, const at::Tensor& grad_states, bool last_only, const at::Tensor& states,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& scale, const LayerParams& p, int64_t path,
    int64_t tile_rows) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  SPLINET_DISPATCH_ACT(act, [&] {
    out = dense_backward<scalar_t, ACT>(ex, grad_states, last_only, states, weight, bias, scale, p, path, tile_rows);
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// Op entry points shared by the CUDA ops (dense_cuda.cu) and the emulation ops: checks,
// contiguous inputs, dtype and activation dispatch (driver_common.h).

template <typename Exec>
at::Tensor dense_fwd_entry(Exec& ex, const char* op, const at::Tensor& x_in, const at::Tensor& weight_in,
                           const c10::optional<at::Tensor>& bias_in, const at::Tensor& scale_in, int64_t steps,
                           int64_t degree, c10::string_view activation, c10::string_view scheme,
                           c10::string_view variant, double gamma, int64_t checkpoint, int64_t path,
                           int64_t tile_rows) {
  check_dense_args(op, x_in, weight_in, bias_in, scale_in, steps, degree, checkpoint, Exec::kHalfTypes);
  check_driver_args(op, x_in, scale_in, degree);
  const OpInputs in = fwd_inputs(x_in, weight_in, bias_in, scale_in);
  const LayerParams p = layer_params(in.x.size(0), in.x.size(1), in.weight.size(0), in.bias.defined(), steps, degree,
                                     scheme, variant, gamma, checkpoint);
  const Act act = parse_activation(std::string(activation));
  at::Tensor out;
  SPLINET_DISPATCH_TYPES(Exec::kHalfTypes, in.x.scalar_type(), "splinet_layer_fwd", [&] {
    out = dense_forward_typed<scalar_t>(ex, act, in.x, in.weight, in.bias, in.scale, p, path, tile_rows);
  });
  return out;
}

template <typename Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_bwd_entry(
    Exec& ex, const char* op, const at::Tensor& grad_states_in, const at::Tensor& states_in,
    const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in, const at::Tensor& scale_in, int64_t steps,
    int64_t degree, c10::string_view activation, c10::string_view scheme, c10::string_view variant, double gamma,
    int64_t checkpoint, int64_t path, int64_t tile_rows) {
  TORCH_CHECK_VALUE(states_in.dim() == 3, op, ": states must have shape (saved, B, m), got ", states_in.sizes());
  check_dense_args(op, states_in[0], weight_in, bias_in, scale_in, steps, degree, checkpoint, Exec::kHalfTypes);
  check_driver_args(op, states_in[0], scale_in, degree);
  const OpInputs in = bwd_inputs(op, grad_states_in, states_in, weight_in, bias_in, scale_in, steps, checkpoint);
  const LayerParams p = layer_params(in.x.size(1), in.x.size(2), in.weight.size(0), in.bias.defined(), steps, degree,
                                     scheme, variant, gamma, checkpoint);
  const Act act = parse_activation(std::string(activation));
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  SPLINET_DISPATCH_TYPES(Exec::kHalfTypes, in.x.scalar_type(), "splinet_layer_bwd", [&] {
    out = dense_backward_typed<scalar_t>(ex, act, in.grad_states, in.last_only, in.x, in.weight, in.bias, in.scale, p,
                                         path, tile_rows);
  });
  std::get<3>(out) = std::get<3>(out).to(scale_in.scalar_type());  // in the scale's dtype
  return out;
}

}  // namespace splinet
