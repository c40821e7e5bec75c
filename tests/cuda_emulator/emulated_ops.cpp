// The CUDA ops of csrc/cuda, compiled for the CPU against the emulator in include/ (see cuda_emulation.h), and
// registered as torch.ops.chargpt_emulated.* for tests/test_cuda_emulated.py: the same host code and kernels,
// given CPU tensors.
#include <cuda_emulation.h>
#include <torch/library.h>

// The .cu files register themselves for the CUDA dispatch key; here those blocks become unused functions.
#undef TORCH_LIBRARY_IMPL
#define CHARGPT_EMULATOR_CAT2(a, b) a##b
#define CHARGPT_EMULATOR_CAT(a, b) CHARGPT_EMULATOR_CAT2(a, b)
#define TORCH_LIBRARY_IMPL(ns, key, m) \
  [[maybe_unused]] static void CHARGPT_EMULATOR_CAT(unregistered_, __COUNTER__)(torch::Library & m)

// Every .cu file of csrc/cuda (tests/test_cuda_emulated.py checks that none is missing).
#include "../../csrc/cuda/attention_cuda.cu"
#include "../../csrc/cuda/attention_simt_cuda.cu"
#include "../../csrc/cuda/attention_tc_cuda.cu"
#include "../../csrc/cuda/layer_norm_cuda.cu"

TORCH_LIBRARY(chargpt_emulated, m) {
  m.def("layer_norm_fwd", &chargpt::layer_norm_fwd_cuda);
  m.def("layer_norm_bwd", &chargpt::layer_norm_bwd_cuda);
  m.def("rms_norm_fwd", &chargpt::rms_norm_fwd_cuda);
  m.def("rms_norm_bwd", &chargpt::rms_norm_bwd_cuda);
  m.def("add_norm_fwd", &chargpt::add_norm_fwd_cuda);
  m.def("add_norm_bwd", &chargpt::add_norm_bwd_cuda);
  m.def("attention_fwd", &chargpt::attention_fwd_cuda);
  m.def("attention_bwd", &chargpt::attention_bwd_cuda);
  // The GPU the host code sees (8 or more: tensor-core attention for fp16/bf16), and the thread order of the first
  // block of every grid (later blocks alternate).
  m.def("configure", [](int64_t compute_capability_major, bool reverse_first_block) {
    cuda_emu::compute_capability_major = static_cast<int>(compute_capability_major);
    cuda_emu::reverse_first_block = reverse_first_block;
  });
}
