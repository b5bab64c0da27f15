"""Sparse and quantized student attention (DESIGN.md section 6): :class:`AttentionSpec` and the
pre-passes that turn a spec into the arguments of the attention_kd kernels. The public wrappers
``sparse_attention`` and ``quantized_attention`` live with ``attention`` in ``pykd.attention_kd``:
this module sits below it (sparse_quant <- capture <- attention_kd), never importing upward.

A spec changes how the *student's* attention is computed, inside the same fused kernels as dense
attention and attention distillation:

- block sparsity: a (B or 1, H or 1, ceil(N_q / block_size), ceil(N_k / block_size)) bool mask;
  False blocks are never computed, forward or backward (the gradient is exact).
- row top-k (Explicit Sparse Transformer): each query keeps its k largest visible scores; the rest
  are hidden. A pre-pass over (query chunk, all keys) score blocks, O(chunk · N_k) memory, puts each
  row's threshold midway between its k-th and (k+1)-th scores; tied scores are kept together.
- quantization-aware training: Q and K are quantized per block of ``block_size`` tokens (one fp32
  scale per (batch, head, block) = amax / 127 for int8, amax / 448 for fp8 e4m3; K first smoothed
  by subtracting its token mean, which no softmax row can see), the scores are computed from the
  codes, and P = exp(s - rowmax) is quantized to int8 (round(127 P)) or fp8 e4m3 (of 448 P) before
  P·V. Backward is straight-through: the quantizers are the identity, so the gradients are those of
  attention at the dequantized q and k with P from the quantized scores and
  Delta = rowsum(dO * out). CPU and the Triton interpreter run the same codes and scales as the GPU.
  The quantization is one kernel pass (op ``pykd::quantize_tokens``) after the token mean.

With a teacher (``pykd.attention_kd(..., student_spec=...)``) the teacher's scores are hidden
wherever the student's are, so the teacher is renormalized over the keys the student sees.
"""

from __future__ import annotations

import dataclasses

import torch

from . import _backend, _checks

QK_FORMATS = ("int8", "fp8_e4m3")
PV_FORMATS = ("int8", "fp8_e4m3")
_LEVELS = {"int8": 127.0, "fp8_e4m3": 448.0}
_CHUNK_ELEMS = 1 << 24  # scores per chunk of the pre-passes (row top-k, capture)


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionSpec:
    """How a student's attention is computed.

    Args:
        block_mask: optional bool (B or 1, H or 1, ceil(N_q / block_size), ceil(N_k / block_size));
            False blocks are skipped. Build one with :mod:`pykd.masks`.
        block_size: tokens per block of the mask and of the Q/K quantization scales; a power of two
            in [16, 128] (the kernels' tiles divide it).
        topk: keep each row's ``topk`` largest visible scores (>= 1), or None.
        qk_format: "int8", "fp8_e4m3" or None (Q and K unquantized).
        pv_format: "int8", "fp8_e4m3" or None (P unquantized before P·V).
        smooth_k: subtract K's token mean before quantizing it (only with qk_format).
    """

    block_mask: torch.Tensor | None = None
    block_size: int = 64
    topk: int | None = None
    qk_format: str | None = None
    pv_format: str | None = None
    smooth_k: bool = True

    def __post_init__(self):
        if self.block_mask is not None:
            _checks.tensor("block_mask", self.block_mask)
            if self.block_mask.dtype != torch.bool:
                raise TypeError(
                    f"block_mask must be torch.bool (True = computed), got {self.block_mask.dtype}"
                )
            if self.block_mask.dim() != 4:
                raise ValueError(
                    "block_mask must be 4-D (B or 1, H or 1, query blocks, key blocks), got shape "
                    f"{tuple(self.block_mask.shape)}"
                )
        bs = _checks.integer("block_size", self.block_size)
        if bs < 16 or bs > 128 or bs & (bs - 1):
            raise ValueError(
                f"block_size must be a power of two in [16, 128] (the kernels' tiles divide it), got {bs}"
            )
        if self.topk is not None and _checks.integer("topk", self.topk) < 1:
            raise ValueError(f"topk must be >= 1 or None, got {self.topk}")
        if self.qk_format is not None:
            _checks.choice("qk_format", self.qk_format, QK_FORMATS)
        if self.pv_format is not None:
            _checks.choice("pv_format", self.pv_format, PV_FORMATS)
        _checks.boolean("smooth_k", self.smooth_k)

    @property
    def is_dense(self) -> bool:
        return (
            self.block_mask is None
            and self.topk is None
            and self.qk_format is None
            and self.pv_format is None
        )


def quantize_tokens(x: torch.Tensor, fmt: str, block_size: int, *, smooth: bool = False):
    """Per-block quantization of x (B, H, N, D): one fp32 scale per (b, h, block of ``block_size``
    tokens), scale = amax / 127 (int8, codes round-half-even, in [-127, 127]) or amax / 448 (fp8 e4m3,
    round to nearest even); a block of zeros gets scale 1. With ``smooth`` the token mean is
    subtracted first. One kernel pass (op ``pykd::quantize_tokens``: C++ on CPU, Triton on CUDA)
    after the mean; the codes equal :func:`pykd.reference.quantize_tokens`'.

    Returns (codes (B, H, N, D) int8 or float8_e4m3fn, scales (B, H, ceil(N / block_size)) fp32,
    dequantized codes * scale (B, H, N, D) fp32).
    """
    mean = x.float().mean(2) if smooth else None  # as the reference computes it: same codes
    return torch.ops.pykd.quantize_tokens(x, mean, fmt, block_size)


def quantize_p(p: torch.Tensor, fmt: str) -> torch.Tensor:
    """The P·V operand of a quantized P in [0, 1]: round(127 P) (int8) or fp8 e4m3 of 448 P, as
    real numbers (divide the product by 127 or 448)."""
    if fmt == "int8":
        return (p * 127.0).round()
    return (p * 448.0).to(torch.float8_e4m3fn).to(p.dtype)


def pv_levels(fmt: str) -> float:
    return _LEVELS[fmt]


def _check_block_mask(bm: torch.Tensor, B: int, H: int, N_q: int, N_k: int, bs: int, device) -> None:
    want = (-(-N_q // bs), -(-N_k // bs))
    ok = bm.shape[0] in (1, B) and bm.shape[1] in (1, H) and tuple(bm.shape[2:]) == want
    if not ok:
        raise ValueError(
            f"block_mask must have shape (B or 1, H or 1, ceil(N_q/block_size), ceil(N_k/block_size)) = "
            f"({B} or 1, {H} or 1, {want[0]}, {want[1]}) for block_size={bs}, got {tuple(bm.shape)}"
        )
    if bm.device != device:
        raise ValueError(f"block_mask must be on {device}, got {bm.device}")


def _visible_chunk(B, H, i0, i1, N_k, causal, key_padding_mask, block_mask, bs, device):
    """(B or 1, H or 1, i1 - i0, N_k) bool visibility of the query rows [i0, i1), or None = all."""
    vis = None
    if key_padding_mask is not None:
        vis = key_padding_mask[:, None, None, :]
    if causal:
        c = torch.arange(N_k, device=device)[None, :] <= torch.arange(i0, i1, device=device)[:, None]
        vis = c if vis is None else vis & c
    if block_mask is not None:
        rows = block_mask[:, :, torch.arange(i0, i1, device=device) // bs]
        m = rows.repeat_interleave(bs, -1)[..., :N_k]
        vis = m if vis is None else vis & m
    return vis


def chunk_rows(B: int, H: int, N_k: int) -> int:
    """Query rows per chunk of a (B, H, rows, N_k) score pre-pass."""
    return max(1, _CHUNK_ELEMS // max(1, B * H * N_k))


def scores_chunk(q, k, scale, i0, i1, *, causal, key_padding_mask, block_mask=None, block_size=0):
    """(B, H, i1 - i0, N_k) fp32 scores of the query rows [i0, i1) of q (B, H, N_q, D) against all
    keys of k (B, H_kv, N_k, D), -inf where hidden. Pass fp32 q, k to convert them once."""
    B, H, _, D = q.shape
    H_kv, N_k = k.shape[1], k.shape[2]
    qc = q[:, :, i0:i1].float().reshape(B, H_kv, H // H_kv, i1 - i0, D)
    s = torch.matmul(qc, k.float()[:, :, None].transpose(-1, -2)).reshape(B, H, i1 - i0, N_k) * scale
    vis = _visible_chunk(B, H, i0, i1, N_k, causal, key_padding_mask, block_mask, block_size, q.device)
    return s if vis is None else s.masked_fill(~vis, float("-inf"))


@torch.no_grad()
def row_topk_threshold(q, k, topk, scale, *, causal=False, key_padding_mask=None, block_mask=None,
                       block_size=64):  # fmt: skip
    """(B, H, N_q) fp32 row thresholds of row top-k: midway between each row's ``topk``-th and
    (``topk`` + 1)-th largest visible scores (-inf when it sees at most ``topk`` keys), so the
    kernels' own rounding of a score cannot move it across. From fp32 score blocks of a chunk of
    queries against all keys. q (B, H, N_q, D), k (B, H_kv, N_k, D)."""
    B, H, N_q, _ = q.shape
    N_k = k.shape[2]
    thr = torch.full((B, H, N_q), float("-inf"), dtype=torch.float32, device=q.device)
    if topk >= N_k or B * H * N_q == 0:
        return thr
    qf, kf = q.float(), k.float()
    chunk = chunk_rows(B, H, N_k)
    for i0 in range(0, N_q, chunk):
        i1 = min(N_q, i0 + chunk)
        s = scores_chunk(qf, kf, scale, i0, i1, causal=causal, key_padding_mask=key_padding_mask,
                         block_mask=block_mask, block_size=block_size)  # fmt: skip
        top = s.topk(topk + 1, -1).values
        thr[:, :, i0:i1] = top[..., -2] * 0.5 + top[..., -1] * 0.5
    return thr


def student_args(spec, q, k, *, causal, key_padding_mask, scale, divergence=None, name="spec"):
    """(q_op, k_op, extra): the q and k the kernels differentiate (straight-through dequantized ones
    under quantization) and the op's trailing arguments (block_mask, block_size, row_threshold,
    q_codes, k_codes, q_scale, k_scale, pv_format)."""
    none = (None, 0, None, None, None, None, None, "none")
    if spec is None:
        return q, k, none
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"{name} must be a pykd.AttentionSpec or None, got {type(spec).__name__}")
    B, H, N_q, _ = q.shape
    N_k = k.shape[2]
    bs = spec.block_size
    bm = spec.block_mask
    if bm is not None:
        _check_block_mask(bm, B, H, N_q, N_k, bs, q.device)
    fp8 = "fp8_e4m3" in (spec.qk_format, spec.pv_format)
    if fp8 and q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
        raise ValueError(f"{name}: fp8_e4m3 needs a GPU of compute capability >= 8.9 (Ada, Hopper); use int8")
    codes = (None, None, None, None)
    if spec.qk_format is not None:
        if divergence == "mse_scores" and spec.smooth_k:
            raise ValueError(
                'divergence="mse_scores" compares raw scores, which K smoothing shifts per row: use '
                "smooth_k=False with a quantized student"
            )
        qc, qs, qd = quantize_tokens(q.detach(), spec.qk_format, bs)
        kc, ks, kd = quantize_tokens(k.detach(), spec.qk_format, bs, smooth=spec.smooth_k)
        # straight-through: forward values are the dequantized codes, the gradient passes unchanged
        q = q + (qd.to(q.dtype) - q).detach()
        k = k + (kd.to(k.dtype) - k).detach()
        codes = (qc, kc, qs, ks)
    thr = None
    if spec.topk is not None:  # from the scores the kernels compute: the codes', when quantized
        qs_, ks_ = (qd, kd) if codes[0] is not None else (q.detach(), k.detach())
        thr = row_topk_threshold(qs_, ks_, spec.topk, scale, causal=causal,
                                 key_padding_mask=key_padding_mask, block_mask=bm, block_size=bs)  # fmt: skip
    pv = spec.pv_format if spec.pv_format is not None else "none"
    return q, k, (bm, bs if (bm is not None or codes[0] is not None) else 0, thr, *codes, pv)


def _quantize_tokens_fake(x, mean, fmt, block_size):
    B, H, N, D = x.shape
    dt = torch.float8_e4m3fn if fmt == "fp8_e4m3" else torch.int8
    nb = -(-N // block_size)
    return (x.new_empty((B, H, N, D), dtype=dt), x.new_empty((B, H, nb), dtype=torch.float32),
            x.new_empty((B, H, N, D), dtype=torch.float32))  # fmt: skip


if _backend.has_cpp():
    torch.library.register_fake("pykd::quantize_tokens")(_quantize_tokens_fake)
    if _backend.HAS_TRITON:
        from .kernels import sparse_quant as _ksq

        _backend.triton_impl("quantize_tokens")(_ksq.quantize_tokens)


__all__ = [
    "AttentionSpec",
    "quantize_tokens",
    "row_topk_threshold",
]
