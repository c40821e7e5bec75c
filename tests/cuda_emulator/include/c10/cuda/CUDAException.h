// c10/cuda/CUDAException.h for the CUDA emulator.
#pragma once
#include <cuda_emulation.h>
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == 0, "cuda emulator: ", #expr, " failed")
#define C10_CUDA_KERNEL_LAUNCH_CHECK()
