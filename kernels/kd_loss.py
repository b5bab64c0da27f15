"""Triton kernel of ``pykd.kd_loss``: loss and gradient of logit distillation in one launch.

No autograd here; ``pykd/kd_loss.py`` owns the op. See ../shared/DESIGN.md section 3 for the math.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import (
    DIVERGENCES,
    block_start,
    finish_rows,
    grad_output,
    logit_map,
    logit_map_args,
    logit_map_grad,
    new_output,
    row_loss_scale,
    row_programs,
    soft_weight,
    zero_grad_row,
    zero_row,
)

# Grid cap: one program per row up to here, then programs stride over rows. CUDA's grid x-limit is
# far above, but a cap keeps any row count valid. Tests lower both constants to exercise the loops.
MAX_PROGRAMS = 65535
MAX_BLOCK_V = 8192
# Launch choices that benchmarks/tune_kd_loss.py sweeps on a GPU (issue 18); the defaults stand until
# a GPU run picks others. NUM_WARPS 0: by block size (launch_config). PROGRAMS_PER_SM 0: one program
# per row; k: k programs per SM (CUDA) striding over the rows, so fewer rows are in flight at once.
# REVERSE: each sweep after the first walks the row in the other direction, so it starts on the
# blocks the previous sweep read last (the likeliest still in L2).
NUM_WARPS = 0
PROGRAMS_PER_SM = 0
REVERSE = False


@triton.jit
def _kd_loss_kernel(
    s_ptr,
    t_ptr,
    target_ptr,
    scale_ptr,
    g_ptr,
    soft_ptr,
    hard_ptr,
    stats_ptr,
    out_ptr,
    R,
    V,
    V_total,
    vocab_start,
    stride_s,
    stride_t,
    stride_g,
    inv_t,
    alpha_w,
    one_minus_alpha,
    beta,
    log_beta,
    log_1mb,
    ignore_index,
    s_scale,
    s_cap,
    t_scale,
    t_cap,
    DIV: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    SAME_T: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    S_CAP: tl.constexpr,
    T_CAP: tl.constexpr,
    PHASE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """Per row r, logits first mapped by f (logit_scale a, logit_softcap c: f(x) = c tanh(a x / c), or
    a x), with z = f(logits) / T, p = softmax(z), lse = m + log l:

    sweep 1 (online softmax; when a max m grows, l and its accumulator are rescaled by
    exp(m_old - m_new)):
        l_s = sum exp(z_s - m_s), l_t = sum exp(z_t - m_t) and
        kl:      A = sum exp(z_t - m_t)(z_t - z_s)     KL(p_t||p_s) = A / l_t - lse_t + lse_s
        rkl:     B = sum exp(z_s - m_s)(z_s - z_t)     KL(p_s||p_t) = B / l_s - lse_s + lse_t
        soft_ce: C = sum exp(z_t - m_t) z_s            CE = -C / l_t + lse_s
        mse:     Q = sum (s - t)^2                     Q / V
        plus (m_h, l_h) of the raw student logits for the hard CE when T != 1.
    sweep 2 (jsd, tvd): the loss and the row statistic of the gradient from both lse:
        jsd: KL(p_s||m), KL(p_t||m) with log m = logaddexp(log b + log p_t, log(1-b) + log p_s)
        tvd: 1/2 sum |p_s - p_t| and sum p_s sign(p_s - p_t)
    sweep 3: grad = scale * (alpha w d soft/ds + (1 - alpha)(softmax(s) - onehot(y))) f'(s), stored
        in the logits' dtype (s here is f(logits)); scale is the reduction's (1/n for "mean", read
        from scale_ptr so n can stay on the device).
    A term whose probability is exactly 0 contributes 0, so -inf teacher logits are exact.
    DIV: 0 kl, 1 reverse_kl, 2 soft_ce, 3 jsd, 4 tvd, 5 mse.

    PHASE 0 runs all sweeps on whole rows. A vocabulary slice [vocab_start, vocab_start + V) of a
    V_total vocabulary (pykd.vocab_parallel) runs them apart, with all-reduces in between:
        PHASE 1: sweep 1 -> out (R, 8) = (m_s, l_s, m_t, l_t, m_h, l_h, acc, f(s)[y] or 0 off-slice)
        PHASE 2: sweep 2 from stats (R, 2) = (lse_s, lse_t) -> out (R, 2) = (x1, x2)
        PHASE 3: sweep 3 from stats (R, 5) = (lse_s, lse_t, lse_h, stat, poison) -> grad
    Ignored rows write zeros. REVERSE: sweep 2 walks the row's blocks last to first, then sweep 3
    first to last (without sweep 2: sweep 3 last to first), so each starts where the last ended.
    """
    pid = tl.program_id(0).to(tl.int64)  # so the row index, and every row offset, is int64
    nprog = tl.num_programs(0)
    gscale = tl.load(scale_ptr).to(tl.float32)
    NEG_INF: tl.constexpr = float("-inf")
    NEED_H: tl.constexpr = HAS_TARGET and ((not SAME_T) or DIV == 5)
    SWEEP2: tl.constexpr = (DIV == 3 or DIV == 4) and (PHASE == 0 or PHASE == 2)
    BACK3: tl.constexpr = REVERSE and not (SWEEP2 and PHASE == 0)
    for row64 in range(pid, R, nprog):
        s_row = s_ptr + row64 * stride_s
        t_row = t_ptr + row64 * stride_t
        y = 0
        valid = True
        if HAS_TARGET:
            y = tl.load(target_ptr + row64)
            valid = y != ignore_index
            if PHASE != 0:
                y = y - vocab_start  # the target's column in this slice (off it: no column matches)
        if valid:
            lse_s = 0.0
            lse_t = 0.0
            lse_h = 0.0
            soft = 0.0
            stat = 0.0
            poison = 0.0
            if PHASE <= 1:
                # ---- sweep 1: online softmax stats and the divergence accumulator
                m_s = NEG_INF
                m_t = NEG_INF
                m_h = NEG_INF
                l_s = 0.0
                l_t = 0.0
                l_h = 0.0
                acc = 0.0
                for v0 in range(0, V, BLOCK_V):
                    offs = v0 + tl.arange(0, BLOCK_V)
                    mask = offs < V
                    sr = tl.load(s_row + offs, mask=mask, other=NEG_INF).to(tl.float32)
                    tr = tl.load(t_row + offs, mask=mask, other=NEG_INF).to(tl.float32)
                    sr = logit_map(sr, mask, s_scale, s_cap, S_CAP)
                    tr = logit_map(tr, mask, t_scale, t_cap, T_CAP)
                    if DIV == 5:
                        d = tl.where(sr == tr, 0.0, sr - tr)
                        acc += tl.sum(d * d)
                    else:
                        zs = sr * inv_t
                        zt = tr * inv_t
                        ms_new = tl.maximum(m_s, tl.max(zs))
                        mt_new = tl.maximum(m_t, tl.max(zt))
                        ms_safe = tl.where(ms_new == NEG_INF, 0.0, ms_new)
                        mt_safe = tl.where(mt_new == NEG_INF, 0.0, mt_new)
                        rs = tl.exp(m_s - ms_safe)
                        rt = tl.exp(m_t - mt_safe)
                        es = tl.exp(zs - ms_safe)
                        et = tl.exp(zt - mt_safe)
                        l_s = l_s * rs + tl.sum(es)
                        l_t = l_t * rt + tl.sum(et)
                        if DIV == 0:
                            acc = acc * rt + tl.sum(tl.where(et > 0.0, et * (zt - zs), 0.0))
                        if DIV == 1:
                            acc = acc * rs + tl.sum(tl.where(es > 0.0, es * (zs - zt), 0.0))
                        if DIV == 2:
                            acc = acc * rt + tl.sum(tl.where(et > 0.0, et * zs, 0.0))
                        m_s = ms_new
                        m_t = mt_new
                    if NEED_H:
                        mh_new = tl.maximum(m_h, tl.max(sr))
                        mh_safe = tl.where(mh_new == NEG_INF, 0.0, mh_new)
                        l_h = l_h * tl.exp(m_h - mh_safe) + tl.sum(tl.exp(sr - mh_safe))
                        m_h = mh_new
                if PHASE == 1:
                    sy = 0.0
                    if HAS_TARGET:
                        own = (y >= 0) & (y < V)
                        ys = logit_map(tl.load(s_row + tl.where(own, y, 0)).to(tl.float32), True, s_scale,
                                       s_cap, S_CAP)  # fmt: skip
                        sy = tl.where(own, ys, 0.0)
                    o = out_ptr + row64 * 8
                    tl.store(o, m_s)
                    tl.store(o + 1, l_s)
                    tl.store(o + 2, m_t)
                    tl.store(o + 3, l_t)
                    tl.store(o + 4, m_h)
                    tl.store(o + 5, l_h)
                    tl.store(o + 6, acc)
                    tl.store(o + 7, sy)
                else:
                    if DIV != 5:
                        lse_s = m_s + tl.log(l_s)
                        lse_t = m_t + tl.log(l_t)
                    lse_h = lse_s
                    if NEED_H:
                        lse_h = m_h + tl.log(l_h)
                    if DIV == 0:
                        soft = acc / l_t - lse_t + lse_s
                    if DIV == 1:
                        soft = acc / l_s - lse_s + lse_t
                        stat = soft
                    if DIV == 2:
                        soft = -acc / l_t + lse_s
                    if DIV == 5:
                        soft = acc / V
            else:
                n_stats: tl.constexpr = 2 if PHASE == 2 else 5
                st = stats_ptr + row64 * n_stats
                lse_s = tl.load(st)
                lse_t = tl.load(st + 1)
                if PHASE == 3:
                    lse_h = tl.load(st + 2)
                    stat = tl.load(st + 3)
                    poison = tl.load(st + 4)
            # ---- sweep 2 (jsd, tvd): the loss and the gradient's row statistic
            if SWEEP2:
                x1 = 0.0
                x2 = 0.0
                for v0 in range(0, V, BLOCK_V):
                    offs = block_start(v0, V, BLOCK_V, REVERSE) + tl.arange(0, BLOCK_V)
                    mask = offs < V
                    sr = tl.load(s_row + offs, mask=mask, other=NEG_INF).to(tl.float32)
                    tr = tl.load(t_row + offs, mask=mask, other=NEG_INF).to(tl.float32)
                    sr = logit_map(sr, mask, s_scale, s_cap, S_CAP)
                    tr = logit_map(tr, mask, t_scale, t_cap, T_CAP)
                    log_ps = sr * inv_t - lse_s
                    log_pt = tr * inv_t - lse_t
                    ps = tl.exp(log_ps)
                    pt = tl.exp(log_pt)
                    if DIV == 3:
                        lm = _log_mix(log_pt, log_ps, log_beta, log_1mb)
                        x1 += tl.sum(tl.where(pt > 0.0, pt * (log_pt - lm), 0.0))
                        x2 += tl.sum(tl.where(ps > 0.0, ps * (log_ps - lm), 0.0))
                    else:
                        df = ps - pt
                        sg = tl.where(df > 0.0, 1.0, tl.where(df < 0.0, -1.0, 0.0))
                        x1 += tl.sum(tl.abs(df))
                        x2 += tl.sum(ps * sg)
                if PHASE == 2:
                    tl.store(out_ptr + row64 * 2, x1)
                    tl.store(out_ptr + row64 * 2 + 1, x2)
                else:
                    if DIV == 3:
                        soft = beta * x1 + (1.0 - beta) * x2
                    else:
                        soft = 0.5 * x1
                    stat = x2
            if PHASE == 0:
                # A NaN in either row makes its softmax NaN: the loss and the whole soft gradient row
                # are NaN, as in the reference (mse has no softmax: its NaN stays where it is).
                if DIV != 5:
                    both = lse_s + lse_t
                    poison = tl.where(both != both, float("nan"), 0.0)
                soft += poison
                hard = 0.0
                if HAS_TARGET:
                    hard = lse_h - logit_map(tl.load(s_row + y).to(tl.float32), True, s_scale, s_cap, S_CAP)
                tl.store(soft_ptr + row64, soft)
                tl.store(hard_ptr + row64, hard)
            # ---- sweep 3: the gradient
            if COMPUTE_GRAD and (PHASE == 0 or PHASE == 3):
                cs = alpha_w * gscale * inv_t + poison
                ch = one_minus_alpha * gscale
                g_row = g_ptr + row64 * stride_g
                for v0 in range(0, V, BLOCK_V):
                    offs = block_start(v0, V, BLOCK_V, BACK3) + tl.arange(0, BLOCK_V)
                    mask = offs < V
                    sr = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
                    tr = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
                    sr = logit_map(sr, mask, s_scale, s_cap, S_CAP)
                    tr = logit_map(tr, mask, t_scale, t_cap, T_CAP)
                    ps = tl.zeros([BLOCK_V], dtype=tl.float32)
                    if DIV == 5:
                        g = tl.where(sr == tr, 0.0, sr - tr) * (2.0 * alpha_w * gscale / V_total)
                    else:
                        log_ps = sr * inv_t - lse_s
                        log_pt = tr * inv_t - lse_t
                        ps = tl.exp(log_ps)
                        pt = tl.exp(log_pt)
                        if DIV == 0 or DIV == 2:
                            d = ps - pt
                        if DIV == 1:
                            d = tl.where(ps > 0.0, ps * (log_ps - log_pt - stat), 0.0)
                        if DIV == 3:
                            lm = _log_mix(log_pt, log_ps, log_beta, log_1mb)
                            d = tl.where(ps > 0.0, (1.0 - beta) * ps * (log_ps - lm - stat), 0.0)
                        if DIV == 4:
                            df = ps - pt
                            sg = tl.where(df > 0.0, 1.0, tl.where(df < 0.0, -1.0, 0.0))
                            d = 0.5 * ps * (sg - stat)
                        g = cs * d
                    if HAS_TARGET:
                        if NEED_H:
                            ph = tl.exp(sr - lse_h)
                        else:
                            ph = ps
                        g += ch * (ph - tl.where(offs == y, 1.0, 0.0))
                    g = g * logit_map_grad(sr, s_scale, s_cap, S_CAP)
                    tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
        else:
            if PHASE == 0:
                zero_row(soft_ptr, hard_ptr, g_ptr, row64, stride_g, V, COMPUTE_GRAD, BLOCK_V)
            if PHASE == 1 or PHASE == 2:
                n_out: tl.constexpr = 8 if PHASE == 1 else 2
                zeros = tl.zeros([8], dtype=tl.float32)
                idx = tl.arange(0, 8)
                tl.store(out_ptr + row64 * n_out + idx, zeros, mask=idx < n_out)
            if PHASE == 3 and COMPUTE_GRAD:
                zero_grad_row(g_ptr, row64, stride_g, V, BLOCK_V)


@triton.jit
def _log_mix(log_pt, log_ps, log_beta, log_1mb):
    """log(b p_t + (1 - b) p_s), computed in log space so tiny probabilities keep their digits."""
    a = log_pt + log_beta
    b = log_ps + log_1mb
    mx = tl.maximum(a, b)
    mxs = tl.where(mx == float("-inf"), 0.0, mx)
    return mxs + tl.log(tl.exp(a - mxs) + tl.exp(b - mxs))


def launch_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of V."""
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    return block_v, NUM_WARPS or (4 if block_v <= 1024 else (8 if block_v <= 4096 else 16))


def _launch(
    student,
    teacher,
    target,
    scale,
    grad,
    soft,
    hard,
    stats,
    out,
    *,
    divergence,
    temperature,
    alpha_w,
    alpha,
    beta,
    ignore_index,
    logit_map,
    compute_grad,
    phase,
    vocab_start,
    vocab_total,
):
    """One launch of _kd_loss_kernel over (R, V) rows; the unused pointers get any tensor."""
    R, V = student.shape
    if R == 0 or V == 0:
        return
    block_v, num_warps = launch_config(V)
    s_scale, s_cap, s_has_cap = logit_map_args(logit_map[:2])
    t_scale, t_cap, t_has_cap = logit_map_args(logit_map[2:])
    _kd_loss_kernel[(row_programs(R, student.device, MAX_PROGRAMS, PROGRAMS_PER_SM),)](
        student,
        teacher,
        target if target is not None else scale,
        scale,
        grad,
        soft,
        hard,
        stats,
        out,
        R,
        V,
        vocab_total,
        vocab_start,
        student.stride(0),
        teacher.stride(0),
        V,
        1.0 / temperature,
        alpha_w,
        1.0 - alpha,
        beta,
        math.log(beta) if divergence == "jsd" else 0.0,
        math.log1p(-beta) if divergence == "jsd" else 0.0,
        ignore_index,
        s_scale,
        s_cap,
        t_scale,
        t_cap,
        DIV=DIVERGENCES.index(divergence),
        HAS_TARGET=target is not None,
        SAME_T=temperature == 1.0,
        COMPUTE_GRAD=compute_grad,
        S_CAP=s_has_cap,
        T_CAP=t_has_cap,
        PHASE=phase,
        BLOCK_V=block_v,
        REVERSE=REVERSE,
        num_warps=num_warps,
    )


def kd_loss_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    num_items: torch.Tensor | None,
    divergence: str,
    temperature: float,
    alpha: float,
    beta: float,
    ignore_index: int,
    scale_by_t2: bool,
    logit_map: list[float],
    reduction: str,
    compute_grad: bool,
    grad_dtype: torch.dtype | None = None,
    grad_out: torch.Tensor | None = None,
):
    """Launch on (R, V) logits. Returns (loss, soft, hard, grad) like the C++ op ``pykd::kd_loss_fwd``.
    grad_dtype (default: the logits') is the dtype the gradient is rounded to once, as it is stored
    (fused_linear_kd_loss keeps fp32 logits but wants the gradient in its GEMMs' dtype); grad_out, a
    contiguous (R, V) buffer of that dtype the gradient is stored into instead of a fresh tensor."""

    R, V = student.shape
    student = student if student.stride(-1) == 1 else student.contiguous()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    dev = student.device
    soft = new_output(R, device=dev, dtype=torch.float32)
    hard = new_output(R, device=dev, dtype=torch.float32)
    grad = grad_output(
        (R, V) if compute_grad else (0,), device=dev, dtype=grad_dtype or student.dtype, out=grad_out
    )
    n, scale = row_loss_scale(target, R, ignore_index, num_items, reduction, student.dtype, dev)
    alpha_w = soft_weight(divergence, temperature, alpha, scale_by_t2)
    _launch(student, teacher, target, scale, grad, soft, hard, soft, soft, divergence=divergence,
            temperature=temperature, alpha_w=alpha_w, alpha=alpha, beta=beta, ignore_index=ignore_index,
            logit_map=logit_map, compute_grad=compute_grad, phase=0, vocab_start=0,
            vocab_total=V)  # fmt: skip
    loss, soft, hard = finish_rows(soft, hard, alpha_w, alpha, reduction, n)
    return loss, soft, hard, grad


def kd_loss_shard(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    stats: torch.Tensor | None,
    scale: torch.Tensor,
    divergence: str,
    temperature: float,
    alpha: float,
    beta: float,
    ignore_index: int,
    scale_by_t2: bool,
    logit_map: list[float],
    phase: int,
    vocab_start: int,
    vocab_total: int,
    grad_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One phase (1, 2 or 3; see _kd_loss_kernel) on the vocabulary slice [vocab_start, vocab_start + V)
    held in (R, V) logits, like the C++ op ``pykd::kd_loss_shard``: phase 1 returns (R, 8) row stats,
    phase 2 (R, 2) partial sums, phase 3 the (R, V) gradient scaled by ``scale`` (0-d)."""
    R, V = student.shape
    student = student if student.stride(-1) == 1 else student.contiguous()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    dev = student.device
    f32 = torch.float32
    out = new_output((R, {1: 8, 2: 2}.get(phase, 0)), device=dev, dtype=f32)
    grad = new_output((R, V) if phase == 3 else (0,), device=dev, dtype=grad_dtype or student.dtype)
    stats = out if stats is None else stats.contiguous()
    scale = scale.to(device=dev, dtype=f32)
    _launch(student, teacher, target, scale, grad, out, out, stats, out, divergence=divergence,
            temperature=temperature, alpha_w=soft_weight(divergence, temperature, alpha, scale_by_t2),
            alpha=alpha, beta=beta, ignore_index=ignore_index, logit_map=logit_map,
            compute_grad=phase == 3, phase=phase, vocab_start=vocab_start,
            vocab_total=vocab_total)  # fmt: skip
    return grad if phase == 3 else out
