// What radixlm's CPU kernels share (cpu_kernels.cpp, cpu_elementwise.cpp, cpu_flash_attention.cpp): AVX2
// helpers, the instruction-set levels and the attributes that compile a function for one.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>

// AVX-512 code is compiled for these targets by attribute (the build's flags stay AVX2) and runs only
// where current_isa() says.
#define RADIXLM_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")))
#define RADIXLM_AVX512_BF16 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define RADIXLM_INLINE inline __attribute__((always_inline))

namespace radixlm_simd {

// Instruction-set levels, lowest first.
enum Isa : int64_t { kAvx2 = 0, kAvx512 = 1, kAvx512Bf16 = 2 };

// The level in use: what the CPU has, capped by the isa_level op (tests and benchmarks pin a lower one).
// Defined once, in cpu_kernels.cpp, for every source file of the extension.
int64_t current_isa();

// The sum of a vector's 8 lanes.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 values of a tensor's dtype as float32 (exact for each).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// exp, Cephes' polynomial: ~1 ulp of float32 for x in [-87.3, 88.3]; x is clamped into that range first
// (below: a value under float32's normal range instead of 0; above: 2.2e38 instead of inf). The upper
// clamp leaves every x <= 0 as it was: softmax after the max is taken off, decode attention's use.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}

}  // namespace radixlm_simd
