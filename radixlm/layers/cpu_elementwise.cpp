// radixlm's CPU elementwise kernels: RMSNorm (with the residual add), rotary embedding and the gated MLP's
// silu(gate) * up, each one call where the torch forms take 2 to 12 ops.
//
// At decode batch sizes a layer's norm or rotary touches a few thousand values: the time goes to dispatching
// each torch op (~4 us apiece on a 2-core Xeon), not to arithmetic. Measured there, bf16, one token at the
// 0.5B Qwen2 shape: RMSNorm with the residual add 40 us as 9 torch ops, rotary of q and k 82 us as 12.
//
// Numerics follow the torch forms op by op: every intermediate the torch form stores is rounded to the
// tensor's dtype here too (round_to<T>), and the extension is built with -ffp-contract=off, so no product
// and sum are fused into one rounding. Rotary is therefore bitwise the torch form (layers/rotary.py) in
// every dtype. RMSNorm differs in one place only: its sum of squares adds in another order than torch's
// reduction, so the variance can differ by an ulp of float32 (norm.py uses this kernel for bf16 / fp16
// only, where that ulp rarely survives the output's rounding: then by two ulps of the dtype at most).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "cpu_simd.h"

namespace {

// ---- 8 floats from / to a tensor's dtype, rounding as torch does (nearest even) ----------------------

using radixlm_simd::exp8;
using radixlm_simd::hsum;
using radixlm_simd::load8;

// The bf16 bits of each lane, in the low half of a 32-bit lane: c10::BFloat16's rounding (NaN -> 0x7FC0).
inline __m256i bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(at::BFloat16* p, __m256 v) {
  const __m256i r = bf16_bits(v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
inline void store8(at::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// v rounded to T and back: what a torch op producing a T tensor stores.
template <typename T>
inline __m256 round_to(__m256 v);
template <>
inline __m256 round_to<float>(__m256 v) { return v; }
template <>
inline __m256 round_to<at::BFloat16>(__m256 v) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16)); }
template <>
inline __m256 round_to<at::Half>(__m256 v) {
  return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <typename T>
inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

// Rows per parallel chunk: below ~16K values a row block is not worth a thread switch.
inline int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

// ---- RMSNorm -----------------------------------------------------------------------------------------
// As transformers' LlamaRMSNorm: h = float(x); h = h * (1 / sqrt(mean(h^2) + eps)); out = w * T(h), the
// last product in T (weight and x share T). With a residual, x is first T(x + residual), also returned.

template <typename T>
void rms_norm_rows(const T* x, const T* res, const T* w, T* out, T* sum_out, int64_t rows, int64_t K, float eps) {
  at::parallel_for(0, rows, grain_rows(K), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * K;
      T* o = out + r * K;
      const T* src = xr;
      if (res != nullptr) {  // the sum, rounded to T, is what the norm reads
        T* s = sum_out + r * K;
        const T* rr = res + r * K;
        int64_t i = 0;
        for (; i + 8 <= K; i += 8) store8(s + i, _mm256_add_ps(load8(xr + i), load8(rr + i)));
        for (; i < K; ++i) s[i] = static_cast<T>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
        src = s;
      }
      __m256 sq = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= K; i += 8) {
        const __m256 h = load8(src + i);
        sq = _mm256_add_ps(sq, _mm256_mul_ps(h, h));
      }
      float sumsq = hsum(sq);
      for (; i < K; ++i) {
        const float h = static_cast<float>(src[i]);
        sumsq += h * h;
      }
      const float inv = 1.f / std::sqrt(sumsq / static_cast<float>(K) + eps);
      const __m256 inv8 = _mm256_set1_ps(inv);
      for (i = 0; i + 8 <= K; i += 8)
        store8(o + i, _mm256_mul_ps(load8(w + i), round_to<T>(_mm256_mul_ps(load8(src + i), inv8))));
      for (; i < K; ++i)
        o[i] = static_cast<T>(static_cast<float>(w[i]) * round_to<T>(static_cast<float>(src[i]) * inv));
    }
  });
}

void check_norm(const at::Tensor& x, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1), name, ": weight [K] for x [..., K]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), name, ": weight and x in one dtype");
}

template <typename F>
void dispatch(at::ScalarType t, const char* name, F f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: TORCH_CHECK(false, name, ": no kernel for ", t);
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm(x, weight, "rms_norm");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t K = x.size(-1), rows = K ? xc.numel() / K : 0;
  dispatch(x.scalar_type(), "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows<T>(xc.data_ptr<T>(), nullptr, wc.data_ptr<T>(), out.data_ptr<T>(), nullptr, rows, K, static_cast<float>(eps));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                                double eps) {
  check_norm(x, weight, "add_rms_norm");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "add_rms_norm: residual must match x's shape and dtype");
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty_like(xc), sum = at::empty_like(xc);
  const int64_t K = x.size(-1), rows = K ? xc.numel() / K : 0;
  dispatch(x.scalar_type(), "add_rms_norm", [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows<T>(xc.data_ptr<T>(), rc.data_ptr<T>(), wc.data_ptr<T>(), out.data_ptr<T>(), sum.data_ptr<T>(), rows, K,
                     static_cast<float>(eps));
  });
  return {out, sum};
}

// ---- rotary ------------------------------------------------------------------------------------------
// Each head [x1 (rot/2) | x2 (rot/2) | pass]: out = [T(T(x1 c) - T(x2 s)) | T(T(x2 c) + T(x1 s)) | pass], with
// c, s the token's cos / sin rows in T: the torch form's products and sums, each rounded where it stores.

template <typename T>
void rotary_rows(const T* x, int64_t ldx, const T* cos, const T* sin, T* out, int64_t rows, int64_t heads, int64_t D,
                 int64_t rot) {
  const int64_t half = rot / 2, W = heads * D;
  at::parallel_for(0, rows, grain_rows(W), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos + t * half;
      const T* s = sin + t * half;
      for (int64_t h = 0; h < heads; ++h) {
        const T* x1 = x + t * ldx + h * D;
        const T* x2 = x1 + half;
        T* o1 = out + t * W + h * D;
        T* o2 = o1 + half;
        int64_t i = 0;
        for (; i + 8 <= half; i += 8) {
          const __m256 a = load8(x1 + i), b = load8(x2 + i), c8 = load8(c + i), s8 = load8(s + i);
          store8(o1 + i, _mm256_sub_ps(round_to<T>(_mm256_mul_ps(a, c8)), round_to<T>(_mm256_mul_ps(b, s8))));
          store8(o2 + i, _mm256_add_ps(round_to<T>(_mm256_mul_ps(b, c8)), round_to<T>(_mm256_mul_ps(a, s8))));
        }
        for (; i < half; ++i) {
          const float a = static_cast<float>(x1[i]), b = static_cast<float>(x2[i]);
          const float cf = static_cast<float>(c[i]), sf = static_cast<float>(s[i]);
          o1[i] = static_cast<T>(round_to<T>(a * cf) - round_to<T>(b * sf));
          o2[i] = static_cast<T>(round_to<T>(b * cf) + round_to<T>(a * sf));
        }
        for (int64_t j = rot; j < D; ++j) o1[j] = x1[j];  // the part past rotary_dim passes through
      }
    }
  });
}

at::Tensor rotary_one(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim, int64_t rot) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rotary: x must be [T, H * head_dim] with contiguous rows");
  const int64_t T_ = x.size(0);
  TORCH_CHECK(head_dim > 0 && x.size(1) % head_dim == 0, "rotary: width ", x.size(1), " is not a multiple of head_dim ", head_dim);
  at::Tensor out = at::empty({T_, x.size(1)}, x.options());
  dispatch(x.scalar_type(), "rotary", [&](auto tag) {
    using T = decltype(tag);
    rotary_rows<T>(x.data_ptr<T>(), x.stride(0), cos.data_ptr<T>(), sin.data_ptr<T>(), out.data_ptr<T>(), T_,
                   x.size(1) / head_dim, head_dim, rot);
  });
  return out;
}

// q and k of one layer in one call (one dispatch instead of two).
std::tuple<at::Tensor, at::Tensor> rotary_qk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin, int64_t head_dim, int64_t rotary_dim) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "rotary_qk: CPU tensors only");
  TORCH_CHECK(rotary_dim % 2 == 0 && rotary_dim > 0 && rotary_dim <= head_dim, "rotary_qk: rotary_dim ", rotary_dim,
              " must be even and within head_dim ", head_dim);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && cos.scalar_type() == q.scalar_type() &&
                  sin.scalar_type() == q.scalar_type(),
              "rotary_qk: q, k, cos and sin in one dtype");
  TORCH_CHECK(q.size(0) == k.size(0) && cos.dim() == 2 && cos.size(0) == q.size(0) && cos.size(1) == rotary_dim / 2 &&
                  sin.sizes() == cos.sizes(),
              "rotary_qk: cos / sin must be [T, rotary_dim / 2] for T tokens");
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  return {rotary_one(q, c, s, head_dim, rotary_dim), rotary_one(k, c, s, head_dim, rotary_dim)};
}

// ---- silu(gate) * up ----------------------------------------------------------------------------------
// As activation.py's SiluAndMul on rows [gate (I) | up (I)]: out = T(T(silu(g)) * u), silu(g) = g / (1 + exp(-g))
// in float32, each result rounded where the torch form stores it. Only exp differs from torch's (Sleef's
// against cpu_simd.h's, each within about an ulp of float32), so a bf16 / fp16 output moves by one ulp of the
// dtype where that float32 ulp crosses a rounding boundary (and gates in (-88.72, -88.3], silu ~1e-37, by
// more). Measured on the 2-core Zen 4 at the small shape's ~970-row prefill chunks (I = 1408, bf16): alone the
// kernel is slower than torch's two passes (0.87 against 0.68 ms: AVX2's divide); inside the engine, where
// the silu intermediate does not stay in cache, the 40 prefill calls of the 32-request run took 39-54 ms
// against 56-62, and each decode layer saves two dispatches.

template <typename T>
void silu_mul_rows(const T* x, int64_t ldx, T* out, int64_t rows, int64_t I) {
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f), zero = _mm256_setzero_ps();
  const __m256 overflow = _mm256_set1_ps(88.7228f);  // ln(FLT_MAX): exp above it is inf
  at::parallel_for(0, rows, grain_rows(2 * I), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = x + r * ldx;
      const T* u = g + I;
      T* o = out + r * I;
      int64_t i = 0;
      for (; i + 8 <= I; i += 8) {
        const __m256 gv = load8(g + i), neg = _mm256_xor_ps(gv, sign);
        __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(neg)));
        // where exp(-g) overflows float32, torch divides by inf: -0 (exp8 stops at 2.2e38)
        s = _mm256_blendv_ps(s, _mm256_mul_ps(gv, zero), _mm256_cmp_ps(neg, overflow, _CMP_GT_OQ));
        store8(o + i, _mm256_mul_ps(round_to<T>(s), load8(u + i)));
      }
      for (; i < I; ++i) {
        const float gf = static_cast<float>(g[i]);
        o[i] = static_cast<T>(round_to<T>(gf / (1.f + std::exp(-gf))) * static_cast<float>(u[i]));
      }
    }
  });
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "silu_and_mul: CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "silu_and_mul: x must be [..., 2 * I], got last dim ", x.size(-1));
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "silu_and_mul: bf16 or fp16 only, got ",
              x.scalar_type());
  const at::Tensor xc = x.contiguous();
  const int64_t I = x.size(-1) / 2, rows = I ? xc.numel() / (2 * I) : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = I;
  at::Tensor out = at::empty(shape, x.options());
  dispatch(x.scalar_type(), "silu_and_mul", [&](auto tag) {
    using T = decltype(tag);
    silu_mul_rows<T>(xc.data_ptr<T>(), 2 * I, out.data_ptr<T>(), rows, I);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(radixlm_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_qk(Tensor q, Tensor k, Tensor cos, Tensor sin, int head_dim, int rotary_dim) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(radixlm_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary_qk", &rotary_qk);
  m.impl("silu_and_mul", &silu_and_mul);
}
