// Host side of torchcompress::gguf_linear's native kernels: argument checks, threading, the choice
// of instruction set and of path:
//   gemv  - fused dequant + dot products straight from ggml's blocks (batch 1 and a few rows);
//   panel - a few weight rows decoded at a time into an L1 panel, multiplied into several rows of x
//           by a register-blocked micro-kernel (small batches: 16 rows of x and the like);
//   tiled - each thread dequantizes ~4 MB tiles of rows to fp32 and multiplies them with at::mm
//           (prefill-sized batches, where the matmul is compute bound).
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include "dispatch.h"
#include "gguf_linear.h"

namespace tc_kernels {
namespace {

const char* kTypes = "Q4_0 (2), Q4_1 (3), Q5_0 (6), Q5_1 (7), Q8_0 (8), Q4_K (12), Q5_K (13), Q6_K (14)";

// Fills p's weight fields from blocks (checked against qtype and in_features); returns blocks contiguous.
at::Tensor setup_blocks(GGUFProblem& p, const at::Tensor& blocks, int64_t qtype, int64_t in_features) {
  TORCH_CHECK(blocks.device().is_cpu(), "torchcompress._C.gguf_linear: CPU tensors only");
  TORCH_CHECK(gguf_block_info(static_cast<int>(qtype), &p.block, &p.block_bytes),
              "gguf_linear: native kernels handle ", kTypes, "; got type ", qtype);
  const int64_t K = in_features;
  TORCH_CHECK(K > 0 && K % p.block == 0, "gguf_linear: in_features ", K, " is not a multiple of the ", p.block,
              "-weight block of type ", qtype);
  const int64_t rb = K / p.block * p.block_bytes;
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.size(1) == rb,
              "gguf_linear: blocks must be (N, ", rb, ") uint8, got ", blocks.sizes(), " ", blocks.scalar_type());
  p.qtype = static_cast<int>(qtype);
  p.K = K;
  p.N = blocks.size(0);
  p.row_bytes = rb;
  at::Tensor bl = blocks.contiguous();
  p.blocks = bl.data_ptr<uint8_t>();
  return bl;
}

void dequant_rows(const GGUFProblem& p, Isa isa, int64_t n0, int64_t n1, float* dst, int64_t ldd) {
  if (isa == Isa::Avx512) gguf_dequant_avx512(p, n0, n1, dst, ldd);
  else if (isa == Isa::Avx2) gguf_dequant_avx2(p, n0, n1, dst, ldd);
  else gguf_dequant_portable(p, n0, n1, dst, ldd);
}

void run_gemv(const GGUFProblem& p, Isa isa) {
  at::parallel_for(0, p.N, row_grain(p.K, p.M), [&](int64_t s, int64_t e) {
    if (isa == Isa::Avx512) {
      gguf_rows_avx512(p, s, e);
    } else if (isa == Isa::Avx2) {
      gguf_rows_avx2(p, s, e);
    } else {
      std::vector<float> wbuf(static_cast<size_t>(p.K));
      gguf_rows_portable(p, s, e, wbuf.data());
    }
  });
}

// Panel path (AVX-512 and AVX2; the portable GEMV already dequantizes each row once for every row
// of x, so it serves as the portable panel path).
void run_panel(const GGUFProblem& p, Isa isa) {
  if (isa == Isa::Portable) {
    run_gemv(p, isa);
    return;
  }
  const bool wide = isa == Isa::Avx512;
  at::parallel_for(0, p.N, round_up(row_grain(p.K, p.M), 4), [&](int64_t s, int64_t e) {
    std::vector<float> scratch(static_cast<size_t>(wide ? gguf_panel_scratch_avx512(p.M) : gguf_panel_scratch_avx2(p.M)));
    if (wide) gguf_panel_avx512(p, s, e, scratch.data());
    else gguf_panel_avx2(p, s, e, scratch.data());
  });
}

// Same structure as int_linear.cpp's run_tiled: one parallel region, per-thread tiles of ~4 MB.
void run_tiled(const GGUFProblem& p, Isa isa, const at::Tensor& x, at::Tensor& out) {
  const int64_t K = p.K, N = p.N;
  const int64_t ldd = round_up(K, 16) + 16;
  const int64_t rows = std::clamp<int64_t>((int64_t{1} << 20) / ldd, 16, 512);
  const bool inference = c10::InferenceMode::is_enabled();  // thread-local: worker threads need it set
  at::parallel_for(0, N, rows, [&](int64_t b, int64_t e) {
    c10::InferenceMode guard(inference);
    at::Tensor tile = at::empty({rows, ldd}, x.options());
    float* t = tile.data_ptr<float>();
    for (int64_t n0 = b; n0 < e; n0 += rows) {
      const int64_t nt = std::min(rows, e - n0);
      dequant_rows(p, isa, n0, n0 + nt, t, ldd);
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

}  // namespace

at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& blocks, const c10::optional<at::Tensor>& bias,
                       int64_t qtype, int64_t in_features, const std::string& isa_name, const std::string& path,
                       int64_t gemv_max_batch, int64_t panel_min_batch) {
  const Isa isa = parse_isa(isa_name);
  TORCH_CHECK(path == "auto" || path == "gemv" || path == "panel" || path == "tiled",
              "gguf_linear: path must be auto, gemv, panel or tiled, got '", path, "'");
  TORCH_CHECK(x.device().is_cpu(), "torchcompress._C.gguf_linear: CPU tensors only");
  GGUFProblem p;
  at::Tensor bl = setup_blocks(p, blocks, qtype, in_features);
  const int64_t K = p.K;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "gguf_linear: x's last dim ", x.size(-1), " != in_features ", K);
  p.M = x.numel() / K;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == p.N, "gguf_linear: bias has ", b.numel(), " elements, expected ", p.N);
    p.bias = b.data_ptr<float>();
  }
  at::Tensor x2 = x.reshape({p.M, K}).to(at::kFloat).contiguous();
  p.x = x2.data_ptr<float>();
  at::Tensor out = at::empty({p.M, p.N}, x2.options());
  p.out = out.data_ptr<float>();
  if (p.M > 0 && p.N > 0) {
    const bool small = p.M <= gemv_max_batch;
    if (path == "gemv" || (path == "auto" && small && p.M < panel_min_batch)) run_gemv(p, isa);
    else if (path == "panel" || (path == "auto" && small)) run_panel(p, isa);
    else run_tiled(p, isa, x2, out);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = p.N;
  return out.to(x.scalar_type()).reshape(shape);
}

// Several weights that read the same x (q/k/v, gate/up), outputs side by side: one call and, for one
// row of x (a decode step), one parallel region over all their rows, so that both threads share
// every part instead of each small part running on one thread after another.
at::Tensor gguf_linear_rows(const at::Tensor& x, const std::vector<at::Tensor>& blocks,
                            const std::vector<c10::optional<at::Tensor>>& biases, const std::vector<int64_t>& qtypes,
                            int64_t in_features) {
  const size_t P = blocks.size();
  TORCH_CHECK(P > 0 && biases.size() == P && qtypes.size() == P,
              "gguf_linear_rows: blocks, biases and qtypes must have the same (non-zero) length");
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 && x.size(-1) == in_features,
              "gguf_linear_rows: x must be a CPU tensor with last dim ", in_features);
  const int64_t M = x.numel() / in_features;
  if (M != 1) {  // several rows of x: each part through the full entry point (paths by batch)
    std::vector<at::Tensor> outs;
    for (size_t j = 0; j < P; ++j)
      outs.push_back(gguf_linear(x, blocks[j], biases[j], qtypes[j], in_features, "auto", "auto", 64, 3));
    return at::cat(outs, -1);
  }
  const Isa isa = parse_isa("auto");
  std::vector<GGUFProblem> parts(P);
  std::vector<at::Tensor> keep;
  std::vector<int64_t> start(P + 1, 0);
  at::Tensor x2 = x.reshape({1, in_features}).to(at::kFloat).contiguous();
  for (size_t j = 0; j < P; ++j) {
    keep.push_back(setup_blocks(parts[j], blocks[j], qtypes[j], in_features));
    parts[j].M = 1;
    parts[j].x = x2.data_ptr<float>();
    if (biases[j].has_value() && biases[j]->defined()) {
      keep.push_back(biases[j]->to(at::kFloat).contiguous());
      TORCH_CHECK(keep.back().numel() == parts[j].N, "gguf_linear_rows: bias ", j, " has ", keep.back().numel(),
                  " elements, expected ", parts[j].N);
      parts[j].bias = keep.back().data_ptr<float>();
    }
    start[j + 1] = start[j] + parts[j].N;
  }
  at::Tensor out = at::empty({1, start[P]}, x2.options());
  for (size_t j = 0; j < P; ++j) parts[j].out = out.data_ptr<float>() + start[j];  // one row: column offset
  at::parallel_for(0, start[P], row_grain(in_features, 1), [&](int64_t s, int64_t e) {
    for_each_part(start, s, e, [&](size_t j, int64_t a, int64_t b) {
      if (isa == Isa::Avx512) gguf_rows_avx512(parts[j], a, b);
      else if (isa == Isa::Avx2) gguf_rows_avx2(parts[j], a, b);
      else {
        std::vector<float> wbuf(static_cast<size_t>(in_features));
        gguf_rows_portable(parts[j], a, b, wbuf.data());
      }
    });
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = start[P];
  return out.to(x.scalar_type()).reshape(shape);
}

at::Tensor gguf_dequantize(const at::Tensor& blocks, int64_t qtype, int64_t in_features, const std::string& isa_name) {
  const Isa isa = parse_isa(isa_name);
  GGUFProblem p;
  at::Tensor bl = setup_blocks(p, blocks, qtype, in_features);
  at::Tensor out = at::empty({p.N, p.K}, at::kFloat);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, p.N, std::max<int64_t>(1, (int64_t{1} << 16) / p.K),
                   [&](int64_t s, int64_t e) { dequant_rows(p, isa, s, e, o + s * p.K, p.K); });
  return out;
}

}  // namespace tc_kernels
