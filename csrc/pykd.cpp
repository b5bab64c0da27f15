// The pykd._C module: owns the `pykd` operator namespace, the shared ops, and build metadata.
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "vec_math.h"

namespace pykd {
namespace {

// Scales n contiguous elements by c in fp32 and rounds once (c may exceed the dtype's range, as a
// loss scaler's 65536 exceeds fp16's).
template <typename S>
PYKD_HOT void scale_span(S* __restrict p, int64_t n, float c) {
  int64_t k = 0;
  for (; k + kW <= n; k += kW) store(p + k, load(p + k) * c);
  if (k < n) store_partial(p + k, n - k, load_partial(p + k, n - k, 0.f) * c);
}

// x (R, C) *= scale, scale 0-d or (R,): the backward of ops whose gradient is computed in the
// forward. In place, and a no-op for a shared scale of exactly 1 (the usual loss.backward()).
void scale_rows_cpu(at::Tensor& x, const at::Tensor& scale) {
  if (x.numel() == 0) return;
  TORCH_CHECK(x.is_contiguous(), "pykd::scale_rows_: x must be contiguous");
  const auto sc = scale.to(at::kFloat).contiguous();
  const bool shared = sc.numel() == 1;
  if (shared && sc.item<float>() == 1.f) return;
  const int64_t R = shared ? 1 : sc.numel();
  TORCH_CHECK(x.numel() % R == 0, "pykd::scale_rows_: scale must be 0-d or have one entry per row");
  const int64_t C = x.numel() / R;
  const float* c = sc.const_data_ptr<float>();
  // Split a shared scale's single "row" into chunks so it still runs in parallel.
  const int64_t chunk = shared ? 65536 : C;
  const int64_t pieces = shared ? (C + chunk - 1) / chunk : R;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scale_rows_", [&] {
    using S = scalar_t;
    S* base = x.data_ptr<S>();
    at::parallel_for(0, pieces, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t start = i * chunk, n = std::min(chunk, x.numel() - start);
        const float ci = shared ? c[0] : c[i];
        if constexpr (std::is_same_v<S, double>) {
          for (int64_t k = 0; k < n; ++k) base[start + k] *= ci;
        } else {
          scale_span(base + start, n, ci);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY(pykd, m) { m.def("scale_rows_(Tensor(a!) x, Tensor scale) -> ()"); }

TORCH_LIBRARY_IMPL(pykd, CPU, m) { m.impl("scale_rows_", &scale_rows_cpu); }

}  // namespace pykd

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("torch_version") = PYKD_TORCH_VERSION;
  m.attr("source_hash") = PYKD_SOURCE_HASH;
}
