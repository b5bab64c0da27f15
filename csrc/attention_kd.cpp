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
//
// A tile works on raw fp32 buffers: the GEMMs call ATen's exported brgemm (MKL) directly and the
// elementwise work runs in vector loops, so a tile makes no dispatcher call (ATen remains only for a
// top-k capture's row statistics). The ops' autograd is C++ too (end of file).
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "kd_common.h"
#include "vec_math.h"

namespace pykd {
namespace {

using at::Tensor;
constexpr int64_t kTile = 64;
// Up to this many keys a task takes kLongTile query rows: half the tasks, and larger GEMMs, at BERT
// lengths; scratch stays a few (kLongTile, N_k) fp32 buffers.
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

// x as a contiguous tensor of dtype t: x itself when it is one (no dispatcher call: at tiny shapes
// the kernels' ~20 conversions of inputs that need none were a sizeable part of a call).
Tensor as(const Tensor& x, at::ScalarType t) {
  return x.scalar_type() == t && x.is_contiguous() ? x : x.to(t).contiguous();
}

Tensor f32(const std::optional<Tensor>& x) { return x.has_value() ? as(*x, at::kFloat) : Tensor(); }

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
      : q(as(q_, at::kFloat)),
        k(as(k_, at::kFloat)),
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
      qt = as(*qt_, at::kFloat);
      kt = as(*kt_, div == Div::kTopKKL ? at::kLong : at::kFloat);
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
        auto t = as(*th_, at::kLong);
        TORCH_CHECK_VALUE(t.numel() == H, "pykd: teacher_heads must have one entry per student head");
        for (int64_t h = 0; h < H; ++h) th[h] = t.data_ptr<int64_t>()[h];
      }
      for (int64_t h = 0; h < H; ++h)
        TORCH_CHECK_VALUE(th[h] >= 0 && th[h] < qt.size(1), "pykd: teacher_heads out of range");
    }
    if (mask_.has_value()) mask = as(*mask_, at::kBool);
    bs = bs_;
    if (bm_.has_value()) {
      TORCH_CHECK_VALUE(bs > 0 && bm_->dim() == 4, "pykd: block_mask must be 4-D with block_size > 0");
      bm = as(*bm_, at::kBool);
      tile = std::min(kTile, bs);
    } else if (bs == 0 && Nk <= kLongTileMaxKeys) {
      tile = kLongTile;
    }
    if (thr_.has_value()) thr = as(*thr_, at::kFloat);
  }

  void set_quant(const std::optional<Tensor>& qc_, const std::optional<Tensor>& kc_,
                 const std::optional<Tensor>& qs_, const std::optional<Tensor>& ks_,
                 const std::string& pv_format) {
    if (qc_.has_value()) {
      TORCH_CHECK_VALUE(kc_.has_value() && qs_.has_value() && ks_.has_value() && bs > 0,
                        "pykd: quantized q needs k codes, both scales and block_size");
      qc = as(*qc_, at::kFloat);
      kc = as(*kc_, at::kFloat);
      qsc = as(*qs_, at::kFloat);
      ksc = as(*ks_, at::kFloat);
    }
    if (pv_format == "none") pv = 0;
    else if (pv_format == "int8") pv = 1;
    else if (pv_format == "fp8_e4m3") pv = 2;
    else TORCH_CHECK_VALUE(false, "pykd: pv_format must be none, int8 or fp8_e4m3; got ", pv_format);
  }
};

// C (m, n) = A (m, k) B (k, n) (+ C with `add`), row-major with leading dims: ATen's exported
// fp32 brgemm (MKL), with no dispatcher call and no tensor per GEMM; at BERT's N = 128 and below
// those cost as much as the GEMMs.
#ifndef CPUBLAS_BRGEMM_F32F32F32
#error "pykd needs torch's fp32 cpublas::brgemm (torch >= 2.8)"
#endif
PYKD_INLINE void gemm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb,
                      float* C, int64_t ldc, bool add) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, A, B, C, false);
}

// A thread's scratch, grown on demand and freed with the parallel chunk.
template <typename T>
struct Buf {
  std::unique_ptr<T[]> p;
  int64_t cap = 0;
  T* get(int64_t n) {
    if (n > cap) p.reset(new T[n]), cap = n;
    return p.get();
  }
};

struct Scratch {
  Buf<float> s, t, e, x, y, z, w;
  Buf<bool> vis;
  std::vector<int64_t> cols;
};

// dst (D, n) = the rows cols[j] (or j) of src (ld floats apart), transposed, in 16 x 16 blocks so
// that the strided writes stay in a few cache lines (a (128, 512) tile transposed a row at a time
// cost a sizeable part of its GEMM).
void gather_t(const float* src, int64_t ld, const int64_t* cols, int64_t n, int64_t D, float* dst) {
  constexpr int64_t kB = 16;
  for (int64_t j0 = 0; j0 < n; j0 += kB) {
    const int64_t j1 = std::min(n, j0 + kB);
    for (int64_t d0 = 0; d0 < D; d0 += kB) {
      const int64_t d1 = std::min(D, d0 + kB);
      for (int64_t j = j0; j < j1; ++j) {
        const float* r = src + (cols ? cols[j] : j) * ld;
        for (int64_t d = d0; d < d1; ++d) dst[d * n + j] = r[d];
      }
    }
  }
}

// dst (n, D) = the rows cols[j] of src; without cols src itself (no copy).
const float* gather_rows(const float* src, const int64_t* cols, int64_t n, int64_t D, Buf<float>& buf) {
  if (!cols) return src;
  float* dst = buf.get(n * D);
  for (int64_t j = 0; j < n; ++j) std::memcpy(dst + j * D, src + cols[j] * D, D * sizeof(float));
  return dst;
}

// The dk / dv update of a tile: dst rows (cols[j] or j) (+)= A (n, k) B (k, D). Dense tiles GEMM
// straight into dst, the task's first tile (which sees the fewest keys) over it, zeroing the rows
// past n; gathered columns go through tmp.
void update_rows(float* dst, const float* A, const float* B, int64_t n, int64_t k, int64_t D, const int64_t* cols,
                 bool first, int64_t rows_total, float* tmp) {
  if (!cols) {
    gemm(n, D, k, A, k, B, D, dst, D, !first);
    if (first) std::fill(dst + n * D, dst + rows_total * D, 0.f);
    return;
  }
  gemm(n, D, k, A, k, B, D, tmp, D, false);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) dst[cols[j] * D + d] += tmp[j * D + d];
}

// One query tile's scores, in the task's scratch: the keys it sees (cols: the gathered columns of a
// block mask's visible blocks; none = [0, n)), S (rows, n) = scale_s q k^T (from the codes and their
// block scales when quantized), -inf where hidden; vis (rows, n), or null when every key is visible;
// with a divergence T (rows, n), the teacher's scores -inf where hidden, ln(code) of a stored map, or
// a top-k capture's p_t on the captured keys and -1 elsewhere (never hidden).
struct RawTile {
  int64_t n = 0;
  const int64_t* cols = nullptr;
  float *s = nullptr, *t = nullptr;
  const bool* vis = nullptr;
};

RawTile raw_scores(const Problem& P, int64_t b, int64_t h, int64_t m0, int64_t rows, Scratch& W) {
  RawTile R;
  const int64_t hi = P.causal ? std::min(P.Nk, m0 + rows) : P.Nk;
  R.n = hi;
  if (P.bm.defined()) {
    const bool* r = P.bm.const_data_ptr<bool>() +
                    (((P.bm.size(0) == 1 ? 0 : b) * P.bm.size(1) + (P.bm.size(1) == 1 ? 0 : h)) * P.bm.size(2) +
                     m0 / P.bs) * P.bm.size(3);
    W.cols.clear();
    for (int64_t kb = 0; kb < P.bm.size(3) && kb * P.bs < hi; ++kb)
      if (r[kb])
        for (int64_t j = kb * P.bs; j < std::min(hi, (kb + 1) * P.bs); ++j) W.cols.push_back(j);
    R.n = static_cast<int64_t>(W.cols.size());
    if (R.n < hi) R.cols = W.cols.data();
  }
  const int64_t n = R.n;
  if (n == 0) return R;
  const int64_t hk = h / P.Gs, r0 = (b * P.H + h) * P.Nq + m0;
  const bool quant = P.qc.defined();
  const float* Q = (quant ? P.qc : P.q).const_data_ptr<float>() + r0 * P.Ds;
  const float* K = (quant ? P.kc : P.k).const_data_ptr<float>() + (b * P.Hkv + hk) * P.Nk * P.Ds;
  float* kt = W.x.get(P.Ds * n);
  gather_t(K, P.Ds, R.cols, n, P.Ds, kt);
  float* S = R.s = W.s.get(rows * n);
  gemm(rows, n, P.Ds, Q, P.Ds, kt, n, S, n, false);
  const float ss = static_cast<float>(P.scale_s);
  if (quant) {  // s = (cq ck^T) sq sk scale: exact integer products for int8 codes
    const float* sq = P.qsc.const_data_ptr<float>() + (b * P.H + h) * P.qsc.size(2);
    const float* sk = P.ksc.const_data_ptr<float>() + (b * P.Hkv + hk) * P.ksc.size(2);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < n; ++j)
        S[i * n + j] *= sq[(m0 + i) / P.bs] * sk[(R.cols ? R.cols[j] : j) / P.bs] * ss;
  } else {
    for (int64_t i = 0; i < rows * n; ++i) S[i] *= ss;
  }
  if (P.mask.defined() || P.causal || P.thr.defined()) {
    bool* vis = W.vis.get(rows * n);
    const bool* mk = P.mask.defined() ? P.mask.const_data_ptr<bool>() + b * P.Nk : nullptr;
    const float* th = P.thr.defined() ? P.thr.const_data_ptr<float>() + r0 : nullptr;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const int64_t c = R.cols ? R.cols[j] : j;
        float& s = S[i * n + j];
        // a row top-k keeps s >= theta (a NaN score stays visible)
        const bool v = (!mk || mk[c]) && (!P.causal || c <= m0 + i) && !(th && s < th[i]);
        vis[i * n + j] = v;
        if (!v) s = -kInf;
      }
    R.vis = vis;
  }
  if (P.div == Div::kNone) return R;
  float* T = R.t = W.t.get(rows * n);
  const int64_t th = P.th[h], Ht = P.qt.size(1);
  if (P.div == Div::kTopKKL) {  // p_t on the captured keys, -1 elsewhere
    TORCH_CHECK(!R.cols, "pykd: a top-k capture cannot distill a block-sparse student");
    const int64_t Kc = P.qt.size(3), c0 = ((b * Ht + th) * P.Nq + m0) * Kc;
    const float* pr = P.qt.const_data_ptr<float>() + c0;
    const int64_t* ix = P.kt.const_data_ptr<int64_t>() + c0;
    std::fill(T, T + rows * n, -1.f);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t kk = 0; kk < Kc; ++kk)
        if (ix[i * Kc + kk] < n) T[i * n + ix[i * Kc + kk]] = pr[i * Kc + kk];
    return R;
  }
  if (P.tmap) {  // t = ln(code): the softmax renormalizes, a 0 code is -inf
    const uint8_t* code = P.qt.const_data_ptr<uint8_t>() + ((b * Ht + th) * P.Nq + m0) * P.Nk;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < n; ++j)
        T[i * n + j] = std::log(static_cast<float>(code[i * P.Nk + (R.cols ? R.cols[j] : j)]));
  } else {
    const int64_t Dt = P.qt.size(3);
    const float* Qt = P.qt.const_data_ptr<float>() + ((b * Ht + th) * P.Nq + m0) * Dt;
    const float* Kt = P.kt.const_data_ptr<float>() + (b * P.kt.size(1) + th / P.Gt) * P.Nk * Dt;
    float* ktt = W.x.get(Dt * n);
    gather_t(Kt, Dt, R.cols, n, Dt, ktt);
    gemm(rows, n, Dt, Qt, Dt, ktt, n, T, n, false);
    const float st = static_cast<float>(P.scale_t);
    for (int64_t i = 0; i < rows * n; ++i) T[i] *= st;
  }
  if (R.vis)
    for (int64_t i = 0; i < rows * n; ++i)
      if (!R.vis[i]) T[i] = -kInf;
  return R;
}

// The ATen view of a raw tile, for the top-k capture's row statistics (the one divergence without a
// vector loop).
struct Tile {
  Tensor s, t, vis;  // (rows, n); vis undefined = all visible
  Tile(const RawTile& R, int64_t rows) {
    const auto f = at::TensorOptions().dtype(at::kFloat);
    s = at::from_blob(R.s, {rows, R.n}, f);
    t = at::from_blob(R.t, {rows, R.n}, f);
    if (R.vis) vis = at::from_blob(const_cast<bool*>(R.vis), {rows, R.n}, at::TensorOptions().dtype(at::kBool));
  }
};

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

// d row / d s of a top-k capture's tile (natural units): c p_s - p_t on the captured keys,
// - T p_out elsewhere; hidden entries 0.
Tensor topk_term(const Tile& T, const Tensor& ls, const Tensor& lt, const Tensor& aux) {
  return where_vis(T, (T.s - ls).exp() - at::where(T.t >= 0, T.t, aux * (T.s - lt).exp()));
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

// A top-k capture's row loss and backward stats from the tile (scores s, t = p_t on the captured keys
// and -1 elsewhere) and l (the row sums of exp(s - m)); pr the capture's probabilities (rows, K):
// row = sum_k p_k ln p_k + sum_k p_k (lse - z_k) + T (ln T + lse - lse_out), the tail term only if
// T > 0 and a key lies outside K; lse - z_k = (m - z_k) + ln l keeps its digits.
void topk_rows_fwd(const Tile& T, const float* l, const Tensor& pr, const Tensor& row, const Tensor& st) {
  const auto f = T.s.options();
  auto [m, has] = safe_max(T.s);
  auto l_safe = at::from_blob(const_cast<float*>(l), {T.s.size(0), 1}, f);
  auto so = T.s.masked_fill(T.t >= 0, -kInf);
  auto [mo, has_o] = safe_max(so);
  auto lo = at::where(has_o, (so - mo).exp_().sum(1, true), at::ones({}, f));
  auto pos = T.t > 0;
  auto zero = at::zeros({}, f);
  auto a1 = at::where(pos, T.t * (m - T.s), zero).sum(1, true);
  auto a2 = at::where(pos, T.t, zero).sum(1, true);
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
  row.copy_(at::where(has, r, 0.0f).squeeze(1));
  st.select(1, 0).copy_(ls.squeeze(1));
  st.select(1, 1).copy_(lt.squeeze(1));
  st.select(1, 2).copy_(at::where(has, tail_u, 0.0f).squeeze(1));
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
  const float it = static_cast<float>(P.inv_tau);
  const float levels = P.pv == 1 ? 127.f : 448.f;
  float* lse_p = lse.data_ptr<float>();
  at::parallel_for(0, P.B * P.H * tiles, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView worker_guard;  // dispatch TLS is per thread
    Scratch W;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / (P.H * tiles), h = (u / tiles) % P.H, m0 = (u % tiles) * P.tile;
      const int64_t rows = std::min(P.tile, P.Nq - m0);
      const int64_t r0 = (b * P.H + h) * P.Nq + m0;  // the tile's first row in (B, H, N_q) outputs
      const RawTile R = raw_scores(P, b, h, m0, rows, W);
      const int64_t n = R.n;
      if (n == 0) {  // the tile sees no key: out 0, lse +inf, loss 0
        std::fill(lse_p + r0, lse_p + r0 + rows, kInf);
        if (P.v.defined()) {
          float* o = out_f.data_ptr<float>();
          std::fill(o + r0 * P.Ds, o + (r0 + rows) * P.Ds, 0.f);
        }
        if (has_div) {
          std::fill(row.data_ptr<float>() + r0, row.data_ptr<float>() + r0 + rows, 0.f);
          float* st = stats.data_ptr<float>() + 3 * r0;
          for (int64_t i = 0; i < rows; ++i) st[3 * i] = st[3 * i + 1] = kInf, st[3 * i + 2] = 0.f;
        }
        continue;
      }
      // e = exp(s - m) and l, its row sum (1 for a row that sees no key: e 0, out 0)
      float* e = W.e.get(rows * n);
      float* l = W.w.get(rows);
      if (P.div != Div::kTopKKL) {  // the vector loops: lse, and the divergence's row and stats
        tile_rows_fwd(P.div, it, R.s, R.t, R.vis, rows, n, e, l, lse_p + r0,
                      has_div ? row.data_ptr<float>() + r0 : nullptr,
                      has_div ? stats.data_ptr<float>() + 3 * r0 : nullptr);
      } else {
        tile_rows_fwd(Div::kNone, 1.f, R.s, nullptr, R.vis, rows, n, e, l, lse_p + r0, nullptr, nullptr);
        topk_rows_fwd(Tile(R, rows), l, P.qt[b][P.th[h]].narrow(0, m0, rows), row[b][h].narrow(0, m0, rows),
                      stats[b][h].narrow(0, m0, rows));
      }
      if (!P.v.defined()) continue;
      // out = (e V) / l: P as is, or quantized with the fixed scale 127 (int8) or 448 (fp8 e4m3)
      if (P.pv != 0) {
        for (int64_t i = 0; i < rows * n; ++i)
          e[i] = P.pv == 1 ? std::nearbyint(e[i] * 127.f) : static_cast<float>(c10::Float8_e4m3fn(e[i] * 448.f));
      }
      const float* V = gather_rows(P.v.const_data_ptr<float>() + (b * P.Hkv + h / P.Gs) * P.Nk * P.Ds, R.cols,
                                   n, P.Ds, W.y);
      float* o = out_f.data_ptr<float>() + r0 * P.Ds;
      gemm(rows, P.Ds, n, e, n, V, P.Ds, o, P.Ds, false);
      for (int64_t i = 0; i < rows; ++i) {
        const float den = P.pv == 0 ? l[i] : l[i] * levels;
        for (int64_t d = 0; d < P.Ds; ++d) o[i * P.Ds + d] /= den;
      }
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
  Tensor dO, outc, g;
  if (has_do) {
    dO = as(*grad_out, at::kFloat);
    // Delta = sum_j P dP: the row dot of dO and out, or (dense_delta: a quantized-P forward's out is
    // not P V) from the tile's own P and dP
    if (!dense_delta) outc = as(out, at::kFloat);
  }
  if (has_div) g = as(*grad_row, at::kFloat);
  const int64_t tiles = (P.Nq + P.tile - 1) / P.tile;
  const Tensor lse_c = as(lse, at::kFloat), stats_c = as(stats, at::kFloat);
  // Split each (b, h) into chunks of query tiles so that threads have work; each task owns fp32
  // dk/dv buffers, summed below. The split is fixed (kTasks), never the thread count, so dk and dv
  // are bitwise the same for any number of threads.
  constexpr int64_t kTasks = 16;  // scratch: 2 max(B H, 16) N_k D_s fp32
  const int64_t bh = P.B * P.H;
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>(tiles, (kTasks + bh - 1) / std::max<int64_t>(bh, 1)));
  auto dq = new_output({P.B, P.H, P.Nq, P.Ds}, f);
  // Dense tiles write their task's first tile over the buffers (update_rows); gathered columns add.
  const bool overwrite = !P.bm.defined() && (has_do || has_div);
  auto part = [&] {
    return overwrite ? new_output({P.B, P.H, chunks, P.Nk, P.Ds}, f) : at::zeros({P.B, P.H, chunks, P.Nk, P.Ds}, f);
  };
  auto dk_part = part();
  auto dv_part = has_do ? part() : Tensor();
  if (!has_do && !has_div) dq.zero_();
  const int64_t D = P.Ds;
  const float* outp = outc.defined() ? outc.const_data_ptr<float>() : nullptr;
  const float it = static_cast<float>(P.inv_tau), ss = static_cast<float>(P.scale_s);
  at::parallel_for(0, bh * chunks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView worker_guard;
    Scratch W;
    Buf<float> dp_buf, ds_buf, delta_buf;
    for (int64_t u = begin; u < end; ++u) {
      if (!has_do && !has_div) break;
      const int64_t b = u / (P.H * chunks), h = (u / chunks) % P.H, c = u % chunks;
      const int64_t t0 = c * tiles / chunks, t1 = (c + 1) * tiles / chunks;
      const int64_t part_off = ((b * P.H + h) * chunks + c) * P.Nk * D, kv_off = (b * P.Hkv + h / P.Gs) * P.Nk * D;
      for (int64_t ti = t0; ti < t1; ++ti) {
        const int64_t m0 = ti * P.tile, rows = std::min(P.tile, P.Nq - m0);
        const int64_t r0 = (b * P.H + h) * P.Nq + m0;
        float* dq_t = dq.data_ptr<float>() + r0 * D;
        const RawTile R = raw_scores(P, b, h, m0, rows, W);
        const int64_t n = R.n;
        if (n == 0) {
          std::fill(dq_t, dq_t + rows * D, 0.f);
          continue;
        }
        const bool first = ti == t0;
        float* ds = ds_buf.get(rows * n);
        float *p = nullptr, *dp = nullptr;
        const float* delta = nullptr;
        float* tmp = R.cols ? W.z.get(n * D) : nullptr;  // a gathered dk / dv update
        if (has_do) {
          const float* dOt = dO.const_data_ptr<float>() + r0 * D;
          p = W.e.get(rows * n);
          tile_probs(R.s, lse_c.const_data_ptr<float>() + r0, rows, n, p);
          // dv += p^T dO
          float* pt = W.y.get(n * rows);
          gather_t(p, n, nullptr, rows, n, pt);
          update_rows(dv_part.data_ptr<float>() + part_off, pt, dOt, n, rows, D, R.cols, first, P.Nk, tmp);
          // dp = dO v^T
          float* vt = W.x.get(D * n);
          gather_t(P.v.const_data_ptr<float>() + kv_off, D, R.cols, n, D, vt);
          dp = dp_buf.get(rows * n);
          gemm(rows, n, D, dOt, D, vt, n, dp, n, false);
          float* dl = delta_buf.get(rows);
          for (int64_t i = 0; i < rows; ++i) {
            float acc = 0.f;
            if (dense_delta)
              for (int64_t j = 0; j < n; ++j) acc += p[i * n + j] * dp[i * n + j];
            else
              for (int64_t d = 0; d < D; ++d) acc += dOt[i * D + d] * outp[(r0 + i) * D + d];
            dl[i] = acc;
          }
          delta = dl;
        }
        if (P.div != Div::kTopKKL) {  // the vector loops
          tile_rows_bwd(P.div, it, R.s, R.t, R.vis, rows, n, p, dp, delta,
                        has_div ? g.const_data_ptr<float>() + r0 : nullptr,
                        has_div ? stats_c.const_data_ptr<float>() + 3 * r0 : nullptr, ds);
        } else {  // flash dS, then the capture's term in ATen
          tile_rows_bwd(Div::kNone, 1.f, R.s, nullptr, R.vis, rows, n, p, dp, delta, nullptr, nullptr, ds);
          const Tile T(R, rows);
          auto st = stats_c[b][h].narrow(0, m0, rows);
          auto term = topk_term(T, st.select(1, 0).unsqueeze(1), st.select(1, 1).unsqueeze(1),
                                st.select(1, 2).unsqueeze(1));
          at::from_blob(ds, {rows, n}, f).add_(term * g[b][h].narrow(0, m0, rows).unsqueeze(1));
        }
        for (int64_t i = 0; i < rows * n; ++i) ds[i] *= ss;
        // dq = ds k, dk += ds^T q (q, k dequantized: the straight-through backward)
        const float* Kr = gather_rows(P.k.const_data_ptr<float>() + kv_off, R.cols, n, D, W.x);
        gemm(rows, D, n, ds, n, Kr, D, dq_t, D, false);
        float* dst = W.y.get(n * rows);
        gather_t(ds, n, nullptr, rows, n, dst);
        update_rows(dk_part.data_ptr<float>() + part_off, dst, P.q.const_data_ptr<float>() + r0 * D, n, rows, D,
                    R.cols, first, P.Nk, tmp);
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

// ---- Autograd, in C++: at tiny shapes (and before every GPU launch) Python's custom-op autograd
// cost several times the kernels. The ops are called through the dispatcher, so CUDA tensors reach
// the Triton launchers registered from Python, and torch.compile traces both ops.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = std::optional<Tensor>;

OptT opt(const Tensor& t) { return t.defined() ? OptT(t) : std::nullopt; }

const auto& fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pykd::attention_kd_fwd", "")
                             .typed<decltype(attention_kd_fwd_cpu)>();
  return op;
}

const auto& bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pykd::attention_kd_bwd", "")
                             .typed<decltype(attention_kd_bwd_cpu)>();
  return op;
}

constexpr size_t kFwdArgs = 21;  // attention_kd_fwd's arguments: backward returns one entry each

// The forward op's arguments, as every autograd kernel below receives them.
#define PYKD_FWD_PARAMS                                                                                   \
  const Tensor &q, const Tensor &k, const OptT &v, const OptT &q_t, const OptT &k_t, const OptT &mask,    \
      const OptT &th, const std::string &divergence, bool causal, double scale_s, double scale_t,         \
      double temperature, const OptT &block_mask, int64_t block_size, const OptT &row_threshold,          \
      const OptT &q_codes, const OptT &k_codes, const OptT &q_scale, const OptT &k_scale,                 \
      const std::string &pv_format, bool teacher_map
#define PYKD_FWD_ARGS                                                                                     \
  q, k, v, q_t, k_t, mask, th, divergence, causal, scale_s, scale_t, temperature, block_mask, block_size, \
      row_threshold, q_codes, k_codes, q_scale, k_scale, pv_format, teacher_map

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_below_autograd(PYKD_FWD_PARAMS) {
  at::AutoDispatchBelowADInplaceOrView below;
  return fwd_op().call(PYKD_FWD_ARGS);
}

// Saves what backward_from needs (`extra`: more tensors, after the 16 it reads). The options go in
// one tuple: one saved_data entry to write and read, not nine.
void save_for_bwd(AutogradContext* ctx, PYKD_FWD_PARAMS, const Tensor& out, const Tensor& lse,
                  const Tensor& stats, const std::vector<Tensor>& extra = {}, const std::string& reduction = "") {
  ctx->set_materialize_grads(false);
  auto t = [](const OptT& x) { return x.value_or(Tensor()); };
  std::vector<Tensor> saved{q, k, t(v), t(q_t), t(k_t), t(mask), t(th), out, lse, stats, t(block_mask),
                            t(row_threshold), t(q_codes), t(k_codes), t(q_scale), t(k_scale)};
  saved.insert(saved.end(), extra.begin(), extra.end());
  ctx->save_for_backward(saved);
  // dense_delta: a quantized-P out is not P V
  ctx->saved_data["opts"] = c10::ivalue::Tuple::create({divergence, causal, scale_s, scale_t, temperature,
                                                        block_size, pv_format != "none", teacher_map, reduction});
}

// dq, dk, dv (undefined without v) from the gradients of out and of the per-row loss. The saved
// options: 0 divergence, 1 causal, 2 scale_s, 3 scale_t, 4 temperature, 5 block_size, 6 dense_delta,
// 7 teacher_map, 8 reduction.
variable_list backward_from(AutogradContext* ctx, const variable_list& sv, const Tensor& d_out_in,
                            const Tensor& d_row_in) {
  const auto o = ctx->saved_data.at("opts").toTuple();
  const auto& e = o->elements();
  const std::string& divergence = e[0].toStringRef();
  const Tensor d_out = sv[2].defined() ? d_out_in : Tensor();
  const Tensor d_row = divergence != "none" ? d_row_in : Tensor();
  variable_list res(3);
  if (!d_out.defined() && !d_row.defined()) return res;
  auto [dq, dk, dv] = bwd_op().call(opt(d_out), opt(d_row), sv[0], sv[1], opt(sv[2]), opt(sv[3]), opt(sv[4]),
                                    opt(sv[5]), opt(sv[6]), sv[7], sv[8], sv[9], divergence, e[1].toBool(),
                                    e[2].toDouble(), e[3].toDouble(), e[4].toDouble(), opt(sv[10]), e[5].toInt(),
                                    opt(sv[11]), e[6].toBool(), opt(sv[12]), opt(sv[13]), opt(sv[14]),
                                    opt(sv[15]), e[7].toBool());
  res[0] = dq;
  res[1] = dk;
  if (sv[2].defined()) res[2] = dv;
  return res;
}

class AttentionKDFunction : public torch::autograd::Function<AttentionKDFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, PYKD_FWD_PARAMS) {
    auto [out, row, lse, stats] = forward_below_autograd(PYKD_FWD_ARGS);
    save_for_bwd(ctx, PYKD_FWD_ARGS, out, lse, stats);
    ctx->mark_non_differentiable({lse, stats});
    return {out, row, lse, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto res = backward_from(ctx, ctx->get_saved_variables(), grads[0], grads[1]);
    res.resize(kFwdArgs);
    return res;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_kd_fwd_autograd(PYKD_FWD_PARAMS) {
  if (!at::GradMode::is_enabled()) return forward_below_autograd(PYKD_FWD_ARGS);  // no graph to build
  auto r = AttentionKDFunction::apply(PYKD_FWD_ARGS);
  return {r[0], r[1], r[2], r[3]};
}

// ---- attention_kd_loss: the forward op and the reduction of its per-row loss in one op and one
// autograd node (the reduction's half-dozen small ops and their backward nodes cost more host time
// than the kernels at BERT sizes). A row counts if it sees a key (a finite lse; the kernels write 0
// for the others) and, with mask_queries, its query is real; "mean" divides by the rows that count
// (for "mse_scores" by their visible pairs, stats[..., 2]).

// (loss, real): real the (B, 1, N_q) counted-query mask, undefined without mask_queries.
std::pair<Tensor, Tensor> reduce_rows(const Tensor& row, const Tensor& lse, const Tensor& stats, const OptT& mask,
                                      bool mask_queries, Reduction reduction, const std::string& divergence,
                                      Tensor* n_out) {
  const Tensor real = mask_queries && mask.has_value() ? mask->unsqueeze(1) : Tensor();
  const Tensor r = real.defined() ? at::where(real, row, at::zeros({}, row.options())) : row;
  if (reduction == Reduction::kNone) return {r, real};
  const Tensor total = r.sum();
  if (reduction == Reduction::kSum) return {total, real};
  Tensor counted = lse != kInf;
  if (real.defined()) counted = counted.logical_and(real);
  // fp32 counts (a bool sum is int64, and each int64/float division would convert it)
  Tensor n = divergence == "mse_scores" ? (stats.select(-1, 2) * counted).sum() : counted.sum(at::kFloat);
  n = n.clamp_min(1);
  if (n_out) *n_out = n;
  return {total / n, real};
}

#define PYKD_LOSS_PARAMS PYKD_FWD_PARAMS, const std::string &reduction, bool mask_queries
#define PYKD_LOSS_ARGS PYKD_FWD_ARGS, reduction, mask_queries

// The parsed reduction, after checking the op has a divergence to reduce.
Reduction loss_reduction(const std::string& reduction, const std::string& divergence) {
  const Reduction red = parse_reduction(reduction);
  TORCH_CHECK_VALUE(divergence != "none", "pykd::attention_kd_loss needs a divergence");
  return red;
}

const auto& loss_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pykd::attention_kd_loss", "")
                             .typed<std::tuple<Tensor, Tensor>(PYKD_LOSS_PARAMS)>();
  return op;
}

class AttentionKDLossFunction : public torch::autograd::Function<AttentionKDLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, PYKD_LOSS_PARAMS) {
    const Reduction red = loss_reduction(reduction, divergence);
    auto [out, row, lse, stats] = forward_below_autograd(PYKD_FWD_ARGS);
    Tensor n;  // forward runs without grad: this node is the reduction's backward too
    auto [loss, real] = reduce_rows(row, lse, stats, mask, mask_queries, red, divergence, &n);
    save_for_bwd(ctx, PYKD_FWD_ARGS, out, lse, stats, {n, real}, reduction);
    return {out, loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto sv = ctx->get_saved_variables();
    const Tensor &n = sv[16], &real = sv[17];
    Tensor d_row;
    if (grads[1].defined()) {
      const Reduction red = parse_reduction(ctx->saved_data.at("opts").toTupleRef().elements()[8].toStringRef());
      // (B, H, N_q), the shape of lse (sv[8]) and of the per-row loss
      d_row = red == Reduction::kNone ? grads[1]
                                      : (red == Reduction::kMean ? grads[1] / n : grads[1]).expand_as(sv[8]);
      if (real.defined()) d_row = at::where(real, d_row, at::zeros({}, d_row.options()));
    }
    auto res = backward_from(ctx, sv, grads[0], d_row);
    res.resize(kFwdArgs + 2);
    return res;
  }
};

std::tuple<Tensor, Tensor> attention_kd_loss_autograd(PYKD_LOSS_PARAMS) {
  if (!at::GradMode::is_enabled()) {  // no graph to build
    at::AutoDispatchBelowADInplaceOrView below;
    return loss_op().call(PYKD_LOSS_ARGS);
  }
  auto r = AttentionKDLossFunction::apply(PYKD_LOSS_ARGS);
  return {r[0], r[1]};
}

// Below autograd (inference mode, or a compiled graph's forward) on any device.
std::tuple<Tensor, Tensor> attention_kd_loss_composite(PYKD_LOSS_PARAMS) {
  const Reduction red = loss_reduction(reduction, divergence);
  auto [out, row, lse, stats] = fwd_op().call(PYKD_FWD_ARGS);
  return {out, reduce_rows(row, lse, stats, mask, mask_queries, red, divergence, nullptr).first};
}

// The backward op has no derivative of its own: a double backward raises when it reaches it.
class AttentionKDBackwardFunction : public torch::autograd::Function<AttentionKDBackwardFunction> {
 public:
  template <typename... Args>
  static variable_list forward(AutogradContext*, Args&&... args) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [dq, dk, dv] = bwd_op().call(std::forward<Args>(args)...);
    return {dq, dk, dv};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "pykd.attention_kd / pykd.attention: double backward is not supported");
    return {};
  }
};

#define PYKD_BWD_PARAMS                                                                                  \
  const OptT &grad_out, const OptT &grad_row, const Tensor &q, const Tensor &k, const OptT &v, const OptT &q_t, \
      const OptT &k_t, const OptT &mask, const OptT &th, const Tensor &out, const Tensor &lse,               \
      const Tensor &stats, const std::string &divergence, bool causal, double scale_s, double scale_t,      \
      double temperature, const OptT &block_mask, int64_t block_size, const OptT &row_threshold,            \
      bool dense_delta, const OptT &q_codes, const OptT &k_codes, const OptT &q_scale, const OptT &k_scale, \
      bool teacher_map
#define PYKD_BWD_ARGS                                                                                       \
  grad_out, grad_row, q, k, v, q_t, k_t, mask, th, out, lse, stats, divergence, causal, scale_s, scale_t,     \
      temperature, block_mask, block_size, row_threshold, dense_delta, q_codes, k_codes, q_scale, k_scale, \
      teacher_map

std::tuple<Tensor, Tensor, Tensor> attention_kd_bwd_autograd(PYKD_BWD_PARAMS) {
  if (!at::GradMode::is_enabled()) {  // a first-order backward: no graph to build
    at::AutoDispatchBelowADInplaceOrView below;
    return bwd_op().call(PYKD_BWD_ARGS);
  }
  auto r = AttentionKDBackwardFunction::apply(PYKD_BWD_ARGS);
  return {r[0], r[1], r[2]};
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
  m.def(
      "attention_kd_loss(Tensor q, Tensor k, Tensor? v, Tensor? q_t, Tensor? k_t, "
      "Tensor? key_padding_mask, Tensor? teacher_heads, str divergence, bool causal, float scale_s, "
      "float scale_t, float temperature, Tensor? block_mask=None, int block_size=0, "
      "Tensor? row_threshold=None, Tensor? q_codes=None, Tensor? k_codes=None, Tensor? q_scale=None, "
      "Tensor? k_scale=None, str pv_format=\"none\", bool teacher_map=False, str reduction=\"mean\", "
      "bool mask_queries=False) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  m.impl("attention_kd_fwd", &attention_kd_fwd_cpu);
  m.impl("attention_kd_bwd", &attention_kd_bwd_cpu);
}

TORCH_LIBRARY_IMPL(pykd, Autograd, m) {
  m.impl("attention_kd_fwd", &attention_kd_fwd_autograd);
  m.impl("attention_kd_bwd", &attention_kd_bwd_autograd);
  m.impl("attention_kd_loss", &attention_kd_loss_autograd);
}

TORCH_LIBRARY_IMPL(pykd, CompositeExplicitAutograd, m) {
  m.impl("attention_kd_loss", &attention_kd_loss_composite);
}

}  // namespace pykd
