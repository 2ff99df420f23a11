// AVX-512 kernels (F, BW, VL, DQ + FMA, F16C). Compiled for that target with a pragma, whatever the
// global flags, and only called after cpu_has_avx512() said yes at run time.
//
// GEMV (small batch), 16 fp32 lanes, several rows of x per pass over a weight row:
//   4 bits: per group, a register holds the 16 possible weights (c - zero) * scale and vpermps looks
//           the nibbles up; x is pre-split into even and odd columns so that the low and high
//           nibbles of 16 bytes meet their activations without shuffles.
//   8 bits: per group, acc += (c - zero) * x, then total += scale * acc.
// Both compute with exactly the reference's dequantized weights (no zero-point folding, which
// loses accuracy when x has a non-zero mean).
#include "int_linear.h"

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

inline float scale_at(const Problem& p, int64_t n, int64_t g) {
  const int64_t i = n * p.s_rs + g * p.s_gs;
  if (p.st == ScaleType::F16) return _cvtsh_ss(static_cast<const uint16_t*>(p.scale)[i]);
  if (p.st == ScaleType::BF16) return bf16_to_float(static_cast<const uint16_t*>(p.scale)[i]);
  return static_cast<const float*>(p.scale)[i];
}

// Bytes ahead that the GEMV prefetches (see gguf_linear_avx512.cpp).
constexpr int64_t kPrefetchBytes = 1024;

inline __mmask16 first_n(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// out[m0:m0+MB, n0:n1] for 4-bit codes. Per group, the 16 possible weights (c - zero) * scale are
// one register (exactly the reference's fp32 weights), and vpermps looks the nibbles up in it.
template <int MB>
void int4_rows(const Problem& p, const Prepared& q, int64_t m0, int64_t n0, int64_t n1) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.qw + n * p.row_bytes;
    __m512 tot[MB], tot2[MB];  // low and high nibbles' products: two FMA chains per row of x (up to 4 rows)
    for (int m = 0; m < MB; ++m) tot[m] = tot2[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t c0 = g * p.gs;
      const int64_t len = (p.gs < p.K - c0) ? p.gs : p.K - c0;
      const int64_t b0 = c0 >> 1, nb = (len + 1) >> 1;  // groups start on a byte (simd_supported)
      _mm_prefetch(reinterpret_cast<const char*>(row + b0) + kPrefetchBytes, _MM_HINT_T0);
      const __m512 table = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(load_zero(p, n, g))),
                                         _mm512_set1_ps(scale_at(p, n, g)));
      for (int64_t j = 0; j < nb; j += 16) {
        __m512 lo, hi;
        if (j + 16 <= nb) {
          const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b0 + j)));
          lo = _mm512_permutexvar_ps(b, table);  // uses index bits 0..3: the low nibble
          hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
        } else {  // tail: lanes past the group must add nothing (x there belongs to the next group)
          const __mmask16 k = first_n(nb - j);
          const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, row + b0 + j));
          lo = _mm512_maskz_permutexvar_ps(k, b, table);
          hi = _mm512_maskz_permutexvar_ps(k, _mm512_srli_epi32(b, 4), table);
        }
        for (int m = 0; m < MB; ++m) {
          const int64_t off = (m0 + m) * q.ldx + b0 + j;
          tot[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(q.xa + off), tot[m]);
          if constexpr (MB <= 4) tot2[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(q.xb + off), tot2[m]);
          else tot[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(q.xb + off), tot[m]);  // 16 rows: registers
        }
      }
    }
    const float bias = p.bias ? p.bias[n] : 0.0f;
    for (int m = 0; m < MB; ++m) p.out[(m0 + m) * p.N + n] = _mm512_reduce_add_ps(_mm512_add_ps(tot[m], tot2[m])) + bias;
  }
}

// Groups of 32 codes: one 16-byte load per group, two groups per step into four chains, no masks
// (int4_row1's loop runs its masked tail for every such group: measured 3.2-6.0 G weights/s there
// against 10.5-10.7 here, asymmetric, one thread, 64M weights streamed; a function of its own so that
// the general loop's code stays as it was: inlined, group 128 measured 8-9 instead of 13).
__attribute__((noinline)) void int4_row1_g32(const Problem& p, const Prepared& q, int64_t n0, int64_t n1) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.qw + n * p.row_bytes;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 2 <= p.G; g += 2) {
      const int64_t o = g * 16;
      if ((g & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + o) + kPrefetchBytes, _MM_HINT_T0);
      const __m512 t0 = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(load_zero(p, n, g))),
                                      _mm512_set1_ps(scale_at(p, n, g)));
      const __m512 t1 = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(load_zero(p, n, g + 1))),
                                      _mm512_set1_ps(scale_at(p, n, g + 1)));
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + o)));
      const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + o + 16)));
      a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(b, t0), _mm512_loadu_ps(q.xa + o), a0);
      a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t0), _mm512_loadu_ps(q.xb + o), a1);
      a2 = _mm512_fmadd_ps(_mm512_permutexvar_ps(c, t1), _mm512_loadu_ps(q.xa + o + 16), a2);
      a3 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), t1), _mm512_loadu_ps(q.xb + o + 16), a3);
    }
    if (g < p.G) {  // an odd number of groups: the last one
      const int64_t o = g * 16;
      const __m512 t0 = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(load_zero(p, n, g))),
                                      _mm512_set1_ps(scale_at(p, n, g)));
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + o)));
      a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(b, t0), _mm512_loadu_ps(q.xa + o), a0);
      a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t0), _mm512_loadu_ps(q.xb + o), a1);
    }
    const float bias = p.bias ? p.bias[n] : 0.0f;
    p.out[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) + bias;
  }
}

// One row of x (a decode step), 4-bit codes: int4_rows<1> with two 16-byte chunks per step into
// four accumulators (independent FMA chains) and a prefetch per step.
void int4_row1(const Problem& p, const Prepared& q, int64_t n0, int64_t n1) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  if (p.gs == 32 && p.K % 32 == 0) {
    int4_row1_g32(p, q, n0, n1);
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.qw + n * p.row_bytes;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t c0 = g * p.gs;
      const int64_t len = (p.gs < p.K - c0) ? p.gs : p.K - c0;
      const int64_t b0 = c0 >> 1, nb = (len + 1) >> 1;
      const __m512 table = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(load_zero(p, n, g))),
                                         _mm512_set1_ps(scale_at(p, n, g)));
      const uint8_t* r = row + b0;
      const float* xa = q.xa + b0;
      const float* xb = q.xb + b0;
      int64_t j = 0;
      for (; j + 32 <= nb; j += 32) {
        _mm_prefetch(reinterpret_cast<const char*>(r + j) + kPrefetchBytes, _MM_HINT_T0);
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + j)));
        const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + j + 16)));
        a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(b, table), _mm512_loadu_ps(xa + j), a0);
        a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table), _mm512_loadu_ps(xb + j), a1);
        a2 = _mm512_fmadd_ps(_mm512_permutexvar_ps(c, table), _mm512_loadu_ps(xa + j + 16), a2);
        a3 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), table), _mm512_loadu_ps(xb + j + 16), a3);
      }
      for (; j < nb; j += 16) {  // the last chunk, maybe partial: lanes past the group add nothing
        const __mmask16 k = nb - j >= 16 ? static_cast<__mmask16>(0xFFFF) : first_n(nb - j);
        const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, r + j));
        a0 = _mm512_fmadd_ps(_mm512_maskz_permutexvar_ps(k, b, table), _mm512_loadu_ps(xa + j), a0);
        a1 = _mm512_fmadd_ps(_mm512_maskz_permutexvar_ps(k, _mm512_srli_epi32(b, 4), table), _mm512_loadu_ps(xb + j), a1);
      }
    }
    const float bias = p.bias ? p.bias[n] : 0.0f;
    p.out[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) + bias;
  }
}

// out[m0:m0+MB, n0:n1] for 8-bit codes.
template <int MB>
void int8_rows(const Problem& p, const Prepared& q, int64_t m0, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.qw + n * p.row_bytes;
    __m512 tot[MB];
    for (int m = 0; m < MB; ++m) tot[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t c0 = g * p.gs;
      const int64_t len = (p.gs < p.K - c0) ? p.gs : p.K - c0;
      const __m512 vz = _mm512_set1_ps(load_zero(p, n, g));
      __m512 acc[MB], acc2[MB];  // acc2: a second FMA chain for up to 4 rows of x (32 codes per step)
      for (int m = 0; m < MB; ++m) acc[m] = acc2[m] = _mm512_setzero_ps();
      int64_t j = 0;
      if constexpr (MB <= 4) {
        for (; j + 32 <= len; j += 32) {
          const uint8_t* c = row + c0 + j;
          _mm_prefetch(reinterpret_cast<const char*>(c) + kPrefetchBytes, _MM_HINT_T0);
          const __m512 w0 = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)))), vz);
          const __m512 w1 = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16)))), vz);
          for (int m = 0; m < MB; ++m) {
            const float* xm = q.xa + (m0 + m) * q.ldx + c0 + j;
            acc[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), acc[m]);
            acc2[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), acc2[m]);
          }
        }
      }
      for (; j < len; j += 16) {
        __m512 w;
        if (j + 16 <= len) {
          w = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c0 + j)))), vz);
        } else {  // tail: lanes past the group must add nothing
          const __mmask16 k = first_n(len - j);
          w = _mm512_maskz_sub_ps(k, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, row + c0 + j))), vz);
        }
        for (int m = 0; m < MB; ++m)
          acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(q.xa + (m0 + m) * q.ldx + c0 + j), acc[m]);
      }
      const __m512 vs = _mm512_set1_ps(scale_at(p, n, g));
      for (int m = 0; m < MB; ++m) tot[m] = _mm512_fmadd_ps(_mm512_add_ps(acc[m], acc2[m]), vs, tot[m]);
    }
    const float bias = p.bias ? p.bias[n] : 0.0f;
    for (int m = 0; m < MB; ++m) p.out[(m0 + m) * p.N + n] = _mm512_reduce_add_ps(tot[m]) + bias;
  }
}

template <int MB>
void rows_mb(const Problem& p, const Prepared& q, int64_t m0, int64_t n0, int64_t n1) {
  if (p.bits == 4) int4_rows<MB>(p, q, m0, n0, n1);
  else int8_rows<MB>(p, q, m0, n0, n1);
}

}  // namespace

void gemv_rows_avx512(const Problem& p, const Prepared& q, int64_t n0, int64_t n1) {
  // Rows in blocks small enough to stay in L1 while every slice of x passes over them. 4 bits keep
  // one accumulator per row of x (up to 16 per pass); 8 bits two (a group's and the total: up to 8).
  if (p.M == 1 && p.bits == 4) {
    int4_row1(p, q, n0, n1);
    return;
  }
  constexpr int64_t kRowBlock = 8;
  const int64_t widest = p.bits == 4 ? 16 : 8;
  for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
    const int64_t ne = (nb + kRowBlock < n1) ? nb + kRowBlock : n1;
    for (int64_t m0 = 0; m0 < p.M;) {
      const int64_t left = p.M - m0;
      const int64_t mb = left >= widest ? widest : left >= 8 ? 8 : left >= 4 ? 4 : left;
      switch (mb) {
        case 1: rows_mb<1>(p, q, m0, nb, ne); break;
        case 2: rows_mb<2>(p, q, m0, nb, ne); break;
        case 3: rows_mb<3>(p, q, m0, nb, ne); break;
        case 4: rows_mb<4>(p, q, m0, nb, ne); break;
        case 8: rows_mb<8>(p, q, m0, nb, ne); break;
        default: int4_rows<16>(p, q, m0, nb, ne); break;
      }
      m0 += mb;
    }
  }
}

// Dequantize rows into dst (natural column order); writes may run up to 32 floats past K.
void dequant_rows_avx512(const Problem& p, int64_t n0, int64_t n1, float* dst, int64_t ldd) {
  const __m512i nib = _mm512_set1_epi32(0xF);
  const __m512i even = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i odd = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.qw + n * p.row_bytes;
    float* d = dst + (n - n0) * ldd;
    for (int64_t g = 0; g < p.G; ++g) {  // in increasing order: a group's overrun is rewritten by the next
      const int64_t c0 = g * p.gs;
      const int64_t len = (p.gs < p.K - c0) ? p.gs : p.K - c0;
      const __m512 vs = _mm512_set1_ps(scale_at(p, n, g));
      const __m512 vz = _mm512_set1_ps(load_zero(p, n, g));
      if (p.bits == 4) {
        const int64_t b0 = c0 >> 1, nb = (len + 1) >> 1;
        for (int64_t j = 0; j < nb; j += 16) {
          const __m128i raw = (j + 16 <= nb) ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b0 + j))
                                             : _mm_maskz_loadu_epi8(first_n(nb - j), row + b0 + j);
          const __m512i b = _mm512_cvtepu8_epi32(raw);
          const __m512 lo = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, nib)), vz), vs);
          const __m512 hi = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), vz), vs);
          _mm512_storeu_ps(d + 2 * (b0 + j), _mm512_permutex2var_ps(lo, even, hi));
          _mm512_storeu_ps(d + 2 * (b0 + j) + 16, _mm512_permutex2var_ps(lo, odd, hi));
        }
      } else {
        for (int64_t j = 0; j < len; j += 16) {
          const __m128i raw = (j + 16 <= len) ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c0 + j))
                                              : _mm_maskz_loadu_epi8(first_n(len - j), row + c0 + j);
          const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(raw));
          _mm512_storeu_ps(d + c0 + j, _mm512_mul_ps(_mm512_sub_ps(w, vz), vs));
        }
      }
    }
  }
}

bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

#else  // not x86-64 GCC/Clang: never selected

void gemv_rows_avx512(const Problem&, const Prepared&, int64_t, int64_t) {}
void dequant_rows_avx512(const Problem&, int64_t, int64_t, float*, int64_t) {}
bool cpu_has_avx512() { return false; }

#endif

}  // namespace tc_kernels

#ifdef TC_HAVE_X86
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
