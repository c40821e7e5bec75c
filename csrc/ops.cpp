// Op schemas of the chargpt extension and their autograd. Kernels live in cpu/*.cpp (CPU) and cuda/*.cu (CUDA);
// the Python side (kernels/chargpt_kernels/ext_*.py) adds the fake (meta) implementations torch.compile traces with.
//
// Autograd is registered here, in C++ (TORCH_LIBRARY_IMPL(chargpt, Autograd)), rather than with Python's
// torch.library.register_autograd: the Python path costs ~20 us per forward call and as much again per backward
// (measured on the 2-core CPU machine at a (8, 16) LayerNorm), which dominated small shapes. The C++ Function
// calls the separate forward and backward ops through the dispatcher, so every device's kernels and the Python
// fakes are used unchanged, and torch.compile / opcheck trace it like any other autograd kernel.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#ifdef CHARGPT_BUILD_STAMP
// setup.py builds: kernels/chargpt_kernels/ext_build.py reads this string from the file (before loading it) to check
// that the library was built for the running torch, and whether it holds the CUDA kernels.
extern "C" __attribute__((used, visibility("default"))) const char chargpt_build_stamp[] = CHARGPT_BUILD_STAMP;
#endif

TORCH_LIBRARY(chargpt, m) {
  // y, mean, rstd over the last dim of a 2-D x (M, N); weight and bias are (N,) or None.
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // dx, dweight, dbias (dweight/dbias are always returned; the caller drops what it does not need).
  m.def("layer_norm_bwd(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor rstd)"
        " -> (Tensor, Tensor, Tensor)");
  // RMSNorm: y and rstd over the last dim of a 2-D x (M, N); weight is (N,) or None.
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  // dx, dweight (always returned).
  m.def("rms_norm_bwd(Tensor grad_out, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor, Tensor)");
  // add_norm: h = residual + dropout(x), y = norm(h) for norm "layer" or "rms"; returns y, h, mean (zeros for rms),
  // rstd. seed is a 1-element int64 tensor when dropout_p > 0 (mask spec in kernels/chargpt_kernels/reference.py).
  m.def("add_norm_fwd(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps, str norm, float dropout_p,"
        " Tensor? seed) -> (Tensor, Tensor, Tensor, Tensor)");
  // dh (h's total gradient, which is residual's), dx (dh through the regenerated dropout mask; a 0-element
  // placeholder when dropout_p == 0, where x's gradient is dh itself), dweight, dbias (always returned).
  m.def("add_norm_bwd(Tensor grad_y, Tensor? grad_h, Tensor h, Tensor? weight, Tensor mean, Tensor rstd, str norm,"
        " float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor, Tensor)");
  // out (B, Hq, Tq, D) and log-sum-exp (B, Hq, Tq) in fp32 (+inf for a row whose scores are all -inf: its out is 0)
  // for q (B, Hq, Tq, D) and k, v (B, Hk, Tk, D), Hq a multiple of Hk (GQA: query head h reads kv head
  // h / (Hq / Hk)). seed is a 1-element int64 tensor when dropout_p > 0. attn_mask is None or a (B, Hq, Tq, Tk)
  // view, bool (true = take part) or additive of q's dtype, read through its strides (stride 0 where broadcast).
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool is_causal, float dropout_p, float scale, Tensor? seed,"
        " Tensor? attn_mask=None) -> (Tensor, Tensor)");
  // dq (B, Hq, Tq, D), dk and dv (B, Hk, Tk, D): a kv head's gradient is summed over its query group in the kernel.
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool is_causal,"
        " float dropout_p, float scale, Tensor? seed, Tensor? attn_mask=None) -> (Tensor, Tensor, Tensor)");
  // y (M, N) = x (M, K) weight^T + bias for weight (N, K) and bias (N,) or None: the GEMV of decoding (few rows).
  // Its backward is two GEMMs and a sum (torch's own ops), so it needs no op of its own.
  m.def("linear_fwd(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

namespace chargpt {
namespace {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;
using Tensors2 = std::tuple<Tensor, Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

Tensors3 call_layer_norm_fwd(const Tensor& x, const optional<Tensor>& w, const optional<Tensor>& b, double eps) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("chargpt::layer_norm_fwd", "")
          .typed<Tensors3(const Tensor&, const optional<Tensor>&, const optional<Tensor>&, double)>();
  return op.call(x, w, b, eps);
}

Tensors3 call_layer_norm_bwd(const Tensor& g, const Tensor& x, const optional<Tensor>& w, const Tensor& mean,
                             const Tensor& rstd) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("chargpt::layer_norm_bwd", "")
          .typed<Tensors3(const Tensor&, const Tensor&, const optional<Tensor>&, const Tensor&, const Tensor&)>();
  return op.call(g, x, w, mean, rstd);
}

Tensors2 call_rms_norm_fwd(const Tensor& x, const optional<Tensor>& w, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("chargpt::rms_norm_fwd", "")
                             .typed<Tensors2(const Tensor&, const optional<Tensor>&, double)>();
  return op.call(x, w, eps);
}

Tensors2 call_rms_norm_bwd(const Tensor& g, const Tensor& x, const optional<Tensor>& w, const Tensor& rstd) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("chargpt::rms_norm_bwd", "")
          .typed<Tensors2(const Tensor&, const Tensor&, const optional<Tensor>&, const Tensor&)>();
  return op.call(g, x, w, rstd);
}

Tensors4 call_add_norm_fwd(const Tensor& x, const Tensor& residual, const optional<Tensor>& w,
                           const optional<Tensor>& b, double eps, c10::string_view norm, double p,
                           const optional<Tensor>& seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("chargpt::add_norm_fwd", "")
                             .typed<Tensors4(const Tensor&, const Tensor&, const optional<Tensor>&,
                                             const optional<Tensor>&, double, c10::string_view, double,
                                             const optional<Tensor>&)>();
  return op.call(x, residual, w, b, eps, norm, p, seed);
}

Tensors4 call_add_norm_bwd(const Tensor& gy, const optional<Tensor>& gh, const Tensor& h, const optional<Tensor>& w,
                           const Tensor& mean, const Tensor& rstd, c10::string_view norm, double p,
                           const optional<Tensor>& seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("chargpt::add_norm_bwd", "")
                             .typed<Tensors4(const Tensor&, const optional<Tensor>&, const Tensor&,
                                             const optional<Tensor>&, const Tensor&, const Tensor&,
                                             c10::string_view, double, const optional<Tensor>&)>();
  return op.call(gy, gh, h, w, mean, rstd, norm, p, seed);
}

std::tuple<Tensor, Tensor> call_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                              double p, double scale, const optional<Tensor>& seed,
                                              const optional<Tensor>& mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("chargpt::attention_fwd", "")
          .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, bool, double, double,
                                            const optional<Tensor>&, const optional<Tensor>&)>();
  return op.call(q, k, v, causal, p, scale, seed, mask);
}

Tensors3 call_attention_bwd(const Tensor& g, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                            const Tensor& lse, bool causal, double p, double scale, const optional<Tensor>& seed,
                            const optional<Tensor>& mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("chargpt::attention_bwd", "")
          .typed<Tensors3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          bool, double, double, const optional<Tensor>&, const optional<Tensor>&)>();
  return op.call(g, q, k, v, out, lse, causal, p, scale, seed, mask);
}

Tensor call_linear_fwd(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("chargpt::linear_fwd", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const optional<Tensor>&)>();
  return op.call(x, weight, bias);
}

// Saved optionals go through save_for_backward as undefined tensors.
Tensor or_undefined(const optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }
optional<Tensor> as_optional(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; }

// First derivatives taken with create_graph=True run the same backward kernels inside a node whose own backward
// raises, so a second derivative through a chargpt op fails loudly instead of coming out as None or zeros (the
// backward ops have no derivative). A plain backward (grad mode off) never builds these nodes: no cost there.
tensor_list no_double_backward(const char* op) {
  TORCH_CHECK(false, op, ": double backward is not supported (the chargpt ops have first derivatives only; "
              "use backend='eager' for higher-order gradients)");
  return {};
}

struct LayerNormBackwardFunction : torch::autograd::Function<LayerNormBackwardFunction> {
  static tensor_list forward(AutogradContext*, const Tensor& g, const Tensor& x, const optional<Tensor>& weight,
                             const Tensor& mean, const Tensor& rstd) {  // optionals: apply takes no undefined tensor
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dx, dweight, dbias] = call_layer_norm_bwd(g, x, weight, mean, rstd);
    return {dx, dweight, dbias};
  }
  static tensor_list backward(AutogradContext*, tensor_list) { return no_double_backward("chargpt::layer_norm"); }
};

struct RmsNormBackwardFunction : torch::autograd::Function<RmsNormBackwardFunction> {
  static tensor_list forward(AutogradContext*, const Tensor& g, const Tensor& x, const optional<Tensor>& weight,
                             const Tensor& rstd) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dx, dweight] = call_rms_norm_bwd(g, x, weight, rstd);
    return {dx, dweight};
  }
  static tensor_list backward(AutogradContext*, tensor_list) { return no_double_backward("chargpt::rms_norm"); }
};

struct AddNormBackwardFunction : torch::autograd::Function<AddNormBackwardFunction> {
  static tensor_list forward(AutogradContext*, const Tensor& gy, const optional<Tensor>& gh, const Tensor& h,
                             const optional<Tensor>& weight, const Tensor& mean, const Tensor& rstd,
                             c10::string_view norm, double p, const optional<Tensor>& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dh, dx, dweight, dbias] = call_add_norm_bwd(gy, gh, h, weight, mean, rstd, norm, p, seed);
    return {dh, dx, dweight, dbias};
  }
  static tensor_list backward(AutogradContext*, tensor_list) { return no_double_backward("chargpt::add_norm"); }
};

struct AttentionBackwardFunction : torch::autograd::Function<AttentionBackwardFunction> {
  static tensor_list forward(AutogradContext*, const Tensor& g, const Tensor& q, const Tensor& k, const Tensor& v,
                             const Tensor& out, const Tensor& lse, bool causal, double p, double scale,
                             const optional<Tensor>& seed, const optional<Tensor>& mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dq, dk, dv] = call_attention_bwd(g, q, k, v, out, lse, causal, p, scale, seed, mask);
    return {dq, dk, dv};
  }
  static tensor_list backward(AutogradContext*, tensor_list) { return no_double_backward("chargpt::attention"); }
};

struct LayerNormFunction : torch::autograd::Function<LayerNormFunction> {
  static tensor_list forward(AutogradContext* ctx, const Tensor& x, const optional<Tensor>& weight,
                             const optional<Tensor>& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = call_layer_norm_fwd(x, weight, bias, eps);
    ctx->save_for_backward({x, or_undefined(weight), mean, rstd});
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);  // no zero gradients built for mean and rstd
    return {y, mean, rstd};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1];
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
    Tensor dx, dweight, dbias;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      const auto d = LayerNormBackwardFunction::apply(grads[0], x, as_optional(weight), saved[2], saved[3]);
      dx = d[0], dweight = d[1], dbias = d[2];
    } else {
      std::tie(dx, dweight, dbias) = call_layer_norm_bwd(grads[0], x, as_optional(weight), saved[2], saved[3]);
    }
    return {dx, weight.defined() ? dweight : Tensor(), ctx->saved_data["has_bias"].toBool() ? dbias : Tensor(),
            Tensor()};
  }
};

struct RmsNormFunction : torch::autograd::Function<RmsNormFunction> {
  static tensor_list forward(AutogradContext* ctx, const Tensor& x, const optional<Tensor>& weight, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, rstd] = call_rms_norm_fwd(x, weight, eps);
    ctx->save_for_backward({x, or_undefined(weight), rstd});
    ctx->mark_non_differentiable({rstd});
    ctx->set_materialize_grads(false);
    return {y, rstd};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1];
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor()};
    Tensor dx, dweight;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      const auto d = RmsNormBackwardFunction::apply(grads[0], x, as_optional(weight), saved[2]);
      dx = d[0], dweight = d[1];
    } else {
      std::tie(dx, dweight) = call_rms_norm_bwd(grads[0], x, as_optional(weight), saved[2]);
    }
    return {dx, weight.defined() ? dweight : Tensor(), Tensor()};
  }
};

// Saves h (not x and residual): the backward needs only h, and regenerates the dropout mask from the seed.
struct AddNormFunction : torch::autograd::Function<AddNormFunction> {
  static tensor_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& residual,
                             const optional<Tensor>& weight, const optional<Tensor>& bias, double eps,
                             c10::string_view norm, double dropout_p, const optional<Tensor>& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, h, mean, rstd] = call_add_norm_fwd(x, residual, weight, bias, eps, norm, dropout_p, seed);
    ctx->save_for_backward({h, or_undefined(weight), mean, rstd, or_undefined(seed)});
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["norm"] = std::string(norm);
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);
    return {y, h, mean, rstd};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto s = ctx->get_saved_variables();
    const Tensor &h = s[0], &weight = s[1];
    if (!grads[0].defined() && !grads[1].defined()) return tensor_list(8);
    const bool y_used = grads[0].defined();  // else weight and bias took no part: no gradient, as in torch
    const Tensor gy = y_used ? grads[0] : at::zeros_like(h);  // only h was used: rare
    const std::string& norm = ctx->saved_data["norm"].toStringRef();
    const double p = ctx->saved_data["dropout_p"].toDouble();
    Tensor dh, dx, dweight, dbias;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      const auto d = AddNormBackwardFunction::apply(gy, as_optional(grads[1]), h, as_optional(weight), s[2], s[3],
                                                    norm, p, as_optional(s[4]));
      dh = d[0], dx = d[1], dweight = d[2], dbias = d[3];
    } else {
      std::tie(dh, dx, dweight, dbias) =
          call_add_norm_bwd(gy, as_optional(grads[1]), h, as_optional(weight), s[2], s[3], norm, p, as_optional(s[4]));
    }
    // Without dropout x's gradient is residual's (as for torch's a + b: one tensor for both).
    return {p > 0.0 ? dx : dh, dh, y_used && weight.defined() ? dweight : Tensor(),
            y_used && ctx->saved_data["has_bias"].toBool() ? dbias : Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct AttentionFunction : torch::autograd::Function<AttentionFunction> {
  static tensor_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                             double dropout_p, double scale, const optional<Tensor>& seed,
                             const optional<Tensor>& mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = call_attention_fwd(q, k, v, causal, dropout_p, scale, seed, mask);
    ctx->save_for_backward({q, k, v, out, lse, or_undefined(seed), or_undefined(mask)});
    ctx->saved_data["is_causal"] = causal;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto s = ctx->get_saved_variables();
    const tensor_list no_grads(8);  // q, k, v, then none for causal, dropout_p, scale, seed and the mask
    if (!grads[0].defined()) return no_grads;
    const bool causal = ctx->saved_data["is_causal"].toBool();
    const double p = ctx->saved_data["dropout_p"].toDouble(), scale = ctx->saved_data["scale"].toDouble();
    if (at::GradMode::is_enabled()) {  // create_graph=True
      const auto d = AttentionBackwardFunction::apply(grads[0], s[0], s[1], s[2], s[3], s[4], causal, p, scale,
                                                      as_optional(s[5]), as_optional(s[6]));
      return {d[0], d[1], d[2], Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    auto [dq, dk, dv] = call_attention_bwd(grads[0], s[0], s[1], s[2], s[3], s[4], causal, p, scale,
                                           as_optional(s[5]), as_optional(s[6]));
    return {dq, dk, dv, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// The backward is made of differentiable torch ops, so higher derivatives work as for torch's linear.
struct LinearFunction : torch::autograd::Function<LinearFunction> {
  static tensor_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                             const optional<Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor y = call_linear_fwd(x, weight, bias);
    ctx->save_for_backward({x, weight});
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->set_materialize_grads(false);
    return {y};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto s = ctx->get_saved_variables();
    const Tensor& g = grads[0];
    if (!g.defined()) return {Tensor(), Tensor(), Tensor()};
    return {ctx->needs_input_grad(0) ? g.mm(s[1]) : Tensor(), ctx->needs_input_grad(1) ? g.t().mm(s[0]) : Tensor(),
            ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2) ? g.sum(0) : Tensor()};
  }
};

Tensors3 layer_norm_fwd_autograd(const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
                                 double eps) {
  auto out = LayerNormFunction::apply(x, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

Tensors2 rms_norm_fwd_autograd(const Tensor& x, const optional<Tensor>& weight, double eps) {
  auto out = RmsNormFunction::apply(x, weight, eps);
  return {out[0], out[1]};
}

Tensors4 add_norm_fwd_autograd(const Tensor& x, const Tensor& residual, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, double eps, c10::string_view norm, double dropout_p,
                               const optional<Tensor>& seed) {
  auto out = AddNormFunction::apply(x, residual, weight, bias, eps, norm, dropout_p, seed);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<Tensor, Tensor> attention_fwd_autograd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                  double dropout_p, double scale, const optional<Tensor>& seed,
                                                  const optional<Tensor>& mask) {
  auto out = AttentionFunction::apply(q, k, v, causal, dropout_p, scale, seed, mask);
  return {out[0], out[1]};
}

Tensor linear_fwd_autograd(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias) {
  return LinearFunction::apply(x, weight, bias)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(chargpt, Autograd, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_autograd);
  m.impl("rms_norm_fwd", &rms_norm_fwd_autograd);
  m.impl("add_norm_fwd", &add_norm_fwd_autograd);
  m.impl("attention_fwd", &attention_fwd_autograd);
  m.impl("linear_fwd", &linear_fwd_autograd);
}

}  // namespace chargpt
