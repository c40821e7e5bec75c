// c10/cuda/CUDAStream.h for the CUDA emulator: one stream, which is no stream.
#pragma once
#include <cuda_emulation.h>
namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace c10::cuda
