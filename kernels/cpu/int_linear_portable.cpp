// Portable (no intrinsics) kernels: any code width 2..8, any group size. Each row is dequantized
// into a scratch buffer and dotted with every row of x; the compiler vectorizes the dot product
// over eight independent partial sums.
#include "int_linear.h"

namespace tc_kernels {

static inline uint32_t code_at(const uint8_t* row, int64_t row_bytes, int bits, int64_t i) {
  const int64_t bit = i * bits;
  const int64_t byte = bit >> 3;
  uint32_t v = row[byte];
  if (byte + 1 < row_bytes) v |= static_cast<uint32_t>(row[byte + 1]) << 8;
  return (v >> (bit & 7)) & ((1u << bits) - 1u);
}

static void dequant_row(const Problem& p, int64_t n, float* w) {
  const uint8_t* row = p.qw + n * p.row_bytes;
  for (int64_t g = 0; g < p.G; ++g) {
    const float s = load_scale(p, n, g);
    const float z = load_zero(p, n, g);
    const int64_t k0 = g * p.gs;
    const int64_t k1 = (k0 + p.gs < p.K) ? k0 + p.gs : p.K;
    if (p.bits == 8) {
      for (int64_t k = k0; k < k1; ++k) w[k] = (static_cast<float>(row[k]) - z) * s;
    } else {
      for (int64_t k = k0; k < k1; ++k) w[k] = (static_cast<float>(code_at(row, p.row_bytes, p.bits, k)) - z) * s;
    }
  }
}

static inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[k + j] * b[k + j];
  }
  for (; k < n; ++k) acc[0] += a[k] * b[k];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

void gemv_rows_portable(const Problem& p, const float* x, int64_t n0, int64_t n1, float* wbuf) {
  for (int64_t n = n0; n < n1; ++n) {
    dequant_row(p, n, wbuf);
    const float b = p.bias ? p.bias[n] : 0.0f;
    for (int64_t m = 0; m < p.M; ++m) p.out[m * p.N + n] = dot(wbuf, x + m * p.K, p.K) + b;
  }
}

void dequant_rows_portable(const Problem& p, int64_t n0, int64_t n1, float* dst, int64_t ldd) {
  for (int64_t n = n0; n < n1; ++n) dequant_row(p, n, dst + (n - n0) * ldd);
}

}  // namespace tc_kernels
