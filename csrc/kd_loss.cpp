// CPU kernel of pykd.kd_loss (DESIGN.md section 3): loss and gradient of logit distillation in one call.
//
// Per row r (z = logits / T, p = softmax(z)):
//   sweep 0   row maxima m_s = max z_s, m_t = max z_t (max s / T == max(s / T) since T > 0)
//   sweep 1   l_s = sum exp(z_s - m_s), l_t = sum exp(z_t - m_t) and the divergence accumulator
//               kl       A = sum exp(z_t - m_t)(z_t - z_s)   KL(p_t||p_s) = A / l_t - lse_t + lse_s
//               rkl      B = sum exp(z_s - m_s)(z_s - z_t)   KL(p_s||p_t) = B / l_s - lse_s + lse_t
//               soft_ce  C = sum exp(z_t - m_t) z_s          CE = -C / l_t + lse_s
//               mse      Q = sum (s - t)^2                   Q / V
//             plus l_h = sum exp(s - max s) for the hard CE when T != 1.
//   sweep 2   (jsd, tvd) the loss and the row statistic the gradient needs, from the two lse.
//   sweep 3   the gradient alpha*w*d soft/ds + (1-alpha)*(softmax(s) - onehot(y)), times the
//             reduction's scale (1/n for "mean"), written once in the student's dtype.
// A term whose probability is exactly 0 contributes 0 (0 log 0 = 0), so -inf teacher logits
// (masked vocabulary) are exact. The max is taken first instead of online rescaling: a CPU row
// stays in cache between sweeps, and the fixed max keeps every sum vectorizable.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "kd_common.h"
#include "vec_math.h"

namespace pykd {
namespace {

struct RowParams {
  int64_t V;
  float inv_t;
  float alpha_w;  // alpha * (T^2 or 1), times the reduction scale when writing the gradient
  float one_minus_alpha;
  float beta;
  float grad_scale;  // reduction scale: 1/n for "mean", 1 otherwise
  bool has_hard;
  bool same_t;  // T == 1: the hard CE reuses the student's softmax
  bool compute_grad;
};

template <typename S>
inline float row_max(const S* x, int64_t V) {
  float acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = -kInf;
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float v = to_f32(x[i + j]);
      acc[j] = v > acc[j] ? v : acc[j];
    }
  float m = -kInf;
  for (int j = 0; j < kLanes; ++j) m = acc[j] > m ? acc[j] : m;
  for (; i < V; ++i) m = to_f32(x[i]) > m ? to_f32(x[i]) : m;
  return m;
}

inline float lane_sum(const float* acc) {
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// Accumulates sweep 1 over x[i0, i1) for one block size W (kLanes for the body, 1 for the tail).
template <Divergence D, typename S, typename T>
struct Sweep1 {
  float ls[kLanes] = {}, lt[kLanes] = {}, lh[kLanes] = {}, acc[kLanes] = {};

  template <int W>
  inline void block(const S* s, const T* t, int64_t i, float inv_t, float m_s, float m_t,
                    float m_h, bool need_h) {
    for (int j = 0; j < W; ++j) {
      const float sr = to_f32(s[i + j]);
      const float tr = to_f32(t[i + j]);
      if constexpr (D == Divergence::kMSE) {
        const float d = sr == tr ? 0.f : sr - tr;
        acc[j] += d * d;
      } else {
        const float zs = sr * inv_t, zt = tr * inv_t;
        const float es = vexp(zs - m_s), et = vexp(zt - m_t);
        ls[j] += es;
        lt[j] += et;
        if constexpr (D == Divergence::kKL) acc[j] += et > 0.f ? et * (zt - zs) : 0.f;
        if constexpr (D == Divergence::kReverseKL) acc[j] += es > 0.f ? es * (zs - zt) : 0.f;
        if constexpr (D == Divergence::kSoftCE) acc[j] += et > 0.f ? et * zs : 0.f;
      }
      if (need_h) lh[j] += vexp(sr - m_h);
    }
  }
};

// log(beta p_t + (1 - beta) p_s) from log p_t, log p_s.
inline float log_mix(float log_pt, float log_ps, float log_beta, float log_1mb) {
  const float a = log_pt + log_beta, b = log_ps + log_1mb;
  const float mx = a > b ? a : b;
  const float mxs = mx == -kInf ? 0.f : mx;
  return mxs + vlog(vexp(a - mxs) + vexp(b - mxs));
}

template <Divergence D, typename S, typename T>
PYKD_HOT void kd_row(const S* s, const T* t, S* g, int64_t y, const RowParams& P, float* soft_out,
                     float* hard_out) {
  const int64_t V = P.V;
  const float inv_t = P.inv_t;
  const bool need_lse = D != Divergence::kMSE || P.has_hard;
  const float smax = need_lse ? row_max<S>(s, V) : 0.f;
  const float tmax = D != Divergence::kMSE ? row_max<T>(t, V) : 0.f;
  const float m_s = smax * inv_t, m_t = tmax * inv_t, m_h = smax;
  const bool need_h = P.has_hard && (!P.same_t || D == Divergence::kMSE);

  Sweep1<D, S, T> acc1;
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes) acc1.template block<kLanes>(s, t, i, inv_t, m_s, m_t, m_h, need_h);
  Sweep1<D, S, T> tail;
  for (; i < V; ++i) tail.template block<1>(s, t, i, inv_t, m_s, m_t, m_h, need_h);
  const float l_s = lane_sum(acc1.ls) + tail.ls[0];
  const float l_t = lane_sum(acc1.lt) + tail.lt[0];
  const float a = lane_sum(acc1.acc) + tail.acc[0];
  const float lse_s = m_s + std::log(l_s);
  const float lse_t = m_t + std::log(l_t);
  const float lse_h = need_h ? m_h + std::log(lane_sum(acc1.lh) + tail.lh[0]) : lse_s;

  float soft = 0.f, stat = 0.f;
  if constexpr (D == Divergence::kKL) soft = a / l_t - lse_t + lse_s;
  if constexpr (D == Divergence::kReverseKL) soft = stat = a / l_s - lse_s + lse_t;
  if constexpr (D == Divergence::kSoftCE) soft = -a / l_t + lse_s;
  if constexpr (D == Divergence::kMSE) soft = a / static_cast<float>(V);
  const float log_beta = std::log(P.beta), log_1mb = std::log1p(-P.beta);
  if constexpr (D == Divergence::kJSD || D == Divergence::kTVD) {
    float x1[kLanes] = {}, x2[kLanes] = {};  // jsd: KL(p_t||m), KL(p_s||m); tvd: sum|d|, sum p_s sign
    auto body = [&](int64_t k, int j) {
      const float log_ps = to_f32(s[k]) * inv_t - lse_s, log_pt = to_f32(t[k]) * inv_t - lse_t;
      const float ps = vexp(log_ps), pt = vexp(log_pt);
      if constexpr (D == Divergence::kJSD) {
        const float lm = log_mix(log_pt, log_ps, log_beta, log_1mb);
        x1[j] += pt > 0.f ? pt * (log_pt - lm) : 0.f;
        x2[j] += ps > 0.f ? ps * (log_ps - lm) : 0.f;
      } else {
        const float d = ps - pt;
        const float sg = d > 0.f ? 1.f : (d < 0.f ? -1.f : 0.f);
        x1[j] += d > 0.f ? d : -d;
        x2[j] += ps * sg;
      }
    };
    int64_t k = 0;
    for (; k + kLanes <= V; k += kLanes)
      for (int j = 0; j < kLanes; ++j) body(k + j, j);
    for (; k < V; ++k) body(k, static_cast<int>(k % kLanes));
    const float s1 = lane_sum(x1), s2 = lane_sum(x2);
    if constexpr (D == Divergence::kJSD) {
      soft = P.beta * s1 + (1.f - P.beta) * s2;
      stat = s2;
    } else {
      soft = 0.5f * s1;
      stat = s2;
    }
  }
  const float hard = P.has_hard ? lse_h - to_f32(s[y]) : 0.f;
  *soft_out = soft;
  *hard_out = hard;
  if (!P.compute_grad) return;

  const float cs = P.alpha_w * P.grad_scale * inv_t;  // every soft gradient carries 1/T
  const float ch = P.has_hard ? P.one_minus_alpha * P.grad_scale : 0.f;
  const float inv_v2 = 2.f / static_cast<float>(V) * P.alpha_w * P.grad_scale;
  auto grad_at = [&](int64_t k) -> float {
    const float sr = to_f32(s[k]), tr = to_f32(t[k]);
    float gs;
    float ps = 0.f;
    if constexpr (D == Divergence::kMSE) {
      gs = (sr == tr ? 0.f : sr - tr) * inv_v2;
    } else {
      const float log_ps = sr * inv_t - lse_s, log_pt = tr * inv_t - lse_t;
      ps = vexp(log_ps);
      const float pt = vexp(log_pt);
      float d;
      if constexpr (D == Divergence::kKL || D == Divergence::kSoftCE) d = ps - pt;
      if constexpr (D == Divergence::kReverseKL) d = ps > 0.f ? ps * (log_ps - log_pt - stat) : 0.f;
      if constexpr (D == Divergence::kJSD)
        d = ps > 0.f ? (1.f - P.beta) * ps * (log_ps - log_mix(log_pt, log_ps, log_beta, log_1mb) - stat)
                     : 0.f;
      if constexpr (D == Divergence::kTVD) {
        const float df = ps - pt;
        const float sg = df > 0.f ? 1.f : (df < 0.f ? -1.f : 0.f);
        d = 0.5f * ps * (sg - stat);
      }
      gs = cs * d;
    }
    if (ch != 0.f) {
      const float ph = need_h ? vexp(sr - lse_h) : ps;
      gs += ch * ph;
    }
    return gs;
  };
  int64_t k = 0;
  for (; k + kLanes <= V; k += kLanes)
    for (int j = 0; j < kLanes; ++j) g[k + j] = static_cast<S>(grad_at(k + j));
  for (; k < V; ++k) g[k] = static_cast<S>(grad_at(k));
  // The one-hot term of the hard CE, applied to the one entry it touches, rounded once.
  if (P.has_hard && ch != 0.f) g[y] = static_cast<S>(grad_at(y) - ch);
}

template <typename S, typename T>
void kd_rows(const at::Tensor& student, const at::Tensor& teacher, const int64_t* target,
             int64_t ignore_index, Divergence div, const RowParams& P, float* soft, float* hard,
             at::Tensor& grad) {
  const int64_t R = student.size(0), V = P.V;
  const S* s = student.data_ptr<S>();
  const T* t = teacher.data_ptr<T>();
  S* g = P.compute_grad ? grad.data_ptr<S>() : nullptr;
  // Rows are independent; a grain of a few rows keeps each thread streaming whole rows.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t y = target ? target[r] : -1;
      S* gr = g ? g + r * V : nullptr;
      if (target && y == ignore_index) {
        soft[r] = 0.f;
        hard[r] = 0.f;
        if (gr)
          for (int64_t k = 0; k < V; ++k) gr[k] = static_cast<S>(0.f);
        continue;
      }
      const S* sr = s + r * V;
      const T* tr = t + r * V;
      switch (div) {
#define PYKD_ROW(D) \
  case D:           \
    kd_row<D, S, T>(sr, tr, gr, y, P, soft + r, hard + r); \
    break;
        PYKD_ROW(Divergence::kKL)
        PYKD_ROW(Divergence::kReverseKL)
        PYKD_ROW(Divergence::kSoftCE)
        PYKD_ROW(Divergence::kJSD)
        PYKD_ROW(Divergence::kTVD)
        PYKD_ROW(Divergence::kMSE)
#undef PYKD_ROW
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& num_items, c10::string_view divergence, double temperature,
    double alpha, double beta, int64_t ignore_index, bool scale_by_t2, c10::string_view reduction,
    bool compute_grad) {
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes(),
              "pykd::kd_loss_fwd: student and teacher must be (rows, V) of one shape");
  const Divergence div = parse_divergence(std::string(divergence));
  const Reduction red = parse_reduction(std::string(reduction));
  const auto s = student.contiguous();
  const auto t = teacher.contiguous();
  const int64_t R = s.size(0), V = s.size(1);
  at::Tensor tgt;
  if (target.has_value()) {
    tgt = target->contiguous();
    TORCH_CHECK(tgt.scalar_type() == at::kLong && tgt.numel() == R,
                "pykd::kd_loss_fwd: target must be int64 with one entry per row");
  }
  const int64_t* tp = target.has_value() ? tgt.data_ptr<int64_t>() : nullptr;
  const double n = reduction_count(tp, R, V, ignore_index, num_items);

  RowParams P;
  P.V = V;
  P.inv_t = static_cast<float>(1.0 / temperature);
  const double w = (div == Divergence::kMSE || !scale_by_t2) ? 1.0 : temperature * temperature;
  P.alpha_w = static_cast<float>(alpha * w);
  P.one_minus_alpha = static_cast<float>(1.0 - alpha);
  P.beta = static_cast<float>(beta);
  P.grad_scale = red == Reduction::kMean ? static_cast<float>(1.0 / n) : 1.f;
  P.has_hard = tp != nullptr;  // the hard CE is always reported; its gradient weight is 1 - alpha
  P.same_t = temperature == 1.0;
  P.compute_grad = compute_grad;

  auto fopts = s.options().dtype(at::kFloat);
  auto soft = at::empty({R}, fopts);
  auto hard = at::empty({R}, fopts);
  auto grad = compute_grad ? at::empty({R, V}, s.options()) : at::empty({0}, s.options());
  if (R > 0 && V > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kd_loss_s", [&] {
      using S = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "kd_loss_t", [&] {
        kd_rows<S, scalar_t>(s, t, tp, ignore_index, div, P, soft.data_ptr<float>(),
                             hard.data_ptr<float>(), grad);
      });
    });
  }
  auto [loss, soft_r, hard_r] = reduce_rows(soft, hard, P.alpha_w, P.one_minus_alpha, red, n);
  return {loss, soft_r, hard_r, grad};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pykd, m) {
  m.def(
      "kd_loss_fwd(Tensor student, Tensor teacher, Tensor? target, Tensor? num_items, "
      "str divergence, float temperature, float alpha, float beta, int ignore_index, "
      "bool scale_by_t2, str reduction, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pykd, CPU, m) { m.impl("kd_loss_fwd", &kd_loss_fwd_cpu); }

}  // namespace pykd
