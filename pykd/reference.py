"""The math of every pykd op in plain PyTorch, materializing everything.

This is the spec the kernels are tested against (in float64). It is slow and memory-hungry on
purpose: it states the formulas of DESIGN.md as directly as possible.
"""

from __future__ import annotations

import math

import torch

from .sparse_quant import pv_levels, quantize_p


def _xlogy_safe(p: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """p * log_ratio with 0 where p == 0 (0 log 0 = 0), without NaN gradients."""
    zero = p == 0
    return torch.where(zero, torch.zeros_like(p), p * torch.where(zero, 0.0, log_ratio))


def kd_loss(
    student_logits,
    teacher_logits,
    target=None,
    *,
    divergence="kl",
    temperature=1.0,
    alpha=None,
    beta=0.5,
    ignore_index=-100,
    reduction="mean",
    scale_by_t2=True,
    num_items_in_batch=None,
    return_components=False,
    logit_softcap=None,
    logit_scale=1.0,
):
    """Reference of :func:`pykd.kd_loss`; computes in the inputs' dtype (pass float64)."""
    caps = logit_softcap if isinstance(logit_softcap, (tuple, list)) else (logit_softcap,) * 2
    scales = logit_scale if isinstance(logit_scale, (tuple, list)) else (logit_scale,) * 2
    s = logit_map(student_logits, caps[0], scales[0])
    V = s.shape[-1]
    t = logit_map(teacher_logits.detach()[..., :V], caps[1], scales[1])
    T = float(temperature)
    if alpha is None:
        alpha = 0.5 if target is not None else 1.0
    log_ps = torch.log_softmax(s / T, dim=-1)
    log_pt = torch.log_softmax(t / T, dim=-1)
    ps, pt = log_ps.exp(), log_pt.exp()
    if divergence == "kl":
        soft = _xlogy_safe(pt, log_pt - log_ps).sum(-1)
    elif divergence == "reverse_kl":
        soft = _xlogy_safe(ps, log_ps - log_pt).sum(-1)
    elif divergence == "soft_ce":
        soft = -_xlogy_safe(pt, log_ps).sum(-1)
    elif divergence == "jsd":
        a, b = log_pt + math.log(beta), log_ps + math.log1p(-beta)
        none = (pt == 0) & (ps == 0)  # m = 0: both terms vanish; keep logaddexp's grad finite
        log_m = torch.logaddexp(torch.where(none, 0.0, a), torch.where(none, 0.0, b))
        soft = beta * _xlogy_safe(pt, log_pt - log_m).sum(-1) + (1 - beta) * _xlogy_safe(
            ps, log_ps - log_m
        ).sum(-1)
    elif divergence == "tvd":
        soft = 0.5 * (ps - pt).abs().sum(-1)
    elif divergence == "mse":
        d = torch.where(s == t, 0.0, s - t)
        soft = (d * d).mean(-1)
    else:
        raise ValueError(divergence)
    w = 1.0 if (divergence == "mse" or not scale_by_t2) else T * T
    return _combine(soft, s, target, alpha, w, ignore_index, reduction, num_items_in_batch, return_components)


def logit_map(x, softcap=None, scale=1.0):
    """f(x) = c tanh(a x / c) (softcap c), else a x."""
    x = x * scale
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def _combine(soft, s, target, alpha, w, ignore_index, reduction, num_items_in_batch, return_components):
    """loss_r = alpha w soft_r + (1 - alpha) hard_r over the rows that count, then the reduction."""
    if target is not None:
        valid = target != ignore_index
        safe_t = torch.where(valid, target, 0)
        hard = torch.logsumexp(s, -1) - s.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1)
        zero = torch.zeros_like(soft)
        soft = torch.where(valid, soft, zero)
        hard = torch.where(valid, hard, zero)
        n = valid.sum()
    else:
        hard = torch.zeros_like(soft)
        n = torch.tensor(soft.numel())
    loss = alpha * w * soft + (1 - alpha) * hard
    if reduction == "none":
        out = loss, soft, hard
    else:
        if reduction == "mean":
            denom = num_items_in_batch if num_items_in_batch is not None else n.clamp_min(1)
        else:
            denom = 1
        out = tuple(x.sum() / denom for x in (loss, soft, hard))
    return (out[0], out[1].detach(), out[2].detach()) if return_components else out[0]


# ------------------------------------------------------------------------ fused linear, top-k


def topk_kd_loss(
    student_logits,
    teacher_topk_logprobs,
    teacher_topk_indices,
    target=None,
    *,
    temperature=1.0,
    alpha=None,
    tail=True,
    ignore_index=-100,
    reduction="mean",
    scale_by_t2=True,
    num_items_in_batch=None,
    return_components=False,
    teacher_vocab_size=None,
    logit_softcap=None,
    logit_scale=1.0,
):
    """Reference of :func:`pykd.topk_kd_loss`: forward KL from the teacher's top-K log-probabilities."""
    s = logit_map(student_logits, logit_softcap, logit_scale)
    T = float(temperature)
    if alpha is None:
        alpha = 0.5 if target is not None else 1.0
    lp = teacher_topk_logprobs.detach().to(s.dtype)
    idx = teacher_topk_indices
    V = s.shape[-1]
    kept = idx < V  # ids >= V (a larger teacher vocabulary) are dropped; a tail renormalizes the rest
    if tail:
        d = torch.where(kept, 0, lp.exp()).sum(-1, keepdim=True)
        lp = lp - torch.log1p(-torch.where((d > 0) & (d < 1), d, 0))
    lp = lp.masked_fill(~kept, float("-inf"))
    idx = torch.where(kept, idx, 0)
    if target is not None:  # ignored rows may hold anything; give them a harmless teacher
        keep = (target != ignore_index)[..., None]
        idx = torch.where(keep, idx, torch.arange(idx.shape[-1], device=idx.device))
        lp = torch.where(keep, lp, -math.log(idx.shape[-1]))
    log_q = torch.log_softmax(s / T, dim=-1)
    log_qk = log_q.gather(-1, idx)
    if tail:
        pk = lp.exp()
        soft = _xlogy_safe(pk, lp - log_qk).sum(-1)
        in_k = torch.zeros_like(s, dtype=torch.int64).scatter_add(-1, idx, kept.long()) > 0
        # a tail bucket needs keys outside K where the student has mass
        has_tail = (~in_k & (log_q > float("-inf"))).any(-1)
        # Rows without a tail get a dummy row, so logsumexp's gradient stays finite there.
        outside = torch.where(has_tail[..., None], log_q.masked_fill(in_k, float("-inf")), 0)
        log_q_tail = torch.logsumexp(outside, -1)
        p_tail = (1 - pk.sum(-1)).clamp_min(0)
        p_tail = torch.where(has_tail & (log_q_tail > float("-inf")), p_tail, 0).detach()
        soft = soft + _xlogy_safe(p_tail, p_tail.log() - torch.where(p_tail > 0, log_q_tail, 0))
    else:
        lpn = torch.log_softmax(lp, dim=-1)
        soft = _xlogy_safe(lpn.exp(), lpn - log_qk).sum(-1)
    w = T * T if scale_by_t2 else 1.0
    return _combine(soft, s, target, alpha, w, ignore_index, reduction, num_items_in_batch, return_components)


def fused_linear_kd_loss(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    target=None,
    *,
    student_bias=None,
    teacher_bias=None,
    chunk_size=None,
    **kd_options,
):
    """Reference of :func:`pykd.fused_linear_kd_loss`: kd_loss on the materialized logits."""
    s = torch.nn.functional.linear(student_hidden, student_weight, student_bias)
    t = torch.nn.functional.linear(teacher_hidden, teacher_weight, teacher_bias).detach()
    return kd_loss(s, t, target, **kd_options)


def fused_linear_topk_kd_loss(
    student_hidden,
    student_weight,
    teacher_topk_logprobs,
    teacher_topk_indices,
    target=None,
    *,
    student_bias=None,
    chunk_size=None,
    **topk_options,
):
    """Reference of :func:`pykd.fused_linear_topk_kd_loss`: topk_kd_loss on the materialized logits."""
    s = torch.nn.functional.linear(student_hidden, student_weight, student_bias)
    return topk_kd_loss(s, teacher_topk_logprobs, teacher_topk_indices, target, **topk_options)


# ------------------------------------------------------------------------------ attention


def _visible(B, N_q, N_k, causal, key_padding_mask, device):
    """(B, 1, N_q, N_k) bool: key j visible to query i."""
    vis = torch.ones(B, 1, N_q, N_k, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        vis = vis & key_padding_mask[:, None, None, :].bool()
    if causal:
        vis = vis & torch.ones(N_q, N_k, dtype=torch.bool, device=device).tril()
    return vis


def _counted_rows(vis, key_padding_mask, N_q, N_k):
    """(B, 1, N_q) bool: rows that count in a loss (real query, at least one visible key)."""
    counted = vis.any(-1)
    if key_padding_mask is not None and N_q == N_k:
        counted = counted & key_padding_mask[:, None, :].bool()
    return counted


def _softmax_masked(x, vis):
    p = torch.softmax(x.masked_fill(~vis, float("-inf")), dim=-1)
    return torch.where(vis.any(-1, keepdim=True), p, 0.0)


def _log_softmax_masked(x, vis):
    lp = torch.log_softmax(x.masked_fill(~vis, float("-inf")), dim=-1)
    return torch.where(vis, lp, 0.0)  # hidden entries are never used; keep them finite


def _ste(x, value):
    """value in the forward, the gradient of x in the backward (straight-through)."""
    return x + (value - x).detach()


def quantize_tokens(x, fmt, block_size, *, smooth=False):
    """Reference of :func:`pykd.sparse_quant.quantize_tokens` (op ``pykd::quantize_tokens``), in fp32
    as the kernels compute it: (codes, scales (B, H, ceil(N / block_size)), dequantized fp32)."""
    B, H, N, D = x.shape
    levels = {"int8": 127.0, "fp8_e4m3": 448.0}[fmt]
    xf = x.float()
    if smooth:
        xf = xf - xf.mean(2, keepdim=True)
    nb = -(-N // block_size)
    xp = torch.nn.functional.pad(xf, (0, 0, 0, nb * block_size - N)).view(B, H, nb, block_size, D)
    amax = xp.abs().amax((-1, -2))
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / levels)  # a NaN block: NaN scale
    y = xp / scale[..., None, None]
    if fmt == "int8":
        codes = y.round().clamp(-127, 127).to(torch.int8)
    else:
        codes = y.clamp(-448, 448).to(torch.float8_e4m3fn)
    deq = codes.float() * scale[..., None, None]
    codes = codes.view(B, H, nb * block_size, D)[:, :, :N]
    return codes, scale, deq.view(B, H, nb * block_size, D)[:, :, :N]


def student_scores(q, k, scale, vis, spec):
    """(s, vis) of a student under an :class:`pykd.AttentionSpec` (None = dense), in q's dtype.

    q (B, H, N_q, D), k (B, H, N_k, D) with the heads already matched; vis (B or 1, 1, N_q, N_k).
    Quantized Q/K: the codes and scales of :func:`quantize_tokens` dequantized exactly,
    straight-through. Block mask: hidden blocks leave vis. Row top-k: each row keeps the entries
    >= its k-th largest visible score.
    """
    if spec is not None and spec.qk_format is not None:
        bs = spec.block_size
        qc, qs, _ = quantize_tokens(q.detach(), spec.qk_format, bs)
        # k arrives head-repeated: per-head codes and scales are those of its K/V head
        kc, ks, _ = quantize_tokens(k.detach(), spec.qk_format, bs, smooth=spec.smooth_k)
        q = _ste(q, qc.to(q.dtype) * qs.to(q.dtype).repeat_interleave(bs, -1)[..., : q.shape[2], None])
        k = _ste(k, kc.to(k.dtype) * ks.to(k.dtype).repeat_interleave(bs, -1)[..., : k.shape[2], None])
    s = scale * q @ k.transpose(-1, -2)
    if spec is not None and spec.block_mask is not None:
        bs, (N_q, N_k) = spec.block_size, s.shape[-2:]
        m = spec.block_mask.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :N_q, :N_k]
        vis = vis & m
    if spec is not None and spec.topk is not None:
        kk = min(spec.topk, s.shape[-1])
        kth = s.detach().masked_fill(~vis, float("-inf")).topk(kk, -1).values[..., -1:]
        vis = vis & ~(s.detach() < kth)  # a NaN score (or threshold) stays visible: NaN out
    return s, vis


def quantized_softmax_v(s, vis, v, pv_format):
    """softmax(s) v over vis with P = exp(s - rowmax) quantized before P·V, the normalizer from the
    unquantized P; pv_format None = plain softmax(s) v. The gradient is that of softmax(s) v
    (straight-through: dense attention at the same scores)."""
    dense = _softmax_masked(s, vis) @ v
    if pv_format is None:
        return dense
    x = s.masked_fill(~vis, float("-inf"))
    m = x.amax(-1, keepdim=True).detach()
    has = vis.any(-1, keepdim=True)
    e = torch.where(vis, torch.exp(x - torch.where(has, m, 0.0)), 0.0)
    L = pv_levels(pv_format)
    l_sum = torch.where(has, e.sum(-1, keepdim=True), 1.0)
    return _ste(dense, (quantize_p(e.detach(), pv_format) @ v.detach()) / (L * l_sum.detach()))


def attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, return_lse=False, spec=None):
    """Reference of :func:`pykd.attention` (materializes the (N_q, N_k) maps)."""
    B, H, N_q, D = q.shape
    N_k = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(H // k.shape[1], 1)
    v = v.repeat_interleave(H // v.shape[1], 1)
    vis = _visible(B, N_q, N_k, causal, key_padding_mask, q.device)
    s, vis = student_scores(q, k, scale, vis, spec)
    out = quantized_softmax_v(s, vis, v, spec.pv_format if spec is not None else None)
    if not return_lse:
        return out
    lse = torch.logsumexp(s.masked_fill(~vis, float("-inf")), -1)
    return out, torch.where(vis.any(-1), lse, float("inf"))


def attention_kd(
    q_s,
    k_s,
    v_s,
    q_t,
    k_t,
    *,
    divergence="kl",
    causal=False,
    key_padding_mask=None,
    scale_s=None,
    scale_t=None,
    temperature=1.0,
    teacher_heads=None,
    reduction="mean",
    student_spec=None,
    teacher_map=None,
):
    """Reference of :func:`pykd.attention_kd`: (out, loss); out is None when v_s is None.
    teacher_map: a "uint8" capture's codes (B, H_t, N_q, N_k) in place of q_t, k_t: t = ln(code)."""
    B, H, N_q, D_s = q_s.shape
    N_k = k_s.shape[2]
    scale_s = 1.0 / math.sqrt(D_s) if scale_s is None else scale_s
    tau = float(temperature)
    ks = k_s.repeat_interleave(H // k_s.shape[1], 1)
    th = list(range(H)) if teacher_heads is None else [int(x) for x in teacher_heads]
    vis = _visible(B, N_q, N_k, causal, key_padding_mask, q_s.device)
    s, vis = student_scores(q_s, ks, scale_s, vis, student_spec)
    if teacher_map is not None:
        t = torch.log(teacher_map[:, th].to(s.dtype))
    else:
        scale_t = 1.0 / math.sqrt(q_t.shape[3]) if scale_t is None else scale_t
        q_t, k_t = q_t.detach(), k_t.detach()
        kt = k_t.repeat_interleave(q_t.shape[1] // k_t.shape[1], 1)
        t = scale_t * q_t[:, th] @ kt[:, th].transpose(-1, -2)
    out = None
    if v_s is not None:
        pv = student_spec.pv_format if student_spec is not None else None
        out = quantized_softmax_v(s, vis, v_s.repeat_interleave(H // v_s.shape[1], 1), pv)
    if divergence == "mse_scores":
        d = torch.where(vis, s - t, 0.0)
        row = (d * d).sum(-1)
    else:
        lps, lpt = _log_softmax_masked(s / tau, vis), _log_softmax_masked(t / tau, vis)
        ps, pt = _softmax_masked(s / tau, vis), _softmax_masked(t / tau, vis)
        if divergence == "kl":  # pt = 0 (a 0 code of a teacher map) adds nothing; a NaN pt stays NaN
            row = torch.where(pt == 0, 0.0, pt * (lpt - lps)).sum(-1)
        elif divergence == "reverse_kl":
            row = (ps * (lps - lpt)).sum(-1)
        elif divergence == "mse":
            row = ((ps - pt) ** 2).sum(-1)
        else:
            raise ValueError(divergence)
    counted = _counted_rows(vis, key_padding_mask, N_q, N_k).expand(B, H, N_q)
    row = torch.where(counted, row, 0.0)
    if reduction == "none":
        loss = row
    elif reduction == "sum":
        loss = row.sum()
    else:
        if divergence == "mse_scores":
            n = (vis & counted[..., None]).sum()
        else:
            n = counted.sum()
        loss = row.sum() / n.clamp_min(1)
    return out, loss


def attention_divergence(q_s, k_s, q_t, k_t, **kwargs):
    """Reference of :func:`pykd.attention_divergence`."""
    return attention_kd(q_s, k_s, None, q_t, k_t, **kwargs)[1]


def relation_kd(x_s, x_t, num_relation_heads, *, key_padding_mask=None, divergence="kl", temperature=1.0,
                reduction="mean"):  # fmt: skip
    """Reference of :func:`pykd.relation_kd` (MiniLMv2 self-relations of x_s and x_t)."""
    R = num_relation_heads

    def split(x):
        B, N, X = x.shape
        return x.reshape(B, N, R, X // R).transpose(1, 2)

    xs, xt = split(x_s), split(x_t)
    return attention_divergence(
        xs, xs, xt, xt, key_padding_mask=key_padding_mask, divergence=divergence,
        scale_s=1.0 / math.sqrt(xs.shape[-1]), scale_t=1.0 / math.sqrt(xt.shape[-1]),
        temperature=temperature, reduction=reduction,
    )  # fmt: skip


def attention_capture_topk(q, k, K, *, causal=False, key_padding_mask=None, scale=None):
    """Reference of ``pykd.attention(..., capture="topk", capture_k=K)``: (probs, indices) of each
    row's K largest attention probabilities, descending."""
    B, H, N_q, D = q.shape
    N_k = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(H // k.shape[1], 1)
    vis = _visible(B, N_q, N_k, causal, key_padding_mask, q.device)
    p = _softmax_masked(scale * q @ k.transpose(-1, -2), vis)
    top = p.topk(K, -1)
    return top.values, top.indices


def attention_capture_uint8(q, k, *, causal=False, key_padding_mask=None, scale=None):
    """Reference of ``pykd.attention(..., capture="uint8")``: round(255 exp(t - rowmax)), uint8, 0 where
    hidden."""
    B, H, N_q, D = q.shape
    N_k = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(H // k.shape[1], 1)
    vis = _visible(B, N_q, N_k, causal, key_padding_mask, q.device).expand(B, H, N_q, N_k)
    t = (scale * q @ k.transpose(-1, -2)).masked_fill(~vis, float("-inf"))
    m = t.amax(-1, keepdim=True)
    return (255.0 * torch.exp(t - torch.where(m > float("-inf"), m, 0.0))).round().to(torch.uint8)


def attention_kd_topk(q_s, k_s, v_s, probs, indices, *, causal=False, key_padding_mask=None, scale_s=None,
                      teacher_heads=None, reduction="mean", student_spec=None):  # fmt: skip
    """Reference of ``pykd.attention_kd(q_s, k_s, v_s, teacher=<topk capture>)``: (out, loss) with
    row_i = sum_k p_t,k log(p_t,k / p_s,k) + T log(T / Q), T = 1 - sum_k p_t,k, Q the student's mass
    outside the K keys (summed directly)."""
    B, H, N_q, D_s = q_s.shape
    N_k = k_s.shape[2]
    scale_s = 1.0 / math.sqrt(D_s) if scale_s is None else scale_s
    if teacher_heads is not None:
        th = [int(x) for x in teacher_heads]
        probs, indices = probs[:, th], indices[:, th]
    ks = k_s.repeat_interleave(H // k_s.shape[1], 1)
    vis = _visible(B, N_q, N_k, causal, key_padding_mask, q_s.device)
    s, vis = student_scores(q_s, ks, scale_s, vis, student_spec)
    out = None
    if v_s is not None:
        pv = student_spec.pv_format if student_spec is not None else None
        out = quantized_softmax_v(s, vis, v_s.repeat_interleave(H // v_s.shape[1], 1), pv)
    lps = _log_softmax_masked(s, vis)
    in_k = torch.zeros(s.shape, dtype=torch.bool, device=s.device).scatter_(-1, indices, True)
    outside = vis & ~in_k

    def lse(mask):  # rows with nothing under mask give 0 (unused), never a NaN gradient
        return torch.logsumexp(
            torch.where(mask.any(-1, keepdim=True), s.masked_fill(~mask, float("-inf")), 0.0), -1
        )

    lq = lse(outside) - lse(vis)
    p = probs.to(s.dtype)
    tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    pos = p > 0
    row = torch.where(pos, p * (torch.log(torch.where(pos, p, 1.0)) - lps.gather(-1, indices)), 0.0).sum(-1)
    use_t = (tail > 0) & outside.any(-1)
    row = row + torch.where(use_t, tail * (torch.log(torch.where(use_t, tail, 1.0)) - lq), 0.0)
    counted = _counted_rows(vis, key_padding_mask, N_q, N_k).expand(B, H, N_q)
    row = torch.where(counted, row, 0.0)
    if reduction == "none":
        return out, row
    if reduction == "sum":
        return out, row.sum()
    return out, row.sum() / counted.sum().clamp_min(1)
