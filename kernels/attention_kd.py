"""Triton kernels of ``pykd.attention_kd`` / ``pykd.attention`` (DESIGN.md section 5).

Forward, one program per (query tile, student head, batch), one sweep over the key tiles:
the student's flash-attention output (online softmax at tau = 1), the teacher's online softmax stats,
and the divergence accumulators. Scores are kept in log2 units (s2 = s * log2(e)) so every
exponential is an ``exp2``. With running maxima m (student, of s2) and m_t (teacher, of t2):

    l     = sum_j 2^(s2_j - m)                     student at tau = 1 (P, out, lse)
    l_s   = sum_j 2^((s2_j - m) / tau)             student at tau (max of s2/tau is m/tau)
    l_t   = sum_j 2^((t2_j - m_t) / tau)           teacher at tau
    kl:          a1 = sum_j w_t,j (t2_j - s2_j)    KL(p_t||p_s) = ln2/tau a1/l_t + lse_s - lse_t
    reverse_kl:  a1 = sum_j w_s,j (s2_j - t2_j)    KL(p_s||p_t) = ln2/tau a1/l_s - lse_s + lse_t
    mse:         a1, a2, a3 = sum w_s^2, w_s w_t, w_t^2
                 sum_j (p_s - p_t)^2 = a1/l_s^2 - 2 a2/(l_s l_t) + a3/l_t^2,  C = a1/l_s^2 - a2/(l_s l_t)
    mse_scores:  a1 = sum_j (s2_j - t2_j)^2        sum_j (s_j - t_j)^2 = ln2^2 a1

Each accumulator is rescaled by 2^(old max - new max) (to the power the weights carry) when a row's
maximum moves. Saved per row: lse (natural, tau = 1) and stats = (lse_s, lse_t, aux) with aux = the
row's reverse KL or C; rows that see no key get lse = +inf (so P = 0 in backward), loss 0, out 0.

Backward, FA2-style: one kernel per (key tile, K/V head, batch) for dk, dv (summing the query heads
of its GQA group, so no atomics) and one per (query tile, head, batch) for dq. Each recomputes the
student and teacher score tiles from the saved statistics and adds g_i * d row_i / d s_ij (the table
in DESIGN.md section 5) to the flash-attention dS = P (dP - Delta).

Sparse and quantized students (DESIGN.md section 6), one mechanism in all three kernels:

- block mask: each query block row gets the list of its visible key blocks (and each key block the
  list of its visible query blocks, for dk/dv); tiles shrink to fit in a block and the loops walk
  only the listed blocks, so hidden tiles cost nothing, forward or backward. Dense = one block [0, N_k).
- row top-k: a per-row threshold theta_i (the k-th largest visible score, from a pre-pass); scores
  below it are hidden like masked keys, in s and in t (so the teacher is renormalized over them).
- quantized forward: s = (cq . ck) sq_i sk_j scale from int8 codes (int32 products) or fp8 e4m3
  codes, with per-block fp32 scales; P_ij = 2^(s2_ij - m_i) with m_i the row's final max (a max-only
  pre-sweep), quantized to round(127 P) (int8) or fp8 e4m3 of 448 P, and out = (codes . V) / (l levels).
  The codes are exact in V's dtype, so only the quantization itself rounds. Backward recomputes the
  same scores from the codes and multiplies dS by the dequantized q, k (straight-through).

A teacher top-k capture (DIV "topk_kl", pykd/capture.py) takes the teacher scores' place: q_t holds
its probabilities p_t,ik and k_t its key indices (B, H_t, N_q, K). A tile's captured entries come
from K compares per key (_topk_tile). Forward keeps, next to the student's (m, l), the student's
softmax over the keys outside K (m_t, l_t) and a1 = sum p_t,k (m - s2_k), a2 = sum p_t,k:

    row = sum_k p_k ln p_k + ln2 (a1 + a2 log2 l) + T (ln T + lse - lse_out),  T = 1 - sum_k p_k

(the tail term only if T > 0 and a key lies outside K). Backward adds
g_i (c p_s,ij - p_t,ij [j in K] - T p_out,ij [j not in K]), c = sum_k p_k + T, from the saved
stats = (lse - ln c, lse_out, T).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .common import new_output, rint_even

# Order is the kernels' DIV constexpr: 0 = no teacher (plain attention).
# "topk_kl" is a teacher top-k capture: q_t holds its probs, k_t its key indices (B, H_t, N_q, K).
DIVERGENCES = ("none", "kl", "reverse_kl", "mse", "mse_scores", "topk_kl")
LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, head dim (<= 64, <= 256) and sequence length N:
# a launch takes the entry of the smallest listed N >= max(N_q, N_k), past them all the largest's.
# From benchmarks/tune_attention_kd.py on an H100 at N = 8192 (results/nvidia-h100-80gb-hbm3/
# attention_kd_tune.csv); a sweep over several N prints this table with an entry per N.
CONFIGS = {
    "fwd": {64: {8192: (64, 64, 4, 3)}, 128: {8192: (128, 64, 8, 3)}},
    "dkdv": {64: {8192: (64, 64, 4, 2)}, 128: {8192: (32, 64, 4, 2)}},
    "dq": {64: {8192: (64, 64, 4, 2)}, 128: {8192: (128, 64, 8, 2)}},
    # DQ_MODE "atomic": not timed yet; picked by compiling for sm_90 (tests/aot_compile.py): BLOCK_M
    # >= 64 so the dq dot is a wgmma too, 8 warps for the fewest spills.
    "dkdv_atomic": {64: {8192: (64, 64, 8, 2)}, 128: {8192: (64, 64, 8, 2)}},
    "interpret": (16, 16, 1, 1),
}


# How the backward gets dq: "split" (default), a dq kernel per query tile that recomputes the score
# tiles, deterministic; "atomic", the dk/dv kernel adds each tile's dq with fp32 atomics (fewer GEMMs,
# summation order varies run to run; torch.use_deterministic_algorithms(True) keeps "split"). Set by
# PYKD_ATTENTION_DQ or by assigning DQ_MODE. The default moves to whichever an H200 measures faster.
DQ_MODES = ("split", "atomic")
DQ_MODE = os.environ.get("PYKD_ATTENTION_DQ", "split")


def _atomic_dq() -> bool:
    if DQ_MODE not in DQ_MODES:
        raise ValueError(
            f"the attention dq mode (PYKD_ATTENTION_DQ or pykd.kernels.attention_kd.DQ_MODE) must be one "
            f"of {DQ_MODES}, got {DQ_MODE!r}"
        )
    return DQ_MODE == "atomic" and not torch.are_deterministic_algorithms_enabled()


# How the kernels load their q, k, v, dO (and teacher q, k) tiles: "pointer" (default; the software
# pipeline prefetches them with cp.async) or "tma" (Hopper's tensor memory accelerator, from host
# tensor descriptors: the copy engine computes the addresses and fills out-of-range rows with zeros,
# fewer registers per thread). Set by PYKD_ATTENTION_LOADS or by assigning LOADS. A launch takes TMA
# only on sm_90+ (or the interpreter) and when every such tensor has a 16-byte aligned base and
# strides; else it loads through pointers. The default moves to whichever an H200 measures faster.
LOAD_MODES = ("pointer", "tma")
LOADS = os.environ.get("PYKD_ATTENTION_LOADS", "pointer")


@contextlib.contextmanager
def modes(**values):
    """DQ_MODE and LOADS set as given inside the block, restored after (tests, benchmarks, tuner)."""
    unknown = set(values) - {"DQ_MODE", "LOADS"}
    if unknown:
        raise TypeError(f"modes() takes DQ_MODE and LOADS, got {sorted(unknown)}")
    old = {name: globals()[name] for name in values}
    globals().update(values)
    try:
        yield
    finally:
        globals().update(old)


def _tma_mode(device: torch.device) -> bool:
    if LOADS not in LOAD_MODES:
        raise ValueError(
            f"the attention load mode (PYKD_ATTENTION_LOADS or pykd.kernels.attention_kd.LOADS) must be "
            f"one of {LOAD_MODES}, got {LOADS!r}"
        )
    if LOADS != "tma":
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def _descriptor(t: torch.Tensor, rows: int, block_d: int):
    """A TMA descriptor of the (B, H, N, D) tensor t, blocks (1, 1, rows, block_d); None when its
    layout admits none (a 16-byte aligned base and strides; a size-1 dim's stride is free)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    shape, strides = list(t.shape), list(t.stride())
    for i in (2, 1, 0):
        if shape[i] == 1:
            strides[i] = strides[i + 1] * shape[i + 1]
    if t.data_ptr() % 16 or any(st <= 0 or st * t.element_size() % 16 for st in strides[:3]):
        return None
    return TensorDescriptor(t, shape, strides, [1, 1, rows, block_d])


def _with_descriptors(args: list, spec: dict) -> bool:
    """Puts a descriptor in place of each args[i] of spec {i: (rows, block_d)} and returns True, or
    changes nothing and returns False when one of them admits none."""
    descs = {i: _descriptor(args[i], *blk) for i, blk in spec.items()}
    if any(d is None for d in descs.values()):
        return False
    for i, d in descs.items():
        args[i] = d
    return True


def _tma_args(args, c, dev, BM, BN, has_v=True, has_do=False, teacher=True):
    """(args with descriptors, TMA, TMA_T) of a launch: args[0:5] are q, k, v, q_t, k_t and args[7]
    dO; q-like tensors get BM-row blocks, k-like BN-row ones."""
    args = list(args)
    if not _tma_mode(dev):
        return args, False, False
    ds, dt = c["consts"]["BLOCK_DS"], c["consts"]["BLOCK_DT"]
    spec = {0: (BM, ds), 1: (BN, ds)}
    if has_v:
        spec[2] = (BN, ds)
    if has_do:
        spec[7] = (BM, ds)
    tma = _with_descriptors(args, spec)
    tma_t = False
    if tma and teacher and c["DIV"] not in (0, 5) and not c["consts"]["T_MAP"]:
        tma_t = _with_descriptors(args, {3: (BM, dt), 4: (BN, dt)})
    return args, tma, tma_t


def _config(kernel: str, d: int, n: int, device: torch.device):
    """The CONFIGS entry of a launch at head dim d and sequence length n."""
    if device.type != "cuda":
        return CONFIGS["interpret"]
    by_n = CONFIGS[kernel][64 if d <= 64 else 128]
    return by_n[min((b for b in by_n if b >= n), default=max(by_n))]


@triton.jit
def _div_term(s, t, ls, lt, aux, inv_tau, DIV: tl.constexpr):
    """d row / d s (natural score units) for scores s, t in log2 units; ls, lt, aux broadcast per
    row (ls, lt in log2 units of s/tau and t/tau)."""
    LN2: tl.constexpr = 0.6931471805599453
    if DIV == 4:
        term = 2.0 * LN2 * (s - t)
    elif DIV == 5:  # t: p_t on the captured keys, -1 elsewhere; ls = lse - ln c, lt = lse outside K
        term = tl.math.exp2(s - ls) - tl.where(t >= 0.0, t, aux * tl.math.exp2(s - lt))
    else:
        ps = tl.math.exp2(s * inv_tau - ls)
        if DIV == 1:
            pt = tl.math.exp2(t * inv_tau - lt)
            term = (ps - pt) * inv_tau
        elif DIV == 2:
            term = ps * (((s * inv_tau - ls) - (t * inv_tau - lt)) * LN2 - aux) * inv_tau
        else:
            pt = tl.math.exp2(t * inv_tau - lt)
            term = 2.0 * ps * ((ps - pt) - aux) * inv_tau
    return term


@triton.jit
def _load_rows(base, offs, stride, ok, offs_d, D: tl.constexpr):
    """(len(offs), BLOCK_D) tile of the rows base + offs * stride; 0 outside ok and past D."""
    return tl.load(base + offs[:, None] * stride + offs_d[None, :], mask=ok[:, None] & (offs_d < D)[None, :],
                   other=0.0)  # fmt: skip


@triton.jit
def _tile(x, b, h, start, stride_b, stride_h, stride_n, N, offs_d, D: tl.constexpr, BLOCK: tl.constexpr,
          BLOCK_D: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """(BLOCK, BLOCK_D) tile of rows [start, start + BLOCK) of head (b, h) of a (B, H, N, D) tensor,
    0 past N and D: x is its tensor descriptor (TMA, block (1, 1, BLOCK, BLOCK_D); the copy engine
    fills what lies outside with zeros) or its pointer."""
    if TMA:
        return x.load([b.to(tl.int32), h.to(tl.int32), start, 0]).reshape(BLOCK, BLOCK_D)
    else:
        offs = start + tl.arange(0, BLOCK)
        return _load_rows(x + b * stride_b + h * stride_h, offs, stride_n, offs < N, offs_d, D)


@triton.jit
def _load_stats(stats_ptr, row_off, ok):
    """The saved (lse of s/tau, lse of t/tau) in log2 units, and aux, of the rows row_off."""
    LOG2E: tl.constexpr = 1.4426950408889634
    ls = tl.load(stats_ptr + row_off * 3, mask=ok, other=float("inf")) * LOG2E
    lt = tl.load(stats_ptr + row_off * 3 + 1, mask=ok, other=float("inf")) * LOG2E
    aux = tl.load(stats_ptr + row_off * 3 + 2, mask=ok, other=0.0)
    return ls, lt, aux


@triton.jit
def _visible(offs_m, offs_n, row_ok, col_ok, mask_row_ptr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: key j is visible to query i (in range, not padded, j <= i if causal)."""
    vis = col_ok[None, :] & row_ok[:, None]
    if HAS_MASK:
        km = tl.load(mask_row_ptr + offs_n, mask=col_ok, other=0)
        vis = vis & (km != 0)[None, :]
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= offs_m[:, None])
    return vis


@triton.jit
def _scores(q, k_x, b, hk, start_n, stride_kb, stride_kh, stride_kn, N_K, offs_n, col_ok, offs_d, sq,
            ks_row_ptr, offs_m, row_ok, mask_row_ptr, thr2, qk_scale, QB, D: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, QK_Q: tl.constexpr, HAS_MASK: tl.constexpr,
            CAUSAL: tl.constexpr, HAS_THR: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """(s, vis): the (BLOCK_M, BLOCK_N) scores in log2 units, -inf where hidden. With QK_Q, q holds
    the query codes and k_x points to the key codes (never a descriptor); sq are the rows' scales,
    ks_row_ptr the keys'."""
    if QK_Q != 0:
        kT = tl.load(k_x + b * stride_kb + hk * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None],
                     mask=col_ok[None, :] & (offs_d < D)[:, None], other=0.0)  # fmt: skip
    else:
        kT = tl.trans(_tile(k_x, b, hk, start_n, stride_kb, stride_kh, stride_kn, N_K, offs_d, D, BLOCK_N,
                            BLOCK_D, TMA))  # fmt: skip
    s = _dot_qk(q, kT, QK_Q, PREC)
    if QK_Q != 0:
        sk = tl.load(ks_row_ptr + offs_n // QB, mask=col_ok, other=0.0)
        s = s * sq[:, None] * sk[None, :]
    s = s * qk_scale
    vis = _visible(offs_m, offs_n, row_ok, col_ok, mask_row_ptr, HAS_MASK, CAUSAL)
    if HAS_THR:
        vis = vis & ~(s < thr2[:, None])  # a NaN score stays visible: NaN out
    return tl.where(vis, s, float("-inf")), vis


@triton.jit
def _dot_qk(a, b, QK_Q: tl.constexpr, PREC: tl.constexpr):
    """a @ b in fp32: int8 codes multiply exactly into int32, fp8 codes into fp32."""
    if QK_Q == 1:
        return tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)
    elif QK_Q == 2:
        return tl.dot(a, b)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _block_list(cnt_ptr, idx_ptr, stride_cb, stride_ch, stride_ib, stride_ih, b, h, blk, NB,
                HAS_BM: tl.constexpr):  # fmt: skip
    """(number of listed blocks, pointer to their indices) of block row blk; 1 without a mask."""
    if HAS_BM:
        n = tl.load(cnt_ptr + b * stride_cb + h * stride_ch + blk)
        lst = idx_ptr + b * stride_ib + h * stride_ih + blk * NB
    else:
        n = 1
        lst = idx_ptr
    return n, lst


@triton.jit
def _block_range(lst, it, lo, hi, BS, HAS_BM: tl.constexpr):
    """[lo, hi) clipped to the it-th listed block; all of [lo, hi) without a mask."""
    if HAS_BM:
        blk = tl.load(lst + it)
        lo = tl.maximum(lo, blk * BS)
        hi = tl.minimum(hi, (blk + 1) * BS)
    return lo, hi


@triton.jit
def _topk_tile(p_base, i_base, stride_pn, stride_in, offs_m, row_ok, offs_n, K_CAP, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, TRANS: tl.constexpr):  # fmt: skip
    """A top-k capture on a score tile: p_t,ij where key j is one of row i's K captured keys, else -1;
    (BLOCK_M, BLOCK_N), or (BLOCK_N, BLOCK_M) with TRANS. One compare per captured key: the
    indices are unsorted and a row's K are scattered over the tiles."""
    if TRANS:
        t = tl.full([BLOCK_N, BLOCK_M], -1.0, tl.float32)
    else:
        t = tl.full([BLOCK_M, BLOCK_N], -1.0, tl.float32)
    for kk in range(0, K_CAP):
        ix = tl.load(i_base + offs_m * stride_in + kk, mask=row_ok, other=-1)
        pr = tl.load(p_base + offs_m * stride_pn + kk, mask=row_ok, other=0.0)
        if TRANS:
            t = tl.where(ix[None, :] == offs_n[:, None], pr[None, :], t)
        else:
            t = tl.where(ix[:, None] == offs_n[None, :], pr[:, None], t)
    return t


@triton.jit
def _map_tile(base, stride_n, offs_m, row_ok, offs_n, col_ok, TRANS: tl.constexpr):
    """Teacher scores (log2 units) from a stored uint8 map of P: t2_ij = log2(code_ij), -inf for a
    0 code; the softmax renormalizes, so the codes' scale never matters. (BLOCK_N, BLOCK_M) with
    TRANS."""
    offs_m = offs_m.to(tl.int64)  # a map holds N_q * N_k entries per head
    if TRANS:
        ptr = base + offs_m[None, :] * stride_n + offs_n[:, None]
        c = tl.load(ptr, mask=row_ok[None, :] & col_ok[:, None], other=0)
    else:
        ptr = base + offs_m[:, None] * stride_n + offs_n[None, :]
        c = tl.load(ptr, mask=row_ok[:, None] & col_ok[None, :], other=0)
    return tl.math.log2(c.to(tl.float32))


@triton.jit
def _attention_kd_fwd_kernel(
    q_ptr, k_ptr, v_ptr, qt_ptr, kt_ptr, mask_ptr, th_ptr,
    cnt_ptr, idx_ptr, thr_ptr, qc_ptr, kc_ptr, qs_ptr, ks_ptr,
    out_ptr, row_ptr, lse_ptr, stats_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_tqb, stride_tqh, stride_tqn, stride_tkb, stride_tkh, stride_tkn, stride_mb,
    stride_cb, stride_ch, stride_ib, stride_ih,
    stride_cqb, stride_cqh, stride_cqn, stride_ckb, stride_ckh, stride_ckn,
    H, G_S, G_T, N_Q, N_K, qk_scale, qk_scale_t, inv_tau, BS, NBK, NBQS, NBKS, K_CAP,
    D_S: tl.constexpr, D_T: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    DIV: tl.constexpr, HAS_V: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    SAME_TAU: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BM: tl.constexpr, HAS_THR: tl.constexpr, QK_Q: tl.constexpr, PV_Q: tl.constexpr,
    T_MAP: tl.constexpr, TMA: tl.constexpr, TMA_T: tl.constexpr,
):  # fmt: skip
    """TMA: q_ptr, k_ptr, v_ptr are tensor descriptors (and qt_ptr, kt_ptr with TMA_T), see _tile."""
    LN2: tl.constexpr = 0.6931471805599453
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // G_S
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    row_ok = offs_m < N_Q
    LOG2E: tl.constexpr = 1.4426950408889634
    row_off = bh * N_Q + offs_m
    if QK_Q != 0:  # scores from the codes
        q = _load_rows(qc_ptr + b * stride_cqb + h * stride_cqh, offs_m, stride_cqn, row_ok, offs_ds, D_S)
        k_x, skb, skh, skn = kc_ptr, stride_ckb, stride_ckh, stride_ckn
        sq = tl.load(qs_ptr + bh * NBQS + offs_m // BS, mask=row_ok, other=0.0)
    else:
        q = _tile(q_ptr, b, h, pid_m * BLOCK_M, stride_qb, stride_qh, stride_qn, N_Q, offs_ds, D_S, BLOCK_M,
                  BLOCK_DS, TMA)  # fmt: skip
        k_x, skb, skh, skn = k_ptr, stride_kb, stride_kh, stride_kn
        sq = tl.zeros([BLOCK_M], tl.float32)  # unused
    ks_row = ks_ptr + (b * (H // G_S) + hk) * NBKS
    thr2 = tl.zeros([BLOCK_M], tl.float32)
    if HAS_THR:
        thr2 = tl.load(thr_ptr + row_off, mask=row_ok, other=float("inf")) * LOG2E
    mask_row = mask_ptr + b * stride_mb
    if DIV != 0:
        th = tl.load(th_ptr + h).to(tl.int64)
        if not TMA_T:
            qt_base = qt_ptr + b * stride_tqb + th * stride_tqh
            kt_base = kt_ptr + b * stride_tkb + (th // G_T) * stride_tkh
        if DIV != 5 and not T_MAP:
            qt = _tile(qt_ptr, b, th, pid_m * BLOCK_M, stride_tqb, stride_tqh, stride_tqn, N_Q, offs_dt, D_T,
                       BLOCK_M, BLOCK_DT, TMA_T)  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    a1 = tl.zeros([BLOCK_M], tl.float32)
    a2 = tl.zeros([BLOCK_M], tl.float32)
    a3 = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    hi = N_K
    if CAUSAL:
        hi = tl.minimum(N_K, (pid_m + 1) * BLOCK_M)
    n_blk, lst = _block_list(cnt_ptr, idx_ptr, stride_cb, stride_ch, stride_ib, stride_ih, b, h,
                             pid_m * BLOCK_M // BS, NBK, HAS_BM)  # fmt: skip
    if PV_Q != 0:  # P is quantized relative to the row's final max: find it first
        for it in range(0, n_blk):
            lo_n, hi_n = _block_range(lst, it, 0, hi, BS, HAS_BM)
            for start_n in range(lo_n, hi_n, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                s, vis = _scores(q, k_x, b, hk, start_n, skb, skh, skn, N_K, offs_n, offs_n < N_K, offs_ds,
                                 sq, ks_row, offs_m, row_ok, mask_row, thr2, qk_scale, BS, D_S, BLOCK_N,
                                 BLOCK_DS, QK_Q, HAS_MASK, CAUSAL, HAS_THR, PREC, TMA)  # fmt: skip
                m_i = tl.maximum(m_i, tl.max(s, 1))
    for it in range(0, n_blk):
        lo_n, hi_n = _block_range(lst, it, 0, hi, BS, HAS_BM)
        for start_n in range(lo_n, hi_n, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < N_K
            s, vis = _scores(q, k_x, b, hk, start_n, skb, skh, skn, N_K, offs_n, col_ok, offs_ds, sq, ks_row,
                             offs_m, row_ok, mask_row, thr2, qk_scale, BS, D_S, BLOCK_N, BLOCK_DS, QK_Q,
                             HAS_MASK, CAUSAL, HAS_THR, PREC, TMA)  # fmt: skip
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if HAS_V:
                v = _tile(v_ptr, b, hk, start_n, stride_vb, stride_vh, stride_vn, N_K, offs_ds, D_S, BLOCK_N,
                          BLOCK_DS, TMA)  # fmt: skip
                if PV_Q == 1:
                    pq = rint_even(p * 127.0)
                elif PV_Q == 2:
                    pq = (p * 448.0).to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.float32)
                else:
                    pq = p
                acc = acc * alpha[:, None] + tl.dot(pq.to(v.dtype), v, input_precision=PREC)
            if DIV == 5:  # m_t, l_t: the student's softmax over the keys outside the captured K
                tk = _topk_tile(qt_base, kt_base, stride_tqn, stride_tkn, offs_m, row_ok, offs_n, K_CAP,
                                BLOCK_M, BLOCK_N, False)  # fmt: skip
                so = tl.where(tk >= 0.0, float("-inf"), s)
                mo_new = tl.maximum(m_t, tl.max(so, 1))
                mo_use = tl.where(mo_new == float("-inf"), 0.0, mo_new)
                l_t = l_t * tl.math.exp2(m_t - mo_use) + tl.sum(tl.math.exp2(so - mo_use[:, None]), 1)
                m_t = mo_new
                # a1 = sum p_t (m - s2), a2 = sum p_t over the captured keys so far (m the running max)
                a1 += a2 * (m_use - tl.where(m_i == float("-inf"), 0.0, m_i))
                pos = tk > 0.0
                a1 += tl.sum(tl.where(pos, tk * (m_use[:, None] - s), 0.0), 1)
                a2 += tl.sum(tl.where(pos, tk, 0.0), 1)
            elif DIV != 0:
                if T_MAP:
                    t = _map_tile(qt_base, stride_tqn, offs_m, row_ok, offs_n, col_ok, False)
                else:
                    kt = _tile(kt_ptr, b, th // G_T, start_n, stride_tkb, stride_tkh, stride_tkn, N_K,
                               offs_dt, D_T, BLOCK_N, BLOCK_DT, TMA_T)  # fmt: skip
                    t = tl.dot(qt, tl.trans(kt), input_precision=PREC) * qk_scale_t
                t = tl.where(vis, t, float("-inf"))
                if DIV == 4:
                    d = tl.where(vis, s - t, 0.0)
                    a1 += tl.sum(d * d, 1)
                    a2 += tl.sum(vis.to(tl.float32), 1)  # visible keys: the "mean" denominator
                else:
                    if SAME_TAU:
                        ps = p
                        alpha_s = alpha
                    else:
                        ps = tl.math.exp2((s - m_use[:, None]) * inv_tau)
                        alpha_s = tl.math.exp2((m_i - m_use) * inv_tau)
                    l_s = l_s * alpha_s + tl.sum(ps, 1)
                    mt_new = tl.maximum(m_t, tl.max(t, 1))
                    mt_use = tl.where(mt_new == float("-inf"), 0.0, mt_new)
                    alpha_t = tl.math.exp2((m_t - mt_use) * inv_tau)
                    pt = tl.math.exp2((t - mt_use[:, None]) * inv_tau)
                    l_t = l_t * alpha_t + tl.sum(pt, 1)
                    if DIV == 1:
                        # pt > 0: a 0 code of a uint8 map has t = -inf and adds nothing
                        a1 = a1 * alpha_t + tl.sum(tl.where(vis & (pt > 0.0), pt * (t - s), 0.0), 1)
                    elif DIV == 2:
                        a1 = a1 * alpha_s + tl.sum(tl.where(vis, ps * (s - t), 0.0), 1)
                    else:
                        a1 = a1 * (alpha_s * alpha_s) + tl.sum(ps * ps, 1)
                        a2 = a2 * (alpha_s * alpha_t) + tl.sum(ps * pt, 1)
                        a3 = a3 * (alpha_t * alpha_t) + tl.sum(pt * pt, 1)
                    m_t = mt_new
            m_i = m_new

    has = l_i != 0.0  # a NaN l (a NaN score) counts as seen: lse and loss come out NaN
    l_safe = tl.where(has, l_i, 1.0)
    tl.store(lse_ptr + row_off, tl.where(has, (m_i + tl.math.log2(l_safe)) * LN2, float("inf")), mask=row_ok)
    if HAS_V:
        if PV_Q == 1:
            o = acc / (l_safe * 127.0)[:, None]
        elif PV_Q == 2:
            o = acc / (l_safe * 448.0)[:, None]
        else:
            o = acc / l_safe[:, None]
        tl.store(
            out_ptr + row_off[:, None] * D_S + offs_ds[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & (offs_ds < D_S)[None, :],
        )
    if DIV != 0:
        aux = tl.zeros([BLOCK_M], tl.float32)
        lse_s = tl.full([BLOCK_M], float("inf"), tl.float32)
        lse_t = tl.full([BLOCK_M], float("inf"), tl.float32)
        if DIV == 4:
            row = a1 * (LN2 * LN2)
            aux = a2
        elif DIV == 5:
            # row = sum_k p_k ln p_k + sum_k p_k (lse - z_k) + T (ln T + lse - lse_out), the last
            # only if T > 0 and a key lies outside K; sum_k p_k (lse - z_k) = ln2 (a1 + a2 log2 l)
            sp = tl.zeros([BLOCK_M], tl.float32)
            spl = tl.zeros([BLOCK_M], tl.float32)
            for kk in range(0, K_CAP):
                pr = tl.load(qt_base + offs_m * stride_tqn + kk, mask=row_ok, other=0.0)
                sp += pr
                spl += tl.where(pr > 0.0, pr * tl.log(tl.where(pr > 0.0, pr, 1.0)), 0.0)
            tail = tl.maximum(1.0 - sp, 0.0)
            has_o = l_t > 0.0
            use_t = (tail > 0.0) & has_o
            lo_safe = tl.where(has_o, l_t, 1.0)
            mo_use = tl.where(has_o, m_t, 0.0)
            m_s_use = tl.where(has, m_i, 0.0)
            log_l = tl.math.log2(l_safe)
            gap = ((m_s_use - mo_use) + log_l - tl.math.log2(lo_safe)) * LN2  # lse - lse_out >= 0
            tail_u = tl.where(use_t, tail, 0.0)
            row = spl + (a1 + a2 * log_l) * LN2 + tail_u * (tl.log(tl.where(use_t, tail, 1.0)) + gap)
            # backward: d row / d s_ij = c p_s,ij - p_t,ij [j in K] - T p_out,ij [j not in K] with
            # c = sum_k p_k + T: saved as lse - ln c (+inf if c = 0), lse_out and T
            cc = sp + tail_u
            lse_s = tl.where(has & (cc > 0.0), (m_s_use + log_l) * LN2 - tl.log(tl.where(cc > 0.0, cc, 1.0)),
                             float("inf"))  # fmt: skip
            lse_t = tl.where(has_o, (mo_use + tl.math.log2(lo_safe)) * LN2, float("inf"))
            aux = tail_u
        else:
            if SAME_TAU:
                l_s = l_i
            ls_safe = tl.where(has, l_s, 1.0)
            lt_safe = tl.where(has, l_t, 1.0)
            m_s_use = tl.where(has, m_i, 0.0)
            m_t_use = tl.where(has, m_t, 0.0)
            # lse_s - lse_t, max difference first: the two lse may be large and close
            gap = ((m_s_use - m_t_use) * inv_tau + tl.math.log2(ls_safe) - tl.math.log2(lt_safe)) * LN2
            if DIV == 1:
                row = a1 / lt_safe * (inv_tau * LN2) + gap
            elif DIV == 2:
                row = a1 / ls_safe * (inv_tau * LN2) - gap
                aux = row
            else:
                pss = a1 / (ls_safe * ls_safe)
                pst = a2 / (ls_safe * lt_safe)
                row = pss - 2.0 * pst + a3 / (lt_safe * lt_safe)
                aux = pss - pst
            lse_s = tl.where(has, (m_s_use * inv_tau + tl.math.log2(ls_safe)) * LN2, float("inf"))
            lse_t = tl.where(has, (m_t_use * inv_tau + tl.math.log2(lt_safe)) * LN2, float("inf"))
        tl.store(row_ptr + row_off, tl.where(has, row, 0.0), mask=row_ok)
        tl.store(stats_ptr + row_off * 3, lse_s, mask=row_ok)
        tl.store(stats_ptr + row_off * 3 + 1, lse_t, mask=row_ok)
        tl.store(stats_ptr + row_off * 3 + 2, tl.where(has, aux, 0.0), mask=row_ok)


@triton.jit
def _attention_kd_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, qt_ptr, kt_ptr, mask_ptr, th_ptr, do_ptr, lse_ptr, stats_ptr, delta_ptr,
    grow_ptr, cnt_ptr, idx_ptr, thr_ptr, qc_ptr, kc_ptr, qs_ptr, ks_ptr, dk_ptr, dv_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_tqb, stride_tqh, stride_tqn, stride_tkb, stride_tkh, stride_tkn, stride_mb,
    stride_dob, stride_doh, stride_don, stride_cb, stride_ch, stride_ib, stride_ih,
    stride_cqb, stride_cqh, stride_cqn, stride_ckb, stride_ckh, stride_ckn,
    H, H_KV, G_S, G_T, N_Q, N_K, qk_scale, qk_scale_t, inv_tau, scale_s, BS, NB, NBQS, NBKS, K_CAP,
    D_S: tl.constexpr, D_T: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    DIV: tl.constexpr, HAS_V: tl.constexpr, HAS_DO: tl.constexpr, HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BM: tl.constexpr, HAS_THR: tl.constexpr, QK_Q: tl.constexpr, T_MAP: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, TMA: tl.constexpr, TMA_T: tl.constexpr,
):  # fmt: skip
    """dk = scale_s sum_i dS_ij q_i, dv = sum_i P_ij dO_i over the GQA group, in (key, query) tiles.
    With QK_Q the scores come from the codes, as in the forward. ATOMIC_DQ: also dq_i += scale_s
    dS_ij k_j for the tile's keys, added with fp32 atomics into dq_ptr (zeroed, fp32), so no dq
    kernel recomputes the score tiles (6 tile GEMMs in all instead of 9; the sum's order varies).
    TMA: q_ptr, k_ptr, v_ptr, do_ptr are tensor descriptors (and qt_ptr, kt_ptr with TMA_T)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // H_KV
    hk = bhk % H_KV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    col_ok = offs_n < N_K
    kvis = col_ok
    if HAS_MASK:
        km = tl.load(mask_ptr + b * stride_mb + offs_n, mask=col_ok, other=0)
        kvis = kvis & (km != 0)
    dmask_s = col_ok[:, None] & (offs_ds < D_S)[None, :]
    n0 = pid_n * BLOCK_N
    k = _tile(k_ptr, b, hk, n0, stride_kb, stride_kh, stride_kn, N_K, offs_ds, D_S, BLOCK_N, BLOCK_DS, TMA)
    if QK_Q != 0:
        kc = _load_rows(kc_ptr + b * stride_ckb + hk * stride_ckh, offs_n, stride_ckn, col_ok, offs_ds, D_S)
        sk = tl.load(ks_ptr + bhk * NBKS + offs_n // BS, mask=col_ok, other=0.0)
    if HAS_V:
        v = _tile(v_ptr, b, hk, n0, stride_vb, stride_vh, stride_vn, N_K, offs_ds, D_S, BLOCK_N, BLOCK_DS,
                  TMA)  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for g in range(0, G_S):
        h = hk * G_S + g
        bh = b * H + h
        if DIV != 0:
            th = tl.load(th_ptr + h).to(tl.int64)
            if not TMA_T:
                qt_base = qt_ptr + b * stride_tqb + th * stride_tqh
                kt_base = kt_ptr + b * stride_tkb + (th // G_T) * stride_tkh
            if DIV != 5 and not T_MAP:
                kt = _tile(kt_ptr, b, th // G_T, n0, stride_tkb, stride_tkh, stride_tkn, N_K, offs_dt, D_T,
                           BLOCK_N, BLOCK_DT, TMA_T)  # fmt: skip
        n_blk, lst = _block_list(cnt_ptr, idx_ptr, stride_cb, stride_ch, stride_ib, stride_ih, b, h,
                                 pid_n * BLOCK_N // BS, NB, HAS_BM)  # fmt: skip
        for it in range(0, n_blk):
            lo_m, hi_m = _block_range(lst, it, lo, N_Q, BS, HAS_BM)
            for start_m in range(lo_m, hi_m, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                row_ok = offs_m < N_Q
                row_off = bh * N_Q + offs_m
                q = _tile(q_ptr, b, h, start_m, stride_qb, stride_qh, stride_qn, N_Q, offs_ds, D_S, BLOCK_M,
                          BLOCK_DS, TMA)  # fmt: skip
                if QK_Q != 0:
                    qc_base = qc_ptr + b * stride_cqb + h * stride_cqh
                    qc = _load_rows(qc_base, offs_m, stride_cqn, row_ok, offs_ds, D_S)
                    sq = tl.load(qs_ptr + bh * NBQS + offs_m // BS, mask=row_ok, other=0.0)
                    sT = _dot_qk(kc, tl.trans(qc), QK_Q, PREC) * sk[:, None] * sq[None, :] * qk_scale
                else:
                    sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
                vis = kvis[:, None] & row_ok[None, :]
                if CAUSAL:
                    vis = vis & (offs_n[:, None] <= offs_m[None, :])
                if HAS_THR:
                    thr2 = tl.load(thr_ptr + row_off, mask=row_ok, other=float("inf")) * LOG2E
                    vis = vis & ~(sT < thr2[None, :])
                dsT = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
                if HAS_DO:
                    lse1 = tl.load(lse_ptr + row_off, mask=row_ok, other=float("inf")) * LOG2E
                    pT = tl.math.exp2(tl.where(vis, sT, float("-inf")) - lse1[None, :])
                    do = _tile(do_ptr, b, h, start_m, stride_dob, stride_doh, stride_don, N_Q, offs_ds, D_S,
                               BLOCK_M, BLOCK_DS, TMA)  # fmt: skip
                    if HAS_V:
                        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
                    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
                    delta = tl.load(delta_ptr + row_off, mask=row_ok, other=0.0)
                    dsT = pT * (dpT - delta[None, :])
                if DIV != 0:
                    gi = tl.load(grow_ptr + row_off, mask=row_ok, other=0.0)
                    if DIV == 5:
                        tT = _topk_tile(qt_base, kt_base, stride_tqn, stride_tkn, offs_m, row_ok, offs_n,
                                        K_CAP, BLOCK_M, BLOCK_N, True)  # fmt: skip
                    elif T_MAP:
                        tT = _map_tile(qt_base, stride_tqn, offs_m, row_ok, offs_n, col_ok, True)
                    else:
                        qt = _tile(qt_ptr, b, th, start_m, stride_tqb, stride_tqh, stride_tqn, N_Q, offs_dt,
                                   D_T, BLOCK_M, BLOCK_DT, TMA_T)  # fmt: skip
                        tT = tl.dot(kt, tl.trans(qt), input_precision=PREC) * qk_scale_t
                    ls, lt, aux = _load_stats(stats_ptr, row_off, row_ok)
                    term = _div_term(sT, tT, ls[None, :], lt[None, :], aux[None, :], inv_tau, DIV)
                    dsT += tl.where(vis, term, 0.0) * gi[None, :]
                dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
                if ATOMIC_DQ:
                    dq = tl.dot(tl.trans(dsT).to(k.dtype), k, input_precision=PREC) * scale_s
                    dq_mask = row_ok[:, None] & (offs_ds < D_S)[None, :]
                    tl.atomic_add(dq_ptr + row_off[:, None] * D_S + offs_ds[None, :], dq, mask=dq_mask,
                                  sem="relaxed")  # fmt: skip
    base = bhk * N_K + offs_n
    tl.store(dk_ptr + base[:, None] * D_S + offs_ds[None, :], (dk * scale_s).to(dk_ptr.dtype.element_ty),
             mask=dmask_s)  # fmt: skip
    if HAS_V:
        tl.store(dv_ptr + base[:, None] * D_S + offs_ds[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=dmask_s)  # fmt: skip


@triton.jit
def _attention_kd_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, qt_ptr, kt_ptr, mask_ptr, th_ptr, do_ptr, lse_ptr, stats_ptr, delta_ptr,
    grow_ptr, cnt_ptr, idx_ptr, thr_ptr, qc_ptr, kc_ptr, qs_ptr, ks_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_tqb, stride_tqh, stride_tqn, stride_tkb, stride_tkh, stride_tkn, stride_mb,
    stride_dob, stride_doh, stride_don, stride_cb, stride_ch, stride_ib, stride_ih,
    stride_cqb, stride_cqh, stride_cqn, stride_ckb, stride_ckh, stride_ckn,
    H, G_S, G_T, N_Q, N_K, qk_scale, qk_scale_t, inv_tau, scale_s, BS, NB, NBQS, NBKS, K_CAP,
    D_S: tl.constexpr, D_T: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    DIV: tl.constexpr, HAS_DO: tl.constexpr, HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BM: tl.constexpr, HAS_THR: tl.constexpr, DELTA_ONLY: tl.constexpr, QK_Q: tl.constexpr,
    T_MAP: tl.constexpr, TMA: tl.constexpr, TMA_T: tl.constexpr,
):  # fmt: skip
    """dq = scale_s sum_j dS_ij k_j, in (query, key) tiles. DELTA_ONLY: write
    Delta_i = sum_j P_ij dP_ij to delta_ptr instead (the dense Delta of a quantized-P forward, whose
    output is not P V). TMA: q_ptr, k_ptr, v_ptr, do_ptr are tensor descriptors (and qt_ptr, kt_ptr
    with TMA_T)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // G_S
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    row_ok = offs_m < N_Q
    row_off = bh * N_Q + offs_m
    dmask_s = row_ok[:, None] & (offs_ds < D_S)[None, :]
    m0 = pid_m * BLOCK_M
    q = _tile(q_ptr, b, h, m0, stride_qb, stride_qh, stride_qn, N_Q, offs_ds, D_S, BLOCK_M, BLOCK_DS, TMA)
    if QK_Q != 0:
        qc = _load_rows(qc_ptr + b * stride_cqb + h * stride_cqh, offs_m, stride_cqn, row_ok, offs_ds, D_S)
        sq = tl.load(qs_ptr + bh * NBQS + offs_m // BS, mask=row_ok, other=0.0)
        kc_base = kc_ptr + b * stride_ckb + hk * stride_ckh
        ks_row = ks_ptr + (b * (H // G_S) + hk) * NBKS
    if HAS_DO:
        do = _tile(do_ptr, b, h, m0, stride_dob, stride_doh, stride_don, N_Q, offs_ds, D_S, BLOCK_M, BLOCK_DS,
                   TMA)  # fmt: skip
        lse1 = tl.load(lse_ptr + row_off, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.zeros([BLOCK_M], tl.float32)
        if not DELTA_ONLY:
            delta = tl.load(delta_ptr + row_off, mask=row_ok, other=0.0)
    if DIV != 0:
        th = tl.load(th_ptr + h).to(tl.int64)
        if not TMA_T:
            qt_base = qt_ptr + b * stride_tqb + th * stride_tqh
            kt_base = kt_ptr + b * stride_tkb + (th // G_T) * stride_tkh
        if DIV != 5 and not T_MAP:
            qt = _tile(qt_ptr, b, th, m0, stride_tqb, stride_tqh, stride_tqn, N_Q, offs_dt, D_T, BLOCK_M,
                       BLOCK_DT, TMA_T)  # fmt: skip
        gi = tl.load(grow_ptr + row_off, mask=row_ok, other=0.0)
        ls, lt, aux = _load_stats(stats_ptr, row_off, row_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    hi = N_K
    if CAUSAL:
        hi = tl.minimum(N_K, (pid_m + 1) * BLOCK_M)
    n_blk, lst = _block_list(cnt_ptr, idx_ptr, stride_cb, stride_ch, stride_ib, stride_ih, b, h,
                             pid_m * BLOCK_M // BS, NB, HAS_BM)  # fmt: skip
    thr2 = tl.zeros([BLOCK_M], tl.float32)
    if HAS_THR:
        thr2 = tl.load(thr_ptr + row_off, mask=row_ok, other=float("inf")) * LOG2E
    for it in range(0, n_blk):
        lo_n, hi_n = _block_range(lst, it, 0, hi, BS, HAS_BM)
        for start_n in range(lo_n, hi_n, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < N_K
            vis = _visible(offs_m, offs_n, row_ok, col_ok, mask_ptr + b * stride_mb, HAS_MASK, CAUSAL)
            k = _tile(k_ptr, b, hk, start_n, stride_kb, stride_kh, stride_kn, N_K, offs_ds, D_S, BLOCK_N,
                      BLOCK_DS, TMA)  # fmt: skip
            if QK_Q != 0:
                kc = _load_rows(kc_base, offs_n, stride_ckn, col_ok, offs_ds, D_S)
                sk = tl.load(ks_row + offs_n // BS, mask=col_ok, other=0.0)
                s = _dot_qk(qc, tl.trans(kc), QK_Q, PREC) * sq[:, None] * sk[None, :] * qk_scale
            else:
                s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            if HAS_THR:
                vis = vis & ~(s < thr2[:, None])  # a NaN score stays visible: NaN out
            ds = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if HAS_DO:
                p = tl.math.exp2(tl.where(vis, s, float("-inf")) - lse1[:, None])
                v = _tile(v_ptr, b, hk, start_n, stride_vb, stride_vh, stride_vn, N_K, offs_ds, D_S, BLOCK_N,
                          BLOCK_DS, TMA)  # fmt: skip
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                if DELTA_ONLY:
                    delta += tl.sum(p * dp, 1)
                else:
                    ds = p * (dp - delta[:, None])
            if DIV != 0 and not DELTA_ONLY:
                if DIV == 5:
                    t = _topk_tile(qt_base, kt_base, stride_tqn, stride_tkn, offs_m, row_ok, offs_n, K_CAP,
                                   BLOCK_M, BLOCK_N, False)  # fmt: skip
                elif T_MAP:
                    t = _map_tile(qt_base, stride_tqn, offs_m, row_ok, offs_n, col_ok, False)
                else:
                    kt = _tile(kt_ptr, b, th // G_T, start_n, stride_tkb, stride_tkh, stride_tkn, N_K,
                               offs_dt, D_T, BLOCK_N, BLOCK_DT, TMA_T)  # fmt: skip
                    t = tl.dot(qt, tl.trans(kt), input_precision=PREC) * qk_scale_t
                term = _div_term(s, t, ls[:, None], lt[:, None], aux[:, None], inv_tau, DIV)
                ds += tl.where(vis, term, 0.0) * gi[:, None]
            if not DELTA_ONLY:
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    if DELTA_ONLY:
        tl.store(delta_ptr + row_off, delta, mask=row_ok)
        return
    tl.store(dq_ptr + row_off[:, None] * D_S + offs_ds[None, :], (dq * scale_s).to(dq_ptr.dtype.element_ty),
             mask=dmask_s)  # fmt: skip


# ------------------------------------------------------------------------------------- launchers


def _strides(x: torch.Tensor | None, n: int = 3):
    return (0,) * n if x is None else tuple(x.stride()[:n])


def _last_dim_contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs get fp32 products (tf32 would cost ~3 digits); half types use the tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_lists(block_mask, block_size, causal, B, H):
    """Per query block the ascending list of its visible key blocks (cnt (.., nbq), idx (.., nbq, nbk))
    and per key block the list of its visible query blocks, int32, with the strides of a (B, H)
    broadcast (0 over a mask's size-1 batch or head dim)."""
    bm = block_mask
    if causal:  # key blocks past the diagonal hold nothing visible
        bm = bm & torch.ones(bm.shape[-2:], dtype=torch.bool, device=bm.device).tril()

    def lists(m):
        cnt = m.sum(-1, dtype=torch.int32)
        idx = torch.sort(m.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
        cs = cnt.expand(B, H, cnt.shape[-1]).stride()[:2]
        ids = idx.expand(B, H, *idx.shape[-2:]).stride()[:2]
        return cnt.contiguous(), idx.contiguous(), cs + ids, m.shape[-1]

    return lists(bm), lists(bm.transpose(-1, -2))


def _common(q, k, v, q_t, k_t, key_padding_mask, teacher_heads, divergence, block_mask=None,
            block_size=0, row_threshold=None, causal=False, quantized=False, teacher_map=False):  # fmt: skip
    q, k, v, q_t, k_t = (_last_dim_contiguous(x) for x in (q, k, v, q_t, k_t))
    B, H, N_Q, D_S = q.shape
    H_KV, N_K = k.shape[1], k.shape[2]
    DIV = DIVERGENCES.index(divergence)
    K_CAP = 0
    if DIV and teacher_map:  # q_t: a uint8 map of the teacher's P (B, H_t, N_q, N_k); no k_t
        k_t = q_t
    if DIV == 5:  # a top-k capture: no teacher head dim; int32 indices for the kernels' compares
        K_CAP, q_t, k_t = q_t.shape[3], q_t.float().contiguous(), k_t.to(torch.int32).contiguous()
    D_T = q_t.shape[3] if DIV and DIV != 5 and not teacher_map else 16
    G_T = q_t.shape[1] // k_t.shape[1] if DIV else 1
    if DIV and teacher_heads is None:
        teacher_heads = torch.arange(H, device=q.device)
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask.contiguous().view(torch.uint8)
    dummy = q  # pointer for absent tensors; never read (the constexpr flags skip it)
    if block_mask is not None:
        fwd_lists, bwd_lists = _block_lists(block_mask, block_size, causal, B, H)
    else:
        fwd_lists = bwd_lists = (dummy, dummy, (0, 0, 0, 0), 1)
    thr = row_threshold.contiguous() if row_threshold is not None else dummy
    return dict(
        tensors=(q, k, v if v is not None else dummy, q_t if DIV else dummy, k_t if DIV else dummy,
                 mask if mask is not None else dummy, teacher_heads if DIV else dummy),
        strides=_strides(q) + _strides(k) + _strides(v) + _strides(q_t) + _strides(k_t)
        + ((mask.stride(0),) if mask is not None else (0,)),
        B=B, H=H, H_KV=H_KV, N_Q=N_Q, N_K=N_K, D_S=D_S, D_T=D_T, G_S=H // H_KV, G_T=G_T, DIV=DIV, K_CAP=K_CAP,
        fwd_lists=fwd_lists, bwd_lists=bwd_lists, thr=thr, BS=max(int(block_size), 1),
        # int8/fp8 tensor-core dots need a reduction dim >= 32: quantized launches pad it (masked)
        consts=dict(D_S=D_S, D_T=D_T, BLOCK_DS=max(32 if quantized else 16, triton.next_power_of_2(D_S)),
                    BLOCK_DT=max(16, triton.next_power_of_2(D_T)), DIV=DIV,
                    HAS_MASK=mask is not None, PREC=_prec(q.dtype), HAS_BM=block_mask is not None,
                    HAS_THR=row_threshold is not None, T_MAP=bool(teacher_map and DIV)),
    )  # fmt: skip


def _tiles(kernel, c, dev, block_size, has_bm):
    """The kernel's (BLOCK_M, BLOCK_N, warps, stages); with a block mask a tile fits in one block."""
    BM, BN, warps, stages = _config(kernel, max(c["D_S"], c["D_T"]), max(c["N_Q"], c["N_K"]), dev)
    if has_bm:
        BM, BN = min(BM, block_size), min(BN, block_size)
    return BM, BN, warps, stages


_PV_FORMATS = ("none", "int8", "fp8_e4m3")


def _quant_args(q_codes, k_codes, q_scale, k_scale, dummy):
    """(QK_Q, the four tensors, their strides, NBQS, NBKS) for the kernels; dummies when unquantized."""
    if q_codes is None:
        return 0, (dummy, dummy, dummy, dummy), (0,) * 6, 1, 1
    q_codes, k_codes = _last_dim_contiguous(q_codes), _last_dim_contiguous(k_codes)
    q_scale, k_scale = q_scale.contiguous(), k_scale.contiguous()
    return (1 if q_codes.dtype == torch.int8 else 2, (q_codes, k_codes, q_scale, k_scale),
            _strides(q_codes) + _strides(k_codes), q_scale.shape[-1], k_scale.shape[-1])  # fmt: skip


def attention_kd_fwd(
    q, k, v, q_t, k_t, key_padding_mask, teacher_heads, divergence, causal, scale_s, scale_t, temperature,
    block_mask=None, block_size=0, row_threshold=None, q_codes=None, k_codes=None, q_scale=None,
    k_scale=None, pv_format="none", teacher_map=False,
):  # fmt: skip
    """Launcher of ``pykd::attention_kd_fwd``: (out, row_loss, lse, stats); see the module docstring."""
    c = _common(q, k, v, q_t, k_t, key_padding_mask, teacher_heads, divergence, block_mask, block_size,
                row_threshold, causal, quantized=q_codes is not None, teacher_map=teacher_map)  # fmt: skip
    B, H, N_Q, D_S, DIV = c["B"], c["H"], c["N_Q"], c["D_S"], c["DIV"]
    dev = q.device
    out = new_output((B, H, N_Q, D_S), device=dev, dtype=q.dtype) if v is not None else q.new_empty(0)
    lse = new_output((B, H, N_Q), device=dev, dtype=torch.float32)
    row = new_output((B, H, N_Q) if DIV else (0,), device=dev, dtype=torch.float32)
    stats = new_output((B, H, N_Q, 3) if DIV else (0,), device=dev, dtype=torch.float32)
    if B * H * N_Q == 0:
        return out, row, lse, stats
    QK_Q, quant, qstrides, nbqs, nbks = _quant_args(q_codes, k_codes, q_scale, k_scale, lse)
    BM, BN, warps, stages = _tiles("fwd", c, dev, c["BS"], block_mask is not None)
    cnt, idx, lstrides, nb = c["fwd_lists"]
    tensors, tma, tma_t = _tma_args(c["tensors"], c, dev, BM, BN, has_v=v is not None)
    grid = (triton.cdiv(N_Q, BM), B * H)
    _attention_kd_fwd_kernel[grid](
        *tensors, cnt, idx, c["thr"], *quant, out, row, lse, stats, *c["strides"], *lstrides, *qstrides,
        H, c["G_S"], c["G_T"], N_Q, c["N_K"], scale_s * LOG2E, scale_t * LOG2E, 1.0 / temperature,
        c["BS"], nb, nbqs, nbks, c["K_CAP"],
        HAS_V=v is not None, CAUSAL=causal, SAME_TAU=temperature == 1.0, BLOCK_M=BM, BLOCK_N=BN,
        QK_Q=QK_Q, PV_Q=_PV_FORMATS.index(pv_format) if v is not None else 0, TMA=tma, TMA_T=tma_t,
        num_warps=warps, num_stages=stages, **c["consts"],
    )  # fmt: skip
    return out, row, lse, stats


def attention_kd_bwd(
    grad_out, grad_row, q, k, v, q_t, k_t, key_padding_mask, teacher_heads, out, lse, stats,
    divergence, causal, scale_s, scale_t, temperature, block_mask=None, block_size=0, row_threshold=None,
    dense_delta=False, q_codes=None, k_codes=None, q_scale=None, k_scale=None, teacher_map=False,
):  # fmt: skip
    """Launcher of ``pykd::attention_kd_bwd``: (dq, dk, dv). grad_out None skips the attention
    term, grad_row None the divergence term; dense_delta computes Delta = sum_j P dP from the
    tiles (a quantized-P forward's out is not P V)."""
    if grad_row is None:
        divergence = "none"
    c = _common(q, k, v, q_t, k_t, key_padding_mask, teacher_heads, divergence, block_mask, block_size,
                row_threshold, causal, quantized=q_codes is not None, teacher_map=teacher_map)  # fmt: skip
    B, H, H_KV, N_Q, N_K = c["B"], c["H"], c["H_KV"], c["N_Q"], c["N_K"]
    dev = q.device
    dq = new_output(q.shape, device=dev, dtype=q.dtype)
    dk = new_output(k.shape, device=dev, dtype=k.dtype)
    dv = new_output(v.shape, device=dev, dtype=v.dtype) if v is not None else q.new_empty(0)
    has_do = grad_out is not None and v is not None
    if has_do:
        grad_out = _last_dim_contiguous(grad_out)
        delta = (
            torch.empty(lse.shape, device=dev, dtype=torch.float32)
            if dense_delta
            else (grad_out.float() * out.float()).sum(-1).contiguous()
        )
    else:
        grad_out, delta = q, lse  # never read
        if v is not None:
            dv.zero_()
    if B * H * N_Q == 0 or N_K == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv
    if not has_do and c["DIV"] == 0:
        dq.zero_(), dk.zero_()
        return dq, dk, dv
    grow = grad_row.contiguous().float() if c["DIV"] else lse
    stats = stats if c["DIV"] else lse
    args = (*c["tensors"], grad_out, lse, stats, delta, grow)
    dstrides = _strides(grad_out) if has_do else (0, 0, 0)
    scal = (N_Q, N_K, scale_s * LOG2E, scale_t * LOG2E, 1.0 / temperature, scale_s, c["BS"])
    has_bm = block_mask is not None
    QK_Q, quant, qstrides, nbqs, nbks = _quant_args(q_codes, k_codes, q_scale, k_scale, lse)
    if has_do and dense_delta:
        BM, BN, warps, stages = _tiles("dq", c, dev, c["BS"], has_bm)
        cnt, idx, lstrides, nb = c["fwd_lists"]
        targs, tma, _ = _tma_args(args, c, dev, BM, BN, has_do=True, teacher=False)
        _attention_kd_bwd_dq_kernel[(triton.cdiv(N_Q, BM), B * H)](
            *targs, cnt, idx, c["thr"], *quant, dq, *c["strides"], *dstrides, *lstrides, *qstrides, H,
            c["G_S"], c["G_T"], *scal, nb, nbqs, nbks, c["K_CAP"], HAS_DO=True, CAUSAL=causal, BLOCK_M=BM,
            BLOCK_N=BN, DELTA_ONLY=True, QK_Q=QK_Q, TMA=tma, TMA_T=False,
            num_warps=warps, num_stages=stages, **{**c["consts"], "DIV": 0},
        )  # fmt: skip
    atomic = _atomic_dq()
    dq_acc = dq  # atomic: a zeroed fp32 accumulator (dq itself when q is fp32)
    if atomic:
        f32 = torch.float32
        dq_acc = dq.zero_() if dq.dtype == f32 else torch.zeros(q.shape, device=dev, dtype=f32)
    BM, BN, warps, stages = _tiles("dkdv_atomic" if atomic else "dkdv", c, dev, c["BS"], has_bm)
    cnt, idx, lstrides, nb = c["bwd_lists"]
    targs, tma, tma_t = _tma_args(args, c, dev, BM, BN, has_v=v is not None, has_do=has_do)
    _attention_kd_bwd_dkdv_kernel[(triton.cdiv(N_K, BN), B * H_KV)](
        *targs, cnt, idx, c["thr"], *quant, dk, dv, dq_acc, *c["strides"], *dstrides, *lstrides, *qstrides, H,
        H_KV, c["G_S"], c["G_T"], *scal, nb, nbqs, nbks, c["K_CAP"], HAS_V=v is not None, HAS_DO=has_do,
        CAUSAL=causal, BLOCK_M=BM, BLOCK_N=BN, QK_Q=QK_Q, ATOMIC_DQ=atomic, TMA=tma, TMA_T=tma_t,
        num_warps=warps, num_stages=stages, **c["consts"],
    )  # fmt: skip
    if atomic:
        return (dq_acc if dq_acc is dq else dq.copy_(dq_acc)), dk, dv
    BM, BN, warps, stages = _tiles("dq", c, dev, c["BS"], has_bm)
    cnt, idx, lstrides, nb = c["fwd_lists"]
    targs, tma, tma_t = _tma_args(args, c, dev, BM, BN, has_v=v is not None, has_do=has_do)
    _attention_kd_bwd_dq_kernel[(triton.cdiv(N_Q, BM), B * H)](
        *targs, cnt, idx, c["thr"], *quant, dq, *c["strides"], *dstrides, *lstrides, *qstrides, H, c["G_S"],
        c["G_T"], *scal, nb, nbqs, nbks, c["K_CAP"], HAS_DO=has_do, CAUSAL=causal, BLOCK_M=BM, BLOCK_N=BN,
        DELTA_ONLY=False, QK_Q=QK_Q, TMA=tma, TMA_T=tma_t,
        num_warps=warps, num_stages=stages, **c["consts"],
    )  # fmt: skip
    return dq, dk, dv


__all__ = [
    "attention_kd_fwd",
    "attention_kd_bwd",
    "DIVERGENCES",
    "CONFIGS",
    "DQ_MODES",
    "LOAD_MODES",
    "modes",
]
