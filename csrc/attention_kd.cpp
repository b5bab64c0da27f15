// CPU kernels of pykd.attention_kd / pykd.attention (DESIGN.md section 5).
//
// The algorithm of the Triton kernels, blockwise: one task per (batch, head, query tile of kTile
// rows) computes that tile's scores against all visible keys with one GEMM (student and teacher),
// so its softmax needs no online rescaling and scratch is O(kTile * N) per thread, never O(N^2).
// Forward per row: out = softmax(s) v, lse, and the divergence with the row statistics backward
// needs (lse of s/tau and t/tau, and aux = reverse KL or C = sum p_s (p_s - p_t)).
// Backward recomputes the tile's scores and adds g_i * d row_i / d s_ij to the flash-attention
// dS = P (dP - Delta); dq is written per tile, dk and dv accumulate in per-task fp32 buffers that are
// summed at the end (over tasks and over the GQA group), so no two threads write one row.
//
// Sparse and quantized students (DESIGN.md section 6): with a block mask the query tile shrinks to
// the block size, so a tile lies in one block row, and its GEMMs run over the gathered columns of
// the visible key blocks only (exact: hidden tiles are never computed, forward or backward). A row
// threshold (row top-k) hides s_ij < theta_i. Quantized forward: s = (cq cq^T) * sq * sk * scale from
// the int8/fp8 codes and their per-block scales, and P = exp(s - m_i) (m_i the row max) quantized to
// int8 (round(127 P)) or fp8 e4m3 (448 P) before P V. Backward recomputes the same scores from the
// codes and multiplies dS by the dequantized q, k (straight through). The teacher's scores are hidden
// wherever the student's are (renormalized over them).
// A top-k capture in place of the teacher (Div::kTopKKL) gives each tile p_t on the captured keys
// (scattered, -1 elsewhere); the forward adds the student's lse over the keys outside K, the
// backward c p_s - p_t [in K] - T p_out [not in K] (see kernels/attention_kd.py). A stored uint8
// map of the teacher's P (teacher_map) gives t = ln(code), renormalized by the softmax.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kd_common.h"
#include "vec_math.h"

namespace pykd {
namespace {

using at::Tensor;
constexpr int64_t kTile = 64;
// Up to this many keys a task takes kLongTile query rows: half the tasks, and the per-tile ATen
// calls around the GEMMs, at BERT lengths; scratch stays a few (kLongTile, N_k) fp32 buffers.
constexpr int64_t kLongTile = 128, kLongTileMaxKeys = 1024;

// kTopKKL: the teacher is a top-k capture, q_t its probabilities and k_t its key indices
// (B, H_t, N_q, K); the row loss is KL(top-k + tail bucket || student) (pykd/capture.py).
enum class Div { kNone, kKL, kReverseKL, kMSE, kMSEScores, kTopKKL };

Div parse_attention_divergence(const std::string& d) {
  if (d == "none") return Div::kNone;
  if (d == "kl") return Div::kKL;
  if (d == "reverse_kl") return Div::kReverseKL;
  if (d == "mse") return Div::kMSE;
  if (d == "mse_scores") return Div::kMSEScores;
  if (d == "topk_kl") return Div::kTopKKL;
  TORCH_CHECK_VALUE(false, "pykd: divergence must be one of kl, reverse_kl, mse, mse_scores; got ", d);
}

Tensor f32(const std::optional<Tensor>& x) {
  return x.has_value() ? x->to(at::kFloat).contiguous() : Tensor();
}

// Everything a tile needs, as fp32 contiguous tensors.
struct Problem {
  Tensor q, k, v, qt, kt, mask;  // v, qt, kt, mask may be undefined
  Tensor bm, thr;                // block mask (Bm, Hm, nbq, nbk) bool; row threshold (B, H, Nq)
  Tensor qc, kc, qsc, ksc;       // quantized forward: codes as fp32 and per-block fp32 scales
  std::vector<int64_t> th;       // teacher head of each student head
  Div div;
  bool causal;
  bool tmap = false;  // q_t is a uint8 map of the teacher's P (B, H_t, N_q, N_k): t = ln(code)
  double scale_s, scale_t, inv_tau;
  int64_t B, H, Hkv, Nq, Nk, Ds, Gs, Gt;
  int64_t bs = 0, tile = kTile;  // block size (mask and quantization); query rows per task
  int pv = 0;                    // P before P V: 0 as is, 1 int8, 2 fp8 e4m3

  Problem(const Tensor& q_, const Tensor& k_, const std::optional<Tensor>& v_,
          const std::optional<Tensor>& qt_, const std::optional<Tensor>& kt_,
          const std::optional<Tensor>& mask_, const std::optional<Tensor>& th_, const std::string& d,
          bool causal_, double ss, double st, double tau, const std::optional<Tensor>& bm_,
          int64_t bs_, const std::optional<Tensor>& thr_, bool tmap_ = false)
      : q(q_.to(at::kFloat).contiguous()),
        k(k_.to(at::kFloat).contiguous()),
        v(f32(v_)),
        div(parse_attention_divergence(d)),
        causal(causal_),
        tmap(tmap_ && div != Div::kNone),
        scale_s(ss),
        scale_t(st),
        inv_tau(1.0 / tau) {
    TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4, "pykd: q and k must be 4-D (B, H, N, D)");
    B = q.size(0), H = q.size(1), Nq = q.size(2), Ds = q.size(3);
    Hkv = k.size(1), Nk = k.size(2);
    TORCH_CHECK_VALUE(Hkv > 0 && H % Hkv == 0, "pykd: K/V heads must divide the query heads");
    Gs = H / Hkv;
    Gt = 1;
    if (tmap) {
      TORCH_CHECK_VALUE(qt_.has_value() && qt_->scalar_type() == at::kByte && qt_->dim() == 4 &&
                            qt_->size(0) == B && qt_->size(2) == Nq && qt_->size(3) == Nk,
                        "pykd: a teacher map must be uint8 (B, H_t, N_q, N_k)");
      qt = qt_->contiguous();  // uint8: converted per tile
    } else if (div != Div::kNone) {
      TORCH_CHECK_VALUE(qt_.has_value() && kt_.has_value(), "pykd: a divergence needs q_t and k_t");
      qt = qt_->to(at::kFloat).contiguous();
      kt = kt_->to(div == Div::kTopKKL ? at::kLong : at::kFloat).contiguous();
      if (div == Div::kTopKKL)
        TORCH_CHECK_VALUE(qt.dim() == 4 && qt.sizes() == kt.sizes() && qt.size(2) == Nq && qt.size(0) == B,
                          "pykd: a top-k capture needs probs and indices of one shape (B, H_t, N_q, K)");
      TORCH_CHECK_VALUE(kt.size(1) > 0 && qt.size(1) % kt.size(1) == 0,
                        "pykd: teacher K heads must divide the teacher query heads");
      Gt = qt.size(1) / kt.size(1);
    }
    if (div != Div::kNone) {
      th.resize(H);
      for (int64_t h = 0; h < H; ++h) th[h] = h;
      if (th_.has_value()) {
        auto t = th_->to(at::kLong).contiguous();
        TORCH_CHECK_VALUE(t.numel() == H, "pykd: teacher_heads must have one entry per student head");
        for (int64_t h = 0; h < H; ++h) th[h] = t.data_ptr<int64_t>()[h];
      }
      for (int64_t h = 0; h < H; ++h)
        TORCH_CHECK_VALUE(th[h] >= 0 && th[h] < qt.size(1), "pykd: teacher_heads out of range");
    }
    if (mask_.has_value()) mask = mask_->to(at::kBool).contiguous();
    bs = bs_;
    if (bm_.has_value()) {
      TORCH_CHECK_VALUE(bs > 0 && bm_->dim() == 4, "pykd: block_mask must be 4-D with block_size > 0");
      bm = bm_->to(at::kBool).contiguous();
      tile = std::min(kTile, bs);
    } else if (bs == 0 && Nk <= kLongTileMaxKeys) {
      tile = kLongTile;
    }
    if (thr_.has_value()) thr = thr_->to(at::kFloat).contiguous();
  }

  void set_quant(const std::optional<Tensor>& qc_, const std::optional<Tensor>& kc_,
                 const std::optional<Tensor>& qs_, const std::optional<Tensor>& ks_,
                 const std::string& pv_format) {
    if (qc_.has_value()) {
      TORCH_CHECK_VALUE(kc_.has_value() && qs_.has_value() && ks_.has_value() && bs > 0,
                        "pykd: quantized q needs k codes, both scales and block_size");
      qc = qc_->to(at::kFloat).contiguous();
      kc = kc_->to(at::kFloat).contiguous();
      qsc = qs_->to(at::kFloat).contiguous();
      ksc = ks_->to(at::kFloat).contiguous();
    }
    if (pv_format == "none") pv = 0;
    else if (pv_format == "int8") pv = 1;
    else if (pv_format == "fp8_e4m3") pv = 2;
    else TORCH_CHECK_VALUE(false, "pykd: pv_format must be none, int8 or fp8_e4m3; got ", pv_format);
  }
};

struct Tile {
  Tensor s, t, vis;  // (rows, n) scores (natural units, -inf where hidden); vis undefined = all
  Tensor cols;       // the n key indices the tile sees; undefined = [0, n)
  int64_t n;
  Tensor take(const Tensor& x) const { return cols.defined() ? x.index_select(0, cols) : x.narrow(0, 0, n); }
  Tensor index() const { return cols.defined() ? cols : at::arange(n, at::kLong); }
  // dst[cols] += alpha a b; with `first` (dense tiles only: the first of a task, which sees the fewest
  // keys) dst = alpha a b on [0, n) and 0 below, so the task's buffer needs no zero fill.
  void addmm(const Tensor& dst, const Tensor& a, const Tensor& b, double alpha = 1.0, bool first = false) const {
    if (cols.defined()) {
      dst.index_add_(0, cols, at::mm(a, b), alpha);
    } else {
      dst.narrow(0, 0, n).addmm_(a, b, first ? 0.0 : 1.0, alpha);
      if (first && n < dst.size(0)) dst.narrow(0, n, dst.size(0) - n).zero_();
    }
  }
};

// The keys a query tile may see: [0, hi) (hi < N_k only when causal), or with a block mask the
// columns of its block row's visible key blocks below hi.
void tile_columns(const Problem& P, Tile& T, int64_t b, int64_t h, int64_t m0, int64_t hi) {
  T.n = hi;
  if (!P.bm.defined()) return;
  auto row = P.bm[P.bm.size(0) == 1 ? 0 : b][P.bm.size(1) == 1 ? 0 : h][m0 / P.bs];
  const bool* r = row.const_data_ptr<bool>();
  std::vector<int64_t> cols;
  for (int64_t kb = 0; kb < row.size(0) && kb * P.bs < hi; ++kb)
    if (r[kb])
      for (int64_t j = kb * P.bs; j < std::min(hi, (kb + 1) * P.bs); ++j) cols.push_back(j);
  T.n = static_cast<int64_t>(cols.size());
  if (T.n < hi) T.cols = at::tensor(cols, at::TensorOptions().dtype(at::kLong));
}

Tile scores(const Problem& P, int64_t b, int64_t h, int64_t m0, int64_t rows) {
  Tile T;
  tile_columns(P, T, b, h, m0, P.causal ? std::min(P.Nk, m0 + rows) : P.Nk);
  if (T.n == 0) return T;
  const int64_t hk = h / P.Gs;
  if (P.qc.defined()) {  // s = (cq ck^T) sq sk scale: exact integer products for int8 codes
    auto sq = P.qsc[b][h].index_select(0, at::arange(m0, m0 + rows, at::kLong).div_(P.bs, "floor"));
    auto sk = P.ksc[b][hk].index_select(0, T.index().div(P.bs, "floor"));
    T.s = at::mm(P.qc[b][h].narrow(0, m0, rows), T.take(P.kc[b][hk]).t())
              .mul_(sq.unsqueeze(1)).mul_(sk.unsqueeze(0)).mul_(P.scale_s);
  } else {
    T.s = at::mm(P.q[b][h].narrow(0, m0, rows), T.take(P.k[b][hk]).t()).mul_(P.scale_s);
  }
  if (P.mask.defined()) T.vis = T.take(P.mask[b]).unsqueeze(0).expand({rows, T.n});
  if (P.causal) {
    auto c = T.index().unsqueeze(0) <= at::arange(m0, m0 + rows, at::kLong).unsqueeze(1);
    T.vis = T.vis.defined() ? T.vis.logical_and(c) : c;
  }
  if (P.thr.defined()) {  // row top-k: keep s_ij >= theta_i
    auto c = (T.s < P.thr[b][h].narrow(0, m0, rows).unsqueeze(1)).logical_not();  // NaN stays visible
    T.vis = T.vis.defined() ? T.vis.logical_and(c) : c;
  }
  if (T.vis.defined()) T.s.masked_fill_(T.vis.logical_not(), -kInf);
  if (P.div == Div::kTopKKL) {  // t = p_t on the captured keys, -1 elsewhere (never hidden)
    const int64_t th = P.th[h];
    auto tk = at::full({rows, P.Nk}, -1.0, T.s.options())
                  .scatter_(1, P.kt[b][th].narrow(0, m0, rows), P.qt[b][th].narrow(0, m0, rows));
    T.t = T.cols.defined() ? tk.index_select(1, T.cols) : tk.narrow(1, 0, T.n);
  } else if (P.tmap) {  // t = ln(code): the softmax renormalizes, a 0 code is -inf
    auto c = P.qt[b][P.th[h]].narrow(0, m0, rows);
    T.t = (T.cols.defined() ? c.index_select(1, T.cols) : c.narrow(1, 0, T.n)).to(at::kFloat).log_();
    if (T.vis.defined()) T.t.masked_fill_(T.vis.logical_not(), -kInf);
  } else if (P.div != Div::kNone) {
    const int64_t th = P.th[h];
    auto Kt = T.take(P.kt[b][th / P.Gt]);
    T.t = at::mm(P.qt[b][th].narrow(0, m0, rows), Kt.t()).mul_(P.scale_t);
    if (T.vis.defined()) T.t.masked_fill_(T.vis.logical_not(), -kInf);
  }
  return T;
}

Tensor where_vis(const Tile& T, const Tensor& x) {
  return T.vis.defined() ? at::where(T.vis, x, at::zeros({}, x.options())) : x;
}

// (row max with -inf replaced by 0, whether the row sees any key). A NaN max (a NaN score) counts as
// seen, so the row's lse and loss come out NaN instead of the row dropping out of the mean.
std::pair<Tensor, Tensor> safe_max(const Tensor& s) {
  auto m = std::get<0>(s.max(1, true));
  auto has = m != -kInf;
  return {at::where(has, m, at::zeros({}, m.options())), has};
}

// d row / d s for one tile (natural units), hidden entries 0.
Tensor div_term(const Problem& P, const Tile& T, const Tensor& ls, const Tensor& lt, const Tensor& aux) {
  const double it = P.inv_tau;
  Tensor term;
  if (P.div == Div::kMSEScores) {
    term = (T.s - T.t) * 2.0;
  } else if (P.div == Div::kTopKKL) {  // c p_s - p_t on the captured keys, - T p_out elsewhere
    term = (T.s - ls).exp() - at::where(T.t >= 0, T.t, aux * (T.s - lt).exp());
  } else {
    auto zs = T.s * it - ls;  // log p_s
    auto ps = zs.exp();
    if (P.div == Div::kKL) {
      term = (ps - (T.t * it - lt).exp()) * it;
    } else if (P.div == Div::kReverseKL) {
      term = ps * (zs - (T.t * it - lt) - aux) * it;
    } else {
      term = ps * ((ps - (T.t * it - lt).exp()) - aux) * (2.0 * it);
    }
  }
  return where_vis(T, term);
}

// ---- Vector loops over one tile's contiguous (rows, n) buffers. At short N (BERT's 128) the ATen
// form of these elementwise lines cost more than the tile's GEMMs; one pass per row replaces them.
// The divergences are kl, reverse_kl, mse and mse_scores (a top-k capture keeps the ATen form).

// The lanes of a block of c <= kW keys from k that are keys (not the padding of a last block) and
// visible (every key without a mask).
PYKD_INLINE vi lanes_visible(const bool* vis, int64_t k, int64_t c) {
  vi m{};
  for (int j = 0; j < kW; ++j) m[j] = (j < c && (vis == nullptr || vis[k + j])) ? -1 : 0;
  return m;
}

PYKD_INLINE vf load_block(const float* p, int64_t c) { return c == kW ? load(p) : load_partial(p, c, 0.f); }

// max of the row, NaN when it holds a NaN (so a NaN score makes its row NaN, never unseen).
PYKD_INLINE float nan_max(const float* x, int64_t n) {
  vf m = splat(-kInf);
  vi bad{};
  blocks(x, x, n, [&](vf v, vf, int64_t, int64_t) __attribute__((always_inline)) {
    m = vmax(m, v);
    bad |= v != v;
  });
  for (int j = 0; j < kW; ++j)
    if (bad[j]) return std::numeric_limits<float>::quiet_NaN();
  return hmax(m);
}

// Forward of `rows` rows: e = exp(s - m) (for P V), l (its sum, 1 for a row that sees no key), lse,
// and with a divergence the row loss and its backward stats (lse_s/tau, lse_t/tau, aux) as the ATen
// form below computes them.
PYKD_HOT void tile_rows_fwd(Div div, float it, const float* S, const float* Tt, const bool* Vis, int64_t rows,
                            int64_t n, float* E, float* l_out, float* lse, float* row, float* st) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = S + i * n;
    const bool* vis = Vis ? Vis + i * n : nullptr;
    const float m = nan_max(s, n);
    const bool has = m != -kInf;
    const float m0 = has ? m : 0.f;
    float* e = E + i * n;
    vf lv{};
    blocks(s, s, n, [&](vf x, vf, int64_t k, int64_t c) __attribute__((always_inline)) {
      const vf ex = vexp(x - m0);
      lv += ex;
      if (c == kW) store(e + k, ex);
      else store_partial(e + k, c, ex);
    });
    const float l = has ? hsum(lv) : 1.f;
    l_out[i] = l;
    lse[i] = has ? m + std::log(l) : kInf;
    if (div == Div::kNone) continue;
    const float* t = Tt + i * n;
    float r = 0.f, ls = kInf, lt = kInf, aux = 0.f;
    if (div == Div::kMSEScores) {
      vf rv{}, cv{};
      blocks(s, t, n, [&](vf x, vf y, int64_t k, int64_t c) __attribute__((always_inline)) {
        const vi on = lanes_visible(vis, k, c);
        const vf d = select(on, x - y, vf{});
        rv += d * d;
        cv += select(on, splat(1.f), vf{});
      });
      r = hsum(rv);
      aux = vis ? hsum(cv) : static_cast<float>(n);
    } else {
      const float mt_raw = nan_max(t, n);
      const float mt = mt_raw == -kInf ? 0.f : mt_raw;
      vf lsv{}, ltv{};
      blocks(s, t, n, [&](vf x, vf y, int64_t, int64_t) __attribute__((always_inline)) {
        lsv += vexp((x - m0) * it);
        ltv += vexp((y - mt) * it);
      });
      const float l_s = has ? hsum(lsv) : 1.f, l_t = has ? hsum(ltv) : 1.f;
      const float gap = (m0 - mt) * it + std::log(l_s) - std::log(l_t);
      ls = has ? m0 * it + std::log(l_s) : kInf;
      lt = has ? mt * it + std::log(l_t) : kInf;
      vf rv{}, av{};
      blocks(s, t, n, [&](vf x, vf y, int64_t k, int64_t c) __attribute__((always_inline)) {
        const vf ps = vexp(x * it - ls), pt = vexp(y * it - lt);
        const vi on = lanes_visible(vis, k, c);
        if (div == Div::kKL) {
          rv += select(on & (pt > 0.f), pt * (y - x), vf{});
        } else if (div == Div::kReverseKL) {
          rv += select(on, ps * (x - y), vf{});
        } else {  // mse of the probabilities; the padding lanes are 0 - 0
          const vf dp = ps - pt;
          rv += dp * dp;
          av += ps * dp;
        }
      });
      if (div == Div::kKL) r = hsum(rv) * it + gap;
      if (div == Div::kReverseKL) r = aux = hsum(rv) * it - gap;
      if (div == Div::kMSE) r = hsum(rv), aux = hsum(av);
    }
    row[i] = has ? r : 0.f;
    st[3 * i] = ls;
    st[3 * i + 1] = lt;
    st[3 * i + 2] = has ? aux : 0.f;
  }
}

// p = exp(s - lse) of `rows` rows (lse +inf for a row that sees no key: p 0).
PYKD_HOT void tile_probs(const float* S, const float* lse, int64_t rows, int64_t n, float* Pm) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = S + i * n;
    float* p = Pm + i * n;
    blocks(s, s, n, [&](vf x, vf, int64_t k, int64_t c) __attribute__((always_inline)) {
      const vf e = vexp(x - lse[i]);
      if (c == kW) store(p + k, e);
      else store_partial(p + k, c, e);
    });
  }
}

// Backward of `rows` rows: ds = p (dp - Delta) (P the student's probabilities, with a gradient of
// the output) + g * d row / d s (with a divergence; div_term's formulas), hidden entries 0.
PYKD_HOT void tile_rows_bwd(Div div, float it, const float* S, const float* Tt, const bool* Vis, int64_t rows,
                            int64_t n, const float* Pm, const float* dP, const float* delta, const float* g,
                            const float* st, float* dS) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = S + i * n;
    const float* t = Tt ? Tt + i * n : s;
    const bool* vis = Vis ? Vis + i * n : nullptr;
    const float di = delta ? delta[i] : 0.f, gi = g ? g[i] : 0.f;
    const float ls = st ? st[3 * i] : 0.f, lt = st ? st[3 * i + 1] : 0.f, aux = st ? st[3 * i + 2] : 0.f;
    float* ds = dS + i * n;
    blocks(s, t, n, [&](vf x, vf y, int64_t k, int64_t c) __attribute__((always_inline)) {
      vf d{};
      if (Pm) d = load_block(Pm + i * n + k, c) * (load_block(dP + i * n + k, c) - di);
      if (g) {
        vf term;
        if (div == Div::kMSEScores) {
          term = (x - y) * 2.f;
        } else {
          const vf zs = x * it - ls, ps = vexp(zs);
          if (div == Div::kKL) term = (ps - vexp(y * it - lt)) * it;
          else if (div == Div::kReverseKL) term = ps * (zs - (y * it - lt) - aux) * it;
          else term = ps * ((ps - vexp(y * it - lt)) - aux) * (2.f * it);
        }
        d += select(lanes_visible(vis, k, c), term, vf{}) * gi;
      }
      if (c == kW) store(ds + k, d);
      else store_partial(ds + k, c, d);
    });
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_kd_fwd_cpu(
    const Tensor& q, const Tensor& k, const std::optional<Tensor>& v, const std::optional<Tensor>& q_t,
    const std::optional<Tensor>& k_t, const std::optional<Tensor>& key_padding_mask,
    const std::optional<Tensor>& teacher_heads, const std::string& divergence, bool causal,
    double scale_s, double scale_t, double temperature, const std::optional<Tensor>& block_mask,
    int64_t block_size, const std::optional<Tensor>& row_threshold, const std::optional<Tensor>& q_codes,
    const std::optional<Tensor>& k_codes, const std::optional<Tensor>& q_scale,
    const std::optional<Tensor>& k_scale, const std::string& pv_format, bool teacher_map) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls below record no graph
  // Autocast is thread-local: it would reach the GEMMs of this thread's tiles and not the pool's.
  // The kernels compute in fp32 from their inputs' dtypes whatever the caller's autocast state.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  Problem P(q, k, v, q_t, k_t, key_padding_mask, teacher_heads, divergence, causal, scale_s, scale_t,
            temperature, block_mask, block_size, row_threshold, teacher_map);
  P.set_quant(q_codes, k_codes, q_scale, k_scale, pv_format);
  const auto f = q.options().dtype(at::kFloat);
  const bool has_div = P.div != Div::kNone;
  auto out_f = P.v.defined() ? new_output({P.B, P.H, P.Nq, P.Ds}, f) : Tensor();
  auto lse = new_output({P.B, P.H, P.Nq}, f);
  auto row = new_output(has_div ? at::IntArrayRef{P.B, P.H, P.Nq} : at::IntArrayRef{0}, f);
  auto stats = new_output(has_div ? at::IntArrayRef{P.B, P.H, P.Nq, 3} : at::IntArrayRef{0}, f);
  const int64_t tiles = (P.Nq + P.tile - 1) / P.tile;
  const double it = P.inv_tau;
  const double levels = P.pv == 1 ? 127.0 : 448.0;
  // out = (e V) / l, e = exp(s - m): P as is, or quantized with the fixed scale 127 or 448
  auto write_out = [&](int64_t b, int64_t h, int64_t m0, int64_t rows, const Tile& T, const Tensor& e,
                       const Tensor& l) {
    auto V = T.take(P.v[b][h / P.Gs]);
    auto o = out_f[b][h].narrow(0, m0, rows);
    if (P.pv == 0) {
      at::mm_out(o, e, V).div_(l);
    } else {
      auto codes = P.pv == 1 ? (e * 127.0).round_() : (e * 448.0).to(at::kFloat8_e4m3fn).to(at::kFloat);
      at::mm_out(o, codes, V).div_(l * levels);
    }
  };
  at::parallel_for(0, P.B * P.H * tiles, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView worker_guard;  // dispatch TLS is per thread
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / (P.H * tiles), h = (u / tiles) % P.H, m0 = (u % tiles) * P.tile;
      const int64_t rows = std::min(P.tile, P.Nq - m0);
      const Tile T = scores(P, b, h, m0, rows);
      auto st = has_div ? stats[b][h].narrow(0, m0, rows) : Tensor();
      if (T.n == 0) {  // the tile sees no key: out 0, lse +inf, loss 0
        lse[b][h].narrow(0, m0, rows).fill_(kInf);
        if (P.v.defined()) out_f[b][h].narrow(0, m0, rows).zero_();
        if (has_div) {
          row[b][h].narrow(0, m0, rows).zero_();
          st.narrow(1, 0, 2).fill_(kInf);
          st.select(1, 2).zero_();
        }
        continue;
      }
      const int64_t r0 = (b * P.H + h) * P.Nq + m0;  // the tile's first row in (B, H, N_q) outputs
      if (P.div != Div::kTopKKL) {  // the vector loops
        const Tensor S = T.s.contiguous(), Tt = has_div ? T.t.contiguous() : Tensor();
        const Tensor vis = T.vis.defined() ? T.vis.contiguous() : Tensor();
        Tensor e = at::empty({rows, T.n}, f), l = at::empty({rows, 1}, f);
        tile_rows_fwd(P.div, static_cast<float>(it), S.const_data_ptr<float>(),
                      has_div ? Tt.const_data_ptr<float>() : nullptr,
                      vis.defined() ? vis.const_data_ptr<bool>() : nullptr, rows, T.n, e.data_ptr<float>(),
                      l.data_ptr<float>(), lse.data_ptr<float>() + r0,
                      has_div ? row.data_ptr<float>() + r0 : nullptr,
                      has_div ? stats.data_ptr<float>() + 3 * r0 : nullptr);
        if (P.v.defined()) write_out(b, h, m0, rows, T, e, l);
        continue;
      }
      auto [m, has] = safe_max(T.s);
      auto e = (T.s - m).exp_();
      auto l = e.sum(1, true);
      auto l_safe = at::where(has, l, at::ones({}, f));
      lse[b][h].narrow(0, m0, rows).copy_(at::where(has, m + l_safe.log(), kInf).squeeze(1));
      if (P.v.defined()) write_out(b, h, m0, rows, T, e, l_safe);
      // a top-k capture (every other divergence took the vector loops above):
      // row = sum_k p_k ln p_k + sum_k p_k (lse - z_k) + T (ln T + lse - lse_out), the tail term
      // only if T > 0 and a key lies outside K; lse - z_k = (m - z_k) + ln l keeps its digits
      auto so = T.s.masked_fill(T.t >= 0, -kInf);
      auto [mo, has_o] = safe_max(so);
      auto lo = at::where(has_o, (so - mo).exp_().sum(1, true), at::ones({}, f));
      auto pos = T.t > 0;
      auto zero = at::zeros({}, f);
      auto a1 = at::where(pos, T.t * (m - T.s), zero).sum(1, true);
      auto a2 = at::where(pos, T.t, zero).sum(1, true);
      auto pr = P.qt[b][P.th[h]].narrow(0, m0, rows);
      auto sp = pr.sum(1, true);
      auto spl = at::where(pr > 0, pr * at::where(pr > 0, pr, 1.0f).log(), zero).sum(1, true);
      auto tail = (1.0 - sp).clamp_min(0.0);
      auto use_t = (tail > 0).logical_and(has_o);
      auto tail_u = at::where(use_t, tail, zero);
      auto log_l = l_safe.log();
      auto gap = (m - mo) + log_l - lo.log();  // lse - lse_out >= 0
      auto r = spl + a1 + a2 * log_l + tail_u * (at::where(use_t, tail, 1.0f).log() + gap);
      // backward: d row / d s = c p_s - p_t [in K] - T p_out [not in K], c = sum_k p_k + T
      auto cc = sp + tail_u;
      auto ls = at::where(has.logical_and(cc > 0), m + log_l - at::where(cc > 0, cc, 1.0f).log(), kInf);
      auto lt = at::where(has_o, mo + lo.log(), kInf);
      row[b][h].narrow(0, m0, rows).copy_(at::where(has, r, 0.0f).squeeze(1));
      st.select(1, 0).copy_(ls.squeeze(1));
      st.select(1, 1).copy_(lt.squeeze(1));
      st.select(1, 2).copy_(at::where(has, tail_u, 0.0f).squeeze(1));
    }
  });
  Tensor out = P.v.defined() ? (q.scalar_type() == at::kFloat ? out_f : out_f.to(q.scalar_type()))
                             : at::empty({0}, q.options());
  return {out, row, lse, stats};
}

std::tuple<Tensor, Tensor, Tensor> attention_kd_bwd_cpu(
    const std::optional<Tensor>& grad_out, const std::optional<Tensor>& grad_row, const Tensor& q,
    const Tensor& k, const std::optional<Tensor>& v, const std::optional<Tensor>& q_t,
    const std::optional<Tensor>& k_t, const std::optional<Tensor>& key_padding_mask,
    const std::optional<Tensor>& teacher_heads, const Tensor& out, const Tensor& lse,
    const Tensor& stats, const std::string& divergence, bool causal, double scale_s, double scale_t,
    double temperature, const std::optional<Tensor>& block_mask, int64_t block_size,
    const std::optional<Tensor>& row_threshold, bool dense_delta, const std::optional<Tensor>& q_codes,
    const std::optional<Tensor>& k_codes, const std::optional<Tensor>& q_scale,
    const std::optional<Tensor>& k_scale, bool teacher_map) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // as in the forward
  Problem P(q, k, v, q_t, k_t, key_padding_mask, teacher_heads,
            grad_row.has_value() ? divergence : std::string("none"), causal, scale_s, scale_t, temperature,
            block_mask, block_size, row_threshold, teacher_map);
  P.set_quant(q_codes, k_codes, q_scale, k_scale, "none");  // the forward's scores, from the codes
  const auto f = q.options().dtype(at::kFloat);
  const bool has_do = grad_out.has_value() && P.v.defined();
  const bool has_div = P.div != Div::kNone;
  Tensor dO, delta, g;
  if (has_do) {
    dO = grad_out->to(at::kFloat).contiguous();
    // dense_delta: a quantized-P forward's out is not P V; Delta = sum_j P dP comes from the tiles
    if (!dense_delta) delta = (dO * out.to(at::kFloat)).sum(-1, true).contiguous();  // (B, H, Nq, 1)
  }
  if (has_div) g = grad_row->to(at::kFloat).contiguous().unsqueeze(-1);
  const int64_t tiles = (P.Nq + P.tile - 1) / P.tile;
  const Tensor lse_c = lse.to(at::kFloat).contiguous(), stats_c = stats.to(at::kFloat).contiguous();
  // Split each (b, h) into chunks of query tiles so that threads have work; each task owns fp32
  // dk/dv buffers, summed below. The split is fixed (kTasks), never the thread count, so dk and dv
  // are bitwise the same for any number of threads.
  constexpr int64_t kTasks = 16;  // scratch: 2 max(B H, 16) N_k D_s fp32
  const int64_t bh = P.B * P.H;
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>(tiles, (kTasks + bh - 1) / std::max<int64_t>(bh, 1)));
  auto dq = new_output({P.B, P.H, P.Nq, P.Ds}, f);
  // Dense tiles write their task's first tile over the buffers (Tile::addmm); gathered columns add.
  const bool overwrite = !P.bm.defined() && (has_do || has_div);
  auto part = [&] {
    return overwrite ? new_output({P.B, P.H, chunks, P.Nk, P.Ds}, f) : at::zeros({P.B, P.H, chunks, P.Nk, P.Ds}, f);
  };
  auto dk_part = part();
  auto dv_part = has_do ? part() : Tensor();
  if (!has_do && !has_div) dq.zero_();
  at::parallel_for(0, bh * chunks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView worker_guard;
    for (int64_t u = begin; u < end; ++u) {
      if (!has_do && !has_div) break;
      const int64_t b = u / (P.H * chunks), h = (u / chunks) % P.H, c = u % chunks;
      const int64_t t0 = c * tiles / chunks, t1 = (c + 1) * tiles / chunks;
      for (int64_t ti = t0; ti < t1; ++ti) {
        const int64_t m0 = ti * P.tile, rows = std::min(P.tile, P.Nq - m0);
        const Tile T = scores(P, b, h, m0, rows);
        if (T.n == 0) {
          dq[b][h].narrow(0, m0, rows).zero_();
          continue;
        }
        auto Q = P.q[b][h].narrow(0, m0, rows);
        auto K = T.take(P.k[b][h / P.Gs]);
        const int64_t r0 = (b * P.H + h) * P.Nq + m0;
        if (P.div != Div::kTopKKL && !dense_delta) {  // the vector loops
          const Tensor S = T.s.contiguous(), Tt = has_div ? T.t.contiguous() : Tensor();
          const Tensor vis = T.vis.defined() ? T.vis.contiguous() : Tensor();
          Tensor ds = at::empty({rows, T.n}, f), p, dp;
          if (has_do) {
            auto V = T.take(P.v[b][h / P.Gs]);
            auto dOt = dO[b][h].narrow(0, m0, rows);
            p = at::empty({rows, T.n}, f);
            tile_probs(S.const_data_ptr<float>(), lse_c.const_data_ptr<float>() + r0, rows, T.n,
                       p.data_ptr<float>());
            T.addmm(dv_part[b][h][c], p.t(), dOt, 1.0, ti == t0);
            dp = at::mm(dOt, V.t());
          }
          tile_rows_bwd(P.div, static_cast<float>(P.inv_tau), S.const_data_ptr<float>(),
                        has_div ? Tt.const_data_ptr<float>() : nullptr,
                        vis.defined() ? vis.const_data_ptr<bool>() : nullptr, rows, T.n,
                        has_do ? p.const_data_ptr<float>() : nullptr,
                        has_do ? dp.const_data_ptr<float>() : nullptr,
                        has_do ? delta.const_data_ptr<float>() + r0 : nullptr,
                        has_div ? g.const_data_ptr<float>() + r0 : nullptr,
                        has_div ? stats_c.const_data_ptr<float>() + 3 * r0 : nullptr, ds.data_ptr<float>());
          dq[b][h].narrow(0, m0, rows).addmm_(ds, K, 0.0, P.scale_s);  // beta 0: the old values unread
          T.addmm(dk_part[b][h][c], ds.t(), Q, P.scale_s, ti == t0);
          continue;
        }
        Tensor ds = at::zeros({rows, T.n}, f);
        if (has_do) {
          auto V = T.take(P.v[b][h / P.Gs]);
          auto dOt = dO[b][h].narrow(0, m0, rows);
          auto p = (T.s - lse[b][h].narrow(0, m0, rows).unsqueeze(1)).exp_();
          T.addmm(dv_part[b][h][c], p.t(), dOt, 1.0, ti == t0);
          auto dp = at::mm(dOt, V.t());
          ds = p * (dp - (dense_delta ? (p * dp).sum(1, true) : delta[b][h].narrow(0, m0, rows)));
        }
        if (has_div) {
          auto st = stats[b][h].narrow(0, m0, rows);
          auto term = div_term(P, T, st.select(1, 0).unsqueeze(1), st.select(1, 1).unsqueeze(1),
                               st.select(1, 2).unsqueeze(1));
          ds.add_(term * g[b][h].narrow(0, m0, rows));
        }
        dq[b][h].narrow(0, m0, rows).copy_(at::mm(ds, K).mul_(P.scale_s));
        T.addmm(dk_part[b][h][c], ds.t(), Q, P.scale_s, ti == t0);
      }
    }
  });
  auto group_sum = [&](const Tensor& part) {  // (B, H, C, Nk, D) -> (B, Hkv, Nk, D)
    auto per_head = chunks == 1 ? part.select(2, 0) : part.sum(2);
    return P.Gs == 1 ? per_head : per_head.view({P.B, P.Hkv, P.Gs, P.Nk, P.Ds}).sum(2);
  };
  auto dk = group_sum(dk_part).to(k.scalar_type());
  Tensor dv = at::empty({0}, q.options());
  if (P.v.defined()) dv = (has_do ? group_sum(dv_part) : at::zeros_like(P.v)).to(v->scalar_type());
  return {dq.to(q.scalar_type()), dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pykd, m) {
  m.def(
      "attention_kd_fwd(Tensor q, Tensor k, Tensor? v, Tensor? q_t, Tensor? k_t, "
      "Tensor? key_padding_mask, Tensor? teacher_heads, str divergence, bool causal, float scale_s, "
      "float scale_t, float temperature, Tensor? block_mask=None, int block_size=0, "
      "Tensor? row_threshold=None, Tensor? q_codes=None, Tensor? k_codes=None, Tensor? q_scale=None, "
      "Tensor? k_scale=None, str pv_format=\"none\", bool teacher_map=False) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "attention_kd_bwd(Tensor? grad_out, Tensor? grad_row, Tensor q, Tensor k, Tensor? v, "
      "Tensor? q_t, Tensor? k_t, Tensor? key_padding_mask, Tensor? teacher_heads, Tensor out, "
      "Tensor lse, Tensor stats, str divergence, bool causal, float scale_s, float scale_t, "
      "float temperature, Tensor? block_mask=None, int block_size=0, Tensor? row_threshold=None, "
      "bool dense_delta=False, Tensor? q_codes=None, Tensor? k_codes=None, Tensor? q_scale=None, "
      "Tensor? k_scale=None, bool teacher_map=False) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  m.impl("attention_kd_fwd", &attention_kd_fwd_cpu);
  m.impl("attention_kd_bwd", &attention_kd_bwd_cpu);
}

}  // namespace pykd
