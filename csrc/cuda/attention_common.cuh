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

// One attention call: shapes, softmax scale, mask, dropout and the stream to launch on.
struct AttentionProblem {
  int64_t batch, heads, tq, tk, d;
  float scale;
  bool causal;
  DropoutArgs drop;
  cudaStream_t stream;
  const char* op;  // for error messages
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

// One entry of the softmax backward, recomputed from the saved log-sum-exp: P = exp(S*scale - lse) and
// dS = P * (dP*Z - delta) * scale, Z the dropout factor (0 or 1/(1-p)). p_kept is P where the entry was kept and
// 0 where it was dropped or masked (dV = (1/(1-p)) * sum p_kept dO); masked entries give 0 for both.
struct ScoreGrad {
  float p_kept, ds;
};
__device__ __forceinline__ ScoreGrad score_grad(float s, float dp, float lse, float delta, bool visible, float scale,
                                                const DropoutArgs& drop, uint64_t seed, int64_t offset) {
  if (!visible) return {0.f, 0.f};
  const float p = expf(s * scale - lse);
  const float z = dropout_factor(drop, seed, offset);
  return {z != 0.f ? p : 0.f, p * (dp * z - delta) * scale};
}

}  // namespace
}  // namespace chargpt
