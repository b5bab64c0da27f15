// CPU kernel of pykd::quantize_tokens, the Q/K quantization pre-pass of a quantized student
// (DESIGN.md section 6; Triton version in kernels/sparse_quant.py).
//
// Per (b, h, block of block_size tokens) of x (B, H, N, D): y = x - mean (the token mean, when
// given: K smoothing), scale = amax|y| / L over the block (L = 127 int8, 448 fp8 e4m3; 1 for an
// all-zero block), codes = round_half_even(y / scale) clamped to [-127, 127] (int8) or fp8 e4m3 of
// y / scale clamped to [-448, 448] (round to nearest even), deq = codes * scale. One read of x,
// every step in fp32 with IEEE division, so the codes equal pykd.reference.quantize_tokens'.
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "kd_common.h"

namespace pykd {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> quantize_tokens_cpu(const Tensor& x, const std::optional<Tensor>& mean,
                                                       const std::string& fmt, int64_t block_size) {
  TORCH_CHECK_VALUE(x.dim() == 4, "pykd: quantize_tokens needs x of shape (B, H, N, D)");
  TORCH_CHECK_VALUE(fmt == "int8" || fmt == "fp8_e4m3", "pykd: fmt must be int8 or fp8_e4m3; got ", fmt);
  TORCH_CHECK_VALUE(block_size > 0, "pykd: block_size must be positive");
  const bool fp8 = fmt == "fp8_e4m3";
  const float levels = fp8 ? 448.0f : 127.0f;
  const int64_t B = x.size(0), H = x.size(1), N = x.size(2), D = x.size(3);
  const int64_t nb = (N + block_size - 1) / block_size;
  auto xf = x.to(at::kFloat).contiguous();
  Tensor mu;
  if (mean.has_value()) {
    mu = mean->to(at::kFloat).contiguous();
    TORCH_CHECK_VALUE(mu.sizes() == at::IntArrayRef({B, H, D}), "pykd: mean must have shape (B, H, D)");
  }
  const auto f = x.options().dtype(at::kFloat);
  auto codes = at::empty({B, H, N, D}, x.options().dtype(fp8 ? at::kFloat8_e4m3fn : at::kChar));
  auto scale = new_output({B, H, nb}, f);
  auto deq = new_output({B, H, N, D}, f);
  const float* px = xf.const_data_ptr<float>();
  const float* pm = mu.defined() ? mu.const_data_ptr<float>() : nullptr;
  float* ps = scale.data_ptr<float>();
  float* pd = deq.data_ptr<float>();
  auto* c8 = fp8 ? codes.data_ptr<c10::Float8_e4m3fn>() : nullptr;
  auto* ci = fp8 ? nullptr : codes.data_ptr<int8_t>();
  at::parallel_for(0, B * H * nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t bh = u / nb, n0 = (u % nb) * block_size, n1 = std::min(N, n0 + block_size);
      const int64_t off = (bh * N + n0) * D, len = (n1 - n0) * D;
      y.assign(px + off, px + off + len);
      float amax = 0.0f;
      for (int64_t e = 0; e < len; ++e) {
        if (pm) y[e] -= pm[bh * D + e % D];
        const float a = std::fabs(y[e]);
        if (!(a <= amax) && !std::isnan(amax)) amax = a;  // a NaN sticks: the block's scale is NaN
      }
      const float s = amax == 0.0f ? 1.0f : amax / levels;
      ps[u] = s;
      for (int64_t e = 0; e < len; ++e) {
        const float z = y[e] / s;
        float c;
        if (fp8) {
          const c10::Float8_e4m3fn q(std::clamp(z, -448.0f, 448.0f));
          c8[off + e] = q;
          c = static_cast<float>(q);
        } else {
          c = std::isnan(z) ? 0.0f : std::clamp(std::nearbyint(z), -127.0f, 127.0f);  // the default rounding mode: half to even
          ci[off + e] = static_cast<int8_t>(c);
        }
        pd[off + e] = c * s;
      }
    }
  });
  return {codes, scale, deq};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pykd, m) {
  m.def(
      "quantize_tokens(Tensor x, Tensor? mean, str fmt, int block_size) "
      "-> (Tensor codes, Tensor scale, Tensor deq)");
}

TORCH_LIBRARY_IMPL(pykd, CPU, m) { m.impl("quantize_tokens", &quantize_tokens_cpu); }

}  // namespace pykd
