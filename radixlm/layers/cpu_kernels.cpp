// Weight-only int8 / int4 linears for x86 CPUs with AVX2 + FMA (and AVX-512 / AVX512_BF16 where present):
// y[M, N] = x[M, K] @ W[N, K]^T (+ bias).
//
// Built on first use by cpu_kernels.py (torch.utils.cpp_extension.load) and registered as torch ops
// (torch.ops.radixlm_cpu.*), so torch.compile sees ordinary ops with a fake implementation.
//
// Why: at one token (decode) a linear reads every weight once, so its speed is the bytes it reads. torch's
// own CPU kernels for these formats read ~3 GB/s at M = 1 on an AVX2-only EPYC (memory streams ~17 GB/s):
// they are compute-bound there. These kernels unpack 8 weights per instruction group straight into fp32
// registers, reuse every unpacked weight vector for up to 4 activation rows, and run the output rows on
// torch's intra-op threads (at::parallel_for: the OpenMP pool torch.set_num_threads sizes).
//
// Layouts (cpu_kernels.py packs them and holds the float reference; this file only reads them):
//
//   int8   q [N, K] int8, scales [N, G] float32, G = K / group:   W[n, k] = q[n, k] * scales[n, k / group]
//          (G = 1: one scale per output channel, any K; G > 1: group % 16 == 0)
//
//   int4   packed [N, K / 2] uint8, sm [N, G, 2] float32 (scale, min), group % 32 == 0:
//          W[n, k] = code[n, k] * scale[n, g] + min[n, g]     code in 0..15, g = k / group
//          Every 16 input columns of a row are 8 bytes; byte i of chunk c holds
//
//            low nibble:  code[16 c + i]        high nibble:  code[16 c + 8 + i]        (i = 0..7)
//
//          so one 8-byte load widened to 8 int32 lanes gives columns 16c..16c+7 by a mask and
//          16c+8..16c+15 by a shift: no shuffles.
//
// On CPUs with AVX-512 (F, BW, VL, DQ) the int8 kernel runs 16 lanes wide; with AVX512_BF16 too, int4 with
// bf16 activations turns each nibble into the bf16 of 128 + code by one logic op (kBf16Of128) and
// multiplies by vdpbf16ps: 64 weights per 7 instructions (bf16 x bf16 products, float32 sums). The best
// level is chosen at run time (`isa_level`, which tests also use to pin a lower one).
//
// Above `dense_above` activation rows (prefill), the same weights are dequantized to float32, a block of
// output rows at a time, and multiplied by at::mm (MKL / oneDNN sgemm), whose compute is far better than
// a register kernel's once the weights are reused over many rows.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "cpu_simd.h"

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kMaxTileRows = 4;  // activation rows sharing one unpacked weight vector

using radixlm_simd::current_isa;
using radixlm_simd::kAvx2;
using radixlm_simd::kAvx512;
using radixlm_simd::kAvx512Bf16;

int64_t detect_isa() {
  __builtin_cpu_init();  // gcc's checks include the OS saving the zmm state (XCR0)
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (!avx512) return kAvx2;
  return __builtin_cpu_supports("avx512bf16") ? kAvx512Bf16 : kAvx512;
}

int64_t supported_isa() {
  static const int64_t level = detect_isa();
  return level;
}

std::atomic<int64_t> g_isa_cap{kAvx512Bf16};  // lowered by isa_level(request) for tests and benchmarks

}  // namespace

int64_t radixlm_simd::current_isa() { return std::min(supported_isa(), g_isa_cap.load(std::memory_order_relaxed)); }

namespace {

// request >= 0 caps the level used from now on (at most what the CPU has); returns the level in use.
int64_t isa_level(int64_t request) {
  if (request >= 0) g_isa_cap.store(request, std::memory_order_relaxed);
  return current_isa();
}

using radixlm_simd::exp8;
using radixlm_simd::hsum;
using radixlm_simd::load8;

template <typename T>
inline void store(T* out, float v) {
  *out = static_cast<T>(v);  // c10::BFloat16 / c10::Half round to nearest even
}

// Runs tile(m0, MT-tag) over the activation rows in tiles of up to kMaxTileRows (MT a compile-time count).
template <typename Tile>
inline void for_row_tiles(int64_t M, Tile tile) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxTileRows) {
    switch (std::min<int64_t>(kMaxTileRows, M - m0)) {
      case 1: tile(m0, std::integral_constant<int, 1>{}); break;
      case 2: tile(m0, std::integral_constant<int, 2>{}); break;
      case 3: tile(m0, std::integral_constant<int, 3>{}); break;
      default: tile(m0, std::integral_constant<int, 4>{}); break;
    }
  }
}

// ---- int4 ---------------------------------------------------------------------------------------------

// NR output rows (starting at w / sm) times MT activation rows; results into out[m * ldo + r].
// With one activation row the low and high halves accumulate separately: two FMA chains per output row,
// so that FMA latency does not bound a 1-token step.
template <int NR, int MT>
inline void int4_tile(const float* x, int64_t ldx, const uint8_t* w, int64_t ldw, const float* sm,
                      int64_t groups, int64_t group, float* out, int64_t ldo) {
  constexpr int S = MT == 1 ? 2 : 1;
  __m256 acc[NR][MT][S];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m)
      for (int s = 0; s < S; ++s) acc[r][m][s] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi32(0xF);
  const int64_t chunks = group / 16;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 scale[NR], mn[NR];
    for (int r = 0; r < NR; ++r) {
      scale[r] = _mm256_broadcast_ss(sm + r * groups * 2 + 2 * g);
      mn[r] = _mm256_broadcast_ss(sm + r * groups * 2 + 2 * g + 1);
    }
    for (int64_t c = g * chunks; c < (g + 1) * chunks; ++c) {
      for (int r = 0; r < NR; ++r) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + r * ldw + 8 * c));
        const __m256i v = _mm256_cvtepu8_epi32(b);
        const __m256 lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, mask)), scale[r], mn[r]);
        const __m256 hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), scale[r], mn[r]);
        for (int m = 0; m < MT; ++m) {
          const float* xm = x + m * ldx + 16 * c;
          acc[r][m][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xm), acc[r][m][0]);
          acc[r][m][S - 1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xm + 8), acc[r][m][S - 1]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m)
      out[m * ldo + r] = hsum(S == 2 ? _mm256_add_ps(acc[r][m][0], acc[r][m][S - 1]) : acc[r][m][0]);
}

// One activation row: codes times x summed per group as they are (two FMA chains per output row), the
// group's scale applied once per group and its min once per row, as min * (the group's sum of x):
//   y = sum_g scale_g * sum_k code_k x_k + sum_g min_g * xsum_g
// which saves the per-weight dequantizing FMA that the MT > 1 tiles share between their rows.
template <int NR>
inline void int4_tile_one(const float* x, const float* xsum, const uint8_t* w, int64_t ldw, const float* sm,
                          int64_t groups, int64_t group, float* out) {
  __m256 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i mask = _mm256_set1_epi32(0xF);
  const int64_t chunks = group / 16;
  for (int64_t g = 0; g < groups; ++g) {
    // Two chunks per step (group / 16 is even), four FMA chains per output row: latency never binds.
    __m256 lo_acc[NR][2], hi_acc[NR][2];
    for (int r = 0; r < NR; ++r)
      for (int u = 0; u < 2; ++u) lo_acc[r][u] = hi_acc[r][u] = _mm256_setzero_ps();
    for (int64_t c = g * chunks; c < (g + 1) * chunks; c += 2) {
      for (int u = 0; u < 2; ++u) {
        const __m256 xl = _mm256_loadu_ps(x + 16 * (c + u)), xh = _mm256_loadu_ps(x + 16 * (c + u) + 8);
        for (int r = 0; r < NR; ++r) {
          const __m256i v = _mm256_cvtepu8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + r * ldw + 8 * (c + u))));
          lo_acc[r][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, mask)), xl, lo_acc[r][u]);
          hi_acc[r][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), xh, hi_acc[r][u]);
        }
      }
    }
    for (int r = 0; r < NR; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_add_ps(_mm256_add_ps(lo_acc[r][0], hi_acc[r][0]), _mm256_add_ps(lo_acc[r][1], hi_acc[r][1])), _mm256_broadcast_ss(sm + r * groups * 2 + 2 * g), acc[r]);
  }
  for (int r = 0; r < NR; ++r) {
    float low = 0.f;
    for (int64_t g = 0; g < groups; ++g) low += sm[r * groups * 2 + 2 * g + 1] * xsum[g];
    out[r] = hsum(acc[r]) + low;
  }
}

template <int NR>
inline void int4_rows(const float* x, const float* xsum, int64_t ldx, int64_t M, const uint8_t* w, int64_t ldw,
                      const float* sm, int64_t groups, int64_t group, float* out, int64_t ldo) {
  for_row_tiles(M, [&](int64_t m0, auto mt) {
    constexpr int MT = decltype(mt)::value;
    if constexpr (MT == 1)  // one activation row: the min term once per row (int4_tile_one)
      int4_tile_one<NR>(x + m0 * ldx, xsum + m0 * groups, w, ldw, sm, groups, group, out + m0 * ldo);
    else
      int4_tile<NR, MT>(x + m0 * ldx, ldx, w, ldw, sm, groups, group, out + m0 * ldo, ldo);
  });
}

// ---- int8 ---------------------------------------------------------------------------------------------

inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// One scale per output row (groups == 1), any K: the scale multiplies the finished dot product.
template <int NR, int MT>
inline void int8_tile_channel(const float* x, int64_t ldx, const int8_t* w, int64_t K, const float* scales,
                              float* out, int64_t ldo) {
  constexpr int S = MT == 1 ? 2 : 1;
  __m256 acc[NR][MT][S];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m)
      for (int s = 0; s < S; ++s) acc[r][m][s] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    for (int r = 0; r < NR; ++r) {
      const __m256 a = widen8(w + r * K + k), b = widen8(w + r * K + k + 8);
      for (int m = 0; m < MT; ++m) {
        acc[r][m][0] = _mm256_fmadd_ps(a, _mm256_loadu_ps(x + m * ldx + k), acc[r][m][0]);
        acc[r][m][S - 1] = _mm256_fmadd_ps(b, _mm256_loadu_ps(x + m * ldx + k + 8), acc[r][m][S - 1]);
      }
    }
  }
  for (; k + 8 <= K; k += 8)
    for (int r = 0; r < NR; ++r) {
      const __m256 a = widen8(w + r * K + k);
      for (int m = 0; m < MT; ++m) acc[r][m][0] = _mm256_fmadd_ps(a, _mm256_loadu_ps(x + m * ldx + k), acc[r][m][0]);
    }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) {
      float s = hsum(S == 2 ? _mm256_add_ps(acc[r][m][0], acc[r][m][S - 1]) : acc[r][m][0]);
      for (int64_t t = k; t < K; ++t) s += static_cast<float>(w[r * K + t]) * x[m * ldx + t];
      out[m * ldo + r] = s * scales[r];
    }
}

// A scale per group of `group` (a multiple of 16) input columns, e.g. GGUF Q8_0's blocks of 32: each
// widened weight vector is scaled before it meets the activations, so no per-group horizontal sum.
template <int NR, int MT>
inline void int8_tile_group(const float* x, int64_t ldx, const int8_t* w, int64_t K, const float* scales,
                            int64_t groups, int64_t group, float* out, int64_t ldo) {
  constexpr int S = MT == 1 ? 2 : 1;
  __m256 acc[NR][MT][S];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m)
      for (int s = 0; s < S; ++s) acc[r][m][s] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 scale[NR];
    for (int r = 0; r < NR; ++r) scale[r] = _mm256_broadcast_ss(scales + r * groups + g);
    for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
      for (int r = 0; r < NR; ++r) {
        const __m256 a = _mm256_mul_ps(widen8(w + r * K + k), scale[r]);
        const __m256 b = _mm256_mul_ps(widen8(w + r * K + k + 8), scale[r]);
        for (int m = 0; m < MT; ++m) {
          acc[r][m][0] = _mm256_fmadd_ps(a, _mm256_loadu_ps(x + m * ldx + k), acc[r][m][0]);
          acc[r][m][S - 1] = _mm256_fmadd_ps(b, _mm256_loadu_ps(x + m * ldx + k + 8), acc[r][m][S - 1]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m)
      out[m * ldo + r] = hsum(S == 2 ? _mm256_add_ps(acc[r][m][0], acc[r][m][S - 1]) : acc[r][m][0]);
}

template <int NR, int MT>
inline void int8_tile(const float* x, int64_t ldx, const int8_t* w, int64_t K, const float* scales,
                      int64_t groups, int64_t group, float* out, int64_t ldo) {
  if (groups == 1)
    int8_tile_channel<NR, MT>(x, ldx, w, K, scales, out, ldo);
  else
    int8_tile_group<NR, MT>(x, ldx, w, K, scales, groups, group, out, ldo);
}

template <int NR>
inline void int8_rows(const float* x, int64_t ldx, int64_t M, const int8_t* w, int64_t K,
                      const float* scales, int64_t groups, int64_t group, float* out, int64_t ldo) {
  for_row_tiles(M, [&](int64_t m0, auto mt) {
    int8_tile<NR, decltype(mt)::value>(x + m0 * ldx, ldx, w, K, scales, groups, group, out + m0 * ldo, ldo);
  });
}

// ---- AVX-512 -------------------------------------------------------------------------------------------
// (RADIXLM_AVX512 / RADIXLM_AVX512_BF16: cpu_simd.h)

// Software prefetch distance for the weight stream. With one or two sequential streams per core the
// hardware prefetchers stop at every 4 KB page and a decode step waits on DRAM. On a 2-core Xeon (AMX),
// 2 threads, 0.5B-shaped gate/up weights far beyond the caches: int4 6.6 -> 9.3-13 GB/s and int8
// 10.5-12.8 -> 17-20 GB/s with 4 KB; 512 B and 2 KB: no gain; 8 KB: less (int4 7.8-9.5). Built with
// -DRADIXLM_PREFETCH_BYTES=N to try another distance.
#ifndef RADIXLM_PREFETCH_BYTES
#define RADIXLM_PREFETCH_BYTES 4096
#endif
constexpr int64_t kPrefetchBytes = RADIXLM_PREFETCH_BYTES;

// int8, float32 math, 16 lanes; two FMA chains per (output row, activation row).
RADIXLM_AVX512 RADIXLM_INLINE __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

template <int MT>
RADIXLM_AVX512 void int8_tile_512(const float* x, int64_t ldx, const int8_t* w, int64_t K, const float* scales,
                                  int64_t groups, int64_t group, float* out, int64_t ldo) {
  __m512 acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  if (groups == 1) {
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      if (k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetchBytes), _MM_HINT_T0);
      const __m512 a = widen16(w + k), b = widen16(w + k + 16);
      for (int m = 0; m < MT; ++m) {
        acc[m][0] = _mm512_fmadd_ps(a, _mm512_loadu_ps(x + m * ldx + k), acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(b, _mm512_loadu_ps(x + m * ldx + k + 16), acc[m][1]);
      }
    }
    if (k < K) {  // 1-31 columns left: masked loads read nothing past the row
      const int64_t n0 = std::min<int64_t>(16, K - k), n1 = K - k - n0;
      const __mmask16 m0 = static_cast<__mmask16>((1u << n0) - 1), m1 = static_cast<__mmask16>((1u << n1) - 1);
      const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m0, w + k)));
      const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m1, w + k + 16)));
      for (int m = 0; m < MT; ++m) {
        acc[m][0] = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(m0, x + m * ldx + k), acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(m1, x + m * ldx + k + 16), acc[m][1]);
      }
    }
    for (int m = 0; m < MT; ++m) out[m * ldo] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) * scales[0];
    return;
  }
  for (int64_t g = 0; g < groups; ++g) {  // group % 16 == 0: whole vectors, scaled before the FMA
    const __m512 s = _mm512_set1_ps(scales[g]);
    int64_t k = g * group;
    const int64_t end = k + group;
    for (; k + 32 <= end; k += 32) {
      if (k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetchBytes), _MM_HINT_T0);
      const __m512 a = _mm512_mul_ps(widen16(w + k), s), b = _mm512_mul_ps(widen16(w + k + 16), s);
      for (int m = 0; m < MT; ++m) {
        acc[m][0] = _mm512_fmadd_ps(a, _mm512_loadu_ps(x + m * ldx + k), acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(b, _mm512_loadu_ps(x + m * ldx + k + 16), acc[m][1]);
      }
    }
    if (k < end) {
      const __m512 a = _mm512_mul_ps(widen16(w + k), s);
      for (int m = 0; m < MT; ++m) acc[m][0] = _mm512_fmadd_ps(a, _mm512_loadu_ps(x + m * ldx + k), acc[m][0]);
    }
  }
  for (int m = 0; m < MT; ++m) out[m * ldo] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

RADIXLM_AVX512 void int8_rows_512(const float* x, int64_t ldx, int64_t M, const int8_t* w, int64_t K,
                                  const float* scales, int64_t groups, int64_t group, float* out, int64_t ldo) {
  for_row_tiles(M, [&](int64_t m0, auto mt) {
    int8_tile_512<decltype(mt)::value>(x + m0 * ldx, ldx, w, K, scales, groups, group, out + m0 * ldo, ldo);
  });
}

// int4 with bf16 activations. A row's 64-column block is 32 packed bytes; widened to 32 16-bit lanes,
// lane j holds byte j: chunk c = j / 8 of the block, i = j % 8, so its low nibble is column 16c + i and its
// high nibble column 16c + 8 + i. arrange_int4_bf16 puts x in that lane order once per call (per block:
// 32 values for the low nibbles, then 32 for the high ones; a last half block of 32 columns likewise in
// 16 + 16), so the inner loop needs no shuffle of x. vdpbf16ps sums lane pairs into 16 float32 lanes: lane
// l covers bytes 2l, 2l + 1, i.e. chunk l / 4, so with groups of 32 lanes 0-7 are the block's first group
// and 8-15 its second.

void arrange_int4_bf16(const uint16_t* x, int64_t M, int64_t K, uint16_t* xa) {
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* xr = x + m * K;
    uint16_t* o = xa + m * K;
    for (int64_t base = 0; base < K; base += 64) {
      const int64_t lanes = std::min<int64_t>(32, (K - base) / 2);  // 32, or 16 for a last half block
      for (int64_t j = 0; j < lanes; ++j) {
        const int64_t col = base + 16 * (j / 8) + j % 8;
        o[base + j] = xr[col];
        o[base + lanes + j] = xr[col + 8];
      }
    }
  }
}

// A code c in 0..15 OR-ed into the bits of bf16 128.0 (0x4300: 7 mantissa bits, step 1 from 128 to 256) is
// exactly the bf16 of 128 + c: one logic op per 32 weights instead of a table permute (vpermw, which shares
// its port with the widening load). The dot products then hold sum (128 + c) x, and the kernel's min term
// takes off 128 * scale * (the group's sum of x) (xsum2). Terms are ~17x larger than c x alone, i.e. float32
// rounding of ~2^-20 of the result's scale: far below the bf16 output's 2^-8.
constexpr uint16_t kBf16Of128 = 0x4300;
constexpr float kCodeBias = 128.f;


// One 64-column block b of NR output rows (w: row 0's bytes, ldw apart) against MT activation rows:
// tot[r][m] += scale[r] * sum code * x, `scale[r]` holding row r's group scale(s) lane-wise (see above).
template <int NR, int MT>
RADIXLM_AVX512_BF16 RADIXLM_INLINE void int4_bf16_block(const uint16_t* xa, int64_t ldx, const uint8_t* w, int64_t ldw,
                                                        int64_t b, const __m512 (&scale)[NR], __m512i bias,
                                                        __m512 (&tot)[NR][MT]) {
  for (int r = 0; r < NR; ++r) {
    const uint8_t* wb = w + r * ldw + 32 * b;
    if (b % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetchBytes), _MM_HINT_T0);
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb)));
    const __m512i lo = _mm512_ternarylogic_epi32(v, _mm512_set1_epi16(0xF), bias, 0xEA);  // (v & 0xF) | bias
    const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(v, 4), bias);
    for (int m = 0; m < MT; ++m) {
      const uint16_t* xb = xa + m * ldx + 64 * b;
      __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)lo, (__m512bh)_mm512_loadu_si512(xb));
      d = _mm512_dpbf16_ps(d, (__m512bh)hi, (__m512bh)_mm512_loadu_si512(xb + 32));
      tot[r][m] = _mm512_fmadd_ps(d, scale[r], tot[r][m]);
    }
  }
}

// Whether int4_bf16_tile takes this group size: groups of 32 (two per block) or whole blocks.
inline bool int4_bf16_group_ok(int64_t group) { return group == 32 || group % 64 == 0; }

// Groups of 32: block b holds groups 2b (float32 lanes 0-7) and 2b + 1 (lanes 8-15).
template <int NR>
RADIXLM_AVX512_BF16 RADIXLM_INLINE void pair_scales(const float* sm, int64_t lds, int64_t b, __m512 (&out)[NR]) {
  for (int r = 0; r < NR; ++r)
    out[r] = _mm512_insertf32x8(_mm512_set1_ps(sm[r * lds + 4 * b]), _mm256_set1_ps(sm[r * lds + 4 * b + 2]), 1);
}

// NR output rows x MT activation rows. xsum2: per activation row, 2 * groups floats (-128 xsum_g, xsum_g),
// xsum_g the sum of x over group g, in sm's (scale, min) order: the term sum_g (min_g - 128 scale_g) xsum_g
// is then a dot product with sm's row.
template <int NR, int MT>
RADIXLM_AVX512_BF16 void int4_bf16_tile(const uint16_t* xa, const float* xsum2, int64_t K, const uint8_t* w,
                                        const float* sm, int64_t groups, int64_t group, float* out, int64_t ldo) {
  const __m512i code_bias = _mm512_set1_epi16(kBf16Of128);  // OR-ed into a code: the bf16 of 128 + code
  const int64_t ldw = K / 2, lds = 2 * groups;
  __m512 even[NR][MT], odd[NR][MT], scale[NR];  // two FMA chains per (output, activation) row
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) even[r][m] = odd[r][m] = _mm512_setzero_ps();
  const int64_t blocks = K / 64;
  if (group == 32) {
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
      pair_scales<NR>(sm, lds, b, scale);
      int4_bf16_block<NR, MT>(xa, K, w, ldw, b, scale, code_bias, even);
      pair_scales<NR>(sm, lds, b + 1, scale);
      int4_bf16_block<NR, MT>(xa, K, w, ldw, b + 1, scale, code_bias, odd);
    }
    if (b < blocks) {
      pair_scales<NR>(sm, lds, b, scale);
      int4_bf16_block<NR, MT>(xa, K, w, ldw, b, scale, code_bias, even);
    }
  } else {  // group % 64 == 0: whole blocks per group
    const int64_t per_group = group / 64;
    for (int64_t g = 0; g < groups; ++g) {
      for (int r = 0; r < NR; ++r) scale[r] = _mm512_set1_ps(sm[r * lds + 2 * g]);
      int64_t b = g * per_group;
      const int64_t end = b + per_group;
      for (; b + 2 <= end; b += 2) {
        int4_bf16_block<NR, MT>(xa, K, w, ldw, b, scale, code_bias, even);
        int4_bf16_block<NR, MT>(xa, K, w, ldw, b + 1, scale, code_bias, odd);
      }
      if (b < end) int4_bf16_block<NR, MT>(xa, K, w, ldw, b, scale, code_bias, even);
    }
  }
  for (int r = 0; r < NR; ++r) {
    const float* smr = sm + r * lds;
    for (int m = 0; m < MT; ++m) {
      __m512 low = _mm512_setzero_ps();  // the min term, 8 groups per FMA
      const float* xs = xsum2 + m * lds;
      int64_t i = 0;
      for (; i + 16 <= lds; i += 16) low = _mm512_fmadd_ps(_mm512_loadu_ps(smr + i), _mm512_loadu_ps(xs + i), low);
      if (i < lds) {
        const __mmask16 rest = static_cast<__mmask16>((1u << (lds - i)) - 1);
        low = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(rest, smr + i), _mm512_maskz_loadu_ps(rest, xs + i), low);
      }
      out[m * ldo + r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(even[r][m], odd[r][m]), low));
    }
  }
  if (K % 64) {  // a last 32 columns (then group == 32: the last group), 16 lanes wide
    const __m256i bias = _mm256_set1_epi16(kBf16Of128);
    for (int r = 0; r < NR; ++r) {
      const __m256i v =
          _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * ldw + 32 * blocks)));
      const __m256i lo = _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi16(0xF)), bias);
      const __m256i hi = _mm256_or_si256(_mm256_srli_epi16(v, 4), bias);
      const float sc = sm[r * lds + 2 * (groups - 1)];
      for (int m = 0; m < MT; ++m) {
        const uint16_t* xb = xa + m * K + 64 * blocks;
        __m256 d = _mm256_dpbf16_ps(_mm256_setzero_ps(), (__m256bh)lo,
                                    (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb)));
        d = _mm256_dpbf16_ps(d, (__m256bh)hi, (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16)));
        out[m * ldo + r] += hsum(d) * sc;
      }
    }
  }
}

template <int NR>
RADIXLM_AVX512_BF16 void int4_bf16_rows(const uint16_t* xa, const float* xsum2, int64_t M, int64_t K,
                                        const uint8_t* w, const float* sm, int64_t groups, int64_t group,
                                        float* out, int64_t ldo) {
  for_row_tiles(M, [&](int64_t m0, auto mt) {
    int4_bf16_tile<NR, decltype(mt)::value>(xa + m0 * K, xsum2 + m0 * 2 * groups, K, w, sm, groups, group,
                                            out + m0 * ldo, ldo);
  });
}

// Output rows per AVX512_BF16 int4 tile: two interleaved streams, and the per-row work (the min term, the
// horizontal sums) once per pair. Measured on the 2-core Xeon, 1 thread, weights beyond the caches:
// see kPrefetchBytes.
#ifndef RADIXLM_BF16_ROW_BLOCK
#define RADIXLM_BF16_ROW_BLOCK 2
#endif
constexpr int64_t kBf16RowBlock = RADIXLM_BF16_ROW_BLOCK;

// ---- shared driver --------------------------------------------------------------------------------------

// Output rows per tile. One row at a time keeps the weight read a single sequential stream (rows are
// contiguous): with 4 rows at once, 4 short streams (896 bytes a row at K = 896) defeated the hardware
// prefetcher and int8 read 3.4 GB/s against 7.2 GB/s for one row (1 thread, same run).
constexpr int64_t kRowBlock = 1;

// Output rows per thread chunk: a chunk is worth a thread switch only above ~64K weights.
inline int64_t row_grain(int64_t K) { return std::max<int64_t>(kRowBlock, ((1 << 16) / std::max<int64_t>(K, 1) + 3) / 4 * 4); }

// body(begin, end) over [0, n) in chunks of `chunk`, handed out to torch's threads one at a time as each
// finishes its last, not split into one equal share per thread up front: on a shared VM one vCPU often
// runs slower than the other for a while (measured on the 2-core Xeon: the same single-thread int4 loop at
// 13 and 22 G weights/s on the two cores at once), and an equal split waits for the slow share. At least
// n / 16 per chunk: each chunk restarts the weight streams' prefetch, and chunks of row_grain alone made
// int4 batch-1 decode 7% slower than the equal split, 16 chunks 4.5% faster (medians of 12 paired rounds).
template <typename Body>
void for_chunks(int64_t n, int64_t chunk, Body body) {
  chunk = std::max<int64_t>({1, chunk, (n + 15) / 16});
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), chunks);
  if (workers <= 1 || at::in_parallel_region()) {
    body(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed))
      body(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

template <typename T>
void write_rows(const float* acc, int64_t M, int64_t rows, int64_t lda, int64_t n0, const float* bias, T* y, int64_t N) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < rows; ++r) store(y + m * N + n0 + r, acc[m * lda + r] + (bias ? bias[n0 + r] : 0.f));
}

// Runs `tile(n0, m0, mt, NR-tag, acc)` for every block of RowBlock output rows (a last partial block one
// row at a time, NR-tag 1) and up to 8 activation rows, across torch's threads, then writes the block's
// [mt, NR] results (acc[m * NR + r], plus bias) into y in y's dtype.
template <int64_t RowBlock = kRowBlock, typename Tile>
at::Tensor run_rows(const at::Tensor& x, int64_t N, const c10::optional<at::Tensor>& bias, Tile tile) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "radixlm_cpu: bias has ", bias->numel(), " elements, expected ", N);
    b = bias->to(at::kFloat).contiguous();
  }
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const int64_t grain = (row_grain(K) + RowBlock - 1) / RowBlock * RowBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "radixlm_cpu_rows", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    for_chunks((N + RowBlock - 1) / RowBlock, grain / RowBlock, [&](int64_t begin, int64_t end) {
      float acc[kMaxTileRows * 2 * RowBlock];  // one block's results for up to 8 activation rows
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t n = blk * RowBlock;
        for (int64_t m0 = 0; m0 < M; m0 += 2 * kMaxTileRows) {
          const int64_t mt = std::min<int64_t>(2 * kMaxTileRows, M - m0);
          if (n + RowBlock <= N) {
            tile(n, m0, mt, std::integral_constant<int, RowBlock>{}, acc);
            write_rows(acc, mt, RowBlock, RowBlock, n, bp, yp + m0 * N, N);
          } else {
            for (int64_t r = n; r < N; ++r) {
              tile(r, m0, mt, std::integral_constant<int, 1>{}, acc);
              write_rows(acc, mt, 1, 1, r, bp, yp + m0 * N, N);
            }
          }
        }
      }
    });
  });
  return y;
}

// Dequantized float32 rows [n0, n1) of an int4 / int8 weight into `out` ([n1 - n0, K]).
void int4_dequant_rows(const uint8_t* w, const float* sm, int64_t K, int64_t groups, int64_t group,
                       int64_t n0, int64_t n1, float* out) {
  const __m256i mask = _mm256_set1_epi32(0xF);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * (K / 2);
    const float* s = sm + n * groups * 2;
    float* o = out + (n - n0) * K;
    for (int64_t c = 0; c < K / 16; ++c) {
      const int64_t g = 16 * c / group;
      const __m256 scale = _mm256_set1_ps(s[2 * g]), mn = _mm256_set1_ps(s[2 * g + 1]);
      const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + 8 * c)));
      _mm256_storeu_ps(o + 16 * c, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, mask)), scale, mn));
      _mm256_storeu_ps(o + 16 * c + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), scale, mn));
    }
  }
}

void int8_dequant_rows(const int8_t* w, const float* scales, int64_t K, int64_t groups, int64_t group,
                       int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    const float* s = scales + n * groups;
    float* o = out + (n - n0) * K;
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 scale = _mm256_set1_ps(s[g]);
      int64_t k = g * group;
      for (; k + 8 <= (g + 1) * group; k += 8) _mm256_storeu_ps(o + k, _mm256_mul_ps(widen8(wr + k), scale));
      for (; k < (g + 1) * group; ++k) o[k] = static_cast<float>(wr[k]) * s[g];
    }
  }
}

// The same rows as bf16 (rounded to nearest even), for the bf16 matmul of dense_rows; AVX512_BF16 only.
// int4: 64 columns per step; vpermt2w puts the low / high nibble lanes back in column order (per 16
// columns: 8 low, then 8 high), then code * scale + min in float32, packed to bf16 16 columns at a time.
alignas(64) const uint16_t kNibbleOrder[2][32] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 32, 33, 34, 35, 36, 37, 38, 39, 8, 9, 10, 11, 12, 13, 14, 15, 40, 41, 42, 43, 44, 45, 46, 47},
    {16, 17, 18, 19, 20, 21, 22, 23, 48, 49, 50, 51, 52, 53, 54, 55, 24, 25, 26, 27, 28, 29, 30, 31, 56, 57, 58, 59, 60, 61, 62, 63}};

RADIXLM_AVX512_BF16 RADIXLM_INLINE __m256i dequant16_bf16(__m256i codes16, float scale, float low) {
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(codes16));
  return (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(f, _mm512_set1_ps(scale), _mm512_set1_ps(low)));
}

RADIXLM_AVX512_BF16 void int4_dequant_rows_bf16(const uint8_t* w, const float* sm, int64_t K, int64_t groups,
                                                int64_t group, int64_t n0, int64_t n1, uint16_t* out) {
  const __m512i order0 = _mm512_load_si512(kNibbleOrder[0]), order1 = _mm512_load_si512(kNibbleOrder[1]);
  std::vector<int64_t> group_of(K / 16);  // per 16 columns (no integer division in the loop: ~25 cycles each)
  for (int64_t c = 0; c < K / 16; ++c) group_of[c] = 16 * c / group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * (K / 2);
    const float* s = sm + n * groups * 2;
    uint16_t* o = out + (n - n0) * K;
    int64_t col = 0;
    for (; col + 64 <= K; col += 64) {
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + col / 2)));
      const __m512i lo = _mm512_and_si512(v, _mm512_set1_epi16(0xF)), hi = _mm512_srli_epi16(v, 4);
      const __m512i c0 = _mm512_permutex2var_epi16(lo, order0, hi), c1 = _mm512_permutex2var_epi16(lo, order1, hi);
      const __m512i cs[2] = {c0, c1};
      for (int h = 0; h < 4; ++h) {  // 16 columns each: one group (group % 32 == 0)
        const int64_t g = group_of[col / 16 + h];
        const __m256i part = h % 2 ? _mm512_extracti64x4_epi64(cs[h / 2], 1) : _mm512_castsi512_si256(cs[h / 2]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + col + 16 * h), dequant16_bf16(part, s[2 * g], s[2 * g + 1]));
      }
    }
    for (; col < K; ++col) {  // a last 32 columns
      const int64_t c = col / 16, i = col % 16, g = col / group;
      const int code = i < 8 ? (wr[8 * c + i] & 0xF) : (wr[8 * c + i - 8] >> 4);
      const at::BFloat16 v(code * s[2 * g] + s[2 * g + 1]);
      o[col] = v.x;
    }
  }
}

RADIXLM_AVX512_BF16 void int8_dequant_rows_bf16(const int8_t* w, const float* scales, int64_t K, int64_t groups,
                                                int64_t group, int64_t n0, int64_t n1, uint16_t* out) {
  std::vector<int64_t> group_of(K / 16 + 1, 0);  // per 16 columns, as above
  if (groups > 1)
    for (int64_t c = 0; c < K / 16; ++c) group_of[c] = 16 * c / group;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    const float* s = scales + n * groups;
    uint16_t* o = out + (n - n0) * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {  // groups: one scale per 16 columns (group % 16 == 0, or one group)
      const __m512 f = _mm512_mul_ps(widen16(wr + k), _mm512_set1_ps(s[group_of[k / 16]]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k), (__m256i)_mm512_cvtneps_pbh(f));
    }
    for (; k < K; ++k) o[k] = at::BFloat16(static_cast<float>(wr[k]) * s[groups == 1 ? 0 : k / group]).x;
  }
}

// Prefill: the weight dequantized a block of output rows at a time and multiplied by at::mm: in float32
// (MKL / oneDNN sgemm), or, for bf16 activations on a CPU with bf16 arithmetic, in bf16 (oneDNN: AMX or
// AVX512_BF16, float32 accumulation; the dequantized weights round to bf16), several times sgemm's speed.
template <typename DequantF, typename DequantB>
at::Tensor dense_rows(const at::Tensor& x, int64_t N, const c10::optional<at::Tensor>& bias, DequantF dequant_f32,
                      DequantB dequant_bf16) {
  const int64_t M = x.size(0), K = x.size(1);
  const bool bf16_mm = x.scalar_type() == at::kBFloat16 && current_isa() >= kAvx512Bf16;
  const at::Tensor xf = bf16_mm ? x.contiguous() : x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, xf.options());
  // A block of weight rows that stays in L2 (2 MB: 1170 rows at K = 896 in bf16) while the matmul reads it.
  const int64_t bytes = bf16_mm ? 2 : 4;
  const int64_t block = std::max<int64_t>(64, std::min<int64_t>(N, (1 << 21) / bytes / std::max<int64_t>(K, 1)));
  at::Tensor wbuf = at::empty({std::min(block, N), K}, x.options().dtype(bf16_mm ? at::kBFloat16 : at::kFloat));
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t n1 = std::min(N, n0 + block);
    at::parallel_for(n0, n1, 16, [&](int64_t b, int64_t e) {
      if (bf16_mm)
        dequant_bf16(b, e, reinterpret_cast<uint16_t*>(wbuf.data_ptr<at::BFloat16>()) + (b - n0) * K);
      else
        dequant_f32(b, e, wbuf.data_ptr<float>() + (b - n0) * K);
    });
    y.narrow(1, n0, n1 - n0).copy_(at::mm(xf, wbuf.narrow(0, 0, n1 - n0).t()));
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->to(y.scalar_type()));
  return y.to(x.scalar_type());
}

void check_common(const at::Tensor& x, int64_t N, int64_t K, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": activations on ", x.device(), ", this kernel is CPU-only");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, op, ": activations of shape ", x.sizes(), ", expected [M, ", K, "]");
  TORCH_CHECK(x.is_contiguous(), op, ": activations must be contiguous");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              op, ": no kernel for ", x.scalar_type(), " activations");
  TORCH_CHECK(N > 0 && K > 0, op, ": empty weight");
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sm, int64_t group,
                       const c10::optional<at::Tensor>& bias, int64_t dense_above) {
  const int64_t N = packed.size(0), K = packed.size(1) * 2, groups = K / group;
  check_common(x, N, K, "radixlm_cpu::int4_linear");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "int4_linear: packed must be contiguous uint8");
  TORCH_CHECK(group % 32 == 0 && K % group == 0, "int4_linear: group ", group, " must be a multiple of 32 dividing ", K);
  TORCH_CHECK(sm.scalar_type() == at::kFloat && sm.is_contiguous() && sm.numel() == N * groups * 2,
              "int4_linear: sm must be contiguous float32 [N, K / group, 2]");
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const float* s = sm.data_ptr<float>();
  if (x.size(0) > dense_above)
    return dense_rows(
        x, N, bias, [&](int64_t b, int64_t e, float* out) { int4_dequant_rows(w, s, K, groups, group, b, e, out); },
        [&](int64_t b, int64_t e, uint16_t* out) { int4_dequant_rows_bf16(w, s, K, groups, group, b, e, out); });
  std::vector<float> xsum(x.size(0) * groups, 0.f);  // per activation row and group: sum of x
  if (x.scalar_type() == at::kBFloat16 && current_isa() >= kAvx512Bf16 && int4_bf16_group_ok(group)) {
    const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    for (int64_t r = 0; r < x.size(0) * groups; ++r)  // read from the bf16 bits: no float32 copy of x
      for (int64_t j = 0; j < group; ++j) xsum[r] += c10::detail::f32_from_bits(xb[r * group + j]);
    std::vector<uint16_t> xa(x.numel());
    arrange_int4_bf16(xb, x.size(0), K, xa.data());
    std::vector<float> xsum2(2 * xsum.size(), 0.f);
    for (size_t i = 0; i < xsum.size(); ++i) {  // dotted with sm's (scale, min): the codes' bias, then min
      xsum2[2 * i] = -kCodeBias * xsum[i];
      xsum2[2 * i + 1] = xsum[i];
    }
    const uint16_t* xap = xa.data();
    const float* xs2 = xsum2.data();
    return run_rows<kBf16RowBlock>(x, N, bias, [&](int64_t n, int64_t m0, int64_t mt, auto nr, float* acc) {
      constexpr int NR = decltype(nr)::value;
      int4_bf16_rows<NR>(xap + m0 * K, xs2 + m0 * 2 * groups, mt, K, w + n * (K / 2), s + n * groups * 2, groups, group, acc, NR);
    });
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  for (int64_t r = 0; r < x.size(0) * groups; ++r)  // (no division per element: it cost ~50 us at K = 4864)
    for (int64_t j = 0; j < group; ++j) xsum[r] += xp[r * group + j];
  const float* xs = xsum.data();
  return run_rows(x, N, bias, [&](int64_t n, int64_t m0, int64_t mt, auto nr, float* acc) {
    constexpr int NR = decltype(nr)::value;
    int4_rows<NR>(xp + m0 * K, xs + m0 * groups, K, mt, w + n * (K / 2), K / 2, s + n * groups * 2, groups, group, acc, kRowBlock);
  });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, int64_t group,
                       const c10::optional<at::Tensor>& bias, int64_t dense_above) {
  const int64_t N = q.size(0), K = q.size(1), groups = K / group;
  check_common(x, N, K, "radixlm_cpu::int8_linear");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous(), "int8_linear: q must be contiguous int8");
  TORCH_CHECK(K % group == 0 && (groups == 1 || group % 16 == 0), "int8_linear: group ", group,
              " must be the input width ", K, " or a multiple of 16 dividing it");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N * groups,
              "int8_linear: scales must be contiguous float32 [N, K / group]");
  const int8_t* w = q.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  if (x.size(0) > dense_above)
    return dense_rows(
        x, N, bias, [&](int64_t b, int64_t e, float* out) { int8_dequant_rows(w, s, K, groups, group, b, e, out); },
        [&](int64_t b, int64_t e, uint16_t* out) { int8_dequant_rows_bf16(w, s, K, groups, group, b, e, out); });
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  if (current_isa() >= kAvx512)
    return run_rows(x, N, bias, [&](int64_t n, int64_t m0, int64_t mt, auto, float* acc) {
      int8_rows_512(xp + m0 * K, K, mt, w + n * K, K, s + n * groups, groups, group, acc, kRowBlock);
    });
  return run_rows(x, N, bias, [&](int64_t n, int64_t m0, int64_t mt, auto nr, float* acc) {
    constexpr int NR = decltype(nr)::value;
    int8_rows<NR>(xp + m0 * K, K, mt, w + n * K, K, s + n * groups, groups, group, acc, kRowBlock);
  });
}

bool avx512_bf16_supported() { return current_isa() >= kAvx512Bf16; }

// ---- bf16 weights in column blocks, bf16 activations, decode batches (AVX512_BF16) ---------------------
//
// y = x @ W^T for up to a few dozen activation rows. oneDNN's packed bf16 linear is near this CPU's peak
// once its weights are in cache (2816 x 512 at 24 rows: 388 GFLOP/s), but a decode step reads every weight
// of the model once, far beyond the caches, and there it waited on DRAM without overlapping it: the 8
// layers' linears of the small Qwen2 shape took 5.35 ms at 24 rows streamed against 3.0 ms hot (2-core
// Zen 4). Here the weight is laid out for the instruction (cpu_kernels.pack_bf16_blocks):
//
//   blocks [ceil(N / 32), ceil(K / 2), 32, 2] bf16:   blocks[b, p, c, j] = W[32 b + c, 2 p + j]  (zeros past N, K)
//
// so a block of 32 output columns is one sequential stream (prefetched ahead), each 128 bytes of it two
// vdpbf16ps per activation row against that row's (x[2p], x[2p + 1]) broadcast: no horizontal sums, up to
// kVnniRows rows of accumulators in registers. Output (m, n) sums its K products in one fixed order
// whatever M, the tile or the thread split: the same inputs give the same bits at any batch size.
constexpr int64_t kVnniCols = 32;

// The lanes of a 16-column output vector that hold real columns when `left` columns remain.
inline __mmask16 live_lanes16(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}
constexpr int kVnniRows = 12;  // 24 accumulators + 2 weight vectors + 1 broadcast of the 32 registers

template <int MT>
RADIXLM_AVX512_BF16 void vnni_tile(const uint16_t* x, int64_t K, const uint16_t* wb, const float* bias, int64_t n0,
                                   int64_t N, uint16_t* y) {
  __m512 acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* wp = wb + p * 2 * kVnniCols;
    _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetchBytes + 64, _MM_HINT_T0);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp), w1 = (__m512bh)_mm512_loadu_si512(wp + 32);
    for (int m = 0; m < MT; ++m) {
      int32_t two;
      std::memcpy(&two, x + m * K + 2 * p, sizeof(two));
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(two);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xb);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xb);
    }
  }
  if (K % 2) {  // the last column pairs with the packing's zero
    const uint16_t* wp = wb + pairs * 2 * kVnniCols;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp), w1 = (__m512bh)_mm512_loadu_si512(wp + 32);
    for (int m = 0; m < MT; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(x[m * K + K - 1]));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xb);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xb);
    }
  }
  for (int j = 0; j < 2; ++j) {
    const int64_t c0 = n0 + 16 * j;
    if (c0 >= N) break;
    const __mmask16 live = live_lanes16(N - c0);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(live, bias + c0) : _mm512_setzero_ps();
    for (int m = 0; m < MT; ++m) {
      const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[m][j], b));
      _mm256_mask_storeu_epi16(y + m * N + c0, live, v);
    }
  }
}

template <int MT = 1>
RADIXLM_AVX512_BF16 void vnni_rows(int64_t mt, const uint16_t* x, int64_t K, const uint16_t* wb, const float* bias,
                                   int64_t n0, int64_t N, uint16_t* y) {
  if constexpr (MT < kVnniRows) {
    if (mt > MT) return vnni_rows<MT + 1>(mt, x, K, wb, bias, n0, N, y);
  }
  vnni_tile<MT>(x, K, wb, bias, n0, N, y);
}

at::Tensor bf16_block_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t N, int64_t K,
                             const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(blocks.dim() == 4 && blocks.size(2) == kVnniCols && blocks.size(3) == 2 && blocks.is_contiguous() &&
                  blocks.scalar_type() == at::kBFloat16,
              "bf16_block_linear: weight blocks must be contiguous bf16 [ceil(N / 32), ceil(K / 2), 32, 2], got ",
              blocks.sizes(), " ", blocks.scalar_type());
  check_common(x, N, K, "radixlm_cpu::bf16_block_linear");
  TORCH_CHECK(blocks.size(0) == (N + kVnniCols - 1) / kVnniCols && blocks.size(1) == (K + 1) / 2,
              "bf16_block_linear: weight blocks ", blocks.sizes(), " do not hold N = ", N, ", K = ", K);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "bf16_block_linear: bf16 activations, got ", x.scalar_type());
  TORCH_CHECK(avx512_bf16_supported(), "bf16_block_linear: this CPU (or the pinned ISA level) has no AVX512_BF16");
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bf16_block_linear: bias has ", bias->numel(), " elements, expected ", N);
    b = bias->to(at::kFloat).contiguous();
  }
  if (M == 0) return y;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(blocks.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int64_t nblocks = blocks.size(0), block_elems = blocks.size(1) * 2 * kVnniCols;
  // Row tiles as even as kVnniRows allows (24 rows: 12 + 12, not 12 + 12 + 0); a block's later tiles read
  // its weights again from L1 / L2.
  const int64_t tiles = (M + kVnniRows - 1) / kVnniRows;
  for_chunks(nblocks, std::max<int64_t>(1, row_grain(K) / kVnniCols), [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk)
      for (int64_t t = 0, m0 = 0; t < tiles; ++t) {
        const int64_t mt = (M - m0) / (tiles - t);
        vnni_rows(mt, xp + m0 * K, K, wp + blk * block_elems, bp, blk * kVnniCols, N, yp + m0 * N);
        m0 += mt;
      }
  });
  return y;
}

// ---- float32 decode linear on weight blocks (AVX-512) ----------------------------------------------------
//
// y[m, n] = x[m] . W[n] + b[n] for few rows m, on W laid out in blocks of kVnniCols output columns, each
// input k's 32 weights contiguous (cpu_kernels.pack_f32_blocks): a block is one prefetched stream, and each
// 128 bytes of it are two FMAs a row against that row's broadcast input. What bf16_block_linear does for bf16,
// for the same reason: a decode step reads every weight once from DRAM, and oneDNN's packed kernel did not
// overlap that read with its arithmetic (0.5B, float32, batch 1: 67% of the streaming-copy bound). Output
// (m, n) sums its K products in order k = 0 .. K-1 whatever M, the tile or the thread split.
template <int MT>
RADIXLM_AVX512 void f32_tile(const float* x, int64_t K, const float* wb, const float* bias, int64_t n0, int64_t N,
                             float* y) {
  __m512 acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* wp = wb + k * kVnniCols;
    _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetchBytes + 64, _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(wp), w1 = _mm512_loadu_ps(wp + 16);
    for (int m = 0; m < MT; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * K + k]);
      acc[m][0] = _mm512_fmadd_ps(w0, xb, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(w1, xb, acc[m][1]);
    }
  }
  for (int j = 0; j < 2; ++j) {
    const int64_t c0 = n0 + 16 * j;
    if (c0 >= N) break;
    const __mmask16 live = live_lanes16(N - c0);
    for (int m = 0; m < MT; ++m) {
      const __m512 out = bias ? _mm512_add_ps(acc[m][j], _mm512_maskz_loadu_ps(live, bias + c0)) : acc[m][j];
      _mm512_mask_storeu_ps(y + m * N + c0, live, out);
    }
  }
}

template <int MT = 1>
RADIXLM_AVX512 void f32_rows(int64_t mt, const float* x, int64_t K, const float* wb, const float* bias, int64_t n0,
                             int64_t N, float* y) {
  if constexpr (MT < kVnniRows) {
    if (mt > MT) return f32_rows<MT + 1>(mt, x, K, wb, bias, n0, N, y);
  }
  f32_tile<MT>(x, K, wb, bias, n0, N, y);
}

at::Tensor f32_block_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t N, int64_t K,
                            const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(2) == kVnniCols && blocks.is_contiguous() &&
                  blocks.scalar_type() == at::kFloat,
              "f32_block_linear: weight blocks must be contiguous float32 [ceil(N / 32), K, 32], got ", blocks.sizes(),
              " ", blocks.scalar_type());
  check_common(x, N, K, "radixlm_cpu::f32_block_linear");
  TORCH_CHECK(blocks.size(0) == (N + kVnniCols - 1) / kVnniCols && blocks.size(1) == K,
              "f32_block_linear: weight blocks ", blocks.sizes(), " do not hold N = ", N, ", K = ", K);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "f32_block_linear: float32 activations, got ", x.scalar_type());
  TORCH_CHECK(current_isa() >= kAvx512, "f32_block_linear: this CPU (or the pinned ISA level) has no AVX-512");
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "f32_block_linear: bias has ", bias->numel(), " elements, expected ", N);
    b = bias->to(at::kFloat).contiguous();
  }
  if (M == 0) return y;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  const float* wp = blocks.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t nblocks = blocks.size(0), block_elems = K * kVnniCols;
  const int64_t tiles = (M + kVnniRows - 1) / kVnniRows;
  // Chunks of blocks as bf16_block_linear hands them out: the same bytes of weight a chunk.
  for_chunks(nblocks, std::max<int64_t>(1, row_grain(2 * K) / kVnniCols), [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk)
      for (int64_t t = 0, m0 = 0; t < tiles; ++t) {
        const int64_t mt = (M - m0) / (tiles - t);
        f32_rows(mt, xp + m0 * K, K, wp + blk * block_elems, bp, blk * kVnniCols, N, yp + m0 * N);
        m0 += mt;
      }
  });
  return y;
}

// ---- prompt-span and shared-prefix attention: cpu_flash_attention.cpp ---------------------------------

// ---- decode attention, reading the KV pool in place --------------------------------------------------
//
// out[b, h] = softmax(scale * q[b, h] . K[slot(b, l)]) V[slot(b, l)] over l < seq_lens[b], where
// slot(b, l) = kv_idx[b, l] and K, V are the pool's [slots, Hkv, D] buffers: no gathered copy of the
// history (the torch backend's index_select copied every history each layer), no padding, no mask. One
// (request, KV head) per task; the G query heads of a KV head share each loaded K / V row. float32 math
// (AVX2 + FMA), any input dtype of float32 / bf16 / fp16; head dims a multiple of 8.


// The lane sums of 8 vectors, as 8 lanes: lane i is hsum(v[i]) bit for bit (the same pairings: halves
// folded, then lanes 0 + 2 and 1 + 3, then those two), in 10 shuffles and adds instead of 8 dependent
// hsum chains.
inline __m256 hsum8(const __m256 (&v)[8]) {
  __m256 w[4];  // w[i] = [fold(v[i]) | fold(v[i + 4])], fold(x) = low half + high half
  for (int i = 0; i < 4; ++i)
    w[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[i], v[i + 4], 0x20), _mm256_permute2f128_ps(v[i], v[i + 4], 0x31));
  // [f0 + f2, f1 + f3] of v[i], v[i + 1] per 128-bit half
  const __m256 a = _mm256_add_ps(_mm256_shuffle_ps(w[0], w[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 b = _mm256_add_ps(_mm256_shuffle_ps(w[2], w[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(w[2], w[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm256_hadd_ps(a, b);  // [v0 v1 v2 v3 | v4 v5 v6 v7]
}

#ifndef RADIXLM_DECODE_PREFETCH
#define RADIXLM_DECODE_PREFETCH 32
#endif
// Keys this many positions ahead are asked for while the scores are summed, their K rows and their V rows
// (which attention_values reads next): a decode's history comes from DRAM, once a step per layer.
constexpr int64_t kDecodePrefetch = RADIXLM_DECODE_PREFETCH;

template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64)
    _mm_prefetch(reinterpret_cast<const char*>(row) + b, _MM_HINT_T0);
}

// scores[g * L + l] = qf[g] . K row l, for the G query heads of one KV head. Eight positions at a time:
// eight independent FMA chains, one transposed sum (hsum8) for the eight scores; same sums as one
// hsum per score, which is what a last partial block of positions uses.
template <typename T>
void attention_scores(const float* qf, const T* kb, const T* vb, const int64_t* idx, int64_t L, int64_t G, int64_t D,
                      int64_t Dv, int64_t row_stride, int64_t v_stride, int64_t h, float* kf, float* scores) {
  int64_t l = 0;
  for (; l + 8 <= L; l += 8) {
    if (kDecodePrefetch > 0)
      for (int64_t j = l + kDecodePrefetch; j < std::min(L, l + kDecodePrefetch + 8); ++j) {
        prefetch_row(kb + idx[j] * row_stride + h * D, D);
        prefetch_row(vb + idx[j] * v_stride + h * Dv, Dv);
      }
    // The 8 keys as float32, once for all G query heads (converting them per head was most of the work
    // for bf16 with 7 heads a KV head); float32 keys are read where they lie.
    const float* kr[8];
    for (int j = 0; j < 8; ++j) {
      const T* row = kb + idx[l + j] * row_stride + h * D;
      if constexpr (std::is_same_v<T, float>) {
        kr[j] = row;
      } else {
        for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(kf + j * D + d, load8(row + d));
        kr[j] = kf + j * D;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf + g * D;
      __m256 s[8];
      for (int j = 0; j < 8; ++j) s[j] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 q8 = _mm256_loadu_ps(qg + d);
        for (int j = 0; j < 8; ++j) s[j] = _mm256_fmadd_ps(q8, _mm256_loadu_ps(kr[j] + d), s[j]);
      }
      _mm256_storeu_ps(scores + g * L + l, hsum8(s));
    }
  }
  for (; l < L; ++l) {
    const T* kr = kb + idx[l] * row_stride + h * D;
    for (int64_t g = 0; g < G; ++g) {
      __m256 s = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * D + d), load8(kr + d), s);
      scores[g * L + l] = hsum(s);
    }
  }
}

#ifndef RADIXLM_DECODE_VALUE_BLOCK
#define RADIXLM_DECODE_VALUE_BLOCK 32
#endif
// acc[g * Dv + d] = sum over l (in order) of p[g * L + l] * V[l][d] for GB query heads g0 .. g0 + GB - 1,
// 8 columns at a time with the GB accumulators in registers. Positions go in blocks of kValueBlock: every
// column pass of a block reads the same V rows, which then stay in L1 (whole-history passes re-read each
// row from L2 once per 8 columns: 24 KB of rows at 375 positions, plus the scores, overflow 32 KB). The same
// FMA per element in the same order as one pass over all positions.
constexpr int64_t kValueBlock = RADIXLM_DECODE_VALUE_BLOCK;

template <int GB, typename T>
void attention_values(const float* p, const T* vb, const int64_t* idx, int64_t L, int64_t Dv, int64_t row_stride,
                      int64_t h, int64_t g0, float* acc) {
  for (int64_t l0 = 0; l0 < L; l0 += kValueBlock) {
    const int64_t l1 = std::min(L, l0 + kValueBlock);
    for (int64_t d = 0; d < Dv; d += 8) {
      __m256 a[GB];
      for (int g = 0; g < GB; ++g) a[g] = l0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + (g0 + g) * Dv + d);
      for (int64_t l = l0; l < l1; ++l) {
        const __m256 v8 = load8(vb + idx[l] * row_stride + h * Dv + d);
        for (int g = 0; g < GB; ++g) a[g] = _mm256_fmadd_ps(_mm256_set1_ps(p[(g0 + g) * L + l]), v8, a[g]);
      }
      for (int g = 0; g < GB; ++g) _mm256_storeu_ps(acc + (g0 + g) * Dv + d, a[g]);
    }
  }
}

template <typename T>
void decode_attention_kernel(const T* q, const T* kb, const T* vb, const int64_t* kv_idx, const int64_t* seq_lens,
                             T* out, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t Dv, int64_t Lmax, float scale) {
  const int64_t G = H / Hkv;
  // Tasks go to whichever thread is free next: histories differ in length, and an even split of the
  // (request, KV head) list left one thread waiting on the other.
  const int64_t tasks = B * Hkv;
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    std::vector<float> qf(G * D), scores, acc(G * Dv), denom(G), kf(8 * D);
    for (int64_t task = next.fetch_add(1); task < tasks; task = next.fetch_add(1)) {
      const int64_t b = task / Hkv, h = task % Hkv, L = seq_lens[b];
      const int64_t* idx = kv_idx + b * Lmax;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(q[(b * H + h * G + g) * D + d]) * scale;
      if (static_cast<int64_t>(scores.size()) < G * L) scores.resize(G * L);
      attention_scores(qf.data(), kb, vb, idx, L, G, D, Dv, Hkv * D, Hkv * Dv, h, kf.data(), scores.data());
      for (int64_t g = 0; g < G; ++g) {
        float* sg = &scores[g * L];
        const float mx = *std::max_element(sg, sg + L);
        __m256 sum8 = _mm256_setzero_ps();
        int64_t l = 0;
        for (; l + 8 <= L; l += 8) {
          const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + l), _mm256_set1_ps(mx)));
          _mm256_storeu_ps(sg + l, e);
          sum8 = _mm256_add_ps(sum8, e);
        }
        float sum = hsum(sum8);
        for (; l < L; ++l) sum += (sg[l] = std::exp(sg[l] - mx));
        denom[g] = 1.f / sum;
      }
      // Up to 8 heads x 1 column block a pass: 8 accumulators + V + p of 16 registers, so each V row is
      // converted once for 8 heads (4 before: twice for 7 heads a KV head).
      for (int64_t g0 = 0; g0 < G; g0 += 8) {
        float* a = acc.data();
        const float* p = scores.data();
        switch (std::min<int64_t>(8, G - g0)) {
          case 8: attention_values<8>(p, vb, idx, L, Dv, Hkv * Dv, h, g0, a); break;
          case 7: attention_values<7>(p, vb, idx, L, Dv, Hkv * Dv, h, g0, a); break;
          case 6: attention_values<6>(p, vb, idx, L, Dv, Hkv * Dv, h, g0, a); break;
          case 5: attention_values<5>(p, vb, idx, L, Dv, Hkv * Dv, h, g0, a); break;
          case 4: attention_values<4>(p, vb, idx, L, Dv, Hkv * Dv, h, g0, a); break;
          case 3: attention_values<3>(p, vb, idx, L, Dv, Hkv * Dv, h, g0, a); break;
          case 2: attention_values<2>(p, vb, idx, L, Dv, Hkv * Dv, h, g0, a); break;
          default: attention_values<1>(p, vb, idx, L, Dv, Hkv * Dv, h, g0, a); break;
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < Dv; ++d)
          out[(b * H + h * G + g) * Dv + d] = static_cast<T>(acc[g * Dv + d] * denom[g]);
    }
  };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), tasks);
  if (workers <= 1 || at::in_parallel_region())
    worker();
  else
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(); });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf,
                            const at::Tensor& kv_idx, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k_buf.device().is_cpu(), "decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k_buf.dim() == 3 && v_buf.dim() == 3, "decode_attention: q [B, H, D], k/v buffers [N, Hkv, D]");
  TORCH_CHECK(q.is_contiguous() && k_buf.is_contiguous() && v_buf.is_contiguous(), "decode_attention: contiguous q / k / v");
  TORCH_CHECK(k_buf.scalar_type() == q.scalar_type() && v_buf.scalar_type() == q.scalar_type(),
              "decode_attention: q, k and v in one dtype");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_buf.size(1), Dv = v_buf.size(2);
  TORCH_CHECK(k_buf.size(2) == D && v_buf.size(1) == Hkv && H % Hkv == 0, "decode_attention: head shapes");
  TORCH_CHECK(D % 8 == 0 && Dv % 8 == 0, "decode_attention: head dims must be multiples of 8");
  const at::Tensor idx = kv_idx.to(at::kLong).contiguous(), lens = seq_lens.to(at::kLong).contiguous();
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == B && lens.numel() == B, "decode_attention: kv_idx [B, L], seq_lens [B]");
  const int64_t* lp = lens.data_ptr<int64_t>();  // checked on the host pointer: no reduction op per layer
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] >= 0 && lp[b] <= idx.size(1), "decode_attention: seq_lens[", b, "] = ", lp[b], " beyond kv_idx's ", idx.size(1));
  at::Tensor out = at::empty({B, H, Dv}, q.options());
  auto run = [&](auto tag) {
    using T = decltype(tag);
    decode_attention_kernel<T>(q.data_ptr<T>(), k_buf.data_ptr<T>(), v_buf.data_ptr<T>(), idx.data_ptr<int64_t>(),
                               lens.data_ptr<int64_t>(), out.data_ptr<T>(), B, H, Hkv, D, Dv, idx.size(1),
                               static_cast<float>(scale));
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(at::BFloat16{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: TORCH_CHECK(false, "decode_attention: no kernel for ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(radixlm_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor sm, int group, Tensor? bias, int dense_above) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor q, Tensor scales, int group, Tensor? bias, int dense_above) -> Tensor");
  m.def("bf16_block_linear(Tensor x, Tensor blocks, int N, int K, Tensor? bias) -> Tensor");
  m.def("f32_block_linear(Tensor x, Tensor blocks, int N, int K, Tensor? bias) -> Tensor");
  m.def("isa_level(int request) -> int", &isa_level);  // no tensors: one kernel for every dispatch key
  m.def("decode_attention(Tensor q, Tensor k_buf, Tensor v_buf, Tensor kv_idx, Tensor seq_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(radixlm_cpu, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("bf16_block_linear", &bf16_block_linear);
  m.impl("f32_block_linear", &f32_block_linear);
  m.impl("decode_attention", &decode_attention);
}
