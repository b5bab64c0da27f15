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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import new_output

# Order is the kernels' DIV constexpr: 0 = no teacher (plain attention).
DIVERGENCES = ("none", "kl", "reverse_kl", "mse", "mse_scores")
LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head dim (<= 64, <= 256); from
# benchmarks/tune_attention_kd.py on an H100 (results/nvidia-h100-80gb-hbm3/attention_kd_tune.csv).
CONFIGS = {
    "fwd": {64: (64, 64, 4, 3), 128: (128, 64, 8, 3)},
    "dkdv": {64: (64, 64, 4, 2), 128: (32, 64, 4, 2)},
    "dq": {64: (64, 64, 4, 2), 128: (128, 64, 8, 2)},
    "interpret": (16, 16, 1, 1),
}


def _config(kernel: str, d: int, device: torch.device):
    if device.type != "cuda":
        return CONFIGS["interpret"]
    table = CONFIGS[kernel]
    return table[64] if d <= 64 else table[128]


@triton.jit
def _div_term(s, t, ls, lt, aux, inv_tau, DIV: tl.constexpr):
    """d row / d s (natural score units) for scores s, t in log2 units; ls, lt, aux broadcast per
    row (ls, lt in log2 units of s/tau and t/tau)."""
    LN2: tl.constexpr = 0.6931471805599453
    if DIV == 4:
        term = 2.0 * LN2 * (s - t)
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
def _attention_kd_fwd_kernel(
    q_ptr, k_ptr, v_ptr, qt_ptr, kt_ptr, mask_ptr, th_ptr,
    out_ptr, row_ptr, lse_ptr, stats_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_tqb, stride_tqh, stride_tqn, stride_tkb, stride_tkh, stride_tkn, stride_mb,
    H, G_S, G_T, N_Q, N_K, qk_scale, qk_scale_t, inv_tau,
    D_S: tl.constexpr, D_T: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    DIV: tl.constexpr, HAS_V: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    SAME_TAU: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
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
    q = _load_rows(q_ptr + b * stride_qb + h * stride_qh, offs_m, stride_qn, row_ok, offs_ds, D_S)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    if DIV != 0:
        th = tl.load(th_ptr + h).to(tl.int64)
        qt = _load_rows(qt_ptr + b * stride_tqb + th * stride_tqh, offs_m, stride_tqn, row_ok, offs_dt, D_T)
        kt_base = kt_ptr + b * stride_tkb + (th // G_T) * stride_tkh
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
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N_K
        vis = _visible(offs_m, offs_n, row_ok, col_ok, mask_ptr + b * stride_mb, HAS_MASK, CAUSAL)
        kT = tl.load(
            k_base + offs_n[None, :] * stride_kn + offs_ds[:, None],
            mask=col_ok[None, :] & (offs_ds < D_S)[:, None],
            other=0.0,
        )
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_V:
            v = _load_rows(v_base, offs_n, stride_vn, col_ok, offs_ds, D_S)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        if DIV != 0:
            ktT = tl.load(
                kt_base + offs_n[None, :] * stride_tkn + offs_dt[:, None],
                mask=col_ok[None, :] & (offs_dt < D_T)[:, None],
                other=0.0,
            )
            t = tl.dot(qt, ktT, input_precision=PREC) * qk_scale_t
            t = tl.where(vis, t, float("-inf"))
            if DIV == 4:
                d = tl.where(vis, s - t, 0.0)
                a1 += tl.sum(d * d, 1)
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
                    a1 = a1 * alpha_t + tl.sum(tl.where(vis, pt * (t - s), 0.0), 1)
                elif DIV == 2:
                    a1 = a1 * alpha_s + tl.sum(tl.where(vis, ps * (s - t), 0.0), 1)
                else:
                    a1 = a1 * (alpha_s * alpha_s) + tl.sum(ps * ps, 1)
                    a2 = a2 * (alpha_s * alpha_t) + tl.sum(ps * pt, 1)
                    a3 = a3 * (alpha_t * alpha_t) + tl.sum(pt * pt, 1)
                m_t = mt_new
        m_i = m_new

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    row_off = bh * N_Q + offs_m
    tl.store(lse_ptr + row_off, tl.where(has, (m_i + tl.math.log2(l_safe)) * LN2, float("inf")), mask=row_ok)
    if HAS_V:
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
    grow_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_tqb, stride_tqh, stride_tqn, stride_tkb, stride_tkh, stride_tkn, stride_mb,
    stride_dob, stride_doh, stride_don,
    H, H_KV, G_S, G_T, N_Q, N_K, qk_scale, qk_scale_t, inv_tau, scale_s,
    D_S: tl.constexpr, D_T: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    DIV: tl.constexpr, HAS_V: tl.constexpr, HAS_DO: tl.constexpr, HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dk = scale_s sum_i dS_ij q_i, dv = sum_i P_ij dO_i over the GQA group, in (key, query) tiles."""
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
    k = _load_rows(k_ptr + b * stride_kb + hk * stride_kh, offs_n, stride_kn, col_ok, offs_ds, D_S)
    if HAS_V:
        v = _load_rows(v_ptr + b * stride_vb + hk * stride_vh, offs_n, stride_vn, col_ok, offs_ds, D_S)
    dk = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for g in range(0, G_S):
        h = hk * G_S + g
        bh = b * H + h
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        if DIV != 0:
            th = tl.load(th_ptr + h).to(tl.int64)
            qt_base = qt_ptr + b * stride_tqb + th * stride_tqh
            kt_base = kt_ptr + b * stride_tkb + (th // G_T) * stride_tkh
            kt = _load_rows(kt_base, offs_n, stride_tkn, col_ok, offs_dt, D_T)
        for start_m in range(lo, N_Q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < N_Q
            row_off = bh * N_Q + offs_m
            q = _load_rows(q_base, offs_m, stride_qn, row_ok, offs_ds, D_S)
            sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
            vis = kvis[:, None] & row_ok[None, :]
            if CAUSAL:
                vis = vis & (offs_n[:, None] <= offs_m[None, :])
            dsT = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            if HAS_DO:
                lse1 = tl.load(lse_ptr + row_off, mask=row_ok, other=float("inf")) * LOG2E
                pT = tl.math.exp2(tl.where(vis, sT, float("-inf")) - lse1[None, :])
                do = _load_rows(do_base, offs_m, stride_don, row_ok, offs_ds, D_S)
                if HAS_V:
                    dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
                dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
                delta = tl.load(delta_ptr + row_off, mask=row_ok, other=0.0)
                dsT = pT * (dpT - delta[None, :])
            if DIV != 0:
                gi = tl.load(grow_ptr + row_off, mask=row_ok, other=0.0)
                qt = _load_rows(qt_base, offs_m, stride_tqn, row_ok, offs_dt, D_T)
                tT = tl.dot(kt, tl.trans(qt), input_precision=PREC) * qk_scale_t
                ls, lt, aux = _load_stats(stats_ptr, row_off, row_ok)
                term = _div_term(sT, tT, ls[None, :], lt[None, :], aux[None, :], inv_tau, DIV)
                dsT += tl.where(vis, term, 0.0) * gi[None, :]
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
    base = bhk * N_K + offs_n
    tl.store(dk_ptr + base[:, None] * D_S + offs_ds[None, :], (dk * scale_s).to(dk_ptr.dtype.element_ty),
             mask=dmask_s)  # fmt: skip
    if HAS_V:
        tl.store(dv_ptr + base[:, None] * D_S + offs_ds[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=dmask_s)  # fmt: skip


@triton.jit
def _attention_kd_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, qt_ptr, kt_ptr, mask_ptr, th_ptr, do_ptr, lse_ptr, stats_ptr, delta_ptr,
    grow_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_tqb, stride_tqh, stride_tqn, stride_tkb, stride_tkh, stride_tkn, stride_mb,
    stride_dob, stride_doh, stride_don,
    H, G_S, G_T, N_Q, N_K, qk_scale, qk_scale_t, inv_tau, scale_s,
    D_S: tl.constexpr, D_T: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    DIV: tl.constexpr, HAS_DO: tl.constexpr, HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dq = scale_s sum_j dS_ij k_j, in (query, key) tiles."""
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
    q = _load_rows(q_ptr + b * stride_qb + h * stride_qh, offs_m, stride_qn, row_ok, offs_ds, D_S)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    if HAS_DO:
        do_base = do_ptr + b * stride_dob + h * stride_doh
        do = _load_rows(do_base, offs_m, stride_don, row_ok, offs_ds, D_S)
        lse1 = tl.load(lse_ptr + row_off, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.load(delta_ptr + row_off, mask=row_ok, other=0.0)
    if DIV != 0:
        th = tl.load(th_ptr + h).to(tl.int64)
        qt = _load_rows(qt_ptr + b * stride_tqb + th * stride_tqh, offs_m, stride_tqn, row_ok, offs_dt, D_T)
        kt_base = kt_ptr + b * stride_tkb + (th // G_T) * stride_tkh
        gi = tl.load(grow_ptr + row_off, mask=row_ok, other=0.0)
        ls, lt, aux = _load_stats(stats_ptr, row_off, row_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    hi = N_K
    if CAUSAL:
        hi = tl.minimum(N_K, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N_K
        vis = _visible(offs_m, offs_n, row_ok, col_ok, mask_ptr + b * stride_mb, HAS_MASK, CAUSAL)
        k = _load_rows(k_base, offs_n, stride_kn, col_ok, offs_ds, D_S)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        ds = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_DO:
            p = tl.math.exp2(tl.where(vis, s, float("-inf")) - lse1[:, None])
            v = _load_rows(v_base, offs_n, stride_vn, col_ok, offs_ds, D_S)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
        if DIV != 0:
            kt = _load_rows(kt_base, offs_n, stride_tkn, col_ok, offs_dt, D_T)
            t = tl.dot(qt, tl.trans(kt), input_precision=PREC) * qk_scale_t
            term = _div_term(s, t, ls[:, None], lt[:, None], aux[:, None], inv_tau, DIV)
            ds += tl.where(vis, term, 0.0) * gi[:, None]
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
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


def _common(q, k, v, q_t, k_t, key_padding_mask, teacher_heads, divergence):
    q, k, v, q_t, k_t = (_last_dim_contiguous(x) for x in (q, k, v, q_t, k_t))
    B, H, N_Q, D_S = q.shape
    H_KV, N_K = k.shape[1], k.shape[2]
    DIV = DIVERGENCES.index(divergence)
    D_T = q_t.shape[3] if DIV else 16
    G_T = q_t.shape[1] // k_t.shape[1] if DIV else 1
    if DIV and teacher_heads is None:
        teacher_heads = torch.arange(H, device=q.device)
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask.contiguous().view(torch.uint8)
    dummy = q  # pointer for absent tensors; never read (the constexpr flags skip it)
    return dict(
        tensors=(q, k, v if v is not None else dummy, q_t if DIV else dummy, k_t if DIV else dummy,
                 mask if mask is not None else dummy, teacher_heads if DIV else dummy),
        strides=_strides(q) + _strides(k) + _strides(v) + _strides(q_t) + _strides(k_t)
        + ((mask.stride(0),) if mask is not None else (0,)),
        B=B, H=H, H_KV=H_KV, N_Q=N_Q, N_K=N_K, D_S=D_S, D_T=D_T, G_S=H // H_KV, G_T=G_T, DIV=DIV,
        consts=dict(D_S=D_S, D_T=D_T, BLOCK_DS=max(16, triton.next_power_of_2(D_S)),
                    BLOCK_DT=max(16, triton.next_power_of_2(D_T)), DIV=DIV,
                    HAS_MASK=mask is not None, PREC=_prec(q.dtype)),
    )  # fmt: skip


def attention_kd_fwd(
    q, k, v, q_t, k_t, key_padding_mask, teacher_heads, divergence, causal, scale_s, scale_t, temperature
):
    """Launcher of ``pykd::attention_kd_fwd``: (out, row_loss, lse, stats); see the module docstring."""
    c = _common(q, k, v, q_t, k_t, key_padding_mask, teacher_heads, divergence)
    B, H, N_Q, D_S, DIV = c["B"], c["H"], c["N_Q"], c["D_S"], c["DIV"]
    dev = q.device
    out = new_output((B, H, N_Q, D_S), device=dev, dtype=q.dtype) if v is not None else q.new_empty(0)
    lse = new_output((B, H, N_Q), device=dev, dtype=torch.float32)
    row = new_output((B, H, N_Q) if DIV else (0,), device=dev, dtype=torch.float32)
    stats = new_output((B, H, N_Q, 3) if DIV else (0,), device=dev, dtype=torch.float32)
    if B * H * N_Q == 0:
        return out, row, lse, stats
    BM, BN, warps, stages = _config("fwd", max(D_S, c["D_T"]), dev)
    grid = (triton.cdiv(N_Q, BM), B * H)
    _attention_kd_fwd_kernel[grid](
        *c["tensors"], out, row, lse, stats, *c["strides"],
        H, c["G_S"], c["G_T"], N_Q, c["N_K"], scale_s * LOG2E, scale_t * LOG2E, 1.0 / temperature,
        HAS_V=v is not None, CAUSAL=causal, SAME_TAU=temperature == 1.0, BLOCK_M=BM, BLOCK_N=BN,
        num_warps=warps, num_stages=stages, **c["consts"],
    )  # fmt: skip
    return out, row, lse, stats


def attention_kd_bwd(
    grad_out, grad_row, q, k, v, q_t, k_t, key_padding_mask, teacher_heads, out, lse, stats,
    divergence, causal, scale_s, scale_t, temperature,
):  # fmt: skip
    """Launcher of ``pykd::attention_kd_bwd``: (dq, dk, dv). grad_out None skips the attention
    term, grad_row None the divergence term."""
    if grad_row is None:
        divergence = "none"
    c = _common(q, k, v, q_t, k_t, key_padding_mask, teacher_heads, divergence)
    B, H, H_KV, N_Q, N_K, D_S = c["B"], c["H"], c["H_KV"], c["N_Q"], c["N_K"], c["D_S"]
    dev = q.device
    dq = new_output(q.shape, device=dev, dtype=q.dtype)
    dk = new_output(k.shape, device=dev, dtype=k.dtype)
    dv = new_output(v.shape, device=dev, dtype=v.dtype) if v is not None else q.new_empty(0)
    has_do = grad_out is not None and v is not None
    if has_do:
        grad_out = _last_dim_contiguous(grad_out)
        delta = (grad_out.float() * out.float()).sum(-1).contiguous()
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
    scal = (N_Q, N_K, scale_s * LOG2E, scale_t * LOG2E, 1.0 / temperature, scale_s)
    d = max(D_S, c["D_T"])
    BM, BN, warps, stages = _config("dkdv", d, dev)
    _attention_kd_bwd_dkdv_kernel[(triton.cdiv(N_K, BN), B * H_KV)](
        *args, dk, dv, *c["strides"], *dstrides, H, H_KV, c["G_S"], c["G_T"], *scal,
        HAS_V=v is not None, HAS_DO=has_do, CAUSAL=causal, BLOCK_M=BM, BLOCK_N=BN,
        num_warps=warps, num_stages=stages, **c["consts"],
    )  # fmt: skip
    BM, BN, warps, stages = _config("dq", d, dev)
    _attention_kd_bwd_dq_kernel[(triton.cdiv(N_Q, BM), B * H)](
        *args, dq, *c["strides"], *dstrides, H, c["G_S"], c["G_T"], *scal,
        HAS_DO=has_do, CAUSAL=causal, BLOCK_M=BM, BLOCK_N=BN,
        num_warps=warps, num_stages=stages, **c["consts"],
    )  # fmt: skip
    return dq, dk, dv


__all__ = ["attention_kd_fwd", "attention_kd_bwd", "DIVERGENCES", "CONFIGS"]
