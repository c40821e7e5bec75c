// Host-side helpers that the CPU (cpu/*.cpp) and CUDA (cuda/*.cu) kernels share: the input views they accept and
// the dropout arguments they pass down. Plain C++: the .cu files include it too (the struct travels to kernels).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace chargpt {

// t itself when its last dim has unit stride (rows may be strided), else one contiguous copy: every kernel reads
// rows with unit-stride (vector) loads.
inline at::Tensor unit_last_dim(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

// Attention dropout: keep iff philox_uniform(*seed, offset) >= p (philox.h), kept weights scaled by keep_scale.
// seed points into the op's 1-element int64 seed tensor (device memory on CUDA, read inside the kernels without a
// host sync); it is null and p is 0 when dropout is off.
struct DropoutArgs {
  float p = 0.f, keep_scale = 1.f;
  const int64_t* seed = nullptr;
};

inline DropoutArgs dropout_args(double dropout_p, const std::optional<at::Tensor>& seed) {
  if (dropout_p <= 0.0) return {};
  const float p = static_cast<float>(dropout_p);
  return {p, 1.f / (1.f - p), seed->const_data_ptr<int64_t>()};
}

}  // namespace chargpt
