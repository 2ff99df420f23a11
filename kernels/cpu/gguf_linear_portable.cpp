// Portable GGUF Q4_0 / Q8_0 rows: dequantize a row into a buffer, dot it with every row of x.
#include <cstring>

#include "gguf_linear.h"
#include "int_linear.h"  // half_to_float

namespace tc_kernels {

static void dequant_gguf_row(const GGUFProblem& p, int64_t n, float* w) {
  const uint8_t* row = p.blocks + n * p.row_bytes;
  const int64_t nblk = p.K / 32;
  for (int64_t i = 0; i < nblk; ++i) {
    uint16_t h;
    if (p.qtype == kGGMLQ4_0) {
      const uint8_t* b = row + i * 18;
      std::memcpy(&h, b, 2);
      const float d = half_to_float(h);
      for (int j = 0; j < 16; ++j) {
        w[i * 32 + j] = d * static_cast<float>((b[2 + j] & 15) - 8);
        w[i * 32 + j + 16] = d * static_cast<float>((b[2 + j] >> 4) - 8);
      }
    } else {
      const uint8_t* b = row + i * 34;
      std::memcpy(&h, b, 2);
      const float d = half_to_float(h);
      for (int j = 0; j < 32; ++j) w[i * 32 + j] = d * static_cast<float>(static_cast<int8_t>(b[2 + j]));
    }
  }
}

void gguf_rows_portable(const GGUFProblem& p, int64_t n0, int64_t n1, float* wbuf) {
  for (int64_t n = n0; n < n1; ++n) {
    dequant_gguf_row(p, n, wbuf);
    const float bias = p.bias ? p.bias[n] : 0.0f;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.x + m * p.K;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t k = 0; k < p.K; k += 8)
        for (int j = 0; j < 8; ++j) acc[j] += wbuf[k + j] * x[k + j];
      p.out[m * p.N + n] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + bias;
    }
  }
}

}  // namespace tc_kernels
