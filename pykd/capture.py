"""Teacher attention capture (DESIGN.md section 6): keep a teacher's attention cheaply, distill from it
later.

``pykd.attention(q, k, v, capture="lse" | "topk", capture_k=K)`` returns ``(out, AttentionCapture)``:

- ``"lse"``: the fp32 (B, H, N_q) log-sum-exp of the teacher's rows, with (references to) its q and k
  and scale: ``attention_kd(..., teacher=capture)`` recomputes the teacher's scores from them in the
  fused kernels, exactly as if q_t, k_t had been passed. O(N·D) per head, never O(N^2).
- ``"topk"``: each row's K largest probabilities (descending) and their key indices, fp32 / int64
  (B, H, N_q, K), plus the lse. O(N·K) per head: store it and drop the teacher.
  ``attention_kd(q_s, k_s, v_s, teacher=capture)`` then distills with a tail bucket, as
  :func:`pykd.topk_kd_loss` does for logits: with T = 1 - sum_k p_t,k the teacher's mass outside
  the K keys and Q the student's,

      row_i = sum_k p_t,k log(p_t,k / p_s,k) + T log(T / Q).

  Q is the student's log-sum-exp over the keys outside the K (never 1 - sum_k p_s,k), so it keeps
  its digits when the student puts almost all its mass on the K keys. The top-k capture and its
  loss run as chunked PyTorch (query chunks against all keys, each chunk's scores recomputed in
  backward), O(chunk · N) memory: they are not fused kernels.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.checkpoint import checkpoint

from . import _checks
from .sparse_quant import chunk_rows, scores_chunk

CAPTURES = ("lse", "topk")


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionCapture:
    """A teacher's attention, kept for later distillation (see :mod:`pykd.capture`).

    Fields: ``kind`` ("lse" | "topk"); ``lse`` (B, H, N_q) fp32 (+inf for a row that sees no key);
    ``q``, ``k``, ``scale`` (kind "lse": the detached teacher q (B, H, N_q, D), k (B, H_kv, N_k, D));
    ``probs`` (B, H, N_q, K) fp32 and ``indices`` (B, H, N_q, K) int64 (kind "topk"; probabilities
    in descending order, 0 where a row sees fewer than K keys); ``causal`` and ``num_keys`` (N_k).
    """

    kind: str
    lse: torch.Tensor
    causal: bool
    num_keys: int
    scale: float
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    indices: torch.Tensor | None = None

    @property
    def heads(self) -> int:
        return self.lse.shape[1]


@torch.no_grad()
def capture(kind, q, k, lse, scale, *, causal, key_padding_mask, capture_k):
    """The :class:`AttentionCapture` of attention(q, k, .) whose lse the kernel returned."""
    _checks.choice("capture", kind, CAPTURES)
    q, k = q.detach(), k.detach()
    N_k = k.shape[2]
    if kind == "lse":
        if capture_k is not None:
            raise ValueError('capture_k is for capture="topk"; leave it None with capture="lse"')
        return AttentionCapture("lse", lse, causal, N_k, scale, q=q, k=k)
    K = _checks.integer("capture_k", capture_k) if capture_k is not None else None
    if K is None or not 1 <= K <= N_k:
        raise ValueError(f'capture="topk" needs capture_k in [1, N_k={N_k}], got {capture_k}')
    B, H, N_q, _ = q.shape
    probs = torch.empty((B, H, N_q, K), dtype=torch.float32, device=q.device)
    idx = torch.empty((B, H, N_q, K), dtype=torch.int64, device=q.device)
    rows = chunk_rows(B, H, N_k)
    qf, kf = q.float(), k.float()
    for i0 in range(0, N_q, rows):
        i1 = min(N_q, i0 + rows)
        s = scores_chunk(qf, kf, scale, i0, i1, causal=causal, key_padding_mask=key_padding_mask)
        top = s.topk(K, -1)
        probs[:, :, i0:i1] = torch.exp(top.values - lse[:, :, i0:i1, None])
        idx[:, :, i0:i1] = top.indices
    return AttentionCapture("topk", lse, causal, N_k, scale, probs=probs, indices=idx)


def _topk_rows(q, k, probs, idx, scale, i0, i1, causal, key_padding_mask):
    """(row loss, student sees a key) of query rows [i0, i1) against a top-k capture."""
    s = scores_chunk(q, k, scale, i0, i1, causal=causal, key_padding_mask=key_padding_mask)
    has = torch.isfinite(s).any(-1, keepdim=True)
    s = torch.where(has, s, 0.0)  # rows that see nothing: finite, not counted, no NaN gradient
    p = probs[:, :, i0:i1]
    ix = idx[:, :, i0:i1]
    tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    z = s.gather(-1, ix)
    s_out = s.scatter(-1, ix, float("-inf"))
    out_any = torch.isfinite(s_out).any(-1, keepdim=True)
    lse_out = torch.logsumexp(torch.where(out_any, s_out, 0.0), -1)
    lse_all = torch.logsumexp(s, -1)
    # sum_k p log p - sum_k p (z_k - lse) + T (log T - (lse_out - lse))
    pos = p > 0
    row = (torch.where(pos, p * (torch.log(torch.where(pos, p, 1.0)) - z), 0.0)).sum(-1)
    row = row + p.sum(-1) * lse_all
    use_t = (tail > 0) & out_any[..., 0]
    row = row + torch.where(use_t, tail * (torch.log(torch.where(use_t, tail, 1.0)) - lse_out + lse_all), 0.0)
    return row, has[..., 0]


def topk_capture_rows(q, k, cap: AttentionCapture, scale, teacher_heads, *, causal, key_padding_mask):
    """(B, H, N_q) row losses KL(teacher top-k + tail || student) and the rows that see a key."""
    probs, idx = cap.probs, cap.indices
    if teacher_heads is not None:
        probs, idx = probs[:, teacher_heads], idx[:, teacher_heads]
    B, H, N_q, _ = q.shape
    rows = chunk_rows(B, H, k.shape[2])
    qf, kf = q.float(), k.float()  # once, not per chunk
    parts, seen = [], []
    for i0 in range(0, N_q, rows):
        i1 = min(N_q, i0 + rows)
        r, h = checkpoint(_topk_rows, qf, kf, probs, idx, scale, i0, i1, causal, key_padding_mask,
                          use_reentrant=False)  # fmt: skip
        parts.append(r)
        seen.append(h)
    return torch.cat(parts, 2), torch.cat(seen, 2)


__all__ = ["AttentionCapture", "CAPTURES"]
