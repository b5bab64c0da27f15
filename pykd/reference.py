"""The math of every pykd op in plain PyTorch, materializing everything.

This is the spec the kernels are tested against (in float64). It is slow and memory-hungry on
purpose: it states the formulas of DESIGN.md as directly as possible.
"""

from __future__ import annotations

import math

import torch


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
):
    """Reference of :func:`pykd.kd_loss`; computes in the inputs' dtype (pass float64)."""
    s = student_logits
    t = teacher_logits.detach()
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
