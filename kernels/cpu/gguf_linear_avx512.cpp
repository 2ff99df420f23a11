// AVX-512 GGUF Q4_0 / Q8_0 GEMV, up to 8 rows of x per pass over a weight row.
//   Q4_0: per block, a register holds the 16 weights d * (c - 8) and vpermps looks the nibbles up;
//         low nibbles pair with x[0:16] of the block, high nibbles with x[16:32] (ggml's order).
//   Q8_0: sign-extend the 32 int8 codes, times d.
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

inline float block_d(const uint8_t* b) {
  uint16_t h;
  std::memcpy(&h, b, 2);
  return _cvtsh_ss(h);
}

template <int MB>
void rows_mb(const GGUFProblem& p, int64_t m0, int64_t n0, int64_t n1) {
  const __m512 iota8 = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const int64_t nblk = p.K / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.blocks + n * p.row_bytes;
    __m512 tot[MB];
    for (int m = 0; m < MB; ++m) tot[m] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nblk; ++i) {
      __m512 w0, w1;
      if (p.qtype == kGGMLQ4_0) {
        const uint8_t* b = row + i * 18;
        const __m512 table = _mm512_mul_ps(iota8, _mm512_set1_ps(block_d(b)));
        const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)));
        w0 = _mm512_permutexvar_ps(c, table);
        w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), table);
      } else {
        const uint8_t* b = row + i * 34;
        const __m512 d = _mm512_set1_ps(block_d(b));
        w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)))), d);
        w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18)))), d);
      }
      for (int m = 0; m < MB; ++m) {
        const float* x = p.x + (m0 + m) * p.K + i * 32;
        tot[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), tot[m]);
        tot[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), tot[m]);
      }
    }
    const float bias = p.bias ? p.bias[n] : 0.0f;
    for (int m = 0; m < MB; ++m) p.out[(m0 + m) * p.N + n] = _mm512_reduce_add_ps(tot[m]) + bias;
  }
}

}  // namespace

void gguf_rows_avx512(const GGUFProblem& p, int64_t n0, int64_t n1) {
  constexpr int64_t kRowBlock = 8;
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

#else

void gguf_rows_avx512(const GGUFProblem&, int64_t, int64_t) {}

#endif

}  // namespace tc_kernels

#ifdef TC_HAVE_X86
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
