// The pykd._C module: owns the `pykd` operator namespace, the shared ops, and build metadata.
#include <torch/extension.h>
#include <torch/library.h>

namespace pykd {
namespace {

// x (R, C) *= scale, scale 0-d or (R,): the backward of ops whose gradient is computed in the
// forward. In place, and a no-op for a scale of exactly 1 (the usual loss.backward()).
void scale_rows_cpu(at::Tensor& x, const at::Tensor& scale) {
  if (x.numel() == 0) return;
  if (scale.numel() == 1) {
    const double v = scale.item<double>();
    if (v != 1.0) x.mul_(v);
    return;
  }
  x.mul_(scale.reshape({-1, 1}));  // computed in the wider dtype, rounded once
}

}  // namespace

TORCH_LIBRARY(pykd, m) { m.def("scale_rows_(Tensor(a!) x, Tensor scale) -> ()"); }

TORCH_LIBRARY_IMPL(pykd, CPU, m) { m.impl("scale_rows_", &scale_rows_cpu); }

}  // namespace pykd

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("torch_version") = PYKD_TORCH_VERSION;
  m.attr("source_hash") = PYKD_SOURCE_HASH;
}
