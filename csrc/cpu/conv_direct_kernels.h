// The inner kernels of the direct CPU convolution (conv_direct.h), written once and compiled
// for the baseline instruction set and, on x86-64 with GCC, for AVX2 + FMA and for AVX-512
// with vectors twice as wide (the file is included under `#pragma GCC target`, after the
// namespace defines kVecBytes). Include only from conv_direct.h, inside the
// namespace it opens; it has no include guard on purpose.
//
// Every plane lives in a zero-bordered buffer (see PaddedGrid): a "same" convolution with
// stride 1 is then, at every flat position q of the padded grid,
//     out[co][q] = bias[co] + sum_ci sum_t K[co][ci][t] * in[ci][q + off[t]],
// one contiguous multiply-add per tap and input channel, computed over whole vectors of
// positions. The positions in the border come out as garbage that the caller never reads.

// A vector of kVecBytes bytes of T (set by the including namespace: 32, 8 float32 lanes, one
// AVX register or two SSE / NEON registers; 64 for AVX-512). GCC and Clang vector
// extensions, so the same code serves every target.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVecBytes)));
  static constexpr int lanes = kVecBytes / sizeof(T);
};

template <typename T>
inline typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void vstore(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// s in every lane (a vector-scalar operation, which compiles to one broadcast).
template <typename T>
inline typename Vec<T>::type vsplat(T s) {
  return typename Vec<T>::type{} + s;
}

// out (cout_pad rows) = bias + wpk * in over positions [g.q0, g.q_end), for the output rows
// [co_begin, co_end) (multiples of kCoBlock).
// wpk is packed [cin][tap][cout_pad] (cout_pad a multiple of kCoBlock, zero past the real
// channels) so that the kCoBlock weights of one (ci, tap) are adjacent. Each output is
// summed over ci, then taps, in order: the result does not depend on threads.
template <typename T>
void conv_rows(const T* __restrict__ in, int64_t cin, const T* __restrict__ wpk, const T* __restrict__ bias,
               T* __restrict__ out, int64_t cout_pad, int64_t co_begin, int64_t co_end, const PaddedGrid& g) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::lanes;
  const int64_t taps = g.taps, stride = g.stride;
  const int64_t* off = g.off.data();
  for (int64_t co0 = co_begin; co0 < co_end; co0 += kCoBlock) {
    V b[kCoBlock];
    for (int j = 0; j < kCoBlock; ++j) b[j] = vsplat<T>(bias != nullptr ? bias[co0 + j] : T(0));
    for (int64_t q = g.q0; q < g.q_end; q += 2 * W) {
      V acc0[kCoBlock], acc1[kCoBlock];
      for (int j = 0; j < kCoBlock; ++j) acc0[j] = acc1[j] = b[j];
      for (int64_t ci = 0; ci < cin; ++ci) {
        const T* xr = in + ci * stride + q;
        const T* wr = wpk + ci * taps * cout_pad + co0;
        for (int64_t t = 0; t < taps; ++t) {
          const V x0 = vload(xr + off[t]), x1 = vload(xr + off[t] + W);
          const T* wt = wr + t * cout_pad;
          for (int j = 0; j < kCoBlock; ++j) {  // vector * scalar: one broadcast of the weight
            acc0[j] += x0 * wt[j];
            acc1[j] += x1 * wt[j];
          }
        }
      }
      for (int j = 0; j < kCoBlock; ++j) {
        vstore(out + (co0 + j) * stride + q, acc0[j]);
        vstore(out + (co0 + j) * stride + q + W, acc1[j]);
      }
    }
  }
}

// dk[co][ci][t] += sum_b sum_q gr_b[co][q] * xr_b[ci][q + off[t]] over positions
// [g.q0, g.q_end) of `samples` samples (sample b's buffers at gr + b * gstep, xr + b * xstep;
// gr zero outside the plane's interior, including the rows from c up to a multiple of
// kCoBlock): the filter gradient of a group of samples, for output channels [co_begin,
// co_end) (multiples of kCoBlock). Taps in groups of kTapBlock; every sum in a fixed order.
template <typename T>
void filter_grad_rows(const T* __restrict__ gr, int64_t gstep, const T* __restrict__ xr, int64_t xstep,
                      int64_t samples, int64_t c, int64_t co_begin, int64_t co_end, T* __restrict__ dk,
                      const PaddedGrid& g) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::lanes;
  const int64_t taps = g.taps, stride = g.stride;
  const int64_t* off = g.off.data();
  for (int64_t co0 = co_begin; co0 < co_end; co0 += kCoBlock) {
    for (int64_t ci = 0; ci < c; ++ci) {
      int64_t t0 = 0;
      for (; t0 + kTapBlock <= taps; t0 += kTapBlock) {
        V acc[kCoBlock][kTapBlock];
        for (int j = 0; j < kCoBlock; ++j)
          for (int u = 0; u < kTapBlock; ++u) acc[j][u] = vsplat<T>(T(0));
        for (int64_t b = 0; b < samples; ++b) {
          const T* gb = gr + b * gstep + co0 * stride;
          const T* xc = xr + b * xstep + ci * stride;
          for (int64_t q = g.q0; q < g.q_end; q += W) {
            V gv[kCoBlock];
            for (int j = 0; j < kCoBlock; ++j) gv[j] = vload(gb + j * stride + q);
            for (int u = 0; u < kTapBlock; ++u) {
              const V x = vload(xc + q + off[t0 + u]);
              for (int j = 0; j < kCoBlock; ++j) acc[j][u] += gv[j] * x;
            }
          }
        }
        for (int j = 0; j < kCoBlock && co0 + j < c; ++j)
          for (int u = 0; u < kTapBlock; ++u) {
            T s = T(0);
            for (int l = 0; l < W; ++l) s += acc[j][u][l];
            dk[((co0 + j) * c + ci) * taps + t0 + u] += s;
          }
      }
      for (; t0 < taps; ++t0) {
        V acc[kCoBlock];
        for (int j = 0; j < kCoBlock; ++j) acc[j] = vsplat<T>(T(0));
        for (int64_t b = 0; b < samples; ++b) {
          const T* gb = gr + b * gstep + co0 * stride;
          const T* xc = xr + b * xstep + ci * stride;
          for (int64_t q = g.q0; q < g.q_end; q += W) {
            const V x = vload(xc + q + off[t0]);
            for (int j = 0; j < kCoBlock; ++j) acc[j] += vload(gb + j * stride + q) * x;
          }
        }
        for (int j = 0; j < kCoBlock && co0 + j < c; ++j) {
          T s = T(0);
          for (int l = 0; l < W; ++l) s += acc[j][l];
          dk[((co0 + j) * c + ci) * taps + t0] += s;
        }
      }
    }
  }
}
