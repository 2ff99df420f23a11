// Native CPU kernels for torchcompress::gguf_linear on ggml's 32-weight blocks (plain C++ header).
//   Q4_0 (18 bytes): d fp16 | qs[16]: w[j] = d * ((qs[j] & 15) - 8), w[j + 16] = d * ((qs[j] >> 4) - 8)
//   Q8_0 (34 bytes): d fp16 | qs[32] int8: w[j] = d * qs[j]
#pragma once

#include <cstdint>

namespace tc_kernels {

constexpr int kGGMLQ4_0 = 2;
constexpr int kGGMLQ8_0 = 8;

struct GGUFProblem {
  int64_t M = 0, N = 0, K = 0;  // x (M, K) fp32 contiguous, out (M, N)
  const float* x = nullptr;
  const uint8_t* blocks = nullptr;
  int64_t row_bytes = 0;
  int qtype = 0;
  const float* bias = nullptr;
  float* out = nullptr;
};

void gguf_rows_portable(const GGUFProblem& p, int64_t n0, int64_t n1, float* wbuf);
void gguf_rows_avx512(const GGUFProblem& p, int64_t n0, int64_t n1);

}  // namespace tc_kernels
