"""``pykd.fused_linear_kd_loss`` and ``pykd.fused_linear_topk_kd_loss`` (DESIGN.md section 4): the
lm_head matmuls and the distillation loss, chunked over rows so the (BT, V) logits never exist in full.

Per chunk of rows: the student's (and teacher's) fp32 logits come from one GEMM each (bf16/fp16 inputs
accumulate into fp32 output, never rounded to the input dtype), the row kernel of kd_loss or
topk_kd_loss (Triton on CUDA, C++ on CPU) turns them into the loss and d loss / d logits, and two GEMMs
take that gradient to the hidden states and to the weight, whose gradient accumulates in fp32.

"mean" and "sum" compute every gradient in the forward (four BT x H x V GEMMs in all) and backward
only scales them by grad_output. reduction="none" needs each row's grad_output before the weight
gradient can be summed, so its forward computes the loss alone and backward recomputes the logits
(six GEMMs).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _backend, _checks, vocab_parallel
from ._backend import has_cpp
from .kd_loss import _DIVERGENCES, row_loss_options
from .topk_kd_loss import check_topk

# Default chunk: rows whose fp32 logits fill about this many elements (CUDA: large GEMMs; CPU: small
# enough that the few chunk buffers stay far below the materialized logits).
_CHUNK_ELEMS = {"cuda": 1 << 27, "cpu": 1 << 24}
# The Triton path's gradient group (see _run_chunks): about this many logit-gradient entries (1 GiB
# of bf16) per weight-gradient GEMM, so that GEMM's inner dimension is several chunks' rows.
GRAD_GROUP_ELEMS = 1 << 29


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    divergence: str = "kl",
    temperature: float = 1.0,
    alpha: float | None = None,
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    scale_by_t2: bool = True,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    return_components: bool = False,
    chunk_size: int | None = None,
    logit_softcap: float | tuple[float | None, float | None] | None = None,
    logit_scale: float | tuple[float, float] = 1.0,
    process_group=None,
):
    r""":func:`pykd.kd_loss` of ``student_hidden @ student_weight.T + student_bias`` against
    ``teacher_hidden @ teacher_weight.T + teacher_bias``, without materializing the (BT, V) logits.

    Args:
        student_hidden: (..., H_s) float32/float16/bfloat16, the last hidden states (BT rows).
        student_weight: (V, H_s), the lm_head weight (``nn.Linear(H_s, V).weight`` layout), same dtype.
        teacher_hidden: (..., H_t) with the student's leading shape; H_t may differ from H_s.
        teacher_weight: (V_t, H_t), V_t >= V: a larger (padded) teacher vocabulary is conditioned on
            the student's, its rows V and above dropped (as in :func:`pykd.kd_loss`). The teacher's
            tensors never get a gradient.
        target: optional (...) int64, as in :func:`pykd.kd_loss`.
        student_bias, teacher_bias: optional (V,) and (V_t,).
        divergence, temperature, alpha, beta, ignore_index, reduction, scale_by_t2,
        num_items_in_batch, return_components, logit_softcap, logit_scale: as in
        :func:`pykd.kd_loss` (the logit map applies to each chunk's logits inside the row kernel).
        chunk_size: rows per chunk; None picks about 2^27 (CUDA) or 2^24 (CPU) logits per chunk.
        process_group: vocabulary parallelism (a column-parallel lm_head): each rank passes its
            contiguous slice of both weights' rows (V_r, H) (and biases), slices in rank order, and
            the same hidden states and target (global ids) as every other rank. The loss is the
            full-vocabulary loss; student_weight/bias get their slice's gradient and student_hidden
            the full gradient (the ranks' partial gradients summed with one all-reduce). Per chunk, a
            few floats per row are all-reduced (pykd.kd_loss's process_group).

    Returns:
        fp32 loss: 0-d, or (...) for ``reduction="none"``.

    Precision: each chunk's logits are fp32 (a bf16/fp16 GEMM with fp32 output; on CPU the weights
    are read through one fp32 copy each). The logit gradient is computed in fp32 and rounded once
    to the input dtype for the two gradient GEMMs; the weight and bias gradients accumulate in fp32
    across chunks and are rounded once. Gradients reach student_hidden, student_weight and
    student_bias, only those that require grad (a frozen lm_head skips the weight GEMM).
    """
    group = vocab_parallel.group_name(process_group)
    args = dict(
        student_hidden=student_hidden, student_weight=student_weight, teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight, target=target, student_bias=student_bias, teacher_bias=teacher_bias,
        divergence=divergence, temperature=temperature, alpha=alpha, beta=beta, ignore_index=ignore_index,
        reduction=reduction, scale_by_t2=scale_by_t2, num_items_in_batch=num_items_in_batch,
        return_components=return_components, chunk_size=chunk_size, logit_softcap=logit_softcap,
        logit_scale=logit_scale, group=group,
    )  # fmt: skip
    if not group:
        return _call(*_kd_prepare(**args)[0], reduction, return_components)
    (op_args, lead), shard = vocab_parallel.setup(group, student_hidden, lambda: _kd_prepare(**args))
    vocab_parallel.check_target(op_args[8], shard, op_args[15])
    return _call(_sliced(op_args, shard), lead, reduction, return_components)


def _kd_prepare(
    *, student_hidden, student_weight, teacher_hidden, teacher_weight, target, student_bias, teacher_bias,
    divergence, temperature, alpha, beta, ignore_index, reduction, scale_by_t2, num_items_in_batch,
    return_components, chunk_size, logit_softcap, logit_scale, group,
):  # fmt: skip
    """fused_linear_kd_loss's checks: ((op arguments, lead), V, rows, options signature)."""
    _checks.choice("divergence", divergence, _DIVERGENCES)
    if divergence == "jsd":
        beta = _checks.real("beta", beta, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    else:
        beta = _checks.real("beta", beta)
    ht, wt, bt, _ = _check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
    hs, ws, bs, lead = _check_linear("student", student_hidden, student_weight, student_bias)
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(
            f"teacher_hidden must have the student's leading shape {tuple(lead)}, got "
            f"{tuple(teacher_hidden.shape)}"
        )
    V = ws.shape[0]
    if group and teacher_weight.shape[0] != V:
        raise ValueError(
            "with process_group, teacher_weight must hold the student_weight's vocabulary slice: got "
            f"{teacher_weight.shape[0]} and {V} rows"
        )
    if teacher_weight.shape[0] < V:
        raise ValueError(
            f"teacher_weight must have at least the student's vocabulary V={V} rows, got "
            f"{tuple(teacher_weight.shape)}"
        )
    logit_map = _checks.logit_map(logit_softcap, logit_scale)
    return _prepare(
        lead,
        hs,
        ws,
        bs,
        [
            ("teacher_hidden", teacher_hidden),
            ("teacher_weight", teacher_weight),
            ("teacher_bias", teacher_bias),
        ],
        dict(
            h_t=ht.detach(),
            w_t=wt.detach()[:V],
            b_t=None if bt is None else bt.detach()[:V],
            lp=None,
            idx=None,
            divergence=divergence,
            beta=beta,
            tail=False,
            logit_map=logit_map,
            teacher_vocab_size=None,
        ),
        target,
        temperature,
        alpha,
        ignore_index,
        reduction,
        scale_by_t2,
        num_items_in_batch,
        return_components,
        chunk_size,
        group,
    )


def fused_linear_topk_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    alpha: float | None = None,
    tail: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    scale_by_t2: bool = True,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    return_components: bool = False,
    chunk_size: int | None = None,
    teacher_vocab_size: int | None = None,
    logit_softcap: float | None = None,
    logit_scale: float = 1.0,
    process_group=None,
):
    r""":func:`pykd.topk_kd_loss` of ``student_hidden @ student_weight.T + student_bias`` against a
    teacher given as top-K log-probabilities, without materializing the (BT, V) logits.

    Shapes: student_hidden (..., H), student_weight (V, H), student_bias (V,), teacher_topk_logprobs and
    teacher_topk_indices (..., K). Options (teacher_vocab_size, logit_softcap and logit_scale
    included), precision and gradients as in
    :func:`pykd.topk_kd_loss` and :func:`pykd.fused_linear_kd_loss`; ``process_group`` as in
    :func:`pykd.fused_linear_kd_loss`, the top-K indices global vocabulary ids.
    """
    group = vocab_parallel.group_name(process_group)

    def prepare():
        return _topk_prepare(student_hidden, student_weight, student_bias, teacher_topk_logprobs,
                             teacher_topk_indices, target, temperature, alpha, tail, ignore_index, reduction,
                             scale_by_t2, num_items_in_batch, return_components, chunk_size,
                             teacher_vocab_size, logit_softcap, logit_scale, group)  # fmt: skip

    if not group:
        (args, lead), *_ = prepare()
        return _call(args, lead, reduction, return_components)
    (args, lead), shard = vocab_parallel.setup(group, student_hidden, prepare)
    lp, idx = check_topk(teacher_topk_logprobs, teacher_topk_indices, lead, shard.total, tail, target,
                         args[15], teacher_vocab_size)  # fmt: skip
    vocab_parallel.check_target(args[8], shard, args[15])
    args = (*args[:6], lp, idx, *args[8:])
    return _call(_sliced(args, shard), lead, reduction, return_components)


def _topk_prepare(
    student_hidden, student_weight, student_bias, teacher_topk_logprobs, teacher_topk_indices, target,
    temperature, alpha, tail, ignore_index, reduction, scale_by_t2, num_items_in_batch, return_components,
    chunk_size, teacher_vocab_size, logit_softcap, logit_scale, group,
):  # fmt: skip
    """fused_linear_topk_kd_loss's checks: ((op arguments, lead), V, rows, options signature)."""
    hs, ws, bs, lead = _check_linear("student", student_hidden, student_weight, student_bias)
    _checks.tensor("teacher_topk_logprobs", teacher_topk_logprobs, float_dtype=True)
    _checks.tensor("teacher_topk_indices", teacher_topk_indices)
    return _prepare(
        lead,
        hs,
        ws,
        bs,
        [("teacher_topk_logprobs", teacher_topk_logprobs), ("teacher_topk_indices", teacher_topk_indices)],
        dict(
            h_t=None,
            w_t=None,
            b_t=None,
            lp=teacher_topk_logprobs,
            idx=teacher_topk_indices,
            divergence="kl",
            beta=0.5,
            tail=tail,
            logit_map=_checks.logit_map(logit_softcap, logit_scale, teacher=False) + [1.0, 0.0],
            teacher_vocab_size=teacher_vocab_size,
        ),
        target,
        temperature,
        alpha,
        ignore_index,
        reduction,
        scale_by_t2,
        num_items_in_batch,
        return_components,
        chunk_size,
        group,
    )


def default_chunk(device, V: int) -> int:
    """Rows per chunk: about 2^27 (CUDA) or 2^24 (CPU) fp32 logits of V entries. A vocabulary slice
    takes the rows a single process would over the whole vocabulary (V the sum of the slices): the
    same on every rank (the chunks' all-reduces must match), and its chunk buffers 1/P of one
    process's."""
    return max(1, _CHUNK_ELEMS["cuda" if device.type == "cuda" else "cpu"] // V)


def _sliced(args, shard):
    """The fused op's arguments for a vocabulary slice: the default chunk size from the whole
    vocabulary, then the group's name, the slice's offset and the vocabulary's size."""
    if args[22] == 0:
        args = (*args[:22], default_chunk(args[0].device, shard.total))
    return args + (shard.group.group_name, shard.start, shard.total)


def _check_linear(who, hidden, weight, bias):
    """Checks one model's (hidden, weight, bias); returns hidden as (BT, H), weight, bias, lead shape."""
    _checks.tensor(f"{who}_hidden", hidden, float_dtype=True)
    _checks.tensor(f"{who}_weight", weight, float_dtype=True)
    if hidden.dim() < 2:
        raise ValueError(
            f"{who}_hidden must have shape (..., H) with at least 2 dims, got {tuple(hidden.shape)}"
        )
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] < 1:
        raise ValueError(f"{who}_weight must have shape (V, {H}) (lm_head layout), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{who}_weight must have {who}_hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None:
        _checks.tensor(f"{who}_bias", bias, float_dtype=True)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{who}_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{who}_bias must have {who}_hidden's dtype {hidden.dtype}, got {bias.dtype}")
    return hidden.reshape(-1, H), weight, bias, hidden.shape[:-1]


def _prepare(
    lead,
    hs,
    ws,
    bs,
    teacher_named,
    teacher,
    target,
    temperature,
    alpha,
    ignore_index,
    reduction,
    scale_by_t2,
    num_items_in_batch,
    return_components,
    chunk_size,
    group,
):
    """Checks the options; returns ((the fused op's arguments, lead), V, rows, options signature)."""
    V = ws.shape[0]
    named = [("student_hidden", hs), ("student_weight", ws)] + [
        (n, t) for n, t in teacher_named if t is not None
    ]
    if bs is not None:
        named.append(("student_bias", bs))
    temperature, alpha, ignore_index, num_items = row_loss_options(
        lead,
        None if group else V,
        hs.device,
        [n for n, _ in named],
        [t for _, t in named],
        target,
        temperature=temperature,
        alpha=alpha,
        ignore_index=ignore_index,
        reduction=reduction,
        scale_by_t2=scale_by_t2,
        num_items_in_batch=num_items_in_batch,
        return_components=return_components,
    )
    if chunk_size is None:  # a vocabulary slice's default waits for the whole vocabulary's size
        chunk_size = 0 if group else default_chunk(hs.device, V)
    else:
        chunk_size = _checks.integer("chunk_size", chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    lp, idx = teacher["lp"], teacher["idx"]
    if lp is not None and not group:  # a slice's indices are checked once the whole vocabulary is known
        lp, idx = check_topk(
            lp, idx, lead, V, teacher["tail"], target, ignore_index, teacher["teacher_vocab_size"]
        )
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (hs, ws, bs)]
    args = (
        hs,
        ws,
        bs,
        teacher["h_t"],
        teacher["w_t"],
        teacher["b_t"],
        lp,
        idx,
        None if target is None else target.reshape(-1),
        num_items,
        teacher["divergence"],
        temperature,
        alpha,
        teacher["beta"],
        teacher["tail"],
        ignore_index,
        scale_by_t2,
        teacher["logit_map"],
        reduction,
        need[0],
        need[1],
        need[2],
        chunk_size,
    )
    sig = ("fused_linear_kd", teacher["divergence"], temperature, alpha, teacher["beta"], ignore_index,
           scale_by_t2, teacher["logit_map"], reduction, target is None, num_items is None, str(hs.dtype),
           tuple(hs.shape), need, chunk_size, None if lp is None else tuple(lp.shape), teacher["tail"],
           teacher["teacher_vocab_size"])  # fmt: skip
    return (args, lead), V, hs.shape[0], sig


def _call(args, lead, reduction, return_components):
    """Runs the fused op on _prepare's arguments (plus, vocabulary-parallel, the group's name, the
    slice's offset and the vocabulary's size)."""
    if len(args) == 23:
        args = args + ("", 0, 0)
    loss, soft, hard, *_ = torch.ops.pykd.fused_linear_kd_fwd(*args)
    if reduction == "none":
        loss, soft, hard = loss.reshape(lead), soft.reshape(lead), hard.reshape(lead)
    if return_components:
        return loss, soft.detach(), hard.detach()
    return loss


# ------------------------------------------------------------------------------ the chunk driver


def _logits_f32(h, w, b, w32):
    """fp32 logits h @ w.T + b of one chunk, never rounded to a 16-bit dtype."""
    if h.dtype == torch.float32:
        return torch.addmm(b, h, w.t()) if b is not None else torch.mm(h, w.t())
    if w32 is not None:  # CPU 16-bit: through the weight's one fp32 copy
        h = h.float()
        return torch.addmm(b.float(), h, w32.t()) if b is not None else torch.mm(h, w32.t())
    out = torch.mm(h, w.t(), out_dtype=torch.float32)  # cuBLAS: 16-bit inputs, fp32 accumulate + output
    return out.add_(b) if b is not None else out


def _row_loss(logits, c0, c1, a, compute_grad, reduction, num_items, grad_dtype, grad_out=None):
    """The row kernel on one chunk's fp32 logits: (loss, soft, hard, d loss / d logits). Triton
    stores the gradient in grad_dtype directly (rounded once, no separate cast pass), into grad_out
    when given (a slice of the gradient group); the C++ kernel keeps it fp32 (its CPU caller runs
    fp32 GEMMs), in a tensor of its own."""
    tgt = None if a["target"] is None else a["target"][c0:c1]
    if a["shard"] is not None and a["lp"] is not None:  # a vocabulary slice: phases and all-reduces
        return vocab_parallel.topk_loss_rows(
            logits, a["lp"][c0:c1], a["idx"][c0:c1], tgt, num_items, a["temperature"], a["alpha"], a["tail"],
            a["ignore_index"], a["scale_by_t2"], a["logit_map"][:2], reduction, compute_grad, a["shard"],
            grad_dtype=grad_dtype,
        )  # fmt: skip
    if a["shard"] is not None:
        t = _logits_f32(a["h_t"][c0:c1], a["w_t"], a["b_t"], a["w_t32"])
        return vocab_parallel.kd_loss_rows(
            logits, t, tgt, num_items, a["divergence"], a["temperature"], a["alpha"], a["beta"],
            a["ignore_index"], a["scale_by_t2"], a["logit_map"], reduction, compute_grad, a["shard"],
            grad_dtype=grad_dtype,
        )  # fmt: skip
    extra = {}
    if _backend.runs_triton(logits.device) and (grad_out is not None or grad_dtype != logits.dtype):
        extra = dict(grad_dtype=grad_dtype, grad_out=grad_out)
    if a["lp"] is not None:
        op = _backend.triton_launcher("topk_kd_loss_fwd") if extra else torch.ops.pykd.topk_kd_loss_fwd
        return op(
            logits,
            a["lp"][c0:c1],
            a["idx"][c0:c1],
            tgt,
            num_items,
            a["temperature"],
            a["alpha"],
            a["tail"],
            a["ignore_index"],
            a["scale_by_t2"],
            a["logit_map"][:2],
            reduction,
            compute_grad,
            **extra,
        )
    t = _logits_f32(a["h_t"][c0:c1], a["w_t"], a["b_t"], a["w_t32"])
    op = _backend.triton_launcher("kd_loss_fwd") if extra else torch.ops.pykd.kd_loss_fwd
    return op(
        logits,
        t,
        tgt,
        num_items,
        a["divergence"],
        a["temperature"],
        a["alpha"],
        a["beta"],
        a["ignore_index"],
        a["scale_by_t2"],
        a["logit_map"],
        reduction,
        compute_grad,
        **extra,
    )


def _drive(a, *, need, row_scale=None):
    """_run_chunks with autocast off: the op computes in its inputs' dtypes (fp32 logits from
    bf16/fp16 GEMMs) whatever autocast state the caller is in."""
    with torch.autocast(a["h_s"].device.type, enabled=False):
        return _run_chunks(a, need=need, row_scale=row_scale)


def group_rows(device, V: int, R: int, chunk: int) -> int:
    """Rows of logit gradient per weight-gradient GEMM: one chunk on the C++ path, else as many whole
    chunks as fill about GRAD_GROUP_ELEMS entries (at most all R rows)."""
    if not _backend.runs_triton(device) or V == 0:
        return chunk
    whole = max(1, GRAD_GROUP_ELEMS // (V * chunk))
    return chunk * min(whole, max(1, -(-R // chunk)))


def _run_chunks(a, *, need, row_scale=None):
    """Runs every chunk. need = (grad_h, grad_w, grad_b) wanted; row_scale (R,) multiplies each row's
    logit gradient (the recompute of reduction="none"). Returns (loss, soft, hard, gh, gw, gb).

    The logit gradient of consecutive chunks gathers in a group buffer (in the GEMMs' dtype) and one
    GEMM adds the group's weight gradient to the fp32 accumulator: one read-modify-write of the
    (V, H) accumulator per group instead of per chunk."""
    hs, ws, bs = a["h_s"], a["w_s"], a["b_s"]
    R, V, H = hs.shape[0], ws.shape[0], ws.shape[1]
    dtype, dev = hs.dtype, hs.device
    compute_grad = any(need)
    reduction = a["reduction"]
    n = _backend.reduction_denominator(a["target"], R, a["ignore_index"], a["num_items"], dev)
    # Chunks return partial sums; "mean" folds 1/n into the stored gradient unless fp16 defers it.
    fold = reduction == "mean" and _backend.mean_scale_in_forward(dtype)
    chunk_red = "none" if reduction == "none" else ("mean" if fold else "sum")
    chunk_n = n if fold else None
    f32 = torch.float32
    chunk = a["chunk_size"]
    w_gemm = ws if a["w_s32"] is None else a["w_s32"]  # CPU 16-bit: fp32 GEMMs on the fp32 copy
    gemm_dtype = w_gemm.dtype
    # the row kernel's gradient dtype: the GEMMs'; fp32 when rows are rescaled after (the recompute)
    g_dtype = gemm_dtype if row_scale is None else f32
    gh = torch.empty((R, H) if need[0] else (0,), device=dev, dtype=dtype)
    gw32 = torch.zeros((V, H) if need[1] else (0,), device=dev, dtype=f32)
    gb32 = torch.zeros((V,) if need[2] else (0,), device=dev, dtype=f32)
    group = group_rows(dev, V, R, chunk) if need[1] else chunk
    buf = torch.empty((min(group, R), V), device=dev, dtype=gemm_dtype) if group > chunk else None
    g0 = 0  # the group's first row
    losses, softs, hards = [], [], []
    for c0 in range(0, max(R, 1), chunk):  # 0 rows: one empty chunk gives the empty result
        c1 = min(R, c0 + chunk)
        hc = hs[c0:c1]
        logits = _logits_f32(hc, ws, bs, a["w_s32"])
        slot = None if buf is None else buf[c0 - g0 : c1 - g0]
        out = slot if g_dtype == gemm_dtype else None
        loss, soft, hard, g = _row_loss(logits, c0, c1, a, compute_grad, chunk_red, chunk_n, g_dtype, out)
        del logits
        losses.append(loss)
        softs.append(soft)
        hards.append(hard)
        if not compute_grad:
            continue
        if row_scale is not None:
            g.mul_(row_scale[c0:c1, None])
        if need[2]:
            gb32 += g.sum(0, dtype=f32)
        if slot is None:
            gl = g if g.dtype == gemm_dtype else g.to(gemm_dtype)
        else:
            gl = slot if g is slot else slot.copy_(g)  # the Triton row kernel stored into the slot
        del g
        if need[0]:
            if gemm_dtype == dtype:
                torch.mm(gl, w_gemm, out=gh[c0:c1])
            else:
                gh[c0:c1] = torch.mm(gl, w_gemm)
        if need[1] and (c1 - g0 == group or c1 == R):
            gk = gl if buf is None else buf[: c1 - g0]
            _add_weight_grad(gw32, gk, hs[g0:c1])
            g0 = c1
    if reduction == "none":
        loss, soft, hard = torch.cat(losses), torch.cat(softs), torch.cat(hards)
    else:
        loss, soft, hard = (torch.stack(x).sum() for x in (losses, softs, hards))
        if reduction == "mean" and not fold:
            loss, soft, hard = loss / n, soft / n, hard / n
    if not fold and reduction == "mean":  # fp16: grad_w/grad_b are fp32 until here, so fold now
        gw32 /= n
        gb32 /= n
    if a["shard"] is not None and need[0]:
        vocab_parallel.sum_hidden_grad_(gh, a["shard"])
    gw = gw32 if dtype == f32 else gw32.to(dtype)
    gb = gb32 if dtype == f32 else gb32.to(dtype)
    return loss, soft, hard, gh, gw, gb


def _add_weight_grad(gw32, g, h):
    """gw32 += g.T @ h: the fp32 accumulator as the GEMM's C (beta = 1); 16-bit g/h accumulate in fp32."""
    if g.dtype == torch.float32:
        gw32.addmm_(g.t(), h.float())
    else:
        torch.addmm(gw32, g.t(), h, out_dtype=torch.float32, out=gw32)


def _cpu_f32_copy(w):
    """The one fp32 copy of a 16-bit CPU weight its GEMMs read (None when the weight serves as is)."""
    if w is None or w.device.type != "cpu" or w.dtype == torch.float32:
        return None
    return w.float()


def _args(
    h_s, w_s, b_s, h_t, w_t, b_t, lp, idx, target, num_items, divergence, temperature, alpha, beta,
    tail, ignore_index, scale_by_t2, logit_map, reduction, chunk_size, group, vocab_start, vocab_total,
):  # fmt: skip
    return dict(
        shard=vocab_parallel.shard(group, w_s.shape[0], vocab_start, vocab_total) if group else None,
        h_s=h_s,
        w_s=w_s,
        b_s=b_s,
        w_s32=_cpu_f32_copy(w_s),
        h_t=h_t,
        w_t=w_t,
        b_t=b_t,
        w_t32=_cpu_f32_copy(w_t),
        lp=lp,
        idx=idx,
        target=target,
        num_items=num_items,
        divergence=divergence,
        temperature=temperature,
        alpha=alpha,
        beta=beta,
        tail=tail,
        ignore_index=ignore_index,
        scale_by_t2=scale_by_t2,
        logit_map=logit_map,
        reduction=reduction,
        chunk_size=chunk_size,
    )


@torch.library.custom_op("pykd::fused_linear_kd_fwd", mutates_args=())
def _fused_linear_kd_fwd(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    b_s: Optional[torch.Tensor],
    h_t: Optional[torch.Tensor],
    w_t: Optional[torch.Tensor],
    b_t: Optional[torch.Tensor],
    lp: Optional[torch.Tensor],
    idx: Optional[torch.Tensor],
    target: Optional[torch.Tensor],
    num_items: Optional[torch.Tensor],
    divergence: str,
    temperature: float,
    alpha: float,
    beta: float,
    tail: bool,
    ignore_index: int,
    scale_by_t2: bool,
    logit_map: list[float],
    reduction: str,
    need_h: bool,
    need_w: bool,
    need_b: bool,
    chunk_size: int,
    group: str,
    vocab_start: int,
    vocab_total: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, soft, hard, grad_h, grad_w, grad_b); the gradients only for "mean"/"sum" (else (0,)).
    group (a process group's name, "" for none): the weights hold the vocabulary slice
    [vocab_start, vocab_start + V) of vocab_total entries (pykd.vocab_parallel)."""
    a = _args(h_s, w_s, b_s, h_t, w_t, b_t, lp, idx, target, num_items, divergence, temperature, alpha, beta,
              tail, ignore_index, scale_by_t2, logit_map, reduction, chunk_size, group, vocab_start,
              vocab_total)  # fmt: skip
    need = (need_h, need_w, need_b and b_s is not None) if reduction != "none" else (False, False, False)
    return _drive(a, need=need)


@torch.library.custom_op("pykd::fused_linear_kd_bwd", mutates_args=())
def _fused_linear_kd_bwd(
    dloss: torch.Tensor,
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    b_s: Optional[torch.Tensor],
    h_t: Optional[torch.Tensor],
    w_t: Optional[torch.Tensor],
    b_t: Optional[torch.Tensor],
    lp: Optional[torch.Tensor],
    idx: Optional[torch.Tensor],
    target: Optional[torch.Tensor],
    num_items: Optional[torch.Tensor],
    divergence: str,
    temperature: float,
    alpha: float,
    beta: float,
    tail: bool,
    ignore_index: int,
    scale_by_t2: bool,
    logit_map: list[float],
    need_h: bool,
    need_w: bool,
    need_b: bool,
    chunk_size: int,
    group: str,
    vocab_start: int,
    vocab_total: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reduction="none" backward: recomputes the logits, scales row r's gradient by dloss[r]."""
    a = _args(h_s, w_s, b_s, h_t, w_t, b_t, lp, idx, target, num_items, divergence, temperature, alpha, beta,
              tail, ignore_index, scale_by_t2, logit_map, "none", chunk_size, group, vocab_start,
              vocab_total)  # fmt: skip
    need = (need_h, need_w, need_b and b_s is not None)
    _, _, _, gh, gw, gb = _drive(a, need=need, row_scale=dloss.to(torch.float32))
    return gh, gw, gb


def _grad_shapes(h_s, w_s, b_s, need_h, need_w, need_b):
    R, H, V = h_s.shape[0], h_s.shape[1], w_s.shape[0]
    return (
        h_s.new_empty((R, H) if need_h else (0,)),
        h_s.new_empty((V, H) if need_w else (0,)),
        h_s.new_empty((V,) if (need_b and b_s is not None) else (0,)),
    )


@_fused_linear_kd_fwd.register_fake
def _(h_s, w_s, b_s, h_t, w_t, b_t, lp, idx, target, num_items, divergence, temperature, alpha, beta, tail,
      ignore_index, scale_by_t2, logit_map, reduction, need_h, need_w, need_b, chunk_size, group, vocab_start,
      vocab_total):  # fmt: skip
    shape = (h_s.shape[0],) if reduction == "none" else ()
    losses = [h_s.new_empty(shape, dtype=torch.float32) for _ in range(3)]
    if reduction == "none":
        need_h = need_w = need_b = False
    return (*losses, *_grad_shapes(h_s, w_s, b_s, need_h, need_w, need_b))


@_fused_linear_kd_bwd.register_fake
def _(dloss, h_s, w_s, b_s, h_t, w_t, b_t, lp, idx, target, num_items, divergence, temperature, alpha, beta,
      tail, ignore_index, scale_by_t2, logit_map, need_h, need_w, need_b, chunk_size, group, vocab_start,
      vocab_total):  # fmt: skip
    return _grad_shapes(h_s, w_s, b_s, need_h, need_w, need_b)


def _setup_context(ctx, inputs, output):
    _, soft, hard, gh, gw, gb = output
    ctx.mark_non_differentiable(soft, hard, gh, gw, gb)
    ctx.set_materialize_grads(False)
    ctx.reduction = inputs[18]
    ctx.need = inputs[19:22]
    ctx.consumed = False
    if ctx.reduction == "none":
        # the recompute needs every input: tensors saved, the rest kept in place
        ctx.is_tensor = [isinstance(x, torch.Tensor) for x in inputs]
        ctx.static = [None if t else x for t, x in zip(ctx.is_tensor, inputs)]
        ctx.save_for_backward(*[x for x in inputs if isinstance(x, torch.Tensor)])
        return
    ctx.save_for_backward(gh, gw, gb)
    h_s = inputs[0]
    ctx.denominator = None  # fp16 grad_h defers the "mean" 1/n to backward (see kd_loss)
    if ctx.reduction == "mean" and not _backend.mean_scale_in_forward(h_s.dtype):
        ctx.denominator = _backend.reduction_denominator(
            inputs[8], h_s.shape[0], inputs[15], inputs[9], h_s.device
        )


def _backward(ctx, dloss, dsoft, dhard, dgh, dgw, dgb):
    _backend.refuse_double_backward("fused_linear_kd_loss")
    nones = (None,) * 23
    if dloss is None:
        return (None, None, None, *nones)
    if ctx.reduction == "none":
        saved = iter(ctx.saved_tensors)
        x = [next(saved) if t else v for t, v in zip(ctx.is_tensor, ctx.static)]
        gh, gw, gb = torch.ops.pykd.fused_linear_kd_bwd(dloss, *x[:18], *x[19:])
        return (gh if ctx.need[0] else None, gw if ctx.need[1] else None, gb if ctx.need[2] else None, *nones)
    if ctx.consumed:
        raise RuntimeError(
            "pykd.fused_linear_kd_loss: backward ran twice through the same graph; the gradients are "
            "computed in the forward and scaled in place, so recompute the loss instead of retain_graph=True"
        )
    gh, gw, gb = ctx.saved_tensors
    dh = dloss / ctx.denominator if ctx.denominator is not None else dloss
    eager = not torch.compiler.is_compiling() and all(type(t) is torch.Tensor for t in (gh, gw, gb))
    outs = []
    for g, d, needed in ((gh, dh, ctx.need[0]), (gw, dloss, ctx.need[1]), (gb, dloss, ctx.need[2])):
        if not needed:
            outs.append(None)
        elif eager:
            torch.ops.pykd.scale_rows_(g, d)  # in place; a no-op for grad_output == 1
            outs.append(g)
        else:
            outs.append(g * d)
    ctx.consumed = eager
    return (*outs, *nones)


def _bwd_no_double_backward(ctx, *grads):
    raise RuntimeError("pykd.fused_linear_kd_loss: double backward is not supported")


if has_cpp():
    torch.library.register_autograd("pykd::fused_linear_kd_fwd", _backward, setup_context=_setup_context)
    torch.library.register_autograd(
        "pykd::fused_linear_kd_bwd",
        _bwd_no_double_backward,
        setup_context=lambda ctx, inputs, output: None,
    )
