// A whole decoder step of a Llama-family model for one token, in one native call and one OpenMP
// parallel region (torchcompress.runtime.Decoder's fast path for batch 1 with native-kernel layers).
//
// Why: a decode step of a small model is ~200 short pieces of work (per block: norm, q/k/v, RoPE,
// cache write, attention, o, residual, norm, gate/up, SiLU, down, residual). Run as one Python/torch
// call each, with an OpenMP region per linear layer, the step spent as much time between the kernels
// (Python, op dispatch, waking the second thread) as in them: SmolLM2 Q4_0 on 2 threads, 13 ms per
// token of which the linear kernels were 5.4 ms. Here the thread team is created once per step and
// the phases of a block are separated by barriers; the linear layers run the very row kernels their
// modules run (gguf_rows_* / gemv_rows_*), so their outputs are the modules' bit for bit. The small
// element-wise phases (RMSNorm, RoPE, SiLU) run on one thread: a few thousand floats.
//
// Arithmetic of the non-linear parts, as transformers' fp32 modules do it: RMSNorm
// x * rsqrt(mean(x^2) + eps) * w; RoPE x * cos + roll(x, hd/2) * sin_signed (the decoder's tables);
// attention softmax(q . k * scaling) . v over positions 0..pos. Sums run in another order than
// torch's, so logits differ from the Python path by float rounding (tests measure it).
#include <omp.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "dispatch.h"
#include "gguf_linear.h"
#include "int_linear.h"

namespace tc_kernels {
namespace {

// One linear layer computing one row of x: a GGUF block type or an int code layout.
struct Lin {
  bool gguf = true;
  GGUFProblem g;
  Problem q;
  int64_t N = 0, K = 0;
  std::vector<at::Tensor> keep;  // the tensors the raw pointers point into
};

// Several linear layers reading one input, outputs side by side (q/k/v; gate/up; or one layer).
struct Group {
  std::vector<int> lins;
  std::vector<int64_t> start;  // part j owns output rows start[j]..start[j+1]
  int64_t K = 0;
  bool int4 = false, int8 = false;  // which prepared copies of x the int parts read
  int slot = 0;  // which set of prepared buffers: 0 for q/k/v and gate/up, 1 for o and down (one set is
                 // written while the other group's rows still read theirs)
};

struct Layer {
  at::Tensor norm1, norm2, q_norm, k_norm;  // fp32; q/k norms (head_dim) may be undefined
  float eps1 = 0, eps2 = 0, qk_eps = 0;
  Group qkv, o, gate_up, down;
};

float rms_scale(const float* x, int64_t n, float eps) {
  double s = 0;  // a float sum of 576..8192 squares drifts by ~1e-6 relative; double costs nothing here
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * x[i];
  return 1.0f / std::sqrt(static_cast<float>(s / static_cast<double>(n)) + eps);
}

void rms_norm(const float* x, const float* w, int64_t n, float eps, float* out) {
  const float r = rms_scale(x, n, eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

void rope(float* x, const float* cos, const float* sin, int64_t hd) {
  const int64_t half = hd / 2;
  float tmp[1024];
  std::memcpy(tmp, x, static_cast<size_t>(hd) * sizeof(float));
  for (int64_t d = 0; d < hd; ++d) x[d] = tmp[d] * cos[d] + tmp[(d + half) % hd] * sin[d];
}

}  // namespace

class DecodePlan {
 public:
  DecodePlan(int64_t hidden, int64_t n_heads, int64_t n_kv, int64_t head_dim, double scaling, const at::Tensor& cos,
             const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache, const std::string& isa)
      : H_(hidden), nh_(n_heads), nkv_(n_kv), hd_(head_dim), scaling_(static_cast<float>(scaling)) {
    TORCH_CHECK(n_heads > 0 && n_kv > 0 && n_heads % n_kv == 0, "DecodePlan: n_heads ", n_heads,
                " must be a positive multiple of n_kv ", n_kv);
    TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0 && head_dim <= 1024, "DecodePlan: head_dim ", head_dim,
                " must be even and at most 1024");
    isa_ = parse_isa(isa);
    TORCH_CHECK(isa_ != Isa::Portable, "DecodePlan: needs AVX2 or AVX-512 (this CPU has neither)");
    cos_ = f32(cos, "cos");
    sin_ = f32(sin, "sin");
    TORCH_CHECK(cos_.dim() == 2 && cos_.size(1) == head_dim && sin_.sizes() == cos_.sizes(),
                "DecodePlan: cos/sin must be (max_len, head_dim), got ", cos.sizes(), " and ", sin.sizes());
    max_len_ = cos_.size(0);
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                    k_cache.sizes() == v_cache.sizes() && k_cache.dim() == 5 && k_cache.size(1) == 1 &&
                    k_cache.size(2) == n_kv && k_cache.size(3) == max_len_ && k_cache.size(4) == head_dim,
                "DecodePlan: caches must be contiguous fp32 (layers, 1, n_kv, max_len, head_dim), got ",
                k_cache.sizes());
    kc_ = k_cache;  // shared with the Python decoder (its prefill writes the same storage)
    vc_ = v_cache;
  }

  int64_t add_gguf(const at::Tensor& blocks, const c10::optional<at::Tensor>& bias, int64_t qtype, int64_t K) {
    Lin l;
    l.gguf = true;
    GGUFProblem& p = l.g;
    TORCH_CHECK(blocks.device().is_cpu() && gguf_block_info(static_cast<int>(qtype), &p.block, &p.block_bytes),
                "DecodePlan: GGUF type ", qtype, " has no native kernel");
    TORCH_CHECK(K % p.block == 0, "DecodePlan: in_features ", K, " is not a multiple of block ", p.block);
    const int64_t rb = K / p.block * p.block_bytes;
    TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.size(1) == rb,
                "DecodePlan: blocks must be (N, ", rb, ") uint8, got ", blocks.sizes());
    at::Tensor bl = blocks.contiguous();
    l.keep.push_back(bl);
    p.blocks = bl.data_ptr<uint8_t>();
    p.qtype = static_cast<int>(qtype);
    p.K = K;
    p.N = blocks.size(0);
    p.M = 1;
    p.row_bytes = rb;
    p.bias = bias_ptr(bias, p.N, l.keep);
    l.N = p.N;
    l.K = K;
    lins_.push_back(std::move(l));
    return static_cast<int64_t>(lins_.size()) - 1;
  }

  int64_t add_int(const at::Tensor& qweight, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                  const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size, int64_t K) {
    Lin l;
    l.gguf = false;
    Problem& p = l.q;
    TORCH_CHECK(bits == 4 || bits == 8, "DecodePlan: int layers of 4 or 8 bits only, got ", bits);
    TORCH_CHECK(group_size > 0, "DecodePlan: group_size must be positive");
    const int64_t N = qweight.size(0), rb = (K * bits + 7) / 8, G = (K + group_size - 1) / group_size;
    TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte && qweight.size(1) == rb,
                "DecodePlan: qweight must be (N, ", rb, ") uint8, got ", qweight.sizes());
    TORCH_CHECK(scale.dim() == 2 && (scale.size(0) == N || scale.size(0) == 1) && (scale.size(1) == G || scale.size(1) == 1),
                "DecodePlan: scale shape ", scale.sizes(), " does not fit (", N, ", ", G, ")");
    p.M = 1;
    p.N = N;
    p.K = K;
    p.bits = static_cast<int>(bits);
    p.gs = std::min(group_size, K);
    p.G = G;
    at::Tensor qw = qweight.contiguous();
    l.keep.push_back(qw);
    p.qw = qw.data_ptr<uint8_t>();
    p.row_bytes = rb;
    at::Tensor sc = scale.contiguous();
    if (sc.scalar_type() == at::kHalf) p.st = ScaleType::F16;
    else if (sc.scalar_type() == at::kBFloat16) p.st = ScaleType::BF16;
    else {
      sc = sc.to(at::kFloat);
      p.st = ScaleType::F32;
    }
    l.keep.push_back(sc);
    p.scale = sc.data_ptr();
    p.s_rs = sc.size(0) == 1 ? 0 : sc.size(1);
    p.s_gs = sc.size(1) == 1 ? 0 : 1;
    if (zero.has_value() && zero->defined()) {
      at::Tensor z = zero->contiguous();
      TORCH_CHECK(z.scalar_type() == at::kByte && z.sizes() == sc.sizes(), "DecodePlan: zero must be uint8 shaped like scale");
      l.keep.push_back(z);
      p.zero = z.data_ptr<uint8_t>();
      p.z_rs = p.s_rs;
      p.z_gs = p.s_gs;
    }
    p.bias = bias_ptr(bias, N, l.keep);
    TORCH_CHECK(simd_supported(p), "DecodePlan: ", bits, "-bit groups of ", group_size, " have no SIMD kernel");
    l.N = N;
    l.K = K;
    lins_.push_back(std::move(l));
    return static_cast<int64_t>(lins_.size()) - 1;
  }

  void add_layer(const at::Tensor& norm1, double eps1, const std::vector<int64_t>& qkv,
                 const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm, double qk_eps,
                 int64_t o, const at::Tensor& norm2, double eps2, const std::vector<int64_t>& gate_up, int64_t down) {
    const int64_t li = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(x_.empty(), "DecodePlan: layers are added before the first step");
    TORCH_CHECK(li < kc_.size(0), "DecodePlan: the caches hold ", kc_.size(0), " layers");
    Layer L;
    L.norm1 = vec(norm1, H_, "norm1");
    L.norm2 = vec(norm2, H_, "norm2");
    L.eps1 = static_cast<float>(eps1);
    L.eps2 = static_cast<float>(eps2);
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "DecodePlan: q_norm and k_norm come together");
    if (q_norm.has_value()) {
      L.q_norm = vec(*q_norm, hd_, "q_norm");
      L.k_norm = vec(*k_norm, hd_, "k_norm");
      L.qk_eps = static_cast<float>(qk_eps);
    }
    const int64_t qkv_rows = (nh_ + 2 * nkv_) * hd_;
    L.qkv = group(qkv, H_, qkv_rows, "q/k/v", 0);
    L.o = group({o}, nh_ * hd_, H_, "o_proj", 1);
    L.gate_up = group(gate_up, H_, -1, "gate/up", 0);
    const int64_t inter = L.gate_up.start.back() / 2;
    TORCH_CHECK(gate_up.size() == 2 && lins_[gate_up[0]].N == inter, "DecodePlan: gate and up must have equal widths");
    L.down = group({down}, inter, H_, "down_proj", 1);
    inter_ = std::max(inter_, inter);
    layers_.push_back(std::move(L));
  }

  // h: (1, H) fp32, the embedded token at position pos; returns the hidden state after every block.
  at::Tensor step(const at::Tensor& h_in, int64_t pos) {
    TORCH_CHECK(!layers_.empty(), "DecodePlan: no layers");
    TORCH_CHECK(h_in.scalar_type() == at::kFloat && h_in.numel() == H_, "DecodePlan: h must hold ", H_, " fp32 values");
    TORCH_CHECK(pos >= 0 && pos < max_len_, "DecodePlan: position ", pos, " outside the cache (", max_len_, ")");
    at::Tensor h = h_in.reshape({1, H_}).contiguous().clone();
    alloc();
    float* hp = h.data_ptr<float>();
    const int nt = std::max(1, at::get_num_threads());
    if (scores_.size() < static_cast<size_t>(nt) * max_len_) scores_.assign(static_cast<size_t>(nt) * max_len_, 0.f);
    const int64_t T = pos + 1;
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), n = omp_get_num_threads();
      float* scores = scores_.data() + static_cast<size_t>(tid) * max_len_;
      for (size_t li = 0; li < layers_.size(); ++li) {
        const Layer& L = layers_[li];
#pragma omp single
        {
          if (li > 0)
            for (int64_t i = 0; i < H_; ++i) hp[i] += out_[i];  // the previous block's MLP residual
          rms_norm(hp, L.norm1.data_ptr<float>(), H_, L.eps1, x_.data());
          prepare(L.qkv, x_.data(), 0, H_, true);
        }
        rows(L.qkv, x_.data(), qkv_.data(), tid, n);
#pragma omp barrier
#pragma omp single
        rope_and_cache(L, li, pos);
        // each thread's query heads, then their slices of o_proj's prepared input
        attention(li, T, scores, tid, n);
        for (int64_t h = tid; h < nh_; h += n) prepare(L.o, attn_.data(), h * hd_, (h + 1) * hd_, h == tid && tid == 0);
#pragma omp barrier
        rows(L.o, attn_.data(), out_.data(), tid, n);
#pragma omp barrier
#pragma omp single
        {
          for (int64_t i = 0; i < H_; ++i) hp[i] += out_[i];
          rms_norm(hp, L.norm2.data_ptr<float>(), H_, L.eps2, x_.data());
          prepare(L.gate_up, x_.data(), 0, H_, true);
        }
        {  // gate and up rows i in this thread's range, so SiLU(g) * u of the same i follows here
          const int64_t I = L.gate_up.start.back() / 2, a = I * tid / n, b = I * (tid + 1) / n;
          part_rows(L.gate_up, 0, x_.data(), gu_.data(), a, b);
          part_rows(L.gate_up, 1, x_.data(), gu_.data() + I, a, b);
          for (int64_t i = a; i < b; ++i) {
            const float g = gu_[i];
            act_[i] = g / (1.0f + std::exp(-g)) * gu_[I + i];
          }
          prepare(L.down, act_.data(), a, b, tid == 0);
        }
#pragma omp barrier
        rows(L.down, act_.data(), out_.data(), tid, n);
#pragma omp barrier
      }
#pragma omp single
      for (int64_t i = 0; i < H_; ++i) hp[i] += out_[i];
    }
    return h;
  }

  int64_t layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  static at::Tensor f32(const at::Tensor& t, const char* what) {
    TORCH_CHECK(t.device().is_cpu(), "DecodePlan: ", what, " must be a CPU tensor");
    return t.to(at::kFloat).contiguous();
  }

  static at::Tensor vec(const at::Tensor& t, int64_t n, const char* what) {
    TORCH_CHECK(t.numel() == n, "DecodePlan: ", what, " has ", t.numel(), " elements, expected ", n);
    return f32(t, what).reshape({n});
  }

  static const float* bias_ptr(const c10::optional<at::Tensor>& bias, int64_t N, std::vector<at::Tensor>& keep) {
    if (!bias.has_value() || !bias->defined()) return nullptr;
    at::Tensor b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == N, "DecodePlan: bias has ", b.numel(), " elements, expected ", N);
    keep.push_back(b);
    return b.data_ptr<float>();
  }

  Group group(const std::vector<int64_t>& ids, int64_t K, int64_t rows, const char* what, int slot) {
    Group g;
    g.K = K;
    g.slot = slot;
    g.start.push_back(0);
    for (int64_t id : ids) {
      TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(lins_.size()), "DecodePlan: ", what, ": no linear ", id);
      const Lin& l = lins_[id];
      TORCH_CHECK(l.K == K, "DecodePlan: ", what, " reads ", l.K, " features, expected ", K);
      g.lins.push_back(static_cast<int>(id));
      g.start.push_back(g.start.back() + l.N);
      if (!l.gguf) (l.q.bits == 4 ? g.int4 : g.int8) = true;
    }
    TORCH_CHECK(rows < 0 || g.start.back() == rows, "DecodePlan: ", what, " has ", g.start.back(), " outputs, expected ",
                rows);
    max_k_ = std::max(max_k_, K);
    return g;
  }

  void alloc() {
    if (!x_.empty()) return;
    const size_t width = static_cast<size_t>(round_up((max_k_ + 1) / 2, 16) + 16);
    x_.assign(static_cast<size_t>(std::max(H_, nh_ * hd_)), 0.f);
    qkv_.assign(static_cast<size_t>((nh_ + 2 * nkv_) * hd_), 0.f);
    attn_.assign(static_cast<size_t>(nh_ * hd_), 0.f);
    out_.assign(static_cast<size_t>(H_), 0.f);
    gu_.assign(static_cast<size_t>(2 * inter_), 0.f);
    act_.assign(static_cast<size_t>(inter_), 0.f);
    for (int s = 0; s < 2; ++s) {
      xa_[s].assign(width, 0.f);
      xb_[s].assign(width, 0.f);
      x8_[s].assign(static_cast<size_t>(round_up(max_k_, 16) + 16), 0.f);
    }
  }

  // Elements a..b of the int kernels' zero-padded activation copies of x (int_linear.cpp's prepare_x
  // for one row: 4 bits even/odd columns, 8 bits x itself); pad: also zero everything past K (one
  // caller per group does it; the buffers are shared by groups of different widths).
  void prepare(const Group& g, const float* x, int64_t a, int64_t b, bool pad) {
    const int64_t K = g.K;
    float* xa = xa_[g.slot].data();
    float* xb = xb_[g.slot].data();
    float* x8 = x8_[g.slot].data();
    if (g.int4) {
      for (int64_t k = a; k < b; ++k) (k & 1 ? xb : xa)[k >> 1] = x[k];
      if (pad) {
        const int64_t width = (K + 1) / 2, size = static_cast<int64_t>(xb_[g.slot].size());
        if (K & 1) xb[width - 1] = 0.f;
        std::fill(xa + width, xa + size, 0.f);
        std::fill(xb + width, xb + size, 0.f);
      }
    }
    if (g.int8) {
      std::memcpy(x8 + a, x + a, static_cast<size_t>(b - a) * sizeof(float));
      if (pad) std::fill(x8 + K, x8 + x8_[g.slot].size(), 0.f);
    }
  }

  // Rows a..b of part j of the group (a GGUF or an int layer), written to out[a..b).
  void part_rows(const Group& g, size_t j, const float* x, float* out, int64_t a, int64_t b) {
    if (a >= b) return;
    const Lin& l = lins_[g.lins[j]];
    if (l.gguf) {
      GGUFProblem p = l.g;
      p.x = x;
      p.out = out;
      if (isa_ == Isa::Avx512) gguf_rows_avx512(p, a, b);
      else gguf_rows_avx2(p, a, b);
    } else {
      Problem p = l.q;
      p.out = out;
      Prepared q;
      if (p.bits == 4) {
        q.xa = xa_[g.slot].data();
        q.xb = xb_[g.slot].data();
        q.ldx = static_cast<int64_t>(xb_[g.slot].size());
      } else {
        q.xa = x8_[g.slot].data();
        q.ldx = static_cast<int64_t>(x8_[g.slot].size());
      }
      if (isa_ == Isa::Avx512) gemv_rows_avx512(p, q, a, b);
      else gemv_rows_avx2(p, q, a, b);
    }
  }

  // This thread's share of the group's output rows (an equal split: every part's rows cost alike).
  void rows(const Group& g, const float* x, float* out, int tid, int n) {
    const int64_t R = g.start.back();
    const int64_t s = R * tid / n, e = R * (tid + 1) / n;
    for_each_part(g.start, s, e, [&](size_t j, int64_t a, int64_t b) { part_rows(g, j, x, out + g.start[j], a, b); });
  }

  float* kslot(int64_t li, int64_t g, int64_t t) {
    return kc_.data_ptr<float>() + ((li * nkv_ + g) * max_len_ + t) * hd_;
  }
  float* vslot(int64_t li, int64_t g, int64_t t) {
    return vc_.data_ptr<float>() + ((li * nkv_ + g) * max_len_ + t) * hd_;
  }

  void rope_and_cache(const Layer& L, int64_t li, int64_t pos) {
    const float* c = cos_.data_ptr<float>() + pos * hd_;
    const float* s = sin_.data_ptr<float>() + pos * hd_;
    float* q = qkv_.data();
    float* k = q + nh_ * hd_;
    const float* v = k + nkv_ * hd_;
    for (int64_t h = 0; h < nh_ + nkv_; ++h) {
      float* x = q + h * hd_;  // q heads, then k heads (contiguous)
      if (L.q_norm.defined()) {
        const float* w = (h < nh_ ? L.q_norm : L.k_norm).data_ptr<float>();
        rms_norm(x, w, hd_, L.qk_eps, x);
      }
      rope(x, c, s, hd_);
    }
    for (int64_t g = 0; g < nkv_; ++g) {
      std::memcpy(kslot(li, g, pos), k + g * hd_, static_cast<size_t>(hd_) * sizeof(float));
      std::memcpy(vslot(li, g, pos), v + g * hd_, static_cast<size_t>(hd_) * sizeof(float));
    }
  }

  // Query heads split across the threads; each reads its KV head's cache rows 0..T-1.
  void attention(int64_t li, int64_t T, float* scores, int tid, int n) {
    const int64_t group = nh_ / nkv_;
    for (int64_t h = tid; h < nh_; h += n) {
      const float* q = qkv_.data() + h * hd_;
      const int64_t g = h / group;
      float mx = -INFINITY;
      for (int64_t t = 0; t < T; ++t) {
        const float* k = kslot(li, g, t);
        float d = 0.f;
        for (int64_t i = 0; i < hd_; ++i) d += q[i] * k[i];
        scores[t] = d * scaling_;
        mx = std::max(mx, scores[t]);
      }
      float sum = 0.f;
      for (int64_t t = 0; t < T; ++t) {
        scores[t] = std::exp(scores[t] - mx);
        sum += scores[t];
      }
      float* o = attn_.data() + h * hd_;
      std::fill(o, o + hd_, 0.f);
      for (int64_t t = 0; t < T; ++t) {
        const float w = scores[t] / sum;
        const float* v = vslot(li, g, t);
        for (int64_t i = 0; i < hd_; ++i) o[i] += w * v[i];
      }
    }
  }

  int64_t H_, nh_, nkv_, hd_, max_len_ = 0, max_k_ = 0, inter_ = 0;
  float scaling_;
  Isa isa_ = Isa::Portable;
  at::Tensor cos_, sin_, kc_, vc_;
  std::vector<Lin> lins_;
  std::vector<Layer> layers_;
  std::vector<float> x_, qkv_, attn_, out_, gu_, act_, scores_;
  std::vector<float> xa_[2], xb_[2], x8_[2];
};

void register_decode(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<DecodePlan>(m, "DecodePlan", "A Llama-family decode step for one token in one native call")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, double, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const at::Tensor&, const std::string&>(),
           py::arg("hidden"), py::arg("n_heads"), py::arg("n_kv"), py::arg("head_dim"), py::arg("scaling"),
           py::arg("cos"), py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"), py::arg("isa") = "auto")
      .def("add_gguf", &DecodePlan::add_gguf, py::arg("blocks"), py::arg("bias"), py::arg("qtype"), py::arg("in_features"))
      .def("add_int", &DecodePlan::add_int, py::arg("qweight"), py::arg("scale"), py::arg("zero"), py::arg("bias"),
           py::arg("bits"), py::arg("group_size"), py::arg("in_features"))
      .def("add_layer", &DecodePlan::add_layer, py::arg("norm1"), py::arg("eps1"), py::arg("qkv"), py::arg("q_norm"),
           py::arg("k_norm"), py::arg("qk_eps"), py::arg("o"), py::arg("norm2"), py::arg("eps2"), py::arg("gate_up"),
           py::arg("down"))
      .def("step", &DecodePlan::step, py::arg("h"), py::arg("pos"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("layers", &DecodePlan::layers);
}

}  // namespace tc_kernels
