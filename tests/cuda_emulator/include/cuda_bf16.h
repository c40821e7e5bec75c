// cuda_bf16.h for the CUDA emulator: __nv_bfloat16 is torch's BFloat16 (same bits).
#pragma once
#include <cuda_emulation.h>
using __nv_bfloat16 = c10::BFloat16;
