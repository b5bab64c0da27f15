// Branch-free float math that GCC auto-vectorizes inside fixed-width lane loops.
//
// std::exp/std::log are scalar library calls that block vectorization; these are Cephes-style
// range reduction + polynomial, accurate to ~2 ulp on the ranges softmax needs. Hot loops process
// rows in blocks of kLanes floats with per-lane accumulators so that float reductions vectorize
// without -ffast-math (the summation order is fixed, so results are deterministic).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace pykd {

constexpr int kLanes = 16;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Compile a hot function for AVX2+FMA and for the baseline; the loader picks one at run time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(PYKD_NO_CLONES)
#define PYKD_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PYKD_HOT
#endif

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// exp(x); exactly 0 for x < -87.3 (including -inf), +inf above 88.7.
inline float vexp(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float kf = __builtin_rintf(xc * 1.44269504088896341f);
  float r = xc - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = bits_to_float((static_cast<int32_t>(kf) + 127) << 23);
  const float y = p * scale;
  return x < -87.3f ? 0.0f : (x > 88.7f ? kInf : y);
}

// log(x) for x > 0 finite (normal range); log(0) = -inf.
inline float vlog(float x) {
  const int32_t bits = float_to_bits(x);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  float m = bits_to_float((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  // Move m into [sqrt(1/2), sqrt(2)) for a well-conditioned polynomial.
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float y = f * z * p - 0.5f * z + f;
  y = y + static_cast<float>(e) * 0.693147180559945f;
  return x == 0.0f ? -kInf : y;
}

template <typename T>
inline float to_f32(T v) {
  return static_cast<float>(v);
}

}  // namespace pykd
