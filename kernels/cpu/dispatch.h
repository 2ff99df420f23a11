// Host-side helpers shared by the extension's entry points (int_linear.cpp, gguf_linear.cpp):
// run-time choice of instruction set and the threading grain. Includes torch headers, so the ISA
// files (compiled under other target options) must not include it.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <string>
#include <vector>

#include "int_linear.h"  // cpu_has_avx2 / cpu_has_avx512

namespace tc_kernels {

enum class Isa { Portable, Avx2, Avx512 };

inline std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  if (cpu_has_avx512()) out.push_back("avx512");
  if (cpu_has_avx2()) out.push_back("avx2");
  out.push_back("portable");
  return out;
}

inline Isa parse_isa(const std::string& name) {
  const auto have = available_isas();
  const std::string pick = name == "auto" ? have.front() : name;
  TORCH_CHECK(std::find(have.begin(), have.end(), pick) != have.end(), "torchcompress._C: instruction set '", name,
              "' is not available on this CPU (available: ", c10::Join(", ", have), ")");
  if (pick == "avx512") return Isa::Avx512;
  if (pick == "avx2") return Isa::Avx2;
  return Isa::Portable;
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Rows per parallel task: enough work (~256K weight x activation products, ~15 us on one thread)
// that waking a second thread pays for itself; smaller layers run on the calling thread. (An OpenMP
// region costs a few microseconds on an idle machine but milliseconds when the cores are
// oversubscribed.) At 1M products, every layer of a small model's decode step but the output
// projection ran on one thread (SmolLM2: q/k/v 553K, gate/up 1.77M as two calls of 885K).
inline int64_t row_grain(int64_t K, int64_t M) {
  return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(K * std::min<int64_t>(M, 8), 1));
}

// Rows s..e of several weights laid end to end (part j owns rows start[j]..start[j+1]): calls
// f(j, a, b) with part j's own row range for every part the range touches (the *_linear_rows entries).
template <class F>
inline void for_each_part(const std::vector<int64_t>& start, int64_t s, int64_t e, F&& f) {
  for (size_t j = 0; j + 1 < start.size(); ++j) {
    const int64_t a = std::max(s, start[j]) - start[j], b = std::min(e, start[j + 1]) - start[j];
    if (a < b) f(j, a, b);
  }
}

// Entry points defined in gguf_linear.cpp, registered by int_linear.cpp's module.
at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& blocks, const c10::optional<at::Tensor>& bias,
                       int64_t qtype, int64_t in_features, const std::string& isa_name, const std::string& path,
                       int64_t gemv_max_batch, int64_t panel_min_batch);
at::Tensor gguf_dequantize(const at::Tensor& blocks, int64_t qtype, int64_t in_features, const std::string& isa_name);
at::Tensor gguf_linear_rows(const at::Tensor& x, const std::vector<at::Tensor>& blocks,
                            const std::vector<c10::optional<at::Tensor>>& biases, const std::vector<int64_t>& qtypes,
                            int64_t in_features);

// decode_step.cpp: the DecodePlan class (a whole Llama-family decode step in one call).
void register_decode(pybind11::module& m);

}  // namespace tc_kernels
