"""Triton kernel of ``pykd.topk_kd_loss``: distillation from a teacher's top-K log-probabilities.

No autograd here; ``pykd/topk_kd_loss.py`` owns the op. See ../shared/DESIGN.md section 4.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
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

MAX_PROGRAMS = 65535
MAX_BLOCK_V = 2048  # the vocabulary block of each sweep
KW = 16  # sorted top-K indices tested against one vocabulary block at a time
# Launch choices swept by benchmarks/tune_kd_loss.py on a GPU, as in kd_loss.py: NUM_WARPS 0 (by
# block size), PROGRAMS_PER_SM 0 (one program per row), REVERSE (the gradient sweep walks the row
# last block first, where the statistics sweep ended).
NUM_WARPS = 0
PROGRAMS_PER_SM = 0
REVERSE = False


@triton.jit
def _topk_kd_loss_kernel(
    s_ptr,
    lp_ptr,
    idx_ptr,
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
    K,
    stride_s,
    stride_k,
    stride_g,
    inv_t,
    alpha_w,
    one_minus_alpha,
    ignore_index,
    s_scale,
    s_cap,
    TAIL: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    SAME_T: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    KW: tl.constexpr,
    S_CAP: tl.constexpr,
    PHASE: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """Per row, s = f(logits) (logit_scale / logit_softcap, gradients times f'), z = s / T,
    q = softmax(z), teacher log-probs lp_k at sorted distinct indices i_k.

    tail (TAIL): soft = sum_k p_k (lp_k - log q_k) + P (log P - log Q) with P = 1 - sum_k p_k and
        log Q = lse_out - lse, lse_out the log-sum-exp of the non-K logits alone (an online softmax
        over the vocabulary sweep with the K entries masked out, so Q never comes from 1 - sum q_k).
        d soft/dz_j = c q_j - p_j (j in K), c q_j - P exp(z_j - lse_out) (j not in K), with
        c = sum_k p_k + P the teacher's total mass: 1, but where P is 0 for want of a tail (K = V, or
        the student has no mass outside K) or the given probabilities sum above 1.
    no tail: p^ = softmax(lp) over the K entries; soft = sum_k p^_k (log p^_k - log q_k),
        d soft/dz_j = q_j - p^_j [j in K].
    Indices >= V (a teacher's larger vocabulary) are dropped; with TAIL the kept probabilities are
    renormalized by 1 - (the dropped mass).
    The sweep tests membership with the sorted indices: a window of KW indices starting at the first
    one not yet passed is compared with the block; the window advances past the indices below the
    block's end. The gradient sweep writes the non-K formula everywhere; after a barrier the
    target's entry and then the K entries are overwritten with their exact values.

    PHASE 0 runs whole rows. A vocabulary slice [vocab_start, vocab_start + V) of V_total entries
    (pykd.vocab_parallel; indices stay global, ids >= V_total are the dropped ones) runs in two:
        PHASE 1 -> out (R, 10): (m, l) of z outside K (all of z without TAIL), (m_h, l_h), (m, l) of
            z over the slice's K entries, sum_k p_k z_k over them, f(s)[y] or 0 off the slice, and
            the teacher's sum_k p_k and sum_k p_k log p_k (over all K: the same on every rank)
        PHASE 2: the gradient from stats (R, 5) = (lse, lse_out, lse_h, P, mass)
    Ignored rows write zeros.
    """
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0)
    gscale = tl.load(scale_ptr).to(tl.float32)
    NEG_INF: tl.constexpr = float("-inf")
    NEED_H: tl.constexpr = HAS_TARGET and not SAME_T
    koffs = tl.arange(0, BLOCK_K)
    kmask = koffs < K
    for row64 in range(pid, R, nprog):
        s_row = s_ptr + row64 * stride_s
        idx_row = idx_ptr + row64 * stride_k
        y = 0
        valid = True
        if HAS_TARGET:
            y = tl.load(target_ptr + row64)
            valid = y != ignore_index
            if PHASE != 0:
                y = y - vocab_start  # the target's column in this slice
        if valid:
            ik_g = tl.load(idx_row + koffs, mask=kmask, other=0)
            # ids >= V_total dropped (also memory safety for unchecked input); kept ones off this
            # slice still count on the teacher's side
            k_kept = kmask & (ik_g >= 0) & (ik_g < V_total)
            ik = ik_g
            k_ok = k_kept
            if PHASE != 0:  # (a whole row: V_total is V and vocab_start 0)
                ik = ik_g - vocab_start
                k_ok = k_kept & (ik >= 0) & (ik < V)
            lpk = tl.load(lp_ptr + row64 * stride_k + koffs, mask=kmask, other=NEG_INF).to(tl.float32)
            if TAIL:
                dropped = tl.sum(tl.where(kmask & (ik_g >= V_total), tl.exp(lpk), 0.0))
                keep = tl.where((dropped > 0.0) & (dropped < 1.0), 1.0 - dropped, 1.0)
                lpk = lpk - tl.log(keep)
            lpk = tl.where(k_kept, lpk, NEG_INF)
            sk = tl.load(s_row + ik, mask=k_ok, other=NEG_INF).to(tl.float32)
            sk = logit_map(sk, k_ok, s_scale, s_cap, S_CAP)
            zk = sk * inv_t
            lse = 0.0
            lse_out = 0.0
            lse_h = 0.0
            p_tail = 0.0
            mass = 1.0  # the teacher's total sum_k p_k + P: the gradient's q coefficient
            if PHASE == 2:
                lpn = _teacher_logprobs(lpk, TAIL)
                st = stats_ptr + row64 * 5
                lse = tl.load(st)
                lse_out = tl.load(st + 1)
                lse_h = tl.load(st + 2)
                p_tail = tl.load(st + 3)
                mass = tl.load(st + 4)
            else:
                lse, lse_out, lse_h, p_tail, mass, lpn = _topk_stats(
                    s_row, idx_row, zk, lpk, k_kept, k_ok, y, out_ptr + row64 * 10, V, V_total,
                    vocab_start, K, inv_t, s_scale, s_cap, TAIL, NEED_H, HAS_TARGET, S_CAP, PHASE, BLOCK_V,
                    KW,
                )  # fmt: skip
            if PHASE == 0:
                soft = tl.sum(tl.where(lpn > NEG_INF, tl.exp(lpn) * (lpn - zk + lse), 0.0))
                if TAIL:
                    p_safe = tl.where(p_tail > 0.0, p_tail, 1.0)
                    soft += tl.where(p_tail > 0.0, p_tail * (tl.log(p_safe) - lse_out + lse), 0.0)
                hard = 0.0
                if HAS_TARGET:
                    hard = lse_h - logit_map(tl.load(s_row + y).to(tl.float32), True, s_scale, s_cap, S_CAP)
                tl.store(soft_ptr + row64, soft)
                tl.store(hard_ptr + row64, hard)
            # ---- the gradient
            if COMPUTE_GRAD and PHASE != 1:
                cs = alpha_w * gscale * inv_t
                ch = one_minus_alpha * gscale
                lse_o = tl.where(lse_out == NEG_INF, 0.0, lse_out)
                g_row = g_ptr + row64 * stride_g
                for v0 in range(0, V, BLOCK_V):
                    offs = block_start(v0, V, BLOCK_V, REVERSE) + tl.arange(0, BLOCK_V)
                    mask = offs < V
                    sr = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
                    sr = logit_map(sr, mask, s_scale, s_cap, S_CAP)
                    g = _outside_grad(
                        sr, inv_t, lse, lse_o, p_tail, mass, lse_h, cs, ch, TAIL, NEED_H, HAS_TARGET
                    )
                    g = g * logit_map_grad(sr, s_scale, s_cap, S_CAP)
                    tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
                tl.debug_barrier()
                if HAS_TARGET:
                    own = (y >= 0) & (y < V)
                    yc = tl.where(own, y, 0)
                    sy = logit_map(tl.load(s_row + yc).to(tl.float32), True, s_scale, s_cap, S_CAP)
                    gy = _outside_grad(
                        sy, inv_t, lse, lse_o, p_tail, mass, lse_h, cs, ch, TAIL, NEED_H, HAS_TARGET
                    )
                    gy = (gy - ch) * logit_map_grad(sy, s_scale, s_cap, S_CAP)
                    tl.store(g_row + yc, gy.to(g_ptr.dtype.element_ty), mask=own)
                    tl.debug_barrier()
                qk = tl.exp(zk - lse)
                gk = cs * (mass * qk - tl.exp(lpn))
                if HAS_TARGET:
                    phk = qk
                    if NEED_H:
                        phk = tl.exp(sk - lse_h)
                    gk += ch * (phk - tl.where(ik == y, 1.0, 0.0))
                gk = gk * logit_map_grad(sk, s_scale, s_cap, S_CAP)
                tl.store(g_row + ik, gk.to(g_ptr.dtype.element_ty), mask=k_ok)
        else:
            if PHASE == 0:
                zero_row(soft_ptr, hard_ptr, g_ptr, row64, stride_g, V, COMPUTE_GRAD, BLOCK_V)
            if PHASE == 1:
                zeros = tl.zeros([16], dtype=tl.float32)
                i16 = tl.arange(0, 16)
                tl.store(out_ptr + row64 * 10 + i16, zeros, mask=i16 < 10)
            if PHASE == 2 and COMPUTE_GRAD:
                zero_grad_row(g_ptr, row64, stride_g, V, BLOCK_V)


@triton.jit
def _topk_stats(
    s_row, idx_row, zk, lpk, k_kept, k_ok, y, o_ptr, V, V_total, vocab_start, K, inv_t, s_scale, s_cap,
    TAIL: tl.constexpr, NEED_H: tl.constexpr, HAS_TARGET: tl.constexpr, S_CAP: tl.constexpr,
    PHASE: tl.constexpr, BLOCK_V: tl.constexpr, KW: tl.constexpr,
):  # fmt: skip
    """The row's sweep: (lse, lse_out, lse_h, P, mass) of a whole row (PHASE 0), or the slice's
    stats stored at o_ptr (PHASE 1; the returned values are then unused); and the teacher's log-probs
    (taken after the sweep, so they hold no registers during it)."""
    NEG_INF: tl.constexpr = float("-inf")
    # ---- sweep: online (max, sum) of z (outside K when TAIL) and of raw s (hard CE)
    m = NEG_INF
    l = 0.0
    m_h = NEG_INF
    l_h = 0.0
    kp = tl.zeros([], dtype=tl.int32)  # indices passed so far
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        sr = tl.load(s_row + offs, mask=mask, other=NEG_INF).to(tl.float32)
        sr = logit_map(sr, mask, s_scale, s_cap, S_CAP)
        z = sr * inv_t
        if TAIL:
            hit = tl.zeros([BLOCK_V], dtype=tl.int1)
            n_in = tl.full([], KW, tl.int32)
            while n_in == KW:
                # one index at a time: a (BLOCK_V, KW) compare and its row sums cost registers
                # (Triton 3.6 spilled 2.5 KB per thread)
                n_in = tl.zeros([], dtype=tl.int32)
                for j in tl.static_range(KW):
                    iw = tl.load(idx_row + kp + j, mask=kp + j < K, other=V_total + BLOCK_V)
                    if PHASE != 0:
                        iw = iw - vocab_start
                    hit = hit | (offs == iw)
                    n_in += (iw < v0 + BLOCK_V).to(tl.int32)
                kp += n_in
            z = tl.where(hit, NEG_INF, z)
        m_new = tl.maximum(m, tl.max(z))
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe))
        m = m_new
        if NEED_H:
            mh_new = tl.maximum(m_h, tl.max(sr))
            mh_safe = tl.where(mh_new == NEG_INF, 0.0, mh_new)
            l_h = l_h * tl.exp(m_h - mh_safe) + tl.sum(tl.exp(sr - mh_safe))
            m_h = mh_new
    lse_out = m + tl.log(l)  # the whole row's lse when not TAIL; -inf for an empty tail
    lpn = _teacher_logprobs(lpk, TAIL)
    m_in = tl.max(zk)
    m_in_safe = tl.where(m_in == NEG_INF, 0.0, m_in)
    l_in = tl.sum(tl.exp(zk - m_in_safe))
    pk = tl.exp(lpn)
    sum_p = tl.sum(pk)
    if PHASE == 1:
        sy = 0.0
        if HAS_TARGET:
            own = (y >= 0) & (y < V)
            ys = logit_map(tl.load(s_row + tl.where(own, y, 0)).to(tl.float32), True, s_scale, s_cap,
                           S_CAP)  # fmt: skip
            sy = tl.where(own, ys, 0.0)
        pz = tl.sum(tl.where((lpn > NEG_INF) & k_ok, pk * zk, 0.0))
        plp = tl.sum(tl.where(lpn > NEG_INF, pk * lpn, 0.0))
        tl.store(o_ptr, m)
        tl.store(o_ptr + 1, l)
        tl.store(o_ptr + 2, m_h)
        tl.store(o_ptr + 3, l_h)
        tl.store(o_ptr + 4, m_in)
        tl.store(o_ptr + 5, l_in)
        tl.store(o_ptr + 6, pz)
        tl.store(o_ptr + 7, sy)
        tl.store(o_ptr + 8, sum_p)
        tl.store(o_ptr + 9, plp)
    lse = lse_out
    p_tail = 0.0
    mass = 1.0
    if TAIL:
        lse_in = m_in_safe + tl.log(l_in)
        mx = tl.maximum(lse_in, lse_out)
        mx_safe = tl.where(mx == NEG_INF, 0.0, mx)
        lse = mx_safe + tl.log(tl.exp(lse_in - mx_safe) + tl.exp(lse_out - mx_safe))
        has_tail = (tl.sum(k_kept.to(tl.int32)) < V) & (lse_out > NEG_INF)
        p_tail = tl.where(has_tail, tl.maximum(1.0 - tl.sum(tl.exp(lpk)), 0.0), 0.0)
        mass = tl.sum(tl.exp(lpk)) + p_tail
    lse_h = lse
    if NEED_H:
        lse_h = m_h + tl.log(l_h)
    return lse, lse_out, lse_h, p_tail, mass, lpn


@triton.jit
def _teacher_logprobs(lpk, TAIL: tl.constexpr):
    """The teacher's log-probs: as given (TAIL), else renormalized over K as (lp - lp_max) - lp_log_l
    (lp - (lp_max + log l) would absorb log l when |lp| is huge, e.g. -1e30 in fp32)."""
    lpn = lpk
    if not TAIL:
        lp_max = tl.max(lpk)
        lpn = (lpk - lp_max) - tl.log(tl.sum(tl.exp(lpk - lp_max)))
    return lpn


@triton.jit
def _outside_grad(sr, inv_t, lse, lse_o, p_tail, mass, lse_h, cs, ch, TAIL, NEED_H, HAS_TARGET):
    """The gradient of an entry outside K: cs (mass q - P exp(z - lse_out)) + ch softmax(s)."""
    z = sr * inv_t
    q = tl.exp(z - lse)
    d = q
    if TAIL:
        d = mass * q - p_tail * tl.exp(z - lse_o)
    g = cs * d
    if HAS_TARGET:
        ph = q
        if NEED_H:
            ph = tl.exp(sr - lse_h)
        g += ch * ph
    return g


def launch_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of V."""
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    return block_v, NUM_WARPS or (4 if block_v <= 1024 else 8)


def _launch(
    student,
    lp,
    idx,
    target,
    scale,
    grad,
    soft,
    hard,
    stats,
    out,
    *,
    temperature,
    alpha_w,
    alpha,
    tail,
    ignore_index,
    logit_map,
    compute_grad,
    phase,
    vocab_start,
    vocab_total,
):
    """One launch of _topk_kd_loss_kernel over (R, V) rows; the unused pointers get any tensor."""
    R, V = student.shape
    K = idx.shape[1]
    if R == 0 or V == 0:
        return
    block_v, num_warps = launch_config(V)
    block_k = triton.next_power_of_2(max(K, 1))
    s_scale, s_cap, s_has_cap = logit_map_args(logit_map)
    _topk_kd_loss_kernel[(row_programs(R, student.device, MAX_PROGRAMS, PROGRAMS_PER_SM),)](
        student,
        lp,
        idx,
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
        K,
        student.stride(0),
        K,
        V,
        1.0 / temperature,
        alpha_w,
        1.0 - alpha,
        ignore_index,
        s_scale,
        s_cap,
        TAIL=tail,
        HAS_TARGET=target is not None,
        SAME_T=temperature == 1.0,
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=block_v,
        BLOCK_K=block_k,
        KW=min(KW, block_k),
        S_CAP=s_has_cap,
        PHASE=phase,
        REVERSE=REVERSE,
        num_warps=num_warps,
    )


def topk_kd_loss_fwd(
    student: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_indices: torch.Tensor,
    target: torch.Tensor | None,
    num_items: torch.Tensor | None,
    temperature: float,
    alpha: float,
    tail: bool,
    ignore_index: int,
    scale_by_t2: bool,
    logit_map: list[float],
    reduction: str,
    compute_grad: bool,
    grad_dtype: torch.dtype | None = None,
    grad_out: torch.Tensor | None = None,
):
    """Launch on (R, V) logits and (R, K) sorted distinct indices. Returns (loss, soft, hard, grad)
    like the C++ op ``pykd::topk_kd_loss_fwd``; grad_dtype and grad_out as in ``kd_loss_fwd``."""
    R, V = student.shape
    student = student if student.stride(-1) == 1 else student.contiguous()
    dev = student.device
    soft = new_output(R, device=dev, dtype=torch.float32)
    hard = new_output(R, device=dev, dtype=torch.float32)
    grad = grad_output(
        (R, V) if compute_grad else (0,), device=dev, dtype=grad_dtype or student.dtype, out=grad_out
    )
    n, scale = row_loss_scale(target, R, ignore_index, num_items, reduction, student.dtype, dev)
    alpha_w = soft_weight("kl", temperature, alpha, scale_by_t2)
    _launch(student, topk_logprobs.contiguous(), topk_indices.contiguous(), target, scale, grad, soft, hard,
            soft, soft, temperature=temperature, alpha_w=alpha_w, alpha=alpha, tail=tail,
            ignore_index=ignore_index, logit_map=logit_map, compute_grad=compute_grad, phase=0,
            vocab_start=0, vocab_total=V)  # fmt: skip
    loss, soft, hard = finish_rows(soft, hard, alpha_w, alpha, reduction, n)
    return loss, soft, hard, grad


def topk_kd_loss_shard(
    student: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_indices: torch.Tensor,
    target: torch.Tensor | None,
    stats: torch.Tensor | None,
    scale: torch.Tensor,
    temperature: float,
    alpha: float,
    tail: bool,
    ignore_index: int,
    scale_by_t2: bool,
    logit_map: list[float],
    phase: int,
    vocab_start: int,
    vocab_total: int,
    grad_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One phase (1 or 2; see _topk_kd_loss_kernel) on the vocabulary slice [vocab_start,
    vocab_start + V) held in (R, V) logits, like the C++ op ``pykd::topk_kd_loss_shard``: phase 1
    returns (R, 10) row stats, phase 2 the (R, V) gradient scaled by ``scale`` (0-d)."""
    R, V = student.shape
    student = student if student.stride(-1) == 1 else student.contiguous()
    dev = student.device
    f32 = torch.float32
    out = new_output((R, 10 if phase == 1 else 0), device=dev, dtype=f32)
    grad = new_output((R, V) if phase == 2 else (0,), device=dev, dtype=grad_dtype or student.dtype)
    stats = out if stats is None else stats.contiguous()
    alpha_w = soft_weight("kl", temperature, alpha, scale_by_t2)
    _launch(student, topk_logprobs.contiguous(), topk_indices.contiguous(), target,
            scale.to(device=dev, dtype=f32), grad, out, out, stats, out, temperature=temperature,
            alpha_w=alpha_w, alpha=alpha, tail=tail, ignore_index=ignore_index, logit_map=logit_map,
            compute_grad=phase == 2, phase=phase, vocab_start=vocab_start,
            vocab_total=vocab_total)  # fmt: skip
    return grad if phase == 2 else out
