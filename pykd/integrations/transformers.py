"""Hugging Face transformers integration: ``attn_implementation="pykd"`` and attention distillation.

``register()`` adds ``"pykd"`` to transformers' ``AttentionInterface`` (the attention function) and
``AttentionMaskInterface`` (the mask builder, which hands the 2-D padding mask through), so

    pykd.integrations.transformers.register()
    model = AutoModel.from_pretrained(name, attn_implementation="pykd")

runs pykd's flash attention (``pykd.attention``: GQA, causal, key padding) in every layer.

``AttentionDistiller(student, teacher, layer_map=...)`` distills attention maps through the same hook:
the teacher runs first under ``no_grad`` and its mapped layers keep only their q/k (and v for
relations); then the student's mapped layers call ``pykd.attention_kd`` on the kept teacher tensors,
so each mapped layer costs one fused kernel and no model sets ``output_attentions``.

``set_attention_spec(model, spec)`` makes a model's layers run sparse and/or quantized attention
(a :class:`pykd.AttentionSpec`, or a function of (N_q, N_k, device) returning one, for block masks
that depend on the sequence length), in plain forward passes and as the student of an
``AttentionDistiller`` (quantization-aware training against a dense teacher).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable

import torch

from .. import attention as _attention
from .. import attention_kd as _attention_kd
from .. import relation_kd as _relation_kd
from ..sparse_quant import AttentionSpec

NAME = "pykd"


def _transformers():
    try:
        import transformers  # noqa: F401
        from transformers import AttentionInterface
        from transformers.masking_utils import (
            AttentionMaskInterface,
            bidirectional_mask_function,
            causal_mask_function,
        )
    except ImportError as e:  # pragma: no cover - transformers is a listed dependency
        raise ImportError(
            "pykd.integrations.transformers needs transformers >= 4.56 (AttentionInterface and "
            f"AttentionMaskInterface): pip install transformers ({e})"
        ) from e
    return AttentionInterface, AttentionMaskInterface, (causal_mask_function, bidirectional_mask_function)


def register(name: str = NAME) -> str:
    """Registers pykd's attention and mask functions under ``name``; returns the name to pass as
    ``attn_implementation``. Idempotent."""
    attention_interface, mask_interface, _ = _transformers()
    attention_interface.register(name, attention_forward)
    mask_interface.register(name, padding_mask)
    return name


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """The mask builder: pykd takes the (B, N_k) bool padding mask itself (causal comes from the
    module). Patterns it cannot express (sliding windows, chunked or packed-sequence masks) raise."""
    _, _, plain = _transformers()
    if mask_function is not None and mask_function not in plain:
        raise NotImplementedError(
            "attn_implementation='pykd' supports full causal or bidirectional attention with padding; "
            f"this model builds another mask pattern ({getattr(mask_function, '__name__', mask_function)}: "
            "sliding window, chunked or packed sequences). Use attn_implementation='sdpa' for it."
        )
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:].to(torch.bool)


def set_attention_spec(model: torch.nn.Module, spec) -> None:
    """Run ``model``'s attention layers (those :func:`attention_layers` finds) with ``spec``: a
    :class:`pykd.AttentionSpec`, a callable ``(n_q, n_k, device) -> AttentionSpec | None`` (e.g. a
    sliding-window block mask for the batch's length), or None for dense attention again."""
    if spec is not None and not isinstance(spec, AttentionSpec) and not callable(spec):
        raise TypeError(f"spec must be a pykd.AttentionSpec, a callable or None, got {type(spec).__name__}")
    for m in attention_layers(model):
        if spec is None:
            m.__dict__.pop("_pykd_spec", None)
        else:
            m._pykd_spec = spec


def _layer_spec(module, n_q: int, n_k: int, device):
    spec = getattr(module, "_pykd_spec", None)
    if spec is None or isinstance(spec, AttentionSpec):
        return spec
    out = spec(n_q, n_k, device)
    if out is not None and not isinstance(out, AttentionSpec):
        raise TypeError(
            f"the attention spec function returned {type(out).__name__}, not a pykd.AttentionSpec"
        )
    return out


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: (B, H, N, D) inputs, (B, N, H, D) output."""
    if dropout:
        raise ValueError(
            f"attn_implementation='pykd' has no attention dropout (got p={dropout}); set the config's "
            "attention dropout (e.g. attention_probs_dropout_prob / attention_dropout) to 0"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            "attn_implementation='pykd' takes a 2-D padding mask; got a prepared "
            f"{attention_mask.dim()}-D mask (a custom mask pattern pykd cannot express)"
        )
    n_q, n_k = query.shape[2], key.shape[2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    if causal and n_q != n_k:
        if n_q != 1:
            raise NotImplementedError(
                "attn_implementation='pykd' runs causal attention with as many queries as keys; a "
                f"cached prefill of {n_q} queries over {n_k} keys needs bottom-right alignment"
            )
        causal = False  # one new token sees every cached key
    state = _STATE.active
    if state is None and torch._C._current_graph_task_id() != -1:
        # inside backward: activation checkpointing recomputes this layer, and must rerun the
        # distillation ops the forward ran so their saved tensors come back the same
        state = getattr(module, "_pykd_recompute", None)
    if state is not None:
        out = state.attend(module, query, key, value, attention_mask, scaling, causal)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
    spec = _layer_spec(module, n_q, n_k, query.device)
    out = _attention(
        query, key, value, causal=causal, key_padding_mask=attention_mask, scale=scaling, spec=spec
    )
    return out.transpose(1, 2).contiguous(), None


# ------------------------------------------------------------------------------ distillation


class _State(threading.local):
    active = None


_STATE = _State()


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules that call the attention interface, in layer order (modules with a
    ``layer_idx`` attribute and q/k/v projections, as transformers' BERT, Llama, ... define them)."""
    layers = {}
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and any(hasattr(m, p) for p in ("q_proj", "query", "qkv_proj", "Wqkv")):
            if getattr(m, "is_cross_attention", False):
                continue
            layers.setdefault(idx, m)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no attention modules pykd recognizes (a layer_idx attribute and "
            "query/q_proj projections); attention distillation supports BERT- and Llama-style models"
        )
    return [layers[i] for i in sorted(layers)]


def make_layer_map(layer_map, n_student: int, n_teacher: int) -> dict[int, int]:
    """{student layer: teacher layer}. ``"last"`` (MiniLM): last to last. ``"uniform"`` (TinyBERT):
    student layer i to teacher layer i*k + k - 1, k = n_teacher // n_student. Or an explicit dict."""
    if layer_map == "last":
        out = {n_student - 1: n_teacher - 1}
    elif layer_map == "uniform":
        if n_teacher % n_student:
            raise ValueError(
                f"layer_map='uniform' needs the teacher's layers ({n_teacher}) to be a multiple of the "
                f"student's ({n_student}); pass an explicit {{student: teacher}} dict instead"
            )
        k = n_teacher // n_student
        out = {i: i * k + k - 1 for i in range(n_student)}
    elif isinstance(layer_map, dict):
        out = {int(s): int(t) for s, t in layer_map.items()}
    else:
        raise ValueError(
            f"layer_map must be 'last', 'uniform' or a {{student: teacher}} dict, got {layer_map!r}"
        )
    for s, t in out.items():
        if not 0 <= s < n_student:
            raise ValueError(f"layer_map: student layer {s} is out of range [0, {n_student})")
        if not 0 <= t < n_teacher:
            raise ValueError(f"layer_map: teacher layer {t} is out of range [0, {n_teacher})")
    return out


class AttentionDistiller:
    """Attention-map (MiniLM / TinyBERT) and relation (MiniLMv2) distillation through
    ``attn_implementation="pykd"``: no N x N map is ever stored.

    Both models must have been loaded (or configured) with ``attn_implementation="pykd"`` after
    :func:`register`. Usage::

        distiller = AttentionDistiller(student, teacher, layer_map="last", divergence="kl")
        with distiller.teacher_pass():
            teacher(**batch)            # runs under no_grad; keeps the mapped layers' q/k(/v)
        with distiller.student_pass() as losses:
            out = student(**batch)      # mapped layers run pykd.attention_kd
        loss = losses.attention + losses.relation

    Args:
        layer_map: "last", "uniform" or {student_layer: teacher_layer}.
        divergence, temperature: for the attention maps (see :func:`pykd.attention_kd`); None
            skips attention-map distillation (relations only).
        teacher_heads: per-student-head teacher head, needed when the head counts differ.
        relation_heads: MiniLMv2 relation heads for Q-Q, K-K, V-V relation KD of the mapped layers;
            None skips relations.
    """

    def __init__(self, student, teacher, *, layer_map="last", divergence="kl", temperature=1.0,
                 teacher_heads=None, relation_heads=None, relation_divergence="kl"):  # fmt: skip
        self.student_layers = attention_layers(student)
        self.teacher_layers = attention_layers(teacher)
        self.layer_map = make_layer_map(layer_map, len(self.student_layers), len(self.teacher_layers))
        self.divergence = divergence
        self.temperature = temperature
        self.teacher_heads = teacher_heads
        self.relation_heads = relation_heads
        self.relation_divergence = relation_divergence
        if divergence is None and relation_heads is None:
            raise ValueError("AttentionDistiller: set divergence (attention maps) and/or relation_heads")
        for who, model in (("student", student), ("teacher", teacher)):
            impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
            if impl != NAME:
                raise ValueError(
                    f"the {who} runs attn_implementation={impl!r}; load it with attn_implementation='pykd' "
                    "after pykd.integrations.transformers.register()"
                )
        self._s_index = {id(m): i for i, m in enumerate(self.student_layers)}
        self._t_index = {id(m): i for i, m in enumerate(self.teacher_layers)}
        self._wanted = set(self.layer_map.values())
        self._kept: dict[int, tuple] = {}  # teacher layer -> (q, k, v, scale)

    @contextlib.contextmanager
    def teacher_pass(self):
        """Run the teacher inside: no grad, mapped layers keep (q, k, v, scale)."""
        self.clear()
        prev, _STATE.active = _STATE.active, _TeacherState(self)
        try:
            with torch.no_grad():
                yield
        finally:
            _STATE.active = prev

    @contextlib.contextmanager
    def student_pass(self):
        """Run the student inside; yields the losses object, filled as the mapped layers run."""
        if not self._kept:
            raise RuntimeError("AttentionDistiller.student_pass: run the teacher under teacher_pass() first")
        losses = DistillLosses()
        prev, _STATE.active = _STATE.active, _StudentState(self, losses, self._kept)
        try:
            yield losses
        finally:
            _STATE.active = prev
            self._kept = {}  # used once; checkpoint recomputes hold their own reference

    def clear(self) -> None:
        """Drops the kept teacher tensors (also done by the next teacher_pass)."""
        self._kept = {}
        for m in self.student_layers:
            if hasattr(m, "_pykd_recompute"):
                del m._pykd_recompute


class DistillLosses:
    """Sums of the mapped layers' attention-map and relation losses (0-d tensors, 0.0 until set)."""

    def __init__(self):
        self.attention = 0.0
        self.relation = 0.0
        self.layers = 0

    def total(self, output=None):
        """``attention + relation``; given the student's output (a tensor, or a Hugging Face model
        output: its first tensor), tied to it with weight 0, so that backward passes through the
        output. DDP and FSDP hook their gradient reduction (and FSDP its re-gather of resharded
        layers) on the forward's outputs, which losses taken inside the forward never reach: under
        DDP the gradients would stay un-averaged, under FSDP2 backward would read freed weights. The
        tie costs a backward of zeros through the output's path; it is not needed when another loss
        term already uses the output (e.g. a task loss, or ``pykd distill``'s embedding cosine)."""
        loss = self.attention + self.relation
        if output is None or not isinstance(loss, torch.Tensor):
            return loss
        out = output if isinstance(output, torch.Tensor) else output[0]
        return _TieToOutput.apply(loss, out)


class _TieToOutput(torch.autograd.Function):
    """loss in forward; backward sends zeros to `out` (not 0 * out, which an inf would turn NaN)."""

    @staticmethod
    def forward(ctx, loss, out):
        ctx.out_meta = (out.shape, out.dtype, out.device)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.out_meta
        return grad, torch.zeros(shape, dtype=dtype, device=device)


class _TeacherState:
    def __init__(self, distiller):
        self.d = distiller

    def attend(self, module, q, k, v, mask, scaling, causal):
        idx = self.d._t_index.get(id(module))
        if idx is not None and idx in self.d._wanted:
            self.d._kept[idx] = (q.detach(), k.detach(), v.detach(), scaling)
        return None  # the teacher's own attention runs as usual


class _StudentState:
    """losses=None: a recompute under activation checkpointing (same ops, losses already counted)."""

    def __init__(self, distiller, losses, kept):
        self.d = distiller
        self.losses = losses
        self.kept = kept

    def attend(self, module, q, k, v, mask, scaling, causal):
        idx = self.d._s_index.get(id(module))
        if idx is None or idx not in self.d.layer_map:
            return None
        if not torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            raise RuntimeError(
                "AttentionDistiller: a mapped student layer runs without grad (reentrant activation "
                "checkpointing?); use gradient_checkpointing_kwargs={'use_reentrant': False}"
            )
        if self.losses is not None:
            module._pykd_recompute = _StudentState(self.d, None, self.kept)
        t_idx = self.d.layer_map[idx]
        if t_idx not in self.kept:
            raise RuntimeError(
                f"teacher layer {t_idx} was not captured: run the teacher under teacher_pass()"
            )
        qt, kt, vt, scale_t = self.kept[t_idx]
        d = self.d
        spec = _layer_spec(module, q.shape[2], k.shape[2], q.device)
        if d.divergence is not None:
            out, loss = _attention_kd(
                q, k, v, qt, kt, divergence=d.divergence, causal=causal, key_padding_mask=mask,
                scale_s=scaling, scale_t=scale_t, temperature=d.temperature, teacher_heads=d.teacher_heads,
                student_spec=spec,
            )  # fmt: skip
            if self.losses is not None:
                self.losses.attention = self.losses.attention + loss
        else:
            out = _attention(q, k, v, causal=causal, key_padding_mask=mask, scale=scaling, spec=spec)
        if d.relation_heads is not None:
            for xs, xt in ((q, qt), (k, kt), (v, vt)):
                rel = _relation_kd(
                    _flat(xs),
                    _flat(xt),
                    d.relation_heads,
                    key_padding_mask=mask,
                    divergence=d.relation_divergence,
                )
                if self.losses is not None:
                    self.losses.relation = self.losses.relation + rel
        if self.losses is not None:
            self.losses.layers += 1
        return out


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D): a layer's heads side by side, as MiniLMv2 relations split them."""
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B, N, H * D)


def __getattr__(name):
    # the Trainer classes import transformers.Trainer (and accelerate): loaded on first use
    if name in ("DistillationConfig", "DistillationTrainer"):
        from . import trainer  # noqa: PLC0415

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
