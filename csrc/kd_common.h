// Shared by the logit-distillation CPU kernels: option parsing and the row reduction.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

namespace pykd {

// A fresh output tensor; NaN-filled when PYKD_POISON_OUTPUTS=1 (tests), so any element a kernel
// fails to write shows up instead of passing on whatever memory held.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  auto t = at::empty(sizes, opts);
  const char* poison = std::getenv("PYKD_POISON_OUTPUTS");
  if (poison && poison[0] == '1' && at::isFloatingType(t.scalar_type()))
    t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

// A (rows, V) input as the row kernels read it: in place when the vocabulary is contiguous (any row
// stride, e.g. a slice logits[:, :V] or logits[:n]); otherwise one contiguous copy.
inline at::Tensor unit_stride_rows(const at::Tensor& x) {
  return x.stride(1) == 1 || x.size(1) <= 1 ? x : x.contiguous();
}

// The target as the row kernels read it (undefined without one): contiguous int64, one per row.
inline at::Tensor target_rows(const std::optional<at::Tensor>& target, int64_t R, const char* op) {
  if (!target.has_value()) return at::Tensor();
  auto tgt = target->contiguous();
  TORCH_CHECK(tgt.scalar_type() == at::kLong && tgt.numel() == R, op,
              ": target must be int64 with one entry per row");
  return tgt;
}

enum class Divergence { kKL, kReverseKL, kSoftCE, kJSD, kTVD, kMSE };
enum class Reduction { kMean, kSum, kNone };

inline Divergence parse_divergence(const std::string& d) {
  if (d == "kl") return Divergence::kKL;
  if (d == "reverse_kl") return Divergence::kReverseKL;
  if (d == "soft_ce") return Divergence::kSoftCE;
  if (d == "jsd") return Divergence::kJSD;
  if (d == "tvd") return Divergence::kTVD;
  if (d == "mse") return Divergence::kMSE;
  TORCH_CHECK_VALUE(false, "pykd: divergence must be one of kl, reverse_kl, soft_ce, jsd, tvd, mse; got ", d);
}

inline Reduction parse_reduction(const std::string& r) {
  if (r == "mean") return Reduction::kMean;
  if (r == "sum") return Reduction::kSum;
  if (r == "none") return Reduction::kNone;
  TORCH_CHECK_VALUE(false, "pykd: reduction must be one of mean, sum, none; got ", r);
}

// Checks every target is in [0, V) or ignore_index (a ValueError in Python) and returns the "mean"
// denominator: num_items_in_batch when given, else the rows that count (at least 1, so a batch with
// every row ignored gives 0, not NaN).
inline double reduction_count(const int64_t* target, int64_t R, int64_t V, int64_t ignore_index,
                              const std::optional<at::Tensor>& num_items) {
  int64_t n = R;
  if (target) {
    n = 0;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t y = target[r];
      if (y == ignore_index) continue;
      TORCH_CHECK_VALUE(y >= 0 && y < V, "target values must be in [0, ", V, ") or ignore_index=",
                        ignore_index, ", found ", y);
      ++n;
    }
  }
  if (num_items.has_value()) return num_items->item<double>();
  return n > 0 ? static_cast<double>(n) : 1.0;
}

// (loss, soft, hard) from per-row soft divergence and hard CE: per-row for "none", else summed
// (and divided by n for "mean"). loss_r = alpha_w * soft_r + (1 - alpha) * hard_r.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> reduce_rows(const at::Tensor& soft,
                                                                  const at::Tensor& hard,
                                                                  double alpha_w,
                                                                  double one_minus_alpha,
                                                                  Reduction red, double n) {
  auto loss = soft * alpha_w + hard * one_minus_alpha;
  if (red == Reduction::kNone) return {loss, soft, hard};
  const double scale = red == Reduction::kMean ? 1.0 / n : 1.0;
  return {loss.sum() * scale, soft.sum() * scale, hard.sum() * scale};
}

}  // namespace pykd
