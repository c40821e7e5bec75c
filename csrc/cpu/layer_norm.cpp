// LayerNorm on CPU (float32): rows in parallel with at::parallel_for (jobs past kParallelGrain elements), 16-lane
// vectors within a row.
//   forward : statistics per row (sum, then squared deviations: the row is read from memory once and re-read
//             from L1), then normalise and apply the affine in one sweep.
//   backward: dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)) per row; dW = sum g*xhat and dB = sum g
//             as partial sums over fixed chunks of rows, reduced once in chunk order, so the result is the same
//             for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "../host_utils.h"
#include "buffer_pool.h"
#include "parallel.h"
#include "simd.h"

namespace chargpt {
namespace {

using simd::kWidth;
using simd::vfloat;

constexpr int64_t kMinElementsPerChunk = 16384;  // of a dW/dB partial-sum chunk: amortises its partials

// Outputs much larger than the L2 caches are written with non-temporal stores: the write-allocate read of each
// line is skipped (a third of a plain store's traffic), and the output would not stay in cache anyway. Smaller
// outputs stay cached for the next op to read.
inline bool streaming_output(int64_t m, int64_t n) { return m * n * static_cast<int64_t>(sizeof(float)) >= (8 << 20); }

// Mean and M2 (sum of squared deviations) of a row, two sweeps over it: the sum, then the squared deviations
// from the mean. The row is read from memory once: the second sweep hits L1 (a row of N floats fits for N up to
// ~12K, L2 beyond). Numerically this is the textbook two-pass algorithm, at least as accurate as Welford, and
// without Welford's per-block division and its dependent update chain. Four vector accumulators hide the add
// latency; the lanes are summed in a fixed tree order.
// R rows at once (R independent dependency chains for short rows); each row's arithmetic is the same for every R,
// so how rows are grouped (which depends on the thread split) never changes a result.
// kShift sums x - x[0] instead of x (shifted data): a constant row then sums to exactly 0, so its mean is exactly
// x[0], its deviations exactly 0, and it normalises to exactly 0 for any eps; and a large offset no longer swamps
// small deviations. It costs a subtraction per element and, for R = 4 on AVX2, registers (~20-30% on such rows,
// measured), so only the rows that need it take it (rows_moments below).
template <int R, bool kShift>
inline void two_pass_moments(const float* const* x, int64_t n, float* mean_out, float* m2_out) {
  constexpr int64_t kBlock = 4 * kWidth;
  const int64_t nb = n / kBlock * kBlock, nv = n / kWidth * kWidth;
  const float inv_n = 1.f / static_cast<float>(n);
  float origin[R];
  for (int r = 0; r < R; ++r) origin[r] = kShift ? x[r][0] : 0.f;
  vfloat acc[R][4] = {};
  for (int64_t j = 0; j < nb; j += kBlock)
    for (int r = 0; r < R; ++r)
      for (int a = 0; a < 4; ++a) {
        const vfloat v = simd::load(x[r] + j + a * kWidth);
        acc[r][a] += kShift ? v - origin[r] : v;
      }
  for (int64_t j = nb; j < nv; j += kWidth)
    for (int r = 0; r < R; ++r) {
      const vfloat v = simd::load(x[r] + j);
      acc[r][0] += kShift ? v - origin[r] : v;
    }
  float mu[R];
  for (int r = 0; r < R; ++r) {
    float sum = simd::reduce_add((acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3]));
    for (int64_t j = nv; j < n; ++j) sum += kShift ? x[r][j] - origin[r] : x[r][j];
    mu[r] = kShift ? origin[r] + sum * inv_n : sum * inv_n;
  }
  vfloat sq[R][4] = {};
  for (int64_t j = 0; j < nb; j += kBlock)
    for (int r = 0; r < R; ++r)
      for (int a = 0; a < 4; ++a) {
        const vfloat d = simd::load(x[r] + j + a * kWidth) - mu[r];
        sq[r][a] = simd::fma(d, d, sq[r][a]);
      }
  for (int64_t j = nb; j < nv; j += kWidth)
    for (int r = 0; r < R; ++r) {
      const vfloat d = simd::load(x[r] + j) - mu[r];
      sq[r][0] = simd::fma(d, d, sq[r][0]);
    }
  for (int r = 0; r < R; ++r) {
    float m2 = simd::reduce_add((sq[r][0] + sq[r][1]) + (sq[r][2] + sq[r][3]));
    for (int64_t j = nv; j < n; ++j) m2 = std::fma(x[r][j] - mu[r], x[r][j] - mu[r], m2);
    mean_out[r] = mu[r];
    m2_out[r] = m2;
  }
}

// Mean and M2 of R rows. A row whose spread is tiny next to its mean (sigma < |mean| / 256; constant rows above all)
// loses its deviations to the rounding of the plain sum: a few ulps of the mean, divided by sqrt(eps) = 1e-6 for
// BERT's eps, gave outputs of 0.01-1 instead of 0. Such rows (and NaN ones) are redone with shifted sums, from
// cache; other rows never are, so they keep their speed and their bits.
template <int R>
inline void rows_moments(const float* const* x, int64_t n, float* mean_out, float* m2_out) {
  two_pass_moments<R, false>(x, n, mean_out, m2_out);
  for (int r = 0; r < R; ++r) {
    const float mu = mean_out[r];
    if (!(m2_out[r] > static_cast<float>(n) * (mu * mu) * 0x1p-16f))
      two_pass_moments<1, true>(&x[r], n, &mean_out[r], &m2_out[r]);
  }
}

// y = (x - mean) * rstd * w + b over one row, prefetching the row `ahead` (one cache line per vector).
template <bool kWeight, bool kBias, bool kStream>
void normalize_row(const float* x, float* y, const float* w, const float* b, int64_t n, float mean, float rstd,
                   const float* ahead) {
  const int64_t nv = n / kWidth * kWidth;
  for (int64_t j = 0; j < nv; j += kWidth) {
    simd::prefetch(ahead + j);
    vfloat v = (simd::load(x + j) - mean) * rstd;
    if constexpr (kWeight && kBias) v = simd::fma(v, simd::load(w + j), simd::load(b + j));
    else if constexpr (kWeight) v *= simd::load(w + j);
    else if constexpr (kBias) v += simd::load(b + j);
    if constexpr (kStream) simd::store_stream(y + j, v);
    else simd::store(y + j, v);
  }
  for (int64_t j = nv; j < n; ++j) {
    float v = (x[j] - mean) * rstd;
    if constexpr (kWeight && kBias) v = std::fma(v, w[j], b[j]);
    else if constexpr (kWeight) v *= w[j];
    else if constexpr (kBias) v += b[j];
    y[j] = v;
  }
}

template <bool kWeight, bool kBias>
void forward_rows(const float* x, int64_t x_row_stride, float* y, const float* w, const float* b, float* mean,
                  float* rstd, int64_t m, int64_t n, float eps) {
  const int64_t grain = parallel_grain(n);  // rows
  const bool stream = streaming_output(m, n);
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    // Statistics stored, row r normalised, and the row `distance` rows on prefetched.
    auto finish = [&](int64_t r, float mu, float m2, int64_t distance) {
      const float* xr = x + r * x_row_stride;
      const float* ahead = r + distance < end ? xr + distance * x_row_stride : xr;
      const float rs = 1.f / std::sqrt(m2 / static_cast<float>(n) + eps);
      mean[r] = mu;
      rstd[r] = rs;
      float* yr = y + r * n;
      if (stream && simd::aligned64(yr)) normalize_row<kWeight, kBias, true>(xr, yr, w, b, n, mu, rs, ahead);
      else normalize_row<kWeight, kBias, false>(xr, yr, w, b, n, mu, rs, ahead);
    };
    constexpr int kRows = 4;
    int64_t r = begin;
    if (n <= 512) {  // short rows: four at a time
      for (; r + kRows <= end; r += kRows) {
        const float* rows[kRows];
        float mu[kRows], m2[kRows];
        for (int i = 0; i < kRows; ++i) rows[i] = x + (r + i) * x_row_stride;
        rows_moments<kRows>(rows, n, mu, m2);
        for (int i = 0; i < kRows; ++i) finish(r + i, mu[i], m2[i], kRows);
      }
    }
    for (; r < end; ++r) {
      const float* row = x + r * x_row_stride;
      float mu, m2;
      rows_moments<1>(&row, n, &mu, &m2);
      finish(r, mu, m2, 1);
    }
    if (stream) simd::stream_fence();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x_in,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  double eps) {
  check_layer_norm_fwd_args(x_in, weight, bias, eps);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "chargpt::layer_norm_fwd on CPU supports float32, got ",
              x_in.scalar_type());
  // Strided columns (a slice like x[..., ::2]) are copied once: the vector loads need unit stride.
  const at::Tensor x = unit_last_dim(x_in);
  const int64_t m = x.size(0), n = x.size(1);
  at::Tensor y = pooled_empty({m, n});
  at::Tensor mean = at::empty({m}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({m}, x.options().dtype(at::kFloat));
  if (m == 0) return {y, mean, rstd};
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* wp = w.defined() ? w.const_data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  auto run = [&](auto kernel) {
    kernel(x.const_data_ptr<float>(), x.stride(0), y.mutable_data_ptr<float>(), wp, bp,
           mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), m, n, static_cast<float>(eps));
  };
  if (wp && bp) run(forward_rows<true, true>);
  else if (wp) run(forward_rows<true, false>);
  else if (bp) run(forward_rows<false, true>);
  else run(forward_rows<false, false>);
  return {y, mean, rstd};
}

// R rows of the backward: dx into dx[r], g*xhat and g added to the chunk's partial sums. The first sweep only
// reduces (2R independent accumulators), the second writes dx and updates the partials once per R rows (the
// partials stay in L1). Rows are grouped from the start of their chunk, and chunks do not depend on the thread
// count, so neither do the results.
template <int R, bool kWeight, bool kStream>
inline void backward_rows(const float* const* x, const float* const* g, const float* w, float* const* dx,
                          float* dw_part, float* db_part, int64_t n, const float* mean, const float* rstd) {
  const int64_t nv = n / kWidth * kWidth;
  vfloat sum_gw[R] = {}, sum_gwx[R] = {};
  for (int64_t j = 0; j < nv; j += kWidth) {
    const vfloat wv = kWeight ? simd::load(w + j) : simd::splat(1.f);
    for (int r = 0; r < R; ++r) {
      const vfloat xhat = (simd::load(x[r] + j) - mean[r]) * rstd[r];
      const vfloat gw = kWeight ? simd::load(g[r] + j) * wv : simd::load(g[r] + j);
      sum_gw[r] += gw;
      sum_gwx[r] = simd::fma(gw, xhat, sum_gwx[r]);
    }
  }
  const float inv_n = 1.f / static_cast<float>(n);
  float c1[R], c2[R];
  for (int r = 0; r < R; ++r) {
    float s_gw = simd::reduce_add(sum_gw[r]), s_gwx = simd::reduce_add(sum_gwx[r]);
    for (int64_t j = nv; j < n; ++j) {
      const float xhat = (x[r][j] - mean[r]) * rstd[r];
      const float gw = kWeight ? g[r][j] * w[j] : g[r][j];
      s_gw += gw;
      s_gwx = std::fma(gw, xhat, s_gwx);
    }
    c1[r] = s_gw * inv_n;
    c2[r] = s_gwx * inv_n;
  }
  for (int64_t j = 0; j < nv; j += kWidth) {
    const vfloat wv = kWeight ? simd::load(w + j) : simd::splat(1.f);
    vfloat dwv = simd::load(dw_part + j), dbv = simd::load(db_part + j);
    for (int r = 0; r < R; ++r) {
      const vfloat xhat = (simd::load(x[r] + j) - mean[r]) * rstd[r];
      const vfloat gv = simd::load(g[r] + j);
      const vfloat gw = kWeight ? gv * wv : gv;
      // (gw - c1) first: for N = 1 it is exactly 0 and xhat is 0, so dx is exactly 0.
      const vfloat d = simd::fma(xhat, simd::splat(-c2[r]), gw - c1[r]) * rstd[r];
      if constexpr (kStream) simd::store_stream(dx[r] + j, d);
      else simd::store(dx[r] + j, d);
      dwv = simd::fma(gv, xhat, dwv);
      dbv += gv;
    }
    simd::store(dw_part + j, dwv);
    simd::store(db_part + j, dbv);
  }
  for (int64_t j = nv; j < n; ++j)
    for (int r = 0; r < R; ++r) {
      const float xhat = (x[r][j] - mean[r]) * rstd[r];
      const float gw = kWeight ? g[r][j] * w[j] : g[r][j];
      dx[r][j] = std::fma(xhat, -c2[r], gw - c1[r]) * rstd[r];
      dw_part[j] = std::fma(g[r][j], xhat, dw_part[j]);
      db_part[j] += g[r][j];
    }
}

template <int R>
void backward_dispatch(bool weight, bool stream, const float* const* x, const float* const* g, const float* w,
                       float* const* dx, float* dw_part, float* db_part, int64_t n, const float* mean,
                       const float* rstd) {
  if (weight && stream) backward_rows<R, true, true>(x, g, w, dx, dw_part, db_part, n, mean, rstd);
  else if (weight) backward_rows<R, true, false>(x, g, w, dx, dw_part, db_part, n, mean, rstd);
  else if (stream) backward_rows<R, false, true>(x, g, w, dx, dw_part, db_part, n, mean, rstd);
  else backward_rows<R, false, false>(x, g, w, dx, dw_part, db_part, n, mean, rstd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(const at::Tensor& grad_out_in,
                                                                  const at::Tensor& x_in,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const at::Tensor& mean_in,
                                                                  const at::Tensor& rstd_in) {
  check_layer_norm_bwd_args(grad_out_in, x_in, weight, mean_in, rstd_in);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "chargpt::layer_norm_bwd on CPU supports float32, got ",
              x_in.scalar_type());
  const at::Tensor x = unit_last_dim(x_in), g = unit_last_dim(grad_out_in);
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t m = x.size(0), n = x.size(1);
  at::Tensor dx = pooled_empty({m, n});
  at::Tensor dw = at::empty({n}, x.options());  // every entry is written by the reduction below
  at::Tensor db = at::empty({n}, x.options());
  if (m == 0) return {dx, dw.zero_(), db.zero_()};
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();

  // Fixed chunks of rows (independent of the thread count): at most 64, each big enough to amortise its partials.
  const int64_t rows_per_chunk =
      std::max<int64_t>({(m + 63) / 64, kMinElementsPerChunk / n, int64_t{1}});
  const int64_t chunks = (m + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t padded_n = (n + kWidth - 1) / kWidth * kWidth;
  std::vector<float> partials(static_cast<size_t>(chunks * 2 * padded_n), 0.f);

  const float* xp = x.const_data_ptr<float>();
  const float* gp = g.const_data_ptr<float>();
  const float* wp = w.defined() ? w.const_data_ptr<float>() : nullptr;
  const float* mp = mean.const_data_ptr<float>();
  const float* rp = rstd.const_data_ptr<float>();
  float* dxp = dx.mutable_data_ptr<float>();
  const bool stream = streaming_output(m, n);
  at::parallel_for(0, chunks, parallel_grain(rows_per_chunk * n), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      float* dw_part = partials.data() + c * 2 * padded_n;
      float* db_part = dw_part + padded_n;
      const int64_t r_end = std::min(m, (c + 1) * rows_per_chunk);
      // Streaming needs every dx row 64-byte aligned: true for pooled outputs when n is a multiple of 16.
      const bool stream_rows = stream && simd::aligned64(dxp) && n % kWidth == 0;
      constexpr int kRows = 4;
      int64_t r = c * rows_per_chunk;
      for (; r + kRows <= r_end; r += kRows) {
        const float* xs[kRows];
        const float* gs[kRows];
        float* dxs[kRows];
        for (int i = 0; i < kRows; ++i) {
          xs[i] = xp + (r + i) * x.stride(0);
          gs[i] = gp + (r + i) * g.stride(0);
          dxs[i] = dxp + (r + i) * n;
        }
        backward_dispatch<kRows>(wp != nullptr, stream_rows, xs, gs, wp, dxs, dw_part, db_part, n, mp + r, rp + r);
      }
      for (; r < r_end; ++r) {
        const float* xr = xp + r * x.stride(0);
        const float* gr = gp + r * g.stride(0);
        float* dxr = dxp + r * n;
        backward_dispatch<1>(wp != nullptr, stream_rows, &xr, &gr, wp, &dxr, dw_part, db_part, n, mp + r, rp + r);
      }
    }
    if (stream) simd::stream_fence();
  });
  // Reduce the chunk partials once, in chunk order (double accumulators: the sums can span many rows).
  float* dwp = dw.mutable_data_ptr<float>();
  float* dbp = db.mutable_data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(256, parallel_grain(2 * chunks)), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      double sw = 0.0, sb = 0.0;
      for (int64_t c = 0; c < chunks; ++c) {
        sw += partials[c * 2 * padded_n + j];
        sb += partials[c * 2 * padded_n + padded_n + j];
      }
      dwp[j] = static_cast<float>(sw);
      dbp[j] = static_cast<float>(sb);
    }
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(chargpt, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace chargpt
