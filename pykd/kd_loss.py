"""``pykd.kd_loss``: fused logit-distillation loss (DESIGN.md section 3).

The op ``pykd::kd_loss_fwd`` computes the loss and the gradient with respect to the student logits in
one kernel launch; backward only scales that gradient by grad_output, in place (a no-op for the usual
scalar 1). CPU tensors run ``csrc/kd_loss.cpp``, CUDA tensors ``kernels/kd_loss.py``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _backend, _checks, vocab_parallel
from ._backend import has_cpp

_DIVERGENCES = ("kl", "reverse_kl", "soft_ce", "jsd", "tvd", "mse")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    divergence: str = "kl",
    temperature: float = 1.0,
    alpha: float | None = None,
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    scale_by_t2: bool = True,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    return_components: bool = False,
    logit_softcap: float | tuple[float | None, float | None] | None = None,
    logit_scale: float | tuple[float, float] = 1.0,
    process_group=None,
):
    r"""Knowledge-distillation loss between student and teacher logits, fused with hard-label CE.

    Per row r (z = f(logits) / T, p = softmax(z), f the logit map below):
    ``loss_r = alpha * w * soft_r + (1 - alpha) * hard_r`` with ``w = T**2`` if ``scale_by_t2``
    (Hinton) else 1, and ``w = 1`` for ``"mse"``. ``hard_r = logsumexp(s) - s[y]`` is cross-entropy
    with the target at T = 1.

    Divergences (``soft_r``): ``"kl"`` KL(p_t || p_s); ``"reverse_kl"`` KL(p_s || p_t); ``"soft_ce"``
    -sum p_t log p_s; ``"jsd"`` beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta)
    p_s; ``"tvd"`` 1/2 sum |p_s - p_t|; ``"mse"`` mean_j (s_j - t_j)^2 on raw logits (T unused).

    Logit map f (LLM families, applied inside the kernel, gradient through it): ``f(x) = a x`` with
    ``a = logit_scale`` (Cohere), then ``c tanh(f(x) / c)`` with ``c = logit_softcap`` (Gemma-2), on
    student and teacher logits before the temperature; the hard CE and "mse" see f(logits) too. A
    number applies to both models, a ``(student, teacher)`` pair to each (None: no softcap).

    Args:
        student_logits: (..., V) float32/float16/bfloat16.
        teacher_logits: (..., V_t), the student's leading shape and device, V_t >= V; any of those
            dtypes. A larger teacher vocabulary (a padded one) is conditioned on the student's:
            entries V and above are dropped, the teacher's softmax taken over its first V logits
            (read in place, no copy). Treated as a constant:
            it never receives a gradient, even with requires_grad=True. Entries of -inf (masked
            vocabulary) are exact for kl, soft_ce, jsd and tvd; reverse_kl and mse are +inf when
            the teacher masks an entry the student does not.
        target: optional (...) int64 class indices in [0, V) or ``ignore_index``. Rows whose target
            is ``ignore_index`` count for nothing (0 loss, 0 gradient). On CPU out-of-range targets
            raise ValueError; on CUDA they are checked only under ``pykd.set_debug(True)`` in eager
            mode (a host sync); otherwise an out-of-range target gives an undefined result.
        divergence: one of kl, reverse_kl, soft_ce, jsd, tvd, mse.
        temperature: T > 0, applied to both distributions (not to the hard CE).
        alpha: weight of the soft term in [0, 1]; None means 1.0 without target, 0.5 with one.
            alpha < 1 needs a target.
        beta: jsd mixture weight in (0, 1).
        ignore_index: target value of rows that count for nothing.
        reduction: ``"mean"`` (over rows that count, or ``num_items_in_batch``), ``"sum"`` or
            ``"none"`` (shape (...), ignored rows 0).
        scale_by_t2: multiply the soft term by T^2.
        num_items_in_batch: denominator for ``"mean"`` (gradient accumulation), a positive number or
            a 0-d tensor.
        return_components: also return the soft divergence and the hard CE (unweighted, reduced the
            same way, detached) for logging: ``(loss, soft, hard)``.
        logit_softcap: c > 0, a pair, or None.
        logit_scale: a > 0, or a pair.
        process_group: vocabulary parallelism (a ``torch.distributed`` group): each rank passes its
            contiguous slice (..., V_r) of both models' logits, slices in rank order, the same rows
            and target (global vocabulary ids) everywhere. The loss is the full-vocabulary loss on
            every rank, the gradient each rank's slice of it; the logits are never gathered (a few
            floats per row are all-reduced; see docs/distributed.md). DTensor logits sharded on the
            last dim (``Shard(-1)`` on a 1-D mesh) are accepted without a group.

    Returns:
        fp32 loss: 0-d, or (...) for ``reduction="none"``.

    The gradient is computed in the forward pass and stored in the student's dtype (one (rows, V)
    tensor; no fp32 (rows, V) temporaries). backward scales it in place, so backward through the
    same graph twice (``retain_graph=True``) raises; recompute the loss instead. For fp32/bf16 the
    "mean" 1/n is folded in the forward and ``loss.backward()`` costs nothing more; fp16 gradients
    are stored per row and backward applies ``grad_output / n`` in one pass, so a loss scaler's
    grad_output arrives before the 1/n could underflow fp16. On CPU a teacher whose dtype differs
    from the student's is read through an fp32 copy.
    """
    student_logits, teacher_logits, target, group = vocab_parallel.unwrap(
        student_logits, teacher_logits, target, process_group
    )
    opts = dict(divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
                ignore_index=ignore_index, reduction=reduction, scale_by_t2=scale_by_t2,
                num_items_in_batch=num_items_in_batch, return_components=return_components,
                logit_softcap=logit_softcap, logit_scale=logit_scale)  # fmt: skip
    if group:
        # every rank checks its arguments, then one all-gather agrees on them and on the slices
        args, shard = vocab_parallel.setup(
            group, student_logits, lambda: _kd_args(student_logits, teacher_logits, target, group, **opts)
        )
        vocab_parallel.check_target(args[2], shard, args[8])
        loss, soft, hard, _ = torch.ops.pykd.kd_loss_vp_fwd(*args, group, shard.start, shard.total)
    else:
        args, *_ = _kd_args(student_logits, teacher_logits, target, group, **opts)
        loss, soft, hard, _ = torch.ops.pykd.kd_loss_fwd(*args)
    lead = student_logits.shape[:-1]
    if reduction == "none":
        loss, soft, hard = loss.reshape(lead), soft.reshape(lead), hard.reshape(lead)
    if return_components:
        return loss, soft.detach(), hard.detach()
    return loss


def _kd_args(
    student_logits, teacher_logits, target, group, *, divergence, temperature, alpha, beta, ignore_index,
    reduction, scale_by_t2, num_items_in_batch, return_components, logit_softcap, logit_scale,
):  # fmt: skip
    """Checks kd_loss's arguments; returns (kd_loss_fwd's arguments, V, rows, the options' signature)."""
    _checks.tensor("student_logits", student_logits, float_dtype=True)
    _checks.tensor("teacher_logits", teacher_logits, float_dtype=True)
    if group and teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(
            "with process_group, teacher_logits must hold the same vocabulary slice as student_logits: "
            f"got {teacher_logits.shape[-1]} and {student_logits.shape[-1]} entries"
        )
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError(
            f"student_logits must have shape (..., V) with V >= 1, got {tuple(student_logits.shape)}"
        )
    if (
        teacher_logits.dim() != student_logits.dim()
        or teacher_logits.shape[:-1] != student_logits.shape[:-1]
        or teacher_logits.shape[-1] < student_logits.shape[-1]
    ):
        raise ValueError(
            f"teacher_logits must have shape {(*student_logits.shape[:-1], 'V_t')} with V_t >= "
            f"V={student_logits.shape[-1]} (student_logits' shape {tuple(student_logits.shape)}), "
            f"got {tuple(teacher_logits.shape)}"
        )
    logit_map = _checks.logit_map(logit_softcap, logit_scale)
    _checks.choice("divergence", divergence, _DIVERGENCES)
    if divergence == "jsd":
        beta = _checks.real("beta", beta, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    else:
        beta = _checks.real("beta", beta)
    V = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    temperature, alpha, ignore_index, num_items = row_loss_options(
        lead,
        None if group else V,  # a slice's targets range over the whole vocabulary
        student_logits.device,
        ["student_logits", "teacher_logits"],
        [student_logits, teacher_logits],
        target,
        temperature=temperature,
        alpha=alpha,
        ignore_index=ignore_index,
        reduction=reduction,
        scale_by_t2=scale_by_t2,
        num_items_in_batch=num_items_in_batch,
        return_components=return_components,
    )
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    args = (
        student_logits.reshape(-1, V),
        teacher_logits.detach()[..., :V].reshape(-1, V),
        None if target is None else target.reshape(-1),
        num_items,
        divergence,
        temperature,
        alpha,
        beta,
        ignore_index,
        scale_by_t2,
        logit_map,
        reduction,
        compute_grad,
    )
    sig = ("kd_loss", divergence, temperature, alpha, beta, ignore_index, scale_by_t2, logit_map, reduction,
           target is None, num_items is None, str(student_logits.dtype), compute_grad)  # fmt: skip
    return args, V, args[0].shape[0], sig


def row_loss_options(
    lead,
    V,
    device,
    names,
    tensors,
    target,
    *,
    temperature,
    alpha,
    ignore_index,
    reduction,
    scale_by_t2,
    num_items_in_batch,
    return_components,
):
    """Checks the options every row loss shares (kd_loss, topk_kd_loss and their fused-linear
    forms): rows of shape ``lead`` over a vocabulary of V (None: a vocabulary-parallel slice, whose
    targets pykd.vocab_parallel checks) on ``device``; ``names``/``tensors`` are
    the op's tensors, checked to share a device with target.
    Returns (temperature, alpha, ignore_index, num_items) with alpha's default resolved and
    num_items a 0-d tensor or None."""
    _checks.choice("reduction", reduction, _checks.REDUCTIONS)
    temperature = _checks.temperature("temperature", temperature)
    ignore_index = _checks.integer("ignore_index", ignore_index)
    _checks.boolean("scale_by_t2", scale_by_t2)
    _checks.boolean("return_components", return_components)
    names, tensors = list(names), list(tensors)
    if target is not None:
        _checks.tensor("target", target)
        if target.dtype != torch.int64:
            raise TypeError(f"target must be int64 (torch.long), got {target.dtype}")
        if target.shape != lead:
            raise ValueError(
                f"target must have shape {tuple(lead)} (one entry per row), got {tuple(target.shape)}"
            )
        names.append("target")
        tensors.append(target)
    if alpha is None:
        alpha = 0.5 if target is not None else 1.0
    alpha = _checks.real("alpha", alpha, lo=0.0, hi=1.0)
    if alpha < 1.0 and target is None:
        raise ValueError(f"alpha={alpha} < 1 weights a hard cross-entropy term, which needs target")
    num_items = None
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(
                    "num_items_in_batch must be a number or a one-element tensor, got shape "
                    f"{tuple(num_items_in_batch.shape)}"
                )
            num_items = num_items_in_batch.detach()
            # its value costs a host sync on a GPU: checked on CPU, and on a GPU under set_debug
            if _checks.inspectable(num_items) and (num_items.device.type == "cpu" or _backend.debug()):
                _check_num_items(float(num_items.float()))
        else:
            n = _checks.real("num_items_in_batch", num_items_in_batch)
            num_items = torch.tensor(n, dtype=torch.float32)
            _check_num_items(float(num_items))
        if num_items.device != device and not (num_items.device.type == "cpu" and num_items.dim() == 0):
            raise ValueError(
                f"num_items_in_batch must be on {device} or a CPU scalar, got {num_items.device}"
            )
    _checks.same_device(names, tensors)
    if V is not None and target is not None and _backend.debug() and _checks.inspectable(target):
        _check_target_range(target, V, ignore_index)  # C++ checks CPU targets itself
    _backend.require_cpp()
    return temperature, alpha, ignore_index, num_items


def _check_num_items(n: float) -> None:
    """num_items_in_batch as the kernels see it (fp32): a positive, finite count."""
    if not (0 < n < float("inf")):
        raise ValueError(f"num_items_in_batch must be a positive finite number (as fp32), got {n}")


def _check_target_range(target: torch.Tensor, V: int, ignore_index: int) -> None:
    counted = target[target != ignore_index]
    if counted.numel() and (bool((counted < 0).any()) or bool((counted >= V).any())):
        bad = counted[(counted < 0) | (counted >= V)][0].item()
        raise ValueError(f"target values must be in [0, {V}) or ignore_index={ignore_index}, found {bad}")


# ---------------------------------------------------------------- op registration


def register_row_loss_autograd(
    op: str, *, target: int, num_items: int, ignore_index: int, reduction: int
) -> None:
    """Autograd of a row-loss op ``pykd::<op>(student, ..., compute_grad) -> (loss, soft, hard, grad)``
    whose kernel stores d loss / d student in the forward; the ints are input positions.

    backward scales the stored gradient by grad_output (and by 1/n when the dtype deferred the
    "mean"), in place in eager mode."""

    def setup_context(ctx, inputs, output):
        student = inputs[0]
        _, soft, hard, grad = output
        ctx.mark_non_differentiable(soft, hard, grad)
        ctx.set_materialize_grads(False)  # else autograd builds a zero (rows, V) cotangent for `grad`
        ctx.save_for_backward(grad)
        # 0 rows (or V = 0): an empty gradient, not a missing one
        ctx.empty_shape = tuple(student.shape) if student.numel() == 0 else None
        ctx.n_inputs = len(inputs)
        ctx.consumed = False
        ctx.denominator = None  # the "mean" 1/n still to apply in backward (fp16 only)
        if inputs[reduction] == "mean" and not _backend.mean_scale_in_forward(student.dtype):
            ctx.denominator = _backend.reduction_denominator(
                inputs[target], student.shape[0], inputs[ignore_index], inputs[num_items], student.device
            )

    def backward(ctx, dloss, dsoft, dhard, dgrad):
        _backend.refuse_double_backward(op)
        none = (None,) * (ctx.n_inputs - 1)
        if ctx.consumed:
            raise RuntimeError(
                f"pykd.{op}: backward ran twice through the same graph; the gradient is computed in "
                "the forward and scaled in place, so recompute the loss instead of retain_graph=True"
            )
        if dloss is None:
            return (None, *none)
        (grad,) = ctx.saved_tensors
        if ctx.denominator is not None:
            dloss = dloss / ctx.denominator
        if ctx.empty_shape is not None:
            return (grad.new_zeros(ctx.empty_shape), *none)
        if grad.numel() == 0:
            raise RuntimeError(
                f"pykd.{op}: the forward ran without a gradient (the student did not require grad "
                "or grad mode was off); call it with grad enabled to backpropagate"
            )
        if type(grad) is torch.Tensor and not torch.compiler.is_compiling():
            # Eager: scale the forward's gradient in place (no second (rows, V) tensor).
            torch.ops.pykd.scale_rows_(grad, dloss)
            ctx.consumed = True
        else:
            # Traced (functional/fake tensors) or a tensor subclass: stay functional.
            grad = grad * (dloss.reshape(-1, 1) if dloss.dim() else dloss)
        return (grad, *none)

    torch.library.register_autograd(f"pykd::{op}_fwd", backward, setup_context=setup_context)


def _shard_fake(student, *args):
    """Fake kernel of a vocabulary-slice phase: (R, 8) stats, (R, 2) sums or the (R, V) gradient."""
    phase = args[-3]
    R, V = student.shape
    if phase == 3:
        return student.new_empty((R, V))
    return student.new_empty((R, 8 if phase == 1 else 2), dtype=torch.float32)


def row_loss_fake(student, *args):
    """Fake kernel of a row-loss op: (loss, soft, hard, grad) from the student's (R, V) shape;
    the last two arguments are reduction and compute_grad."""
    reduction, compute_grad = args[-2], args[-1]
    R, V = student.shape
    shape = (R,) if reduction == "none" else ()
    f32 = dict(dtype=torch.float32)
    grad = student.new_empty((R, V) if compute_grad else (0,))
    return (
        student.new_empty(shape, **f32),
        student.new_empty(shape, **f32),
        student.new_empty(shape, **f32),
        grad,
    )


@torch.library.custom_op("pykd::kd_loss_vp_fwd", mutates_args=())
def _kd_loss_vp_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: Optional[torch.Tensor],
    num_items: Optional[torch.Tensor],
    divergence: str,
    temperature: float,
    alpha: float,
    beta: float,
    ignore_index: int,
    scale_by_t2: bool,
    logit_map: list[float],
    reduction: str,
    compute_grad: bool,
    group: str,
    vocab_start: int,
    vocab_total: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``kd_loss_fwd`` on the vocabulary slice [vocab_start, vocab_start + V) of a vocab_total-entry
    vocabulary split over the process group named ``group`` (pykd.vocab_parallel)."""
    shard = vocab_parallel.shard(group, student.shape[1], vocab_start, vocab_total)
    return vocab_parallel.kd_loss_rows(
        student, teacher, target, num_items, divergence, temperature, alpha, beta, ignore_index,
        scale_by_t2, logit_map, reduction, compute_grad, shard,
    )  # fmt: skip


@_kd_loss_vp_fwd.register_fake
def _(student, *args):
    return row_loss_fake(student, *args[:-3])


if has_cpp():
    torch.library.register_fake("pykd::kd_loss_fwd")(row_loss_fake)
    torch.library.register_fake("pykd::kd_loss_shard")(_shard_fake)
    register_row_loss_autograd("kd_loss_vp", target=2, num_items=3, ignore_index=8, reduction=11)
    torch.library.register_fake("pykd::scale_rows_")(lambda x, scale: None)
    register_row_loss_autograd("kd_loss", target=2, num_items=3, ignore_index=8, reduction=11)
    if _backend.HAS_TRITON:
        from .kernels import common as _kcommon
        from .kernels import kd_loss as _kkd

        _backend.triton_impl("kd_loss_fwd")(_kkd.kd_loss_fwd)
        _backend.triton_impl("kd_loss_shard")(_kkd.kd_loss_shard)
        _backend.triton_impl("scale_rows_")(_kcommon.scale_rows_)
