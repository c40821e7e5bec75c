// Helpers shared by the CUDA kernels: dtype dispatch (fp32/fp16/bf16 only), fp32 conversions, warp reductions.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

namespace chargpt {

// Calls f(T{}) for T in {float, at::Half, at::BFloat16}; anything else is a TORCH_CHECK error naming the op.
template <typename F>
void dispatch_float_types(at::ScalarType type, const char* op, F&& f) {
  switch (type) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, op, " on CUDA supports float32, float16 and bfloat16, got ", type);
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x) { return static_cast<T>(x); }

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;  // every lane holds the same total (butterfly), so the result is warp-uniform
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

}  // namespace chargpt
