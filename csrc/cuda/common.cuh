// Helpers shared by the CUDA kernels: dtype dispatch (fp32/fp16/bf16 only), fp32 conversions, warp reductions.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <utility>

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

// Kernel launches and dynamic shared memory go through these two, so that the CPU emulator of the test suite
// (tests/cuda_emulator) can run the kernels of this directory unchanged on a machine without a GPU.
#ifndef CHARGPT_CUDA_EMULATION
// kernel<<<grid, block, smem, stream>>>(args...), checked. Above the 48 KB of dynamic shared memory a kernel gets
// without asking, its limit is raised first (the attribute is per kernel and device; setting it again is cheap).
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The block's dynamic shared memory, viewed as one S (a struct of the kernel's tiles).
template <typename S>
__device__ __forceinline__ S& dynamic_shared() {
  extern __shared__ __align__(128) unsigned char dynamic_smem[];
  return *reinterpret_cast<S*>(dynamic_smem);
}
#endif

// kVec elements moved as one aligned load or store (16 bytes: 4 floats or 8 halves).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;  // every lane holds the same total (butterfly), so the result is warp-uniform
}

// max(a, b) that keeps a NaN of either side (fmaxf returns the other one), so one NaN score makes its softmax row
// NaN, as in torch.
__device__ __forceinline__ float max_keep_nan(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float warp_max(float x) {  // NaN if any lane holds NaN
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = max_keep_nan(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

}  // namespace chargpt
