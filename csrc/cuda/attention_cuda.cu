// Attention on CUDA (fp32, fp16, bf16 in; fp32 scores, softmax and accumulators). A SIMT first version:
//   forward : a block of 4 warps owns 4*R query rows (scaled by `scale` as they land in shared memory); key and
//             value tiles of BK rows are staged in shared memory (fp32) and shared by all warps. Per tile and row,
//             lane j scores key j (a dot product over shared memory), the warp takes max and sum with shuffles
//             (online softmax: running max m, running sum l, accumulator rescaled by exp(m_old - m_new)), and
//             then lane d accumulates P V for dims d, d+32, ... . Causal blocks past the diagonal are skipped.
//   backward: delta = rowsum(dO * O); then dK/dV with one warp per 4 keys and dQ with one warp per 4 query rows,
//             both recomputing P = exp(S - lse) from the saved log-sum-exp, lanes over the head dim, dot products
//             reduced with shuffles. Each output element is owned by one warp: no atomics, deterministic.
// Dropout: keep iff philox_uniform(seed, ((b*H + h)*Tq + i)*Tk + j) >= p (../philox.h), the seed read from device
// memory inside the kernels (no host sync), regenerated in the backward.
// Head dims are bucketed to 64/128/256 (DPL = dims per lane 2/4/8); padding dims are zero.
// Tensor cores: fp16/bf16 with d a multiple of 16 up to 128 on sm_80+ take attention_fwd_tc_kernel (WMMA, fp32
// accumulation, the same masking, softmax bookkeeping and dropout); the backward is SIMT for every input.
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream is what at::cuda:: re-exports; this header
                                   // avoids ATen/cuda/CUDAContext.h, which needs the cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include "../checks.h"
#include "../philox.h"
#include "common.cuh"

namespace chargpt {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kItemsPerWarp = 4;  // keys (dK/dV) or query rows (dQ) owned by one backward warp

struct HeadStrides {
  int64_t b, h, t;  // the head dim is contiguous
};

struct DropoutArgs {
  float p, keep_scale;
  const int64_t* seed;  // device pointer; read only when p > 0
};

__device__ __forceinline__ float dropout_factor(const DropoutArgs& drop, uint64_t seed, int64_t offset) {
  if (drop.p <= 0.f) return 1.f;
  return philox_uniform(seed, static_cast<uint64_t>(offset)) >= drop.p ? drop.keep_scale : 0.f;
}

template <int kDpl>
struct FwdConfig {
  static constexpr int kDmax = 32 * kDpl;
  static constexpr int kBk = kDpl == 8 ? 16 : 32;     // keys per tile: keeps shared memory under 48 KB
  static constexpr int kRows = kDpl == 8 ? 2 : 4;     // query rows per warp
  static constexpr int kBq = kWarps * kRows;
};

template <typename T, int kDpl>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
    float* __restrict__ lse, HeadStrides sq, HeadStrides sk, HeadStrides sv, int heads, int64_t tq, int64_t tk,
    int d, float scale, bool causal, DropoutArgs drop) {
  using C = FwdConfig<kDpl>;
  __shared__ float q_s[C::kBq][C::kDmax];
  __shared__ float k_s[C::kBk][C::kDmax + 1];  // +1: lane j reads row j, so rows must fall in different banks
  __shared__ float v_s[C::kBk][C::kDmax];
  const int64_t bh = blockIdx.x;
  const int b = static_cast<int>(blockIdx.x) / heads, h = static_cast<int>(blockIdx.x) % heads;  // 32-bit: no call
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * C::kBq;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* qh = q + b * sq.b + h * sq.h;
  const T* kh = k + b * sk.b + h * sk.h;
  const T* vh = v + b * sv.b + h * sv.h;
  for (int idx = threadIdx.x; idx < C::kBq * C::kDmax; idx += kThreads) {
    const int r = idx / C::kDmax, c = idx % C::kDmax;
    const int64_t i = i0 + r;
    q_s[r][c] = (i < tq && c < d) ? to_float(qh[i * sq.t + c]) * scale : 0.f;
  }
  const uint64_t seed = drop.p > 0.f ? static_cast<uint64_t>(*drop.seed) : 0;
  float m[C::kRows], l[C::kRows], acc[C::kRows][kDpl];
#pragma unroll
  for (int r = 0; r < C::kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int c = 0; c < kDpl; ++c) acc[r][c] = 0.f;
  }
  const int64_t key_end = causal ? min(tk, i0 + C::kBq) : tk;  // causal: later key tiles are never loaded
  for (int64_t j0 = 0; j0 < key_end; j0 += C::kBk) {
    __syncthreads();  // the previous tile is consumed (and q_s is complete on the first pass)
    for (int idx = threadIdx.x; idx < C::kBk * C::kDmax; idx += kThreads) {
      const int jj = idx / C::kDmax, c = idx % C::kDmax;
      const int64_t j = j0 + jj;
      const bool ok = j < tk && c < d;
      k_s[jj][c] = ok ? to_float(kh[j * sk.t + c]) : 0.f;
      v_s[jj][c] = ok ? to_float(vh[j * sv.t + c]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < C::kRows; ++r) {
      const int row = warp * C::kRows + r;
      const int64_t i = i0 + row;
      if (i >= tq) continue;  // warp-uniform
      const int64_t j = j0 + lane;
      const bool visible = lane < C::kBk && j < tk && (!causal || j <= i);
      float s = -INFINITY;
      if (visible) {
        s = 0.f;
#pragma unroll 8
        for (int c = 0; c < C::kDmax; ++c) s += q_s[row][c] * k_s[lane][c];
      }
      const float m_new = fmaxf(m[r], warp_max(s));
      if (m_new == -INFINITY) continue;  // this row sees no key of the tile yet
      float pj = visible ? expf(s - m_new) : 0.f;
      const float alpha = expf(m[r] - m_new);  // 0 on the first visible tile
      l[r] = l[r] * alpha + warp_sum(pj);      // before dropout: softmax first, then drop
      m[r] = m_new;
      if (visible) pj *= dropout_factor(drop, seed, (bh * tq + i) * tk + j);
#pragma unroll
      for (int c = 0; c < kDpl; ++c) acc[r][c] *= alpha;
#pragma unroll
      for (int jj = 0; jj < C::kBk; ++jj) {
        const float pb = __shfl_sync(kFullMask, pj, jj);
#pragma unroll
        for (int c = 0; c < kDpl; ++c) acc[r][c] += pb * v_s[jj][lane + 32 * c];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < C::kRows; ++r) {
    const int64_t i = i0 + warp * C::kRows + r;
    if (i >= tq) continue;
    const float inv = __fdividef(1.f, l[r]);  // l >= 1; avoids the IEEE division's out-of-line slow path
    T* orow = out + (bh * tq + i) * d;
#pragma unroll
    for (int c = 0; c < kDpl; ++c) {
      const int col = lane + 32 * c;
      if (col < d) orow[col] = from_float<T>(acc[r][c] * inv);
    }
    if (lane == 0) lse[bh * tq + i] = m[r] + logf(l[r]);
  }
}

// Tensor-core forward for fp16/bf16 and head dims d = 16, 32, ..., 128 (bucketed to kD = 64 or 128; padding dims
// are zero, so they add nothing to the dot products). WMMA 16x16x16 fragments, fp32 accumulation. Tiling:
//   a block of 4 warps owns kBq = 64 query rows, warp w rows 16w .. 16w+15 (its Q stays in q_s for the whole pass);
//   key/value tiles of kBk = 32 rows are staged in shared memory in T and shared by all warps. Per tile, warp w
//   1. S (16 x 32) = Q_w K^T with WMMA, stored fp32 to its s_s slice;
//   2. online softmax in fp32, as in attention_fwd_kernel, but with a lane pair per row (row = lane/2, each lane
//      of the pair holds 16 of the 32 keys, max/sum reduced with one shuffle): running max m, running sum l
//      (before dropout), P = exp(S*scale - m) dropped with the same Philox offsets, written to p_s in T;
//   3. O_w (16 x kD) = alpha * O_w + P V, the P V product per 16-column chunk through WMMA, stored to s_s (free
//      again) and added by the lane that owns those elements: lane owns row lane/2, columns 8*(lane%2) .. +7 of
//      every chunk (acc[chunk][e], in registers), so the per-row rescale alpha is that lane's own m/l bookkeeping.
// Every WMMA call is made by all 32 lanes (no early exit): rows past tq or keys that are masked just give P = 0.
template <int kD>
struct TcFwdConfig {
  static constexpr int kBq = 16 * kWarps;
  static constexpr int kBk = 32;
  static constexpr int kHalf = kBk / 2;  // keys per lane of a row's lane pair
  static constexpr int kChunks = kD / 16;
  static constexpr int kLdT = kD + 8;    // row pitch (elements) of q_s/k_s/v_s: +16 B against bank conflicts
  static constexpr int kLdS = kBk + 4;   // fp32 row pitch of s_s (a multiple of 4, as WMMA needs for float)
  static constexpr int kLdP = kBk + 8;   // row pitch of p_s (a multiple of 8, as WMMA needs for 16-bit types)
};

template <typename T>
struct WmmaType;  // the CUDA type WMMA takes for a torch 16-bit type: same size, same bits
template <>
struct WmmaType<at::Half> { using type = __half; };
template <>
struct WmmaType<at::BFloat16> { using type = __nv_bfloat16; };

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) attention_fwd_tc_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
    float* __restrict__ lse, HeadStrides sq, HeadStrides sk, HeadStrides sv, int heads, int64_t tq, int64_t tk,
    int d, float scale, bool causal, DropoutArgs drop) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // bf16 WMMA needs sm_80; the host launches this only there
  namespace wmma = nvcuda::wmma;
  using C = TcFwdConfig<kD>;
  using W = typename WmmaType<T>::type;
  // 48 KB for kD = 128 (the static limit); every WMMA pointer below is 32-byte aligned: the pitches times 16 rows
  // and the 16-column offsets are multiples of 32 bytes.
  __shared__ __align__(128) T q_s[C::kBq][C::kLdT];
  __shared__ __align__(128) T k_s[C::kBk][C::kLdT];
  __shared__ __align__(128) T v_s[C::kBk][C::kLdT];
  __shared__ __align__(128) float s_s[kWarps][16][C::kLdS];
  __shared__ __align__(128) T p_s[kWarps][16][C::kLdP];
  const int64_t bh = blockIdx.x;
  const int b = static_cast<int>(blockIdx.x) / heads, h = static_cast<int>(blockIdx.x) % heads;  // 32-bit: no call
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * C::kBq;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = lane / 2, side = lane % 2;  // this lane's row of the warp's 16, and its half of keys / columns
  const int64_t i = i0 + warp * 16 + row;
  const T* qh = q + b * sq.b + h * sq.h;
  const T* kh = k + b * sk.b + h * sk.h;
  const T* vh = v + b * sv.b + h * sv.h;
  for (int idx = threadIdx.x; idx < C::kBq * kD; idx += kThreads) {
    const int r = idx / kD, c = idx % kD;
    const int64_t ir = i0 + r;
    q_s[r][c] = (ir < tq && c < d) ? qh[ir * sq.t + c] : from_float<T>(0.f);  // unscaled: scale is applied to S
  }
  const uint64_t seed = drop.p > 0.f ? static_cast<uint64_t>(*drop.seed) : 0;
  float m = -INFINITY, l = 0.f, acc[C::kChunks][8];
#pragma unroll
  for (int n = 0; n < C::kChunks; ++n)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[n][e] = 0.f;
  const int64_t key_end = causal ? min(tk, i0 + C::kBq) : tk;  // causal: later key tiles are never loaded
  for (int64_t j0 = 0; j0 < key_end; j0 += C::kBk) {
    __syncthreads();  // the previous tile is consumed (and q_s is complete on the first pass)
    for (int idx = threadIdx.x; idx < C::kBk * kD; idx += kThreads) {
      const int jj = idx / kD, c = idx % kD;
      const int64_t j = j0 + jj;
      const bool ok = j < tk && c < d;
      k_s[jj][c] = ok ? kh[j * sk.t + c] : from_float<T>(0.f);
      v_s[jj][c] = ok ? vh[j * sv.t + c] : from_float<T>(0.f);
    }
    __syncthreads();
    // 1. S = Q_w K^T: K is stored [key][dim] row-major, which is K^T column-major with the same pitch.
#pragma unroll
    for (int kc = 0; kc < C::kBk / 16; ++kc) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag;
      wmma::fill_fragment(s_frag, 0.f);
#pragma unroll
      for (int dc = 0; dc < C::kChunks; ++dc) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::col_major> bk;
        wmma::load_matrix_sync(a, reinterpret_cast<const W*>(&q_s[warp * 16][dc * 16]), C::kLdT);
        wmma::load_matrix_sync(bk, reinterpret_cast<const W*>(&k_s[kc * 16][dc * 16]), C::kLdT);
        wmma::mma_sync(s_frag, a, bk, s_frag);
      }
      wmma::store_matrix_sync(&s_s[warp][0][kc * 16], s_frag, C::kLdS, wmma::mem_row_major);
    }
    __syncwarp();
    // 2. Online softmax for row i over keys j0 + 16*side + t (the SIMT kernel's bookkeeping, pair-reduced).
    float s[C::kHalf];
    float tile_max = -INFINITY;
#pragma unroll
    for (int t = 0; t < C::kHalf; ++t) {
      const int jj = side * C::kHalf + t;
      const int64_t j = j0 + jj;
      const bool visible = i < tq && j < tk && (!causal || j <= i);
      s[t] = visible ? s_s[warp][row][jj] * scale : -INFINITY;
      tile_max = fmaxf(tile_max, s[t]);
    }
    const float m_new = fmaxf(m, fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 1)));
    // A row that has seen no visible key yet (m_new = -inf; also rows past tq) keeps m = -inf, l = 0, acc = 0:
    // exponentiating against 0 instead of -inf gives p = 0 and alpha = 0 without NaNs (the SIMT kernel skips it).
    const float m_ref = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = expf(m - m_ref);  // 0 on the first visible tile
    float p_sum = 0.f;
#pragma unroll
    for (int t = 0; t < C::kHalf; ++t) {
      s[t] = expf(s[t] - m_ref);  // exp(-inf) = 0 for masked keys
      p_sum += s[t];
    }
    l = l * alpha + p_sum + __shfl_xor_sync(kFullMask, p_sum, 1);  // before dropout: softmax first, then drop
    m = m_new;
#pragma unroll
    for (int t = 0; t < C::kHalf; ++t) {
      const int jj = side * C::kHalf + t;
      // Dropped weights become 0 here; the kept ones are scaled by 1/(1-p) in fp32 in step 3 (p_s holds T, and
      // 1/(1-p) may not fit in fp16).
      const bool kept = s[t] > 0.f && dropout_factor(drop, seed, (bh * tq + i) * tk + (j0 + jj)) != 0.f;
      p_s[warp][row][jj] = from_float<T>(kept ? s[t] : 0.f);
    }
    __syncwarp();  // p_s is complete and every lane has read s_s, which is scratch from here on
    // 3. O_w = alpha * O_w + P V, one 16-column chunk of V at a time.
#pragma unroll
    for (int n = 0; n < C::kChunks; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag;
      wmma::fill_fragment(o_frag, 0.f);
#pragma unroll
      for (int kk = 0; kk < C::kBk / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::row_major> bv;
        wmma::load_matrix_sync(a, reinterpret_cast<const W*>(&p_s[warp][0][kk * 16]), C::kLdP);
        wmma::load_matrix_sync(bv, reinterpret_cast<const W*>(&v_s[kk * 16][n * 16]), C::kLdT);
        wmma::mma_sync(o_frag, a, bv, o_frag);
      }
      wmma::store_matrix_sync(&s_s[warp][0][0], o_frag, C::kLdS, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int e = 0; e < 8; ++e)
        acc[n][e] = acc[n][e] * alpha + s_s[warp][row][side * 8 + e] * drop.keep_scale;
      __syncwarp();  // read before the next chunk overwrites the scratch
    }
  }
  if (i < tq) {
    const float inv = __fdividef(1.f, l);  // l >= 1: key 0 is visible to every row
    T* orow = out + (bh * tq + i) * d;
#pragma unroll
    for (int n = 0; n < C::kChunks; ++n)
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int col = n * 16 + side * 8 + e;
        if (col < d) orow[col] = from_float<T>(acc[n][e] * inv);
      }
    if (side == 0) lse[bh * tq + i] = m + logf(l);
  }
#else
  __trap();  // never launched below sm_80 (use_tensor_cores); a build with only older PTX must not fail silently
#endif
}

// delta[i] = sum_d dO[i, d] * O[i, d], one warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_delta_kernel(
    const T* __restrict__ dout, const T* __restrict__ out, float* __restrict__ delta, HeadStrides sdo,
    HeadStrides so, int heads, int64_t tq, int d, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t bh = row / tq, i = row % tq, b = bh / heads, h = bh % heads;
  const T* dor = dout + b * sdo.b + h * sdo.h + i * sdo.t;
  const T* orow = out + b * so.b + h * so.h + i * so.t;
  float sum = 0.f;
  for (int c = lane; c < d; c += 32) sum += to_float(dor[c]) * to_float(orow[c]);
  sum = warp_sum(sum);
  if (lane == 0) delta[row] = sum;
}

template <typename T, int kDpl>
__device__ __forceinline__ void load_row(const T* __restrict__ p, int d, int lane, float (&dst)[kDpl]) {
#pragma unroll
  for (int c = 0; c < kDpl; ++c) {
    const int col = lane + 32 * c;
    dst[c] = col < d ? to_float(p[col]) : 0.f;
  }
}

// dK, dV: warp w of block (bh, kb) owns keys kb*16 + 4w .. +3 and sweeps every query row that sees them.
template <typename T, int kDpl>
__global__ void __launch_bounds__(kThreads) attention_dkdv_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv,
    HeadStrides sq, HeadStrides sk, HeadStrides sv, HeadStrides sdo, int heads, int64_t tq, int64_t tk, int d,
    float scale, bool causal, DropoutArgs drop) {
  const int64_t bh = blockIdx.x;
  const int b = static_cast<int>(blockIdx.x) / heads, h = static_cast<int>(blockIdx.x) % heads;  // 32-bit: no call
  const int lane = threadIdx.x % 32;
  const int64_t j_first = (static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / 32) * kItemsPerWarp;
  if (j_first >= tk) return;
  const uint64_t seed = drop.p > 0.f ? static_cast<uint64_t>(*drop.seed) : 0;
  float kr[kItemsPerWarp][kDpl], vr[kItemsPerWarp][kDpl], dkr[kItemsPerWarp][kDpl], dvr[kItemsPerWarp][kDpl];
#pragma unroll
  for (int e = 0; e < kItemsPerWarp; ++e) {
    const int64_t j = min(j_first + e, tk - 1);  // clamped rows are loaded but never used or written
    load_row<T, kDpl>(k + b * sk.b + h * sk.h + j * sk.t, d, lane, kr[e]);
    load_row<T, kDpl>(v + b * sv.b + h * sv.h + j * sv.t, d, lane, vr[e]);
#pragma unroll
    for (int c = 0; c < kDpl; ++c) dkr[e][c] = dvr[e][c] = 0.f;
  }
  const T* qh = q + b * sq.b + h * sq.h;
  const T* doh = dout + b * sdo.b + h * sdo.h;
  for (int64_t i = causal ? j_first : 0; i < tq; ++i) {
    float qi[kDpl], doi[kDpl];
    load_row<T, kDpl>(qh + i * sq.t, d, lane, qi);
    load_row<T, kDpl>(doh + i * sdo.t, d, lane, doi);
    const float lse_i = lse[bh * tq + i], delta_i = delta[bh * tq + i];
    float s[kItemsPerWarp], dp[kItemsPerWarp];
#pragma unroll
    for (int e = 0; e < kItemsPerWarp; ++e) {
      s[e] = dp[e] = 0.f;
#pragma unroll
      for (int c = 0; c < kDpl; ++c) {
        s[e] += qi[c] * kr[e][c];
        dp[e] += doi[c] * vr[e][c];
      }
    }
#pragma unroll
    for (int e = 0; e < kItemsPerWarp; ++e) {
      const float score = warp_sum(s[e]) * scale, dpe = warp_sum(dp[e]);
      const int64_t j = j_first + e;
      if (j >= tk || (causal && j > i)) continue;  // warp-uniform
      const float p = expf(score - lse_i);
      const float z = dropout_factor(drop, seed, (bh * tq + i) * tk + j);
      const float ds = p * (dpe * z - delta_i) * scale;
#pragma unroll
      for (int c = 0; c < kDpl; ++c) {
        dvr[e][c] += p * z * doi[c];
        dkr[e][c] += ds * qi[c];
      }
    }
  }
#pragma unroll
  for (int e = 0; e < kItemsPerWarp; ++e) {
    const int64_t j = j_first + e;
    if (j >= tk) continue;
#pragma unroll
    for (int c = 0; c < kDpl; ++c) {
      const int col = lane + 32 * c;
      if (col < d) {
        dk[(bh * tk + j) * d + col] = from_float<T>(dkr[e][c]);
        dv[(bh * tk + j) * d + col] = from_float<T>(dvr[e][c]);
      }
    }
  }
}

// dQ: warp w of block (bh, qb) owns query rows qb*16 + 4w .. +3 and sweeps the keys they see.
template <typename T, int kDpl>
__global__ void __launch_bounds__(kThreads) attention_dq_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dq, HeadStrides sq,
    HeadStrides sk, HeadStrides sv, HeadStrides sdo, int heads, int64_t tq, int64_t tk, int d, float scale,
    bool causal, DropoutArgs drop) {
  const int64_t bh = blockIdx.x;
  const int b = static_cast<int>(blockIdx.x) / heads, h = static_cast<int>(blockIdx.x) % heads;  // 32-bit: no call
  const int lane = threadIdx.x % 32;
  const int64_t i_first = (static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / 32) * kItemsPerWarp;
  if (i_first >= tq) return;
  const uint64_t seed = drop.p > 0.f ? static_cast<uint64_t>(*drop.seed) : 0;
  float qr[kItemsPerWarp][kDpl], dor[kItemsPerWarp][kDpl], dqr[kItemsPerWarp][kDpl];
  float lse_r[kItemsPerWarp], delta_r[kItemsPerWarp];
#pragma unroll
  for (int e = 0; e < kItemsPerWarp; ++e) {
    const int64_t i = min(i_first + e, tq - 1);
    load_row<T, kDpl>(q + b * sq.b + h * sq.h + i * sq.t, d, lane, qr[e]);
    load_row<T, kDpl>(dout + b * sdo.b + h * sdo.h + i * sdo.t, d, lane, dor[e]);
    lse_r[e] = lse[bh * tq + i];
    delta_r[e] = delta[bh * tq + i];
#pragma unroll
    for (int c = 0; c < kDpl; ++c) dqr[e][c] = 0.f;
  }
  const int64_t i_last = min(i_first + kItemsPerWarp, tq) - 1;
  const int64_t key_end = causal ? min(tk, i_last + 1) : tk;
  const T* kh = k + b * sk.b + h * sk.h;
  const T* vh = v + b * sv.b + h * sv.h;
  for (int64_t j = 0; j < key_end; ++j) {
    float kj[kDpl], vj[kDpl];
    load_row<T, kDpl>(kh + j * sk.t, d, lane, kj);
    load_row<T, kDpl>(vh + j * sv.t, d, lane, vj);
    float s[kItemsPerWarp], dp[kItemsPerWarp];
#pragma unroll
    for (int e = 0; e < kItemsPerWarp; ++e) {
      s[e] = dp[e] = 0.f;
#pragma unroll
      for (int c = 0; c < kDpl; ++c) {
        s[e] += qr[e][c] * kj[c];
        dp[e] += dor[e][c] * vj[c];
      }
    }
#pragma unroll
    for (int e = 0; e < kItemsPerWarp; ++e) {
      const float score = warp_sum(s[e]) * scale, dpe = warp_sum(dp[e]);
      const int64_t i = i_first + e;
      if (i >= tq || (causal && j > i)) continue;  // warp-uniform
      const float p = expf(score - lse_r[e]);
      const float z = dropout_factor(drop, seed, (bh * tq + i) * tk + j);
      const float ds = p * (dpe * z - delta_r[e]) * scale;
#pragma unroll
      for (int c = 0; c < kDpl; ++c) dqr[e][c] += ds * kj[c];
    }
  }
#pragma unroll
  for (int e = 0; e < kItemsPerWarp; ++e) {
    const int64_t i = i_first + e;
    if (i >= tq) continue;
#pragma unroll
    for (int c = 0; c < kDpl; ++c) {
      const int col = lane + 32 * c;
      if (col < d) dq[(bh * tq + i) * d + col] = from_float<T>(dqr[e][c]);
    }
  }
}

// Calls f(std::integral_constant<int, DPL>) for the smallest head-dim bucket that holds d.
template <typename F>
void dispatch_head_dim(int64_t d, F&& f) {
  if (d <= 64) f(std::integral_constant<int, 2>{});
  else if (d <= 128) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 8>{});
}

at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }
HeadStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

DropoutArgs dropout_args(double dropout_p, const std::optional<at::Tensor>& seed) {
  if (dropout_p <= 0.0) return {0.f, 1.f, nullptr};
  const float p = static_cast<float>(dropout_p);
  return {p, 1.f / (1.f - p), seed->const_data_ptr<int64_t>()};
}

void check_grid(int64_t bh, int64_t tiles, const char* op) {
  TORCH_CHECK(bh <= 0x7fffffff && tiles <= 65535, op, ": B*H = ", bh, " and ", tiles,
              " sequence tiles exceed the CUDA grid limits");
}

// The tensor-core forward takes fp16/bf16 (checked by the caller) with d a multiple of 16 up to 128, on sm_80+
// (bf16 WMMA; the kernel body is compiled only there). Anything else takes the SIMT kernel.
bool use_tensor_cores(const at::Tensor& q, int64_t d) {
  if (d % 16 != 0 || d > 128) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  return major >= 8;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, bool is_causal, double dropout_p,
                                                      double scale, const std::optional<at::Tensor>& seed) {
  const char* op = "chargpt::attention_fwd";
  check_attention_args(op, q_in, k_in, v_in, dropout_p, scale, seed);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, H, Tq, D}, q.options());
  at::Tensor lse = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  const DropoutArgs drop = dropout_args(dropout_p, seed);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(q.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      if (use_tensor_cores(q, D)) {
        const auto launch = [&](auto kd) {
          constexpr int kD = decltype(kd)::value;
          const int64_t tiles = (Tq + TcFwdConfig<kD>::kBq - 1) / TcFwdConfig<kD>::kBq;
          check_grid(B * H, tiles, op);
          attention_fwd_tc_kernel<T, kD><<<dim3(B * H, tiles), kThreads, 0, stream>>>(
              q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(), out.mutable_data_ptr<T>(),
              lse.mutable_data_ptr<float>(), strides_of(q), strides_of(k), strides_of(v), H, Tq, Tk, D,
              static_cast<float>(scale), is_causal, drop);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (D <= 64) launch(std::integral_constant<int, 64>{});
        else launch(std::integral_constant<int, 128>{});
        return;
      }
    }
    dispatch_head_dim(D, [&](auto dpl) {
      constexpr int kDpl = decltype(dpl)::value;
      const int64_t tiles = (Tq + FwdConfig<kDpl>::kBq - 1) / FwdConfig<kDpl>::kBq;
      check_grid(B * H, tiles, op);
      attention_fwd_kernel<T, kDpl><<<dim3(B * H, tiles), kThreads, 0, stream>>>(
          q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(), out.mutable_data_ptr<T>(),
          lse.mutable_data_ptr<float>(), strides_of(q), strides_of(k), strides_of(v), H, Tq, Tk, D,
          static_cast<float>(scale), is_causal, drop);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, bool is_causal, double dropout_p, double scale,
    const std::optional<at::Tensor>& seed) {
  const char* op = "chargpt::attention_bwd";
  check_attention_args(op, q_in, k_in, v_in, dropout_p, scale, seed);
  check_attention_bwd_args(grad_out_in, q_in, out_in, lse_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const at::Tensor dout = rows_contiguous(grad_out_in), out = rows_contiguous(out_in), lse = lse_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  at::Tensor dq = at::empty({B, H, Tq, D}, q.options());
  at::Tensor dk = at::empty({B, H, Tk, D}, q.options());
  at::Tensor dv = at::empty({B, H, Tk, D}, q.options());
  at::Tensor delta = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  const DropoutArgs drop = dropout_args(dropout_p, seed);
  const int64_t per_block = kWarps * kItemsPerWarp;
  check_grid(B * H, (std::max(Tq, Tk) + per_block - 1) / per_block, op);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(q.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const int64_t rows = B * H * Tq;
    attention_delta_kernel<T><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
        dout.const_data_ptr<T>(), out.const_data_ptr<T>(), delta.mutable_data_ptr<float>(), strides_of(dout),
        strides_of(out), H, Tq, D, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dispatch_head_dim(D, [&](auto dpl) {
      constexpr int kDpl = decltype(dpl)::value;
      attention_dkdv_kernel<T, kDpl><<<dim3(B * H, (Tk + per_block - 1) / per_block), kThreads, 0, stream>>>(
          q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(), dout.const_data_ptr<T>(),
          lse.const_data_ptr<float>(), delta.const_data_ptr<float>(), dk.mutable_data_ptr<T>(),
          dv.mutable_data_ptr<T>(), strides_of(q), strides_of(k), strides_of(v), strides_of(dout), H, Tq, Tk, D,
          static_cast<float>(scale), is_causal, drop);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      attention_dq_kernel<T, kDpl><<<dim3(B * H, (Tq + per_block - 1) / per_block), kThreads, 0, stream>>>(
          q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(), dout.const_data_ptr<T>(),
          lse.const_data_ptr<float>(), delta.const_data_ptr<float>(), dq.mutable_data_ptr<T>(), strides_of(q),
          strides_of(k), strides_of(v), strides_of(dout), H, Tq, Tk, D, static_cast<float>(scale), is_causal,
          drop);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(chargpt, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace chargpt
