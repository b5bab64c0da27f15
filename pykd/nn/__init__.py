"""Module wrappers of the pykd ops, for use as loss modules in a training loop."""

from __future__ import annotations

import torch

from ..attention_kd import relation_kd
from ..fused_linear_kd import fused_linear_kd_loss
from ..kd_loss import kd_loss
from ..topk_kd_loss import topk_kd_loss


class KDLoss(torch.nn.Module):
    """Module form of :func:`pykd.kd_loss`; the options are fixed at construction.

    ``forward(student_logits, teacher_logits, target=None, num_items_in_batch=None)``; shapes as in
    :func:`pykd.kd_loss`.
    """

    def __init__(
        self,
        *,
        divergence: str = "kl",
        temperature: float = 1.0,
        alpha: float | None = None,
        beta: float = 0.5,
        ignore_index: int = -100,
        reduction: str = "mean",
        scale_by_t2: bool = True,
        return_components: bool = False,
    ):
        super().__init__()
        self.divergence = divergence
        self.temperature = temperature
        self.alpha = alpha
        self.beta = beta
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.scale_by_t2 = scale_by_t2
        self.return_components = return_components

    def forward(self, student_logits, teacher_logits, target=None, num_items_in_batch=None):
        return kd_loss(
            student_logits,
            teacher_logits,
            target,
            divergence=self.divergence,
            temperature=self.temperature,
            alpha=self.alpha,
            beta=self.beta,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            scale_by_t2=self.scale_by_t2,
            num_items_in_batch=num_items_in_batch,
            return_components=self.return_components,
        )

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, temperature={self.temperature}, alpha={self.alpha}, "
            f"reduction={self.reduction!r}"
        )


class RelationKDLoss(torch.nn.Module):
    """MiniLMv2 relation distillation, module form of :func:`pykd.relation_kd`.

    ``forward(student, teacher, key_padding_mask=None)``: student and teacher are (B, N, X) tensors,
    or equal-length sequences of them (e.g. a layer's (q, k, v)); the loss is the sum of
    ``relation_kd`` over the pairs (Q-Q + K-K + V-V relations in MiniLMv2).
    """

    def __init__(self, num_relation_heads: int, *, divergence: str = "kl", temperature: float = 1.0,
                 reduction: str = "mean"):  # fmt: skip
        super().__init__()
        self.num_relation_heads = num_relation_heads
        self.divergence = divergence
        self.temperature = temperature
        self.reduction = reduction

    def forward(self, student, teacher, key_padding_mask=None):
        pairs = list(zip(student, teacher)) if isinstance(student, (list, tuple)) else [(student, teacher)]
        if isinstance(student, (list, tuple)) and (
            not isinstance(teacher, (list, tuple)) or len(student) != len(teacher) or not pairs
        ):
            raise ValueError("student and teacher must be tensors or non-empty sequences of equal length")
        total = None
        for x_s, x_t in pairs:
            loss = relation_kd(
                x_s, x_t, self.num_relation_heads, key_padding_mask=key_padding_mask,
                divergence=self.divergence, temperature=self.temperature, reduction=self.reduction,
            )  # fmt: skip
            total = loss if total is None else total + loss
        return total

    def extra_repr(self) -> str:
        return f"num_relation_heads={self.num_relation_heads}, divergence={self.divergence!r}"


class FusedLinearKDLoss(torch.nn.Module):
    """Module form of :func:`pykd.fused_linear_kd_loss` (lm_head matmuls fused with the loss, the
    (BT, V) logits never materialized); the options are fixed at construction.

    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, target=None, *,
    student_bias=None, teacher_bias=None, num_items_in_batch=None)``: hidden (..., H_s) / (..., H_t),
    weights (V, H_s) / (V, H_t) as ``lm_head.weight``; pass ``lm_head.bias`` as the biases if any.
    """

    def __init__(self, *, divergence: str = "kl", temperature: float = 1.0, alpha: float | None = None,
                 beta: float = 0.5, ignore_index: int = -100, reduction: str = "mean",
                 scale_by_t2: bool = True, return_components: bool = False,
                 chunk_size: int | None = None):  # fmt: skip
        super().__init__()
        self.options = dict(
            divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
            ignore_index=ignore_index, reduction=reduction, scale_by_t2=scale_by_t2,
            return_components=return_components, chunk_size=chunk_size,
        )  # fmt: skip

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, target=None, *,
                student_bias=None, teacher_bias=None, num_items_in_batch=None):  # fmt: skip
        return fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, target,
            student_bias=student_bias, teacher_bias=teacher_bias,
            num_items_in_batch=num_items_in_batch, **self.options,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class TopKKDLoss(torch.nn.Module):
    """Module form of :func:`pykd.topk_kd_loss` (a teacher given as top-K log-probabilities).

    ``forward(student_logits, teacher_topk_logprobs, teacher_topk_indices, target=None,
    num_items_in_batch=None)``; shapes as in :func:`pykd.topk_kd_loss`.
    """

    def __init__(self, *, temperature: float = 1.0, alpha: float | None = None, tail: bool = True,
                 ignore_index: int = -100, reduction: str = "mean", scale_by_t2: bool = True,
                 return_components: bool = False):  # fmt: skip
        super().__init__()
        self.options = dict(
            temperature=temperature, alpha=alpha, tail=tail, ignore_index=ignore_index,
            reduction=reduction, scale_by_t2=scale_by_t2, return_components=return_components,
        )  # fmt: skip

    def forward(self, student_logits, teacher_topk_logprobs, teacher_topk_indices, target=None,
                num_items_in_batch=None):  # fmt: skip
        return topk_kd_loss(
            student_logits, teacher_topk_logprobs, teacher_topk_indices, target,
            num_items_in_batch=num_items_in_batch, **self.options,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


__all__ = ["FusedLinearKDLoss", "KDLoss", "RelationKDLoss", "TopKKDLoss"]
