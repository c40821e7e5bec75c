// LayerNorm on CUDA (fp32, fp16, bf16 in; fp32 statistics and accumulation).
//   forward : one warp per row; each lane runs Welford over its strided elements, lanes merge with shuffles
//             (Chan's formula), then a second sweep (from L1/L2) normalises and applies the affine.
//   backward: dx per row by one warp (two warp sums: mean(g*w) and mean(g*w*xhat)); dW and dB in two stages
//             (apex/llm.c): blocks of 32 columns x a chunk of rows write partial sums, then one thread per column
//             adds the chunks in order -- deterministic, no atomics.
// Rows whose pointer, stride and length allow it move 16 bytes per load (float4 / 8 halves).
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream is what at::cuda:: re-exports; this header
                                   // avoids ATen/cuda/CUDAContext.h, which needs the cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../host_utils.h"
#include "common.cuh"

namespace chargpt {
namespace {

constexpr int kRowsPerBlock = 4;  // warps per block, one row each
// Row kernels: __launch_bounds__(128, 8) keeps 8 blocks (32 warps) per SM to hide memory latency and allows up to
// 64 registers, which they fit without spilling (at the default target, one dx variant spilled).
constexpr int kPartialRows = 64;  // rows per dW/dB partial chunk

struct Welford {
  float count = 0.f, mean = 0.f, m2 = 0.f;
  __device__ void add(float x) {
    count += 1.f;
    const float delta = x - mean;
    mean += delta / count;
    m2 += delta * (x - mean);
  }
  __device__ void merge(const Welford& o) {
    const float total = count + o.count;
    if (total == 0.f) return;
    const float delta = o.mean - mean, w = o.count / total;
    mean += delta * w;
    m2 += o.m2 + delta * delta * count * w;
    count = total;
  }
};

template <typename T, int kVec>
__global__ void __launch_bounds__(32 * kRowsPerBlock, 8) layer_norm_fwd_kernel(
    const T* __restrict__ x, int64_t x_row_stride, const T* __restrict__ w, const T* __restrict__ b,
    T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t m, int64_t n, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= m) return;  // whole warp leaves together
  const int lane = threadIdx.x;
  const T* xr = x + row * x_row_stride;
  Welford stats;
  for (int64_t j = static_cast<int64_t>(lane) * kVec; j < n; j += 32 * kVec) {
    const Pack<T, kVec> p = *reinterpret_cast<const Pack<T, kVec>*>(xr + j);
#pragma unroll
    for (int e = 0; e < kVec; ++e) stats.add(to_float(p.v[e]));
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Welford other;
    other.count = __shfl_xor_sync(kFullMask, stats.count, offset);
    other.mean = __shfl_xor_sync(kFullMask, stats.mean, offset);
    other.m2 = __shfl_xor_sync(kFullMask, stats.m2, offset);
    stats.merge(other);
  }
  const float mu = stats.mean, rstd = rsqrtf(stats.m2 / static_cast<float>(n) + eps);
  if (lane == 0) {
    mean_out[row] = mu;
    rstd_out[row] = rstd;
  }
  T* yr = y + row * n;
  for (int64_t j = static_cast<int64_t>(lane) * kVec; j < n; j += 32 * kVec) {
    const Pack<T, kVec> p = *reinterpret_cast<const Pack<T, kVec>*>(xr + j);
    Pack<T, kVec> out;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      float v = (to_float(p.v[e]) - mu) * rstd;
      if (w != nullptr) v *= to_float(w[j + e]);
      if (b != nullptr) v += to_float(b[j + e]);
      out.v[e] = from_float<T>(v);
    }
    *reinterpret_cast<Pack<T, kVec>*>(yr + j) = out;
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(32 * kRowsPerBlock, 8) layer_norm_dx_kernel(
    const T* __restrict__ g, int64_t g_row_stride, const T* __restrict__ x, int64_t x_row_stride,
    const T* __restrict__ w, const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
    int64_t m, int64_t n, float inv_n) {  // inv_n from the host: a device division is an out-of-line call
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= m) return;
  const int lane = threadIdx.x;
  const T* xr = x + row * x_row_stride;
  const T* gr = g + row * g_row_stride;
  const float mu = mean[row], rs = rstd[row];
  float sum_gw = 0.f, sum_gwx = 0.f;
  for (int64_t j = static_cast<int64_t>(lane) * kVec; j < n; j += 32 * kVec) {
    const Pack<T, kVec> px = *reinterpret_cast<const Pack<T, kVec>*>(xr + j);
    const Pack<T, kVec> pg = *reinterpret_cast<const Pack<T, kVec>*>(gr + j);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float gw = to_float(pg.v[e]) * (w != nullptr ? to_float(w[j + e]) : 1.f);
      sum_gw += gw;
      sum_gwx += gw * (to_float(px.v[e]) - mu) * rs;
    }
  }
  const float c1 = warp_sum(sum_gw) * inv_n, c2 = warp_sum(sum_gwx) * inv_n;
  T* dxr = dx + row * n;
  for (int64_t j = static_cast<int64_t>(lane) * kVec; j < n; j += 32 * kVec) {
    const Pack<T, kVec> px = *reinterpret_cast<const Pack<T, kVec>*>(xr + j);
    const Pack<T, kVec> pg = *reinterpret_cast<const Pack<T, kVec>*>(gr + j);
    float res[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float gw = to_float(pg.v[e]) * (w != nullptr ? to_float(w[j + e]) : 1.f);
      res[e] = (gw - c1 - (to_float(px.v[e]) - mu) * rs * c2) * rs;
    }
    Pack<T, kVec> out;
#pragma unroll
    for (int e = 0; e < kVec; ++e) out.v[e] = from_float<T>(res[e]);
    *reinterpret_cast<Pack<T, kVec>*>(dxr + j) = out;
  }
}

// Stage 1: block (32 columns x 8 row lanes) sums g*xhat and g over one chunk of kPartialRows rows.
template <typename T>
__global__ void __launch_bounds__(256) layer_norm_partial_kernel(
    const T* __restrict__ g, int64_t g_row_stride, const T* __restrict__ x, int64_t x_row_stride,
    const float* __restrict__ mean, const float* __restrict__ rstd, float* __restrict__ partial, int64_t m,
    int64_t n) {
  __shared__ float dw_s[8][33], db_s[8][33];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * kPartialRows;
  const int64_t row_end = min(m, row_begin + kPartialRows);
  float dw = 0.f, db = 0.f;
  if (col < n) {
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += 8) {
      const float gv = to_float(g[r * g_row_stride + col]);
      dw += gv * (to_float(x[r * x_row_stride + col]) - mean[r]) * rstd[r];
      db += gv;
    }
  }
  dw_s[threadIdx.y][threadIdx.x] = dw;
  db_s[threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    for (int k = 1; k < 8; ++k) {
      dw += dw_s[k][threadIdx.x];
      db += db_s[k][threadIdx.x];
    }
    partial[(2 * static_cast<int64_t>(blockIdx.y)) * n + col] = dw;
    partial[(2 * static_cast<int64_t>(blockIdx.y) + 1) * n + col] = db;
  }
}

// Stage 2: one thread per column adds the chunks in order.
template <typename T>
__global__ void layer_norm_reduce_kernel(const float* __restrict__ partial, int64_t chunks, int64_t n,
                                         T* __restrict__ dw, T* __restrict__ db) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= n) return;
  float sw = 0.f, sb = 0.f;
  for (int64_t c = 0; c < chunks; ++c) {
    sw += partial[(2 * c) * n + col];
    sb += partial[(2 * c + 1) * n + col];
  }
  dw[col] = from_float<T>(sw);
  db[col] = from_float<T>(sb);
}

// 16-byte packs need 16-byte aligned rows: base pointer, row stride and row length all multiples of a pack.
template <typename T>
bool can_vectorize(const void* ptr, int64_t row_stride, int64_t n) {
  constexpr int vec = 16 / sizeof(T);
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && row_stride % vec == 0 && n % vec == 0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x_in,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   double eps) {
  check_layer_norm_fwd_args(x_in, weight, bias, eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = unit_last_dim(x_in);
  const int64_t m = x.size(0), n = x.size(1);
  at::Tensor y = at::empty({m, n}, x.options());
  at::Tensor mean = at::empty({m}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({m}, x.options().dtype(at::kFloat));
  if (m == 0) return {y, mean, rstd};
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const dim3 block(32, kRowsPerBlock), grid(static_cast<unsigned>((m + kRowsPerBlock - 1) / kRowsPerBlock));
  TORCH_CHECK(grid.x <= 0x7fffffffu, "chargpt::layer_norm_fwd: too many rows (", m, ")");
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(x.scalar_type(), "chargpt::layer_norm_fwd", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    const T* wp = w.defined() ? w.const_data_ptr<T>() : nullptr;
    const T* bp = b.defined() ? b.const_data_ptr<T>() : nullptr;
    if (can_vectorize<T>(xp, x.stride(0), n)) {
      launch_kernel(layer_norm_fwd_kernel<T, 16 / sizeof(T)>, grid, block, 0, stream, xp, x.stride(0), wp, bp,
                    y.mutable_data_ptr<T>(), mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), m, n,
                    static_cast<float>(eps));
    } else {
      launch_kernel(layer_norm_fwd_kernel<T, 1>, grid, block, 0, stream, xp, x.stride(0), wp, bp,
                    y.mutable_data_ptr<T>(), mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), m, n,
                    static_cast<float>(eps));
    }
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(const at::Tensor& grad_out_in,
                                                                   const at::Tensor& x_in,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const at::Tensor& mean_in,
                                                                   const at::Tensor& rstd_in) {
  check_layer_norm_bwd_args(grad_out_in, x_in, weight, mean_in, rstd_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = unit_last_dim(x_in), g = unit_last_dim(grad_out_in);
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t m = x.size(0), n = x.size(1);
  at::Tensor dx = at::empty({m, n}, x.options());
  at::Tensor dw = at::zeros({n}, x.options());
  at::Tensor db = at::zeros({n}, x.options());
  if (m == 0) return {dx, dw, db};
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const int64_t chunks = (m + kPartialRows - 1) / kPartialRows;
  TORCH_CHECK(chunks <= 65535, "chargpt::layer_norm_bwd: too many rows (", m, ") for the dW/dB reduction grid");
  at::Tensor partial = at::empty({2 * chunks, n}, x.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(x.scalar_type(), "chargpt::layer_norm_bwd", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    const T* gp = g.const_data_ptr<T>();
    const T* wp = w.defined() ? w.const_data_ptr<T>() : nullptr;
    const float* mp = mean.const_data_ptr<float>();
    const float* rp = rstd.const_data_ptr<float>();
    const dim3 block(32, kRowsPerBlock), grid(static_cast<unsigned>((m + kRowsPerBlock - 1) / kRowsPerBlock));
    if (can_vectorize<T>(xp, x.stride(0), n) && can_vectorize<T>(gp, g.stride(0), n)) {
      launch_kernel(layer_norm_dx_kernel<T, 16 / sizeof(T)>, grid, block, 0, stream, gp, g.stride(0), xp,
                    x.stride(0), wp, mp, rp, dx.mutable_data_ptr<T>(), m, n, 1.f / static_cast<float>(n));
    } else {
      launch_kernel(layer_norm_dx_kernel<T, 1>, grid, block, 0, stream, gp, g.stride(0), xp, x.stride(0), wp, mp,
                    rp, dx.mutable_data_ptr<T>(), m, n, 1.f / static_cast<float>(n));
    }
    const dim3 pgrid(static_cast<unsigned>((n + 31) / 32), static_cast<unsigned>(chunks)), pblock(32, 8);
    launch_kernel(layer_norm_partial_kernel<T>, pgrid, pblock, 0, stream, gp, g.stride(0), xp, x.stride(0), mp, rp,
                  partial.mutable_data_ptr<float>(), m, n);
    launch_kernel(layer_norm_reduce_kernel<T>, static_cast<unsigned>((n + 255) / 256), 256, 0, stream,
                  partial.const_data_ptr<float>(), chunks, n, dw.mutable_data_ptr<T>(), db.mutable_data_ptr<T>());
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(chargpt, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
}

}  // namespace chargpt
