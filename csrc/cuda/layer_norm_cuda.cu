// The norm family on CUDA: LayerNorm, RMSNorm and add_norm (h = residual + dropout(x), y = norm(h)); fp32, fp16,
// bf16 in; fp32 statistics and accumulation. One forward kernel, one dx kernel and one dW/dB reduction serve all
// three (RMSNorm: statistics with the mean fixed at 0, no bias; add_norm: the row normalised is the h it builds).
//   forward : one warp per row; each lane accumulates its strided elements (Welford for LayerNorm, the sum of
//             squares for RMSNorm), lanes merge with shuffles (Chan's formula), then a second sweep (from L1/L2)
//             normalises and applies the affine. add_norm writes h in the first sweep and normalises it in the
//             second, so memory sees x and residual read once, h and y written once.
//   backward: dx per row by one warp (two warp sums: mean(g*w) and mean(g*w*xhat); RMSNorm only the second), plus
//             add_norm's dh and, with dropout, x's gradient through the mask regenerated from the seed (Philox,
//             offset row * N + col: kernels/chargpt_kernels/reference.py). dW and dB in two stages (apex/llm.c): blocks
//             of 32 columns x a chunk of rows write partial sums, then one thread per column adds the chunks in order
//             -- deterministic, no atomics.
// Rows whose pointers, strides and length allow it move 16 bytes per load (float4 / 8 halves).
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream is what at::cuda:: re-exports; this header
                                   // avoids ATen/cuda/CUDAContext.h, which needs the cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../host_utils.h"
#include "../philox.h"
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

// A warp's row statistics: mean and M2 (sum of squared deviations) for LayerNorm, by Welford per lane, which is
// exact for constant rows (mean exactly the value, M2 exactly 0); for RMSNorm (kRms) the mean is 0 and M2 the sum
// of squares.
template <bool kRms>
struct RowStats {
  Welford w;
  __device__ void add(float x) { w.add(x); }
  __device__ void warp_reduce() {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      Welford other;
      other.count = __shfl_xor_sync(kFullMask, w.count, offset);
      other.mean = __shfl_xor_sync(kFullMask, w.mean, offset);
      other.m2 = __shfl_xor_sync(kFullMask, w.m2, offset);
      w.merge(other);
    }
  }
  __device__ float row_mean() const { return w.mean; }
  __device__ float row_m2() const { return w.m2; }
};

template <>
struct RowStats<true> {
  float sum_sq = 0.f;
  __device__ void add(float x) { sum_sq += x * x; }
  __device__ void warp_reduce() { sum_sq = warp_sum(sum_sq); }
  __device__ float row_mean() const { return 0.f; }
  __device__ float row_m2() const { return sum_sq; }
};

// 1/(1-p) or 0: add_norm's dropout factor for the element at `offset` (row * N + col) of x.
__device__ __forceinline__ float dropout_factor(const DropoutArgs& drop, uint64_t seed, uint64_t offset) {
  return philox_uniform(seed, offset) >= drop.p ? drop.keep_scale : 0.f;
}

template <typename T>
struct NormFwdArgs {
  const T* x;
  int64_t x_row_stride;
  const T* residual;  // add_norm (else null): the row normalised is h = residual + dropout(x), written to h
  int64_t residual_row_stride;
  T* h;
  const T* w;
  const T* b;
  T* y;
  float* mean;  // null: not wanted (rms_norm)
  float* rstd;
  int64_t m, n;
  float eps;
  DropoutArgs drop;
};

template <typename T, int kVec, bool kRms, bool kAdd>
__global__ void __launch_bounds__(32 * kRowsPerBlock, 8) norm_fwd_kernel(const NormFwdArgs<T> a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= a.m) return;  // whole warp leaves together
  const int lane = threadIdx.x;
  const T* xr = a.x + row * a.x_row_stride;
  RowStats<kRms> stats;
  if constexpr (kAdd) {
    const T* rr = a.residual + row * a.residual_row_stride;
    T* hr = a.h + row * a.n;
    const bool dropout = a.drop.p > 0.f;
    const uint64_t seed = dropout ? static_cast<uint64_t>(*a.drop.seed) : 0;
    const uint64_t base = static_cast<uint64_t>(row) * static_cast<uint64_t>(a.n);
    for (int64_t j = static_cast<int64_t>(lane) * kVec; j < a.n; j += 32 * kVec) {
      const Pack<T, kVec> px = *reinterpret_cast<const Pack<T, kVec>*>(xr + j);
      const Pack<T, kVec> pr = *reinterpret_cast<const Pack<T, kVec>*>(rr + j);
      Pack<T, kVec> out;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        float v = to_float(px.v[e]);
        if (dropout) v *= dropout_factor(a.drop, seed, base + j + e);  // x * 0 keeps a NaN, as torch's dropout
        out.v[e] = from_float<T>(to_float(pr.v[e]) + v);
        stats.add(to_float(out.v[e]));  // the h the backward will see (rounded to T)
      }
      *reinterpret_cast<Pack<T, kVec>*>(hr + j) = out;
    }
  } else {
    for (int64_t j = static_cast<int64_t>(lane) * kVec; j < a.n; j += 32 * kVec) {
      const Pack<T, kVec> p = *reinterpret_cast<const Pack<T, kVec>*>(xr + j);
#pragma unroll
      for (int e = 0; e < kVec; ++e) stats.add(to_float(p.v[e]));
    }
  }
  stats.warp_reduce();
  const float mu = stats.row_mean(), rstd = rsqrtf(stats.row_m2() / static_cast<float>(a.n) + a.eps);
  if (lane == 0) {
    if (a.mean != nullptr) a.mean[row] = mu;
    a.rstd[row] = rstd;
  }
  // The second sweep re-reads what this lane read (or wrote, for h) in the first: from L1/L2.
  const T* src = kAdd ? a.h + row * a.n : xr;
  T* yr = a.y + row * a.n;
  for (int64_t j = static_cast<int64_t>(lane) * kVec; j < a.n; j += 32 * kVec) {
    const Pack<T, kVec> p = *reinterpret_cast<const Pack<T, kVec>*>(src + j);
    Pack<T, kVec> out;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      float v = (to_float(p.v[e]) - mu) * rstd;
      if (a.w != nullptr) v *= to_float(a.w[j + e]);
      if (a.b != nullptr) v += to_float(a.b[j + e]);
      out.v[e] = from_float<T>(v);
    }
    *reinterpret_cast<Pack<T, kVec>*>(yr + j) = out;
  }
}

template <typename T>
struct NormBwdArgs {
  const T* g;  // gradient of y
  int64_t g_row_stride;
  const T* x;  // the normalised input (add_norm: h)
  int64_t x_row_stride;
  const T* gh;  // add_norm: gradient of h, added to the norm's (null when h was not used)
  int64_t gh_row_stride;
  const T* w;
  const float* mean;  // null for RMSNorm (mean 0)
  const float* rstd;
  T* dx;       // gradient of the normalised input (add_norm: of h, i.e. residual's)
  T* dx_drop;  // add_norm with dropout: dx through the dropout mask, x's gradient (else null)
  int64_t m, n;
  float inv_n;  // from the host: a device division is an out-of-line call
  DropoutArgs drop;
};

template <typename T, int kVec, bool kRms>
__global__ void __launch_bounds__(32 * kRowsPerBlock, 8) norm_dx_kernel(const NormBwdArgs<T> a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= a.m) return;
  const int lane = threadIdx.x;
  const T* xr = a.x + row * a.x_row_stride;
  const T* gr = a.g + row * a.g_row_stride;
  const float mu = kRms ? 0.f : a.mean[row], rs = a.rstd[row];
  float sum_gw = 0.f, sum_gwx = 0.f;
  for (int64_t j = static_cast<int64_t>(lane) * kVec; j < a.n; j += 32 * kVec) {
    const Pack<T, kVec> px = *reinterpret_cast<const Pack<T, kVec>*>(xr + j);
    const Pack<T, kVec> pg = *reinterpret_cast<const Pack<T, kVec>*>(gr + j);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float gw = to_float(pg.v[e]) * (a.w != nullptr ? to_float(a.w[j + e]) : 1.f);
      if constexpr (!kRms) sum_gw += gw;
      sum_gwx += gw * (to_float(px.v[e]) - mu) * rs;
    }
  }
  // RMSNorm's output does not depend on the mean: no mean(g*w) term.
  const float c1 = kRms ? 0.f : warp_sum(sum_gw) * a.inv_n, c2 = warp_sum(sum_gwx) * a.inv_n;
  const T* ghr = a.gh != nullptr ? a.gh + row * a.gh_row_stride : nullptr;
  const bool dropout = a.dx_drop != nullptr;
  const uint64_t seed = dropout ? static_cast<uint64_t>(*a.drop.seed) : 0;
  const uint64_t base = static_cast<uint64_t>(row) * static_cast<uint64_t>(a.n);
  T* dxr = a.dx + row * a.n;
  for (int64_t j = static_cast<int64_t>(lane) * kVec; j < a.n; j += 32 * kVec) {
    const Pack<T, kVec> px = *reinterpret_cast<const Pack<T, kVec>*>(xr + j);
    const Pack<T, kVec> pg = *reinterpret_cast<const Pack<T, kVec>*>(gr + j);
    float res[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float gw = to_float(pg.v[e]) * (a.w != nullptr ? to_float(a.w[j + e]) : 1.f);
      res[e] = (gw - c1 - (to_float(px.v[e]) - mu) * rs * c2) * rs;
    }
    if (ghr != nullptr) {
      const Pack<T, kVec> ph = *reinterpret_cast<const Pack<T, kVec>*>(ghr + j);
#pragma unroll
      for (int e = 0; e < kVec; ++e) res[e] += to_float(ph.v[e]);
    }
    Pack<T, kVec> out;
#pragma unroll
    for (int e = 0; e < kVec; ++e) out.v[e] = from_float<T>(res[e]);
    *reinterpret_cast<Pack<T, kVec>*>(dxr + j) = out;
    if (dropout) {  // the forward's mask, regenerated
#pragma unroll
      for (int e = 0; e < kVec; ++e) out.v[e] = from_float<T>(res[e] * dropout_factor(a.drop, seed, base + j + e));
      *reinterpret_cast<Pack<T, kVec>*>(a.dx_drop + row * a.n + j) = out;
    }
  }
}

// Stage 1: block (32 columns x 8 row lanes) sums g*xhat and g over one chunk of kPartialRows rows (mean null: 0).
template <typename T>
__global__ void __launch_bounds__(256) norm_partial_kernel(
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
      dw += gv * (to_float(x[r * x_row_stride + col]) - (mean != nullptr ? mean[r] : 0.f)) * rstd[r];
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
__global__ void norm_reduce_kernel(const float* __restrict__ partial, int64_t chunks, int64_t n, T* __restrict__ dw,
                                   T* __restrict__ db) {
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

dim3 row_grid(const char* op, int64_t m) {
  const int64_t blocks = (m + kRowsPerBlock - 1) / kRowsPerBlock;
  TORCH_CHECK(blocks <= 0x7fffffff, op, ": too many rows (", m, ")");
  return dim3(static_cast<unsigned>(blocks));
}

// The forward of every op of the family. residual undefined: normalise x (layer_norm, rms_norm). mean undefined:
// not wanted.
template <typename T>
void launch_norm_fwd(const char* op, const at::Tensor& x, const at::Tensor& residual, const at::Tensor& w,
                     const at::Tensor& b, const at::Tensor& y, const at::Tensor& h, const at::Tensor& mean,
                     const at::Tensor& rstd, double eps, bool rms, const DropoutArgs& drop) {
  const int64_t m = x.size(0), n = x.size(1);
  const bool add = residual.defined();
  NormFwdArgs<T> a{x.const_data_ptr<T>(), x.stride(0),
                   add ? residual.const_data_ptr<T>() : nullptr, add ? residual.stride(0) : 0,
                   add ? h.mutable_data_ptr<T>() : nullptr,
                   w.defined() ? w.const_data_ptr<T>() : nullptr, b.defined() ? b.const_data_ptr<T>() : nullptr,
                   y.mutable_data_ptr<T>(), mean.defined() ? mean.mutable_data_ptr<float>() : nullptr,
                   rstd.mutable_data_ptr<float>(), m, n, static_cast<float>(eps), drop};
  const bool packs = can_vectorize<T>(a.x, a.x_row_stride, n) &&
                     (!add || can_vectorize<T>(a.residual, a.residual_row_stride, n));
  const dim3 grid = row_grid(op, m), block(32, kRowsPerBlock);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto vec, auto is_rms, auto is_add) {
    launch_kernel(norm_fwd_kernel<T, decltype(vec)::value, decltype(is_rms)::value, decltype(is_add)::value>, grid,
                  block, 0, stream, a);
  };
  using Pack16 = std::integral_constant<int, 16 / sizeof(T)>;
  using One = std::integral_constant<int, 1>;
  auto by_kind = [&](auto vec) {
    if (rms && add) launch(vec, std::true_type{}, std::true_type{});
    else if (rms) launch(vec, std::true_type{}, std::false_type{});
    else if (add) launch(vec, std::false_type{}, std::true_type{});
    else launch(vec, std::false_type{}, std::false_type{});
  };
  if (packs) by_kind(Pack16{});
  else by_kind(One{});
}

// The backward of every op of the family: dx (add_norm: dh), dx_drop (add_norm with dropout), dw, db.
template <typename T>
void launch_norm_bwd(const char* op, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gh,
                     const at::Tensor& w, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& dx,
                     const at::Tensor& dx_drop, const at::Tensor& dw, const at::Tensor& db, bool rms,
                     const DropoutArgs& drop) {
  const int64_t m = x.size(0), n = x.size(1);
  NormBwdArgs<T> a{g.const_data_ptr<T>(), g.stride(0), x.const_data_ptr<T>(), x.stride(0),
                   gh.defined() ? gh.const_data_ptr<T>() : nullptr, gh.defined() ? gh.stride(0) : 0,
                   w.defined() ? w.const_data_ptr<T>() : nullptr, rms ? nullptr : mean.const_data_ptr<float>(),
                   rstd.const_data_ptr<float>(), dx.mutable_data_ptr<T>(),
                   dx_drop.defined() ? dx_drop.mutable_data_ptr<T>() : nullptr, m, n, 1.f / static_cast<float>(n),
                   drop};
  const bool packs = can_vectorize<T>(a.x, a.x_row_stride, n) && can_vectorize<T>(a.g, a.g_row_stride, n) &&
                     (a.gh == nullptr || can_vectorize<T>(a.gh, a.gh_row_stride, n));
  const dim3 grid = row_grid(op, m), block(32, kRowsPerBlock);
  auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kPack = 16 / sizeof(T);
  if (packs && rms) launch_kernel(norm_dx_kernel<T, kPack, true>, grid, block, 0, stream, a);
  else if (packs) launch_kernel(norm_dx_kernel<T, kPack, false>, grid, block, 0, stream, a);
  else if (rms) launch_kernel(norm_dx_kernel<T, 1, true>, grid, block, 0, stream, a);
  else launch_kernel(norm_dx_kernel<T, 1, false>, grid, block, 0, stream, a);

  const int64_t chunks = (m + kPartialRows - 1) / kPartialRows;
  TORCH_CHECK(chunks <= 65535, op, ": too many rows (", m, ") for the dW/dB reduction grid");
  at::Tensor partial = at::empty({2 * chunks, n}, x.options().dtype(at::kFloat));
  const dim3 pgrid(static_cast<unsigned>((n + 31) / 32), static_cast<unsigned>(chunks)), pblock(32, 8);
  launch_kernel(norm_partial_kernel<T>, pgrid, pblock, 0, stream, a.g, a.g_row_stride, a.x, a.x_row_stride, a.mean,
                a.rstd, partial.mutable_data_ptr<float>(), m, n);
  launch_kernel(norm_reduce_kernel<T>, static_cast<unsigned>((n + 255) / 256), 256, 0, stream,
                partial.const_data_ptr<float>(), chunks, n, dw.mutable_data_ptr<T>(), db.mutable_data_ptr<T>());
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
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
  dispatch_float_types(x.scalar_type(), "chargpt::layer_norm_fwd", [&](auto tag) {
    launch_norm_fwd<decltype(tag)>("chargpt::layer_norm_fwd", x, at::Tensor(), contiguous_or_undefined(weight),
                                   contiguous_or_undefined(bias), y, at::Tensor(), mean, rstd, eps, false, {});
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
  const int64_t m = x.size(0), n = x.size(1);
  at::Tensor dx = at::empty({m, n}, x.options());
  at::Tensor dw = at::zeros({n}, x.options());
  at::Tensor db = at::zeros({n}, x.options());
  if (m == 0) return {dx, dw, db};
  dispatch_float_types(x.scalar_type(), "chargpt::layer_norm_bwd", [&](auto tag) {
    launch_norm_bwd<decltype(tag)>("chargpt::layer_norm_bwd", g, x, at::Tensor(), contiguous_or_undefined(weight),
                                   mean_in.contiguous(), rstd_in.contiguous(), dx, at::Tensor(), dw, db, false, {});
  });
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                                                     double eps) {
  check_rms_norm_fwd_args(x_in, weight, eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = unit_last_dim(x_in);
  const int64_t m = x.size(0), n = x.size(1);
  at::Tensor y = at::empty({m, n}, x.options());
  at::Tensor rstd = at::empty({m}, x.options().dtype(at::kFloat));
  if (m == 0) return {y, rstd};
  dispatch_float_types(x.scalar_type(), "chargpt::rms_norm_fwd", [&](auto tag) {
    launch_norm_fwd<decltype(tag)>("chargpt::rms_norm_fwd", x, at::Tensor(), contiguous_or_undefined(weight),
                                   at::Tensor(), y, at::Tensor(), at::Tensor(), rstd, eps, true, {});
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                     const std::optional<at::Tensor>& weight,
                                                     const at::Tensor& rstd_in) {
  check_rms_norm_bwd_args(grad_out_in, x_in, weight, rstd_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = unit_last_dim(x_in), g = unit_last_dim(grad_out_in);
  const int64_t m = x.size(0), n = x.size(1);
  at::Tensor dx = at::empty({m, n}, x.options());
  at::Tensor dw = at::zeros({n}, x.options());
  if (m == 0) return {dx, dw};
  at::Tensor db = at::empty({n}, x.options());  // computed alongside dW, not returned
  dispatch_float_types(x.scalar_type(), "chargpt::rms_norm_bwd", [&](auto tag) {
    launch_norm_bwd<decltype(tag)>("chargpt::rms_norm_bwd", g, x, at::Tensor(), contiguous_or_undefined(weight),
                                   at::Tensor(), rstd_in.contiguous(), dx, at::Tensor(), dw, db, true, {});
  });
  return {dx, dw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_norm_fwd_cuda(
    const at::Tensor& x_in, const at::Tensor& residual_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, c10::string_view norm, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const bool rms = check_add_norm_fwd_args(x_in, residual_in, weight, bias, eps, norm, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = unit_last_dim(x_in), residual = unit_last_dim(residual_in);
  const int64_t m = x.size(0), n = x.size(1);
  at::Tensor y = at::empty({m, n}, x.options());
  at::Tensor h = at::empty({m, n}, x.options());
  at::Tensor mean = at::empty({m}, x.options().dtype(at::kFloat));  // RMSNorm: the kernel writes its 0
  at::Tensor rstd = at::empty({m}, x.options().dtype(at::kFloat));
  if (m == 0) return {y, h, mean, rstd};
  dispatch_float_types(x.scalar_type(), "chargpt::add_norm_fwd", [&](auto tag) {
    launch_norm_fwd<decltype(tag)>("chargpt::add_norm_fwd", x, residual, contiguous_or_undefined(weight),
                                   contiguous_or_undefined(bias), y, h, mean, rstd, eps, rms,
                                   dropout_args(dropout_p, seed));
  });
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_norm_bwd_cuda(
    const at::Tensor& grad_y_in, const std::optional<at::Tensor>& grad_h, const at::Tensor& h_in,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd, c10::string_view norm,
    double dropout_p, const std::optional<at::Tensor>& seed) {
  const bool rms = check_add_norm_bwd_args(grad_y_in, grad_h, h_in, weight, mean, rstd, norm, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = unit_last_dim(h_in), g = unit_last_dim(grad_y_in);
  const at::Tensor gh = grad_h.has_value() ? unit_last_dim(*grad_h) : at::Tensor();
  const int64_t m = h.size(0), n = h.size(1);
  at::Tensor dh = at::empty({m, n}, h.options());
  // Without dropout x's gradient is h's: an empty placeholder instead of a copy (see add_norm_bwd's schema).
  at::Tensor dx = dropout_p > 0.0 ? at::empty({m, n}, h.options()) : at::empty({0}, h.options());
  at::Tensor dw = at::zeros({n}, h.options());
  at::Tensor db = at::zeros({n}, h.options());
  if (m == 0) return {dh, dx, dw, db};
  dispatch_float_types(h.scalar_type(), "chargpt::add_norm_bwd", [&](auto tag) {
    launch_norm_bwd<decltype(tag)>("chargpt::add_norm_bwd", g, h, gh, contiguous_or_undefined(weight),
                                   mean.contiguous(), rstd.contiguous(), dh, dropout_p > 0.0 ? dx : at::Tensor(), dw,
                                   db, rms, dropout_args(dropout_p, seed));
  });
  return {dh, dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(chargpt, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
  m.impl("rms_norm_fwd", &rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cuda);
  m.impl("add_norm_fwd", &add_norm_fwd_cuda);
  m.impl("add_norm_bwd", &add_norm_bwd_cuda);
}

}  // namespace chargpt
