// Weight-only int8 / int4 linears for x86 CPUs with AVX2 + FMA: y[M, N] = x[M, K] @ W[N, K]^T (+ bias).
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
// Above `dense_above` activation rows (prefill), the same weights are dequantized to float32, a block of
// output rows at a time, and multiplied by at::mm (MKL / oneDNN sgemm), whose compute is far better than
// a register kernel's once the weights are reused over many rows.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kMaxTileRows = 4;  // activation rows sharing one unpacked weight vector

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename T>
inline void store(T* out, float v) {
  *out = static_cast<T>(v);  // c10::BFloat16 / c10::Half round to nearest even
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
  if (M == 1) return int4_tile_one<NR>(x, xsum, w, ldw, sm, groups, group, out);
  for (int64_t m0 = 0; m0 < M; m0 += kMaxTileRows) {
    const float* xm = x + m0 * ldx;
    float* o = out + m0 * ldo;
    switch (std::min<int64_t>(kMaxTileRows, M - m0)) {
      case 1: int4_tile_one<NR>(xm, xsum + m0 * groups, w, ldw, sm, groups, group, o); break;
      case 2: int4_tile<NR, 2>(xm, ldx, w, ldw, sm, groups, group, o, ldo); break;
      case 3: int4_tile<NR, 3>(xm, ldx, w, ldw, sm, groups, group, o, ldo); break;
      default: int4_tile<NR, 4>(xm, ldx, w, ldw, sm, groups, group, o, ldo); break;
    }
  }
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
  for (int64_t m0 = 0; m0 < M; m0 += kMaxTileRows) {
    const float* xm = x + m0 * ldx;
    float* o = out + m0 * ldo;
    switch (std::min<int64_t>(kMaxTileRows, M - m0)) {
      case 1: int8_tile<NR, 1>(xm, ldx, w, K, scales, groups, group, o, ldo); break;
      case 2: int8_tile<NR, 2>(xm, ldx, w, K, scales, groups, group, o, ldo); break;
      case 3: int8_tile<NR, 3>(xm, ldx, w, K, scales, groups, group, o, ldo); break;
      default: int8_tile<NR, 4>(xm, ldx, w, K, scales, groups, group, o, ldo); break;
    }
  }
}

// ---- shared driver --------------------------------------------------------------------------------------

// Output rows per tile. One row at a time keeps the weight read a single sequential stream (rows are
// contiguous): with 4 rows at once, 4 short streams (896 bytes a row at K = 896) defeated the hardware
// prefetcher and int8 read 3.4 GB/s against 7.2 GB/s for one row (1 thread, same run).
constexpr int64_t kRowBlock = 1;

// Output rows per thread chunk: a chunk is worth a thread switch only above ~64K weights.
inline int64_t row_grain(int64_t K) { return std::max<int64_t>(kRowBlock, ((1 << 16) / std::max<int64_t>(K, 1) + 3) / 4 * 4); }

template <typename T>
void write_rows(const float* acc, int64_t M, int64_t rows, int64_t n0, const float* bias, T* y, int64_t N) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < rows; ++r) store(y + m * N + n0 + r, acc[m * kRowBlock + r] + (bias ? bias[n0 + r] : 0.f));
}

// Runs `tile(n0, NR-tag, acc)` for every block of output rows across torch's threads, then writes the
// block's [M, rows] results (plus bias) into y in y's dtype.
template <typename Tile>
at::Tensor run_rows(const at::Tensor& x, int64_t N, const c10::optional<at::Tensor>& bias, Tile tile) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "radixlm_cpu: bias has ", bias->numel(), " elements, expected ", N);
    b = bias->to(at::kFloat).contiguous();
  }
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "radixlm_cpu_rows", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(K), [&](int64_t begin, int64_t end) {
      // One block's results for up to 8 activation rows; more rows loop while the block's weights are
      // still in L1.
      float acc[kMaxTileRows * 2 * kRowBlock];
      static_assert(kRowBlock == 1, "a row tail loop is needed for blocks of several rows");
      for (int64_t n = begin; n < end; n += kRowBlock)
        for (int64_t m0 = 0; m0 < M; m0 += 2 * kMaxTileRows) {
          const int64_t mt = std::min<int64_t>(2 * kMaxTileRows, M - m0);
          tile(n, m0, mt, std::integral_constant<int, kRowBlock>{}, acc);
          write_rows(acc, mt, kRowBlock, n, bp, yp + m0 * N, N);
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

// Prefill: the weight dequantized a block of output rows at a time, multiplied by at::mm in float32.
template <typename Dequant>
at::Tensor dense_rows(const at::Tensor& x, int64_t N, const c10::optional<at::Tensor>& bias, Dequant dequant) {
  const int64_t M = x.size(0), K = x.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, xf.options());
  // 1024 rows of float32 weight: ~3.5 MB at K = 896, big enough for sgemm, small enough to stay cached.
  const int64_t block = std::max<int64_t>(64, std::min<int64_t>(N, (1 << 22) / std::max<int64_t>(K, 1)));
  at::Tensor wf = at::empty({std::min(block, N), K}, xf.options());
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t n1 = std::min(N, n0 + block);
    float* wp = wf.data_ptr<float>();
    at::parallel_for(n0, n1, 16, [&](int64_t b, int64_t e) { dequant(b, e, wp + (b - n0) * K); });
    y.narrow(1, n0, n1 - n0).copy_(at::mm(xf, wf.narrow(0, 0, n1 - n0).t()));
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
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
    return dense_rows(x, N, bias, [&](int64_t b, int64_t e, float* out) { int4_dequant_rows(w, s, K, groups, group, b, e, out); });
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  std::vector<float> xsum(x.size(0) * groups, 0.f);  // per activation row and group: sum of x
  for (int64_t i = 0; i < x.size(0) * K; ++i) xsum[i / group] += xp[i];
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
    return dense_rows(x, N, bias, [&](int64_t b, int64_t e, float* out) { int8_dequant_rows(w, s, K, groups, group, b, e, out); });
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  return run_rows(x, N, bias, [&](int64_t n, int64_t m0, int64_t mt, auto nr, float* acc) {
    constexpr int NR = decltype(nr)::value;
    int8_rows<NR>(xp + m0 * K, K, mt, w + n * K, K, s + n * groups, groups, group, acc, kRowBlock);
  });
}

}  // namespace

TORCH_LIBRARY(radixlm_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor sm, int group, Tensor? bias, int dense_above) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor q, Tensor scales, int group, Tensor? bias, int dense_above) -> Tensor");
}

TORCH_LIBRARY_IMPL(radixlm_cpu, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
}
