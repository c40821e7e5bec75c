// Float vectors of the machine's native width for the norm kernels (layer_norm.cpp): 16 lanes with AVX-512, 8 with
// AVX/AVX2, 4 otherwise, through GCC/Clang vector extensions like simd.h.
//
// Why not simd.h's 16-lane vfloat everywhere: on a machine without AVX-512, GCC treats a 64-byte vector as a block
// of memory whenever it is carried around a loop (an accumulator) or stored, and spills it to the stack on every
// iteration; a native-width vector stays in registers. Measured on the 2-core AMD EPYC (Zen 1, AVX2): the add_norm
// backward at 16384x384 ran at half the machine's copy rate with 16 lanes. Reductions sum lanes in a fixed tree
// order, so results never depend on the thread count.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

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

// --- 16-bit floats -------------------------------------------------------------------------------------------------
// bfloat16 and float16 rows are widened to float32 scratch, computed by the float32 routines and narrowed back
// (layer_norm.cpp). Widening is exact. Narrowing rounds to nearest even, overflows to inf, keeps subnormals, and
// keeps NaN a NaN (quietened, sign kept): the values torch's .to() gives, with the same bits on every build
// (AVX512-BF16, AVX-512, AVX2/F16C or plain C++) except a NaN's payload.
//
// AVX512-BF16's vcvtneps2bf16 is that rounding except that it flushes subnormal inputs and outputs to zero (checked on
// the Xeon here: 1e-39f gave +0, torch keeps 0x000b); a vector holding a subnormal float therefore takes the integer
// path, which no realistic activation or gradient does.

static_assert(sizeof(c10::BFloat16) == 2 && sizeof(c10::Half) == 2, "16-bit float types are 2 bytes");

// One value, bit by bit (the reference the vector paths match; also the fallback and the tail of every row).
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN: quiet, sign kept
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // nearest even; carries into inf
}
inline float bf16_value(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if defined(__AVX512F__)
constexpr int kConvertWidth = 16;  // values per conversion step
// The integer rounding of bf16_bits, 16 lanes (AVX512F only: also for AVX-512 machines without BF16).
inline __m256i bf16_round_integer(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __m512i nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, nan));
}
inline void bf16_narrow_step(const float* src, uint16_t* dst) {
  const __m512 v = _mm512_loadu_ps(src);
#if defined(__AVX512BF16__)
  const __m512i u = _mm512_castps_si512(v);  // subnormal: exponent bits 0, mantissa bits not
  const __mmask16 subnormal = _mm512_mask_test_epi32_mask(
      _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7f800000)), u, _mm512_set1_epi32(0x007fffff));
  if (subnormal == 0) {
    const __m256bh r = _mm512_cvtneps_pbh(v);
    std::memcpy(dst, &r, 32);
    return;
  }
#endif
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), bf16_round_integer(v));
}
inline void bf16_widen_step(const uint16_t* src, float* dst) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  _mm512_storeu_ps(dst, _mm512_castsi512_ps(_mm512_slli_epi32(u, 16)));
}
inline void f16_narrow_step(const float* src, uint16_t* dst) {
  const __m256i r = _mm512_cvtps_ph(_mm512_loadu_ps(src), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), r);
}
inline void f16_widen_step(const uint16_t* src, float* dst) {
  _mm512_storeu_ps(dst, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))));
}
#elif defined(__AVX2__)
constexpr int kConvertWidth = 8;
inline void bf16_narrow_step(const float* src, uint16_t* dst) {
  const __m256 v = _mm256_loadu_ps(src);
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i r = _mm256_blendv_epi8(rounded, nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  // Every lane is below 2^16, so unsigned saturation packs exactly (packus works within 128-bit halves).
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), packed);
}
inline void bf16_widen_step(const uint16_t* src, float* dst) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  _mm256_storeu_ps(dst, _mm256_castsi256_ps(_mm256_slli_epi32(u, 16)));
}
#if defined(__F16C__)
inline void f16_narrow_step(const float* src, uint16_t* dst) {
  const __m128i r = _mm256_cvtps_ph(_mm256_loadu_ps(src), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), r);
}
inline void f16_widen_step(const uint16_t* src, float* dst) {
  _mm256_storeu_ps(dst, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
}
#endif
#else
constexpr int kConvertWidth = 8;  // plain C++ loops (the compiler vectorises the bfloat16 ones)
inline void bf16_narrow_step(const float* src, uint16_t* dst) {
  for (int i = 0; i < kConvertWidth; ++i) dst[i] = bf16_bits(src[i]);
}
inline void bf16_widen_step(const uint16_t* src, float* dst) {
  for (int i = 0; i < kConvertWidth; ++i) dst[i] = bf16_value(src[i]);
}
#endif

#if !defined(__AVX512F__) && !(defined(__AVX2__) && defined(__F16C__))
// No F16C: c10's bit-exact software conversions (round to nearest even, subnormals kept).
inline void f16_narrow_step(const float* src, uint16_t* dst) {
  for (int i = 0; i < kConvertWidth; ++i) dst[i] = c10::detail::fp16_ieee_from_fp32_value(src[i]);
}
inline void f16_widen_step(const uint16_t* src, float* dst) {
  for (int i = 0; i < kConvertWidth; ++i) dst[i] = c10::detail::fp16_ieee_to_fp32_value(src[i]);
}
#endif

// n values through Step (one kConvertWidth-wide step); the tail goes through the same step via a small buffer, so
// every element of a row is converted the same way.
template <typename Src, typename Dst, void (*Step)(const Src*, Dst*)>
inline void convert_row(const Src* src, Dst* dst, int64_t n) {
  int64_t j = 0;
  for (; j + kConvertWidth <= n; j += kConvertWidth) Step(src + j, dst + j);
  if (j < n) {
    Src in[kConvertWidth] = {};
    Dst out[kConvertWidth];
    std::memcpy(in, src + j, (n - j) * sizeof(Src));
    Step(in, out);
    std::memcpy(dst + j, out, (n - j) * sizeof(Dst));
  }
}

inline const uint16_t* bits(const c10::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); }
inline const uint16_t* bits(const c10::Half* p) { return reinterpret_cast<const uint16_t*>(p); }
inline uint16_t* bits(c10::BFloat16* p) { return reinterpret_cast<uint16_t*>(p); }
inline uint16_t* bits(c10::Half* p) { return reinterpret_cast<uint16_t*>(p); }

// n 16-bit values widened to float32, and n float32 values narrowed (rounded) to 16 bits.
inline void widen(const c10::BFloat16* src, float* dst, int64_t n) {
  convert_row<uint16_t, float, bf16_widen_step>(bits(src), dst, n);
}
inline void widen(const c10::Half* src, float* dst, int64_t n) {
  convert_row<uint16_t, float, f16_widen_step>(bits(src), dst, n);
}
inline void narrow(const float* src, c10::BFloat16* dst, int64_t n) {
  convert_row<float, uint16_t, bf16_narrow_step>(src, bits(dst), n);
}
inline void narrow(const float* src, c10::Half* dst, int64_t n) {
  convert_row<float, uint16_t, f16_narrow_step>(src, bits(dst), n);
}

}  // namespace chargpt::vec
