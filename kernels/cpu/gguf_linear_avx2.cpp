// AVX2 + FMA + F16C GGUF kernels: the structure of gguf_linear_avx512.cpp on 8 fp32 lanes. AVX2's
// vpermps indexes only 8 entries, so codes are converted to fp32 and scaled (the reference's
// operations in its order) instead of looked up. Up to 4 rows of x per pass over a weight row.
#include <cstring>

#include "gguf_linear.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TC_HAVE_X86 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#include <immintrin.h>
#endif

namespace tc_kernels {

#ifdef TC_HAVE_X86
namespace {

inline float f16_at(const uint8_t* b) {
  uint16_t h;
  std::memcpy(&h, b, 2);
  return _cvtsh_ss(h);
}

inline __m256i u8x8(const uint8_t* b) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b))); }
inline __m256 cvt(__m256i v) { return _mm256_cvtepi32_ps(v); }

// Bit 4 of the 8 codes j0..j0+7 of a Q5_0/Q5_1 block: ((qh >> j) & 1) << 4.
inline __m256i qh_bits(uint32_t qh, int j0) {
  const __m256i lanes = _mm256_add_epi32(_mm256_set1_epi32(j0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i bit = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(qh)), lanes), _mm256_set1_epi32(1));
  return _mm256_slli_epi32(bit, 4);
}

template <class F>
inline void decode32(int qtype, const uint8_t* b, F&& f) {
  const __m256i low4 = _mm256_set1_epi32(15);
  const __m256 vd = _mm256_set1_ps(f16_at(b));
  if (qtype == kGGMLQ8_0) {
    for (int j = 0; j < 32; j += 8) {
      const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + j)));
      f(j, _mm256_mul_ps(cvt(q), vd));
    }
    return;
  }
  const bool has_m = qtype == kGGMLQ4_1 || qtype == kGGMLQ5_1;
  const bool five = qtype == kGGMLQ5_0 || qtype == kGGMLQ5_1;
  const __m256 vm = _mm256_set1_ps(has_m ? f16_at(b + 2) : 0.0f);
  uint32_t qh = 0;
  if (five) std::memcpy(&qh, b + (has_m ? 4 : 2), 4);
  const uint8_t* qs = b + 2 + (has_m ? 2 : 0) + (five ? 4 : 0);
  const __m256i off = _mm256_set1_epi32(qtype == kGGMLQ4_0 ? 8 : qtype == kGGMLQ5_0 ? 16 : 0);
  for (int j = 0; j < 16; j += 8) {
    const __m256i c = u8x8(qs + j);
    __m256i lo = _mm256_and_si256(c, low4), hi = _mm256_srli_epi32(c, 4);
    if (five) {
      lo = _mm256_or_si256(lo, qh_bits(qh, j));
      hi = _mm256_or_si256(hi, qh_bits(qh, j + 16));
    }
    if (has_m) {  // d * q + m
      f(j, _mm256_add_ps(_mm256_mul_ps(vd, cvt(lo)), vm));
      f(j + 16, _mm256_add_ps(_mm256_mul_ps(vd, cvt(hi)), vm));
    } else {  // d * (q - off)
      f(j, _mm256_mul_ps(vd, cvt(_mm256_sub_epi32(lo, off))));
      f(j + 16, _mm256_mul_ps(vd, cvt(_mm256_sub_epi32(hi, off))));
    }
  }
}

template <class F>
inline void decode_q45_k(bool five, const uint8_t* b, F&& f) {
  const __m256i low4 = _mm256_set1_epi32(15), one = _mm256_set1_epi32(1);
  const float d = f16_at(b), dmin = f16_at(b + 2);
  const uint8_t* qs = b + (five ? 48 : 16);
  for (int s = 0; s < 8; ++s) {
    int sc, mn;
    scale_min_k4(s, b + 4, &sc, &mn);
    const __m256 dl = _mm256_set1_ps(d * static_cast<float>(sc)), ml = _mm256_set1_ps(dmin * static_cast<float>(mn));
    const int g = s >> 1, shift = (s & 1) * 4;
    for (int l = 0; l < 32; l += 8) {
      __m256i q = _mm256_and_si256(_mm256_srli_epi32(u8x8(qs + 32 * g + l), shift), low4);
      if (five) {
        const __m256i h = _mm256_and_si256(_mm256_srli_epi32(u8x8(b + 16 + l), s), one);
        q = _mm256_or_si256(q, _mm256_slli_epi32(h, 4));
      }
      f(32 * s + l, _mm256_sub_ps(_mm256_mul_ps(dl, cvt(q)), ml));
    }
  }
}

template <class F>
inline void decode_q6_k(const uint8_t* b, F&& f) {
  const __m256i low4 = _mm256_set1_epi32(15), three = _mm256_set1_epi32(3), bias = _mm256_set1_epi32(32);
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16_at(b + 208);
  for (int h = 0; h < 2; ++h) {
    for (int l0 = 0; l0 < 32; l0 += 8) {
      const __m256i a = u8x8(b + 64 * h + l0), c = u8x8(b + 64 * h + 32 + l0), hb = u8x8(b + 128 + 32 * h + l0);
      for (int k = 0; k < 4; ++k) {
        const __m256i lo = k < 2 ? _mm256_and_si256(k ? c : a, low4) : _mm256_srli_epi32(k == 2 ? a : c, 4);
        const __m256i hi = _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hb, 2 * k), three), 4);
        const int j = 128 * h + 32 * k + l0;
        const __m256 q = cvt(_mm256_sub_epi32(_mm256_or_si256(lo, hi), bias));
        f(j, _mm256_mul_ps(_mm256_set1_ps(d * static_cast<float>(sc[j >> 4])), q));
      }
    }
  }
}

template <class F>
inline void decode(int qtype, const uint8_t* b, F&& f) {
  if (qtype == kGGMLQ4_K || qtype == kGGMLQ5_K) decode_q45_k(qtype == kGGMLQ5_K, b, f);
  else if (qtype == kGGMLQ6_K) decode_q6_k(b, f);
  else decode32(qtype, b, f);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

constexpr int64_t kPrefetchBytes = 1024;

// One row of x on the 32-weight types (see gguf_linear_avx512.cpp's gemv1_rows): the block type a
// compile-time constant, so decode32's branches fold away, and four accumulators, one per 8 weights.
template <int QT>
void gemv1_rows(const GGUFProblem& p, int64_t n0, int64_t n1) {
  const int64_t nblk = p.K / 32, bb = p.block_bytes;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.blocks + n * p.row_bytes;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t i = 0; i < nblk; ++i) {
      const uint8_t* b = row + i * bb;
      if ((i & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(b) + kPrefetchBytes, _MM_HINT_T0);
      const float* x = p.x + i * 32;
      decode32(QT, b, [&](int off, __m256 w) {
        acc[(off >> 3) & 3] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + off), acc[(off >> 3) & 3]);
      });
    }
    const float bias = p.bias ? p.bias[n] : 0.0f;
    p.out[n] = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))) + bias;
  }
}

inline bool gemv1(const GGUFProblem& p, int64_t n0, int64_t n1) {
  if (p.M != 1) return false;
  switch (p.qtype) {
    case kGGMLQ4_0: gemv1_rows<kGGMLQ4_0>(p, n0, n1); return true;
    case kGGMLQ4_1: gemv1_rows<kGGMLQ4_1>(p, n0, n1); return true;
    case kGGMLQ5_0: gemv1_rows<kGGMLQ5_0>(p, n0, n1); return true;
    case kGGMLQ5_1: gemv1_rows<kGGMLQ5_1>(p, n0, n1); return true;
    case kGGMLQ8_0: gemv1_rows<kGGMLQ8_0>(p, n0, n1); return true;
    default: return false;
  }
}

template <int MB>
void rows_mb(const GGUFProblem& p, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t nblk = p.K / p.block;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.blocks + n * p.row_bytes;
    __m256 acc[MB][2];
    for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nblk; ++i) {
      const float* x = p.x + m0 * p.K + i * p.block;
      const uint8_t* blk = row + i * p.block_bytes;
      _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchBytes, _MM_HINT_T0);  // see the AVX-512 file
      decode(p.qtype, blk, [&](int off, __m256 w) {
        const int a = (off >> 3) & 1;
        for (int m = 0; m < MB; ++m) acc[m][a] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * p.K + off), acc[m][a]);
      });
    }
    const float bias = p.bias ? p.bias[n] : 0.0f;
    for (int m = 0; m < MB; ++m) p.out[(m0 + m) * p.N + n] = hsum(_mm256_add_ps(acc[m][0], acc[m][1])) + bias;
  }
}

// Panel path: gguf_linear_avx512.cpp's structure on 8 lanes and 16 registers (NR * MR + NR + 1 <= 16).
constexpr int kPanelRows = 2;
constexpr int kPanelMR = 4;
constexpr int64_t kPanelK = 512;

template <int MR, int NR>
inline void panel_micro(const float* w, const float* x, int64_t ldx, int64_t kc, float* acc) {
  __m256 a[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) a[m][r] = _mm256_loadu_ps(acc + (m * NR + r) * 8);
  for (int64_t k = 0; k < kc; k += 8) {
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm256_loadu_ps(w + r * kPanelK + k);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < NR; ++r) a[m][r] = _mm256_fmadd_ps(wv[r], xv, a[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) _mm256_storeu_ps(acc + (m * NR + r) * 8, a[m][r]);
}

template <int NR>
void panel_rows(const GGUFProblem& p, int64_t n, float* w, float* acc) {
  const int64_t M = p.M, K = p.K;
  std::memset(acc, 0, sizeof(float) * static_cast<size_t>(M * NR * 8));
  for (int64_t k0 = 0; k0 < K; k0 += kPanelK) {
    const int64_t kc = K - k0 < kPanelK ? K - k0 : kPanelK;
    for (int r = 0; r < NR; ++r) {
      const uint8_t* blk = p.blocks + (n + r) * p.row_bytes + k0 / p.block * p.block_bytes;
      for (int64_t i = 0; i < kc / p.block; ++i) {
        float* dst = w + r * kPanelK + i * p.block;
        decode(p.qtype, blk + i * p.block_bytes, [&](int off, __m256 v) { _mm256_storeu_ps(dst + off, v); });
      }
    }
    for (int64_t m0 = 0; m0 < M; m0 += kPanelMR) {
      const float* x = p.x + m0 * K + k0;
      float* a = acc + m0 * NR * 8;
      switch (M - m0 < kPanelMR ? M - m0 : kPanelMR) {
        case 1: panel_micro<1, NR>(w, x, K, kc, a); break;
        case 2: panel_micro<2, NR>(w, x, K, kc, a); break;
        case 3: panel_micro<3, NR>(w, x, K, kc, a); break;
        default: panel_micro<kPanelMR, NR>(w, x, K, kc, a); break;
      }
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r)
      p.out[m * p.N + n + r] = hsum(_mm256_loadu_ps(acc + (m * NR + r) * 8)) + (p.bias ? p.bias[n + r] : 0.0f);
}

}  // namespace

void gguf_panel_avx2(const GGUFProblem& p, int64_t n0, int64_t n1, float* scratch) {
  float* w = scratch;  // kPanelRows x kPanelK, then the M x kPanelRows x 8 partial sums
  float* acc = scratch + kPanelRows * kPanelK;
  int64_t n = n0;
  for (; n + kPanelRows <= n1; n += kPanelRows) panel_rows<kPanelRows>(p, n, w, acc);
  for (; n < n1; ++n) panel_rows<1>(p, n, w, acc);
}

int64_t gguf_panel_scratch_avx2(int64_t M) { return kPanelRows * kPanelK + M * kPanelRows * 8; }

void gguf_rows_avx2(const GGUFProblem& p, int64_t n0, int64_t n1) {
  if (gemv1(p, n0, n1)) return;
  constexpr int64_t kRowBlock = 8;
  for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
    const int64_t ne = (nb + kRowBlock < n1) ? nb + kRowBlock : n1;
    for (int64_t m0 = 0; m0 < p.M;) {
      const int64_t left = p.M - m0;
      const int64_t mb = left >= 4 ? 4 : left;
      switch (mb) {
        case 1: rows_mb<1>(p, m0, nb, ne); break;
        case 2: rows_mb<2>(p, m0, nb, ne); break;
        case 3: rows_mb<3>(p, m0, nb, ne); break;
        default: rows_mb<4>(p, m0, nb, ne); break;
      }
      m0 += mb;
    }
  }
}

void gguf_dequant_avx2(const GGUFProblem& p, int64_t n0, int64_t n1, float* dst, int64_t ldd) {
  const int64_t nblk = p.K / p.block;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.blocks + n * p.row_bytes;
    for (int64_t i = 0; i < nblk; ++i) {
      float* w = dst + (n - n0) * ldd + i * p.block;
      decode(p.qtype, row + i * p.block_bytes, [&](int off, __m256 v) { _mm256_storeu_ps(w + off, v); });
    }
  }
}

#else

void gguf_rows_avx2(const GGUFProblem&, int64_t, int64_t) {}
void gguf_panel_avx2(const GGUFProblem&, int64_t, int64_t, float*) {}
int64_t gguf_panel_scratch_avx2(int64_t) { return 0; }
void gguf_dequant_avx2(const GGUFProblem&, int64_t, int64_t, float*, int64_t) {}

#endif

}  // namespace tc_kernels

#ifdef TC_HAVE_X86
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
