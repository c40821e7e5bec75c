// Float vectors of the machine's native width for the norm kernels (layer_norm.cpp): 16 lanes with AVX-512, 8 with
// AVX/AVX2, 4 otherwise, through GCC/Clang vector extensions like simd.h.
//
// Why not simd.h's 16-lane vfloat everywhere: on a machine without AVX-512, GCC treats a 64-byte vector as a block
// of memory whenever it is carried around a loop (an accumulator) or stored, and spills it to the stack on every
// iteration; a native-width vector stays in registers. Measured on the 2-core AMD EPYC (Zen 1, AVX2): the add_norm
// backward at 16384x384 ran at half the machine's copy rate with 16 lanes. Reductions sum lanes in a fixed tree
// order, so results never depend on the thread count.
#pragma once

#include <cmath>
#include <cstdint>

#include "../philox.h"
#include "simd.h"

namespace chargpt::vec {

#if defined(__AVX512F__)
constexpr int kWidth = 16;
#elif defined(__AVX__)
constexpr int kWidth = 8;
#else
constexpr int kWidth = 4;
#endif
constexpr int kBytes = 4 * kWidth;

typedef float vfloat __attribute__((vector_size(kBytes)));
typedef float vfloat_unaligned __attribute__((vector_size(kBytes), aligned(4), may_alias));

inline vfloat load(const float* p) { return *reinterpret_cast<const vfloat_unaligned*>(p); }
inline void store(float* p, vfloat v) { *reinterpret_cast<vfloat_unaligned*>(p) = v; }
inline vfloat splat(float x) { return vfloat{} + x; }
// Rows a kernel streams to must start on a vector boundary (non-temporal stores need aligned addresses).
inline bool aligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) & (kBytes - 1)) == 0; }

// Non-temporal store of an aligned vector (see simd::store_stream); call simd::stream_fence() before others read it.
inline void store_stream(float* p, vfloat v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, (__m512)v);
#elif defined(__AVX__)
  _mm256_stream_ps(p, (__m256)v);
#else
  store(p, v);
#endif
}

// a * b + c rounded once where the machine has FMA (the build has -ffp-contract=off: each kernel says where).
inline vfloat fma(vfloat a, vfloat b, vfloat c) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__AVX__) && defined(__FMA__)
  return (vfloat)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;  // no FMA unit (e.g. x86-64-v2): std::fma would be a libm call per lane; two roundings instead
#endif
}

// Sum of the lanes in a fixed tree order (halves, then quarters, ...).
inline float reduce_add(vfloat v) {
  float lanes[kWidth];
  store(lanes, v);
  for (int width = kWidth / 2; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  return lanes[0];
}

// philox_uniform(seed, base + i) (philox.h) for i < 16, as 16 / kWidth vectors: 16 offsets at a time give the
// Philox rounds enough independent work (the AVX2 version runs four 4-lane chains).
constexpr int kDraws = 16;
inline void uniforms16(uint64_t seed, uint64_t base, vfloat* out) {
#if defined(__AVX512F__)
  out[0] = simd::philox_uniform16(seed, base);
#elif defined(__AVX2__)
  __m256 u[2];
  simd::philox_uniform_avx2<4>(seed, base, u);
  out[0] = (vfloat)u[0];
  out[1] = (vfloat)u[1];
#else
  for (int v = 0; v < kDraws / kWidth; ++v)
    for (int i = 0; i < kWidth; ++i) out[v][i] = philox_uniform(seed, base + static_cast<uint64_t>(v * kWidth + i));
#endif
}

}  // namespace chargpt::vec
