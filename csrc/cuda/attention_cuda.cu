// Attention on CUDA, host side: argument checks, outputs, and the choice between the two kernel families
// (fp32, fp16, bf16 in; fp32 scores, softmax and accumulators):
//   tensor cores (attention_tc_cuda.cu): fp16/bf16 with d a multiple of 16 up to 128 on sm_80+;
//   SIMT (attention_simt_cuda.cu): everything else.
// Both follow the same masking (causal, attn_mask read through its strides), GQA (query head h reads key/value head
// h / group; dK/dV blocks own a kv head and sweep its group in order, no atomics), online-softmax bookkeeping and
// dropout (keep iff philox_uniform(seed, ((b*H + h)*Tq + i)*Tk + j) >= p, ../philox.h), so either can run the
// backward of the other's forward.
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream is what at::cuda:: re-exports; this header
                                   // avoids ATen/cuda/CUDAContext.h, which needs the cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "attention_common.cuh"

namespace chargpt {
namespace {

// The tensor-core kernels take fp16/bf16 with d a multiple of 16 up to 128, on sm_80+ (bf16 WMMA; the kernel bodies
// are compiled only there). Anything else takes the SIMT kernels.
bool use_tensor_cores(const at::Tensor& q, int64_t d) {
  if (q.scalar_type() == at::kFloat || d % 16 != 0 || d > 128) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  return major >= 8;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, bool is_causal, double dropout_p,
                                                      double scale, const std::optional<at::Tensor>& seed,
                                                      const std::optional<at::Tensor>& attn_mask) {
  const char* op = "chargpt::attention_fwd";
  check_attention_args(op, q_in, k_in, v_in, dropout_p, scale, seed);
  check_attention_mask(op, q_in, k_in, attn_mask);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = unit_last_dim(q_in), k = unit_last_dim(k_in), v = unit_last_dim(v_in);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  dispatch_float_types(q.scalar_type(), op, [](auto) {});  // the dtype check, before anything is allocated
  at::Tensor out = at::empty({B, H, Tq, D}, q.options());
  at::Tensor lse = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  const int64_t group = std::max<int64_t>(1, H / k.size(1));  // query heads per kv head (1 for H = 0)
  const AttentionProblem p{B, H, group, Tq, Tk, D, static_cast<float>(scale), is_causal, mask_view(attn_mask),
                           dropout_args(dropout_p, seed), c10::cuda::getCurrentCUDAStream(), op};
  if (use_tensor_cores(q, D) && !decodes(p)) attention_fwd_tc_cuda(q, k, v, out, lse, p);  // decoding: SIMT
  else attention_fwd_simt_cuda(q, k, v, out, lse, p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, bool is_causal, double dropout_p, double scale,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& attn_mask) {
  const char* op = "chargpt::attention_bwd";
  check_attention_args(op, q_in, k_in, v_in, dropout_p, scale, seed);
  check_attention_mask(op, q_in, k_in, attn_mask);
  check_attention_bwd_args(grad_out_in, q_in, out_in, lse_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = unit_last_dim(q_in), k = unit_last_dim(k_in), v = unit_last_dim(v_in);
  const at::Tensor dout = unit_last_dim(grad_out_in), out = unit_last_dim(out_in), lse = lse_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), Hk = k.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  dispatch_float_types(q.scalar_type(), op, [](auto) {});
  at::Tensor dq = at::empty({B, H, Tq, D}, q.options());
  at::Tensor dk = at::empty({B, Hk, Tk, D}, q.options());
  at::Tensor dv = at::empty({B, Hk, Tk, D}, q.options());
  at::Tensor delta = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  const int64_t per_block = kWarps * kItemsPerWarp;  // the SIMT grid, the larger of the two
  check_grid(B * H, (std::max(Tq, Tk) + per_block - 1) / per_block, op);
  const int64_t group = std::max<int64_t>(1, H / Hk);
  const AttentionProblem p{B, H, group, Tq, Tk, D, static_cast<float>(scale), is_causal, mask_view(attn_mask),
                           dropout_args(dropout_p, seed), c10::cuda::getCurrentCUDAStream(), op};
  attention_delta_cuda(dout, out, delta, p);
  if (use_tensor_cores(q, D)) attention_bwd_tc_cuda(q, k, v, dout, lse, delta, dq, dk, dv, p);
  else attention_bwd_simt_cuda(q, k, v, dout, lse, delta, dq, dk, dv, p);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(chargpt, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace chargpt
