// SIMT attention kernels (fp32, fp16, bf16 in; fp32 scores, softmax and accumulators), any head dim up to 256:
//   forward : a block of 4 warps owns 4*R query rows (scaled by `scale` as they land in shared memory; decoding:
//             every row of a kv head's query group, against one split of the keys, see ForwardRows); key and
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
#include <algorithm>

#include "attention_common.cuh"

namespace chargpt {
namespace {

// The SIMT kernels say __launch_bounds__(kThreads, 1): without a minimum block count ptxas picked a register target
// that spilled 4-20 bytes (around the Philox rounds); with it they take 83-203 registers and spill nothing.

template <int kDpl>
struct FwdConfig {
  static constexpr int kDmax = 32 * kDpl;
  static constexpr int kBk = kDpl == 8 ? 16 : 32;     // keys per tile: keeps shared memory under 48 KB
  static constexpr int kRows = kDpl == 8 ? 2 : 4;     // query rows per warp
  static constexpr int kBq = kWarps * kRows;
};

// The rows a forward block owns and the keys it sweeps. Regular: block (b * heads + h, y) owns kBq query rows of
// head h from y * kBq, against every key. Decoding (few rows per kv head, see decodes()): block (b * kv heads +
// kv head, 0, split) owns every query row of the kv head's group (row r: query r % tq of head kv head * group +
// r / tq), so K and V are read once per group, against keys [split * split_len, (split + 1) * split_len); it
// writes its unnormalised output, max and sum to `partial` for attention_decode_combine_kernel.
struct ForwardRows {
  int heads_per_block;     // 1, or the GQA group when decoding
  int64_t rows_per_head;   // kBq, or tq when decoding
  int64_t split_len;       // keys per block (tk when the keys are not split)
  DecodePartials partial;  // null pointers: write out and lse directly
};

template <typename T, int kDpl>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
    float* __restrict__ lse, HeadStrides sq, HeadStrides sk, HeadStrides sv, int heads, int group, int64_t tq,
    int64_t tk, int d, float scale, bool causal, MaskView mask, DropoutArgs drop, ForwardRows fr) {
  using C = FwdConfig<kDpl>;
  __shared__ float q_s[C::kBq][C::kDmax];
  __shared__ float k_s[C::kBk][C::kDmax + 1];  // +1: lane j reads row j, so rows must fall in different banks
  __shared__ float v_s[C::kBk][C::kDmax];
  const int head_blocks = heads / fr.heads_per_block;
  const int b = static_cast<int>(blockIdx.x) / head_blocks;  // 32-bit: no call
  const int h_first = static_cast<int>(blockIdx.x) % head_blocks * fr.heads_per_block;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * fr.rows_per_head;
  const int n_rows = fr.heads_per_block * static_cast<int>(min(fr.rows_per_head, tq - i0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* kh = k + b * sk.b + h_first / group * sk.h;  // GQA: the group's key/value head
  const T* vh = v + b * sv.b + h_first / group * sv.h;
  // Row r of the block: query i0 + r % rows_per_head of head h_first + r / rows_per_head.
  const auto head_of = [&](int r) { return h_first + static_cast<int>(r / fr.rows_per_head); };
  const auto query_of = [&](int r) { return i0 + r % fr.rows_per_head; };
  for (int idx = threadIdx.x; idx < C::kBq * C::kDmax; idx += kThreads) {
    const int r = idx / C::kDmax, c = idx % C::kDmax;
    q_s[r][c] = (r < n_rows && c < d)
                    ? to_float(q[b * sq.b + head_of(r) * sq.h + query_of(r) * sq.t + c]) * scale : 0.f;
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
  const int64_t key_begin = static_cast<int64_t>(blockIdx.z) * fr.split_len;
  const int64_t split_end = min(tk, key_begin + fr.split_len);
  const int64_t key_end = causal ? min(split_end, i0 + fr.rows_per_head) : split_end;  // causal: later tiles skipped
  for (int64_t j0 = key_begin; j0 < key_end; j0 += C::kBk) {
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
      const int row = r * kWarps + warp;  // interleaved: a few decoding rows still spread over every warp
      if (row >= n_rows) continue;        // warp-uniform
      const int h = head_of(row);
      const int64_t i = query_of(row), bh = static_cast<int64_t>(b) * heads + h;
      const int64_t j = j0 + lane;
      float bias = 0.f;
      const bool visible =
          lane < C::kBk && j < split_end && (!causal || j <= i) && mask_keeps<T>(mask, b, h, i, j, bias);
      float s = -INFINITY;
      if (visible) {
        s = bias;
#pragma unroll 8
        for (int c = 0; c < C::kDmax; ++c) s += q_s[row][c] * k_s[lane][c];
      }
      const float m_new = max_keep_nan(m[r], warp_max(s));
      if (m_new == -INFINITY) continue;  // this row has seen only -inf scores so far: m = -inf, l = 0
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
    const int row = r * kWarps + warp;
    if (row >= n_rows) continue;
    const int64_t out_row = (static_cast<int64_t>(b) * heads + head_of(row)) * tq + query_of(row);
    if (fr.partial.out != nullptr) {  // a split's share, normalised by the combine
      const int64_t at = blockIdx.z * fr.partial.rows + out_row;
#pragma unroll
      for (int c = 0; c < kDpl; ++c) {
        const int col = lane + 32 * c;
        if (col < d) fr.partial.out[at * d + col] = acc[r][c];
      }
      if (lane == 0) fr.partial.max[at] = m[r], fr.partial.sum[at] = l[r];
      continue;
    }
    // l = 0: every score was -inf (a fully masked row): output 0 and lse +inf, so that the backward's P is 0 too.
    // A NaN l stays NaN. __fdividef (l <= tk) avoids the IEEE division's out-of-line slow path.
    const float inv = l[r] == 0.f ? 0.f : __fdividef(1.f, l[r]);
    T* orow = out + out_row * d;
#pragma unroll
    for (int c = 0; c < kDpl; ++c) {
      const int col = lane + 32 * c;
      if (col < d) orow[col] = from_float<T>(acc[r][c] * inv);
    }
    if (lane == 0) lse[out_row] = l[r] == 0.f ? INFINITY : m[r] + logf(l[r]);
  }
}

// Decoding's second step, one warp per output row: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s with
// M = max_s m_s, lse = M + log(that sum); a split that saw no key (m_s = -inf) adds nothing, and a row with no key
// at all gets 0 and lse +inf, as in the forward.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_decode_combine_kernel(DecodePartials partial, int splits,
                                                                            int d, T* __restrict__ out,
                                                                            float* __restrict__ lse) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= partial.rows) return;
  const int lane = threadIdx.x % 32;
  float top = -INFINITY;
  for (int s = 0; s < splits; ++s) top = max_keep_nan(top, partial.max[s * partial.rows + row]);
  const float ref = top == -INFINITY ? 0.f : top;
  float total = 0.f;
  for (int s = 0; s < splits; ++s) total += expf(partial.max[s * partial.rows + row] - ref) *
                                            partial.sum[s * partial.rows + row];
  const float inv = total == 0.f ? 0.f : 1.f / total;
  for (int col = lane; col < d; col += 32) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s)
      acc += expf(partial.max[s * partial.rows + row] - ref) * partial.out[(s * partial.rows + row) * d + col];
    out[row * d + col] = from_float<T>(acc * inv);
  }
  if (lane == 0) lse[row] = total == 0.f ? INFINITY : top + logf(total);
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

// dK, dV: warp w of block (b * kv heads + kv head, kb) owns keys kb*16 + 4w .. +3 and sweeps every query row of
// every query head of the group that sees them (GQA: the group's sum, in a fixed order).
template <typename T, int kDpl>
__global__ void __launch_bounds__(kThreads, 1) attention_dkdv_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv,
    HeadStrides sq, HeadStrides sk, HeadStrides sv, HeadStrides sdo, int heads, int group, int64_t tq, int64_t tk,
    int d, float scale, bool causal, MaskView mask, DropoutArgs drop) {
  const int64_t bkv = blockIdx.x;  // (batch, key/value head)
  const int kv_heads = heads / group;
  const int b = static_cast<int>(blockIdx.x) / kv_heads, kvh = static_cast<int>(blockIdx.x) % kv_heads;
  const int lane = threadIdx.x % 32;
  const int64_t j_first = (static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / 32) * kItemsPerWarp;
  if (j_first >= tk) return;
  const uint64_t seed = drop.p > 0.f ? static_cast<uint64_t>(*drop.seed) : 0;
  float kr[kItemsPerWarp][kDpl], vr[kItemsPerWarp][kDpl], dkr[kItemsPerWarp][kDpl], dvr[kItemsPerWarp][kDpl];
#pragma unroll
  for (int e = 0; e < kItemsPerWarp; ++e) {
    const int64_t j = min(j_first + e, tk - 1);  // clamped rows are loaded but never used or written
    load_row<T, kDpl>(k + b * sk.b + kvh * sk.h + j * sk.t, d, lane, kr[e]);
    load_row<T, kDpl>(v + b * sv.b + kvh * sv.h + j * sv.t, d, lane, vr[e]);
#pragma unroll
    for (int c = 0; c < kDpl; ++c) dkr[e][c] = dvr[e][c] = 0.f;
  }
  for (int g_head = 0; g_head < group; ++g_head) {
    const int h = kvh * group + g_head;
    const int64_t bh = static_cast<int64_t>(b) * heads + h;
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
        const float score = warp_sum(s[e]), dpe = warp_sum(dp[e]);
        const int64_t j = j_first + e;
        float bias = 0.f;
        if (j >= tk || (causal && j > i) || !mask_visible<T>(mask, b, h, i, j, bias)) continue;  // warp-uniform
        const ScoreGrad g =
            score_grad(score, dpe, lse_i, delta_i, true, bias, scale, drop, seed, (bh * tq + i) * tk + j);
#pragma unroll
        for (int c = 0; c < kDpl; ++c) {
          dvr[e][c] += g.p_kept * doi[c];
          dkr[e][c] += g.ds * qi[c];
        }
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
        dk[(bkv * tk + j) * d + col] = from_float<T>(dkr[e][c]);
        dv[(bkv * tk + j) * d + col] = from_float<T>(dvr[e][c] * drop.keep_scale);
      }
    }
  }
}

// dQ: warp w of block (bh, qb) owns query rows qb*16 + 4w .. +3 and sweeps the keys they see.
template <typename T, int kDpl>
__global__ void __launch_bounds__(kThreads, 1) attention_dq_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ delta, T* __restrict__ dq, HeadStrides sq,
    HeadStrides sk, HeadStrides sv, HeadStrides sdo, int heads, int group, int64_t tq, int64_t tk, int d,
    float scale, bool causal, MaskView mask, DropoutArgs drop) {
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
  const T* kh = k + b * sk.b + h / group * sk.h;
  const T* vh = v + b * sv.b + h / group * sv.h;
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
      const float score = warp_sum(s[e]), dpe = warp_sum(dp[e]);
      const int64_t i = i_first + e;
      float bias = 0.f;
      if (i >= tq || (causal && j > i) || !mask_visible<T>(mask, b, h, i, j, bias)) continue;  // warp-uniform
      const ScoreGrad g =
          score_grad(score, dpe, lse_r[e], delta_r[e], true, bias, scale, drop, seed, (bh * tq + i) * tk + j);
#pragma unroll
      for (int c = 0; c < kDpl; ++c) dqr[e][c] += g.ds * kj[c];
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

}  // namespace

void attention_fwd_simt_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                             const at::Tensor& lse, const AttentionProblem& p) {
  dispatch_float_types(q.scalar_type(), p.op, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(p.d, [&](auto dpl) {
      constexpr int kDpl = decltype(dpl)::value;
      constexpr int64_t kBq = FwdConfig<kDpl>::kBq;
      const auto launch = [&](dim3 grid, const ForwardRows& fr) {
        launch_kernel(attention_fwd_kernel<T, kDpl>, grid, kThreads, 0, p.stream, q.const_data_ptr<T>(),
                      k.const_data_ptr<T>(), v.const_data_ptr<T>(), out.mutable_data_ptr<T>(),
                      lse.mutable_data_ptr<float>(), strides_of(q), strides_of(k), strides_of(v), p.heads, p.group,
                      p.tq, p.tk, p.d, p.scale, p.causal, p.mask, p.drop, fr);
      };
      if (!decodes(p)) {
        const int64_t tiles = (p.tq + kBq - 1) / kBq;
        check_grid(p.batch * p.heads, tiles, p.op);
        launch(dim3(p.batch * p.heads, tiles), ForwardRows{1, kBq, p.tk, {}});
        return;
      }
      // Decoding: enough key splits for about kDecodeBlocks blocks, none under kDecodeMinKeys keys.
      const int64_t kv_blocks = p.batch * (p.heads / p.group);
      const int64_t splits = std::clamp<int64_t>((kDecodeBlocks + kv_blocks - 1) / kv_blocks, 1,
                                                 std::min<int64_t>(kMaxDecodeSplits, p.tk / kDecodeMinKeys));
      const int64_t split_len = ((p.tk + splits - 1) / splits + FwdConfig<kDpl>::kBk - 1) /
                                FwdConfig<kDpl>::kBk * FwdConfig<kDpl>::kBk;  // whole key tiles
      check_grid(kv_blocks, 1, p.op);
      const int64_t rows = p.batch * p.heads * p.tq;
      at::Tensor scratch = at::empty({splits * rows * (p.d + 2)}, q.options().dtype(at::kFloat));
      float* base = scratch.mutable_data_ptr<float>();
      const DecodePartials partial{base, base + splits * rows * p.d, base + splits * rows * (p.d + 1), rows};
      const int64_t used = (p.tk + split_len - 1) / split_len;  // rounding up may leave the last splits empty
      launch(dim3(kv_blocks, 1, used), ForwardRows{static_cast<int>(p.group), p.tq, split_len, partial});
      launch_kernel(attention_decode_combine_kernel<T>, static_cast<unsigned>((rows + kWarps - 1) / kWarps),
                    kThreads, 0, p.stream, partial, static_cast<int>(used), static_cast<int>(p.d),
                    out.mutable_data_ptr<T>(), lse.mutable_data_ptr<float>());
    });
  });
}

void attention_delta_cuda(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& delta,
                          const AttentionProblem& p) {
  dispatch_float_types(dout.scalar_type(), p.op, [&](auto tag) {
    using T = decltype(tag);
    const int64_t rows = p.batch * p.heads * p.tq;
    launch_kernel(attention_delta_kernel<T>, static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0,
                  p.stream, dout.const_data_ptr<T>(), out.const_data_ptr<T>(), delta.mutable_data_ptr<float>(),
                  strides_of(dout), strides_of(out), p.heads, p.tq, p.d, rows);
  });
}

void attention_bwd_simt_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                             const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& dq,
                             const at::Tensor& dk, const at::Tensor& dv, const AttentionProblem& p) {
  const int64_t per_block = kWarps * kItemsPerWarp;  // the host checked this grid
  dispatch_float_types(q.scalar_type(), p.op, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(p.d, [&](auto dpl) {
      constexpr int kDpl = decltype(dpl)::value;
      const unsigned bh = static_cast<unsigned>(p.batch * p.heads), bkv = static_cast<unsigned>(bh / p.group);
      launch_kernel(attention_dkdv_kernel<T, kDpl>, dim3(bkv, (p.tk + per_block - 1) / per_block), kThreads, 0,
                    p.stream, q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(),
                    dout.const_data_ptr<T>(), lse.const_data_ptr<float>(), delta.const_data_ptr<float>(),
                    dk.mutable_data_ptr<T>(), dv.mutable_data_ptr<T>(), strides_of(q), strides_of(k), strides_of(v),
                    strides_of(dout), p.heads, p.group, p.tq, p.tk, p.d, p.scale, p.causal, p.mask, p.drop);
      launch_kernel(attention_dq_kernel<T, kDpl>, dim3(bh, (p.tq + per_block - 1) / per_block), kThreads, 0,
                    p.stream, q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(),
                    dout.const_data_ptr<T>(), lse.const_data_ptr<float>(), delta.const_data_ptr<float>(),
                    dq.mutable_data_ptr<T>(), strides_of(q), strides_of(k), strides_of(v), strides_of(dout), p.heads,
                    p.group, p.tq, p.tk, p.d, p.scale, p.causal, p.mask, p.drop);
    });
  });
}

}  // namespace chargpt
