// CPU kernel of pykd.topk_kd_loss (DESIGN.md section 4): distillation from a teacher given as its
// top-K log-probabilities, loss and gradient in one call.
//
// Per row r, z = s / T, q = softmax(z), teacher log-probs lp_k at sorted distinct indices i_k:
//   tail=True   KL over the K entries plus one tail bucket:
//                 soft = sum_k p_k (lp_k - log q_k) + P (log P - log Q),
//                 P = 1 - sum_k p_k (teacher's missing mass), Q = sum_{j not in K} q_j.
//               log Q comes from a log-sum-exp over the non-K logits alone (never 1 - sum q_k,
//               which cancels when the student puts nearly all its mass on the K entries).
//               d soft / d z_j = c q_j - p_j (j in K),  c q_j - P exp(z_j - lse_out) (j not in K),
//               c = sum_k p_k + P the teacher's total mass (1 unless P is 0 for want of a tail, or
//               the given probabilities sum above 1).
//   tail=False  the teacher renormalized over its K entries, p^_k = exp(lp_k - logsumexp(lp)):
//                 soft = sum_k p^_k (log p^_k - log q_k),  d soft / d z_j = q_j - p^_j [j in K].
// Plus the hard CE at T = 1 and the reduction scale, exactly as kd_loss. The gradient is written
// once in the student's dtype: a sweep writes every entry with the non-K formula, then the K
// entries (and the target's one-hot entry) are overwritten.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "kd_common.h"
#include "vec_math.h"

namespace pykd {
namespace {

struct TopkParams {
  int64_t V, K;
  int64_t stride_s;  // the student's row stride: rows are read in place, the vocabulary contiguous
  float inv_t;
  float alpha_w;  // alpha * (T^2 or 1)
  float one_minus_alpha;
  float grad_scale;  // 1/n for "mean" (not fp16), else 1
  bool has_hard;
  bool compute_grad;
  LogitMap fs;  // the student's logit_scale / logit_softcap
  int phase = 0;             // 0: whole rows; 1, 2: one phase on a vocabulary slice (topk_kd_loss_shard)
  int64_t vocab_start = 0;   // the slice's first global id (indices and targets are global)
  int64_t V_total;           // the whole vocabulary: ids >= V_total are dropped
};

float log_add_exp(float a, float b) {
  const float m = std::max(a, b);
  if (m == -kInf) return -kInf;
  return m + std::log(std::exp(a - m) + std::exp(b - m));
}

// One row. `mask` is this thread's V floats of 0, used to exclude the K entries from the tail sums.
// Indices >= V_total (a teacher's larger vocabulary, sorted last) are dropped: the kept K entries are
// the first ones, and with a tail their probabilities are renormalized by 1 - (the dropped mass).
// A vocabulary slice (phases 1, 2) holds the kept entries whose ids fall in it (`own`); the others
// count on the teacher's side only. y is the target's column in the slice. st: the row's input stats
// (phase 2), o its output stats (phase 1).
template <bool TAIL, bool NEED_H, typename S>
PYKD_HOT void topk_row(const S* __restrict s, const float* __restrict lp_in, const int64_t* __restrict idx,
                       S* __restrict g, int64_t y, const TopkParams& P, float* __restrict mask,
                       float* __restrict zk, float* __restrict lp, float* soft_out, float* hard_out,
                       const float* st, float* o) {
  const int64_t V = P.V, v0 = P.vocab_start;
  const LogitMap& fs = P.fs;
  const float inv_t = P.inv_t;
  int64_t K = P.K;
  while (K > 0 && idx[K - 1] >= P.V_total) --K;
  float dropped = 0.f;
  for (int64_t k = K; k < P.K; ++k) dropped += std::exp(lp_in[k]);
  const float log_keep = TAIL && dropped > 0.f && dropped < 1.f ? std::log1p(-dropped) : 0.f;
  auto own = [&](int64_t k) { return idx[k] >= v0 && idx[k] < v0 + V; };
  for (int64_t k = 0; k < K; ++k) {
    zk[k] = own(k) ? fs(static_cast<float>(s[idx[k] - v0])) * inv_t : -kInf;
    lp[k] = lp_in[k] - log_keep;
  }
  const bool own_y = y >= 0 && y < V;

  // Teacher probabilities: as given (tail) or renormalized over K.
  // tail=False renormalizes as (lp - lp_max) - lp_log_l: lp - (lp_max + log l) would absorb log l
  // when |lp| is huge (e.g. -1e30 in fp32).
  float lp_max = 0.f, lp_log_l = 0.f, sum_p = 0.f;
  if constexpr (TAIL) {
    for (int64_t k = 0; k < K; ++k) sum_p += std::exp(lp[k]);
  } else {
    float m = -kInf;
    for (int64_t k = 0; k < K; ++k) m = std::max(m, lp[k]);
    float l = 0.f;
    for (int64_t k = 0; k < K; ++k) l += std::exp(lp[k] - m);
    lp_max = m;
    lp_log_l = std::log(l);
  }

  // lse of z over the whole row; for the tail also lse_out over the non-K entries alone.
  // p_tail, mass: the tail mass P and the teacher's total, sum_k p_k + P: the gradient's q
  // coefficient. It is 1 but where there is no tail bucket for a top-K mass below 1 (K = V, or no
  // student mass outside K) or the given probabilities sum above 1.
  float lse, lse_out = -kInf, lse_h, p_tail = 0.f, mass = 1.f;
  if (P.phase == 2) {
    lse = st[0];
    lse_out = st[1];
    lse_h = st[2];
    p_tail = st[3];
    mass = st[4];
  } else {
    float m_a, l_a, m_in = -kInf, l_in = 0.f;  // (max, sum) of the sweep; of the K entries
    if constexpr (TAIL) {
      for (int64_t k = 0; k < K; ++k)
        if (own(k)) mask[idx[k] - v0] = -kInf;
      vf mv = splat(-kInf);
      blocks(s, mask, V, [&](vf sr, vf mk, int64_t, int64_t n) __attribute__((always_inline)) {
        mv = vmax(mv, fs(sr, n) * inv_t + mk);
      });
      m_a = hmax(mv);
      const float m_safe = m_a == -kInf ? 0.f : m_a;
      vf lv{};
      blocks(s, mask, V, [&](vf sr, vf mk, int64_t, int64_t n) __attribute__((always_inline)) {
        lv += vexp(fs(sr, n) * inv_t + mk - m_safe);
      });
      for (int64_t k = 0; k < K; ++k)
        if (own(k)) mask[idx[k] - v0] = 0.f;
      l_a = hsum(lv);
      lse_out = m_safe + std::log(l_a);
      for (int64_t k = 0; k < K; ++k) m_in = std::max(m_in, zk[k]);
      if (m_in != -kInf)
        for (int64_t k = 0; k < K; ++k) l_in += std::exp(zk[k] - m_in);
      lse = log_add_exp(m_in == -kInf ? -kInf : m_in + std::log(l_in), lse_out);
    } else {
      m_a = fs(row_max(s, V)) * inv_t;
      // a slice of -inf sums to 0 (a whole row keeps the reference's NaN)
      const float m_safe = P.phase == 1 && m_a == -kInf ? 0.f : m_a;
      vf lv{};
      blocks(s, s, V, [&](vf sr, vf, int64_t, int64_t n) __attribute__((always_inline)) {
        lv += vexp(fs(sr, n) * inv_t - m_safe);
      });
      l_a = hsum(lv);
      lse = m_safe + std::log(l_a);
    }
    float m_h = -kInf, l_h = 0.f;
    lse_h = lse;
    if constexpr (NEED_H) {
      m_h = fs(row_max(s, V));
      const float m_safe = P.phase == 1 && m_h == -kInf ? 0.f : m_h;
      vf lv{};
      blocks(s, s, V, [&](vf sr, vf, int64_t, int64_t n) __attribute__((always_inline)) {
        lv += vexp(fs(sr, n) - m_safe);
      });
      l_h = hsum(lv);
      lse_h = m_safe + std::log(l_h);
    }
    if (P.phase == 1) {
      float pz = 0.f, sp = 0.f, plp = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const float lpk = (lp[k] - lp_max) - lp_log_l;
        if (lpk == -kInf) continue;
        const float pk = std::exp(lpk);
        sp += pk;
        plp += pk * lpk;
        if (own(k)) pz += pk * zk[k];
      }
      const float sy = P.has_hard && own_y ? fs(static_cast<float>(s[y])) : 0.f;
      const float row[10] = {m_a, l_a, m_h, l_h, m_in, l_in, pz, sy, sp, plp};
      std::copy(row, row + 10, o);
      return;
    }
    if constexpr (TAIL) {
      // No tail bucket when K covers the vocabulary or the student has no mass outside K.
      p_tail = (K < V && lse_out != -kInf) ? std::max(0.f, 1.f - sum_p) : 0.f;
      mass = sum_p + p_tail;
    }
    float soft = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float lpk = (lp[k] - lp_max) - lp_log_l;
      if (lpk != -kInf) soft += std::exp(lpk) * (lpk - zk[k] + lse);
    }
    if (TAIL && p_tail > 0.f) soft += p_tail * (std::log(p_tail) - lse_out + lse);
    *soft_out = soft;
    *hard_out = P.has_hard ? lse_h - fs(static_cast<float>(s[y])) : 0.f;
  }
  if (!P.compute_grad) return;

  // ---- the gradient: every entry with the non-K formula, then the K and target entries
  const float cs = P.alpha_w * P.grad_scale * inv_t;
  const float ch = P.has_hard ? P.one_minus_alpha * P.grad_scale : 0.f;
  const float lse_o = lse_out == -kInf ? 0.f : lse_out;
  // d loss / d f(s) off K; the stores multiply by f'(s)
  auto outside = [&](vf sr) __attribute__((always_inline)) -> vf {
    const vf zs = sr * inv_t;
    const vf q = vexp(zs - lse);
    vf d = q;
    if constexpr (TAIL) d = mass * q - p_tail * vexp(zs - lse_o);
    vf ph = q;
    if constexpr (NEED_H) ph = vexp(sr - lse_h);
    return cs * d + ch * ph;
  };
  blocks(s, s, V, [&](vf sr, vf, int64_t k, int64_t n) __attribute__((always_inline)) {
    const vf x = fs(sr, n);
    const vf gx = outside(x) * fs.grad(x);
    if (n == kW)
      store(g + k, gx);
    else
      store_partial(g + k, n, gx);
  });
  if (P.has_hard && own_y) {
    const vf x = fs(load_partial(s + y, 1, -kInf), 1);
    store_partial(g + y, 1, (outside(x) - ch) * fs.grad(x));
  }
  for (int64_t k = 0; k < K; ++k) {
    if (!own(k)) continue;
    const int64_t j = idx[k] - v0;
    const float sk = fs(static_cast<float>(s[j]));
    const float ph = NEED_H ? std::exp(sk - lse_h) : std::exp(zk[k] - lse);
    const float d = mass * std::exp(zk[k] - lse) - std::exp((lp[k] - lp_max) - lp_log_l);
    g[j] = static_cast<S>((cs * d + ch * ph - (j == y ? ch : 0.f)) * fs.grad(sk));
  }
}

template <bool TAIL, bool NEED_H, typename S>
void topk_rows(const S* s, const float* lp, const int64_t* idx, S* g, const int64_t* target, int64_t R,
               int64_t ignore_index, const TopkParams& P, float* soft, float* hard, const float* stats,
               float* out) {
  const int64_t V = P.V, K = P.K;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> mask(TAIL ? V : 0, 0.f), zk(K), lp_row(K);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t y = target ? target[r] : -1;
      S* gr = g ? g + r * V : nullptr;
      float* o = out ? out + r * 10 : nullptr;
      if (target && y == ignore_index) {  // counts for nothing: 0 loss, 0 gradient
        if (P.phase == 0) soft[r] = hard[r] = 0.f;
        if (o) std::fill(o, o + 10, 0.f);
        if (gr) std::fill(gr, gr + V, static_cast<S>(0.f));
        continue;
      }
      topk_row<TAIL, NEED_H, S>(s + r * P.stride_s, lp + r * K, idx + r * K, gr, y - P.vocab_start, P,
                                mask.data(), zk.data(), lp_row.data(), soft + r, hard + r,
                                stats ? stats + r * 5 : nullptr, o);
    }
  });
}

template <typename S>
void topk_dispatch(bool tail, bool need_h, const at::Tensor& st, const float* lp, const int64_t* idx,
                   at::Tensor& grad, const int64_t* target, int64_t ignore_index, const TopkParams& P,
                   float* soft, float* hard, const float* stats, float* out) {
  const S* s = reinterpret_cast<const S*>(st.const_data_ptr());
  S* g = P.compute_grad ? reinterpret_cast<S*>(grad.data_ptr()) : nullptr;
  const int64_t R = st.size(0);
#define PYKD_ROWS(TL, NH) topk_rows<TL, NH, S>(s, lp, idx, g, target, R, ignore_index, P, soft, hard, stats, out)
  if (tail && need_h) PYKD_ROWS(true, true);
  if (tail && !need_h) PYKD_ROWS(true, false);
  if (!tail && need_h) PYKD_ROWS(false, true);
  if (!tail && !need_h) PYKD_ROWS(false, false);
#undef PYKD_ROWS
}

void topk_dtypes(bool tail, bool need_h, const at::Tensor& s, const float* lpp, const int64_t* ip,
                 at::Tensor& grad, const int64_t* tp, int64_t ignore_index, const TopkParams& P, float* sp,
                 float* hp, const float* stats, float* out, const char* op) {
  switch (s.scalar_type()) {
    case at::kFloat:
      topk_dispatch<float>(tail, need_h, s, lpp, ip, grad, tp, ignore_index, P, sp, hp, stats, out);
      break;
    case at::kHalf:
      topk_dispatch<c10::Half>(tail, need_h, s, lpp, ip, grad, tp, ignore_index, P, sp, hp, stats, out);
      break;
    case at::kBFloat16:
      topk_dispatch<c10::BFloat16>(tail, need_h, s, lpp, ip, grad, tp, ignore_index, P, sp, hp, stats, out);
      break;
    default:
      TORCH_CHECK(false, op, ": logits must be float32, float16 or bfloat16");
  }
}

// Checks the top-K tensors' shapes; the row kernel reads and writes at these indices: sorted,
// distinct, >= 0 in every row that counts (an ignored row's indices are never read).
void check_topk_rows(const at::Tensor& student, const at::Tensor& topk_logprobs, const at::Tensor& ix,
                     const int64_t* tp, int64_t ignore_index, const char* op) {
  TORCH_CHECK(student.dim() == 2 && topk_logprobs.dim() == 2 && ix.sizes() == topk_logprobs.sizes() &&
                  topk_logprobs.size(0) == student.size(0),
              op, ": student (rows, V), topk_logprobs and topk_indices (rows, K)");
  TORCH_CHECK(ix.scalar_type() == at::kLong, op, ": indices must be int64");
  const int64_t R = ix.size(0), K = ix.size(1);
  const int64_t* ip = ix.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    if (tp && tp[r] == ignore_index) continue;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = ip[r * K + k];
      TORCH_CHECK_VALUE(i >= 0, "teacher_topk_indices must be >= 0, found ", i);
      TORCH_CHECK_VALUE(k == 0 || ip[r * K + k - 1] < i, op, ": indices must be sorted and distinct in each row");
    }
  }
}

TopkParams topk_params(const at::Tensor& s, int64_t K, double temperature, double alpha, bool scale_by_t2,
                       at::ArrayRef<double> logit_map, bool has_hard, bool compute_grad, const char* op) {
  TORCH_CHECK(logit_map.size() == 2, op, ": logit_map is (scale, softcap)");
  TopkParams P;
  P.V = P.V_total = s.size(1);
  P.stride_s = s.stride(0);
  P.K = K;
  P.inv_t = static_cast<float>(1.0 / temperature);
  P.alpha_w = static_cast<float>(alpha * (scale_by_t2 ? temperature * temperature : 1.0));
  P.one_minus_alpha = static_cast<float>(1.0 - alpha);
  P.grad_scale = 1.f;
  P.has_hard = has_hard;
  P.compute_grad = compute_grad;
  P.fs = LogitMap(logit_map[0], logit_map[1]);
  return P;
}


std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_kd_loss_fwd_cpu(
    const at::Tensor& student, const at::Tensor& topk_logprobs, const at::Tensor& topk_indices,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& num_items,
    double temperature, double alpha, bool tail, int64_t ignore_index, bool scale_by_t2,
    at::ArrayRef<double> logit_map, c10::string_view reduction, bool compute_grad) {
  const char* op = "pykd::topk_kd_loss_fwd";
  const Reduction red = parse_reduction(std::string(reduction));
  const auto s = unit_stride_rows(student);
  const auto lp = topk_logprobs.to(at::kFloat).contiguous();
  const auto ix = topk_indices.contiguous();
  const int64_t R = s.size(0), V = s.size(1), K = lp.size(1);
  const at::Tensor tgt = target_rows(target, R, op);
  const int64_t* tp = tgt.defined() ? tgt.data_ptr<int64_t>() : nullptr;
  check_topk_rows(s, lp, ix, tp, ignore_index, op);  // ids >= V are dropped (pykd checks their bound)
  const double n = reduction_count(tp, R, V, ignore_index, num_items);

  TopkParams P = topk_params(s, K, temperature, alpha, scale_by_t2, logit_map, tp != nullptr, compute_grad, op);
  const bool fold_mean = red == Reduction::kMean && s.scalar_type() != at::kHalf;
  P.grad_scale = fold_mean ? static_cast<float>(1.0 / n) : 1.f;

  auto fopts = s.options().dtype(at::kFloat);
  auto soft = new_output({R}, fopts);
  auto hard = new_output({R}, fopts);
  auto grad = new_output(compute_grad ? at::IntArrayRef{R, V} : at::IntArrayRef{0}, s.options());
  const bool need_h = P.has_hard && temperature != 1.0;
  if (R > 0 && V > 0)
    topk_dtypes(tail, need_h, s, lp.const_data_ptr<float>(), ix.const_data_ptr<int64_t>(), grad, tp,
                ignore_index, P, soft.data_ptr<float>(), hard.data_ptr<float>(), nullptr, nullptr, op);
  auto [loss, soft_r, hard_r] = reduce_rows(soft, hard, P.alpha_w, P.one_minus_alpha, red, n);
  return {loss, soft_r, hard_r, grad};
}

// One phase of topk_kd_loss on the vocabulary slice [vocab_start, vocab_start + V) of vocab_total
// entries (indices and targets global): phase 1 -> (R, 10) row stats (see topk_row), phase 2 -> the
// (R, V) gradient times scale from (R, 5) stats (lse, lse_out, lse_h, P, mass).
at::Tensor topk_kd_loss_shard_cpu(const at::Tensor& student, const at::Tensor& topk_logprobs,
                                  const at::Tensor& topk_indices, const std::optional<at::Tensor>& target,
                                  const std::optional<at::Tensor>& stats, const at::Tensor& scale,
                                  double temperature, double alpha, bool tail, int64_t ignore_index,
                                  bool scale_by_t2, at::ArrayRef<double> logit_map, int64_t phase,
                                  int64_t vocab_start, int64_t vocab_total) {
  const char* op = "pykd::topk_kd_loss_shard";
  TORCH_CHECK(phase == 1 || phase == 2, op, ": phase must be 1 or 2");
  const auto s = unit_stride_rows(student);
  const auto lp = topk_logprobs.to(at::kFloat).contiguous();
  const auto ix = topk_indices.contiguous();
  const int64_t R = s.size(0), V = s.size(1), K = lp.size(1);
  const at::Tensor tgt = target_rows(target, R, op);
  const int64_t* tp = tgt.defined() ? tgt.data_ptr<int64_t>() : nullptr;
  check_topk_rows(s, lp, ix, tp, ignore_index, op);
  TopkParams P = topk_params(s, K, temperature, alpha, scale_by_t2, logit_map, tp != nullptr, phase == 2, op);
  P.phase = static_cast<int>(phase);
  P.vocab_start = vocab_start;
  P.V_total = vocab_total;
  P.grad_scale = scale.item<float>();
  at::Tensor st;
  if (phase == 2) {
    TORCH_CHECK(stats.has_value() && stats->size(0) == R && stats->size(1) == 5, op,
                ": phase 2 needs (rows, 5) stats");
    st = stats->to(at::kFloat).contiguous();
  }
  auto out = new_output({R, phase == 1 ? 10 : 0}, s.options().dtype(at::kFloat));
  auto grad = new_output(phase == 2 ? at::IntArrayRef{R, V} : at::IntArrayRef{0}, s.options());
  const bool need_h = P.has_hard && temperature != 1.0;
  if (R > 0 && V > 0)
    topk_dtypes(tail, need_h, s, lp.const_data_ptr<float>(), ix.const_data_ptr<int64_t>(), grad, tp,
                ignore_index, P, nullptr, nullptr, st.defined() ? st.data_ptr<float>() : nullptr,
                phase == 1 ? out.data_ptr<float>() : nullptr, op);
  return phase == 2 ? grad : out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pykd, m) {
  m.def(
      "topk_kd_loss_fwd(Tensor student, Tensor topk_logprobs, Tensor topk_indices, Tensor? target, "
      "Tensor? num_items, float temperature, float alpha, bool tail, int ignore_index, "
      "bool scale_by_t2, float[] logit_map, str reduction, bool compute_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "topk_kd_loss_shard(Tensor student, Tensor topk_logprobs, Tensor topk_indices, Tensor? target, "
      "Tensor? stats, Tensor scale, float temperature, float alpha, bool tail, int ignore_index, "
      "bool scale_by_t2, float[] logit_map, int phase, int vocab_start, int vocab_total) -> Tensor");
}

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  m.impl("topk_kd_loss_fwd", &topk_kd_loss_fwd_cpu);
  m.impl("topk_kd_loss_shard", &topk_kd_loss_shard_cpu);
}

}  // namespace pykd
