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
//             reduction's scale (1/n for "mean" unless fp16), written once in the student's dtype.
// A term whose probability is exactly 0 contributes 0 (0 log 0 = 0), so -inf teacher logits
// (masked vocabulary) are exact. The max is taken first instead of online rescaling: a CPU row
// stays in cache between sweeps, and the fixed max keeps every sum vectorizable.
//
// pykd::kd_loss_shard runs the sweeps apart on a vocabulary slice [vocab_start, vocab_start + V) of
// a V_total vocabulary (pykd.vocab_parallel all-reduces between them):
//   phase 1   sweep 1 -> (R, 8) (m_s, l_s, m_t, l_t, m_h, l_h, acc, f(s)[y] or 0 off the slice)
//   phase 2   sweep 2 from (R, 2) (lse_s, lse_t) -> (R, 2) partial sums
//   phase 3   sweep 3 from (R, 5) (lse_s, lse_t, lse_h, stat, poison) -> the gradient
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>

#include "kd_common.h"
#include "vec_math.h"

namespace pykd {
namespace {

struct RowParams {
  int64_t V;
  int64_t stride_s, stride_t;  // row strides: rows are read in place, the vocabulary contiguous
  float inv_t;
  float alpha_w;  // alpha * (T^2 or 1)
  float one_minus_alpha;
  float beta;
  float grad_scale;  // folded into the stored gradient: 1/n for "mean" (not fp16), else 1
  bool has_hard;
  bool compute_grad;
  int phase = 0;            // 0: whole rows; 1-3: one phase on a vocabulary slice (kd_loss_shard)
  int64_t V_total;          // the whole vocabulary (mse divides by it)
  LogitMap fs, ft;  // logit_scale / logit_softcap of the student and the teacher
};

// log(beta p_t + (1 - beta) p_s) from log p_t, log p_s.
PYKD_INLINE vf log_mix(vf log_pt, vf log_ps, float log_beta, float log_1mb) {
  const vf a = log_pt + log_beta, b = log_ps + log_1mb;
  const vf mx = vmax(a, b);
  const vf mxs = select(mx == -kInf, vf{}, mx);
  return mxs + vlog(vexp(a - mxs) + vexp(b - mxs));
}

PYKD_INLINE vf sign(vf d) { return select(d > 0.f, splat(1.f), select(d < 0.f, splat(-1.f), vf{})); }

// One row. NEED_H: the hard CE needs its own softmax of the raw logits (T != 1, or mse).
// y is the target's column in this row's slice (outside [0, V) when another slice holds it); st the
// row's input stats (phases 2, 3), o its output stats (phases 1, 2).
template <Divergence D, bool NEED_H, typename S, typename T>
PYKD_HOT void kd_row(const S* __restrict s, const T* __restrict t, S* __restrict g, int64_t y,
                     const RowParams& P, float* soft_out, float* hard_out, const float* st, float* o) {
  constexpr bool kSoftmax = D != Divergence::kMSE;
  const int64_t V = P.V;
  const float inv_t = P.inv_t;
  const LogitMap &fs = P.fs, &ft = P.ft;
  const bool own_y = y >= 0 && y < V;
  float lse_s = 0.f, lse_t = 0.f, lse_h = 0.f, soft = 0.f, stat = 0.f, poison = 0.f;
  if (P.phase >= 2) {
    lse_s = st[0];
    lse_t = st[1];
    if (P.phase == 3) {
      lse_h = st[2];
      stat = st[3];
      poison = st[4];
    }
  } else {
  const float smax = (kSoftmax || NEED_H) ? fs(row_max(s, V)) : 0.f;
  const float tmax = kSoftmax ? ft(row_max(t, V)) : 0.f;
  // In a slice, an all -inf stretch (masked vocabulary) must sum to 0, not to exp(NaN); a whole row
  // keeps the NaN that the reference gives.
  const bool sl = P.phase == 1;
  const float m_s = sl && smax == -kInf ? 0.f : smax * inv_t;
  const float m_t = sl && tmax == -kInf ? 0.f : tmax * inv_t;
  const float m_h = sl && smax == -kInf ? 0.f : smax;

  // ---- sweep 1: softmax sums and the divergence accumulator
  vf ls{}, lt{}, lh{}, ac{};
  blocks(s, t, V, [&](vf sr, vf tr, int64_t, int64_t n) __attribute__((always_inline)) {
    sr = fs(sr, n);
    tr = ft(tr, n);
    if constexpr (D == Divergence::kMSE) {
      const vf d = select(sr == tr, vf{}, sr - tr);
      ac += d * d;
    } else {
      const vf zs = sr * inv_t, zt = tr * inv_t;
      const vf es = vexp(zs - m_s), et = vexp(zt - m_t);
      ls += es;
      lt += et;
      if constexpr (D == Divergence::kKL) ac += select(et > 0.f, et * (zt - zs), vf{});
      if constexpr (D == Divergence::kReverseKL) ac += select(es > 0.f, es * (zs - zt), vf{});
      if constexpr (D == Divergence::kSoftCE) ac += select(et > 0.f, et * zs, vf{});
    }
    if constexpr (NEED_H) lh += vexp(sr - m_h);
  });
  const float l_s = hsum(ls), l_t = hsum(lt), a = hsum(ac);
  if (P.phase == 1) {
    const float l_h = NEED_H ? hsum(lh) : 0.f;
    const float sy = P.has_hard && own_y ? fs(static_cast<float>(s[y])) : 0.f;
    const float row[8] = {smax * inv_t, l_s, tmax * inv_t, l_t, NEED_H ? smax : -kInf, l_h, a, sy};
    std::copy(row, row + 8, o);
    return;
  }
  lse_s = kSoftmax ? m_s + std::log(l_s) : 0.f;
  lse_t = kSoftmax ? m_t + std::log(l_t) : 0.f;
  lse_h = NEED_H ? m_h + std::log(hsum(lh)) : lse_s;

  if constexpr (D == Divergence::kKL) soft = a / l_t - lse_t + lse_s;
  if constexpr (D == Divergence::kReverseKL) soft = stat = a / l_s - lse_s + lse_t;
  if constexpr (D == Divergence::kSoftCE) soft = -a / l_t + lse_s;
  if constexpr (D == Divergence::kMSE) soft = a / static_cast<float>(V);
  }
  const float log_beta = std::log(P.beta), log_1mb = std::log1p(-P.beta);

  // ---- sweep 2 (jsd, tvd): the loss and the gradient's row statistic
  if ((D == Divergence::kJSD || D == Divergence::kTVD) && (P.phase == 0 || P.phase == 2)) {
    vf x1{}, x2{};  // jsd: KL(p_t||m), KL(p_s||m); tvd: sum |p_s - p_t|, sum p_s sign(p_s - p_t)
    blocks(s, t, V, [&](vf sr, vf tr, int64_t, int64_t n) __attribute__((always_inline)) {
      sr = fs(sr, n);
      tr = ft(tr, n);
      const vf log_ps = sr * inv_t - lse_s, log_pt = tr * inv_t - lse_t;
      const vf ps = vexp(log_ps), pt = vexp(log_pt);
      if constexpr (D == Divergence::kJSD) {
        const vf lm = log_mix(log_pt, log_ps, log_beta, log_1mb);
        x1 += select(pt > 0.f, pt * (log_pt - lm), vf{});
        x2 += select(ps > 0.f, ps * (log_ps - lm), vf{});
      } else {
        const vf d = ps - pt;
        x1 += select(d > 0.f, d, -d);
        x2 += ps * sign(d);
      }
    });
    const float s1 = hsum(x1), s2 = hsum(x2);
    if (P.phase == 2) {
      o[0] = s1;
      o[1] = s2;
      return;
    }
    soft = D == Divergence::kJSD ? P.beta * s1 + (1.f - P.beta) * s2 : 0.5f * s1;
    stat = s2;
  }
  // A NaN (or an inf that makes one) in either row makes its softmax NaN: the loss and the whole
  // soft gradient row are NaN, as in the reference, never a finite value from terms that a select
  // dropped. (mse has no softmax: its NaN stays where the reference puts it.)
  if (P.phase == 0) {
    poison = kSoftmax && std::isnan(lse_s + lse_t) ? std::numeric_limits<float>::quiet_NaN() : 0.f;
    soft += poison;
    *soft_out = soft;
    *hard_out = P.has_hard ? lse_h - fs(static_cast<float>(s[y])) : 0.f;
  }
  if (!P.compute_grad) return;

  // ---- sweep 3: the gradient, every soft term carrying 1/T and the reduction scale; `grad` takes
  // the mapped logits and gives d loss / d f(s), which the store multiplies by f'(s)
  const float cs = P.alpha_w * P.grad_scale * inv_t + poison;
  const float ch = P.has_hard ? P.one_minus_alpha * P.grad_scale : 0.f;
  const float c_mse = 2.f / static_cast<float>(P.V_total) * P.alpha_w * P.grad_scale;
  auto grad = [&](vf sr, vf tr) __attribute__((always_inline)) -> vf {
    if constexpr (D == Divergence::kMSE) {
      const vf gs = select(sr == tr, vf{}, sr - tr) * c_mse;
      if constexpr (NEED_H) return gs + ch * vexp(sr - lse_h);
      return gs;
    } else {
      const vf log_ps = sr * inv_t - lse_s, log_pt = tr * inv_t - lse_t;
      const vf ps = vexp(log_ps), pt = vexp(log_pt);
      vf d;
      if constexpr (D == Divergence::kKL || D == Divergence::kSoftCE) d = ps - pt;
      if constexpr (D == Divergence::kReverseKL)
        d = select(ps > 0.f, ps * (log_ps - log_pt - stat), vf{});
      if constexpr (D == Divergence::kJSD)
        d = select(ps > 0.f,
                   (1.f - P.beta) * ps * (log_ps - log_mix(log_pt, log_ps, log_beta, log_1mb) - stat),
                   vf{});
      if constexpr (D == Divergence::kTVD) d = 0.5f * ps * (sign(ps - pt) - stat);
      vf ph = ps;
      if constexpr (NEED_H) ph = vexp(sr - lse_h);
      return cs * d + ch * ph;
    }
  };
  blocks(s, t, V, [&](vf sr, vf tr, int64_t k, int64_t n) __attribute__((always_inline)) {
    const vf x = fs(sr, n);
    const vf gx = grad(x, ft(tr, n)) * fs.grad(x);
    if (n == kW)
      store(g + k, gx);
    else
      store_partial(g + k, n, gx);
  });
  // The one-hot term of the hard CE, on the one entry it touches, rounded once.
  if (P.has_hard && own_y) {
    const vf x = fs(load_partial(s + y, 1, -kInf), 1);
    const vf gy = (grad(x, ft(load_partial(t + y, 1, -kInf), 1)) - ch) * fs.grad(x);
    store_partial(g + y, 1, gy);
  }
}

// soft/hard: per-row outputs of phase 0; stats/out: the (R, n) row stats of phases 1-3.
template <Divergence D, bool NEED_H, typename S, typename T>
void kd_rows(const S* s, const T* t, S* g, const int64_t* target, int64_t R, int64_t ignore_index,
             const RowParams& P, float* soft, float* hard, const float* stats, float* out,
             int64_t vocab_start) {
  const int64_t V = P.V;
  const int64_t n_in = P.phase == 2 ? 2 : 5, n_out = P.phase == 1 ? 8 : 2;
  // Rows are independent; a grain of a few rows keeps each thread streaming whole rows.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t y = target ? target[r] : -1;
      S* gr = g ? g + r * V : nullptr;
      float* o = out ? out + r * n_out : nullptr;
      if (target && y == ignore_index) {  // counts for nothing: 0 loss, 0 gradient
        if (P.phase == 0) soft[r] = hard[r] = 0.f;
        if (o) std::fill(o, o + n_out, 0.f);
        if (gr) std::fill(gr, gr + V, static_cast<S>(0.f));
        continue;
      }
      kd_row<D, NEED_H, S, T>(s + r * P.stride_s, t + r * P.stride_t, gr, y - vocab_start, P,
                              soft + r, hard + r, stats ? stats + r * n_in : nullptr, o);
    }
  });
}

template <typename S, typename T>
void kd_dispatch(Divergence div, bool need_h, const at::Tensor& st, const at::Tensor& tt,
                 at::Tensor& grad, const int64_t* target, int64_t ignore_index, const RowParams& P,
                 float* soft, float* hard, const float* stats = nullptr, float* out = nullptr,
                 int64_t vocab_start = 0) {
  const S* s = reinterpret_cast<const S*>(st.const_data_ptr());
  const T* t = reinterpret_cast<const T*>(tt.const_data_ptr());
  S* g = P.compute_grad ? reinterpret_cast<S*>(grad.data_ptr()) : nullptr;
  const int64_t R = st.size(0);
#define PYKD_CASE(DV)                                                                         \
  case DV:                                                                                    \
    if (need_h)                                                                               \
      kd_rows<DV, true, S, T>(s, t, g, target, R, ignore_index, P, soft, hard, stats, out,    \
                              vocab_start);                                                   \
    else                                                                                      \
      kd_rows<DV, false, S, T>(s, t, g, target, R, ignore_index, P, soft, hard, stats, out,   \
                               vocab_start);                                                  \
    break;
  switch (div) {
    PYKD_CASE(Divergence::kKL)
    PYKD_CASE(Divergence::kReverseKL)
    PYKD_CASE(Divergence::kSoftCE)
    PYKD_CASE(Divergence::kJSD)
    PYKD_CASE(Divergence::kTVD)
    PYKD_CASE(Divergence::kMSE)
  }
#undef PYKD_CASE
}

RowParams row_params(const at::Tensor& s, const at::Tensor& t, Divergence div, double temperature,
                     double alpha, double beta, bool scale_by_t2, at::ArrayRef<double> logit_map,
                     bool has_hard, bool compute_grad, const char* op) {
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kHalf ||
                  s.scalar_type() == at::kBFloat16,
              op, ": logits must be float32, float16 or bfloat16");
  TORCH_CHECK(logit_map.size() == 4, op, ": logit_map is (s_scale, s_cap, t_scale, t_cap)");
  RowParams P;
  P.V = P.V_total = s.size(1);
  P.stride_s = s.stride(0);
  P.stride_t = t.stride(0);
  P.inv_t = static_cast<float>(1.0 / temperature);
  const double w = (div == Divergence::kMSE || !scale_by_t2) ? 1.0 : temperature * temperature;
  P.alpha_w = static_cast<float>(alpha * w);
  P.one_minus_alpha = static_cast<float>(1.0 - alpha);
  P.beta = static_cast<float>(beta);
  P.grad_scale = 1.f;
  P.has_hard = has_hard;  // the hard CE is always reported; its gradient weight is 1 - alpha
  P.compute_grad = compute_grad;
  P.fs = LogitMap(logit_map[0], logit_map[1]);
  P.ft = LogitMap(logit_map[2], logit_map[3]);
  return P;
}

// Runs kd_dispatch for the student's dtype (and the teacher's, which is the student's or fp32).
void dispatch_dtypes(Divergence div, bool need_h, const at::Tensor& s, const at::Tensor& t,
                     at::Tensor& grad, const int64_t* tp, int64_t ignore_index, const RowParams& P,
                     float* sp, float* hp, const float* stats, float* out, int64_t vocab_start) {
  const bool same = t.scalar_type() == s.scalar_type();
  switch (s.scalar_type()) {
    case at::kFloat:
      kd_dispatch<float, float>(div, need_h, s, t, grad, tp, ignore_index, P, sp, hp, stats, out,
                                vocab_start);
      break;
    case at::kHalf:
      if (same)
        kd_dispatch<c10::Half, c10::Half>(div, need_h, s, t, grad, tp, ignore_index, P, sp, hp, stats,
                                          out, vocab_start);
      else
        kd_dispatch<c10::Half, float>(div, need_h, s, t, grad, tp, ignore_index, P, sp, hp, stats, out,
                                      vocab_start);
      break;
    default:
      if (same)
        kd_dispatch<c10::BFloat16, c10::BFloat16>(div, need_h, s, t, grad, tp, ignore_index, P, sp, hp,
                                                  stats, out, vocab_start);
      else
        kd_dispatch<c10::BFloat16, float>(div, need_h, s, t, grad, tp, ignore_index, P, sp, hp, stats,
                                          out, vocab_start);
  }
}

// Mixed dtypes: a teacher that is not the student's dtype is read as fp32 (exact for fp16/bf16).
at::Tensor teacher_rows(const at::Tensor& teacher, const at::Tensor& s) {
  return teacher.scalar_type() == s.scalar_type() ? unit_stride_rows(teacher)
                                                  : teacher.to(at::kFloat).contiguous();
}


std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& num_items, c10::string_view divergence, double temperature,
    double alpha, double beta, int64_t ignore_index, bool scale_by_t2, at::ArrayRef<double> logit_map,
    c10::string_view reduction, bool compute_grad) {
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes(),
              "pykd::kd_loss_fwd: student and teacher must be (rows, V) of one shape");
  const Divergence div = parse_divergence(std::string(divergence));
  const Reduction red = parse_reduction(std::string(reduction));
  const auto s = unit_stride_rows(student);
  const auto t = teacher_rows(teacher, s);
  const int64_t R = s.size(0), V = s.size(1);
  const at::Tensor tgt = target_rows(target, R, "pykd::kd_loss_fwd");
  const int64_t* tp = tgt.defined() ? tgt.data_ptr<int64_t>() : nullptr;
  const double n = reduction_count(tp, R, V, ignore_index, num_items);

  RowParams P = row_params(s, t, div, temperature, alpha, beta, scale_by_t2, logit_map, tp != nullptr,
                           compute_grad, "pykd::kd_loss_fwd");
  // fp16 keeps the per-row gradient and backward applies grad_output / n (see
  // pykd._backend.mean_scale_in_forward): 1/n first would underflow fp16 before a loss scaler.
  const bool fold_mean = red == Reduction::kMean && s.scalar_type() != at::kHalf;
  P.grad_scale = fold_mean ? static_cast<float>(1.0 / n) : 1.f;

  auto fopts = s.options().dtype(at::kFloat);
  auto soft = new_output({R}, fopts);
  auto hard = new_output({R}, fopts);
  auto grad = new_output(compute_grad ? at::IntArrayRef{R, V} : at::IntArrayRef{0}, s.options());
  const bool need_h = P.has_hard && (temperature != 1.0 || div == Divergence::kMSE);
  if (R > 0 && V > 0)
    dispatch_dtypes(div, need_h, s, t, grad, tp, ignore_index, P, soft.data_ptr<float>(),
                    hard.data_ptr<float>(), nullptr, nullptr, 0);
  auto [loss, soft_r, hard_r] = reduce_rows(soft, hard, P.alpha_w, P.one_minus_alpha, red, n);
  return {loss, soft_r, hard_r, grad};
}

// One phase of kd_loss on the vocabulary slice [vocab_start, vocab_start + V) (see the top of the
// file): phase 1 -> (R, 8) row stats, 2 -> (R, 2) partial sums, 3 -> the (R, V) gradient times scale.
at::Tensor kd_loss_shard_cpu(const at::Tensor& student, const at::Tensor& teacher,
                             const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& stats,
                             const at::Tensor& scale, c10::string_view divergence, double temperature,
                             double alpha, double beta, int64_t ignore_index, bool scale_by_t2,
                             at::ArrayRef<double> logit_map, int64_t phase, int64_t vocab_start,
                             int64_t vocab_total) {
  const char* op = "pykd::kd_loss_shard";
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes(), op,
              ": student and teacher must be (rows, V) of one shape");
  TORCH_CHECK(phase >= 1 && phase <= 3, op, ": phase must be 1, 2 or 3");
  const Divergence div = parse_divergence(std::string(divergence));
  const auto s = unit_stride_rows(student);
  const auto t = teacher_rows(teacher, s);
  const int64_t R = s.size(0), V = s.size(1);
  const at::Tensor tgt = target_rows(target, R, op);
  const int64_t* tp = tgt.defined() ? tgt.data_ptr<int64_t>() : nullptr;
  RowParams P = row_params(s, t, div, temperature, alpha, beta, scale_by_t2, logit_map, tp != nullptr,
                           phase == 3, op);
  P.phase = static_cast<int>(phase);
  P.V_total = vocab_total;
  P.grad_scale = scale.item<float>();
  at::Tensor st;
  if (phase >= 2) {
    TORCH_CHECK(stats.has_value() && stats->size(0) == R && stats->size(1) == (phase == 2 ? 2 : 5), op,
                ": phase ", phase, " needs (rows, ", phase == 2 ? 2 : 5, ") stats");
    st = stats->to(at::kFloat).contiguous();
  }
  auto out = new_output({R, phase == 1 ? 8 : (phase == 2 ? 2 : 0)}, s.options().dtype(at::kFloat));
  auto grad = new_output(phase == 3 ? at::IntArrayRef{R, V} : at::IntArrayRef{0}, s.options());
  const bool need_h = P.has_hard && (temperature != 1.0 || div == Divergence::kMSE);
  if (R > 0 && V > 0)
    dispatch_dtypes(div, need_h, s, t, grad, tp, ignore_index, P, nullptr, nullptr,
                    st.defined() ? st.data_ptr<float>() : nullptr,
                    phase == 3 ? nullptr : out.data_ptr<float>(), vocab_start);
  return phase == 3 ? grad : out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pykd, m) {
  m.def(
      "kd_loss_fwd(Tensor student, Tensor teacher, Tensor? target, Tensor? num_items, "
      "str divergence, float temperature, float alpha, float beta, int ignore_index, "
      "bool scale_by_t2, float[] logit_map, str reduction, bool compute_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "kd_loss_shard(Tensor student, Tensor teacher, Tensor? target, Tensor? stats, Tensor scale, "
      "str divergence, float temperature, float alpha, float beta, int ignore_index, "
      "bool scale_by_t2, float[] logit_map, int phase, int vocab_start, int vocab_total) -> Tensor");
}

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  m.impl("kd_loss_fwd", &kd_loss_fwd_cpu);
  m.impl("kd_loss_shard", &kd_loss_shard_cpu);
}

}  // namespace pykd
