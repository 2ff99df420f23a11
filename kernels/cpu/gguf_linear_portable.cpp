// Portable GGUF rows: dequantize a row into a buffer (scalar, the reference's operations), dot it
// with every row of x over eight independent partial sums (the compiler vectorizes them).
#include <cstring>

#include "gguf_linear.h"
#include "int_linear.h"  // half_to_float

namespace tc_kernels {
namespace {

inline float f16_at(const uint8_t* b) {
  uint16_t h;
  std::memcpy(&h, b, 2);
  return half_to_float(h);
}

// One 32-weight block of a legacy type -> w[0:32].
void dequant_block32(int qtype, const uint8_t* b, float* w) {
  const float d = f16_at(b);
  switch (qtype) {
    case kGGMLQ4_0:
      for (int j = 0; j < 16; ++j) {
        w[j] = d * static_cast<float>((b[2 + j] & 15) - 8);
        w[j + 16] = d * static_cast<float>((b[2 + j] >> 4) - 8);
      }
      break;
    case kGGMLQ4_1: {
      const float m = f16_at(b + 2);
      for (int j = 0; j < 16; ++j) {
        w[j] = d * static_cast<float>(b[4 + j] & 15) + m;
        w[j + 16] = d * static_cast<float>(b[4 + j] >> 4) + m;
      }
      break;
    }
    case kGGMLQ5_0:
    case kGGMLQ5_1: {
      const bool one = qtype == kGGMLQ5_1;
      const float m = one ? f16_at(b + 2) : 0.0f;
      uint32_t qh;
      std::memcpy(&qh, b + (one ? 4 : 2), 4);
      const uint8_t* qs = b + (one ? 8 : 6);
      const int off = one ? 0 : 16;
      for (int j = 0; j < 16; ++j) {
        const int lo = (qs[j] & 15) | static_cast<int>(((qh >> j) & 1u) << 4);
        const int hi = (qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4);
        if (one) {
          w[j] = d * static_cast<float>(lo) + m;
          w[j + 16] = d * static_cast<float>(hi) + m;
        } else {
          w[j] = d * static_cast<float>(lo - off);
          w[j + 16] = d * static_cast<float>(hi - off);
        }
      }
      break;
    }
    default:  // Q8_0
      for (int j = 0; j < 32; ++j) w[j] = static_cast<float>(static_cast<int8_t>(b[2 + j])) * d;
  }
}

// One 256-weight K-quant block -> w[0:256].
void dequant_block256(int qtype, const uint8_t* b, float* w) {
  if (qtype == kGGMLQ6_K) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = f16_at(b + 208);
    for (int j = 0; j < 256; ++j) {
      const int h = j >> 7, k = (j >> 5) & 3, l = j & 31;
      const uint8_t lb = ql[64 * h + l + 32 * (k & 1)];
      const int q = ((k < 2 ? lb & 15 : lb >> 4) | (((qh[32 * h + l] >> (2 * k)) & 3) << 4)) - 32;
      w[j] = (d * static_cast<float>(sc[j >> 4])) * static_cast<float>(q);
    }
    return;
  }
  const bool five = qtype == kGGMLQ5_K;
  const float d = f16_at(b), dmin = f16_at(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + (five ? 48 : 16);
  for (int s = 0; s < 8; ++s) {
    int sc, mn;
    scale_min_k4(s, scales, &sc, &mn);
    const float dl = d * static_cast<float>(sc), ml = dmin * static_cast<float>(mn);
    const int g = s >> 1, shift = (s & 1) * 4;
    for (int l = 0; l < 32; ++l) {
      int q = (qs[32 * g + l] >> shift) & 15;
      if (five) q |= ((qh[l] >> s) & 1) << 4;
      w[32 * s + l] = dl * static_cast<float>(q) - ml;
    }
  }
}

}  // namespace

void gguf_dequant_portable(const GGUFProblem& p, int64_t n0, int64_t n1, float* dst, int64_t ldd) {
  const int64_t nblk = p.K / p.block;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.blocks + n * p.row_bytes;
    float* w = dst + (n - n0) * ldd;
    for (int64_t i = 0; i < nblk; ++i) {
      if (p.block == 32) dequant_block32(p.qtype, row + i * p.block_bytes, w + i * 32);
      else dequant_block256(p.qtype, row + i * p.block_bytes, w + i * 256);
    }
  }
}

void gguf_rows_portable(const GGUFProblem& p, int64_t n0, int64_t n1, float* wbuf) {
  for (int64_t n = n0; n < n1; ++n) {
    gguf_dequant_portable(p, n, n + 1, wbuf, p.K);
    const float bias = p.bias ? p.bias[n] : 0.0f;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.x + m * p.K;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t k = 0; k < p.K; k += 8)  // K is a multiple of 32
        for (int j = 0; j < 8; ++j) acc[j] += wbuf[k + j] * x[k + j];
      p.out[m * p.N + n] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + bias;
    }
  }
}

}  // namespace tc_kernels
