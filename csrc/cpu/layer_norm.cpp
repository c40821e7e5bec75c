// LayerNorm on CPU (float32): rows in parallel with at::parallel_for, 16-lane vectors within a row.
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
#include "buffer_pool.h"
#include "simd.h"

namespace chargpt {
namespace {

using simd::kWidth;
using simd::vfloat;

constexpr int64_t kMinElementsPerTask = 16384;  // below this a thread hand-off costs more than it saves

// Mean and M2 (sum of squared deviations) of one row, two sweeps over it: the sum, then the squared deviations
// from the mean. The row is read from memory once: the second sweep hits L1 (a row of N floats fits for N up to
// ~12K, L2 beyond). Numerically this is the textbook two-pass algorithm, at least as accurate as Welford, and
// without Welford's per-block division and its dependent update chain. Four vector accumulators hide the add
// latency; the lanes are summed in a fixed tree order.
inline void row_moments(const float* x, int64_t n, float& mean_out, float& m2_out) {
  constexpr int64_t kBlock = 4 * kWidth;
  const int64_t nb = n / kBlock * kBlock, nv = n / kWidth * kWidth;
  vfloat acc[4] = {};
  for (int64_t j = 0; j < nb; j += kBlock)
    for (int a = 0; a < 4; ++a) acc[a] += simd::load(x + j + a * kWidth);
  for (int64_t j = nb; j < nv; j += kWidth) acc[0] += simd::load(x + j);
  float sum = simd::reduce_add((acc[0] + acc[1]) + (acc[2] + acc[3]));
  for (int64_t j = nv; j < n; ++j) sum += x[j];
  const float mu = sum / static_cast<float>(n);
  vfloat sq[4] = {};
  for (int64_t j = 0; j < nb; j += kBlock)
    for (int a = 0; a < 4; ++a) {
      const vfloat d = simd::load(x + j + a * kWidth) - mu;
      sq[a] += d * d;
    }
  for (int64_t j = nb; j < nv; j += kWidth) {
    const vfloat d = simd::load(x + j) - mu;
    sq[0] += d * d;
  }
  float m2 = simd::reduce_add((sq[0] + sq[1]) + (sq[2] + sq[3]));
  for (int64_t j = nv; j < n; ++j) m2 += (x[j] - mu) * (x[j] - mu);
  mean_out = mu;
  m2_out = m2;
}

template <bool kWeight, bool kBias>
void normalize_row(const float* x, float* y, const float* w, const float* b, int64_t n, float mean, float rstd) {
  const int64_t nv = n / kWidth * kWidth;
  for (int64_t j = 0; j < nv; j += kWidth) {
    vfloat v = (simd::load(x + j) - mean) * rstd;
    if constexpr (kWeight) v *= simd::load(w + j);
    if constexpr (kBias) v += simd::load(b + j);
    simd::store(y + j, v);
  }
  for (int64_t j = nv; j < n; ++j) {
    float v = (x[j] - mean) * rstd;
    if constexpr (kWeight) v *= w[j];
    if constexpr (kBias) v += b[j];
    y[j] = v;
  }
}

template <bool kWeight, bool kBias>
void forward_rows(const float* x, int64_t x_row_stride, float* y, const float* w, const float* b, float* mean,
                  float* rstd, int64_t m, int64_t n, float eps) {
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / n);
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = x + r * x_row_stride;
      float mu, m2;
      row_moments(xr, n, mu, m2);
      const float rs = 1.f / std::sqrt(m2 / static_cast<float>(n) + eps);
      mean[r] = mu;
      rstd[r] = rs;
      normalize_row<kWeight, kBias>(xr, y + r * n, w, b, n, mu, rs);
    }
  });
}

// The unit-stride 2-D float view the kernels read: rows may be strided, columns must be contiguous.
at::Tensor rows_with_unit_columns(const at::Tensor& t) {
  return t.stride(1) == 1 && t.stride(0) >= 0 ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x_in,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  double eps) {
  check_layer_norm_fwd_args(x_in, weight, bias, eps);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "chargpt::layer_norm_fwd on CPU supports float32, got ",
              x_in.scalar_type());
  // Strided columns (a slice like x[..., ::2]) are copied once: the vector loads need unit stride.
  const at::Tensor x = rows_with_unit_columns(x_in);
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

// One row of the backward: dx into dx, g*xhat and g added to the chunk's partial sums. The first sweep only
// reduces (four independent accumulators), the second writes dx and updates the partials (L1-resident).
template <bool kWeight>
inline void backward_row(const float* x, const float* g, const float* w, float* dx, float* dw_part,
                         float* db_part, int64_t n, float mean, float rstd) {
  const int64_t nv = n / kWidth * kWidth, nb = n / (2 * kWidth) * (2 * kWidth);
  vfloat sum_gw[2] = {}, sum_gwx[2] = {};
  for (int64_t j = 0; j < nb; j += 2 * kWidth)
    for (int a = 0; a < 2; ++a) {
      const int64_t k = j + a * kWidth;
      const vfloat xhat = (simd::load(x + k) - mean) * rstd;
      const vfloat gw = kWeight ? simd::load(g + k) * simd::load(w + k) : simd::load(g + k);
      sum_gw[a] += gw;
      sum_gwx[a] += gw * xhat;
    }
  for (int64_t j = nb; j < nv; j += kWidth) {
    const vfloat xhat = (simd::load(x + j) - mean) * rstd;
    const vfloat gw = kWeight ? simd::load(g + j) * simd::load(w + j) : simd::load(g + j);
    sum_gw[0] += gw;
    sum_gwx[0] += gw * xhat;
  }
  float s_gw = simd::reduce_add(sum_gw[0] + sum_gw[1]), s_gwx = simd::reduce_add(sum_gwx[0] + sum_gwx[1]);
  for (int64_t j = nv; j < n; ++j) {
    const float xhat = (x[j] - mean) * rstd;
    const float gw = kWeight ? g[j] * w[j] : g[j];
    s_gw += gw;
    s_gwx += gw * xhat;
  }
  const float inv_n = 1.f / static_cast<float>(n);
  const float c1 = s_gw * inv_n, c2 = s_gwx * inv_n;
  for (int64_t j = 0; j < nv; j += kWidth) {
    const vfloat xhat = (simd::load(x + j) - mean) * rstd;
    const vfloat gv = simd::load(g + j);
    const vfloat gw = kWeight ? gv * simd::load(w + j) : gv;
    simd::store(dx + j, (gw - c1 - xhat * c2) * rstd);
    simd::store(dw_part + j, simd::load(dw_part + j) + gv * xhat);
    simd::store(db_part + j, simd::load(db_part + j) + gv);
  }
  for (int64_t j = nv; j < n; ++j) {
    const float xhat = (x[j] - mean) * rstd;
    const float gw = kWeight ? g[j] * w[j] : g[j];
    dx[j] = (gw - c1 - xhat * c2) * rstd;
    dw_part[j] += g[j] * xhat;
    db_part[j] += g[j];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(const at::Tensor& grad_out_in,
                                                                  const at::Tensor& x_in,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const at::Tensor& mean_in,
                                                                  const at::Tensor& rstd_in) {
  check_layer_norm_bwd_args(grad_out_in, x_in, weight, mean_in, rstd_in);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "chargpt::layer_norm_bwd on CPU supports float32, got ",
              x_in.scalar_type());
  const at::Tensor x = rows_with_unit_columns(x_in), g = rows_with_unit_columns(grad_out_in);
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t m = x.size(0), n = x.size(1);
  at::Tensor dx = pooled_empty({m, n});
  at::Tensor dw = at::empty({n}, x.options());  // every entry is written by the reduction below
  at::Tensor db = at::empty({n}, x.options());
  if (m == 0) return {dx, dw.zero_(), db.zero_()};
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();

  // Fixed chunks of rows (independent of the thread count): at most 64, each big enough to amortise its partials.
  const int64_t rows_per_chunk =
      std::max<int64_t>({(m + 63) / 64, kMinElementsPerTask / n, int64_t{1}});
  const int64_t chunks = (m + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t padded_n = (n + kWidth - 1) / kWidth * kWidth;
  std::vector<float> partials(static_cast<size_t>(chunks * 2 * padded_n), 0.f);

  const float* xp = x.const_data_ptr<float>();
  const float* gp = g.const_data_ptr<float>();
  const float* wp = w.defined() ? w.const_data_ptr<float>() : nullptr;
  const float* mp = mean.const_data_ptr<float>();
  const float* rp = rstd.const_data_ptr<float>();
  float* dxp = dx.mutable_data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      float* dw_part = partials.data() + c * 2 * padded_n;
      float* db_part = dw_part + padded_n;
      const int64_t r_end = std::min(m, (c + 1) * rows_per_chunk);
      for (int64_t r = c * rows_per_chunk; r < r_end; ++r) {
        const float* xr = xp + r * x.stride(0);
        const float* gr = gp + r * g.stride(0);
        if (wp) backward_row<true>(xr, gr, wp, dxp + r * n, dw_part, db_part, n, mp[r], rp[r]);
        else backward_row<false>(xr, gr, wp, dxp + r * n, dw_part, db_part, n, mp[r], rp[r]);
      }
    }
  });
  // Reduce the chunk partials once, in chunk order (double accumulators: the sums can span many rows).
  float* dwp = dw.mutable_data_ptr<float>();
  float* dbp = db.mutable_data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(256, kMinElementsPerTask / chunks), [&](int64_t begin, int64_t end) {
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
