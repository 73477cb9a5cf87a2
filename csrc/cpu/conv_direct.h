// Direct "same" convolution (stride 1, odd kernels, 1-3 spatial dims) for the small channel
// counts of SpliNet's convolutional layers (see direct_conv_pays), where ATen's convolution
// is far from the machine's speed: at B = 8, C = 8, 16x16, k = 3 (bench case conv2d) one
// oneDNN call took about 0.16 ms on 2 threads of an x86 machine (15 GFLOP/s), these kernels
// 0.06 ms on one thread (AVX2, counting the border positions they also compute). Used by
// conv_cpu.cpp for the three products of a stage: conv(X, K) + b, its transpose
// conv^T(G, K) (= dL/dX, and the symmetric variant's forward) and the filter gradient
// G (x) X.
//
// Each sample's planes are copied into zero-bordered buffers of the padded grid (one set per
// thread, allocated once per op call), so that every tap is one contiguous multiply-add over a row
// of positions (conv_direct_kernels.h). Work is split by sample (by group of samples for the
// filter gradient, whose per-group partials are added in group order) and, when there are
// fewer of those than threads, by block of output channels. Every value is summed in an
// order fixed by the shapes alone, so no result depends on the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace splinet {
namespace cpu {

// Where conv_cpu.cpp takes the direct convolution: up to 32 channels (the paper's and
// Ruthotto-Haber's regime) and up to 256 products per output value (C times the taps).
// Measured fwd+bwd against ATen's convolution on a 2-core x86 machine (AVX2 kernels): 2.8x
// faster at C * taps = 72 (C = 8, 3x3: bench case conv2d), 1.8x at 96 (C = 32, k = 3 1-D:
// conv1d) and 216 (C = 8, 3x3x3); 10% slower at 288 (C = 32, 3x3) and 400 (C = 16, 5x5),
// where oneDNN's blocked GEMM reuses registers better.
constexpr int64_t kDirectMaxChannels = 32;
constexpr int64_t kDirectMaxProducts = 256;

inline bool direct_conv_pays(int64_t C, int64_t taps) {
  return C <= kDirectMaxChannels && C * taps <= kDirectMaxProducts;
}
// Output channels computed together (their weights broadcast against one load of input).
constexpr int kCoBlock = 4;
// Taps accumulated together by the filter gradient.
constexpr int kTapBlock = 3;
// Samples whose filter gradients are summed in the same vector accumulators (a fixed
// grouping, so the order of every sum is independent of the thread count).
constexpr int64_t kGradGroup = 4;
// The computed range of positions is a multiple of this many elements (two 64-byte vectors
// of float32, four of float64), so the kernels need no ragged tail.
constexpr int64_t kPosBlock = 32;

// The padded grid of one plane, as (D, H, W) with missing leading dims of size 1.
struct PaddedGrid {
  int64_t size[3] = {1, 1, 1}, pad[3] = {0, 0, 0}, psize[3] = {1, 1, 1};
  int64_t P = 1;          // points of the unpadded plane
  int64_t q0 = 0;         // flat padded index of the first interior point (= the largest |tap offset|)
  int64_t q_end = 0;      // end of the computed range: q0 + a multiple of kPosBlock covering the interior
  int64_t stride = 0;     // elements per channel row of a buffer (>= q_end + q0, so every read is in bounds)
  int64_t taps = 1;
  std::vector<int64_t> off;  // flat offset of every tap, in the filter's (kd, kh, kw) order

  PaddedGrid() = default;
  PaddedGrid(const std::vector<int64_t>& spatial, const std::vector<int64_t>& kernel) {
    const int sd = static_cast<int>(spatial.size());
    int64_t ks[3] = {1, 1, 1};
    for (int j = 0; j < sd; ++j) {
      size[3 - sd + j] = spatial[j];
      ks[3 - sd + j] = kernel[j];
    }
    for (int j = 0; j < 3; ++j) {
      pad[j] = ks[j] / 2;
      psize[j] = size[j] + 2 * pad[j];
      P *= size[j];
    }
    const int64_t sh = psize[2], sdp = psize[1] * psize[2];
    q0 = pad[0] * sdp + pad[1] * sh + pad[2];
    const int64_t last = (size[0] - 1 + pad[0]) * sdp + (size[1] - 1 + pad[1]) * sh + (size[2] - 1 + pad[2]);
    q_end = q0 + (last + 1 - q0 + kPosBlock - 1) / kPosBlock * kPosBlock;
    stride = std::max(psize[0] * sdp, q_end + q0);
    taps = ks[0] * ks[1] * ks[2];
    for (int64_t a = 0; a < ks[0]; ++a)
      for (int64_t b = 0; b < ks[1]; ++b)
        for (int64_t c = 0; c < ks[2]; ++c) off.push_back((a - pad[0]) * sdp + (b - pad[1]) * sh + (c - pad[2]));
  }

  // fn(offset in the plane, offset in the padded row) for every row of W interior points.
  template <typename F>
  void for_rows(const F& fn) const {
    const int64_t sh = psize[2], sdp = psize[1] * psize[2];
    for (int64_t z = 0; z < size[0]; ++z)
      for (int64_t y = 0; y < size[1]; ++y)
        fn((z * size[1] + y) * size[2], (z + pad[0]) * sdp + (y + pad[1]) * sh + pad[2]);
  }
};

namespace direct_base {
constexpr int kVecBytes = 32;
#include "conv_direct_kernels.h"
}  // namespace direct_base

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPLINET_DIRECT_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace direct_avx2 {
constexpr int kVecBytes = 32;
#include "conv_direct_kernels.h"
}  // namespace direct_avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace direct_avx512 {
constexpr int kVecBytes = 64;
#include "conv_direct_kernels.h"
}  // namespace direct_avx512
#pragma GCC pop_options
#endif

// Which build of the kernels the CPU runs: 2 AVX-512, 1 AVX2 + FMA, 0 the baseline. On 2
// threads of an AMD EPYC the AVX-512 build made the conv layer's fwd+bwd (N = 10, k = 3)
// 5% faster than AVX2 at B = 16, C = 32, L = 64, 10% at B = 8, C = 8, 16x16 and 13% at
// B = 8, C = 16, 32x32 (alternating runs). The filter gradient's lane sums follow the vector
// width, so its last bits depend on the build (on one machine they are fixed).
inline int direct_isa() {
#ifdef SPLINET_DIRECT_X86
  static const int isa = __builtin_cpu_supports("avx512f")                                  ? 2
                         : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1
                                                                                           : 0;
  return isa;
#else
  return 0;
#endif
}

// One stage's filter packed for the direct kernels: [ci][tap][co] for conv, and its transpose
// (channels swapped, taps reversed: tap T-1-t has offset -off[t]) for conv_t, with co padded
// to a multiple of kCoBlock with zeros.
template <typename T>
struct PackedFilter {
  std::vector<T> fwd, adj, bias;
  bool has_bias = false;
};

// The direct convolution of one layer's geometry: C channels, per-thread padded buffers.
template <typename T>
class DirectConv {
 public:
  DirectConv(int64_t B, int64_t C, const std::vector<int64_t>& spatial, const std::vector<int64_t>& kernel)
      : B_(B), C_(C), Cp_((C + kCoBlock - 1) / kCoBlock * kCoBlock), g_(spatial, kernel) {
    partial_.resize((B_ + kGradGroup - 1) / kGradGroup * C_ * C_ * g_.taps);
  }

  // Packs filter K (C, C, *k) and bias (C, or null) into pf.
  void pack_filter(const T* K, const T* bias, PackedFilter<T>& pf) const {
    const int64_t C = C_, taps = g_.taps;
    pf.fwd.assign(C * taps * Cp_, T(0));
    pf.adj.assign(C * taps * Cp_, T(0));
    for (int64_t co = 0; co < C; ++co)
      for (int64_t ci = 0; ci < C; ++ci)
        for (int64_t t = 0; t < taps; ++t) {
          const T k = K[(co * C + ci) * taps + t];
          pf.fwd[(ci * taps + t) * Cp_ + co] = k;
          pf.adj[(co * taps + (taps - 1 - t)) * Cp_ + ci] = k;
        }
    pf.has_bias = bias != nullptr;
    pf.bias.assign(Cp_, T(0));
    if (pf.has_bias) std::copy(bias, bias + C, pf.bias.begin());
  }

  // out = conv(in, K) (+ bias when with_bias): (B, C, *spatial) contiguous.
  void conv(const PackedFilter<T>& pf, const T* in, T* out, bool with_bias) {
    run(in, out, pf.fwd.data(), with_bias && pf.has_bias ? pf.bias.data() : nullptr);
  }

  // out = conv^T(in, K), the adjoint of conv in its input (ConvTranspose with the same padding).
  void conv_t(const PackedFilter<T>& pf, const T* in, T* out) { run(in, out, pf.adj.data(), nullptr); }

  // dk (C, C, *k) = sum_b sum_p g[b, co, p] x[b, ci, p + off]: the filter gradient of conv.
  // Samples in fixed groups of kGradGroup, one partial per group, added in group order.
  void filter_grad(const T* g, const T* x, T* dk) {
    const int64_t C = C_, P = g_.P, fw = C * C * g_.taps, gs = Cp_ * g_.stride;
    const int64_t groups = (B_ + kGradGroup - 1) / kGradGroup;
    prepare();
    const int64_t split = splits(groups);
    at::parallel_for(0, groups * split, 1, [&](int64_t u0, int64_t u1) {
      Buffers& buf = bufs_[at::get_thread_num()];
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t grp = u / split, part_idx = u % split;
        const int64_t b0 = grp * kGradGroup, nb = std::min(kGradGroup, B_ - b0);
        for (int64_t b = 0; b < nb; ++b) {
          pack(g + (b0 + b) * C * P, buf.g.data() + b * gs);
          pack(x + (b0 + b) * C * P, buf.x.data() + b * gs);
        }
        int64_t lo, hi;
        co_range(part_idx, split, lo, hi);
        T* part = partial_.data() + grp * fw;
        std::fill(part + std::min(lo, C) * C * g_.taps, part + std::min(hi, C) * C * g_.taps, T(0));
        switch (direct_isa()) {
#ifdef SPLINET_DIRECT_X86
          case 2:
            direct_avx512::filter_grad_rows<T>(buf.g.data(), gs, buf.x.data(), gs, nb, C, lo, hi, part, g_);
            break;
          case 1:
            direct_avx2::filter_grad_rows<T>(buf.g.data(), gs, buf.x.data(), gs, nb, C, lo, hi, part, g_);
            break;
#endif
          default:
            direct_base::filter_grad_rows<T>(buf.g.data(), gs, buf.x.data(), gs, nb, C, lo, hi, part, g_);
        }
      }
    });
    // The groups' partials added in float64 and rounded once (float32: B / kGradGroup
    // partials, fw adds each; float64: the sums as before).
    group_total_.assign(fw, 0.0);
    for (int64_t u = 0; u < groups; ++u) {
      const T* part = partial_.data() + u * fw;
      for (int64_t e = 0; e < fw; ++e) group_total_[e] += part[e];
    }
    for (int64_t e = 0; e < fw; ++e) dk[e] = static_cast<T>(group_total_[e]);
  }

 private:
  struct Buffers {
    std::vector<T> a, out;  // one sample's padded input planes (borders zero) and output planes
    std::vector<T> g, x;    // kGradGroup samples' padded planes (borders zero) for filter_grad
  };

  void prepare() {
    const int64_t nt = at::get_num_threads();
    if (static_cast<int64_t>(bufs_.size()) >= nt) return;
    bufs_.resize(nt);
    for (Buffers& buf : bufs_) {
      buf.a.assign(Cp_ * g_.stride, T(0));
      buf.out.assign(Cp_ * g_.stride, T(0));
      buf.g.assign(kGradGroup * Cp_ * g_.stride, T(0));
      buf.x.assign(kGradGroup * Cp_ * g_.stride, T(0));
    }
  }

  // Copies the C planes of one sample into the interior of a padded buffer.
  void pack(const T* src, T* dst) const {
    const int64_t W = g_.size[2];
    for (int64_t c = 0; c < C_; ++c)
      g_.for_rows([&](int64_t p, int64_t q) { std::memcpy(dst + c * g_.stride + q, src + c * g_.P + p, W * sizeof(T)); });
  }


  // Work items per sample (or group of samples): with fewer of those than threads, each
  // one's output channels are split too, so that a batch of 1 uses every core. Each value is
  // computed by one item whatever the split, so results do not depend on it.
  int64_t splits(int64_t units) const {
    const int64_t nt = at::in_parallel_region() ? 1 : at::get_num_threads();
    return std::max<int64_t>(1, std::min(Cp_ / kCoBlock, (nt + units - 1) / units));
  }

  // Output channels [lo, hi) of part `idx` of `split`, in whole kCoBlock blocks.
  void co_range(int64_t idx, int64_t split, int64_t& lo, int64_t& hi) const {
    const int64_t blocks = Cp_ / kCoBlock;
    lo = blocks * idx / split * kCoBlock;
    hi = blocks * (idx + 1) / split * kCoBlock;
  }

  void run(const T* in, T* out, const T* wpk, const T* bias) {
    const int64_t C = C_, P = g_.P, W = g_.size[2];
    prepare();
    const int64_t split = splits(B_);
    at::parallel_for(0, B_ * split, 1, [&](int64_t u0, int64_t u1) {
      Buffers& buf = bufs_[at::get_thread_num()];
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / split;
        int64_t lo, hi;
        co_range(u % split, split, lo, hi);
        pack(in + b * C * P, buf.a.data());
        switch (direct_isa()) {
#ifdef SPLINET_DIRECT_X86
          case 2:
            direct_avx512::conv_rows<T>(buf.a.data(), C, wpk, bias, buf.out.data(), Cp_, lo, hi, g_);
            break;
          case 1:
            direct_avx2::conv_rows<T>(buf.a.data(), C, wpk, bias, buf.out.data(), Cp_, lo, hi, g_);
            break;
#endif
          default:
            direct_base::conv_rows<T>(buf.a.data(), C, wpk, bias, buf.out.data(), Cp_, lo, hi, g_);
        }
        T* dst = out + b * C * P;
        for (int64_t c = lo; c < std::min(hi, C); ++c)
          g_.for_rows([&](int64_t p, int64_t q) {
            std::memcpy(dst + c * P + p, buf.out.data() + c * g_.stride + q, W * sizeof(T));
          });
      }
    });
  }

  int64_t B_, C_, Cp_;
  PaddedGrid g_;
  std::vector<T> partial_;
  std::vector<double> group_total_;
  std::vector<Buffers> bufs_;
};

}  // namespace cpu
}  // namespace splinet
