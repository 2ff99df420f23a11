// Native CPU kernels for torchcompress::gguf_linear on ggml's block formats (plain C++ header: the
// ISA files include it under different target options). Layouts, little-endian, one row of the
// weight = K / block blocks (see torchcompress/primitives/gguf_legacy.py and gguf_kquants.py):
//
//   Q4_0 (32 w, 18 B)  d:f16 | qs[16]                      w = d * (q - 8)
//   Q4_1 (32 w, 20 B)  d:f16 | m:f16 | qs[16]              w = d * q + m
//   Q5_0 (32 w, 22 B)  d:f16 | qh:u32 | qs[16]             w = d * (q - 16), bit 4 of q_j = bit j of qh
//   Q5_1 (32 w, 24 B)  d:f16 | m:f16 | qh:u32 | qs[16]     w = d * q + m
//   Q8_0 (32 w, 34 B)  d:f16 | qs:i8[32]                   w = d * q
//     (nibble byte j holds weight j in its low and weight j + 16 in its high half)
//   Q4_K (256 w, 144 B) d:f16 | dmin:f16 | scales[12] | qs[128]
//     8 sub-blocks s of 32: w = (d * sc[s]) * q - (dmin * mn[s]) (6-bit sc/mn, get_scale_min_k4);
//     qs byte 32g + l: low nibble = weight 64g + l, high nibble = weight 64g + 32 + l
//   Q5_K (256 w, 176 B) d:f16 | dmin:f16 | scales[12] | qh[32] | qs[128]   as Q4_K, bit 4 of
//     weight 32s + l = bit s of qh[l]
//   Q6_K (256 w, 210 B) ql[128] | qh[64] | sc:i8[16] | d:f16
//     weight 128h + 32k + l (k = 0..3, l = 0..31): low 4 bits from ql[64h + l + 32(k & 1)]
//     (low nibble for k < 2, high for k >= 2), bits 4-5 = (qh[32h + l] >> 2k) & 3;
//     w = (d * sc[j / 16]) * (q - 32)
//
// Every kernel dequantizes with the reference's fp32 operations in the reference's order (products
// d*sc first, then * q, then - min), so the weights are bit-identical to gguf_blocks.dequantize.
#pragma once

#include <cstdint>

namespace tc_kernels {

constexpr int kGGMLQ4_0 = 2;
constexpr int kGGMLQ4_1 = 3;
constexpr int kGGMLQ5_0 = 6;
constexpr int kGGMLQ5_1 = 7;
constexpr int kGGMLQ8_0 = 8;
constexpr int kGGMLQ4_K = 12;
constexpr int kGGMLQ5_K = 13;
constexpr int kGGMLQ6_K = 14;

// Weights and bytes per block of a type the native kernels handle; false for any other type.
inline bool gguf_block_info(int qtype, int64_t* block, int64_t* bytes) {
  switch (qtype) {
    case kGGMLQ4_0: *block = 32; *bytes = 18; return true;
    case kGGMLQ4_1: *block = 32; *bytes = 20; return true;
    case kGGMLQ5_0: *block = 32; *bytes = 22; return true;
    case kGGMLQ5_1: *block = 32; *bytes = 24; return true;
    case kGGMLQ8_0: *block = 32; *bytes = 34; return true;
    case kGGMLQ4_K: *block = 256; *bytes = 144; return true;
    case kGGMLQ5_K: *block = 256; *bytes = 176; return true;
    case kGGMLQ6_K: *block = 256; *bytes = 210; return true;
    default: return false;
  }
}

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K block (ggml's get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* q, int* sc, int* mn) {
  if (j < 4) {
    *sc = q[j] & 63;
    *mn = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

struct GGUFProblem {
  int64_t M = 0, N = 0, K = 0;  // x (M, K) fp32 contiguous, out (M, N)
  const float* x = nullptr;
  const uint8_t* blocks = nullptr;
  int64_t row_bytes = 0;
  int qtype = 0;
  int64_t block = 32, block_bytes = 18;  // from gguf_block_info
  const float* bias = nullptr;
  float* out = nullptr;
};

// out[:, n0:n1] = x @ dequant(rows n0..n1)^T + bias (fused GEMV; the portable one uses wbuf (K floats)).
void gguf_rows_portable(const GGUFProblem& p, int64_t n0, int64_t n1, float* wbuf);
void gguf_rows_avx2(const GGUFProblem& p, int64_t n0, int64_t n1);
void gguf_rows_avx512(const GGUFProblem& p, int64_t n0, int64_t n1);

// Same result for several rows of x: weight rows decoded into small fp32 panels that a register-
// blocked micro-kernel multiplies into several rows of x at once. scratch holds
// gguf_panel_scratch_*(M) floats.
void gguf_panel_avx512(const GGUFProblem& p, int64_t n0, int64_t n1, float* scratch);
int64_t gguf_panel_scratch_avx512(int64_t M);
void gguf_panel_avx2(const GGUFProblem& p, int64_t n0, int64_t n1, float* scratch);
int64_t gguf_panel_scratch_avx2(int64_t M);

// dst (n1 - n0, ldd) <- dequantized rows n0..n1 (exactly K floats per row are written).
void gguf_dequant_portable(const GGUFProblem& p, int64_t n0, int64_t n1, float* dst, int64_t ldd);
void gguf_dequant_avx2(const GGUFProblem& p, int64_t n0, int64_t n1, float* dst, int64_t ldd);
void gguf_dequant_avx512(const GGUFProblem& p, int64_t n0, int64_t n1, float* dst, int64_t ldd);

}  // namespace tc_kernels
