"""Teacher attention capture (DESIGN.md section 6): keep a teacher's attention cheaply, distill from it
later.

``pykd.attention(q, k, v, capture="lse" | "topk" | "uint8", capture_k=K)`` returns
``(out, AttentionCapture)``:

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
  its digits when the student puts almost all its mass on the K keys. The loss runs in the fused
  attention_kd kernels (the capture's probs and indices take the place of q_t, k_t): one sweep
  accumulates the student's softmax over all keys and over the keys outside K, and
  d row / d s_ij = c p_s,ij - p_t,ij [j in K] - T p_out,ij [j not in K] (c = sum_k p_t,k + T,
  p_out the student's softmax outside K) is added to the flash-attention dS in backward. A key
  among a row's K that the student does not see (a different key_padding_mask) makes that row's
  loss infinite, as the KL is. Taking the capture is a chunked pre-pass (query chunks against all
  keys, O(chunk · N) memory, top-k by ``torch.topk``), run once per teacher.
- ``"uint8"``: the whole map at one byte per entry, code_ij = round(255 exp(t_ij - max_j t_ij))
  (B, H, N_q, N_k) uint8: each row relative to its largest probability, which gets 255; entries
  below 1/510 of it become 0. O(N^2) per head, a quarter of an fp32 map. ``attention_kd`` takes
  t_ij = ln code_ij as the teacher's scores (the softmax renormalizes, so the teacher is
  p_t ∝ code^(1/tau)) for divergence "kl" or "mse"; a 0 code is a key the teacher ignores
  (reverse KL and mse_scores would need its log, so they are refused). Any student spec works: the
  map is renormalized over the keys the student sees, as a live teacher is.
"""

from __future__ import annotations

import dataclasses

import torch

from . import _checks
from .sparse_quant import chunk_rows, scores_chunk

CAPTURES = ("lse", "topk", "uint8")
MAP_LEVELS = 255.0


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionCapture:
    """A teacher's attention, kept for later distillation (see :mod:`pykd.capture`).

    Fields: ``kind`` ("lse" | "topk" | "uint8"); ``lse`` (B, H, N_q) fp32 (+inf for a row that sees
    no key); ``q``, ``k``, ``scale`` (kind "lse": the detached teacher q (B, H, N_q, D), k
    (B, H_kv, N_k, D)); ``probs`` (B, H, N_q, K) fp32 and ``indices`` (B, H, N_q, K) int64 (kind
    "topk"; probabilities in descending order, 0 where a row sees fewer than K keys); ``codes``
    (B, H, N_q, N_k) uint8 (kind "uint8", 0 where hidden); ``causal`` and ``num_keys`` (N_k).
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
    codes: torch.Tensor | None = None

    @property
    def heads(self) -> int:
        return self.lse.shape[1]


@torch.no_grad()
def capture(kind, q, k, lse, scale, *, causal, key_padding_mask, capture_k):
    """The :class:`AttentionCapture` of attention(q, k, .) whose lse the kernel returned."""
    _checks.choice("capture", kind, CAPTURES)
    q, k = q.detach(), k.detach()
    N_k = k.shape[2]
    if kind != "topk" and capture_k is not None:
        raise ValueError(f'capture_k is for capture="topk"; leave it None with capture="{kind}"')
    if kind == "lse":
        return AttentionCapture("lse", lse, causal, N_k, scale, q=q, k=k)
    B, H, N_q, _ = q.shape
    qf, kf = q.float(), k.float()  # once, not per chunk
    rows = chunk_rows(B, H, N_k)
    chunks = [(i0, min(N_q, i0 + rows)) for i0 in range(0, N_q, rows)]

    def scores(i0, i1):
        return scores_chunk(qf, kf, scale, i0, i1, causal=causal, key_padding_mask=key_padding_mask)

    if kind == "uint8":
        codes = torch.empty((B, H, N_q, N_k), dtype=torch.uint8, device=q.device)
        for i0, i1 in chunks if N_k else ():  # no keys: an empty map
            s = scores(i0, i1)
            m = s.amax(-1, keepdim=True)
            e = torch.exp(s - torch.where(m > float("-inf"), m, 0.0))  # hidden: 0
            codes[:, :, i0:i1] = (e * MAP_LEVELS).round_().to(torch.uint8)
        return AttentionCapture("uint8", lse, causal, N_k, scale, codes=codes)
    K = _checks.integer("capture_k", capture_k) if capture_k is not None else None
    if K is None or not 1 <= K <= N_k:
        raise ValueError(f'capture="topk" needs capture_k in [1, N_k={N_k}], got {capture_k}')
    probs = torch.empty((B, H, N_q, K), dtype=torch.float32, device=q.device)
    idx = torch.empty((B, H, N_q, K), dtype=torch.int64, device=q.device)
    for i0, i1 in chunks:
        top = scores(i0, i1).topk(K, -1)
        probs[:, :, i0:i1] = torch.exp(top.values - lse[:, :, i0:i1, None])
        idx[:, :, i0:i1] = top.indices
    return AttentionCapture("topk", lse, causal, N_k, scale, probs=probs, indices=idx)


__all__ = ["AttentionCapture", "CAPTURES"]
