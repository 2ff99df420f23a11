// Shared declarations of the native CPU kernels for torchcompress::int_linear.
//
// Weight layout (see torchcompress/primitives/packing.py and affine.py):
//   qweight (N, row_bytes) uint8: each row a little-endian bit stream of K unsigned codes
//           (4 bits: low nibble = even column; 8 bits: the codes themselves);
//   scale   (N, G) float/half/bfloat16, or (1, 1) per tensor -> element strides s_rs, s_gs;
//   zero    (N, G) uint8 or null (symmetric: implicit zero point 2^(bits-1));
//   w[n, k] = (code[n, k] - zero[n, g]) * scale[n, g],  g = k / group_size; the last group may be
//   shorter than group_size.
//
// This header is included by the ISA files, which compile under different target options, so it
// holds plain C++ only (no torch headers).
#pragma once

#include <cstdint>
#include <cstring>

namespace tc_kernels {

enum class ScaleType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct Problem {
  int64_t M = 0, N = 0, K = 0;  // x (M, K), out (M, N)
  const uint8_t* qw = nullptr;
  int64_t row_bytes = 0;
  const void* scale = nullptr;
  ScaleType st = ScaleType::F32;
  int64_t s_rs = 0, s_gs = 0;  // scale element strides (row, group); 0 for a (1, 1) scale
  const uint8_t* zero = nullptr;
  int64_t z_rs = 0, z_gs = 0;
  int bits = 4;
  int64_t gs = 0, G = 0;  // group length along K and number of groups
  const float* bias = nullptr;  // (N) or null
  float* out = nullptr;  // (M, N), row stride N
};

// Activations prepared once per call and shared by all rows (all fp32, zero padded):
//   int8: xa = x, row stride ldx >= K + 16
//   int4: xa = even columns x[:, 0::2], xb = odd columns x[:, 1::2], row stride ldx >= ceil(K/2) + 16
struct Prepared {
  const float* xa = nullptr;
  const float* xb = nullptr;
  int64_t ldx = 0;
};

// Portable scalar helpers (also used by the SIMD files for per-group scalars).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal half -> normal float
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) {
        man <<= 1;
        --exp;
      }
      man &= 0x3ffu;
      bits = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float load_scale(const Problem& p, int64_t n, int64_t g) {
  const int64_t i = n * p.s_rs + g * p.s_gs;
  switch (p.st) {
    case ScaleType::F16: return half_to_float(static_cast<const uint16_t*>(p.scale)[i]);
    case ScaleType::BF16: return bf16_to_float(static_cast<const uint16_t*>(p.scale)[i]);
    default: return static_cast<const float*>(p.scale)[i];
  }
}

inline float load_zero(const Problem& p, int64_t n, int64_t g) {
  if (p.zero == nullptr) return static_cast<float>(1 << (p.bits - 1));
  return static_cast<float>(p.zero[n * p.z_rs + g * p.z_gs]);
}

// Which rows/inputs the SIMD kernels accept: 4- or 8-bit codes, and for 4 bits every group must
// start on a byte boundary (an even group length, or a single group).
inline bool simd_supported(const Problem& p) {
  if (p.bits == 8) return true;
  if (p.bits == 4) return p.G == 1 || p.gs % 2 == 0;
  return false;
}

// out[:, n0:n1] for all M rows of x (fused dequant + dot products, bias included).
void gemv_rows_portable(const Problem& p, const float* x, int64_t n0, int64_t n1, float* wbuf);
void gemv_rows_avx2(const Problem& p, const Prepared& q, int64_t n0, int64_t n1);
void gemv_rows_avx512(const Problem& p, const Prepared& q, int64_t n0, int64_t n1);

// dst (n1 - n0, ldd) <- dequantized rows n0..n1 (columns 0..K; columns past K are scratch).
void dequant_rows_portable(const Problem& p, int64_t n0, int64_t n1, float* dst, int64_t ldd);
void dequant_rows_avx2(const Problem& p, int64_t n0, int64_t n1, float* dst, int64_t ldd);
void dequant_rows_avx512(const Problem& p, int64_t n0, int64_t n1, float* dst, int64_t ldd);

bool cpu_has_avx2();
bool cpu_has_avx512();

}  // namespace tc_kernels
