// Tensor-core (WMMA) attention kernels: fp16/bf16 in, head dims d = 16, 32, ..., 128, sm_80+ (bf16 WMMA), fp32
// accumulation, with the SIMT kernels' masking, softmax bookkeeping and dropout offsets: attention_fwd_tc_kernel,
// and for the backward attention_dkdv_tc_kernel and attention_dq_tc_kernel (delta comes from the SIMT file).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "attention_common.cuh"

namespace chargpt {
namespace {

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

// Warp-level WMMA building blocks of the tensor-core kernels (fp32 accumulation). Tiles live in shared memory,
// row-major with a pitch `ld` in elements; every pointer is 32-byte aligned and every pitch a multiple of 16 bytes.

// dst (rows x kD, pitch ld) = rows row0 .. row0+rows-1 of src (row stride st, unit column stride), with zeros for
// rows at or past `limit` and columns at or past d; called by every thread of the block. Moves 16-byte packs, so
// src, st and d must keep every row start 16-byte aligned (the host sees to it: tc_aligned).
template <typename T, int kD>
__device__ __forceinline__ void load_tile(T* dst, int ld, int rows, const T* __restrict__ src, int64_t st,
                                          int64_t row0, int64_t limit, int d) {
  constexpr int kVec = 16 / sizeof(T);
  using P = Pack<T, kVec>;
  static_assert(kD % kVec == 0, "whole packs per tile row");
  for (int idx = threadIdx.x; idx < rows * (kD / kVec); idx += kThreads) {
    const int r = idx / (kD / kVec), c = idx % (kD / kVec) * kVec;
    const int64_t row = row0 + r;
    P p;
    if (row < limit && c < d) {
      p = *reinterpret_cast<const P*>(src + row * st + c);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) p.v[e] = from_float<T>(0.f);
    }
    *reinterpret_cast<P*>(dst + r * ld + c) = p;  // ld * sizeof(T) is a multiple of 16
  }
}

// C (16 x 16, fp32, row-major, pitch ldc) = A B^T for 16 x kD tiles A and B (pitch ld): B row-major is B^T
// column-major, so no transpose is ever stored.
template <typename T, int kD>
__device__ __forceinline__ void warp_gemm_abt(const T* a, const T* b, int ld, float* c, int ldc) {
  namespace wmma = nvcuda::wmma;
  using W = typename WmmaType<T>::type;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
#pragma unroll
  for (int dc = 0; dc < kD / 16; ++dc) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::col_major> fb;
    wmma::load_matrix_sync(fa, reinterpret_cast<const W*>(a + dc * 16), ld);
    wmma::load_matrix_sync(fb, reinterpret_cast<const W*>(b + dc * 16), ld);
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(c, acc, ldc, wmma::mem_row_major);
}

// acc[n] += A B[:, 16n .. 16n+15] for a 16 x 16 tile A (pitch lda) and a 16 x kD tile B (pitch ldb).
template <typename T, int kD, typename Acc>
__device__ __forceinline__ void warp_mma_ab(Acc (&acc)[kD / 16], const T* a, int lda, const T* b, int ldb) {
  namespace wmma = nvcuda::wmma;
  using W = typename WmmaType<T>::type;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, reinterpret_cast<const W*>(a), lda);
#pragma unroll
  for (int n = 0; n < kD / 16; ++n) {
    wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::row_major> fb;
    wmma::load_matrix_sync(fb, reinterpret_cast<const W*>(b + n * 16), ldb);
    wmma::mma_sync(acc[n], fa, fb, acc[n]);
  }
}

// Rows row0 .. row0+15 of out (pitch d, a multiple of 16, 16-bit T) = factor * acc, through the warp's fp32
// scratch (16 x 16, pitch ldscr): per 16-column chunk, lane l writes 8 columns of row l/2 as one 16-byte store.
// Rows at or past `limit` and chunks at or past d are not written.
template <typename T, int kD, typename Acc>
__device__ __forceinline__ void warp_store_rows(const Acc (&acc)[kD / 16], float* scratch, int ldscr, T* out,
                                                int64_t row0, int64_t limit, int d, float factor) {
  static_assert(sizeof(T) == 2, "8 elements per 16-byte store");
  const int lane = threadIdx.x % 32, r = lane / 2, c = (lane % 2) * 8;
#pragma unroll
  for (int n = 0; n < kD / 16; ++n) {
    nvcuda::wmma::store_matrix_sync(scratch, acc[n], ldscr, nvcuda::wmma::mem_row_major);
    __syncwarp();
    if (row0 + r < limit && n * 16 < d) {
      Pack<T, 8> p;
#pragma unroll
      for (int e = 0; e < 8; ++e) p.v[e] = from_float<T>(scratch[r * ldscr + c + e] * factor);
      *reinterpret_cast<Pack<T, 8>*>(out + (row0 + r) * d + n * 16 + c) = p;
    }
    __syncwarp();  // read before the next chunk overwrites the scratch
  }
}

// S = A_s B_s^T and dP = A_p B_p^T for the warp's 16 x 16 block (16 x kD tiles, pitch ld), through its fp32
// scratch: this lane gets entries (lane/2, 8*(lane%2) + e) for e < 8 of each.
template <typename T, int kD>
__device__ __forceinline__ void warp_scores_and_dp(const T* a_s, const T* b_s, const T* a_p, const T* b_p, int ld,
                                                   float* scratch, int ldscr, float (&s)[8], float (&dp)[8]) {
  const int lane = threadIdx.x % 32, offset = (lane / 2) * ldscr + (lane % 2) * 8;
  warp_gemm_abt<T, kD>(a_s, b_s, ld, scratch, ldscr);
  __syncwarp();
#pragma unroll
  for (int e = 0; e < 8; ++e) s[e] = scratch[offset + e];
  __syncwarp();  // read before dP overwrites the scratch
  warp_gemm_abt<T, kD>(a_p, b_p, ld, scratch, ldscr);
  __syncwarp();
#pragma unroll
  for (int e = 0; e < 8; ++e) dp[e] = scratch[offset + e];
  __syncwarp();  // read before the scratch is reused
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) attention_fwd_tc_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
    float* __restrict__ lse, HeadStrides sq, HeadStrides sk, HeadStrides sv, int heads, int group, int64_t tq,
    int64_t tk, int d, float scale, bool causal, MaskView mask, DropoutArgs drop) {
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
  const T* kh = k + b * sk.b + h / group * sk.h;  // GQA: the group's key/value head
  const T* vh = v + b * sv.b + h / group * sv.h;
  load_tile<T, kD>(&q_s[0][0], C::kLdT, C::kBq, qh, sq.t, i0, tq, d);  // unscaled: scale is applied to S
  const uint64_t seed = drop.p > 0.f ? static_cast<uint64_t>(*drop.seed) : 0;
  float m = -INFINITY, l = 0.f, acc[C::kChunks][8];
#pragma unroll
  for (int n = 0; n < C::kChunks; ++n)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[n][e] = 0.f;
  const int64_t key_end = causal ? min(tk, i0 + C::kBq) : tk;  // causal: later key tiles are never loaded
  for (int64_t j0 = 0; j0 < key_end; j0 += C::kBk) {
    __syncthreads();  // the previous tile is consumed (and q_s is complete on the first pass)
    load_tile<T, kD>(&k_s[0][0], C::kLdT, C::kBk, kh, sk.t, j0, tk, d);
    load_tile<T, kD>(&v_s[0][0], C::kLdT, C::kBk, vh, sv.t, j0, tk, d);
    __syncthreads();
    // 1. S = Q_w K^T, 16 keys at a time.
#pragma unroll
    for (int kc = 0; kc < C::kBk / 16; ++kc)
      warp_gemm_abt<T, kD>(&q_s[warp * 16][0], &k_s[kc * 16][0], C::kLdT, &s_s[warp][0][kc * 16], C::kLdS);
    __syncwarp();
    // 2. Online softmax for row i over keys j0 + 16*side + t (the SIMT kernel's bookkeeping, pair-reduced).
    float s[C::kHalf];
    float tile_max = -INFINITY;
#pragma unroll
    for (int t = 0; t < C::kHalf; ++t) {
      const int jj = side * C::kHalf + t;
      const int64_t j = j0 + jj;
      float bias = 0.f;
      const bool visible = i < tq && j < tk && (!causal || j <= i) && mask_keeps<T>(mask, b, h, i, j, bias);
      s[t] = visible ? s_s[warp][row][jj] * scale + bias : -INFINITY;
      tile_max = max_keep_nan(tile_max, s[t]);
    }
    const float m_new = max_keep_nan(m, max_keep_nan(tile_max, __shfl_xor_sync(kFullMask, tile_max, 1)));
    // A row that has seen only -inf scores (masked keys, a fully masked row; also rows past tq) keeps m = -inf, l = 0,
    // acc = 0: exponentiating against 0 instead of -inf gives p = 0 and alpha = 0, not NaN (the SIMT kernel skips it).
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
      const bool kept = s[t] != 0.f && dropout_factor(drop, seed, (bh * tq + i) * tk + (j0 + jj)) != 0.f;  // NaN too
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
    const float inv = l == 0.f ? 0.f : __fdividef(1.f, l);  // l = 0: all scores -inf, output 0 (as the SIMT kernel)
    T* orow = out + (bh * tq + i) * d;
#pragma unroll
    for (int n = 0; n < C::kChunks; ++n) {
      if (n * 16 >= d) break;  // d is a multiple of 16: whole chunks are in or out
      Pack<T, 8> p;  // this lane's 8 columns, one 16-byte store
#pragma unroll
      for (int e = 0; e < 8; ++e) p.v[e] = from_float<T>(acc[n][e] * inv);
      *reinterpret_cast<Pack<T, 8>*>(orow + n * 16 + side * 8) = p;
    }
    if (side == 0) lse[bh * tq + i] = l == 0.f ? INFINITY : m + logf(l);
  }
#else
  __trap();  // never launched below sm_80 (use_tensor_cores); a build with only older PTX must not fail silently
#endif
}

// Tensor-core backward for the inputs the tensor-core forward takes (the same kD buckets), FlashAttention-2's split
// without atomics: one kernel owns keys and accumulates dK, dV; the other owns query rows and accumulates dQ.
// A block of 4 warps owns 64 keys (or rows), warp w the 16 at 16w, its accumulators in WMMA fragments (fp32);
// the other side streams through shared memory 16 rows (or keys) at a time. Per step, warp w
//   1. computes S and dP for its 16 x 16 block through WMMA (transposed in the dK/dV kernel: keys are its rows),
//      staged in its fp32 scratch and read 8 entries per lane (scratch row lane/2, columns 8*(lane%2) .. +7);
//   2. forms P and dS per entry (score_grad: causal mask, tq/tk bounds, the forward's Philox dropout offsets),
//      written to shared memory in T;
//   3. accumulates dV += P^T dO and dK += dS^T Q, or dQ += dS K, through WMMA.
// Shared memory exceeds the 48 KB static limit at kD = 128, so it is dynamic (one struct per kernel).
template <int kD>
struct TcBwdConfig {
  static constexpr int kOwn = 16 * kWarps;  // keys (dK/dV) or query rows (dQ) owned by a block
  static constexpr int kStep = 16;          // query rows (dK/dV) or keys (dQ) streamed per step
  static constexpr int kLdT = kD + 8;       // pitches as in TcFwdConfig: 16-byte padding against bank conflicts
  static constexpr int kLdS = kStep + 4;
  static constexpr int kLdP = kStep + 8;
  // Every 16-row block and 16-column offset WMMA touches must stay 32-byte aligned inside the shared structs.
  static_assert(16 * kLdT * 2 % 32 == 0 && 16 * kLdS * 4 % 32 == 0 && 16 * kLdP * 2 % 32 == 0, "pitches");
};

template <typename T, int kD>
struct DkdvShared {
  using C = TcBwdConfig<kD>;
  T k[C::kOwn][C::kLdT], v[C::kOwn][C::kLdT];              // the block's keys and values, loaded once
  T q[C::kStep][C::kLdT], dout[C::kStep][C::kLdT];         // this step's query rows
  float scratch[kWarps][16][C::kLdS];
  T p[kWarps][16][C::kLdP], ds[kWarps][16][C::kLdP];       // P^T and dS^T of each warp (keys x rows)
  float lse[C::kStep], delta[C::kStep];
};

template <typename T, int kD>
struct DqShared {
  using C = TcBwdConfig<kD>;
  T q[C::kOwn][C::kLdT], dout[C::kOwn][C::kLdT];           // the block's query rows, loaded once
  T k[C::kStep][C::kLdT], v[C::kStep][C::kLdT];            // this step's keys
  float scratch[kWarps][16][C::kLdS];
  T ds[kWarps][16][C::kLdP];                               // dS of each warp (rows x keys)
  float lse[C::kOwn], delta[C::kOwn];
};

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) attention_dkdv_tc_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv,
    HeadStrides sq, HeadStrides sk, HeadStrides sv, HeadStrides sdo, int heads, int group, int64_t tq, int64_t tk,
    int d, float scale, bool causal, MaskView mask, DropoutArgs drop) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using C = TcBwdConfig<kD>;
  auto& sh = dynamic_shared<DkdvShared<T, kD>>();
  const int64_t bkv = blockIdx.x;  // (batch, key/value head): its group's query heads are swept in order
  const int kv_heads = heads / group;
  const int b = static_cast<int>(blockIdx.x) / kv_heads, kvh = static_cast<int>(blockIdx.x) % kv_heads;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * C::kOwn;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane / 2, half = lane % 2;  // this lane's scratch row (a key) and half of its columns (rows)
  const int64_t jw = j0 + warp * 16, j = jw + r;
  load_tile<T, kD>(&sh.k[0][0], C::kLdT, C::kOwn, k + b * sk.b + kvh * sk.h, sk.t, j0, tk, d);
  load_tile<T, kD>(&sh.v[0][0], C::kLdT, C::kOwn, v + b * sv.b + kvh * sv.h, sv.t, j0, tk, d);
  const uint64_t seed = drop.p > 0.f ? static_cast<uint64_t>(*drop.seed) : 0;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> dk_acc[kD / 16], dv_acc[kD / 16];
#pragma unroll
  for (int n = 0; n < kD / 16; ++n) {
    nvcuda::wmma::fill_fragment(dk_acc[n], 0.f);
    nvcuda::wmma::fill_fragment(dv_acc[n], 0.f);
  }
  float* scratch = &sh.scratch[warp][0][0];
  for (int g_head = 0; g_head < group; ++g_head) {
    const int h = kvh * group + g_head;
    const int64_t bh = static_cast<int64_t>(b) * heads + h;
    const T* qh = q + b * sq.b + h * sq.h;
    const T* doh = dout + b * sdo.b + h * sdo.h;
    for (int64_t i0 = causal ? j0 : 0; i0 < tq; i0 += C::kStep) {  // causal: earlier rows see none of these keys
      __syncthreads();  // the previous step is consumed (and k, v are complete on the first pass)
      load_tile<T, kD>(&sh.q[0][0], C::kLdT, C::kStep, qh, sq.t, i0, tq, d);
      load_tile<T, kD>(&sh.dout[0][0], C::kLdT, C::kStep, doh, sdo.t, i0, tq, d);
      if (threadIdx.x < C::kStep) {
        const int64_t i = i0 + threadIdx.x;
        sh.lse[threadIdx.x] = i < tq ? lse[bh * tq + i] : 0.f;
        sh.delta[threadIdx.x] = i < tq ? delta[bh * tq + i] : 0.f;
      }
      __syncthreads();
      if (causal && i0 + C::kStep - 1 < jw) continue;  // warp-uniform: all of its keys come after all these rows
      // 1. S^T = K_w Q^T and dP^T = V_w dO^T (keys x rows).
      float s[8], dp[8];
      warp_scores_and_dp<T, kD>(&sh.k[warp * 16][0], &sh.q[0][0], &sh.v[warp * 16][0], &sh.dout[0][0], C::kLdT,
                                scratch, C::kLdS, s, dp);
      // 2. P^T and dS^T.
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int ii = half * 8 + e;
        const int64_t i = i0 + ii;
        float bias = 0.f;
        const bool visible = i < tq && j < tk && (!causal || j <= i) && mask_visible<T>(mask, b, h, i, j, bias);
        const ScoreGrad g = score_grad(s[e], dp[e], sh.lse[ii], sh.delta[ii], visible, bias, scale, drop, seed,
                                       (bh * tq + i) * tk + j);
        sh.p[warp][r][ii] = from_float<T>(g.p_kept);
        sh.ds[warp][r][ii] = from_float<T>(g.ds);
      }
      __syncwarp();
      // 3. dV_w += P^T dO, dK_w += dS^T Q.
      warp_mma_ab<T, kD>(dv_acc, &sh.p[warp][0][0], C::kLdP, &sh.dout[0][0], C::kLdT);
      warp_mma_ab<T, kD>(dk_acc, &sh.ds[warp][0][0], C::kLdP, &sh.q[0][0], C::kLdT);
    }
  }
  // dV carries the dropout's 1/(1-p) once, in fp32; dK has the softmax scale from dS.
  warp_store_rows<T, kD>(dv_acc, scratch, C::kLdS, dv + bkv * tk * d, jw, tk, d, drop.keep_scale);
  warp_store_rows<T, kD>(dk_acc, scratch, C::kLdS, dk + bkv * tk * d, jw, tk, d, 1.f);
#else
  __trap();  // never launched below sm_80 (use_tensor_cores)
#endif
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) attention_dq_tc_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dq, HeadStrides sq,
    HeadStrides sk, HeadStrides sv, HeadStrides sdo, int heads, int group, int64_t tq, int64_t tk, int d,
    float scale, bool causal, MaskView mask, DropoutArgs drop) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using C = TcBwdConfig<kD>;
  auto& sh = dynamic_shared<DqShared<T, kD>>();
  const int64_t bh = blockIdx.x;
  const int b = static_cast<int>(blockIdx.x) / heads, h = static_cast<int>(blockIdx.x) % heads;  // 32-bit: no call
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * C::kOwn;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = lane / 2, half = lane % 2;  // this lane's scratch row (a query row) and half of its columns (keys)
  const int64_t iw = i0 + warp * 16, i = iw + r;
  const T* kh = k + b * sk.b + h / group * sk.h;
  const T* vh = v + b * sv.b + h / group * sv.h;
  load_tile<T, kD>(&sh.q[0][0], C::kLdT, C::kOwn, q + b * sq.b + h * sq.h, sq.t, i0, tq, d);
  load_tile<T, kD>(&sh.dout[0][0], C::kLdT, C::kOwn, dout + b * sdo.b + h * sdo.h, sdo.t, i0, tq, d);
  if (threadIdx.x < C::kOwn) {
    const int64_t row = i0 + threadIdx.x;
    sh.lse[threadIdx.x] = row < tq ? lse[bh * tq + row] : 0.f;
    sh.delta[threadIdx.x] = row < tq ? delta[bh * tq + row] : 0.f;
  }
  const uint64_t seed = drop.p > 0.f ? static_cast<uint64_t>(*drop.seed) : 0;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> dq_acc[kD / 16];
#pragma unroll
  for (int n = 0; n < kD / 16; ++n) nvcuda::wmma::fill_fragment(dq_acc[n], 0.f);
  float* scratch = &sh.scratch[warp][0][0];
  const int64_t key_end = causal ? min(tk, i0 + C::kOwn) : tk;  // causal: later keys are never loaded
  for (int64_t j0 = 0; j0 < key_end; j0 += C::kStep) {
    __syncthreads();  // the previous step is consumed (and q, dout, lse, delta are complete on the first pass)
    load_tile<T, kD>(&sh.k[0][0], C::kLdT, C::kStep, kh, sk.t, j0, tk, d);
    load_tile<T, kD>(&sh.v[0][0], C::kLdT, C::kStep, vh, sv.t, j0, tk, d);
    __syncthreads();
    if (causal && j0 > iw + 15) continue;  // warp-uniform: all these keys come after all of its rows
    // 1. S = Q_w K^T and dP = dO_w V^T (rows x keys).
    float s[8], dp[8];
    warp_scores_and_dp<T, kD>(&sh.q[warp * 16][0], &sh.k[0][0], &sh.dout[warp * 16][0], &sh.v[0][0], C::kLdT,
                              scratch, C::kLdS, s, dp);
    // 2. dS.
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int jj = half * 8 + e;
      const int64_t j = j0 + jj;
      float bias = 0.f;
      const bool visible = i < tq && j < tk && (!causal || j <= i) && mask_visible<T>(mask, b, h, i, j, bias);
      const ScoreGrad g = score_grad(s[e], dp[e], sh.lse[warp * 16 + r], sh.delta[warp * 16 + r], visible, bias,
                                     scale, drop, seed, (bh * tq + i) * tk + j);
      sh.ds[warp][r][jj] = from_float<T>(g.ds);
    }
    __syncwarp();
    // 3. dQ_w += dS K.
    warp_mma_ab<T, kD>(dq_acc, &sh.ds[warp][0][0], C::kLdP, &sh.k[0][0], C::kLdT);
  }
  warp_store_rows<T, kD>(dq_acc, scratch, C::kLdS, dq + bh * tq * d, iw, tq, d, 1.f);
#else
  __trap();  // never launched below sm_80 (use_tensor_cores)
#endif
}

// t itself if every (batch, head, row) of it starts on 16 bytes, as the tensor-core kernels' loads need (true for
// the usual (B, T, H, D) views with d a multiple of 16), else a contiguous copy.
at::Tensor tc_aligned(const at::Tensor& t) {
  const int64_t pack = 16 / t.element_size();
  const bool aligned = reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 && t.stride(0) % pack == 0 &&
                       t.stride(1) % pack == 0 && t.stride(2) % pack == 0;
  return aligned ? t : t.contiguous();
}

// Calls f(std::integral_constant<int, kD>) for the tensor-core head-dim bucket (64 or 128) that holds d.
template <typename F>
void dispatch_tc_head_dim(int64_t d, F&& f) {
  if (d <= 64) f(std::integral_constant<int, 64>{});
  else f(std::integral_constant<int, 128>{});
}

// Calls f(T{}) for the 16-bit float type of t (the only ones the tensor-core kernels take).
template <typename F>
void dispatch_half_types(const at::Tensor& t, const char* op, F&& f) {
  dispatch_float_types(t.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, float>) {
      TORCH_CHECK(false, op, ": the tensor-core kernels take float16 or bfloat16, got float32");
    } else {
      f(tag);
    }
  });
}

}  // namespace

void attention_fwd_tc_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                           const at::Tensor& lse, const AttentionProblem& p) {
  const at::Tensor qa = tc_aligned(q), ka = tc_aligned(k), va = tc_aligned(v);
  dispatch_half_types(q, p.op, [&](auto tag) {
    using T = decltype(tag);
    dispatch_tc_head_dim(p.d, [&](auto kd) {
      constexpr int kD = decltype(kd)::value;
      const int64_t tiles = (p.tq + TcFwdConfig<kD>::kBq - 1) / TcFwdConfig<kD>::kBq;
      check_grid(p.batch * p.heads, tiles, p.op);
      launch_kernel(attention_fwd_tc_kernel<T, kD>, dim3(p.batch * p.heads, tiles), kThreads, 0, p.stream,
                    qa.const_data_ptr<T>(), ka.const_data_ptr<T>(), va.const_data_ptr<T>(), out.mutable_data_ptr<T>(),
                    lse.mutable_data_ptr<float>(), strides_of(qa), strides_of(ka), strides_of(va), p.heads, p.group,
                    p.tq, p.tk, p.d, p.scale, p.causal, p.mask, p.drop);
    });
  });
}

void attention_bwd_tc_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                           const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& dq, const at::Tensor& dk,
                           const at::Tensor& dv, const AttentionProblem& p) {
  const at::Tensor qa = tc_aligned(q), ka = tc_aligned(k), va = tc_aligned(v), da = tc_aligned(dout);
  dispatch_half_types(q, p.op, [&](auto tag) {
    using T = decltype(tag);
    dispatch_tc_head_dim(p.d, [&](auto kd) {
      constexpr int kD = decltype(kd)::value;
      constexpr int64_t own = TcBwdConfig<kD>::kOwn;
      const unsigned bh = static_cast<unsigned>(p.batch * p.heads), bkv = static_cast<unsigned>(bh / p.group);
      launch_kernel(attention_dkdv_tc_kernel<T, kD>, dim3(bkv, (p.tk + own - 1) / own), kThreads,
                    sizeof(DkdvShared<T, kD>), p.stream, qa.const_data_ptr<T>(), ka.const_data_ptr<T>(),
                    va.const_data_ptr<T>(), da.const_data_ptr<T>(), lse.const_data_ptr<float>(),
                    delta.const_data_ptr<float>(), dk.mutable_data_ptr<T>(), dv.mutable_data_ptr<T>(), strides_of(qa),
                    strides_of(ka), strides_of(va), strides_of(da), p.heads, p.group, p.tq, p.tk, p.d, p.scale,
                    p.causal, p.mask, p.drop);
      launch_kernel(attention_dq_tc_kernel<T, kD>, dim3(bh, (p.tq + own - 1) / own), kThreads,
                    sizeof(DqShared<T, kD>), p.stream, qa.const_data_ptr<T>(), ka.const_data_ptr<T>(),
                    va.const_data_ptr<T>(), da.const_data_ptr<T>(), lse.const_data_ptr<float>(),
                    delta.const_data_ptr<float>(), dq.mutable_data_ptr<T>(), strides_of(qa), strides_of(ka),
                    strides_of(va), strides_of(da), p.heads, p.group, p.tq, p.tk, p.d, p.scale, p.causal, p.mask,
                    p.drop);
    });
  });
}

}  // namespace chargpt
