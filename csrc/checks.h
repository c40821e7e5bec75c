// Argument checks shared by the CPU and CUDA kernels: every message names the op and the problem, so bad input
// reaching torch.ops.chargpt.* raises a RuntimeError instead of crashing or reading out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

namespace chargpt {

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but x/q is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " is ", t.scalar_type(), " but x/q is ",
              ref.scalar_type());
}

inline void check_layer_norm_fwd_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias, double eps) {
  const char* op = "chargpt::layer_norm_fwd";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (M, N), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) >= 1, op, ": x must have N >= 1 columns, got shape ", x.sizes());
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be a positive number, got ", eps);
  for (const auto& [t, name] : {std::make_pair(&weight, "weight"), std::make_pair(&bias, "bias")}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == x.size(1), op, ": ", name, " must have shape (", x.size(1),
                ",), got ", (*t)->sizes());
    check_same(**t, x, op, name);
  }
}

inline void check_layer_norm_bwd_args(const at::Tensor& grad_out, const at::Tensor& x,
                                      const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                      const at::Tensor& rstd) {
  const char* op = "chargpt::layer_norm_bwd";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (M, N), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) >= 1, op, ": x must have N >= 1 columns, got shape ", x.sizes());
  TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": grad_out has shape ", grad_out.sizes(), " but x has ",
              x.sizes());
  check_same(grad_out, x, op, "grad_out");
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == x.size(1), op, ": weight must have shape (", x.size(1),
                ",), got ", weight->sizes());
    check_same(*weight, x, op, "weight");
  }
  for (const auto& [t, name] : {std::make_pair(&mean, "mean"), std::make_pair(&rstd, "rstd")}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(0), op, ": ", name, " must have shape (", x.size(0),
                ",), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ", x.device());
  }
}

// rms_norm and add_norm: the rows and parameters layer_norm takes; add_norm also a residual like x, a norm kind
// ("layer" or "rms", returned as rms = true/false) and dropout with its seed.
inline void check_norm_rows(const char* op, const at::Tensor& x, const char* name = "x") {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D (M, N), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) >= 1, op, ": ", name, " must have N >= 1 columns, got shape ", x.sizes());
}

inline void check_norm_like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " has shape ", t.sizes(), " but x has ", x.sizes());
  check_same(t, x, op, name);
}

inline void check_norm_param(const char* op, const std::optional<at::Tensor>& t, const char* name,
                             const at::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), op, ": ", name, " must have shape (", x.size(1), ",), got ",
              t->sizes());
  check_same(*t, x, op, name);
}

inline void check_norm_stat(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0), op, ": ", name, " must have shape (", x.size(0), ",), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

inline void check_norm_eps(const char* op, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be a positive number, got ", eps);
}

inline bool check_norm_kind(const char* op, c10::string_view norm) {
  TORCH_CHECK(norm == "layer" || norm == "rms", op, ": norm must be 'layer' or 'rms', got '", norm, "'");
  return norm == "rms";
}

inline void check_norm_dropout(const char* op, double dropout_p, const std::optional<at::Tensor>& seed,
                               const at::Tensor& x) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) return;
  TORCH_CHECK(seed.has_value(), op, ": dropout_p > 0 needs a seed tensor");
  TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong, op,
              ": seed must be a 1-element int64 tensor, got ", seed->scalar_type(), " of shape ", seed->sizes());
  TORCH_CHECK(seed->device() == x.device(), op, ": seed is on ", seed->device(), " but x is on ", x.device());
}

inline void check_rms_norm_fwd_args(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps) {
  const char* op = "chargpt::rms_norm_fwd";
  check_norm_rows(op, x);
  check_norm_eps(op, eps);
  check_norm_param(op, weight, "weight", x);
}

inline void check_rms_norm_bwd_args(const at::Tensor& grad_out, const at::Tensor& x,
                                    const std::optional<at::Tensor>& weight, const at::Tensor& rstd) {
  const char* op = "chargpt::rms_norm_bwd";
  check_norm_rows(op, x);
  check_norm_like(op, grad_out, "grad_out", x);
  check_norm_param(op, weight, "weight", x);
  check_norm_stat(op, rstd, "rstd", x);
}

inline bool check_add_norm_fwd_args(const at::Tensor& x, const at::Tensor& residual,
                                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                    double eps, c10::string_view norm, double dropout_p,
                                    const std::optional<at::Tensor>& seed) {
  const char* op = "chargpt::add_norm_fwd";
  check_norm_rows(op, x);
  check_norm_like(op, residual, "residual", x);
  check_norm_eps(op, eps);
  const bool rms = check_norm_kind(op, norm);
  TORCH_CHECK(!(rms && bias.has_value()), op, ": norm 'rms' takes no bias");
  check_norm_param(op, weight, "weight", x);
  check_norm_param(op, bias, "bias", x);
  check_norm_dropout(op, dropout_p, seed, x);
  return rms;
}

inline bool check_add_norm_bwd_args(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_h,
                                    const at::Tensor& h, const std::optional<at::Tensor>& weight,
                                    const at::Tensor& mean, const at::Tensor& rstd, c10::string_view norm,
                                    double dropout_p, const std::optional<at::Tensor>& seed) {
  const char* op = "chargpt::add_norm_bwd";
  check_norm_rows(op, h, "h");
  check_norm_like(op, grad_y, "grad_y", h);
  if (grad_h.has_value()) check_norm_like(op, *grad_h, "grad_h", h);
  check_norm_param(op, weight, "weight", h);
  check_norm_stat(op, mean, "mean", h);
  check_norm_stat(op, rstd, "rstd", h);
  check_norm_dropout(op, dropout_p, seed, h);
  return check_norm_kind(op, norm);
}

constexpr int64_t kMaxHeadDim = 256;

inline void check_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 double dropout_p, double scale, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D (B, H, T, D), got ",
              q.dim(), "-D, ", k.dim(), "-D, ", v.dim(), "-D");
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), op, ": q ", q.sizes(), " and k ", k.sizes(),
              " must agree in B and D");
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op, ": q's head count must be a multiple of k's (GQA), "
              "got q ", q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(q.size(2) >= 1 && k.size(2) >= 1, op, ": sequence lengths must be >= 1, got Tq=", q.size(2),
              ", Tk=", k.size(2));
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, op, ": head dim D must be in [1, ", kMaxHeadDim,
              "], got ", q.size(3));
  check_same(k, q, op, "k");
  check_same(v, q, op, "v");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value(), op, ": dropout_p > 0 needs a seed tensor");
    TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong, op,
                ": seed must be a 1-element int64 tensor, got ", seed->scalar_type(), " of shape ", seed->sizes());
    TORCH_CHECK(seed->device() == q.device(), op, ": seed is on ", seed->device(), " but q is on ", q.device());
  }
}

// attn_mask: None, or a (B, Hq, Tq, Tk) view (broadcast dims may have stride 0), bool (true = take part) or additive
// of q's dtype, on q's device.
inline void check_attention_mask(const char* op, const at::Tensor& q, const at::Tensor& k,
                                 const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return;
  TORCH_CHECK(mask->dim() == 4 && mask->size(0) == q.size(0) && mask->size(1) == q.size(1) &&
                  mask->size(2) == q.size(2) && mask->size(3) == k.size(2),
              op, ": attn_mask must be a (B, Hq, Tq, Tk) = (", q.size(0), ", ", q.size(1), ", ", q.size(2), ", ",
              k.size(2), ") view, got ", mask->sizes());
  TORCH_CHECK(mask->scalar_type() == at::kBool || mask->scalar_type() == q.scalar_type(), op,
              ": attn_mask must be bool or q's dtype ", q.scalar_type(), ", got ", mask->scalar_type());
  TORCH_CHECK(mask->device() == q.device(), op, ": attn_mask is on ", mask->device(), " but q is on ", q.device());
}

inline void check_attention_bwd_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                                     const at::Tensor& lse) {
  const char* op = "chargpt::attention_bwd";
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op, ": grad_out ", grad_out.sizes(),
              " and out ", out.sizes(), " must have q's shape ", q.sizes());
  check_same(grad_out, q, op, "grad_out");
  check_same(out, q, op, "out");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              op, ": lse must have shape (B, H, Tq) = ", q.sizes().slice(0, 3), ", got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.device() == q.device(), op,
              ": lse must be float32 on q's device, got ", lse.scalar_type(), " on ", lse.device());
}

// linear: x (M, K) and weight (N, K), bias (N,) or None, all of one dtype and device.
inline void check_linear_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "chargpt::linear_fwd";
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, op, ": x (M, K) and weight (N, K) must be 2-D, got x ", x.sizes(),
              " and weight ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), op, ": x has ", x.size(1), " columns but weight ", weight.size(1),
              " (weight is (out_features, in_features))");
  check_same(weight, x, op, "weight");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape (",
                weight.size(0), ",), got ", bias->sizes());
    check_same(*bias, x, op, "bias");
  }
}

}  // namespace chargpt
