// Native GGUF quantizers: ggml's reference block quantizers (quantize_row_*_ref) and, for the
// K-quants, its importance-weighted ones (the quant_weights != NULL path of quantize_q*_K),
// reimplemented bit for bit; likewise the importance-weighted Q4_0/Q4_1/Q5_0/Q5_1 (llama.cpp uses
// them for the 32-weight fallback types when quantizing with an imatrix).
//
// Bit-exactness rests on doing the same IEEE float32 operations in the same order as ggml's C code:
// every sum is a left-to-right chain, a*b+c is two roundings (never a fused multiply-add: this file
// is compiled with fp-contract off and without an FMA target), divisions are divisions, and ggml's
// nearest_int (add 1.5*2^23, read the mantissa) and float->int8 conversions are reproduced as x86
// compilers emit them (truncate to int32, keep the low byte).
//
// Speed comes from SIMD *across sub-blocks*: the K-quant scale searches run the C loops element by
// element, each vector lane one sub-block (Q4_K/Q5_K: 8 sub-blocks of 32 = one super-block; Q2_K,
// Q3_K, Q6_K: 16 sub-blocks of 16 = two groups of 8), so every lane does exactly ggml's scalar
// sequence of operations. Branches become per-lane selects; make_q3_quants' early exit is dropped
// (a pass with no change leaves the state unchanged, so later passes are no-ops too). Super-blocks
// are spread over threads with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#pragma GCC optimize("fp-contract=off")

namespace tc_gguf {
namespace {

typedef float VF __attribute__((vector_size(32)));
typedef int32_t VI __attribute__((vector_size(32)));
constexpr int W = 8;  // lanes
constexpr int QK_K = 256;
constexpr float GROUP_MAX_EPS = 1e-15f;

#define TC_INLINE static inline __attribute__((always_inline))

// ---- scalar helpers ----------------------------------------------------------------------------

TC_INLINE int nearest_int(float f) {
  float v = f + 12582912.f;
  int32_t i;
  std::memcpy(&i, &v, 4);
  return (i & 0x007fffff) - 0x00400000;
}

TC_INLINE uint16_t f32_to_f16(float f) {  // round to nearest even, overflow -> inf
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (ax < 0x38800000u) {  // below 2^-14: a half subnormal; adding 0.5 rounds to a multiple of 2^-24
    float a;
    std::memcpy(&a, &ax, 4);
    float s = a + 0.5f;
    uint32_t b;
    std::memcpy(&b, &s, 4);
    return static_cast<uint16_t>(sign | (b - 0x3f000000u));
  }
  ax += 0xc8000fffu + ((ax >> 13) & 1u);  // rebias exponent, round mantissa to 10 bits (ties even)
  return static_cast<uint16_t>(sign | (ax >> 13));
}

TC_INLINE float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ffu;
  uint32_t bits;
  if (e == 0) {
    float v = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  } else if (e == 31) {
    bits = sign | 0x7f800000u | (m << 13);
  } else {
    bits = sign | ((e + 112) << 23) | (m << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

TC_INLINE float fp16_round(float f) { return f16_to_f32(f32_to_f16(f)); }

TC_INLINE void put_f16(uint8_t* p, float f) {
  const uint16_t h = f32_to_f16(f);
  p[0] = static_cast<uint8_t>(h & 0xff);
  p[1] = static_cast<uint8_t>(h >> 8);
}

TC_INLINE float get_f16(const uint8_t* p) { return f16_to_f32(static_cast<uint16_t>(p[0] | (p[1] << 8))); }

// float -> (int8_t) as x86 code does it: cvttss2si (INT_MIN when out of range), low byte.
TC_INLINE int c_int8(float v) { return static_cast<int8_t>(static_cast<uint8_t>(static_cast<int32_t>(v) & 0xff)); }

// ---- vector helpers (one lane per sub-block) -----------------------------------------------------

TC_INLINE VF splat(float f) { return VF{} + f; }
TC_INLINE VI splati(int32_t i) { return VI{} + i; }
TC_INLINE VF tof(VI i) { return __builtin_convertvector(i, VF); }
TC_INLINE VF vabs(VF v) {
  VI b;
  std::memcpy(&b, &v, sizeof b);
  b &= 0x7fffffff;
  VF out;
  std::memcpy(&out, &b, sizeof out);
  return out;
}
TC_INLINE VI vnearest(VF f) {
  VF v = f + 12582912.f;
  VI i;
  std::memcpy(&i, &v, sizeof i);
  return (i & 0x007fffff) - 0x00400000;
}
TC_INLINE VI vclamp(VI l, int lo, int hi) {
  l = l > hi ? splati(hi) : l;  // MIN(hi, l)
  return l < lo ? splati(lo) : l;  // MAX(lo, .)
}
TC_INLINE VF vsel(VI m, VF a, VF b) { return m ? a : b; }
TC_INLINE VI vseli(VI m, VI a, VI b) { return m ? a : b; }
TC_INLINE bool any(VI m) {
  int32_t r = 0;
  for (int k = 0; k < W; ++k) r |= m[k];
  return r != 0;
}
TC_INLINE VF vsqrt(VF v) {
  VF out;
  for (int k = 0; k < W; ++k) out[k] = std::sqrt(v[k]);
  return out;
}

// make_qkx2_quants (and make_qkx3_quants with weights: the same operations) on W sub-blocks of n.
// x, w: [n] lanes. L: [n] codes in [0, nmax]. Returns the scale, *the_min = -min.
TC_INLINE VF qkx_search(int n, int nmax, const VF* x, const VF* w, VI* L, VF* the_min, float rmin, float rdelta,
                        int nstep, bool use_mad) {
  VF mn = x[0], mx = x[0];
  VF sum_w = w[0];
  VF sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    mn = vsel(x[i] < mn, x[i], mn);
    mx = vsel(x[i] > mx, x[i], mx);
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  mn = vsel(mn > 0.f, VF{}, mn);
  const VI flat = mx == mn;
  VF iscale = (float)nmax / (mx - mn);
  VF scale = 1.f / iscale;
  VF best = VF{};
  for (int i = 0; i < n; ++i) {
    VI l = vclamp(vnearest(iscale * (x[i] - mn)), 0, nmax);
    L[i] = l;
    VF diff = scale * tof(l) + mn - x[i];
    diff = use_mad ? vabs(diff) : diff * diff;
    best += w[i] * diff;
  }
  VI laux[32];
  for (int is = 0; is <= nstep; ++is) {
    const float c = rmin + rdelta * (float)is + (float)nmax;
    iscale = c / (mx - mn);
    VF sum_l = VF{}, sum_l2 = VF{}, sum_xl = VF{};
    for (int i = 0; i < n; ++i) {
      VI l = vclamp(vnearest(iscale * (x[i] - mn)), 0, nmax);
      laux[i] = l;
      VF lf = tof(l);
      VF wl = w[i] * lf;
      sum_l += wl;
      sum_l2 += wl * lf;
      sum_xl += wl * x[i];
    }
    VF D = sum_w * sum_l2 - sum_l * sum_l;
    VI ok = (D > 0.f) & ~flat;  // flat lanes returned early in C
    if (!any(ok)) continue;
    VF this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
    VF this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
    VI pos = this_min > 0.f;
    this_min = vsel(pos, VF{}, this_min);
    this_scale = vsel(pos, sum_xl / sum_l2, this_scale);
    VF cur = VF{};
    for (int i = 0; i < n; ++i) {
      VF diff = this_scale * tof(laux[i]) + this_min - x[i];
      diff = use_mad ? vabs(diff) : diff * diff;
      cur += w[i] * diff;
    }
    VI upd = ok & (cur < best);
    if (!any(upd)) continue;
    for (int i = 0; i < n; ++i) L[i] = vseli(upd, laux[i], L[i]);
    best = vsel(upd, cur, best);
    scale = vsel(upd, this_scale, scale);
    mn = vsel(upd, this_min, mn);
  }
  for (int i = 0; i < n; ++i) L[i] = vseli(flat, VI{}, L[i]);
  *the_min = -mn;
  return vsel(flat, VF{}, scale);
}

// first element of largest magnitude, sign kept (0 when all are 0), and that magnitude
TC_INLINE void signed_absmax(int n, const VF* x, VF* mx, VF* amax) {
  VF m = VF{}, a = VF{};
  for (int i = 0; i < n; ++i) {
    VF ax = vabs(x[i]);
    VI gt = ax > a;
    a = vsel(gt, ax, a);
    m = vsel(gt, x[i], m);
  }
  *mx = m;
  *amax = a;
}

// make_qx_quants(n, nmax, x, L, rmse_type=1, qw): qw == nullptr means w = x*x. L in [0, 2*nmax).
TC_INLINE VF qx_search(int n, int nmax, const VF* x, const VF* qw, VI* L) {
  VF mx, amax;
  signed_absmax(n, x, &mx, &amax);
  const VI zero = amax < GROUP_MAX_EPS;
  VF w[32];
  for (int i = 0; i < n; ++i) w[i] = qw ? qw[i] : x[i] * x[i];
  VF iscale = (float)(-nmax) / mx;
  VF sumlx = VF{}, suml2 = VF{};
  for (int i = 0; i < n; ++i) {
    VI l = vclamp(vnearest(iscale * x[i]), -nmax, nmax - 1);
    L[i] = l + nmax;
    VF lf = tof(l);
    sumlx += w[i] * x[i] * lf;
    suml2 += w[i] * lf * lf;
  }
  VF scale = vsel(suml2 != 0.f, sumlx / suml2, VF{});
  VF best = scale * sumlx;
  VI ls[32];
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -((float)nmax + 0.1f * (float)is) / mx;
    sumlx = VF{};
    suml2 = VF{};
    for (int i = 0; i < n; ++i) {
      VI l = vclamp(vnearest(iscale * x[i]), -nmax, nmax - 1);
      ls[i] = l;
      VF lf = tof(l);
      sumlx += w[i] * x[i] * lf;
      suml2 += w[i] * lf * lf;
    }
    VI upd = (suml2 > 0.f) & (sumlx * sumlx > best * suml2);
    if (!any(upd)) continue;
    for (int i = 0; i < n; ++i) L[i] = vseli(upd, ls[i] + nmax, L[i]);
    scale = vsel(upd, sumlx / suml2, scale);
    best = vsel(upd, scale * sumlx, best);
  }
  for (int i = 0; i < n; ++i) L[i] = vseli(zero, VI{}, L[i]);
  return vsel(zero, VF{}, scale);
}

// make_q3_quants(n, nmax, x, L, do_rmse=true). L: L + nmax, or 0 for an all-zero sub-block.
TC_INLINE VF q3_search(int n, int nmax, const VF* x, VI* L) {
  VF mx, amax;
  signed_absmax(n, x, &mx, &amax);
  const VI zero = amax < GROUP_MAX_EPS;
  VF iscale = (float)(-nmax) / mx;
  VF sumlx = VF{}, suml2 = VF{};
  for (int i = 0; i < n; ++i) {
    VI l = vclamp(vnearest(iscale * x[i]), -nmax, nmax - 1);
    L[i] = l;
    VF w = x[i] * x[i];
    VF lf = tof(l);
    sumlx += w * x[i] * lf;
    suml2 += w * lf * lf;
  }
  for (int itry = 0; itry < 5; ++itry) {
    VI changed = VI{};
    for (int i = 0; i < n; ++i) {
      VF w = x[i] * x[i];
      VF li = tof(L[i]);
      VF slx = sumlx - w * x[i] * li;
      VF sl2 = suml2 - w * li * li;
      VI nl = vclamp(vnearest(x[i] * sl2 / slx), -nmax, nmax - 1);
      VF nf = tof(nl);
      VF slx2 = slx + w * x[i] * nf;
      VF sl22 = sl2 + w * nf * nf;
      VI upd = (slx > 0.f) & (nl != L[i]) & (sl22 > 0.f) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22);
      L[i] = vseli(upd, nl, L[i]);
      sumlx = vsel(upd, slx2, sumlx);
      suml2 = vsel(upd, sl22, suml2);
      changed |= upd;
    }
    if (!any(changed)) break;  // every lane's C loop has stopped too
  }
  for (int i = 0; i < n; ++i) L[i] = vseli(zero, VI{}, L[i] + nmax);
  VF scale = vsel(suml2 > 0.f, sumlx / suml2, VF{});
  return vsel(zero, VF{}, scale);
}

// make_qx_quants(n, nmax, x, L, 1, qw), scalar (the super-block scale quantization of Q3_K's impl)
TC_INLINE float qx_scalar(int n, int nmax, const float* x, int8_t* L, const float* qw) {
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < GROUP_MAX_EPS) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  auto clampq = [nmax](int l) { return l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l); };
  float iscale = (float)(-nmax) / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    int l = clampq(nearest_int(iscale * x[i]));
    L[i] = static_cast<int8_t>(l + nmax);
    float w = qw[i];
    sumlx += w * x[i] * (float)l;
    suml2 += w * (float)l * (float)l;
  }
  float scale = suml2 != 0.f ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -((float)nmax + 0.1f * (float)is) / max;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      int l = clampq(nearest_int(iscale * x[i]));
      float w = qw[i];
      sumlx += w * x[i] * (float)l;
      suml2 += w * (float)l * (float)l;
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(nmax + clampq(nearest_int(iscale * x[i])));
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// make_qp_quants: positive values (scales/mins of a super-block) on [0, nmax] with weights qw
TC_INLINE float qp_scalar(int n, int nmax, const float* x, uint8_t* L, const float* qw) {
  float max = 0;
  for (int i = 0; i < n; ++i) max = max > x[i] ? max : x[i];
  if (max < GROUP_MAX_EPS) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = (float)nmax / max;
  for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(nearest_int(iscale * x[i]));
  float scale = 1 / iscale;
  float best_mse = 0;
  for (int i = 0; i < n; ++i) {
    float diff = x[i] - scale * (float)L[i];
    best_mse += qw[i] * diff * diff;
  }
  for (int is = -4; is <= 4; ++is) {
    if (is == 0) continue;
    float iscale_is = (0.1f * (float)is + (float)nmax) / max;
    float scale_is = 1 / iscale_is;
    float mse = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale_is * x[i]);
      l = nmax < l ? nmax : l;
      float diff = x[i] - scale_is * (float)l;
      mse += qw[i] * diff * diff;
    }
    if (mse < best_mse) {
      best_mse = mse;
      iscale = iscale_is;
    }
  }
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    int l = nearest_int(iscale * x[i]);
    l = nmax < l ? nmax : l;
    L[i] = static_cast<uint8_t>(l);
    float w = qw[i];
    sumlx += w * x[i] * (float)l;
    suml2 += w * (float)l * (float)l;
  }
  for (int itry = 0; itry < 5; ++itry) {
    int n_changed = 0;
    for (int i = 0; i < n; ++i) {
      float w = qw[i];
      float slx = sumlx - w * x[i] * (float)L[i];
      float sl2 = suml2 - w * (float)L[i] * (float)L[i];
      if (slx > 0 && sl2 > 0) {
        int new_l = nearest_int(x[i] * sl2 / slx);
        new_l = nmax < new_l ? nmax : new_l;
        if (new_l != L[i]) {
          slx += w * x[i] * (float)new_l;
          sl2 += w * (float)new_l * (float)new_l;
          if (slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<uint8_t>(new_l);
            sumlx = slx;
            suml2 = sl2;
            ++n_changed;
          }
        }
      }
    }
    if (!n_changed) break;
  }
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// lanes[i][k] = x[(base + k) * n + i] for sub-blocks of n weights
TC_INLINE void load_t(const float* x, int n, int base, VF* out) {
  for (int i = 0; i < n; ++i)
    for (int k = 0; k < W; ++k) out[i][k] = x[(base + k) * n + i];
}

TC_INLINE void pack2(const uint8_t* L, uint8_t* qs) {
  for (int j = 0; j < QK_K; j += 128)
    for (int l = 0; l < 32; ++l)
      qs[j / 4 + l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

// ---- 32-weight blocks -------------------------------------------------------------------------

// A block as 4 vectors: v[0] = x[0..7], ..., v[3] = x[24..31]. Weight j and j + 16 share byte j.
typedef uint8_t VB __attribute__((vector_size(8)));
TC_INLINE void load32(const float* x, VF* v) { std::memcpy(v, x, 4 * sizeof(VF)); }
TC_INLINE void store8(uint8_t* p, VI v) {
  const VB b = __builtin_convertvector(v & 0xff, VB);
  std::memcpy(p, &b, 8);
}
TC_INLINE float hmax(VF a) {
  float m = a[0];
  for (int k = 1; k < W; ++k) m = a[k] > m ? a[k] : m;
  return m;
}
TC_INLINE float hmin(VF a) {
  float m = a[0];
  for (int k = 1; k < W; ++k) m = a[k] < m ? a[k] : m;
  return m;
}
// the first element of largest magnitude with its sign; +0.0f when all are zero (the C loop's start)
TC_INLINE float absmax_signed32(const VF* v, const float* x) {
  VF a = vabs(v[0]);
  for (int q = 1; q < 4; ++q) {
    const VF b = vabs(v[q]);
    a = vsel(b > a, b, a);
  }
  const float amax = hmax(a);
  if (!(amax > 0.f)) return 0.0f;
  for (int j = 0; j < 32; ++j)
    if (std::fabs(x[j]) == amax) return x[j];
  return 0.0f;
}
TC_INLINE void minmax32(const VF* v, float* mn, float* mx) {
  VF lo = v[0], hi = v[0];
  for (int q = 1; q < 4; ++q) {
    lo = vsel(v[q] < lo, v[q], lo);
    hi = vsel(v[q] > hi, v[q], hi);
  }
  *mn = hmin(lo);  // min/max of finite floats are exact and order-free (up to -0 == +0, which
  *mx = hmax(hi);  // the C loop resolves the same way: it keeps the first of equal values)
}
// (int8_t)(float) as x86 code does it: cvttps2dq (INT_MIN when out of range), low byte, sign-extended
TC_INLINE VI vint8(VF v) {
  const VI i = __builtin_convertvector(v, VI) & 0xff;
  return (i ^ 0x80) - 0x80;
}
TC_INLINE VI vmin(VI a, int hi) { return a > hi ? splati(hi) : a; }

TC_INLINE void block_q4_0(const float* x, uint8_t* y) {
  VF v[4];
  load32(x, v);
  const float max = absmax_signed32(v, x);
  const float d = max / -8;
  const float id = d != 0.f ? 1.0f / d : 0.0f;
  put_f16(y, d);
  VI q[4];
  for (int k = 0; k < 4; ++k) q[k] = vmin(vint8(v[k] * id + 8.5f), 15) & 0xff;
  store8(y + 2, q[0] | (q[2] << 4));
  store8(y + 10, q[1] | (q[3] << 4));
}

TC_INLINE void block_q4_1(const float* x, uint8_t* y) {
  VF v[4];
  load32(x, v);
  float mn, mx;
  minmax32(v, &mn, &mx);
  const float d = (mx - mn) / 15;
  const float id = d != 0.f ? 1.0f / d : 0.0f;
  put_f16(y, d);
  put_f16(y + 2, mn);
  VI q[4];
  for (int k = 0; k < 4; ++k) q[k] = vmin(vint8((v[k] - mn) * id + 0.5f), 15) & 0xff;
  store8(y + 4, q[0] | (q[2] << 4));
  store8(y + 12, q[1] | (q[3] << 4));
}

TC_INLINE uint32_t qh_bits(const VI* q) {  // bit j: 5th bit of weight j
  uint32_t qh = 0;
  for (int k = 0; k < 4; ++k)
    for (int l = 0; l < W; ++l) qh |= static_cast<uint32_t>((q[k][l] >> 4) & 1) << (8 * k + l);
  return qh;
}

TC_INLINE void block_q5_0(const float* x, uint8_t* y) {
  VF v[4];
  load32(x, v);
  const float max = absmax_signed32(v, x);
  const float d = max / -16;
  const float id = d != 0.f ? 1.0f / d : 0.0f;
  put_f16(y, d);
  VI q[4];
  for (int k = 0; k < 4; ++k) q[k] = vmin(vint8(v[k] * id + 16.5f), 31) & 0xff;
  const uint32_t qh = qh_bits(q);
  std::memcpy(y + 2, &qh, 4);
  store8(y + 6, (q[0] & 0x0F) | ((q[2] & 0x0F) << 4));
  store8(y + 14, (q[1] & 0x0F) | ((q[3] & 0x0F) << 4));
}

TC_INLINE void block_q5_1(const float* x, uint8_t* y) {
  VF v[4];
  load32(x, v);
  float mn, mx;
  minmax32(v, &mn, &mx);
  const float d = (mx - mn) / 31;
  const float id = d != 0.f ? 1.0f / d : 0.0f;
  put_f16(y, d);
  put_f16(y + 2, mn);
  VI q[4];
  for (int k = 0; k < 4; ++k) q[k] = __builtin_convertvector((v[k] - mn) * id + 0.5f, VI) & 0xff;  // (uint8_t)
  const uint32_t qh = qh_bits(q);
  std::memcpy(y + 4, &qh, 4);
  store8(y + 8, (q[0] & 0x0F) | ((q[2] & 0x0F) << 4));
  store8(y + 16, (q[1] & 0x0F) | ((q[3] & 0x0F) << 4));
}

// roundf then (int8_t): halves away from zero; NaN/huge give x86's INT_MIN (low byte 0)
TC_INLINE VI vround_int8(VF v) {
  VI i = __builtin_convertvector(v, VI);
  const VF frac = v - tof(i);  // exact where |v| < 2^23
  const VI small = vabs(v) < 8388608.f;
  i = i - ((frac >= 0.5f) & small) + ((frac <= -0.5f) & small);  // masks are -1
  return ((i & 0xff) ^ 0x80) - 0x80;
}

TC_INLINE float q8_scale(const VF* v, float* id) {
  VF a = vabs(v[0]);
  for (int q = 1; q < 4; ++q) {
    const VF b = vabs(v[q]);
    a = vsel(b > a, b, a);
  }
  const float amax = hmax(a);
  const float d = amax / 127;
  *id = d != 0.f ? 1.0f / d : 0.0f;
  return d;
}

TC_INLINE void block_q8_0(const float* x, uint8_t* y) {
  VF v[4];
  load32(x, v);
  float id;
  const float d = q8_scale(v, &id);
  put_f16(y, d);
  for (int k = 0; k < 4; ++k) store8(y + 2 + 8 * k, vround_int8(v[k] * id));
}

TC_INLINE void block_q8_1(const float* x, uint8_t* y) {
  VF v[4];
  load32(x, v);
  float id;
  const float d = q8_scale(v, &id);
  put_f16(y, d);
  VI sum = VI{};
  for (int k = 0; k < 4; ++k) {
    const VI q = vround_int8(v[k] * id);
    store8(y + 4 + 8 * k, q);
    sum += q;
  }
  int s = 0;
  for (int l = 0; l < W; ++l) s += sum[l];  // integer sum: exact in any order
  put_f16(y + 2, (float)s * d);
}

// ---- K-quants -----------------------------------------------------------------------------------

// Q2_K: scales[16] | qs[64] | d | dmin. qw: 256 importance weights (imatrix) or nullptr.
TC_INLINE void block_q2_k(const float* x, uint8_t* y, const float* qw) {
  float scales[16], mins[16];
  uint8_t L[QK_K];
  VF xt[16], wt[16];
  VI Lt[16];
  float sw[16] = {0};
  float sigma2 = 0;
  if (qw) {
    float sumx2 = 0;
    for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
    sigma2 = sumx2 / QK_K;
  }
  for (int g = 0; g < 2; ++g) {
    load_t(x, 16, 8 * g, xt);
    if (qw) {
      VF q[16];
      load_t(qw, 16, 8 * g, q);
      for (int l = 0; l < 16; ++l) wt[l] = q[l] * vsqrt(sigma2 + xt[l] * xt[l]);
      for (int k = 0; k < W; ++k)
        for (int l = 0; l < 16; ++l) sw[8 * g + k] += wt[l][k];
    } else {
      for (int l = 0; l < 16; ++l) wt[l] = vabs(xt[l]);
    }
    VF the_min;
    VF sc = qw ? qkx_search(16, 3, xt, wt, Lt, &the_min, -0.9f, 0.05f, 36, false)
               : qkx_search(16, 3, xt, wt, Lt, &the_min, -0.5f, 0.1f, 15, true);
    for (int k = 0; k < W; ++k) {
      scales[8 * g + k] = sc[k];
      mins[8 * g + k] = the_min[k];
      for (int l = 0; l < 16; ++l) L[16 * (8 * g + k) + l] = static_cast<uint8_t>(Lt[l][k]);
    }
  }
  uint8_t* ysc = y;
  float dm, mm;
  if (qw) {
    uint8_t Ls[16], Lm[16];
    dm = qp_scalar(16, 15, scales, Ls, sw);
    mm = qp_scalar(16, 15, mins, Lm, sw);
    put_f16(y + 80, dm);
    put_f16(y + 82, mm);
    for (int j = 0; j < 16; ++j) ysc[j] = static_cast<uint8_t>(Ls[j] | (Lm[j] << 4));
  } else {
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 16; ++j) {
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    if (max_scale > 0) {
      const float iscale = 15.f / max_scale;
      for (int j = 0; j < 16; ++j) ysc[j] = static_cast<uint8_t>(nearest_int(iscale * scales[j]));
      put_f16(y + 80, max_scale / 15.f);
    } else {
      for (int j = 0; j < 16; ++j) ysc[j] = 0;
      put_f16(y + 80, 0.f);
    }
    if (max_min > 0) {
      const float iscale = 15.f / max_min;
      for (int j = 0; j < 16; ++j) ysc[j] = static_cast<uint8_t>(ysc[j] | (nearest_int(iscale * mins[j]) << 4));
      put_f16(y + 82, max_min / 15.f);
    } else {
      put_f16(y + 82, 0.f);
    }
  }
  dm = get_f16(y + 80);
  mm = get_f16(y + 82);
  for (int j = 0; j < 16; ++j) {
    const float d = dm * (float)(ysc[j] & 0xF);
    if (d == 0.f) continue;
    const float m = mm * (float)(ysc[j] >> 4);
    for (int ii = 0; ii < 16; ++ii) {
      int l = nearest_int((x[16 * j + ii] + m) / d);
      L[16 * j + ii] = static_cast<uint8_t>(l < 0 ? 0 : (l > 3 ? 3 : l));
    }
  }
  pack2(L, y + 16);
}

// Q3_K: hmask[32] | qs[64] | scales[12] | d
TC_INLINE void block_q3_k(const float* x, uint8_t* y, const float* qw) {
  float scales[16];
  int8_t L[QK_K];
  VF xt[16];
  VI Lt[16];
  float sw[16] = {0};
  float sigma2 = 0;
  if (qw) {
    float sumx2 = 0;
    for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
    sigma2 = 2 * sumx2 / QK_K;
  }
  for (int g = 0; g < 2; ++g) {
    load_t(x, 16, 8 * g, xt);
    VF sc;
    if (qw) {
      VF q[16], wt[16];
      load_t(qw, 16, 8 * g, q);
      for (int l = 0; l < 16; ++l) wt[l] = q[l] * vsqrt(sigma2 + xt[l] * xt[l]);
      VF sumw = VF{};
      for (int l = 0; l < 16; ++l) sumw += wt[l];
      for (int k = 0; k < W; ++k) sw[8 * g + k] = sumw[k];
      sc = qx_search(16, 4, xt, wt, Lt);
    } else {
      sc = q3_search(16, 4, xt, Lt);
    }
    for (int k = 0; k < W; ++k) {
      scales[8 * g + k] = sc[k];
      for (int l = 0; l < 16; ++l) L[16 * (8 * g + k) + l] = static_cast<int8_t>(Lt[l][k]);
    }
  }
  uint8_t* ysc = y + 96;
  std::memset(ysc, 0, 12);
  if (qw) {
    int8_t Ls[16];
    const float d_block = qx_scalar(16, 32, scales, Ls, sw);
    for (int j = 0; j < 16; ++j) {
      int l = Ls[j];
      if (j < 8) ysc[j] = static_cast<uint8_t>(l & 0xF);
      else ysc[j - 8] = static_cast<uint8_t>(ysc[j - 8] | ((l & 0xF) << 4));
      l >>= 4;
      ysc[j % 4 + 8] = static_cast<uint8_t>(ysc[j % 4 + 8] | (l << (2 * (j / 4))));
    }
    put_f16(y + 108, d_block);
  } else {
    float max_scale = 0, amax = 0;
    for (int j = 0; j < 16; ++j) {
      const float s = std::fabs(scales[j]);
      if (s > amax) {
        amax = s;
        max_scale = scales[j];
      }
    }
    if (max_scale != 0.f) {
      const float iscale = -32.f / max_scale;
      for (int j = 0; j < 16; ++j) {
        int8_t l = static_cast<int8_t>(nearest_int(iscale * scales[j]));
        int li = l < -32 ? -32 : (l > 31 ? 31 : l);
        l = static_cast<int8_t>(li + 32);
        if (j < 8) ysc[j] = static_cast<uint8_t>(l & 0xF);
        else ysc[j - 8] = static_cast<uint8_t>(ysc[j - 8] | ((l & 0xF) << 4));
        l = static_cast<int8_t>(l >> 4);
        ysc[j % 4 + 8] = static_cast<uint8_t>(ysc[j % 4 + 8] | (l << (2 * (j / 4))));
      }
      put_f16(y + 108, 1 / iscale);
    } else {
      put_f16(y + 108, 0.f);
    }
  }
  const float dd = get_f16(y + 108);
  for (int j = 0; j < 16; ++j) {
    int sc = j < 8 ? (ysc[j] & 0xF) : (ysc[j - 8] >> 4);
    sc = (sc | (((ysc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
    const float d = dd * (float)sc;
    if (d == 0.f) continue;
    for (int ii = 0; ii < 16; ++ii) {
      int l = nearest_int(x[16 * j + ii] / d);
      l = l < -4 ? -4 : (l > 3 ? 3 : l);
      L[16 * j + ii] = static_cast<int8_t>(l + 4);
    }
  }
  uint8_t* hmask = y;
  std::memset(hmask, 0, 32);
  uint8_t U[QK_K];
  for (int j = 0; j < QK_K; ++j) {
    int l = L[j];
    if (l > 3) {
      hmask[j % 32] = static_cast<uint8_t>(hmask[j % 32] | (1 << (j / 32)));
      l -= 4;
    }
    U[j] = static_cast<uint8_t>(l);
  }
  pack2(U, y + 32);
}

// Q4_K / Q5_K common part: 8 sub-blocks of 32; head = d | dmin | scales[12]; L out in [0, nmax]
TC_INLINE void q45_k(const float* x, uint8_t* y, const float* qw, int nmax, float rmin, int nstep, uint8_t* L) {
  VF xt[32], wt[32];
  VI Lt[32];
  load_t(x, 32, 0, xt);
  float sigma2 = 0;
  if (qw) {
    float sum_x2 = 0;
    for (int l = 0; l < QK_K; ++l) sum_x2 += x[l] * x[l];
    sigma2 = 2 * sum_x2 / QK_K;
    VF q[32];
    load_t(qw, 32, 0, q);
    for (int l = 0; l < 32; ++l) wt[l] = q[l] * vsqrt(sigma2 + xt[l] * xt[l]);
  } else {
    VF sum_x2 = VF{};
    for (int l = 0; l < 32; ++l) sum_x2 += xt[l] * xt[l];
    const VF av_x = vsqrt(sum_x2 / 32.f);
    for (int l = 0; l < 32; ++l) wt[l] = av_x + vabs(xt[l]);
  }
  VF the_min;
  const VF sc = qw ? qkx_search(32, nmax, xt, wt, Lt, &the_min, -0.9f, 0.05f, 36, false)
                   : qkx_search(32, nmax, xt, wt, Lt, &the_min, rmin, 0.1f, nstep, false);
  float scales[8], mins[8];
  for (int k = 0; k < W; ++k) {
    scales[k] = sc[k];
    mins[k] = the_min[k];
    for (int l = 0; l < 32; ++l) L[32 * k + l] = static_cast<uint8_t>(Lt[l][k]);
  }
  uint8_t ls[8], lm[8];
  float dval, mval;
  if (qw) {
    VF sumw = VF{};
    for (int l = 0; l < 32; ++l) sumw += wt[l];
    float sw[8];
    for (int k = 0; k < W; ++k) sw[k] = sumw[k];
    dval = qp_scalar(8, 63, scales, ls, sw);
    mval = qp_scalar(8, 63, mins, lm, sw);
    if (nmax == 31)
      for (int j = 0; j < 8; ++j) {
        ls[j] = ls[j] < 63 ? ls[j] : 63;
        lm[j] = lm[j] < 63 ? lm[j] : 63;
      }
  } else {
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; ++j) {
      const uint8_t a = static_cast<uint8_t>(nearest_int(inv_scale * scales[j]));
      const uint8_t b = static_cast<uint8_t>(nearest_int(inv_min * mins[j]));
      ls[j] = a < 63 ? a : 63;
      lm[j] = b < 63 ? b : 63;
    }
    dval = max_scale / 63.f;
    mval = max_min / 63.f;
  }
  uint8_t* s = y + 4;
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      s[j] = ls[j];
      s[j + 4] = lm[j];
    } else {
      s[j + 4] = static_cast<uint8_t>((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
      s[j - 4] = static_cast<uint8_t>(s[j - 4] | ((ls[j] >> 4) << 6));
      s[j] = static_cast<uint8_t>(s[j] | ((lm[j] >> 4) << 6));
    }
  }
  put_f16(y, dval);
  put_f16(y + 2, mval);
  const float dd = get_f16(y), dmin = get_f16(y + 2);
  for (int j = 0; j < 8; ++j) {
    uint8_t sc_j, m_j;
    if (j < 4) {
      sc_j = s[j] & 63;
      m_j = s[j + 4] & 63;
    } else {
      sc_j = static_cast<uint8_t>((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
      m_j = static_cast<uint8_t>((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
    const float d = dd * (float)sc_j;
    if (d == 0.f) continue;
    const float dm = dmin * (float)m_j;
    for (int ii = 0; ii < 32; ++ii) {
      int l = nearest_int((x[32 * j + ii] + dm) / d);
      L[32 * j + ii] = static_cast<uint8_t>(l < 0 ? 0 : (l > nmax ? nmax : l));
    }
  }
}

TC_INLINE void block_q4_k(const float* x, uint8_t* y, const float* qw) {
  uint8_t L[QK_K];
  q45_k(x, y, qw, 15, -1.f, 20, L);
  uint8_t* q = y + 16;
  for (int j = 0; j < QK_K; j += 64) {
    for (int l = 0; l < 32; ++l) q[l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
    q += 32;
  }
}

TC_INLINE void block_q5_k(const float* x, uint8_t* y, const float* qw) {
  uint8_t L[QK_K];
  q45_k(x, y, qw, 31, -0.5f, 15, L);
  uint8_t* qh = y + 16;
  uint8_t* ql = y + 48;
  std::memset(qh, 0, 32);
  uint8_t m1 = 1, m2 = 2;
  for (int n = 0; n < QK_K; n += 64) {
    for (int j = 0; j < 32; ++j) {
      int l1 = L[n + j];
      if (l1 > 15) {
        l1 -= 16;
        qh[j] |= m1;
      }
      int l2 = L[n + j + 32];
      if (l2 > 15) {
        l2 -= 16;
        qh[j] |= m2;
      }
      ql[j] = static_cast<uint8_t>(l1 | (l2 << 4));
    }
    m1 = static_cast<uint8_t>(m1 << 2);
    m2 = static_cast<uint8_t>(m2 << 2);
    ql += 32;
  }
}

// Q6_K: ql[128] | qh[64] | scales:i8[16] | d
TC_INLINE void block_q6_k(const float* x, uint8_t* y, const float* qw) {
  float scales[16];
  int8_t L[QK_K];
  VF xt[16];
  VI Lt[16];
  for (int g = 0; g < 2; ++g) {
    load_t(x, 16, 8 * g, xt);
    VF sc;
    if (qw) {
      VF q[16];
      load_t(qw, 16, 8 * g, q);
      sc = qx_search(16, 32, xt, q, Lt);
    } else {
      sc = qx_search(16, 32, xt, nullptr, Lt);
    }
    for (int k = 0; k < W; ++k) {
      scales[8 * g + k] = sc[k];
      for (int l = 0; l < 16; ++l) L[16 * (8 * g + k) + l] = static_cast<int8_t>(Lt[l][k]);
    }
  }
  float max_scale = 0, max_abs_scale = 0;
  for (int ib = 0; ib < 16; ++ib) {
    const float a = std::fabs(scales[ib]);
    if (a > max_abs_scale) {
      max_abs_scale = a;
      max_scale = scales[ib];
    }
  }
  if (max_abs_scale < GROUP_MAX_EPS) {
    std::memset(y, 0, 210);
    return;
  }
  const float iscale = -128.f / max_scale;
  put_f16(y + 208, 1 / iscale);
  int8_t* ysc = reinterpret_cast<int8_t*>(y + 192);
  for (int ib = 0; ib < 16; ++ib) {
    const int v = nearest_int(iscale * scales[ib]);
    ysc[ib] = static_cast<int8_t>(v < 127 ? v : 127);
  }
  const float dd = get_f16(y + 208);
  for (int j = 0; j < 16; ++j) {
    const float d = dd * (float)ysc[j];
    if (d == 0.f) continue;
    for (int ii = 0; ii < 16; ++ii) {
      int l = nearest_int(x[16 * j + ii] / d);
      l = l < -32 ? -32 : (l > 31 ? 31 : l);
      L[16 * j + ii] = static_cast<int8_t>(l + 32);
    }
  }
  uint8_t* ql = y;
  uint8_t* qh = y + 128;
  for (int j = 0; j < QK_K; j += 128) {
    for (int l = 0; l < 32; ++l) {
      const uint8_t q1 = L[j + l] & 0xF, q2 = L[j + l + 32] & 0xF, q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
      ql[l] = static_cast<uint8_t>(q1 | (q3 << 4));
      ql[l + 32] = static_cast<uint8_t>(q2 | (q4 << 4));
      qh[l] = static_cast<uint8_t>((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                                   ((L[j + l + 96] >> 4) << 6));
    }
    ql += 64;
    qh += 32;
  }
}

// ---- dispatch ------------------------------------------------------------------------------------

struct TypeInfo {
  int block, bytes;
  bool kquant;
};

bool type_info(int64_t qtype, TypeInfo* t) {
  switch (qtype) {
    case 2: *t = {32, 18, false}; return true;   // Q4_0
    case 3: *t = {32, 20, false}; return true;   // Q4_1
    case 6: *t = {32, 22, false}; return true;   // Q5_0
    case 7: *t = {32, 24, false}; return true;   // Q5_1
    case 8: *t = {32, 34, false}; return true;   // Q8_0
    case 9: *t = {32, 36, false}; return true;   // Q8_1
    case 10: *t = {256, 84, true}; return true;  // Q2_K
    case 11: *t = {256, 110, true}; return true; // Q3_K
    case 12: *t = {256, 144, true}; return true; // Q4_K
    case 13: *t = {256, 176, true}; return true; // Q5_K
    case 14: *t = {256, 210, true}; return true; // Q6_K
    default: return false;
  }
}

// One function per instruction set (GCC/clang target_clones picks at load time); no FMA target.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TC_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TC_CLONES
#endif

TC_CLONES void run_blocks(int64_t qtype, const float* x, uint8_t* y, const float* qw, int64_t nb_row, int64_t b0,
                          int64_t b1, int block, int bytes) {
  for (int64_t b = b0; b < b1; ++b) {
    const float* xb = x + b * block;
    uint8_t* yb = y + b * bytes;
    const float* q = qw ? qw + (b % nb_row) * block : nullptr;
    switch (qtype) {
      case 2: block_q4_0(xb, yb); break;
      case 3: block_q4_1(xb, yb); break;
      case 6: block_q5_0(xb, yb); break;
      case 7: block_q5_1(xb, yb); break;
      case 8: block_q8_0(xb, yb); break;
      case 9: block_q8_1(xb, yb); break;
      case 10: block_q2_k(xb, yb, q); break;
      case 11: block_q3_k(xb, yb, q); break;
      case 12: block_q4_k(xb, yb, q); break;
      case 13: block_q5_k(xb, yb, q); break;
      case 14: block_q6_k(xb, yb, q); break;
      default: break;
    }
  }
}

// Importance-weighted 32-weight blocks (quantize_row_q4_0/q4_1/q5_0/q5_1_impl): 8 blocks at a time,
// one per lane (from anywhere in the tensor; a short last group repeats its last block).
// sigma2: per row, sum of squares / n_per_row.
TC_CLONES void run_legacy_imatrix(int64_t qtype, const float* x, uint8_t* y, const float* qw, const float* sigma2,
                                  int64_t nb_row, int64_t b0, int64_t b1, int bytes) {
  for (int64_t g = b0; g < b1; g += W) {
    int64_t blk[W];
    for (int k = 0; k < W; ++k) blk[k] = std::min(g + k, b1 - 1);
    VF xt[32], wt[32];
    VI Lt[32];
    for (int i = 0; i < 32; ++i)
      for (int k = 0; k < W; ++k) {
        const float v = x[blk[k] * 32 + i];
        xt[i][k] = v;
        wt[i][k] = qw[(blk[k] % nb_row) * 32 + i] * std::sqrt(sigma2[blk[k] / nb_row] + v * v);
      }
    VF d, the_min = VF{};
    if (qtype == 2) d = qx_search(32, 8, xt, wt, Lt);
    else if (qtype == 6) d = qx_search(32, 16, xt, wt, Lt);
    else d = qkx_search(32, qtype == 3 ? 15 : 31, xt, wt, Lt, &the_min, -0.9f, 0.05f, 36, false);
    const int n = static_cast<int>(std::min<int64_t>(W, b1 - g));
    for (int k = 0; k < n; ++k) {
      uint8_t* yb = y + (g + k) * bytes;
      put_f16(yb, d[k]);
      uint8_t* qs = yb + (qtype == 2 ? 2 : qtype == 3 ? 4 : qtype == 6 ? 6 : 8);
      if (qtype == 3 || qtype == 7) put_f16(yb + 2, -the_min[k]);
      uint32_t qh = 0;
      for (int j = 0; j < 16; ++j) {
        const uint32_t a = static_cast<uint32_t>(Lt[j][k]) & 0xff, b = static_cast<uint32_t>(Lt[j + 16][k]) & 0xff;
        qs[j] = static_cast<uint8_t>((a & 0x0F) | ((b & 0x0F) << 4));
        qh |= ((a & 0x10u) >> 4) << j;
        qh |= ((b & 0x10u) >> 4) << (j + 16);
      }
      if (qtype == 6) std::memcpy(yb + 2, &qh, 4);
      if (qtype == 7) std::memcpy(yb + 4, &qh, 4);
    }
  }
}

at::Tensor quantize(const at::Tensor& x, int64_t qtype, const c10::optional<at::Tensor>& quant_weights) {
  TypeInfo t;
  TORCH_CHECK(type_info(qtype, &t), "gguf quantize: unsupported ggml type ", qtype);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "gguf quantize: x must be a 2-D float32 CPU tensor, got ", x.scalar_type(), " ", x.sizes());
  const int64_t rows = x.size(0), k = x.size(1);
  TORCH_CHECK(k % t.block == 0, "gguf quantize: rows of ", k, " are not a multiple of the block of ", t.block);
  at::Tensor xc = x.contiguous();
  at::Tensor qw;
  const float* qwp = nullptr;
  if (quant_weights.has_value() && quant_weights->defined()) {
    TORCH_CHECK(t.kquant || qtype == 2 || qtype == 3 || qtype == 6 || qtype == 7 || qtype == 8,
                "gguf quantize: no importance-weighted quantizer for ggml type ", qtype);
    qw = quant_weights->to(at::kFloat).contiguous();
    TORCH_CHECK(qw.numel() == k, "gguf quantize: importance weights have ", qw.numel(), " values, rows have ", k);
    qwp = qw.data_ptr<float>();
    if (qtype == 8) qwp = nullptr;  // Q8_0 ignores importance weights (as quantize_q8_0 does)
  }
  const bool legacy_imatrix = qwp != nullptr && !t.kquant;
  std::vector<float> sigma2;
  if (legacy_imatrix) {  // per row: sum of squares (left to right) / n_per_row, as the _impl functions
    sigma2.resize(static_cast<size_t>(rows));
    const float* xr = xc.data_ptr<float>();
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float s2 = 0;
        for (int64_t j = 0; j < k; ++j) s2 += xr[r * k + j] * xr[r * k + j];
        sigma2[static_cast<size_t>(r)] = s2 / static_cast<float>(k);
      }
    });
  }
  const int64_t nb_row = k / t.block, nblocks = rows * nb_row;
  at::Tensor out = at::empty({rows, nb_row * t.bytes}, x.options().dtype(at::kByte));
  const float* xp = xc.data_ptr<float>();
  uint8_t* yp = out.data_ptr<uint8_t>();
  // Dynamic scheduling: each of at::parallel_for's threads takes small chunks from a shared counter
  // until none is left, so a thread the OS preempts (a busy machine) delays one chunk, not a fixed
  // half of the tensor.
  const int64_t chunk = t.kquant ? 16 : legacy_imatrix ? 64 : 2048;
  const int64_t nchunks = (nblocks + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), nchunks);
  auto work = [&]() {
    for (int64_t c = next.fetch_add(1); c < nchunks; c = next.fetch_add(1)) {
      const int64_t b0 = c * chunk, b1 = std::min(nblocks, (c + 1) * chunk);
      if (legacy_imatrix) run_legacy_imatrix(qtype, xp, yp, qwp, sigma2.data(), nb_row, b0, b1, t.bytes);
      else run_blocks(qtype, xp, yp, qwp, nb_row, b0, b1, t.block, t.bytes);
    }
  };
  if (nthreads <= 1) {
    work();
  } else {
    at::parallel_for(0, nthreads, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) work();
    });
  }
  return out;
}

}  // namespace
}  // namespace tc_gguf

TORCH_LIBRARY_FRAGMENT(tc_gguf, m) {
  m.def("quantize(Tensor x, int qtype, Tensor? quant_weights=None) -> Tensor", &tc_gguf::quantize);
}
