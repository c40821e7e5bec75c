// c10/cuda/CUDAGuard.h for the CUDA emulator: there is one device, the CPU.
#pragma once
#include <c10/core/Device.h>
#include <cuda_emulation.h>
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
