// AVX-512 GGUF kernels. One decoder per block type turns a block into 16-float vectors of
// consecutive weights and hands each to a visitor: the fused GEMV visitor multiplies it into up to
// 8 rows of x (two accumulators each, to halve the FMA dependency chains), the dequantizer and the
// panel path (below) store it.
//   4-bit types: a register holds the 16 possible weights of a (sub-)block and vpermps looks the
//                nibbles up (vpermps reads only the low 4 bits of each index);
//   5-bit types: two such tables, vpermt2ps with bit 4 of the index taken from qh;
//   Q8_0, Q6_K:  integer codes converted to fp32 and scaled.
#include <cstring>

#include "gguf_linear.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TC_HAVE_X86 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")
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

inline __m512i u8x16(const uint8_t* b) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b))); }

inline __m512 iota(float first) {
  return _mm512_add_ps(_mm512_set1_ps(first), _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

// Table of d * (c + first) for c = 0..15 (the reference's product of d and the float code).
inline __m512 table_d(float d, float first) { return _mm512_mul_ps(iota(first), _mm512_set1_ps(d)); }
// Tables of d * c + m (Q4_1/Q5_1) and d * c - m (K-quants), rounded as the reference rounds them.
inline __m512 table_dm(float d, float first, float m) { return _mm512_add_ps(table_d(d, first), _mm512_set1_ps(m)); }
inline __m512 table_dsub(float d, float first, float m) { return _mm512_sub_ps(table_d(d, first), _mm512_set1_ps(m)); }

// 5-bit lookup: low 4 bits from `nib` (already 0..15), bit 4 from mask `hi` (lane set = +16).
inline __m512 lookup5(__m512i nib, __mmask16 hi, __m512 lo_t, __m512 hi_t) {
  const __m512i idx = _mm512_mask_or_epi32(nib, hi, nib, _mm512_set1_epi32(16));
  return _mm512_permutex2var_ps(lo_t, idx, hi_t);
}

// The 32 weights of one block of a 32-weight type QT as two 16-float vectors (weights 0-15, 16-31),
// the reference's fp32 values: 4-bit types through a 16-entry table and vpermps, 5-bit through two
// tables (bit 4 from qh), Q8_0 converted and scaled.
template <int QT>
inline void block_w(const uint8_t* b, __m512& w0, __m512& w1) {
  const float d = f16_at(b);
  if constexpr (QT == kGGMLQ4_0 || QT == kGGMLQ4_1) {
    const __m512 t = QT == kGGMLQ4_0 ? table_d(d, -8.0f) : table_dm(d, 0.0f, f16_at(b + 2));
    const __m512i c = u8x16(b + (QT == kGGMLQ4_0 ? 2 : 4));
    w0 = _mm512_permutexvar_ps(c, t);
    w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), t);
  } else if constexpr (QT == kGGMLQ5_0 || QT == kGGMLQ5_1) {
    constexpr bool one = QT == kGGMLQ5_1;
    __m512 lo_t, hi_t;
    if constexpr (one) {
      const float m = f16_at(b + 2);
      lo_t = table_dm(d, 0.0f, m);
      hi_t = table_dm(d, 16.0f, m);
    } else {
      lo_t = table_d(d, -16.0f);
      hi_t = table_d(d, 0.0f);
    }
    uint32_t qh;
    std::memcpy(&qh, b + (one ? 4 : 2), 4);
    const __m512i c = u8x16(b + (one ? 8 : 6));
    w0 = lookup5(_mm512_and_si512(c, _mm512_set1_epi32(15)), static_cast<__mmask16>(qh & 0xFFFFu), lo_t, hi_t);
    w1 = lookup5(_mm512_srli_epi32(c, 4), static_cast<__mmask16>(qh >> 16), lo_t, hi_t);
  } else {  // Q8_0
    const __m512 vd = _mm512_set1_ps(d);
    w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)))), vd);
    w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18)))), vd);
  }
}

template <class F>
inline void decode32(int qtype, const uint8_t* b, F&& f) {
  __m512 w0, w1;
  switch (qtype) {
    case kGGMLQ4_0: block_w<kGGMLQ4_0>(b, w0, w1); break;
    case kGGMLQ4_1: block_w<kGGMLQ4_1>(b, w0, w1); break;
    case kGGMLQ5_0: block_w<kGGMLQ5_0>(b, w0, w1); break;
    case kGGMLQ5_1: block_w<kGGMLQ5_1>(b, w0, w1); break;
    default: block_w<kGGMLQ8_0>(b, w0, w1);
  }
  f(0, w0);
  f(16, w1);
}

template <class F>
inline void decode_q45_k(bool five, const uint8_t* b, F&& f) {
  const __m512i low4 = _mm512_set1_epi32(15);
  const float d = f16_at(b), dmin = f16_at(b + 2);
  const uint8_t* qs = b + (five ? 48 : 16);
  const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
  for (int g = 0; g < 4; ++g) {
    const __m512i c0 = u8x16(qs + 32 * g), c1 = u8x16(qs + 32 * g + 16);
    for (int half = 0; half < 2; ++half) {
      const int s = 2 * g + half;
      int sc, mn;
      scale_min_k4(s, b + 4, &sc, &mn);
      const float dl = d * static_cast<float>(sc), ml = dmin * static_cast<float>(mn);
      const __m512i n0 = half ? _mm512_srli_epi32(c0, 4) : c0;  // vpermps ignores bits 4..7
      const __m512i n1 = half ? _mm512_srli_epi32(c1, 4) : c1;
      if (!five) {
        const __m512 t = table_dsub(dl, 0.0f, ml);
        f(32 * s, _mm512_permutexvar_ps(n0, t));
        f(32 * s + 16, _mm512_permutexvar_ps(n1, t));
      } else {
        const __m512 lo_t = table_dsub(dl, 0.0f, ml), hi_t = table_dsub(dl, 16.0f, ml);
        const __mmask32 hb = _mm256_test_epi8_mask(qh, _mm256_set1_epi8(static_cast<char>(1 << s)));
        f(32 * s, lookup5(_mm512_and_si512(n0, low4), static_cast<__mmask16>(hb), lo_t, hi_t));
        f(32 * s + 16, lookup5(_mm512_and_si512(n1, low4), static_cast<__mmask16>(hb >> 16), lo_t, hi_t));
      }
    }
  }
}

template <class F>
inline void decode_q6_k(const uint8_t* b, F&& f) {
  const __m512i low4 = _mm512_set1_epi32(15), two = _mm512_set1_epi32(3), bias = _mm512_set1_epi32(32);
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16_at(b + 208);
  for (int h = 0; h < 2; ++h) {
    for (int l0 = 0; l0 < 32; l0 += 16) {
      const __m512i a = u8x16(b + 64 * h + l0), c = u8x16(b + 64 * h + 32 + l0), hb = u8x16(b + 128 + 32 * h + l0);
      for (int k = 0; k < 4; ++k) {
        const __m512i lo = k < 2 ? _mm512_and_si512(k ? c : a, low4) : _mm512_srli_epi32(k == 2 ? a : c, 4);
        const __m512i hi = _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(hb, 2 * k), two), 4);
        const __m512 q = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_or_si512(lo, hi), bias));
        const int j = 128 * h + 32 * k + l0;
        f(j, _mm512_mul_ps(_mm512_set1_ps(d * static_cast<float>(sc[j >> 4])), q));
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

// Bytes ahead of the current block that the GEMV asks the cache for: a decode step reads every
// weight once from memory, and the hardware prefetcher alone left the single-row GEMV at ~60% of
// the bandwidth a prefetching loop reaches (measured: 5.4 vs 6.6 GB/s streaming Q4_0, one thread).
constexpr int64_t kPrefetchBytes = 1024;

template <int MB>
inline void block_fma(const GGUFProblem& p, const uint8_t* blk, const float* x, __m512 (&acc)[MB][2]) {
  decode(p.qtype, blk, [&](int off, __m512 w) {
    const int a = (off >> 4) & 1;
    for (int m = 0; m < MB; ++m) acc[m][a] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * p.K + off), acc[m][a]);
  });
}

// One row of x (a decode step) on the 32-weight types: block_w with the type a compile-time constant
// (no per-block switch or visitor; the compiler keeps the four accumulators in registers), two blocks
// per iteration and a prefetch per pair. Measured streaming Q4_0 from memory, one thread: 12.2
// against 7.2 G weights/s for the generic visitor above (the same weights, bit for bit).
template <int QT>
void gemv1_rows(const GGUFProblem& p, int64_t n0, int64_t n1) {
  const int64_t nblk = p.K / 32, bb = p.block_bytes;
  const float* x = p.x;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.blocks + n * p.row_bytes;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 1 < nblk; i += 2) {
      const uint8_t* b = row + i * bb;
      _mm_prefetch(reinterpret_cast<const char*>(b) + kPrefetchBytes, _MM_HINT_T0);
      __m512 w0, w1, w2, w3;
      block_w<QT>(b, w0, w1);
      block_w<QT>(b + bb, w2, w3);
      const float* xi = x + i * 32;
      a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xi), a0);
      a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xi + 16), a1);
      a2 = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xi + 32), a2);
      a3 = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xi + 48), a3);
    }
    if (i < nblk) {
      __m512 w0, w1;
      block_w<QT>(row + i * bb, w0, w1);
      a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i * 32), a0);
      a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i * 32 + 16), a1);
    }
    const float bias = p.bias ? p.bias[n] : 0.0f;
    p.out[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) + bias;
  }
}

// One row of x on Q4_K / Q6_K: the decoders of decode_q45_k / decode_q6_k with their loops unrolled
// so that each 16-weight vector goes to one of four accumulators chosen at compile time.
inline void gemv1_q4_k(const GGUFProblem& p, int64_t n0, int64_t n1) {
  const int64_t nblk = p.K / 256;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.blocks + n * p.row_bytes;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t i = 0; i < nblk; ++i) {
      const uint8_t* b = row + i * 144;
      _mm_prefetch(reinterpret_cast<const char*>(b) + kPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(b) + kPrefetchBytes + 64, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(b) + kPrefetchBytes + 128, _MM_HINT_T0);
      const float* x = p.x + i * 256;
      const float d = f16_at(b), dmin = f16_at(b + 2);
      const uint8_t* qs = b + 16;
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        const __m512i c0 = u8x16(qs + 32 * g), c1 = u8x16(qs + 32 * g + 16);
#pragma GCC unroll 2
        for (int half = 0; half < 2; ++half) {
          const int s = 2 * g + half;
          int sc, mn;
          scale_min_k4(s, b + 4, &sc, &mn);
          const __m512 t = table_dsub(d * static_cast<float>(sc), 0.0f, dmin * static_cast<float>(mn));
          const __m512i q0 = half ? _mm512_srli_epi32(c0, 4) : c0, q1 = half ? _mm512_srli_epi32(c1, 4) : c1;
          acc[2 * half] = _mm512_fmadd_ps(_mm512_permutexvar_ps(q0, t), _mm512_loadu_ps(x + 32 * s), acc[2 * half]);
          acc[2 * half + 1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(q1, t), _mm512_loadu_ps(x + 32 * s + 16), acc[2 * half + 1]);
        }
      }
    }
    const float bias = p.bias ? p.bias[n] : 0.0f;
    p.out[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))) + bias;
  }
}

inline void gemv1_q6_k(const GGUFProblem& p, int64_t n0, int64_t n1) {
  const int64_t nblk = p.K / 256;
  const __m512i low4 = _mm512_set1_epi32(15), two = _mm512_set1_epi32(3), bias32 = _mm512_set1_epi32(32);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.blocks + n * p.row_bytes;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t i = 0; i < nblk; ++i) {
      const uint8_t* b = row + i * 210;
      for (int o = 0; o < 256; o += 64) _mm_prefetch(reinterpret_cast<const char*>(b) + kPrefetchBytes + o, _MM_HINT_T0);
      const float* x = p.x + i * 256;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      const float d = f16_at(b + 208);
      for (int h = 0; h < 2; ++h) {
        for (int l0 = 0; l0 < 32; l0 += 16) {
          const __m512i a = u8x16(b + 64 * h + l0), c = u8x16(b + 64 * h + 32 + l0), hb = u8x16(b + 128 + 32 * h + l0);
#pragma GCC unroll 4
          for (int k = 0; k < 4; ++k) {
            const __m512i lo = k < 2 ? _mm512_and_si512(k ? c : a, low4) : _mm512_srli_epi32(k == 2 ? a : c, 4);
            const __m512i hi = _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(hb, 2 * k), two), 4);
            const __m512 q = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_or_si512(lo, hi), bias32));
            const int j = 128 * h + 32 * k + l0;
            const __m512 w = _mm512_mul_ps(_mm512_set1_ps(d * static_cast<float>(sc[j >> 4])), q);
            acc[k] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + j), acc[k]);
          }
        }
      }
    }
    const float bias = p.bias ? p.bias[n] : 0.0f;
    p.out[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))) + bias;
  }
}

// true when one of the specialised one-row loops above computed rows n0..n1
inline bool gemv1(const GGUFProblem& p, int64_t n0, int64_t n1) {
  if (p.M != 1) return false;
  switch (p.qtype) {
    case kGGMLQ4_0: gemv1_rows<kGGMLQ4_0>(p, n0, n1); return true;
    case kGGMLQ4_1: gemv1_rows<kGGMLQ4_1>(p, n0, n1); return true;
    case kGGMLQ5_0: gemv1_rows<kGGMLQ5_0>(p, n0, n1); return true;
    case kGGMLQ5_1: gemv1_rows<kGGMLQ5_1>(p, n0, n1); return true;
    case kGGMLQ8_0: gemv1_rows<kGGMLQ8_0>(p, n0, n1); return true;
    case kGGMLQ4_K: gemv1_q4_k(p, n0, n1); return true;
    case kGGMLQ6_K: gemv1_q6_k(p, n0, n1); return true;
    default: return false;
  }
}

template <int MB>
void rows_mb(const GGUFProblem& p, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t nblk = p.K / p.block;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.blocks + n * p.row_bytes;
    const float* x = p.x + m0 * p.K;
    __m512 acc[MB][2], acc2[MB][2];  // acc2: odd blocks (1-2 rows of x), two more FMA chains per row
    for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = acc2[m][0] = acc2[m][1] = _mm512_setzero_ps();
    int64_t i = 0;
    if constexpr (MB <= 2) {
      for (; i + 1 < nblk; i += 2) {
        const uint8_t* blk = row + i * p.block_bytes;
        _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchBytes, _MM_HINT_T0);
        block_fma<MB>(p, blk, x + i * p.block, acc);
        block_fma<MB>(p, blk + p.block_bytes, x + (i + 1) * p.block, acc2);
      }
    }
    for (; i < nblk; ++i) {
      const uint8_t* blk = row + i * p.block_bytes;
      _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchBytes, _MM_HINT_T0);
      block_fma<MB>(p, blk, x + i * p.block, acc);
    }
    const float bias = p.bias ? p.bias[n] : 0.0f;
    for (int m = 0; m < MB; ++m) {
      const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc2[m][0], acc2[m][1]));
      p.out[(m0 + m) * p.N + n] = _mm512_reduce_add_ps(s) + bias;
    }
  }
}

// Panel path (several rows of x): kPanelRows weight rows are decoded kPanelK weights at a time into
// an L1-resident fp32 panel (the decoders above: the reference's weights bit for bit), then a
// register-blocked micro-kernel multiplies the panel into MR rows of x at once: per 16 columns it
// loads NR weight vectors and MR activation vectors for NR * MR FMAs, so a decoded block serves
// every row of x and each activation load serves NR weight rows (the GEMV above reloads x for
// every weight row and decodes every block once per 8 rows of x). Partial sums of all M rows live
// in `acc` (M x NR vectors) between K chunks.
// NR x MR = 4 x 6 (24 accumulators + 4 weight vectors + 1 activation <= 32 registers) and 512-weight
// chunks were the fastest of 4x4, 4x6, 3x8, 2x8, 2x12, 8x3 and chunks of 256/512/1024 at batch 16 on
// 4096x4096 (Zen 4, one thread; 3x8 and larger spill registers).
constexpr int kPanelRows = 4;     // NR: weight rows per panel
constexpr int kPanelMR = 6;       // MR: rows of x per micro-kernel call
constexpr int64_t kPanelK = 512;  // weights per panel row (a multiple of both block sizes)

template <int MR, int NR>
inline void panel_micro(const float* w, const float* x, int64_t ldx, int64_t kc, float* acc) {
  __m512 a[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) a[m][r] = _mm512_loadu_ps(acc + (m * NR + r) * 16);
  for (int64_t k = 0; k < kc; k += 16) {
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm512_loadu_ps(w + r * kPanelK + k);
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < NR; ++r) a[m][r] = _mm512_fmadd_ps(wv[r], xv, a[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) _mm512_storeu_ps(acc + (m * NR + r) * 16, a[m][r]);
}

// out[:, n:n+NR] from weight rows n..n+NR-1.
template <int NR>
void panel_rows(const GGUFProblem& p, int64_t n, float* w, float* acc) {
  const int64_t M = p.M, K = p.K;
  std::memset(acc, 0, sizeof(float) * static_cast<size_t>(M * NR * 16));
  for (int64_t k0 = 0; k0 < K; k0 += kPanelK) {
    const int64_t kc = K - k0 < kPanelK ? K - k0 : kPanelK;  // a multiple of the block (K is)
    for (int r = 0; r < NR; ++r) {
      const uint8_t* blk = p.blocks + (n + r) * p.row_bytes + k0 / p.block * p.block_bytes;
      for (int64_t i = 0; i < kc / p.block; ++i) {
        float* dst = w + r * kPanelK + i * p.block;
        decode(p.qtype, blk + i * p.block_bytes, [&](int off, __m512 v) { _mm512_storeu_ps(dst + off, v); });
      }
    }
    for (int64_t m0 = 0; m0 < M; m0 += kPanelMR) {
      const float* x = p.x + m0 * K + k0;
      float* a = acc + m0 * NR * 16;
      switch (M - m0 < kPanelMR ? M - m0 : kPanelMR) {
        case 1: panel_micro<1, NR>(w, x, K, kc, a); break;
        case 2: panel_micro<2, NR>(w, x, K, kc, a); break;
        case 3: panel_micro<3, NR>(w, x, K, kc, a); break;
        case 4: panel_micro<4, NR>(w, x, K, kc, a); break;
        case 5: panel_micro<5, NR>(w, x, K, kc, a); break;
        default: panel_micro<kPanelMR, NR>(w, x, K, kc, a); break;
      }
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r)
      p.out[m * p.N + n + r] = _mm512_reduce_add_ps(_mm512_loadu_ps(acc + (m * NR + r) * 16)) + (p.bias ? p.bias[n + r] : 0.0f);
}

}  // namespace

void gguf_panel_avx512(const GGUFProblem& p, int64_t n0, int64_t n1, float* scratch) {
  float* w = scratch;  // kPanelRows x kPanelK, then the M x kPanelRows x 16 partial sums
  float* acc = scratch + kPanelRows * kPanelK;
  int64_t n = n0;
  for (; n + kPanelRows <= n1; n += kPanelRows) panel_rows<kPanelRows>(p, n, w, acc);
  for (; n < n1; ++n) panel_rows<1>(p, n, w, acc);
}

int64_t gguf_panel_scratch_avx512(int64_t M) { return kPanelRows * kPanelK + M * kPanelRows * 16; }

void gguf_rows_avx512(const GGUFProblem& p, int64_t n0, int64_t n1) {
  if (gemv1(p, n0, n1)) return;
  constexpr int64_t kRowBlock = 8;  // weight rows stay in L1 while every slice of x passes over them
  for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
    const int64_t ne = (nb + kRowBlock < n1) ? nb + kRowBlock : n1;
    for (int64_t m0 = 0; m0 < p.M;) {
      const int64_t left = p.M - m0;
      const int64_t mb = left >= 8 ? 8 : left >= 4 ? 4 : left;
      switch (mb) {
        case 1: rows_mb<1>(p, m0, nb, ne); break;
        case 2: rows_mb<2>(p, m0, nb, ne); break;
        case 3: rows_mb<3>(p, m0, nb, ne); break;
        case 4: rows_mb<4>(p, m0, nb, ne); break;
        default: rows_mb<8>(p, m0, nb, ne); break;
      }
      m0 += mb;
    }
  }
}

void gguf_dequant_avx512(const GGUFProblem& p, int64_t n0, int64_t n1, float* dst, int64_t ldd) {
  const int64_t nblk = p.K / p.block;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.blocks + n * p.row_bytes;
    for (int64_t i = 0; i < nblk; ++i) {
      float* w = dst + (n - n0) * ldd + i * p.block;
      decode(p.qtype, row + i * p.block_bytes, [&](int off, __m512 v) { _mm512_storeu_ps(w + off, v); });
    }
  }
}

#else

void gguf_rows_avx512(const GGUFProblem&, int64_t, int64_t) {}
void gguf_panel_avx512(const GGUFProblem&, int64_t, int64_t, float*) {}
int64_t gguf_panel_scratch_avx512(int64_t) { return 0; }
void gguf_dequant_avx512(const GGUFProblem&, int64_t, int64_t, float*, int64_t) {}

#endif

}  // namespace tc_kernels

#ifdef TC_HAVE_X86
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
