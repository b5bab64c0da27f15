"""LLM distillation with Hugging Face's ``Trainer``: :class:`DistillationConfig` and
:class:`DistillationTrainer` (re-exported by :mod:`pykd.integrations.transformers`).

The student's loss comes from its final hidden states and lm_head weight through
:func:`pykd.fused_linear_kd_loss` (online teacher: the teacher's hidden states and lm_head too) or
:func:`pykd.fused_linear_topk_kd_loss` (offline: a :class:`pykd.data.TeacherCache`'s top-k), so no
(tokens x vocabulary) logits are materialized for either model. The models still run through their
own (wrapped) forward, so DDP's and FSDP's hooks see every step: :class:`pykd.llm.LMHeadTap` hands the
lm_head zero rows and keeps the hidden states, and :func:`pykd.llm.call_head` then runs the fused loss
as the lm_head's forward, where FSDP has the weight unsharded.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import _checks, fused_linear_kd_loss, fused_linear_topk_kd_loss
from ..data import TeacherCache, collate
from ..llm import LMHeadTap, call_head, check_lm_head, logit_map_of, logit_options, shift_targets

try:
    from transformers import Trainer, TrainingArguments
except ImportError as e:  # pragma: no cover - transformers is a listed dependency
    raise ImportError("pykd's DistillationTrainer needs transformers and accelerate") from e

_DIVERGENCES = ("kl", "reverse_kl", "soft_ce", "jsd", "tvd")


@dataclasses.dataclass
class DistillationConfig(TrainingArguments):
    """``TrainingArguments`` plus the distillation loss's options (as :func:`pykd.kd_loss`'s)."""

    kd_divergence: str = dataclasses.field(
        default="kl", metadata={"help": "kl | reverse_kl | soft_ce | jsd | tvd (offline caches: kl)"}
    )
    kd_temperature: float = dataclasses.field(default=1.0, metadata={"help": "distillation temperature"})
    kd_alpha: float = dataclasses.field(
        default=0.5, metadata={"help": "weight of the soft (KD) term; 1 - alpha weighs the hard CE"}
    )
    kd_beta: float = dataclasses.field(default=0.5, metadata={"help": "jsd mixture weight"})
    kd_tail: bool = dataclasses.field(
        default=True, metadata={"help": "offline top-k teacher: add the tail bucket (pykd.topk_kd_loss)"}
    )
    kd_logit_softcap: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": "soft-cap c of both models' logits, c tanh(z / c) (default: each model's own, as its "
            "config and forward apply it, e.g. Gemma-2's final_logit_softcapping)"
        },
    )
    # the batches' teacher_topk_* columns are not arguments of the model's forward: keep them
    remove_unused_columns: bool = False
    kd_chunk_size: int | None = dataclasses.field(
        default=None, metadata={"help": "rows per fused-linear chunk (default: the op's)"}
    )

    def __post_init__(self):
        super().__post_init__()
        _checks.choice("kd_divergence", self.kd_divergence, _DIVERGENCES)
        _checks.real("kd_alpha", self.kd_alpha, lo=0.0, hi=1.0)
        _checks.temperature("kd_temperature", self.kd_temperature)
        if self.kd_logit_softcap is not None:
            _checks.real("kd_logit_softcap", self.kd_logit_softcap, lo=0.0, lo_open=True)


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is logit distillation from a teacher, fused with the
    hard next-token CE: ``kd_alpha * T^2 * KD + (1 - kd_alpha) * CE`` per counted token.

    Online: ``DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(...),
    train_dataset=...)``; the teacher runs under ``no_grad`` on the same batch; the two must share the
    tokenizer; the teacher's vocabulary may be larger (padded), its extra entries dropped (see
    :func:`pykd.kd_loss`). Each model's logit soft-cap and scale (Gemma-2, Cohere, Granite) are read
    from its config and verified on one short forward (:func:`pykd.llm.logit_map_of`). Offline: a
    train dataset of :class:`pykd.data.TeacherCache` items (``teacher_topk_logprobs`` /
    ``teacher_topk_indices`` in each batch) and no teacher model; the cache's log-probs must be at
    ``kd_temperature`` (``meta["temperature"]``); a cache of a larger teacher vocabulary is
    conditioned on the student's (``teacher_vocab_size`` of :func:`pykd.topk_kd_loss`).

    Batches carry ``input_ids``, ``attention_mask`` and ``labels`` as for a causal LM (labels are
    shifted here; :func:`pykd.data.collate` is the default collator). The loss is a mean over the
    counted tokens of the whole accumulated batch (``num_items_in_batch``), so gradient accumulation
    and DDP or FSDP give the gradient of one large batch. ``kd_loss`` and ``ce_loss`` (means over
    logged steps) are logged beside ``loss``.
    """

    def __init__(self, model=None, args=None, *, teacher_model=None, data_collator=None, train_dataset=None,
                 **kwargs):  # fmt: skip
        if args is not None and not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a pykd DistillationConfig, got {type(args).__name__}")
        offline = isinstance(train_dataset, TeacherCache)
        if teacher_model is None and not offline:
            raise ValueError(
                "DistillationTrainer needs teacher_model= (online) or a pykd.data.TeacherCache "
                "train_dataset (offline)"
            )
        if teacher_model is not None and offline:
            raise ValueError("pass teacher_model= or a TeacherCache train_dataset, not both")
        super().__init__(model=model, args=args, data_collator=data_collator or collate,
                         train_dataset=train_dataset, **kwargs)  # fmt: skip
        self.teacher_model = teacher_model
        s_head = check_lm_head(self.model, "model")
        # each model's logit map (soft-cap, scale), unless kd_logit_softcap sets both soft-caps
        s_map = logit_map_of(self.model, "model")
        self._teacher_vocab_size = None
        if teacher_model is not None:
            t_head = check_lm_head(teacher_model, "teacher_model")
            if t_head.out_features < s_head.out_features:
                raise ValueError(
                    f"teacher_model's vocabulary ({t_head.out_features}) is smaller than the student's "
                    f"({s_head.out_features}); pykd's logit losses need the teacher's to cover it"
                )
            teacher_model.requires_grad_(False).eval()
            teacher_model.to(self.args.device)
            t_map = logit_map_of(teacher_model, "teacher_model")
        else:
            cache = train_dataset
            cache.check(tokenizer=self.processing_class)
            t_map = (None, 1.0)  # the cache's log-probs are the teacher's, map included
            if cache.meta["vocab_size"] > s_head.out_features:  # a padded teacher vocabulary
                self._teacher_vocab_size = cache.meta["vocab_size"]
            t = cache.meta.get("temperature")
            if t is not None and abs(t - self.args.kd_temperature) > 1e-6 * t:
                raise ValueError(
                    f"the teacher cache holds log-probs at temperature {t}, not kd_temperature="
                    f"{self.args.kd_temperature}"
                )
            if self.args.kd_divergence != "kl":
                raise ValueError("an offline (top-k) teacher supports kd_divergence='kl' only")
        # The loss is normalized by the accumulated batch's token count: Trainer must neither divide
        # it by the accumulation steps nor count tokens over unshifted labels.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._loss_shifts_labels = True
        self._kd_sums = {"kd_loss": 0.0, "ce_loss": 0.0, "n": 0}
        if self.args.kd_logit_softcap is not None:
            s_map, t_map = (self.args.kd_logit_softcap, s_map[1]), (self.args.kd_logit_softcap, t_map[1])
        self._logit_maps = logit_options(s_map, t_map)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        lp = inputs.pop("teacher_topk_logprobs", None)
        idx = inputs.pop("teacher_topk_indices", None)
        if (lp is None) == (self.teacher_model is None):
            raise ValueError(
                "a batch must carry teacher_topk_logprobs/indices exactly when there is no teacher_model"
            )
        target = shift_targets(labels)
        common = dict(temperature=args.kd_temperature, alpha=args.kd_alpha, return_components=True,
                      num_items_in_batch=num_items_in_batch)  # fmt: skip
        if args.kd_chunk_size is not None:
            common["chunk_size"] = args.kd_chunk_size
        if self.teacher_model is not None:
            t_head = self.teacher_model.get_output_embeddings()
            with torch.no_grad(), LMHeadTap(t_head) as t_tap:
                self.teacher_model(**inputs)
            h_t = t_tap.hidden.reshape(-1, t_tap.hidden.shape[-1])

            def loss_fn(h, w, b):
                return fused_linear_kd_loss(
                    h.reshape(-1, h.shape[-1]), w, h_t, t_head.weight, target, student_bias=b,
                    teacher_bias=t_head.bias, divergence=args.kd_divergence, beta=args.kd_beta,
                    **self._logit_maps, **common,
                )  # fmt: skip
        else:
            k = lp.shape[-1]
            maps = {name: pair[0] for name, pair in self._logit_maps.items()}  # the student's

            def loss_fn(h, w, b):
                return fused_linear_topk_kd_loss(
                    h.reshape(-1, h.shape[-1]), w, lp.reshape(-1, k), idx.reshape(-1, k), target,
                    student_bias=b, tail=args.kd_tail, teacher_vocab_size=self._teacher_vocab_size,
                    **maps, **common,
                )  # fmt: skip

        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        with LMHeadTap(head) as tap:
            outputs = model(**inputs)
        # the loss as the lm_head's forward: FSDP unshards its weight there however it was wrapped
        loss, kd, ce = call_head(head, tap.hidden, loss_fn)
        if args.average_tokens_across_devices and num_items_in_batch is not None and args.world_size > 1:
            loss = loss * args.world_size  # DDP averages gradients; the token count is global
        if model.training:  # parts of the accumulated batch's means; summed, read when logging
            self._kd_sums["kd_loss"] += kd.detach()
            self._kd_sums["ce_loss"] += ce.detach()
            self._kd_sums["n"] += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        n = self._kd_sums["n"]
        if n and "loss" in logs:
            steps = n / self.args.gradient_accumulation_steps  # optimizer steps since the last log
            logs = {**logs, **{name: float(self._kd_sums[name]) / steps for name in ("kd_loss", "ce_loss")}}
            self._kd_sums = {"kd_loss": 0.0, "ce_loss": 0.0, "n": 0}
        return super().log(logs, *args, **kwargs)
