"""``pykd.attention_kd`` and friends: the student's flash attention and the attention-map divergence
to a teacher in one pass, with O(N) memory (DESIGN.md section 5).

The op ``pykd::attention_kd_fwd`` returns the student's attention output, the per-row divergence and
the O(B·H·N) row statistics; ``pykd::attention_kd_bwd`` recomputes the score tiles from them and
returns dq, dk, dv; ``pykd::attention_kd_loss`` is the forward op and the loss's reduction in one op.
CPU tensors run ``csrc/attention_kd.cpp``, CUDA tensors ``kernels/attention_kd.py``; the ops' autograd
is C++ (``csrc/attention_kd.cpp``) for every device.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from . import _backend, _checks
from . import capture as _capture
from ._backend import has_cpp
from .capture import AttentionCapture
from .sparse_quant import AttentionSpec, student_args

_DIVERGENCES = ("kl", "reverse_kl", "mse", "mse_scores")
_MAX_HEAD_DIM = 256


def _check_4d(name: str, x):
    """x's shape, after checking it is a 4-D float tensor of head dim 1 to 256."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _checks.FLOAT_DTYPES:
        _checks.tensor(name, x, float_dtype=True)  # raises, naming the argument
    shape = x.shape
    if len(shape) != 4:
        raise ValueError(f"{name} must be 4-D (B, H, N, D), got shape {tuple(shape)}")
    if not 1 <= shape[3] <= _MAX_HEAD_DIM:
        raise ValueError(f"{name} head dim must be in [1, {_MAX_HEAD_DIM}], got {shape[3]}")
    return shape


def _check_qkv(prefix: str, q, k, v=None) -> None:
    """Shapes of one model's q (B, H, N_q, D), k and v (B, H_kv, N_k, D). (Lean: it runs before every
    call, and at small shapes a call's host time is what users measure.)"""
    qs, ks = _check_4d("q" + prefix, q), _check_4d("k" + prefix, k)
    if q.dtype != k.dtype:
        raise TypeError(f"k{prefix} must have the dtype of q{prefix} ({q.dtype}), got {k.dtype}")
    if ks[0] != qs[0] or ks[3] != qs[3]:
        raise ValueError(
            f"k{prefix} must have shape (B={qs[0]}, H_kv, N_k, D={qs[3]}) to match q{prefix} {tuple(qs)}, "
            f"got {tuple(ks)}"
        )
    if ks[1] < 1 or qs[1] % ks[1]:
        raise ValueError(f"k{prefix} heads ({ks[1]}) must divide q{prefix} heads ({qs[1]}) (GQA)")
    if v is not None:
        vs = _check_4d("v" + prefix, v)
        if v.dtype != q.dtype:
            raise TypeError(f"v{prefix} must have the dtype of q{prefix} ({q.dtype}), got {v.dtype}")
        if vs != ks:
            raise ValueError(f"v{prefix} must have the shape of k{prefix} {tuple(ks)}, got {tuple(vs)}")


def _const(x):
    """x as a constant of the ops (the teacher's tensors): detached only when it needs it."""
    return x.detach() if x is not None and x.requires_grad else x


def _check_mask(key_padding_mask, B: int, N_k: int, device) -> None:
    if key_padding_mask is None:
        return
    _checks.tensor("key_padding_mask", key_padding_mask)
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be torch.bool (True = real token), got {key_padding_mask.dtype}"
        )
    if tuple(key_padding_mask.shape) != (B, N_k):
        raise ValueError(
            f"key_padding_mask must have shape (B, N_k) = ({B}, {N_k}), got {tuple(key_padding_mask.shape)}"
        )
    if key_padding_mask.device != device:
        raise ValueError(f"key_padding_mask must be on {device}, got {key_padding_mask.device}")


def _scale(name: str, scale, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    return _checks.real(name, scale)


def _teacher_heads(teacher_heads, H_s: int, H_t: int, device) -> torch.Tensor | None:
    if teacher_heads is None:
        if H_s != H_t:
            raise ValueError(
                f"student has {H_s} heads and teacher {H_t}: pass teacher_heads (the teacher head "
                "matched to each student head)"
            )
        return None
    if isinstance(teacher_heads, torch.Tensor):
        if teacher_heads.dtype.is_floating_point or teacher_heads.dtype == torch.bool:
            raise TypeError(f"teacher_heads must hold integers, got {teacher_heads.dtype}")
        if teacher_heads.dim() != 1 or teacher_heads.numel() != H_s:
            raise ValueError(
                f"teacher_heads must have length H_s={H_s}, got shape {tuple(teacher_heads.shape)}"
            )
        if not torch.compiler.is_compiling():
            lo, hi = int(teacher_heads.min()), int(teacher_heads.max())
            if lo < 0 or hi >= H_t:
                raise ValueError(f"teacher_heads values must be in [0, {H_t}), got {lo if lo < 0 else hi}")
        return teacher_heads.to(device=device, dtype=torch.int64)
    if not isinstance(teacher_heads, Sequence) or isinstance(teacher_heads, str):
        raise TypeError(
            f"teacher_heads must be a sequence of ints or a tensor, got {type(teacher_heads).__name__}"
        )
    if len(teacher_heads) != H_s:
        raise ValueError(f"teacher_heads must have length H_s={H_s}, got {len(teacher_heads)}")
    for x in teacher_heads:
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"teacher_heads must hold ints, got {type(x).__name__}")
        if not 0 <= x < H_t:
            raise ValueError(f"teacher_heads values must be in [0, {H_t}), got {x}")
    return torch.tensor([int(x) for x in teacher_heads], dtype=torch.int64, device=device)


def _prepare_student(q_s, k_s, v_s, causal, key_padding_mask, scale_s, reduction) -> float:
    """Checks the student's tensors and options; returns scale_s."""
    _check_qkv("_s", q_s, k_s, v_s)
    B, _, N_q, D_s = q_s.shape
    N_k = k_s.shape[2]
    if v_s is None:
        _checks.same_device(["q_s", "k_s"], [q_s, k_s])
    else:
        _checks.same_device(["q_s", "k_s", "v_s"], [q_s, k_s, v_s])
    _checks.choice("reduction", reduction, _checks.REDUCTIONS)
    _checks.boolean("causal", causal)
    if causal and N_q != N_k:
        raise ValueError(f"causal=True needs N_q == N_k, got {N_q} and {N_k}")
    _check_mask(key_padding_mask, B, N_k, q_s.device)
    _backend.require_cpp()
    return _scale("scale_s", scale_s, D_s)


def _prepare_teacher(q_s, k_s, q_t, k_t, divergence, scale_t, temperature, teacher_heads):
    """Checks the teacher's tensors and the divergence options; returns (temperature, scale_t, th)."""
    _check_qkv("_t", q_t, k_t)
    B, H_s, N_q, _ = q_s.shape
    N_k = k_s.shape[2]
    if q_t.shape[0] != B or q_t.shape[2] != N_q or k_t.shape[2] != N_k:
        raise ValueError(
            f"teacher q_t {tuple(q_t.shape)} / k_t {tuple(k_t.shape)} must match the student's batch "
            f"B={B} and sequence lengths N_q={N_q}, N_k={N_k}"
        )
    _checks.same_device(["q_s", "k_s", "q_t", "k_t"], [q_s, k_s, q_t, k_t])
    _checks.choice("divergence", divergence, _DIVERGENCES)
    temperature = _checks.temperature("temperature", temperature)
    scale_t = _scale("scale_t", scale_t, q_t.shape[3])
    th = _teacher_heads(teacher_heads, H_s, q_t.shape[1], q_s.device)
    return temperature, scale_t, th


def attention_kd(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    v_s: torch.Tensor,
    q_t: torch.Tensor | None = None,
    k_t: torch.Tensor | None = None,
    *,
    divergence: str = "kl",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale_s: float | None = None,
    scale_t: float | None = None,
    temperature: float = 1.0,
    teacher_heads: Sequence[int] | torch.Tensor | None = None,
    reduction: str = "mean",
    student_spec: AttentionSpec | None = None,
    teacher: AttentionCapture | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The student's attention output and its attention-map divergence to a teacher, fused.

    Per (b, h, i): ``s_ij = scale_s <q_s,i, k_s,j>``, ``t_ij = scale_t <q_t,i, k_t,j>`` over the keys j
    visible to query i; ``out_i = sum_j softmax(s_i)_j v_j`` (temperature never touches out);
    ``p_s = softmax(s_i / tau)``, ``p_t = softmax(t_i / tau)``. Row losses:
    ``"kl"`` KL(p_t || p_s) (MiniLM); ``"reverse_kl"`` KL(p_s || p_t); ``"mse"`` sum_j (p_s - p_t)^2;
    ``"mse_scores"`` sum_j (s_ij - t_ij)^2 on the scores before softmax (TinyBERT).

    One forward kernel sweeps the key tiles once per query tile; backward recomputes the tiles. No
    (N_q, N_k) map is ever stored: extra memory is O(B·H·N).

    Args:
        q_s: (B, H_s, N_q, D_s) student queries, float32/float16/bfloat16; D_s in [1, 256].
        k_s, v_s: (B, H_kv, N_k, D_s), H_kv dividing H_s (GQA); dtype of q_s.
        q_t: (B, H_t, N_q, D_t) teacher queries; D_t may differ from D_s, dtype from the student's.
        k_t: (B, H_tkv, N_k, D_t), H_tkv dividing H_t. Teacher tensors are constants: they never
            receive a gradient, even with requires_grad=True.
        divergence: "kl", "reverse_kl", "mse" or "mse_scores".
        causal: key j visible to query i iff j <= i (needs N_q == N_k).
        key_padding_mask: optional (B, N_k) bool, True = real token. With N_q == N_k it also marks
            the query rows that count in the loss; padded queries still get an output.
        scale_s, scale_t: score scales; default 1/sqrt(D).
        temperature: tau > 0 for the distributions of the divergence.
        teacher_heads: length-H_s ints (or int tensor): the teacher head matched to each student
            head. Without it H_s must equal H_t.
        reduction: "mean" over the (b, h, i) rows that count ("mse_scores": over the visible (i, j)
            pairs of those rows), "sum", or "none" ((B, H_s, N_q), rows that don't count 0).
        student_spec: optional :class:`pykd.AttentionSpec`: the student runs block-sparse, row-top-k
            and/or quantized attention (DESIGN.md section 6). The divergence is taken over the keys
            the student sees, the teacher renormalized over them.
        teacher: optional :class:`pykd.AttentionCapture` (from ``pykd.attention(..., capture=...)``)
            in place of q_t, k_t. An "lse" capture carries the teacher's q, k and scale (any
            divergence); a "topk" capture distills KL(teacher top-k + tail bucket || student)
            (divergence "kl", temperature 1, no sparse student_spec); a "uint8" capture is the
            teacher's stored map (divergence "kl" or "mse"). See :mod:`pykd.capture`.

    A row counts if its query is real and it sees at least one key; others give 0 loss and 0
    gradient, and rows that see no key give out = 0, never NaN.

    Returns:
        (out, loss): out (B, H_s, N_q, D_s) in q_s's dtype; loss fp32.
    """
    _checks.tensor("v_s", v_s, float_dtype=True)
    return _attention_kd(q_s, k_s, v_s, q_t, k_t, divergence, causal, key_padding_mask, scale_s, scale_t,
                         temperature, teacher_heads, reduction, student_spec, teacher)  # fmt: skip


def attention_divergence(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor | None = None,
    k_t: torch.Tensor | None = None,
    *,
    divergence: str = "kl",
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale_s: float | None = None,
    scale_t: float | None = None,
    temperature: float = 1.0,
    teacher_heads: Sequence[int] | torch.Tensor | None = None,
    reduction: str = "mean",
    student_spec: AttentionSpec | None = None,
    teacher: AttentionCapture | None = None,
) -> torch.Tensor:
    """The attention-map divergence of :func:`attention_kd` alone (no V, no output): the same kernels
    without the P·V product. Shapes and options as in :func:`attention_kd`; returns the fp32 loss."""
    return _attention_kd(q_s, k_s, None, q_t, k_t, divergence, causal, key_padding_mask, scale_s, scale_t,
                         temperature, teacher_heads, reduction, student_spec, teacher)[1]  # fmt: skip


def _teacher_capture(teacher, q_t, k_t, scale_t, q_s, k_s, causal, divergence, temperature, student_spec):
    """(q_t, k_t, scale_t, None) of q_t, k_t or an "lse" capture; (None, None, None, capture) of a
    checked "topk" or "uint8" capture."""
    if teacher is None:
        if q_t is None or k_t is None:
            raise TypeError("attention_kd needs the teacher: q_t and k_t, or teacher=<pykd.AttentionCapture>")
        return q_t, k_t, scale_t, None
    if not isinstance(teacher, AttentionCapture):
        raise TypeError(f"teacher must be a pykd.AttentionCapture, got {type(teacher).__name__}")
    if q_t is not None or k_t is not None or scale_t is not None:
        raise ValueError("pass either q_t, k_t (and scale_t) or teacher=<capture>, not both")
    if teacher.kind not in _capture.CAPTURES:
        raise ValueError(f"teacher.kind must be one of {', '.join(map(repr, _capture.CAPTURES))}, "
                         f"got {teacher.kind!r}")  # fmt: skip
    B, _, N_q, _ = q_s.shape
    lse = teacher.lse
    if lse.shape[0] != B or lse.shape[2] != N_q or teacher.num_keys != k_s.shape[2]:
        raise ValueError(
            f"teacher capture of (B, H_t, N_q)={tuple(lse.shape)} over {teacher.num_keys} keys does not "
            f"match the student's B={B}, N_q={N_q}, N_k={k_s.shape[2]}"
        )
    if lse.device != q_s.device:
        raise ValueError(f"teacher capture must be on {q_s.device}, got {lse.device}")
    if teacher.causal != causal:
        raise ValueError(f"teacher capture was taken with causal={teacher.causal}; got causal={causal}")
    if teacher.kind == "lse":
        return teacher.q, teacher.k, teacher.scale, None
    if teacher.kind == "uint8":
        codes = teacher.codes
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
            got = getattr(codes, "dtype", type(codes))
            raise TypeError(f'a "uint8" capture needs uint8 codes, got {got}')
        want = (*lse.shape, k_s.shape[2])
        if tuple(codes.shape) != want or codes.device != lse.device:
            raise ValueError(
                f'a "uint8" capture needs codes of shape (B, H_t, N_q, N_k) = {want} on {lse.device}, got '
                f"{tuple(codes.shape)} on {codes.device}"
            )
        if divergence not in ("kl", "mse"):
            raise ValueError(
                f'a "uint8" teacher capture distills divergence "kl" or "mse" (its 0 codes have no log), '
                f"got {divergence!r}"
            )
        if _checks.inspectable(codes) and codes.numel():
            empty = (codes.amax(-1) == 0) & (lse != float("inf"))  # sees keys, yet all its codes are 0
            if bool(empty.any()):
                rows = empty.nonzero()[:3].tolist()
                raise ValueError('a "uint8" capture row that sees keys must have a nonzero code (its largest '
                                 f"probability is 255); rows {rows} are all 0")  # fmt: skip
        return None, None, None, teacher
    _check_topk_capture(teacher, lse.shape, k_s.shape[2])
    if divergence != "kl":
        raise ValueError(f'a "topk" teacher capture distills divergence="kl" only, got {divergence!r}')
    if temperature != 1.0:
        raise ValueError(f'a "topk" teacher capture holds probabilities at temperature 1, got {temperature}')
    if student_spec is not None and (student_spec.block_mask is not None or student_spec.topk is not None):
        raise ValueError('a "topk" teacher capture cannot distill a sparse student (block_mask / topk)')
    return None, None, None, teacher


def _check_topk_capture(cap, lse_shape, N_k) -> None:
    """probs (float) and indices (integer, in [0, N_k)) of one shape (B, H_t, N_q, K), on lse's device."""
    probs, idx = cap.probs, cap.indices
    if not isinstance(probs, torch.Tensor) or not probs.dtype.is_floating_point:
        raise TypeError(f'a "topk" capture needs float probs, got {getattr(probs, "dtype", type(probs))}')
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f'a "topk" capture needs int32/int64 indices, got {getattr(idx, "dtype", type(idx))}')
    if probs.dim() != 4 or tuple(probs.shape[:3]) != tuple(lse_shape) or idx.shape != probs.shape:
        raise ValueError(
            f'a "topk" capture needs probs and indices of shape (B, H_t, N_q, K) with (B, H_t, N_q) = '
            f"{tuple(lse_shape)}, got {tuple(probs.shape)} and {tuple(idx.shape)}"
        )
    if probs.device != cap.lse.device or idx.device != cap.lse.device:
        raise ValueError(f'a "topk" capture\'s probs and indices must be on {cap.lse.device}')
    if _checks.inspectable(idx) and idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= N_k:
            bad = lo if lo < 0 else hi
            raise ValueError(f'a "topk" capture\'s indices must lie in [0, N_k={N_k}), got {bad}')
        p = probs.float()
        # 1e-3: a capture's exp(s - lse) may round just above 1 (lse from the kernel's fp32 sweep)
        if not bool(((p >= 0) & (p <= 1 + 1e-3)).all()) or bool((p.sum(-1) > 1 + 1e-3).any()):
            raise ValueError('a "topk" capture\'s probs must be probabilities: in [0, 1], no NaN, each row '
                             "summing to at most 1")  # fmt: skip
        # a key listed twice would be counted twice (a negative KL); entries of probability 0 (rows
        # that see fewer than K keys) may repeat
        keyed = torch.where(p > 0, idx.long(), -1 - torch.arange(idx.shape[-1], device=idx.device))
        srt = keyed.sort(-1).values
        if bool((srt[..., 1:] == srt[..., :-1]).any()):
            raise ValueError('a "topk" capture\'s indices must be distinct within a row (where probs > 0)')


def _attention_kd(q_s, k_s, v_s, q_t, k_t, divergence, causal, key_padding_mask, scale_s, scale_t,
                  temperature, teacher_heads, reduction, student_spec, teacher=None):  # fmt: skip
    q_t, k_t, scale_t, cap = _teacher_capture(teacher, q_t, k_t, scale_t, q_s, k_s, causal, divergence,
                                              temperature, student_spec)  # fmt: skip
    scale_s = _prepare_student(q_s, k_s, v_s, causal, key_padding_mask, scale_s, reduction)
    op_divergence = divergence
    if cap is None:
        temperature, scale_t, th = _prepare_teacher(q_s, k_s, q_t, k_t, divergence, scale_t, temperature,
                                                    teacher_heads)  # fmt: skip
    else:  # a stored teacher in place of q_t, k_t: a top-k capture or a uint8 map (pykd/capture.py)
        temperature = _checks.temperature("temperature", temperature)
        th = _teacher_heads(teacher_heads, q_s.shape[1], cap.heads, q_s.device)
        scale_t = 1.0
        if cap.kind == "topk":
            q_t, k_t, op_divergence = cap.probs, cap.indices, "topk_kl"
        else:
            q_t, k_t = cap.codes, None
    q_op, k_op, extra = student_args(student_spec, q_s, k_s, causal=causal, key_padding_mask=key_padding_mask,
                                     scale=scale_s, divergence=divergence, name="student_spec")  # fmt: skip
    # the forward kernel and the reduction in one op and one autograd node (csrc/attention_kd.cpp)
    out, loss = torch.ops.pykd.attention_kd_loss(
        q_op, k_op, v_s, _const(q_t), _const(k_t), key_padding_mask, th,
        op_divergence, causal, scale_s, scale_t, temperature, *extra, cap is not None and cap.kind == "uint8",
        reduction, key_padding_mask is not None and q_s.shape[2] == k_s.shape[2],
    )  # fmt: skip
    return (out if v_s is not None else None), loss


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    spec: AttentionSpec | None = None,
    capture: str | None = None,
    capture_k: int | None = None,
):
    """Flash attention: ``softmax(scale q k^T) v`` over visible keys, O(N) memory.

    Args:
        q: (B, H, N_q, D) float32/float16/bfloat16, D in [1, 256].
        k, v: (B, H_kv, N_k, D), H_kv dividing H (GQA); dtype of q.
        causal: key j visible to query i iff j <= i (needs N_q == N_k).
        key_padding_mask: optional (B, N_k) bool, True = real token.
        scale: default 1/sqrt(D).
        return_lse: also return the fp32 (B, H, N_q) log-sum-exp of the visible scores (+inf for a
            row that sees no key; such a row's output is 0). The lse carries no gradient.
        spec: optional :class:`pykd.AttentionSpec`: block-sparse, row-top-k and/or quantized
            attention (DESIGN.md section 6; see :mod:`pykd.sparse_quant`).
        capture: "lse", "topk" or "uint8" also returns a :class:`pykd.AttentionCapture` of this
            (dense, teacher) attention for later ``attention_kd(..., teacher=capture)``; see
            :mod:`pykd.capture`. capture_k: the K of "topk".

    Returns:
        out (B, H, N_q, D) in q's dtype, or (out, lse); with capture, (out, capture) or
        (out, lse, capture).
    """
    _check_qkv("", q, k, v)
    _checks.tensor("v", v, float_dtype=True)
    _checks.same_device(["q", "k", "v"], [q, k, v])
    _checks.boolean("causal", causal)
    _checks.boolean("return_lse", return_lse)
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal=True needs N_q == N_k, got {q.shape[2]} and {k.shape[2]}")
    _check_mask(key_padding_mask, q.shape[0], k.shape[2], q.device)
    scale = _scale("scale", scale, q.shape[3])
    _backend.require_cpp()
    if capture is not None:
        _checks.choice("capture", capture, _capture.CAPTURES)
        if spec is not None:
            raise ValueError("capture keeps a dense teacher's attention: spec must be None")
    elif capture_k is not None:
        raise ValueError('capture_k needs capture="topk"')
    q_op, k_op, extra = student_args(spec, q, k, causal=causal, key_padding_mask=key_padding_mask,
                                     scale=scale)  # fmt: skip
    out, _, lse, _ = torch.ops.pykd.attention_kd_fwd(
        q_op, k_op, v, None, None, key_padding_mask, None, "none", causal, scale, 1.0, 1.0, *extra
    )
    res = (out, lse) if return_lse else (out,)
    if capture is not None:
        res += (_capture.capture(capture, q, k, lse, scale, causal=causal, key_padding_mask=key_padding_mask,
                                 capture_k=capture_k),)  # fmt: skip
    return res if len(res) > 1 else out


def sparse_attention(q, k, v, *, block_mask=None, block_size=64, topk=None, causal=False,
                     key_padding_mask=None, scale=None):  # fmt: skip
    """Block-sparse and/or row-top-k attention: :func:`pykd.attention` with
    ``AttentionSpec(block_mask=block_mask, block_size=block_size, topk=topk)``. Shapes as in
    :func:`pykd.attention`; block_mask (B or 1, H or 1, ceil(N_q/block_size), ceil(N_k/block_size))
    bool. A row that sees no key gets out = 0."""
    spec = AttentionSpec(block_mask=block_mask, block_size=block_size, topk=topk)
    return attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, spec=spec)


def quantized_attention(q, k, v, *, qk_format="int8", pv_format="fp8_e4m3", smooth_k=True, block_size=64,
                        causal=False, key_padding_mask=None, scale=None):  # fmt: skip
    """Quantized attention (SageAttention-style, with a straight-through backward): :func:`pykd.attention`
    with ``AttentionSpec(qk_format=..., pv_format=..., smooth_k=..., block_size=...)``; pv_format None
    leaves P unquantized. Shapes as in :func:`pykd.attention`."""
    spec = AttentionSpec(qk_format=qk_format, pv_format=pv_format, smooth_k=smooth_k, block_size=block_size)
    return attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, spec=spec)


def relation_kd(
    x_s: torch.Tensor,
    x_t: torch.Tensor,
    num_relation_heads: int,
    *,
    key_padding_mask: torch.Tensor | None = None,
    divergence: str = "kl",
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """MiniLMv2 self-relation distillation: split the last dim of x_s (B, N, X_s) and x_t (B, N, X_t)
    into R relation heads (B, R, N, X/R) and return
    ``attention_divergence(x_s_r, x_s_r, x_t_r, x_t_r)`` with scales 1/sqrt(X/R). Use it on a
    layer's queries, keys and values (Q-Q, K-K, V-V relations); x_t is a constant.

    Args:
        x_s: (B, N, X_s) student; X_s divisible by num_relation_heads.
        x_t: (B, N, X_t) teacher; X_t divisible by num_relation_heads.
        num_relation_heads: R >= 1.
        key_padding_mask, divergence, temperature, reduction: as in :func:`attention_kd`.
    """
    R = _checks.integer("num_relation_heads", num_relation_heads)
    if R < 1:
        raise ValueError(f"num_relation_heads must be >= 1, got {R}")
    for name, x in (("x_s", x_s), ("x_t", x_t)):
        _checks.tensor(name, x, float_dtype=True)
        if x.dim() != 3:
            raise ValueError(f"{name} must be 3-D (B, N, X), got shape {tuple(x.shape)}")
        if x.shape[2] % R or not 1 <= x.shape[2] // R <= _MAX_HEAD_DIM:
            raise ValueError(
                f"num_relation_heads={R} must divide {name}'s width {x.shape[2]} into relation heads of "
                f"1 to {_MAX_HEAD_DIM} dims"
            )
    if x_t.shape[:2] != x_s.shape[:2]:
        raise ValueError(
            f"x_t must have the (B, N) of x_s {tuple(x_s.shape[:2])}, got {tuple(x_t.shape[:2])}"
        )

    def split(x):
        B, N, X = x.shape
        return x.reshape(B, N, R, X // R).transpose(1, 2)

    xs, xt = split(x_s), split(x_t)
    return attention_divergence(
        xs, xs, xt, xt, key_padding_mask=key_padding_mask, divergence=divergence,
        scale_s=1.0 / math.sqrt(xs.shape[-1]), scale_t=1.0 / math.sqrt(xt.shape[-1]),
        temperature=temperature, reduction=reduction,
    )  # fmt: skip


# ---------------------------------------------------------------- op registration


def _out_fake(q, v):
    """The attention output of both forward ops: q's shape (B, H, N_q, D), or empty without V."""
    return q.new_empty(q.shape) if v is not None else q.new_empty(0)


def _fwd_fake(q, k, v, q_t, k_t, mask, th, divergence, causal, scale_s, scale_t, temperature, *extra):
    B, H, N_q = q.shape[:3]
    f32 = dict(dtype=torch.float32)
    div = divergence != "none"
    return (
        _out_fake(q, v),
        q.new_empty((B, H, N_q) if div else (0,), **f32),
        q.new_empty((B, H, N_q), **f32),
        q.new_empty((B, H, N_q, 3) if div else (0,), **f32),
    )


def _loss_fake(q, k, v, q_t, k_t, mask, th, divergence, causal, scale_s, scale_t, temperature,
               block_mask=None, block_size=0, row_threshold=None, q_codes=None, k_codes=None,
               q_scale=None, k_scale=None, pv_format="none", teacher_map=False, reduction="mean",
               mask_queries=False):  # fmt: skip
    return _out_fake(q, v), q.new_empty(q.shape[:3] if reduction == "none" else (), dtype=torch.float32)


def _bwd_fake(grad_out, grad_row, q, k, v, q_t, k_t, mask, th, out, lse, stats, divergence, causal,
              scale_s, scale_t, temperature, *extra):  # fmt: skip
    # contiguous, as the kernels write them (empty_like would copy a transposed input's strides)
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape) if v is not None else q.new_empty(0),
    )


if has_cpp():
    torch.library.register_fake("pykd::attention_kd_fwd")(_fwd_fake)
    torch.library.register_fake("pykd::attention_kd_bwd")(_bwd_fake)
    torch.library.register_fake("pykd::attention_kd_loss")(_loss_fake)
    # autograd is registered in C++ (csrc/attention_kd.cpp): Python's costs more than the kernels
    if _backend.HAS_TRITON:
        from .kernels import attention_kd as _kattn

        _backend.triton_impl("attention_kd_fwd")(_kattn.attention_kd_fwd)
        _backend.triton_impl("attention_kd_bwd")(_kattn.attention_kd_bwd)
