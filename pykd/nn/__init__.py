"""Module wrappers of the pykd ops, for use as loss modules in a training loop."""

from __future__ import annotations

import torch

from ..kd_loss import kd_loss


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


__all__ = ["KDLoss"]
