// Dropout RNG shared by the CPU and CUDA kernels: Triton's tl.rand(seed, offset) with an int64 offset,
// bit for bit (kernels/chargpt_kernels/reference.py holds the spec and a torch-ops transcription the tests
// compare against).
//   Philox4x32-10, key (seed_lo, seed_hi), counter (offset_lo, offset_hi, 0, 0); the first output word,
//   read as int32 and folded to non-negative with ~x, times float32(4.6566127342e-10) -> [0, 1).
// Dropout keeps an attention weight iff philox_uniform(seed, ((b*H + h)*Tq + i)*Tk + j) >= p.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define CHARGPT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CHARGPT_HOST_DEVICE inline
#endif

namespace chargpt {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr float kPhiloxUniformScale = 4.6566127342e-10f;  // (2^31 - 1) * scale < 1 in float32

CHARGPT_HOST_DEVICE uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The first 32-bit output word of Philox4x32-10 for counter (offset, 0) under key seed.
CHARGPT_HOST_DEVICE uint32_t philox_word(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = philox_mulhi(kPhiloxRoundB, c2), lo_b = kPhiloxRoundB * c2;
    const uint32_t hi_a = philox_mulhi(kPhiloxRoundA, c0), lo_a = kPhiloxRoundA * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

CHARGPT_HOST_DEVICE float philox_uniform(uint64_t seed, uint64_t offset) {
  int32_t x = static_cast<int32_t>(philox_word(seed, offset));
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * kPhiloxUniformScale;
}

}  // namespace chargpt
