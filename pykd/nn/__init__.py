"""Module wrappers of the pykd ops, for use as loss modules in a training loop."""

from __future__ import annotations

import torch

from .. import _checks
from ..attention_kd import relation_kd
from ..fused_linear_kd import fused_linear_kd_loss
from ..kd_loss import _DIVERGENCES, kd_loss
from ..topk_kd_loss import topk_kd_loss


class KDLoss(torch.nn.Module):
    """Module form of :func:`pykd.kd_loss`; the options are fixed at construction.

    ``forward(student_logits, teacher_logits, target=None, num_items_in_batch=None)``; shapes as in
    :func:`pykd.kd_loss`. ``process_group``: vocabulary-parallel logits (see :func:`pykd.kd_loss`).
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
        logit_softcap: float | tuple | None = None,
        logit_scale: float | tuple = 1.0,
        process_group=None,
    ):
        super().__init__()
        self.process_group = process_group
        self.logit_softcap = logit_softcap
        self.logit_scale = logit_scale
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
            logit_softcap=self.logit_softcap,
            logit_scale=self.logit_scale,
            process_group=self.process_group,
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
    ``process_group``: a column-parallel lm_head (see :func:`pykd.fused_linear_kd_loss`).
    """

    def __init__(self, *, divergence: str = "kl", temperature: float = 1.0, alpha: float | None = None,
                 beta: float = 0.5, ignore_index: int = -100, reduction: str = "mean",
                 scale_by_t2: bool = True, return_components: bool = False,
                 chunk_size: int | None = None, logit_softcap: float | tuple | None = None,
                 logit_scale: float | tuple = 1.0, process_group=None):  # fmt: skip
        super().__init__()
        self.process_group = process_group
        self.options = dict(
            divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
            ignore_index=ignore_index, reduction=reduction, scale_by_t2=scale_by_t2,
            return_components=return_components, chunk_size=chunk_size, logit_softcap=logit_softcap,
            logit_scale=logit_scale,
        )  # fmt: skip

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, target=None, *,
                student_bias=None, teacher_bias=None, num_items_in_batch=None):  # fmt: skip
        return fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, target,
            student_bias=student_bias, teacher_bias=teacher_bias,
            num_items_in_batch=num_items_in_batch, process_group=self.process_group, **self.options,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class TopKKDLoss(torch.nn.Module):
    """Module form of :func:`pykd.topk_kd_loss` (a teacher given as top-K log-probabilities).

    ``forward(student_logits, teacher_topk_logprobs, teacher_topk_indices, target=None,
    num_items_in_batch=None)``; shapes as in :func:`pykd.topk_kd_loss`. ``process_group``: vocabulary-
    parallel student logits (see :func:`pykd.topk_kd_loss`).
    """

    def __init__(self, *, temperature: float = 1.0, alpha: float | None = None, tail: bool = True,
                 ignore_index: int = -100, reduction: str = "mean", scale_by_t2: bool = True,
                 return_components: bool = False, teacher_vocab_size: int | None = None,
                 logit_softcap: float | None = None, logit_scale: float = 1.0,
                 process_group=None):  # fmt: skip
        super().__init__()
        self.process_group = process_group
        self.options = dict(
            temperature=temperature, alpha=alpha, tail=tail, ignore_index=ignore_index,
            reduction=reduction, scale_by_t2=scale_by_t2, return_components=return_components,
            teacher_vocab_size=teacher_vocab_size, logit_softcap=logit_softcap, logit_scale=logit_scale,
        )  # fmt: skip

    def forward(self, student_logits, teacher_topk_logprobs, teacher_topk_indices, target=None,
                num_items_in_batch=None):  # fmt: skip
        return topk_kd_loss(
            student_logits, teacher_topk_logprobs, teacher_topk_indices, target,
            num_items_in_batch=num_items_in_batch, process_group=self.process_group, **self.options,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class DistillationLoss(torch.nn.Module):
    """Weighted sum of distillation objectives, returning the total and each part for logging.

    ``forward(*, student_logits=None, teacher_logits=None, target=None, student_lm_head=None,
    teacher_lm_head=None, student_hidden=None, teacher_hidden=None, hidden_mask=None,
    attention_loss=None, relation_loss=None, num_items_in_batch=None) -> (total, parts)``:

    - **logit**: :func:`pykd.kd_loss` of (student_logits, teacher_logits, target), or, given
      ``student_lm_head=(hidden, weight[, bias])`` and ``teacher_lm_head=(...)`` instead,
      :func:`pykd.fused_linear_kd_loss` (the logits never materialized). Options: ``kd_options``.
    - **hidden**: student vs teacher hidden states (B, N, H) or equal-length sequences of them (layer
      pairs, averaged), over the real tokens of ``hidden_mask`` (B, N) bool: ``"mse"`` (per element),
      ``"cosine"`` (1 - cos per token) or ``"pooled_cosine"`` (1 - cos of the mean-pooled states,
      sentence-embedding style). With ``student_hidden_size != teacher_hidden_size`` a learned
      linear projection maps the student's states first (TinyBERT's fit_dense); it is a parameter
      of this module, so give it to the optimizer.
    - **attention**, **relation**: losses computed elsewhere (e.g. by
      :class:`pykd.integrations.transformers.AttentionDistiller`), weighted here.

    A part whose weight is 0 is skipped; a part with a positive weight needs its inputs (ValueError
    naming them otherwise). ``parts`` maps each computed part's name to its detached value.
    """

    HIDDEN_LOSSES = ("mse", "cosine", "pooled_cosine")

    def __init__(self, *, logit_weight: float = 1.0, kd_options: dict | None = None,
                 hidden_weight: float = 0.0, hidden_loss: str = "mse", student_hidden_size: int | None = None,
                 teacher_hidden_size: int | None = None, attention_weight: float = 0.0,
                 relation_weight: float = 0.0):  # fmt: skip
        super().__init__()
        weights = dict(logit=logit_weight, hidden=hidden_weight, attention=attention_weight,
                       relation=relation_weight)  # fmt: skip
        for name, w in weights.items():  # any real number (numpy scalars too), finite and >= 0
            weights[name] = _checks.real(f"{name}_weight", w, lo=0.0)
        if hidden_loss not in self.HIDDEN_LOSSES:
            raise ValueError(
                f"hidden_loss must be one of {', '.join(map(repr, self.HIDDEN_LOSSES))}, got {hidden_loss!r}"
            )
        kd_options = dict(kd_options or {})
        if kd_options.get("divergence", "kl") not in _DIVERGENCES:
            raise ValueError(f"kd_options['divergence'] must be one of {', '.join(_DIVERGENCES)}")
        self.weights = {k: float(v) for k, v in weights.items()}
        self.kd_options = kd_options
        self.hidden_loss = hidden_loss
        self.projection = None
        if (student_hidden_size is None) != (teacher_hidden_size is None):
            raise ValueError(
                "give both student_hidden_size and teacher_hidden_size (for the projection), or neither"
            )
        if student_hidden_size is not None and student_hidden_size != teacher_hidden_size:
            self.projection = torch.nn.Linear(student_hidden_size, teacher_hidden_size)

    def forward(self, *, student_logits=None, teacher_logits=None, target=None, student_lm_head=None,
                teacher_lm_head=None, student_hidden=None, teacher_hidden=None, hidden_mask=None,
                attention_loss=None, relation_loss=None, num_items_in_batch=None):  # fmt: skip
        parts = {}
        if self.weights["logit"] > 0:
            opts = dict(self.kd_options, num_items_in_batch=num_items_in_batch)
            if student_lm_head is not None or teacher_lm_head is not None:
                if student_lm_head is None or teacher_lm_head is None:
                    raise ValueError("the fused logit loss needs both student_lm_head and teacher_lm_head")
                hs, ws, *bs = student_lm_head
                ht, wt, *bt = teacher_lm_head
                parts["logit"] = fused_linear_kd_loss(
                    hs, ws, ht, wt, target, student_bias=bs[0] if bs else None,
                    teacher_bias=bt[0] if bt else None, **opts,
                )  # fmt: skip
            elif student_logits is not None and teacher_logits is not None:
                parts["logit"] = kd_loss(student_logits, teacher_logits, target, **opts)
            else:
                raise ValueError(
                    "logit_weight > 0 needs student_logits and teacher_logits (or student_lm_head and "
                    "teacher_lm_head); set logit_weight=0 to skip the logit loss"
                )
        if self.weights["hidden"] > 0:
            if student_hidden is None or teacher_hidden is None:
                raise ValueError("hidden_weight > 0 needs student_hidden and teacher_hidden")
            parts["hidden"] = self._hidden(student_hidden, teacher_hidden, hidden_mask)
        for name, value in (("attention", attention_loss), ("relation", relation_loss)):
            if self.weights[name] > 0:
                if value is None:
                    raise ValueError(f"{name}_weight > 0 needs {name}_loss")
                parts[name] = torch.as_tensor(value)
        if not parts:
            raise ValueError("DistillationLoss: every weight is 0, nothing to compute")
        total = sum(self.weights[k] * v for k, v in parts.items())
        return total, {k: v.detach() for k, v in parts.items()}

    def _hidden(self, hs, ht, mask):
        pairs = list(zip(hs, ht)) if isinstance(hs, (list, tuple)) else [(hs, ht)]
        if isinstance(hs, (list, tuple)) and (
            not isinstance(ht, (list, tuple)) or len(hs) != len(ht) or not pairs
        ):
            raise ValueError("student_hidden and teacher_hidden must be tensors or equal-length sequences")
        total = 0.0
        for s, t in pairs:
            if s.dim() != 3 or t.shape[:2] != s.shape[:2]:
                raise ValueError(
                    f"hidden states must be (B, N, H) with one (B, N), got {tuple(s.shape)}, {tuple(t.shape)}"
                )
            if self.projection is not None:
                s = self.projection(s)
            elif s.shape[-1] != t.shape[-1]:
                raise ValueError(
                    f"student hidden size {s.shape[-1]} != teacher's {t.shape[-1]}: build DistillationLoss "
                    "with student_hidden_size and teacher_hidden_size to learn a projection"
                )
            t = t.detach().to(s.dtype)
            m = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device) if mask is None else mask.bool()
            w = m.to(s.dtype)
            if self.hidden_loss == "pooled_cosine":
                den = w.sum(1, keepdim=True).clamp_min(1)
                ps, pt = (s * w[..., None]).sum(1) / den, (t * w[..., None]).sum(1) / den
                total = total + (1 - torch.nn.functional.cosine_similarity(ps, pt, dim=-1)).mean()
            elif self.hidden_loss == "cosine":
                per_tok = 1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)
                total = total + (per_tok * w).sum() / w.sum().clamp_min(1)
            else:
                per_tok = (s - t).pow(2).mean(-1)
                total = total + (per_tok * w).sum() / w.sum().clamp_min(1)
        return total / len(pairs)

    def extra_repr(self) -> str:
        return f"weights={self.weights}, hidden_loss={self.hidden_loss!r}"


__all__ = ["DistillationLoss", "FusedLinearKDLoss", "KDLoss", "RelationKDLoss", "TopKKDLoss"]
