// 16-lane float vectors through GCC/Clang vector extensions: with -march=native they become AVX-512 (or pairs of
// AVX2, or quads of SSE) registers without tying the code to one ISA's intrinsics; the few intrinsics below have a
// portable fallback (CHARGPT_EXT_MARCH picks the target, see kernels/chargpt_kernels/ext_build.py). Reductions run lane
// by lane in a fixed order, so results never depend on the thread count.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "../philox.h"

namespace chargpt::simd {

constexpr int kWidth = 16;
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
typedef uint32_t vuint __attribute__((vector_size(64)));
typedef uint64_t vulong __attribute__((vector_size(128)));

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);  // unaligned load
  return v;
}
inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
// p[0 .. n-1] (0 <= n <= 16) and zeros after, reading nothing past p + n (a row's last elements): masked loads where
// the ISA has them (no fault past the mask), else lane by lane.
inline vfloat load_partial(const float* p, int64_t n) {
#if defined(__AVX512F__)
  const __m512 r = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  vfloat v;
  std::memcpy(&v, &r, sizeof v);
  return v;
#elif defined(__AVX2__)
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 lo = _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane));
  const __m256 hi = _mm256_maskload_ps(p + 8, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n) - 8), lane));
  vfloat v;
  std::memcpy(&v, &lo, sizeof lo);
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof lo, &hi, sizeof hi);
  return v;
#else
  vfloat v = {};
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
#endif
}
// Non-temporal store of a 64-byte-aligned vector: the line goes to memory without being read first (no
// write-allocate) and without evicting the cache. Weakly ordered: call stream_fence() before others read it.
inline void store_stream(float* p, vfloat v) {
#if defined(__AVX512F__)
  __m512 r;
  std::memcpy(&r, &v, sizeof r);
  _mm512_stream_ps(p, r);
#elif defined(__AVX__)
  __m256 lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  _mm256_stream_ps(p, lo);
  _mm256_stream_ps(p + 8, hi);
#else
  store(p, v);
#endif
}
inline void stream_fence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}
// Ask for the cache line holding p ahead of its use (into L1): while a group of rows is computed from L1, the
// next group's lines are already on their way, so a core keeps enough misses in flight to reach its bandwidth.
inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }
inline bool aligned64(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 63) == 0; }
inline vfloat splat(float x) { return vfloat{} + x; }
// a * b + c rounded once. The build disables implicit contraction (-ffp-contract=off) so that each kernel says
// where it fuses: one instruction instead of two on the vector ports, which bound the cache-resident sweeps.
inline vfloat fma(vfloat a, vfloat b, vfloat c) {
#if defined(__AVX512F__)
  __m512 r, ma, mb, mc;
  std::memcpy(&ma, &a, sizeof ma);
  std::memcpy(&mb, &b, sizeof mb);
  std::memcpy(&mc, &c, sizeof mc);
  r = _mm512_fmadd_ps(ma, mb, mc);
  vfloat out;
  std::memcpy(&out, &r, sizeof out);
  return out;
#elif defined(__FMA__)
  vfloat out;  // becomes vfmadd on each half (AVX2 + FMA, e.g. -march=x86-64-v3)
  for (int i = 0; i < kWidth; ++i) out[i] = std::fma(a[i], b[i], c[i]);
  return out;
#else
  return a * b + c;  // no FMA unit (e.g. x86-64-v2): std::fma would be a libm call per lane; two roundings instead
#endif
}
// max(a, b) that keeps a NaN of either side (a > b ? a : b alone drops a NaN in a), so one NaN score makes its
// softmax row NaN, as in torch. For floats and vectors alike.
template <typename V>
inline V max_keep_nan(V a, V b) {
  return (a > b) | (a != a) ? a : b;
}
inline vfloat vmax(vfloat a, vfloat b) { return max_keep_nan(a, b); }

// Tree reductions (halves, then quarters, ...): a fixed order, and log2(16) dependent steps instead of 16.
typedef float vfloat8 __attribute__((vector_size(32)));
typedef float vfloat4 __attribute__((vector_size(16)));
inline vfloat4 fold_to_4(vfloat v, bool take_max) {
  // Register shuffles (vextractf): going through memory instead costs a store-forwarding stall per reduction.
  const vfloat8 lo8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const vfloat8 hi8 = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vfloat8 v8 = take_max ? max_keep_nan(lo8, hi8) : lo8 + hi8;
  const vfloat4 lo4 = __builtin_shufflevector(v8, v8, 0, 1, 2, 3);
  const vfloat4 hi4 = __builtin_shufflevector(v8, v8, 4, 5, 6, 7);
  return take_max ? max_keep_nan(lo4, hi4) : lo4 + hi4;
}
inline float reduce_add(vfloat v) {
  const vfloat4 v4 = fold_to_4(v, false);
  return (v4[0] + v4[2]) + (v4[1] + v4[3]);
}
inline float reduce_max(vfloat v) {
  const vfloat4 v4 = fold_to_4(v, true);
  return max_keep_nan(max_keep_nan(v4[0], v4[2]), max_keep_nan(v4[1], v4[3]));
}

// exp(x) to ~2 ulp (Cephes expf: x = n ln2 + r, a degree-6 polynomial in r, 2^n through the exponent bits, applied
// as 2^(n/2) 2^(n - n/2) so that n = 128 overflows to inf instead of wrapping the exponent). Exactly 0 below -87, so
// masked (-inf) scores vanish; inf above ln(FLT_MAX) ~ 88.72 and for +inf; NaN for NaN (clamping alone would turn a
// NaN score into a finite weight).
inline vfloat exp(vfloat x) {
  const vfloat lo = x > -87.f ? x : splat(-87.f);  // NaN goes to -87 here; it is put back at the end
  const vfloat xc = lo < 89.f ? lo : splat(89.f);
  const vfloat fx = xc * 1.44269504088896341f;
  const vint n = __builtin_convertvector(fx + (fx >= 0.f ? splat(0.5f) : splat(-0.5f)), vint);
  const vfloat nf = __builtin_convertvector(n, vfloat);
  vfloat r = xc - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  vfloat y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const vint n_half = n >> 1;  // both factors stay normal for n in [-126, 128]: the product is y * 2^n exactly
  const vint bits_a = (n_half + 127) << 23, bits_b = (n - n_half + 127) << 23;
  vfloat pow2_a, pow2_b;
  std::memcpy(&pow2_a, &bits_a, sizeof pow2_a);
  std::memcpy(&pow2_b, &bits_b, sizeof pow2_b);
  const vfloat e = x < -87.f ? splat(0.f) : y * pow2_a * pow2_b;
  return x != x ? x : e;
}

// philox_uniform (philox.h) for the 16 offsets base .. base + 15, all lanes at once.
#if defined(__AVX512F__)
// 32x32 -> 64-bit products with vpmuludq on the even and the odd lanes (the generic version below widens to
// 64-bit lanes, which GCC turns into slow 64x64 multiplies): bit-identical results, several times faster.
inline void mul_hi_lo(__m512i a, __m512i b, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, b);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), b);  // b is a splat: its odd lanes equal even
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

inline vfloat philox_uniform16(uint64_t seed, uint64_t base) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i base_lo = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(base)));
  __m512i c0 = _mm512_add_epi32(base_lo, lane);
  const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, base_lo);  // the low word wrapped: carry into the high one
  __m512i c1 = _mm512_mask_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(base >> 32)), carry,
                                     _mm512_set1_epi32(static_cast<int32_t>(base >> 32)), _mm512_set1_epi32(1));
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m512i round_a = _mm512_set1_epi32(static_cast<int32_t>(kPhiloxRoundA));
  const __m512i round_b = _mm512_set1_epi32(static_cast<int32_t>(kPhiloxRoundB));
  for (int round = 0; round < 10; ++round) {
    __m512i hi_b, lo_b, hi_a, lo_a;
    mul_hi_lo(c2, round_b, hi_b, lo_b);
    mul_hi_lo(c0, round_a, hi_a, lo_a);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi_b, c1), _mm512_set1_epi32(static_cast<int32_t>(k0)));
    c1 = lo_b;
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi_a, c3), _mm512_set1_epi32(static_cast<int32_t>(k1)));
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const __m512i folded = _mm512_xor_si512(c0, _mm512_srai_epi32(c0, 31));  // x < 0 ? ~x : x
  const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(folded), _mm512_set1_ps(kPhiloxUniformScale));
  vfloat out;
  std::memcpy(&out, &u, sizeof out);
  return out;
}
#elif defined(__AVX2__)
// The same with AVX2 (no AVX-512, e.g. AMD Zen 1-3): 4*Q offsets, Q registers of four 64-bit lanes, each lane's
// word in its low half (vpmuludq reads only that; the high half may hold anything). Register q holds the offsets
// base + 8*(q/2) + q%2 + {0, 2, 4, 6}, so one blend per pair puts 8 words back in order. Per round a lane costs two
// vpmuludq and two vpshufd to bring the high product word down (a shift would do, but shifts share one port on
// Zen 1, and shuffles have two): ~4x faster than the generic version below, which is what GCC makes of 64-bit lanes.
template <int Q>
inline void philox_uniform_avx2(uint64_t seed, uint64_t base, __m256* out) {
  __m256i c0[Q], c1[Q], c2[Q], c3[Q];
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i round_a = _mm256_set1_epi64x(kPhiloxRoundA), round_b = _mm256_set1_epi64x(kPhiloxRoundB);
  for (int q = 0; q < Q; ++q) {
    const __m256i offset = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(base + 8 * (q / 2) + q % 2)),
                                            _mm256_setr_epi64x(0, 2, 4, 6));
    // Round 1, where c2 = c3 = 0 make the first product 0; c1 is the offset's high word.
    const __m256i prod_a = _mm256_mul_epu32(offset, round_a);
    c0[q] = _mm256_xor_si256(_mm256_srli_epi64(offset, 32), _mm256_set1_epi32(static_cast<int32_t>(k0)));
    c1[q] = _mm256_setzero_si256();
    c2[q] = _mm256_xor_si256(_mm256_shuffle_epi32(prod_a, 0xF5), _mm256_set1_epi32(static_cast<int32_t>(k1)));
    c3[q] = prod_a;
  }
  for (int round = 1; round < 10; ++round) {
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
    const __m256i key0 = _mm256_set1_epi32(static_cast<int32_t>(k0));
    const __m256i key1 = _mm256_set1_epi32(static_cast<int32_t>(k1));
    for (int q = 0; q < Q; ++q) {
      const __m256i prod_b = _mm256_mul_epu32(c2[q], round_b), prod_a = _mm256_mul_epu32(c0[q], round_a);
      c0[q] = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(prod_b, 0xF5), c1[q]), key0);  // hi ^ c1 ^ k0
      c1[q] = prod_b;                                                                                // lo
      c2[q] = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(prod_a, 0xF5), c3[q]), key1);
      c3[q] = prod_a;
    }
  }
  for (int h = 0; h < Q / 2; ++h) {
    const __m256i word = _mm256_blend_epi32(c0[2 * h], _mm256_slli_epi64(c0[2 * h + 1], 32), 0xAA);
    const __m256i folded = _mm256_xor_si256(word, _mm256_srai_epi32(word, 31));  // x < 0 ? ~x : x
    out[h] = _mm256_mul_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(kPhiloxUniformScale));
  }
}

inline vfloat philox_uniform16(uint64_t seed, uint64_t base) {
  __m256 u[2];
  philox_uniform_avx2<4>(seed, base, u);
  vfloat out;
  std::memcpy(&out, u, sizeof out);
  return out;
}
#else
inline vfloat philox_uniform16(uint64_t seed, uint64_t base) {
  const vulong lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const vulong offset = lane + base;
  vuint c0 = __builtin_convertvector(offset & 0xFFFFFFFFull, vuint);
  vuint c1 = __builtin_convertvector(offset >> 32, vuint);
  vuint c2 = vuint{}, c3 = vuint{};
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const vulong prod_b = __builtin_convertvector(c2, vulong) * static_cast<uint64_t>(kPhiloxRoundB);
    const vulong prod_a = __builtin_convertvector(c0, vulong) * static_cast<uint64_t>(kPhiloxRoundA);
    const vuint hi_b = __builtin_convertvector(prod_b >> 32, vuint), lo_b = __builtin_convertvector(prod_b, vuint);
    const vuint hi_a = __builtin_convertvector(prod_a >> 32, vuint), lo_a = __builtin_convertvector(prod_a, vuint);
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  vint x = reinterpret_cast<vint&>(c0);
  x = x < 0 ? ~x : x;
  return __builtin_convertvector(x, vfloat) * kPhiloxUniformScale;
}
#endif

// z[j] = (philox_uniform(seed, base + j) >= p) ? keep_value : 0 for j < n; z must have room for n rounded up to 16.
inline void dropout_factors(float* z, int64_t n, uint64_t seed, uint64_t base, float p, float keep_value) {
  for (int64_t j = 0; j < n; j += kWidth) {
    const vfloat u = philox_uniform16(seed, base + static_cast<uint64_t>(j));
    store(z + j, u >= p ? splat(keep_value) : splat(0.f));
  }
}

}  // namespace chargpt::simd
