// What the attention .cu files share: block shape, head strides, dropout and the softmax-backward entry (device
// side), and the launchers each kernel family exports to the host code in attention_cuda.cu.
//   attention_simt_cuda.cu: SIMT kernels, any float type and head dim (forward, delta, dK/dV, dQ);
//   attention_tc_cuda.cu  : tensor-core (WMMA) kernels for fp16/bf16, d a multiple of 16 up to 128, sm_80+.
// The launchers take (B, H, T, D) tensors with unit-stride rows and contiguous outputs of the same dtype.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "../host_utils.h"
#include "../philox.h"
#include "common.cuh"

namespace chargpt {

struct HeadStrides {
  int64_t b, h, t;  // the head dim is contiguous
};

inline HeadStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// attn_mask as the kernels read it: a (B, Hq, Tq, Tk) view through its strides (0 where broadcast, never expanded
// in memory), bool (true = take part) or additive of the inputs' type; data is null without a mask.
struct MaskView {
  const void* data = nullptr;
  bool is_bool = false;
  int64_t sb = 0, sh = 0, sq = 0, sk = 0;
};

inline MaskView mask_view(const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return {};
  return {mask->const_data_ptr(), mask->scalar_type() == at::kBool, mask->stride(0), mask->stride(1),
          mask->stride(2), mask->stride(3)};
}

// One attention call: shapes (GQA: `group` query heads per key/value head), softmax scale, masks, dropout and the
// stream to launch on.
struct AttentionProblem {
  int64_t batch, heads, group, tq, tk, d;
  float scale;
  bool causal;
  MaskView mask;
  DropoutArgs drop;
  cudaStream_t stream;
  const char* op;  // for error messages
};

// Decoding (few query rows per kv head against many keys): the SIMT forward takes a kv head's whole query group in
// one block and splits the keys over several blocks (flash-decoding), combined by a second kernel.
constexpr int64_t kDecodeRows = 8;        // group x tq at most this (the smallest SIMT block's rows)
constexpr int64_t kDecodeMinKeys = 256;   // keys per split at least (and fewer keys: the regular forward)
constexpr int64_t kDecodeBlocks = 256;    // splits are added until there are about this many blocks
constexpr int64_t kMaxDecodeSplits = 64;  // and at most this many splits

inline bool decodes(const AttentionProblem& p) {
  return p.tq > 0 && p.group * p.tq <= kDecodeRows && p.tk >= kDecodeMinKeys;
}

// Per split s and output row r (B * H * Tq rows): the unnormalised output out[(s * rows + r) * d ...] and the
// running max and sum at [s * rows + r], fp32.
struct DecodePartials {
  float* out = nullptr;
  float* max = nullptr;
  float* sum = nullptr;
  int64_t rows = 0;
};

// out, lse = attention(q, k, v).
void attention_fwd_simt_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                             const at::Tensor& lse, const AttentionProblem& p);
void attention_fwd_tc_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                           const at::Tensor& lse, const AttentionProblem& p);
// delta = rowsum(dout * out), fp32 (B, H, Tq): the backward's softmax correction, shared by both families.
void attention_delta_cuda(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& delta,
                          const AttentionProblem& p);
// dq, dk, dv from the saved lse and delta.
void attention_bwd_simt_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                             const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& dq,
                             const at::Tensor& dk, const at::Tensor& dv, const AttentionProblem& p);
void attention_bwd_tc_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
                           const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& dq, const at::Tensor& dk,
                           const at::Tensor& dv, const AttentionProblem& p);

inline void check_grid(int64_t bh, int64_t tiles, const char* op) {
  TORCH_CHECK(bh <= 0x7fffffff && tiles <= 65535, op, ": B*H = ", bh, " and ", tiles,
              " sequence tiles exceed the CUDA grid limits");
}

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kItemsPerWarp = 4;  // keys (dK/dV) or query rows (dQ) owned by one SIMT backward warp

__device__ __forceinline__ float dropout_factor(const DropoutArgs& drop, uint64_t seed, int64_t offset) {
  if (drop.p <= 0.f) return 1.f;
  return philox_uniform(seed, static_cast<uint64_t>(offset)) >= drop.p ? drop.keep_scale : 0.f;
}

// Whether attn_mask lets query i of head (b, h) see key j: false where a bool mask removes it. `bias` gets an
// additive mask's value there (0 otherwise), added to the scaled score; -inf removes the key as well, but the
// forward adds it rather than skipping (a NaN score stays NaN, as in torch). Warp-uniform when (i, j) is.
template <typename T>
__device__ __forceinline__ bool mask_keeps(const MaskView& mask, int64_t b, int64_t h, int64_t i, int64_t j,
                                           float& bias) {
  bias = 0.f;
  if (mask.data == nullptr) return true;
  const int64_t at = b * mask.sb + h * mask.sh + i * mask.sq + j * mask.sk;
  if (mask.is_bool) return static_cast<const bool*>(mask.data)[at];
  bias = to_float(static_cast<const T*>(mask.data)[at]);
  return true;
}

// The backward's view of the same: (visible, bias) for an entry the causal mask and bounds let through; an
// entry an additive -inf removes is not visible (dS = 0 exactly there, also when delta is NaN).
template <typename T>
__device__ __forceinline__ bool mask_visible(const MaskView& mask, int64_t b, int64_t h, int64_t i, int64_t j,
                                             float& bias) {
  return mask_keeps<T>(mask, b, h, i, j, bias) && bias != -INFINITY;
}

// One entry of the softmax backward, recomputed from the saved log-sum-exp: P = exp(S*scale + bias - lse) and
// dS = P * (dP*Z - delta) * scale, Z the dropout factor (0 or 1/(1-p)), bias an additive mask's value. p_kept is P
// where the entry was kept and 0 where it was dropped or masked (dV = (1/(1-p)) * sum p_kept dO); masked entries
// give 0 for both.
struct ScoreGrad {
  float p_kept, ds;
};
__device__ __forceinline__ ScoreGrad score_grad(float s, float dp, float lse, float delta, bool visible, float bias,
                                                float scale, const DropoutArgs& drop, uint64_t seed,
                                                int64_t offset) {
  if (!visible) return {0.f, 0.f};
  const float p = expf(s * scale + bias - lse);
  const float z = dropout_factor(drop, seed, offset);
  return {z != 0.f ? p : 0.f, p * (dp * z - delta) * scale};
}

}  // namespace
}  // namespace chargpt
