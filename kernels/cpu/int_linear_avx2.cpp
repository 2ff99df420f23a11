// AVX2 + FMA + F16C kernels: the same algorithm as int_linear_avx512.cpp on 8 fp32 lanes, up to 4
// rows of x per pass (16 ymm registers). Tails are copied into a zeroed 16-byte buffer (AVX2 has no
// byte-masked loads).
#include "int_linear.h"

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

inline float scale_at(const Problem& p, int64_t n, int64_t g) {
  const int64_t i = n * p.s_rs + g * p.s_gs;
  if (p.st == ScaleType::F16) return _cvtsh_ss(static_cast<const uint16_t*>(p.scale)[i]);
  if (p.st == ScaleType::BF16) return bf16_to_float(static_cast<const uint16_t*>(p.scale)[i]);
  return static_cast<const float*>(p.scale)[i];
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 bytes starting at p, of which only `avail` (< 8 means a tail) may be read.
inline __m256i load8_u8(const uint8_t* p, int64_t avail) {
  if (avail >= 8) return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  alignas(16) uint8_t tmp[16] = {0};
  std::memcpy(tmp, p, static_cast<size_t>(avail));
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(tmp)));
}

// Lanes 0..avail-1 set (all when avail >= 8): tail lanes past a group must add nothing.
inline __m256 lanes_below(int64_t avail) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(avail < 8 ? avail : 8)), iota));
}

// Low and high nibbles of the 8 bytes at r (only `avail` of them exist when avail < 8) as code - zero
// in fp32; lanes past the available bytes are zero, so they add nothing.
inline void nibbles8(const uint8_t* r, int64_t avail, __m256 vz, __m256* lo, __m256* hi) {
  const __m256i nib = _mm256_set1_epi32(0xF);
  const __m256i b = load8_u8(r, avail);
  *lo = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, nib)), vz);
  *hi = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), vz);
  if (avail < 8) {
    const __m256 keep = lanes_below(avail);
    *lo = _mm256_and_ps(*lo, keep);
    *hi = _mm256_and_ps(*hi, keep);
  }
}

// Per group: acc += (c - zero) * x (exact small integers in fp32), then total += scale * acc.
template <int MB>
void rows_mb(const Problem& p, const Prepared& q, int64_t m0, int64_t n0, int64_t n1) {
  const bool four = p.bits == 4;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.qw + n * p.row_bytes;
    __m256 tot[MB];
    for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t c0 = g * p.gs;
      const int64_t len = (p.gs < p.K - c0) ? p.gs : p.K - c0;
      const __m256 vz = _mm256_set1_ps(load_zero(p, n, g));
      __m256 acc[MB];
      for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
      if (four) {
        const int64_t b0 = c0 >> 1, nb = (len + 1) >> 1;
        for (int64_t j = 0; j < nb; j += 8) {
          __m256 lo, hi;
          nibbles8(row + b0 + j, nb - j, vz, &lo, &hi);
          for (int m = 0; m < MB; ++m) {
            const int64_t off = (m0 + m) * q.ldx + b0 + j;
            acc[m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(q.xa + off), acc[m]);
            acc[m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(q.xb + off), acc[m]);
          }
        }
      } else {
        for (int64_t j = 0; j < len; j += 8) {
          __m256 w = _mm256_sub_ps(_mm256_cvtepi32_ps(load8_u8(row + c0 + j, len - j)), vz);
          if (j + 8 > len) w = _mm256_and_ps(w, lanes_below(len - j));
          for (int m = 0; m < MB; ++m)
            acc[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(q.xa + (m0 + m) * q.ldx + c0 + j), acc[m]);
        }
      }
      const __m256 vs = _mm256_set1_ps(scale_at(p, n, g));
      for (int m = 0; m < MB; ++m) tot[m] = _mm256_fmadd_ps(acc[m], vs, tot[m]);
    }
    const float bias = p.bias ? p.bias[n] : 0.0f;
    for (int m = 0; m < MB; ++m) p.out[(m0 + m) * p.N + n] = hsum(tot[m]) + bias;
  }
}

// One row of x (a decode step), 4-bit codes: rows_mb<1> with 16 bytes per step into four independent
// FMA chains (rows_mb<1> runs one chain: its FMAs wait on each other), unmasked loads for whole
// 16-byte steps, and a prefetch ahead on the row. Measured (AVX2 path forced on an AVX-512 machine,
// one thread, 64M weights streamed, asymmetric): group 128 5.9-6.3 -> 7.8-9.4 G weights/s, group 32
// 3.6-4.0 -> 3.9-5.0.
void int4_row1(const Problem& p, const Prepared& q, int64_t n0, int64_t n1) {
  const __m256i nib = _mm256_set1_epi32(0xF);
  constexpr int64_t kPrefetchBytes = 1024;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.qw + n * p.row_bytes;
    __m256 tot0 = _mm256_setzero_ps(), tot1 = _mm256_setzero_ps();
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t c0 = g * p.gs;
      const int64_t len = (p.gs < p.K - c0) ? p.gs : p.K - c0;
      const int64_t b0 = c0 >> 1, nb = (len + 1) >> 1;
      const uint8_t* r = row + b0;
      const float* xa = q.xa + b0;
      const float* xb = q.xb + b0;
      _mm_prefetch(reinterpret_cast<const char*>(r) + kPrefetchBytes, _MM_HINT_T0);
      const __m256 vz = _mm256_set1_ps(load_zero(p, n, g));
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 16 <= nb; j += 16) {
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + j)));
        const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + j + 8)));
        a0 = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, nib)), vz), _mm256_loadu_ps(xa + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), vz), _mm256_loadu_ps(xb + j), a1);
        a2 = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(c, nib)), vz), _mm256_loadu_ps(xa + j + 8), a2);
        a3 = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4)), vz), _mm256_loadu_ps(xb + j + 8), a3);
      }
      for (; j < nb; j += 8) {  // the group's last bytes, maybe fewer than 8
        __m256 lo, hi;
        nibbles8(r + j, nb - j, vz, &lo, &hi);
        a0 = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xa + j), a0);
        a1 = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xb + j), a1);
      }
      const __m256 vs = _mm256_set1_ps(scale_at(p, n, g));
      tot0 = _mm256_fmadd_ps(_mm256_add_ps(a0, a2), vs, tot0);
      tot1 = _mm256_fmadd_ps(_mm256_add_ps(a1, a3), vs, tot1);
    }
    const float bias = p.bias ? p.bias[n] : 0.0f;
    p.out[n] = hsum(_mm256_add_ps(tot0, tot1)) + bias;
  }
}

}  // namespace

void gemv_rows_avx2(const Problem& p, const Prepared& q, int64_t n0, int64_t n1) {
  if (p.M == 1 && p.bits == 4) {
    int4_row1(p, q, n0, n1);
    return;
  }
  constexpr int64_t kRowBlock = 8;
  for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
    const int64_t ne = (nb + kRowBlock < n1) ? nb + kRowBlock : n1;
    for (int64_t m0 = 0; m0 < p.M; m0 += 4) {
      switch (p.M - m0 >= 4 ? 4 : p.M - m0) {
        case 1: rows_mb<1>(p, q, m0, nb, ne); break;
        case 2: rows_mb<2>(p, q, m0, nb, ne); break;
        case 3: rows_mb<3>(p, q, m0, nb, ne); break;
        default: rows_mb<4>(p, q, m0, nb, ne); break;
      }
    }
  }
}

void dequant_rows_avx2(const Problem& p, int64_t n0, int64_t n1, float* dst, int64_t ldd) {
  const __m256i nib = _mm256_set1_epi32(0xF);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.qw + n * p.row_bytes;
    float* d = dst + (n - n0) * ldd;
    for (int64_t g = 0; g < p.G; ++g) {  // in increasing order: a group's overrun is rewritten by the next
      const int64_t c0 = g * p.gs;
      const int64_t len = (p.gs < p.K - c0) ? p.gs : p.K - c0;
      const __m256 vs = _mm256_set1_ps(scale_at(p, n, g));
      const __m256 vz = _mm256_set1_ps(load_zero(p, n, g));
      if (p.bits == 4) {
        const int64_t b0 = c0 >> 1, nb = (len + 1) >> 1;
        for (int64_t j = 0; j < nb; j += 8) {
          const __m256i b = load8_u8(row + b0 + j, nb - j);
          const __m256 lo = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, nib)), vz), vs);
          const __m256 hi = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), vz), vs);
          const __m256 a = _mm256_unpacklo_ps(lo, hi), c = _mm256_unpackhi_ps(lo, hi);
          _mm256_storeu_ps(d + 2 * (b0 + j), _mm256_permute2f128_ps(a, c, 0x20));
          _mm256_storeu_ps(d + 2 * (b0 + j) + 8, _mm256_permute2f128_ps(a, c, 0x31));
        }
      } else {
        for (int64_t j = 0; j < len; j += 8) {
          const __m256 w = _mm256_cvtepi32_ps(load8_u8(row + c0 + j, len - j));
          _mm256_storeu_ps(d + c0 + j, _mm256_mul_ps(_mm256_sub_ps(w, vz), vs));
        }
      }
    }
  }
}

bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

#else  // not x86-64 GCC/Clang: never selected

void gemv_rows_avx2(const Problem&, const Prepared&, int64_t, int64_t) {}
void dequant_rows_avx2(const Problem&, int64_t, int64_t, float*, int64_t) {}
bool cpu_has_avx2() { return false; }

#endif

}  // namespace tc_kernels

#ifdef TC_HAVE_X86
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
