// cuda_fp16.h for the CUDA emulator: __half is torch's Half (same bits).
#pragma once
#include <cuda_emulation.h>
using __half = c10::Half;
