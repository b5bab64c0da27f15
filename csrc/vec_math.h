// Eight-lane float math written with GCC vector extensions, so it is SIMD on every target.
//
// std::exp/std::log are scalar library calls; vexp/vlog are Cephes-style range reduction +
// polynomial, accurate to ~2 ulp on the ranges softmax needs. Row loops keep per-lane partial sums
// and add the lanes in a fixed order at the end, so results are deterministic without -ffast-math.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace pykd {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Compile a hot function for AVX2+FMA and for the baseline; the loader picks one at run time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(PYKD_NO_CLONES)
#define PYKD_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PYKD_HOT
#endif
#define PYKD_INLINE inline __attribute__((always_inline))

// Eight fp32 lanes (one AVX register; two SSE registers on the baseline target).
constexpr int kW = 8;
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef uint16_t vu16 __attribute__((vector_size(16)));
typedef _Float16 vh __attribute__((vector_size(16)));

PYKD_INLINE vf splat(float x) { return vf{} + x; }
PYKD_INLINE vf select(vi m, vf a, vf b) { return m ? a : b; }

PYKD_INLINE float hsum(vf v) {
  float s = 0.f;
  for (int j = 0; j < kW; ++j) s += v[j];
  return s;
}
PYKD_INLINE float hmax(vf v) {
  float m = -kInf;
  for (int j = 0; j < kW; ++j) m = v[j] > m ? v[j] : m;
  return m;
}
PYKD_INLINE vf vmax(vf a, vf b) { return select(a > b, a, b); }

// exp(x); exactly 0 for x < -87.3 (including -inf), +inf above 88.7.
PYKD_INLINE vf vexp(vf x) {
  const vf lo = splat(-87.3f), hi = splat(88.7f);
  const vf xc = select(x < lo, lo, select(x > hi, hi, x));
  // Round to nearest by adding 1.5 * 2^23 (exact for |v| < 2^22; SSE2 has no vector rint).
  const vf kf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  vf r = xc - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi k = __builtin_convertvector(kf, vi);
  const vf scale = (vf)((k + 127) << 23);
  return select(x < lo, vf{}, select(x > hi, splat(kInf), p * scale));
}

// log(x) for x > 0 in the normal range; log(0) = -inf.
PYKD_INLINE vf vlog(vf x) {
  const vi bits = (vi)x;
  vi e = ((bits >> 23) & 0xff) - 127;
  vf m = (vf)((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const vi big = m > 1.41421356f;  // move m into [sqrt(1/2), sqrt(2))
  m = select(big, m * 0.5f, m);
  e = e - big;  // big is -1 where true
  const vf f = m - 1.0f;
  const vf z = f * f;
  vf p = splat(7.0376836292e-2f);
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  vf y = f * z * p - 0.5f * z + f;
  y = y + __builtin_convertvector(e, vf) * 0.693147180559945f;
  return select(x == 0.0f, splat(-kInf), y);
}

// Loads of kW elements in the logits' dtype, and stores with one rounding (nearest even).
PYKD_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
PYKD_INLINE vf load(const c10::BFloat16* p) {
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
PYKD_INLINE vf load(const c10::Half* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, vf);
}
PYKD_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
PYKD_INLINE void store(c10::BFloat16* p, vf v) {
  const vu b = (vu)v;
  const vu r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  const vu out = (v != v) ? ((b >> 16) | 0x40u) : r;  // keep NaN a NaN
  const vu16 h = __builtin_convertvector(out, vu16);
  std::memcpy(p, &h, sizeof h);
}
PYKD_INLINE void store(c10::Half* p, vf v) {
  const vh h = __builtin_convertvector(v, vh);
  std::memcpy(p, &h, sizeof h);
}

// A partial block: the first n elements of x, the rest `fill`.
template <typename S>
PYKD_INLINE vf load_partial(const S* x, int64_t n, float fill) {
  float buf[kW];
  for (int j = 0; j < kW; ++j) buf[j] = j < n ? static_cast<float>(x[j]) : fill;
  return load(buf);
}
template <typename S>
PYKD_INLINE void store_partial(S* x, int64_t n, vf v) {
  S buf[kW];
  store(buf, v);
  for (int64_t j = 0; j < n; ++j) x[j] = buf[j];
}

// Calls body(vs, vt, k, n) on blocks of kW logits starting at k; n < kW only for the last block,
// whose missing lanes read -inf in both rows (-inf contributes exactly 0 to every sum below).
template <typename S, typename T, typename F>
PYKD_INLINE void blocks(const S* s, const T* t, int64_t V, F&& body) {
  int64_t k = 0;
  for (; k + kW <= V; k += kW) body(load(s + k), load(t + k), k, static_cast<int64_t>(kW));
  if (k < V) body(load_partial(s + k, V - k, -kInf), load_partial(t + k, V - k, -kInf), k, V - k);
}

// tanh(x): an odd Taylor polynomial below |x| = 1/4 (where 1 - e^{-2|x|} would cancel), else
// (1 - e) / (1 + e) with e = e^{-2|x|}. tanh(+-inf) = +-1, NaN stays NaN.
PYKD_INLINE vf vtanh(vf x) {
  const vf ax = select(x < 0.f, -x, x);
  const vf e = vexp(-2.f * ax);
  const vf big = (1.f - e) / (1.f + e);
  const vf x2 = x * x;
  const vf poly =
      x * (1.f + x2 * (-1.f / 3.f + x2 * (2.f / 15.f + x2 * (-17.f / 315.f + x2 * (62.f / 2835.f)))));
  return select(ax < 0.25f, poly, select(x < 0.f, -big, big));
}

// The logit map of logit_scale and logit_softcap: f(x) = c tanh(a x / c) (softcap c > 0), else a x.
// f is increasing, so f(max x) = max f(x). grad(f(x)) = f'(x), from the mapped value.
struct LogitMap {
  float scale = 1.f, cap = 0.f, inv_cap = 0.f;
  LogitMap() = default;
  LogitMap(double a, double c) : scale(static_cast<float>(a)), cap(static_cast<float>(c)),
                                 inv_cap(c > 0 ? static_cast<float>(1.0 / c) : 0.f) {}
  PYKD_INLINE vf operator()(vf x) const {
    x = x * scale;
    return cap > 0.f ? cap * vtanh(x * inv_cap) : x;
  }
  // A block of n <= kW entries: padding lanes stay -inf (f(-inf) = -c would give them mass).
  PYKD_INLINE vf operator()(vf x, int64_t n) const {
    const vf y = (*this)(x);
    if (n == kW || cap == 0.f) return y;
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7};
    return select(lane < static_cast<int32_t>(n), y, splat(-kInf));
  }
  PYKD_INLINE float operator()(float x) const { return (*this)(splat(x))[0]; }
  PYKD_INLINE vf grad(vf y) const {
    if (cap == 0.f) return splat(scale);
    const vf u = y * inv_cap;
    return scale * (1.f - u) * (1.f + u);
  }
  PYKD_INLINE float grad(float y) const { return grad(splat(y))[0]; }
};

template <typename S>
PYKD_INLINE float row_max(const S* x, int64_t V) {
  vf m = splat(-kInf);
  blocks(x, x, V, [&](vf v, vf, int64_t, int64_t) __attribute__((always_inline)) { m = vmax(m, v); });
  return hmax(m);
}

}  // namespace pykd
