"""``pykd.topk_kd_loss``: distillation from a teacher given as top-K log-probabilities (DESIGN.md §4).

The op ``pykd::topk_kd_loss_fwd`` computes the loss and the gradient with respect to the student logits
in one launch, like ``pykd::kd_loss_fwd``; backward scales that gradient by grad_output in place.
CPU tensors run ``csrc/topk_kd_loss.cpp``, CUDA tensors ``kernels/topk_kd_loss.py``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _backend, _checks, vocab_parallel
from ._backend import has_cpp
from .kd_loss import register_row_loss_autograd, row_loss_fake, row_loss_options


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float | None = None,
    tail: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    scale_by_t2: bool = True,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    return_components: bool = False,
    teacher_vocab_size: int | None = None,
    logit_softcap: float | None = None,
    logit_scale: float = 1.0,
    process_group=None,
):
    r"""Forward KL from a teacher known only by its top-K log-probabilities (an inference server's
    logprobs, an offline dump), fused with hard-label CE.

    Per row, q = softmax(f(s) / T) over the full vocabulary (f the student's logit map, as in
    :func:`pykd.kd_loss`; the teacher's log-probs are used as given), p_k = exp(teacher_topk_logprobs_k):

    - ``tail=True``: KL over the K entries plus one tail bucket,
      ``sum_k p_k log(p_k / q_k) + P log(P / Q)`` with P = 1 - sum_k p_k (clamped at 0) the
      teacher's missing mass and Q the student's mass outside the K indices. Q is summed over the
      non-K entries themselves, never taken as 1 - sum_k q_k, so it keeps its digits when tiny.
      There is no tail bucket when K == V or the student has no mass outside K.
    - ``tail=False``: the teacher renormalized over its K entries, p^ = softmax(logprobs), against
      the student's full-softmax probabilities at those indices: ``sum_k p^_k log(p^_k / q_k)``.

    ``loss_r = alpha * w * soft_r + (1 - alpha) * hard_r`` as in :func:`pykd.kd_loss` (w = T^2 if
    ``scale_by_t2``), hard_r the cross-entropy with ``target`` at T = 1.

    Args:
        student_logits: (..., V) float32/float16/bfloat16.
        teacher_topk_logprobs: (..., K) float, the teacher's log-probabilities **at the distillation
            temperature** (log_softmax(t / T), as dumped): T divides only the student's logits.
            Entries of -inf are probability 0. Treated as a constant (never gets a gradient).
        teacher_topk_indices: (..., K) int64 vocabulary indices in [0, V) (or [0,
            teacher_vocab_size)), distinct within a row, in any order; 1 <= K <= V (or
            teacher_vocab_size). Rows whose target is ``ignore_index`` are not checked (padding
            positions of a dump may hold anything).
        target: optional (...) int64 class indices or ``ignore_index``.
        temperature, alpha, ignore_index, reduction, scale_by_t2, num_items_in_batch,
        return_components: as in :func:`pykd.kd_loss`.
        tail: add the tail bucket (True) or renormalize the teacher over K (False).
        teacher_vocab_size: the teacher's vocabulary when it is larger than the student's V (a padded
            one). Entries at indices >= V are dropped and the teacher conditioned on the student's
            vocabulary: with ``tail=True`` the kept probabilities are divided by 1 - (the dropped
            top-K mass), the tail holding the rest (teacher mass at ids >= V outside the top K is
            unknown and stays in it); with ``tail=False`` the renormalization over K leaves them out.
        logit_softcap, logit_scale: the student's logit map, one number each (see
            :func:`pykd.kd_loss`).
        process_group: vocabulary parallelism, as in :func:`pykd.kd_loss`: each rank passes its slice
            of the student's logits and the same top-K tensors, whose indices stay global vocabulary
            ids (V is then the sum of the slices). DTensor logits sharded on the last dim are accepted.

    Returns:
        fp32 loss: 0-d, or (...) for ``reduction="none"``; ``(loss, soft, hard)`` with
        ``return_components``.

    Index and log-probability checks read the tensors (one host sync on CUDA); under
    ``torch.compile`` they are skipped and invalid indices are ignored by the kernel rather than
    read out of bounds. The gradient is computed in the forward, as in :func:`pykd.kd_loss`.
    """
    student_logits, _, target, group = vocab_parallel.unwrap(student_logits, None, target, process_group)
    opts = dict(temperature=temperature, alpha=alpha, tail=tail, ignore_index=ignore_index,
                reduction=reduction,
                scale_by_t2=scale_by_t2, num_items_in_batch=num_items_in_batch,
                return_components=return_components, teacher_vocab_size=teacher_vocab_size,
                logit_softcap=logit_softcap, logit_scale=logit_scale)  # fmt: skip
    lp, idx = teacher_topk_logprobs, teacher_topk_indices
    if group:
        # every rank checks its arguments and one all-gather agrees on them; the indices are
        # checked against the whole vocabulary (the sum of the slices) after it
        args, shard = vocab_parallel.setup(
            group, student_logits, lambda: _topk_args(student_logits, lp, idx, target, True, **opts)
        )
        lp, idx = check_topk(lp, idx, student_logits.shape[:-1], shard.total, tail, target, args[8],
                             teacher_vocab_size)  # fmt: skip
        vocab_parallel.check_target(args[3], shard, args[8])
        args = (args[0], lp, idx, *args[3:])
        loss, soft, hard, _ = torch.ops.pykd.topk_kd_loss_vp_fwd(*args, group, shard.start, shard.total)
    else:
        args, *_ = _topk_args(student_logits, lp, idx, target, False, **opts)
        loss, soft, hard, _ = torch.ops.pykd.topk_kd_loss_fwd(*args)
    lead = student_logits.shape[:-1]
    if reduction == "none":
        loss, soft, hard = loss.reshape(lead), soft.reshape(lead), hard.reshape(lead)
    if return_components:
        return loss, soft.detach(), hard.detach()
    return loss


def _topk_args(
    student_logits, teacher_topk_logprobs, teacher_topk_indices, target, sliced, *, temperature, alpha, tail,
    ignore_index, reduction, scale_by_t2, num_items_in_batch, return_components, teacher_vocab_size,
    logit_softcap, logit_scale,
):  # fmt: skip
    """Checks topk_kd_loss's arguments; returns (topk_kd_loss_fwd's arguments, V, rows, the options'
    signature). ``sliced``: a vocabulary slice, whose top-K tensors the caller checks afterwards."""
    _checks.tensor("student_logits", student_logits, float_dtype=True)
    _checks.tensor("teacher_topk_logprobs", teacher_topk_logprobs, float_dtype=True)
    _checks.tensor("teacher_topk_indices", teacher_topk_indices)
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError(
            f"student_logits must have shape (..., V) with V >= 1, got {tuple(student_logits.shape)}"
        )
    lead, V = student_logits.shape[:-1], student_logits.shape[-1]
    temperature, alpha, ignore_index, num_items = row_loss_options(
        lead,
        None if sliced else V,
        student_logits.device,
        ["student_logits", "teacher_topk_logprobs", "teacher_topk_indices"],
        [student_logits, teacher_topk_logprobs, teacher_topk_indices],
        target,
        temperature=temperature,
        alpha=alpha,
        ignore_index=ignore_index,
        reduction=reduction,
        scale_by_t2=scale_by_t2,
        num_items_in_batch=num_items_in_batch,
        return_components=return_components,
    )
    logit_map = _checks.logit_map(logit_softcap, logit_scale, teacher=False)
    lp, idx = teacher_topk_logprobs, teacher_topk_indices
    if not sliced:  # a slice's indices are checked once the whole vocabulary is known
        lp, idx = check_topk(lp, idx, lead, V, tail, target, ignore_index, teacher_vocab_size)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    args = (
        student_logits.reshape(-1, V),
        lp,
        idx,
        None if target is None else target.reshape(-1),
        num_items,
        temperature,
        alpha,
        tail,
        ignore_index,
        scale_by_t2,
        logit_map,
        reduction,
        compute_grad,
    )
    sig = ("topk_kd_loss", temperature, alpha, tail, ignore_index, scale_by_t2, logit_map, reduction,
           target is None, num_items is None, str(student_logits.dtype), compute_grad, tuple(lp.shape),
           teacher_vocab_size)  # fmt: skip
    return args, V, args[0].shape[0], sig


def check_topk(lp, idx, lead, V, tail, target, ignore_index, teacher_vocab_size=None):
    """Checks the teacher's top-K tensors against rows ``lead`` and vocabulary V (indices up to
    teacher_vocab_size when given); returns them as (rows, K) with each row's indices sorted ascending
    (the kernels' contract: indices >= V come last and are dropped) and the log-probs permuted alike."""
    _checks.boolean("tail", tail)
    V_t = V
    if teacher_vocab_size is not None:
        V_t = _checks.integer("teacher_vocab_size", teacher_vocab_size)
        if V_t < V:
            raise ValueError(f"teacher_vocab_size must be at least the student's vocabulary V={V}, got {V_t}")
    if idx.dtype != torch.int64:
        raise TypeError(f"teacher_topk_indices must be int64 (torch.long), got {idx.dtype}")
    if lp.dim() < 1 or lp.shape[:-1] != lead:
        raise ValueError(
            f"teacher_topk_logprobs must have shape {(*lead, 'K')} (one row per student row), "
            f"got {tuple(lp.shape)}"
        )
    K = lp.shape[-1]
    if not 1 <= K <= V_t:
        bound = f"V={V}" if V_t == V else f"teacher_vocab_size={V_t}"
        raise ValueError(f"teacher_topk_logprobs must have 1 <= K <= {bound} entries per row, got K={K}")
    if idx.shape != lp.shape:
        raise ValueError(
            f"teacher_topk_indices must have the shape of teacher_topk_logprobs {tuple(lp.shape)}, "
            f"got {tuple(idx.shape)}"
        )
    lp, idx = lp.detach().reshape(-1, K), idx.reshape(-1, K)
    idx, perm = idx.sort(dim=-1)
    lp = lp.gather(-1, perm)
    if not torch.compiler.is_compiling() and lp.numel():
        rows = target.reshape(-1) != ignore_index if target is not None else None
        _check_topk_values(lp, idx, V_t, tail, rows)
    return lp, idx


def _check_topk_values(lp, idx, V, tail, rows):
    bad_range = (idx[:, 0] < 0) | (idx[:, -1] >= V)
    bad_dup = (idx[:, 1:] == idx[:, :-1]).any(-1)
    # log-probabilities: not NaN, not above 0 beyond rounding; with a tail, mass at most 1
    bad_lp = lp.isnan().any(-1) | (lp > 1e-3).any(-1)
    if tail:
        bad_lp |= lp.float().exp().sum(-1) > 1.0 + 1e-3
    flags = torch.stack([bad_range, bad_dup, bad_lp])
    if rows is not None:
        flags = flags & rows
    any_range, any_dup, any_lp = flags.any(-1).tolist()  # one host sync for all checks
    if any_range:
        raise ValueError(
            f"teacher_topk_indices must be in [0, {V}), found {idx[flags[0]][0].tolist()} (a teacher with a "
            "larger vocabulary than the student's: pass teacher_vocab_size)"
        )
    if any_dup:
        raise ValueError("teacher_topk_indices must be distinct within a row, found a repeated index")
    if any_lp:
        raise ValueError(
            "teacher_topk_logprobs must be log-probabilities: no NaN, <= 0"
            + (", and their probabilities summing to at most 1 (tail=True)" if tail else "")
        )


@torch.library.custom_op("pykd::topk_kd_loss_vp_fwd", mutates_args=())
def _topk_kd_loss_vp_fwd(
    student: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_indices: torch.Tensor,
    target: Optional[torch.Tensor],
    num_items: Optional[torch.Tensor],
    temperature: float,
    alpha: float,
    tail: bool,
    ignore_index: int,
    scale_by_t2: bool,
    logit_map: list[float],
    reduction: str,
    compute_grad: bool,
    group: str,
    vocab_start: int,
    vocab_total: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``topk_kd_loss_fwd`` on the vocabulary slice [vocab_start, vocab_start + V) of a vocab_total-entry
    vocabulary split over the process group named ``group`` (pykd.vocab_parallel)."""
    shard = vocab_parallel.shard(group, student.shape[1], vocab_start, vocab_total)
    return vocab_parallel.topk_loss_rows(
        student, topk_logprobs, topk_indices, target, num_items, temperature, alpha, tail, ignore_index,
        scale_by_t2, logit_map, reduction, compute_grad, shard,
    )  # fmt: skip


@_topk_kd_loss_vp_fwd.register_fake
def _(student, *args):
    return row_loss_fake(student, *args[:-3])


def _shard_fake(student, *args):
    """Fake kernel of a vocabulary-slice phase: (R, 10) stats or the (R, V) gradient."""
    R, V = student.shape
    if args[-3] == 2:
        return student.new_empty((R, V))
    return student.new_empty((R, 10), dtype=torch.float32)


if has_cpp():
    torch.library.register_fake("pykd::topk_kd_loss_fwd")(row_loss_fake)
    torch.library.register_fake("pykd::topk_kd_loss_shard")(_shard_fake)
    register_row_loss_autograd("topk_kd_loss", target=3, num_items=4, ignore_index=8, reduction=11)
    register_row_loss_autograd("topk_kd_loss_vp", target=3, num_items=4, ignore_index=8, reduction=11)
    if _backend.HAS_TRITON:
        from .kernels import topk_kd_loss as _ktopk

        _backend.triton_impl("topk_kd_loss_fwd")(_ktopk.topk_kd_loss_fwd)
        _backend.triton_impl("topk_kd_loss_shard")(_ktopk.topk_kd_loss_shard)
