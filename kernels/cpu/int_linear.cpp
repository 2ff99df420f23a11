// torchcompress native CPU extension: argument checks, activation preparation, threading and the
// run-time choice of instruction set for torchcompress::int_linear.
//
// Two paths:
//   gemv  - fused dequant + dot products straight from the packed weights (batch 1 .. small);
//   tiled - dequantize a block of rows into an fp32 tile that stays in cache, then at::mm on it
//           (prefill-sized batches, where the matmul is compute bound).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <string>
#include <vector>

#include "dispatch.h"
#include "int_linear.h"

namespace tc_kernels {
namespace {

// Fills p from the tensors (shapes checked) and returns x as (M, K) fp32 contiguous.
at::Tensor setup_problem(Problem& p, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                         const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias, int64_t bits,
                         int64_t group_size, int64_t in_features, std::vector<at::Tensor>& keep) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu() && scale.device().is_cpu(),
              "torchcompress._C.int_linear: CPU tensors only");
  TORCH_CHECK(bits >= 2 && bits <= 8, "int_linear: bits must be in 2..8, got ", bits);
  TORCH_CHECK(group_size > 0, "int_linear: group_size must be positive, got ", group_size);
  const int64_t K = in_features;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "int_linear: x's last dim ", x.size(-1), " != in_features ", K);
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte, "int_linear: qweight must be 2-D uint8");
  const int64_t N = qweight.size(0), row_bytes = (K * bits + 7) / 8;
  TORCH_CHECK(qweight.size(1) == row_bytes, "int_linear: qweight has ", qweight.size(1), " bytes per row, ",
              K, " codes of ", bits, " bits need ", row_bytes);
  const int64_t G = (K + group_size - 1) / group_size;
  TORCH_CHECK(scale.dim() == 2 && (scale.size(0) == N || scale.size(0) == 1) &&
                  (scale.size(1) == G || scale.size(1) == 1),
              "int_linear: scale shape ", scale.sizes(), " does not fit (", N, ", ", G, ") or (1, 1)");
  p.M = x.numel() / K;
  p.N = N;
  p.K = K;
  p.bits = static_cast<int>(bits);
  p.gs = std::min(group_size, K);
  p.G = G;
  auto qw = qweight.contiguous();
  keep.push_back(qw);
  p.qw = qw.data_ptr<uint8_t>();
  p.row_bytes = row_bytes;
  auto sc = scale.contiguous();
  if (sc.scalar_type() == at::kHalf) p.st = ScaleType::F16;
  else if (sc.scalar_type() == at::kBFloat16) p.st = ScaleType::BF16;
  else {
    sc = sc.to(at::kFloat);
    p.st = ScaleType::F32;
  }
  keep.push_back(sc);
  p.scale = sc.data_ptr();
  p.s_rs = sc.size(0) == 1 ? 0 : sc.size(1);
  p.s_gs = sc.size(1) == 1 ? 0 : 1;
  if (zero.has_value() && zero->defined()) {
    auto z = zero->contiguous();
    TORCH_CHECK(z.scalar_type() == at::kByte && z.sizes() == sc.sizes(), "int_linear: zero must be uint8 shaped like scale");
    keep.push_back(z);
    p.zero = z.data_ptr<uint8_t>();
    p.z_rs = p.s_rs;
    p.z_gs = p.s_gs;
  }
  if (bias.has_value() && bias->defined()) {
    auto b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == N, "int_linear: bias has ", b.numel(), " elements, expected ", N);
    keep.push_back(b);
    p.bias = b.data_ptr<float>();
  }
  return x.reshape({p.M, K}).to(at::kFloat).contiguous();
}

// Zero-padded fp32 activations, split into even/odd columns for 4 bits (Prepared's layout).
Prepared prepare_x(const at::Tensor& x, int64_t M, int64_t K, int bits, std::vector<at::Tensor>& keep) {
  const bool four = bits == 4;
  const int64_t width = four ? (K + 1) / 2 : K;
  const int64_t ldx = round_up(width, 16) + 16;
  at::Tensor xa = at::zeros({M, ldx}, x.options());
  at::Tensor xb = four ? at::zeros({M, ldx}, x.options()) : at::Tensor();
  const float* xs = x.data_ptr<float>();
  float* pa = xa.data_ptr<float>();
  float* pb = four ? xb.data_ptr<float>() : nullptr;
  for (int64_t m = 0; m < M; ++m) {
    const float* r = xs + m * K;
    if (four) {
      for (int64_t k = 0; k < K; ++k) (k & 1 ? pb : pa)[m * ldx + (k >> 1)] = r[k];
    } else {
      std::memcpy(pa + m * ldx, r, static_cast<size_t>(K) * sizeof(float));
    }
  }
  keep.push_back(xa);
  if (four) keep.push_back(xb);
  Prepared q;
  q.xa = pa;
  q.xb = pb;
  q.ldx = ldx;
  return q;
}

void run_gemv(Problem& p, const at::Tensor& x, Isa isa) {
  const int64_t K = p.K;
  if (isa == Isa::Portable || !simd_supported(p)) {
    const float* xp = x.data_ptr<float>();
    at::parallel_for(0, p.N, row_grain(p.K, p.M), [&](int64_t b, int64_t e) {
      std::vector<float> wbuf(static_cast<size_t>(K));
      gemv_rows_portable(p, xp, b, e, wbuf.data());
    });
    return;
  }
  std::vector<at::Tensor> keep;
  const Prepared q = prepare_x(x, p.M, K, p.bits, keep);
  at::parallel_for(0, p.N, row_grain(p.K, p.M), [&](int64_t b, int64_t e) {
    if (isa == Isa::Avx512) gemv_rows_avx512(p, q, b, e);
    else gemv_rows_avx2(p, q, b, e);
  });
}

void run_tiled(Problem& p, const at::Tensor& x, at::Tensor& out, Isa isa) {
  const int64_t K = p.K, N = p.N;
  if (!simd_supported(p)) isa = Isa::Portable;
  const int64_t ldd = round_up(K + 1, 16) + 32;  // room for the SIMD dequantizers' overrun
  // One parallel region (a barrier per tile costs milliseconds on a busy machine): each thread
  // dequantizes its rows in tiles of ~4 MB (cache resident, and large enough that each at::mm call
  // is efficient) and multiplies them single-threaded (at::mm inside a parallel region runs on the
  // calling thread).
  const int64_t rows = std::clamp<int64_t>((int64_t{1} << 20) / ldd, 16, 512);
  const int64_t grain = std::max<int64_t>(rows, 1);
  // InferenceMode is thread-local and worker threads do not inherit it: without this guard,
  // at::mm_out into an inference tensor (the caller ran under torch.inference_mode) is refused.
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
    c10::InferenceMode guard(inference);
    at::Tensor tile = at::empty({rows, ldd}, x.options());
    float* t = tile.data_ptr<float>();
    for (int64_t n0 = b; n0 < e; n0 += rows) {
      const int64_t nt = std::min(rows, e - n0);
      if (isa == Isa::Avx512) dequant_rows_avx512(p, n0, n0 + nt, t, ldd);
      else if (isa == Isa::Avx2) dequant_rows_avx2(p, n0, n0 + nt, t, ldd);
      else dequant_rows_portable(p, n0, n0 + nt, t, ldd);
      at::Tensor w = tile.narrow(0, 0, nt).narrow(1, 0, K);  // (nt, K), row stride ldd
      at::Tensor o = out.narrow(1, n0, nt);
      if (p.bias != nullptr) {
        at::addmm_out(o, at::from_blob(const_cast<float*>(p.bias) + n0, {nt}, x.options()), x, w.t());
      } else {
        at::mm_out(o, x, w.t());
      }
    }
  });
}

at::Tensor int_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                      const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias, int64_t bits,
                      int64_t group_size, int64_t in_features, const std::string& isa_name,
                      const std::string& path, int64_t gemv_max_batch) {
  const Isa isa = parse_isa(isa_name);
  TORCH_CHECK(path == "auto" || path == "gemv" || path == "tiled", "int_linear: path must be auto, gemv or tiled, got '",
              path, "'");
  Problem p;
  std::vector<at::Tensor> keep;
  at::Tensor x2 = setup_problem(p, x, qweight, scale, zero, bias, bits, group_size, in_features, keep);
  at::Tensor out = at::empty({p.M, p.N}, x2.options());
  if (p.M > 0 && p.N > 0) {
    p.out = out.data_ptr<float>();
    const bool gemv = path == "gemv" || (path == "auto" && p.M <= gemv_max_batch);
    if (gemv) run_gemv(p, x2, isa);
    else run_tiled(p, x2, out, isa);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = p.N;
  return out.to(x.scalar_type()).reshape(shape);
}

// Several weights that read the same x (q/k/v, gate/up), outputs side by side; for one row of x
// with one code width and SIMD kernels, one prepared x and one parallel region over all their rows
// (see gguf_linear_rows), else each part through int_linear.
at::Tensor int_linear_rows(const at::Tensor& x, const std::vector<at::Tensor>& qweights,
                           const std::vector<at::Tensor>& scales, const std::vector<c10::optional<at::Tensor>>& zeros,
                           const std::vector<c10::optional<at::Tensor>>& biases, const std::vector<int64_t>& bits,
                           const std::vector<int64_t>& group_sizes, int64_t in_features) {
  const size_t P = qweights.size();
  TORCH_CHECK(P > 0 && scales.size() == P && zeros.size() == P && biases.size() == P && bits.size() == P &&
                  group_sizes.size() == P,
              "int_linear_rows: every list must have the same (non-zero) length");
  std::vector<Problem> parts(P);
  std::vector<at::Tensor> keep;
  std::vector<int64_t> start(P + 1, 0);
  at::Tensor x2;
  bool fused = true;
  for (size_t j = 0; j < P; ++j) {
    x2 = setup_problem(parts[j], x, qweights[j], scales[j], zeros[j], biases[j], bits[j], group_sizes[j], in_features, keep);
    fused = fused && parts[j].M == 1 && bits[j] == bits[0] && simd_supported(parts[j]);
    start[j + 1] = start[j] + parts[j].N;
  }
  const Isa isa = parse_isa("auto");
  if (!fused || isa == Isa::Portable) {
    std::vector<at::Tensor> outs;
    for (size_t j = 0; j < P; ++j)
      outs.push_back(int_linear(x, qweights[j], scales[j], zeros[j], biases[j], bits[j], group_sizes[j], in_features,
                                "auto", "auto", 32));
    return at::cat(outs, -1);
  }
  const Prepared q = prepare_x(x2, 1, in_features, static_cast<int>(bits[0]), keep);
  at::Tensor out = at::empty({1, start[P]}, x2.options());
  for (size_t j = 0; j < P; ++j) parts[j].out = out.data_ptr<float>() + start[j];  // one row: column offset
  at::parallel_for(0, start[P], row_grain(in_features, 1), [&](int64_t s, int64_t e) {
    for_each_part(start, s, e, [&](size_t j, int64_t a, int64_t b) {
      if (isa == Isa::Avx512) gemv_rows_avx512(parts[j], q, a, b);
      else gemv_rows_avx2(parts[j], q, a, b);
    });
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = start[P];
  return out.to(x.scalar_type()).reshape(shape);
}

}  // namespace
}  // namespace tc_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torchcompress native CPU kernels (int_linear: fused dequant + GEMV / tiled GEMM)";
  m.def("int_linear", &tc_kernels::int_linear, "y = x @ dequant(qweight)^T + bias", py::arg("x"), py::arg("qweight"),
        py::arg("scale"), py::arg("zero"), py::arg("bias"), py::arg("bits"), py::arg("group_size"),
        py::arg("in_features"), py::arg("isa") = "auto", py::arg("path") = "auto", py::arg("gemv_max_batch") = 32);
  m.def("gguf_linear", &tc_kernels::gguf_linear, "y = x @ dequant(GGUF blocks)^T + bias (fused GEMV / tiled GEMM)",
        py::arg("x"), py::arg("blocks"), py::arg("bias"), py::arg("qtype"), py::arg("in_features"), py::arg("isa") = "auto",
        py::arg("path") = "auto", py::arg("gemv_max_batch") = 32, py::arg("panel_min_batch") = 4);
  m.def("gguf_dequantize", &tc_kernels::gguf_dequantize, "GGUF blocks (N, row_bytes) -> (N, K) float32",
        py::arg("blocks"), py::arg("qtype"), py::arg("in_features"), py::arg("isa") = "auto");
  m.def("int_linear_rows", &tc_kernels::int_linear_rows,
        "torch.cat([int_linear(x, part j) for j], -1) in one call (one parallel region for one row of x)",
        py::arg("x"), py::arg("qweights"), py::arg("scales"), py::arg("zeros"), py::arg("biases"), py::arg("bits"),
        py::arg("group_sizes"), py::arg("in_features"));
  m.def("gguf_linear_rows", &tc_kernels::gguf_linear_rows,
        "torch.cat([gguf_linear(x, part j) for j], -1) in one call (one parallel region for one row of x)",
        py::arg("x"), py::arg("blocks"), py::arg("biases"), py::arg("qtypes"), py::arg("in_features"));
  tc_kernels::register_decode(m);
  m.def("available_isas", &tc_kernels::available_isas, "instruction sets usable on this CPU, best first");
}
