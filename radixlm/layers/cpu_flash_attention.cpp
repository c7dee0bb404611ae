// radixlm's CPU flash attention over the KV pool in place: prompt spans (span_attention) and decodes that
// share a cached prefix (shared_decode_attention), for bf16 (AVX512_BF16) and float32 (AVX-512) pools.
//
// Prompt spans: out[i, h] = softmax(scale * q[i, h] . K[slot(l)]) V[slot(l)] over l <= prefix + i, for one
// prompt span of n queries whose prefix + n keys sit at kv_idx in the pool: an online softmax over blocks
// of keys, no gathered copy, no mask tensor. torch's CPU flash attention ran 70-100 GFLOP/s in
// bf16 on the 2-core Zen 4 (14 heads, 2 KV heads, 64-dim heads, 64-1024 queries over up to 1088 keys), and
// in float32 it needs the history gathered and a mask. One task: one KV head and kQueryBlock query
// positions (all G query heads of that KV head, so each packed block serves 16 G rows); a query's result
// depends only on its own span, never on the batch.
//
// The two element types differ only in the products (Bf16Pool / F32Pool below):
//   bf16     both products are vdpbf16ps (bf16 x bf16, float32 sums): q . k against a block of keys laid
//            out key-pairs-in-lanes, p . V with the probabilities rounded to bf16 (as torch's kernel rounds
//            them for its second matmul) against key pairs of V.
//   float32  both products are FMAs on float32: q . k against the block's keys one dimension a vector,
//            p . V with the probabilities unrounded.
// The softmax, its running max and sum and the accumulators are float32 in both.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"

namespace {

using radixlm_simd::current_isa;
using radixlm_simd::kAvx512;
using radixlm_simd::kAvx512Bf16;

#ifndef RADIXLM_SPAN_KEY_BLOCK
#define RADIXLM_SPAN_KEY_BLOCK 64
#endif
constexpr int64_t kKeyBlock = RADIXLM_SPAN_KEY_BLOCK;  // bf16's: a multiple of 32
#ifndef RADIXLM_BF16_ROWS
#define RADIXLM_BF16_ROWS 2
#endif
// float32's (F32Pool below says why; -D to try others)
#ifndef RADIXLM_F32_KEY_BLOCK
#define RADIXLM_F32_KEY_BLOCK 32
#endif
#ifndef RADIXLM_F32_ROWS
#define RADIXLM_F32_ROWS 4
#endif
constexpr int64_t kQueryBlock = 16;

RADIXLM_AVX512 RADIXLM_INLINE __m512 exp16(__m512 x) {  // cpu_simd.h's exp8, 16 lanes (x <= 0)
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  const __m512i pow2 = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(pow2));
}

template <typename T>
struct SpanTask {
  const T* q;   // [n, H, D]
  const T* kb;  // pool [slots, Hkv, D]
  const T* vb;  // pool [slots, Hkv, Dv]
  const int64_t* idx;  // [prefix + n]
  T* out;              // [n, H, Dv]
  int64_t n, prefix, H, Hkv, D, Dv;
  float scale;
};

struct RowState {
  float* m;
  float* l;
  float* acc;  // [rows, Dv]
};

// The K and V rows of keys [k0, k1) asked for ahead of their pack: the rows sit wherever the pool put
// them, so the hardware prefetchers do not see them coming. float32's pack asks for the next block's
// (8 groups of 8 decodes over 1,024 shared keys on scattered slots: 3.9 -> 3.2 ms); bf16's rows are half
// as wide, and there it measured no clear gain.
template <typename T>
void prefetch_keys(const SpanTask<T>& t, int64_t h, int64_t k0, int64_t k1) {
  for (int64_t key = k0; key < k1; ++key) {
    const char* k = reinterpret_cast<const char*>(t.kb + (t.idx[key] * t.Hkv + h) * t.D);
    const char* v = reinterpret_cast<const char*>(t.vb + (t.idx[key] * t.Hkv + h) * t.Dv);
    for (int64_t b = 0; b < t.D * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(k + b, _MM_HINT_T0);
    for (int64_t b = 0; b < t.Dv * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(v + b, _MM_HINT_T0);
  }
}

// ---- bf16: products on key pairs (vdpbf16ps) -----------------------------------------------------------
//
// A packed key block: kt[j][key] = the 32-bit pair (K[key][2j], K[key][2j + 1]); vt[t][d] =
// (V[k0 + 2t][d], V[k0 + 2t + 1][d]). vdpbf16ps has a latency of several cycles, so R = 2 rows keep
// 2 x kKeyBlock/16 (q . k) and 2 x Dv/16 (p . V) independent chains in flight. Every accumulator is picked
// by compile-time indices only: picking q . k's by the pair index's parity (two chains a vector) put them
// on the stack, and the kernel ran ~160 GFLOP/s against ~250 in registers (2-core Zen 4, 14 heads over 2
// KV heads, 64-1024 queries over up to 1,088 keys). Four rows spilled (~230) in the first form of this code;
// in this one (RADIXLM_BF16_ROWS=3 or 4) they measured within the host's noise of two. Of what is left,
// exp16 is ~15% and packing ~8%.
struct Bf16Pool {
  static constexpr int64_t kKeys = kKeyBlock;  // keys a packed block
  static constexpr int kVecs = kKeys / 16;     // score vectors a row and block
  static constexpr int kRows = RADIXLM_BF16_ROWS;  // query rows a call of the row kernel
  using Elem = uint16_t;
  using Lane = uint32_t;  // two bf16 values
  static constexpr int64_t kPerLane = 2;
  using Probs = uint32_t[kKeys / 2];  // one row's probabilities, key pairs in order

  static const Lane* lanes(const Elem* p) { return reinterpret_cast<const Lane*>(p); }

  // Keys past `keys` are zeros (their scores are masked off anyway).
  RADIXLM_AVX512 static void pack(const SpanTask<Elem>& t, int64_t h, int64_t k0, int64_t keys, Lane* kt, Lane* vt) {
    const int64_t pairs = t.D / 2;
    for (int64_t c = 0; c < kKeys; ++c) {
      const int64_t key = k0 + c;
      if (key < keys) {
        const Lane* row = lanes(t.kb + (t.idx[key] * t.Hkv + h) * t.D);
        for (int64_t j = 0; j < pairs; ++j) kt[j * kKeys + c] = row[j];
      } else {
        for (int64_t j = 0; j < pairs; ++j) kt[j * kKeys + c] = 0;
      }
    }
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t tp = 0; tp < kKeys / 2; ++tp) {
      const int64_t a = k0 + 2 * tp, b = a + 1;
      const uint16_t* va = a < keys ? t.vb + (t.idx[a] * t.Hkv + h) * t.Dv : nullptr;
      const uint16_t* vb2 = b < keys ? t.vb + (t.idx[b] * t.Hkv + h) * t.Dv : nullptr;
      for (int64_t d = 0; d < t.Dv; d += 16) {
        const __m512i lo = va ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(va + d))) : zero;
        const __m512i hi = vb2 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vb2 + d))) : zero;
        _mm512_storeu_si512(vt + tp * t.Dv + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
  }

  template <int R>
  RADIXLM_AVX512_BF16 RADIXLM_INLINE static void scores(int64_t D, const Lane* kt, const Lane* const (&qp)[R],
                                                        __m512 (&s)[R][kVecs]) {
    for (int64_t j = 0; j < D / 2; ++j) {
      __m512bh kv[kVecs];
      for (int c = 0; c < kVecs; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(kt + j * kKeys + 16 * c);
      for (int r = 0; r < R; ++r) {
        const __m512bh qj = (__m512bh)_mm512_set1_epi32(static_cast<int>(qp[r][j]));
        for (int c = 0; c < kVecs; ++c) s[r][c] = _mm512_dpbf16_ps(s[r][c], kv[c], qj);
      }
    }
  }

  // Probabilities of keys 32c'..+15 (p0) and +16..+31 (p1): the key pairs in order.
  RADIXLM_AVX512_BF16 RADIXLM_INLINE static void store_probs(Probs& p, int c, __m512 p0, __m512 p1) {
    _mm512_store_si512(p + 8 * c, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
  }

  // Lanes of p . V to run for a row that sees `live` keys of the block.
  static int64_t live_lanes(int64_t live) { return std::min<int64_t>(kKeys / 2, (live + 1) / 2); }

  template <int R, int DC>
  RADIXLM_AVX512_BF16 RADIXLM_INLINE static void values(int64_t Dv, const Lane* vt, const Probs (&p)[R], int64_t n,
                                                        __m512 (&av)[R][DC]) {
    for (int64_t tp = 0; tp < n; ++tp) {
      __m512bh pr[R];
      for (int r = 0; r < R; ++r) pr[r] = (__m512bh)_mm512_set1_epi32(static_cast<int>(p[r][tp]));
      for (int c = 0; c < DC; ++c) {
        const __m512bh v = (__m512bh)_mm512_loadu_si512(vt + tp * Dv + 16 * c);
        for (int r = 0; r < R; ++r) av[r][c] = _mm512_dpbf16_ps(av[r][c], v, pr[r]);
      }
    }
  }

  RADIXLM_AVX512_BF16 static void store_row(Elem* o, const float* a, float inv, int64_t Dv) {
    for (int64_t d = 0; d < Dv; d += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(a + d), _mm512_set1_ps(inv))));
  }
};

// ---- float32: products on single keys (FMA) ------------------------------------------------------------
//
// A packed key block: kt[j][key] = K[key][j]; vt[t][d] = V[k0 + t][d]. Blocks of 32 keys and 4 rows a
// call: 8 independent FMA chains for q . k and 4 x Dv/16 for p . V, each loaded vector used by 4 rows, and
// a packed block (16 KB at 64-dim heads) that stays in L1 next to the accumulators. Measured on the 2-core
// Zen 4 (14 heads over 2 KV heads, 64-dim; GFLOP/s for 1,024 queries from 0 / 64 over 1,024 cached keys):
// 64 keys x 2 rows 101 / 108, 64 x 4 117 / 120, 32 x 4 124 / 145, 32 x 6 124 / 129, 32 x 8 109 / 96;
// torch's SDPA on the gathered rows 92 / 86.
struct F32Pool {
  static constexpr int64_t kKeys = RADIXLM_F32_KEY_BLOCK;  // a multiple of 32
  static constexpr int kVecs = kKeys / 16;
  static constexpr int kRows = RADIXLM_F32_ROWS;
  using Elem = float;
  using Lane = float;
  static constexpr int64_t kPerLane = 1;
  using Probs = float[kKeys];

  static const Lane* lanes(const Elem* p) { return p; }

  // Keys past `keys` are zeros (their scores are masked off anyway). Packing was half of a shared-prefix
  // decode's attention time (8 groups of 8 members over 1,024 shared keys on scattered slots, 14 heads
  // over 2 KV heads: 3.1 ms, 1.55 without it): a scalar transpose (a load and a store a value) and DRAM
  // reads of rows the prefetchers cannot predict. Now K goes in by 16 x 16 tiles transposed in registers,
  // and the next block's rows are asked for first: 2.8-3.2 ms on the same call.
  RADIXLM_AVX512 static void pack(const SpanTask<Elem>& t, int64_t h, int64_t k0, int64_t keys, Lane* kt, Lane* vt) {
    prefetch_keys(t, h, k0 + kKeys, std::min(keys, k0 + 2 * kKeys));  // the next block's
    for (int64_t c0 = 0; c0 < kKeys; c0 += 16) {
      const float* rows[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t key = k0 + c0 + i;
        rows[i] = key < keys ? t.kb + (t.idx[key] * t.Hkv + h) * t.D : nullptr;
      }
      for (int64_t j0 = 0; j0 < t.D; j0 += 16) {
        const int64_t dims = std::min<int64_t>(16, t.D - j0);
        const __mmask16 take = static_cast<__mmask16>((1u << dims) - 1);
        __m512 tile[16];
        for (int i = 0; i < 16; ++i) tile[i] = rows[i] ? _mm512_maskz_loadu_ps(take, rows[i] + j0) : _mm512_setzero_ps();
        transpose16(tile);
        for (int64_t j = 0; j < dims; ++j) _mm512_storeu_ps(kt + (j0 + j) * kKeys + c0, tile[j]);
      }
    }
    for (int64_t c = 0; c < kKeys; ++c) {
      const int64_t key = k0 + c;
      if (key < keys)
        std::copy_n(t.vb + (t.idx[key] * t.Hkv + h) * t.Dv, t.Dv, vt + c * t.Dv);
      else
        std::fill_n(vt + c * t.Dv, t.Dv, 0.f);
    }
  }

  // r[i][j] -> r[j][i] for a 16 x 16 tile: pairs within 128-bit lanes, then quads, then the 128-bit lanes
  // (4 x 16 shuffles).
  RADIXLM_AVX512 RADIXLM_INLINE static void transpose16(__m512 (&r)[16]) {
    __m512 a[16], b[16];
    for (int i = 0; i < 8; ++i) {  // a[2i] lane L: r2i[4L], r2i+1[4L], r2i[4L+1], r2i+1[4L+1]; a[2i+1]: 4L+2, 4L+3
      a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  // b[4i + k] lane L: column 4L + k of rows 4i .. 4i + 3
      b[4 * i] = _mm512_shuffle_ps(a[4 * i], a[4 * i + 2], 0x44);
      b[4 * i + 1] = _mm512_shuffle_ps(a[4 * i], a[4 * i + 2], 0xEE);
      b[4 * i + 2] = _mm512_shuffle_ps(a[4 * i + 1], a[4 * i + 3], 0x44);
      b[4 * i + 3] = _mm512_shuffle_ps(a[4 * i + 1], a[4 * i + 3], 0xEE);
    }
    for (int k = 0; k < 4; ++k) {  // column 4L + k: lane m of it is lane L of b[4m + k]
      const __m512 u0 = _mm512_shuffle_f32x4(b[k], b[4 + k], 0x44), u1 = _mm512_shuffle_f32x4(b[k], b[4 + k], 0xEE);
      const __m512 u2 = _mm512_shuffle_f32x4(b[8 + k], b[12 + k], 0x44);
      const __m512 u3 = _mm512_shuffle_f32x4(b[8 + k], b[12 + k], 0xEE);
      r[k] = _mm512_shuffle_f32x4(u0, u2, 0x88);
      r[4 + k] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
      r[8 + k] = _mm512_shuffle_f32x4(u1, u3, 0x88);
      r[12 + k] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
    }
  }

  template <int R>
  RADIXLM_AVX512 RADIXLM_INLINE static void scores(int64_t D, const Lane* kt, const Lane* const (&qp)[R],
                                                   __m512 (&s)[R][kVecs]) {
    for (int64_t j = 0; j < D; ++j) {
      __m512 kv[kVecs];
      for (int c = 0; c < kVecs; ++c) kv[c] = _mm512_loadu_ps(kt + j * kKeys + 16 * c);
      for (int r = 0; r < R; ++r) {
        const __m512 qj = _mm512_set1_ps(qp[r][j]);
        for (int c = 0; c < kVecs; ++c) s[r][c] = _mm512_fmadd_ps(kv[c], qj, s[r][c]);
      }
    }
  }

  RADIXLM_AVX512 RADIXLM_INLINE static void store_probs(Probs& p, int c, __m512 p0, __m512 p1) {
    _mm512_store_ps(p + 16 * c, p0);
    _mm512_store_ps(p + 16 * (c + 1), p1);
  }

  static int64_t live_lanes(int64_t live) { return std::min<int64_t>(kKeys, live); }

  template <int R, int DC>
  RADIXLM_AVX512 RADIXLM_INLINE static void values(int64_t Dv, const Lane* vt, const Probs (&p)[R], int64_t n,
                                                   __m512 (&av)[R][DC]) {
    for (int64_t t = 0; t < n; ++t) {
      __m512 pr[R];
      for (int r = 0; r < R; ++r) pr[r] = _mm512_set1_ps(p[r][t]);
      for (int c = 0; c < DC; ++c) {
        const __m512 v = _mm512_loadu_ps(vt + t * Dv + 16 * c);
        for (int r = 0; r < R; ++r) av[r][c] = _mm512_fmadd_ps(v, pr[r], av[r][c]);
      }
    }
  }

  RADIXLM_AVX512 static void store_row(Elem* o, const float* a, float inv, int64_t Dv) {
    for (int64_t d = 0; d < Dv; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(a + d), _mm512_set1_ps(inv)));
  }
};

// ---- the online softmax, shared by both -----------------------------------------------------------------
//
// R query rows of one key block (each at least one key live, row r sees keys < seen[r]): their scores, the
// online softmax update, p . V. Compiled with AVX512_BF16 for both pools (the attributes of what it inlines
// must be a subset of its own); the float32 instantiation holds no bf16 instruction, so it runs on AVX-512
// CPUs without them.
template <typename P, int R, int DC>
RADIXLM_AVX512_BF16 RADIXLM_INLINE void span_rows(const SpanTask<typename P::Elem>& t, const typename P::Lane* kt,
                                                   const typename P::Lane* vt, int64_t k0, const int64_t (&row)[R],
                                                   const int64_t (&seen)[R], const typename P::Lane* const (&qp)[R],
                                                   RowState st) {
  __m512 s[R][P::kVecs];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < P::kVecs; ++c) s[r][c] = _mm512_setzero_ps();
  P::template scores<R>(t.D, kt, qp, s);
  const __m512 scale = _mm512_set1_ps(t.scale);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  alignas(64) typename P::Probs probs[R];
  __m512 cv[R];
  int64_t live = 0;
  for (int r = 0; r < R; ++r) {
    const int64_t x = row[r];
    const __m512i limit = _mm512_set1_epi32(static_cast<int>(std::min<int64_t>(seen[r] - k0, P::kKeys)));
    __m512 sc[P::kVecs];
    __mmask16 ok[P::kVecs];
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int c = 0; c < P::kVecs; ++c) {
      ok[c] = _mm512_cmplt_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32(16 * c)), limit);
      sc[c] = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), ok[c], s[r][c], scale);
      mx = _mm512_max_ps(mx, sc[c]);
    }
    const float m_new = std::max(st.m[x], _mm512_reduce_max_ps(mx));
    const float corr = std::exp(st.m[x] - m_new);  // 0 on the first block (m = -inf)
    const __m512 mv = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < P::kVecs; c += 2) {
      const __m512 p0 = _mm512_maskz_mov_ps(ok[c], exp16(_mm512_sub_ps(sc[c], mv)));
      const __m512 p1 = _mm512_maskz_mov_ps(ok[c + 1], exp16(_mm512_sub_ps(sc[c + 1], mv)));
      sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
      P::store_probs(probs[r], c, p0, p1);
    }
    st.l[x] = st.l[x] * corr + _mm512_reduce_add_ps(sum);
    st.m[x] = m_new;
    cv[r] = _mm512_set1_ps(corr);
    live = std::max<int64_t>(live, P::live_lanes(seen[r] - k0));
  }
  __m512 av[R][DC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DC; ++c) av[r][c] = _mm512_mul_ps(_mm512_loadu_ps(st.acc + row[r] * t.Dv + 16 * c), cv[r]);
  P::template values<R, DC>(t.Dv, vt, probs, live, av);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DC; ++c) _mm512_storeu_ps(st.acc + row[r] * t.Dv + 16 * c, av[r][c]);
}

// A worker's packed key block and accumulators, sized once per call.
template <typename P>
struct Scratch {
  std::vector<typename P::Lane> kt, vt;
  std::vector<float> acc;
  Scratch(int64_t D, int64_t Dv, int64_t rows)
      : kt(D / P::kPerLane * P::kKeys), vt(P::kKeys / P::kPerLane * Dv), acc(rows * Dv) {}
};

// Runs body(Dv / 16 as a compile-time DC): the p . V accumulators in registers, one zmm per 16 dims.
template <typename Body>
void with_value_vecs(int64_t Dv, Body body) {
  switch (Dv / 16) {
    case 1: body(std::integral_constant<int, 1>{}); break;
    case 2: body(std::integral_constant<int, 2>{}); break;
    case 3: body(std::integral_constant<int, 3>{}); break;
    case 4: body(std::integral_constant<int, 4>{}); break;
    case 5: body(std::integral_constant<int, 5>{}); break;
    case 6: body(std::integral_constant<int, 6>{}); break;
    case 7: body(std::integral_constant<int, 7>{}); break;
    case 8: body(std::integral_constant<int, 8>{}); break;
    default: body(std::integral_constant<int, 16>{}); break;
  }
}

// Runs worker() on torch's intra-op threads (at most `tasks` of them; inline inside a parallel region).
template <typename Worker>
void run_workers(int64_t tasks, Worker worker) {
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), tasks);
  if (workers <= 1 || at::in_parallel_region())
    worker();
  else
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(); });
}

// ---- prompt spans --------------------------------------------------------------------------------------

// Rows [r, rows) of a task's key block in groups of R while R fit; returns the first row left.
template <typename P, int R, int DC>
RADIXLM_AVX512_BF16 RADIXLM_INLINE int64_t span_row_group(const SpanTask<typename P::Elem>& t,
                                                          const typename P::Lane* kt, const typename P::Lane* vt,
                                                          int64_t k0, int64_t i0, int64_t h, int64_t r, int64_t rows,
                                                          RowState st) {
  const int64_t G = t.H / t.Hkv;
  for (; r + R <= rows; r += R) {
    int64_t row[R], seen[R];
    const typename P::Lane* qp[R];
    for (int e = 0; e < R; ++e) {
      row[e] = r + e;
      seen[e] = t.prefix + i0 + (r + e) / G + 1;
      qp[e] = P::lanes(t.q + ((i0 + (r + e) / G) * t.H + h * G + (r + e) % G) * t.D);
    }
    span_rows<P, R, DC>(t, kt, vt, k0, row, seen, qp, st);
  }
  return r;
}

template <typename P, int DC>
RADIXLM_AVX512_BF16 void span_attention_task(const SpanTask<typename P::Elem>& t, int64_t h, int64_t i0,
                                             Scratch<P>& w) {
  const int64_t G = t.H / t.Hkv, i1 = std::min(t.n, i0 + kQueryBlock), rows = (i1 - i0) * G;
  const int64_t keys = t.prefix + i1;  // the block's last query sees `keys`
  float m[kQueryBlock * 16], l[kQueryBlock * 16];  // G <= 16 heads per KV head (checked by the caller)
  std::fill(m, m + rows, -INFINITY);
  std::fill(l, l + rows, 0.f);
  std::fill(w.acc.begin(), w.acc.begin() + rows * t.Dv, 0.f);
  const RowState st{m, l, w.acc.data()};
  for (int64_t k0 = 0; k0 < keys; k0 += P::kKeys) {
    P::pack(t, h, k0, keys, w.kt.data(), w.vt.data());
    int64_t r = 0;
    for (; r < rows && t.prefix + i0 + r / G + 1 <= k0; ++r) {  // rows that see no key of this block come first
    }
    r = span_row_group<P, P::kRows, DC>(t, w.kt.data(), w.vt.data(), k0, i0, h, r, rows, st);
    if constexpr (P::kRows > 2) r = span_row_group<P, 2, DC>(t, w.kt.data(), w.vt.data(), k0, i0, h, r, rows, st);
    span_row_group<P, 1, DC>(t, w.kt.data(), w.vt.data(), k0, i0, h, r, rows, st);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r / G, hq = h * G + r % G;
    P::store_row(t.out + (i * t.H + hq) * t.Dv, w.acc.data() + r * t.Dv, 1.f / l[r], t.Dv);
  }
}

template <typename P>
void run_span_attention(const SpanTask<typename P::Elem>& task) {
  const int64_t G = task.H / task.Hkv;
  const int64_t qblocks = (task.n + kQueryBlock - 1) / kQueryBlock, tasks = qblocks * task.Hkv;
  std::atomic<int64_t> next{0};
  run_workers(tasks, [&]() {
    Scratch<P> w(task.D, task.Dv, kQueryBlock * G);
    // Latest query blocks first: they see the most keys, so the short ones fill in at the end.
    for (int64_t c = next.fetch_add(1); c < tasks; c = next.fetch_add(1)) {
      const int64_t h = c % task.Hkv, i0 = (qblocks - 1 - c / task.Hkv) * kQueryBlock;
      with_value_vecs(task.Dv, [&](auto dc) { span_attention_task<P, decltype(dc)::value>(task, h, i0, w); });
    }
  });
}

// The checks both ops make of q and the pool; returns whether the pool is float32 (else bf16).
bool check_flash_inputs(const char* op, const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf) {
  TORCH_CHECK(q.device().is_cpu() && k_buf.device().is_cpu() && v_buf.device().is_cpu(), op, ": CPU tensors only");
  const auto dt = q.scalar_type();
  TORCH_CHECK((dt == at::kBFloat16 || dt == at::kFloat) && k_buf.scalar_type() == dt && v_buf.scalar_type() == dt, op,
              ": q, k and v all bf16 or all float32");
  const bool f32 = dt == at::kFloat;
  TORCH_CHECK(current_isa() >= (f32 ? kAvx512 : kAvx512Bf16), op, ": this CPU (or the pinned ISA level) has no ",
              f32 ? "AVX-512" : "AVX512_BF16");
  TORCH_CHECK(q.dim() == 3 && k_buf.dim() == 3 && v_buf.dim() == 3 && q.is_contiguous() && k_buf.is_contiguous() &&
                  v_buf.is_contiguous(),
              op, ": contiguous q [n, H, D], k/v buffers [N, Hkv, D]");
  const int64_t H = q.size(1), D = q.size(2), Hkv = k_buf.size(1), Dv = v_buf.size(2);
  TORCH_CHECK(k_buf.size(2) == D && v_buf.size(1) == Hkv && H % Hkv == 0 && H / Hkv <= 16, op, ": head shapes");
  TORCH_CHECK(D % 2 == 0 && Dv % 16 == 0 && (Dv <= 128 || Dv == 256), op,
              ": head dims must be even (q, k) and a multiple of 16 up to 128, or 256 (v)");
  return f32;
}

template <typename T>
SpanTask<T> task_of(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf, const int64_t* idx,
                    at::Tensor& out, int64_t prefix, double scale) {
  return SpanTask<T>{reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k_buf.data_ptr()),
                     reinterpret_cast<const T*>(v_buf.data_ptr()), idx, reinterpret_cast<T*>(out.data_ptr()),
                     q.size(0), prefix, q.size(1), k_buf.size(1), q.size(2), v_buf.size(2),
                     static_cast<float>(scale)};
}

at::Tensor span_attention(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf, const at::Tensor& kv_idx,
                          int64_t prefix, double scale) {
  const bool f32 = check_flash_inputs("span_attention", q, k_buf, v_buf);
  const int64_t n = q.size(0);
  const at::Tensor idx = kv_idx.to(at::kLong).contiguous();
  TORCH_CHECK(idx.dim() == 1 && idx.numel() == prefix + n && prefix >= 0, "span_attention: kv_idx must hold prefix + n = ",
              prefix + n, " slots, got ", idx.numel());
  at::Tensor out = at::empty({n, q.size(1), v_buf.size(2)}, q.options());
  if (n == 0) return out;
  const int64_t* ip = idx.data_ptr<int64_t>();
  if (f32)
    run_span_attention<F32Pool>(task_of<float>(q, k_buf, v_buf, ip, out, prefix, scale));
  else
    run_span_attention<Bf16Pool>(task_of<uint16_t>(q, k_buf, v_buf, ip, out, prefix, scale));
  return out;
}

// ---- decodes that share a prefix -----------------------------------------------------------------------
//
// One shared group (attention_backends/shared_prefix.py): members whose histories are one prefix of P
// slots, kv_idx[g, :P], followed by each member's own slots, laid end to end after it (member j's start
// after those of members 0 .. j-1). Each member's query (its last token) attends the prefix and its own
// slots only. The prefix is packed once per key block for every member's G heads (rows = members x G), so
// its keys are read once per group, and no member does arithmetic on another member's keys (the padded
// SDPA form scored every row against every key of the group, masked or not). The same online softmax and
// row kernel as prompt spans (prefix blocks first, then the member's own blocks), so a member's result
// depends on its history and on where its group's prefix ends.
constexpr int64_t kSharedMaxRows = 256;

template <typename T>
struct SharedGroup {
  const T* q;          // packed queries [T, H, D]
  const int64_t* tok;  // [Kmax] each member's query token
  const int64_t* idx;  // [Lmax] the group's slots: prefix, then every member's own
  const int64_t* own;  // [Kmax] own slots per member (0: padding)
  T* out;              // [Kmax, H, Dv] this group's rows of the result
  int64_t prefix, kmax;
};

// Task rows from r (members from m0, G heads each) in groups of R while R fit before r1, against one
// packed block of a key list of `keys`; returns the first row left.
template <typename P, int R, int DC>
RADIXLM_AVX512_BF16 RADIXLM_INLINE int64_t shared_row_group(const SpanTask<typename P::Elem>& base,
                                                            const SharedGroup<typename P::Elem>& sg, int64_t h,
                                                            int64_t m0, const typename P::Lane* kt,
                                                            const typename P::Lane* vt, RowState st, int64_t k0,
                                                            int64_t keys, int64_t r, int64_t r1) {
  const int64_t G = base.H / base.Hkv;
  for (; r + R <= r1; r += R) {
    int64_t row[R], seen[R];
    const typename P::Lane* qp[R];
    for (int e = 0; e < R; ++e) {
      row[e] = r + e;
      seen[e] = keys;
      qp[e] = P::lanes(sg.q + (sg.tok[m0 + (r + e) / G] * base.H + h * G + (r + e) % G) * base.D);
    }
    span_rows<P, R, DC>(base, kt, vt, k0, row, seen, qp, st);
  }
  return r;
}

// Task rows [r0, r1) against one packed block.
template <typename P, int DC>
RADIXLM_AVX512_BF16 void shared_block_rows(const SpanTask<typename P::Elem>& base, const SharedGroup<typename P::Elem>& sg,
                                           int64_t h, int64_t m0, const typename P::Lane* kt,
                                           const typename P::Lane* vt, RowState st, int64_t k0, int64_t keys,
                                           int64_t r0, int64_t r1) {
  int64_t r = shared_row_group<P, P::kRows, DC>(base, sg, h, m0, kt, vt, st, k0, keys, r0, r1);
  if constexpr (P::kRows > 2) r = shared_row_group<P, 2, DC>(base, sg, h, m0, kt, vt, st, k0, keys, r, r1);
  shared_row_group<P, 1, DC>(base, sg, h, m0, kt, vt, st, k0, keys, r, r1);
}

template <typename P, int DC>
RADIXLM_AVX512_BF16 void shared_group_task(const SpanTask<typename P::Elem>& base, const SharedGroup<typename P::Elem>& sg,
                                           int64_t h, int64_t m0, int64_t m1, Scratch<P>& w) {
  const int64_t G = base.H / base.Hkv, rows = (m1 - m0) * G;
  float m[kSharedMaxRows], l[kSharedMaxRows];
  std::fill(m, m + rows, -INFINITY);
  std::fill(l, l + rows, 0.f);
  std::fill(w.acc.begin(), w.acc.begin() + rows * base.Dv, 0.f);
  const RowState st{m, l, w.acc.data()};
  auto block_rows = [&](int64_t k0, int64_t keys, int64_t r0, int64_t r1) {
    shared_block_rows<P, DC>(base, sg, h, m0, w.kt.data(), w.vt.data(), st, k0, keys, r0, r1);
  };
  SpanTask<typename P::Elem> keys_of = base;
  keys_of.idx = sg.idx;
  for (int64_t k0 = 0; k0 < sg.prefix; k0 += P::kKeys) {
    P::pack(keys_of, h, k0, sg.prefix, w.kt.data(), w.vt.data());
    block_rows(k0, sg.prefix, 0, rows);
  }
  int64_t start = sg.prefix;
  for (int64_t j = 0; j < m0; ++j) start += sg.own[j];
  for (int64_t j = m0; j < m1; ++j) {
    keys_of.idx = sg.idx + start;
    for (int64_t k0 = 0; k0 < sg.own[j]; k0 += P::kKeys) {
      P::pack(keys_of, h, k0, sg.own[j], w.kt.data(), w.vt.data());
      block_rows(k0, sg.own[j], (j - m0) * G, (j - m0 + 1) * G);
    }
    start += sg.own[j];
  }
  for (int64_t r = 0; r < rows; ++r)
    P::store_row(sg.out + ((m0 + r / G) * base.H + h * G + r % G) * base.Dv, w.acc.data() + r * base.Dv, 1.f / l[r],
                 base.Dv);
}

struct SharedTask {
  int64_t g, h, m0, m1;
};

struct SharedIndex {
  const int64_t *tok, *idx, *pre, *own;
  int64_t Kmax, Lmax;
};

template <typename P>
void run_shared_decode(const SpanTask<typename P::Elem>& base, const SharedIndex& ix, const std::vector<SharedTask>& tasks,
                       typename P::Elem* out) {
  const int64_t per_group = ix.Kmax * base.H * base.Dv;
  std::atomic<int64_t> next{0};
  run_workers(static_cast<int64_t>(tasks.size()), [&]() {
    Scratch<P> w(base.D, base.Dv, kSharedMaxRows);
    for (int64_t c = next.fetch_add(1); c < static_cast<int64_t>(tasks.size()); c = next.fetch_add(1)) {
      const SharedTask& k = tasks[c];
      const SharedGroup<typename P::Elem> sg{base.q, ix.tok + k.g * ix.Kmax, ix.idx + k.g * ix.Lmax,
                                             ix.own + k.g * ix.Kmax, out + k.g * per_group, ix.pre[k.g], ix.Kmax};
      with_value_vecs(base.Dv, [&](auto dc) { shared_group_task<P, decltype(dc)::value>(base, sg, k.h, k.m0, k.m1, w); });
    }
  });
}

// Every index checked here, once: the kernel trusts them.
void check_shared_index(const SharedIndex& ix, int64_t Gn, int64_t T, int64_t slots) {
  for (int64_t g = 0; g < Gn; ++g) {
    int64_t keys = ix.pre[g];
    TORCH_CHECK(ix.pre[g] > 0, "shared_decode_attention: prefix_lens[", g, "] must be positive");
    for (int64_t j = 0; j < ix.Kmax; ++j) {
      const int64_t own = ix.own[g * ix.Kmax + j], tok = ix.tok[g * ix.Kmax + j];
      TORCH_CHECK(own >= 0 && (own == 0 || (tok >= 0 && tok < T)), "shared_decode_attention: member ", j, " of group ", g,
                  ": bad own length or query token");
      keys += own;
    }
    TORCH_CHECK(keys <= ix.Lmax, "shared_decode_attention: group ", g, " holds ", keys, " keys, kv_idx has ", ix.Lmax);
    for (int64_t c = 0; c < keys; ++c)
      TORCH_CHECK(ix.idx[g * ix.Lmax + c] >= 0 && ix.idx[g * ix.Lmax + c] < slots,
                  "shared_decode_attention: slot out of range");
  }
}

// q [T, H, D] (packed queries), token_idx / own_lens [Gn, Kmax], kv_idx [Gn, Lmax], prefix_lens [Gn] ->
// [Gn * Kmax, H, Dv]; a padding member (own_lens 0) gets zeros.
at::Tensor shared_decode_attention(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf,
                                   const at::Tensor& token_idx, const at::Tensor& kv_idx,
                                   const at::Tensor& prefix_lens, const at::Tensor& own_lens, double scale) {
  const bool f32 = check_flash_inputs("shared_decode_attention", q, k_buf, v_buf);
  const int64_t T = q.size(0), H = q.size(1), Hkv = k_buf.size(1), Dv = v_buf.size(2), G = H / Hkv;
  const at::Tensor tok = token_idx.to(at::kLong).contiguous(), idx = kv_idx.to(at::kLong).contiguous();
  const at::Tensor pre = prefix_lens.to(at::kLong).contiguous(), own = own_lens.to(at::kLong).contiguous();
  TORCH_CHECK(tok.dim() == 2 && own.sizes() == tok.sizes() && idx.dim() == 2 && idx.size(0) == tok.size(0) &&
                  pre.numel() == tok.size(0),
              "shared_decode_attention: token_idx / own_lens [Gn, Kmax], kv_idx [Gn, Lmax], prefix_lens [Gn]");
  const int64_t Gn = tok.size(0);
  const SharedIndex ix{tok.data_ptr<int64_t>(), idx.data_ptr<int64_t>(), pre.data_ptr<int64_t>(),
                       own.data_ptr<int64_t>(), tok.size(1), idx.size(1)};
  check_shared_index(ix, Gn, T, k_buf.size(0));
  at::Tensor out = at::zeros({Gn * ix.Kmax, H, Dv}, q.options());
  if (Gn == 0 || T == 0) return out;
  // Tasks: (group, KV head, a chunk of members whose rows fit the state arrays).
  const int64_t chunk = kSharedMaxRows / G;
  std::vector<SharedTask> tasks;
  for (int64_t g = 0; g < Gn; ++g) {
    int64_t members = 0;
    while (members < ix.Kmax && ix.own[g * ix.Kmax + members] > 0) ++members;
    for (int64_t m0 = 0; m0 < members; m0 += chunk)
      for (int64_t h = 0; h < Hkv; ++h) tasks.push_back({g, h, m0, std::min(members, m0 + chunk)});
  }
  // The task's q and pool; its idx and out are each group's (SharedGroup).
  if (f32) {
    const SpanTask<float> base = task_of<float>(q, k_buf, v_buf, nullptr, out, 0, scale);
    run_shared_decode<F32Pool>(base, ix, tasks, reinterpret_cast<float*>(out.data_ptr()));
  } else {
    const SpanTask<uint16_t> base = task_of<uint16_t>(q, k_buf, v_buf, nullptr, out, 0, scale);
    run_shared_decode<Bf16Pool>(base, ix, tasks, reinterpret_cast<uint16_t*>(out.data_ptr()));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(radixlm_cpu, m) {
  m.def("span_attention(Tensor q, Tensor k_buf, Tensor v_buf, Tensor kv_idx, int prefix, float scale) -> Tensor");
  m.def(
      "shared_decode_attention(Tensor q, Tensor k_buf, Tensor v_buf, Tensor token_idx, Tensor kv_idx, Tensor prefix_lens, "
      "Tensor own_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(radixlm_cpu, CPU, m) {
  m.impl("span_attention", &span_attention);
  m.impl("shared_decode_attention", &shared_decode_attention);
}
