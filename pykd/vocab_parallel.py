"""Vocabulary-parallel logit distillation (DESIGN.md section 9): ``process_group=`` on the logit ops.

Each rank of the group holds a contiguous slice of the vocabulary, in rank order (the logits a
column-parallel lm_head gives, or a DTensor sharded on the last dim). The row kernels run in phases on
the local slice, with all-reduces of O(rows) floats between them; the logits are never gathered:

1. per row, the slice's (max, sum-exp) of the student (at T and at 1) and the teacher, and the
   divergence accumulator (kd_loss) or the top-K partial sums (topk_kd_loss); the target's logit
   where the slice holds it;
2. all-reduce MAX of the maxima, each rank rescales its sums to the global maxima, all-reduce SUM:
   every rank now has the full-vocabulary log-sum-exps, divergence and hard CE;
3. (jsd, tvd) partial sums of the second sweep from the global log-sum-exps, all-reduce SUM;
4. the gradient of the local slice, from the global row statistics.

Before any kernel, every rank checks its arguments and one all-gather of four integers per rank gives
each rank its slice's offset and checks that the ranks agree (no failed check, same rows, same
options), so bad input raises on every rank instead of hanging in a later collective. That gather
reads its result on the host, so the vocabulary-parallel path runs eagerly: torch.compile breaks the
graph around it (the single-process ops trace whole).
"""

from __future__ import annotations

import math
import zlib
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import _backend

# Group names the ops have seen: a custom op's schema carries the name, the op body resolves it here.
_GROUPS: dict[str, dist.ProcessGroup] = {}
_NEG_INF = float("-inf")


class Shard(NamedTuple):
    """This rank's slice [start, start + size) of a ``total``-entry vocabulary."""

    group: dist.ProcessGroup
    rank: int
    world: int
    start: int
    size: int
    total: int


def group_name(process_group) -> str:
    """The name a custom op's schema carries for ``process_group`` ("" for None), after checking it."""
    if process_group is None:
        return ""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group needs torch.distributed to be initialized (init_process_group)")
    if process_group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group gives ranks outside it
        raise ValueError("process_group does not contain this rank")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup, got {type(process_group).__name__}"
        )
    if dist.get_rank(process_group) < 0:
        raise ValueError("process_group does not contain this rank")
    name = process_group.group_name
    _GROUPS[name] = process_group
    return name


def unwrap(student, teacher, target, process_group):
    """(student, teacher, target, group name) for an op: DTensor logits sharded on their last dim of a
    1-D mesh become their local slices (differentiably) and name the mesh's group; plain tensors
    keep ``process_group`` ("" when None). teacher is None for the top-K ops."""
    try:
        from torch.distributed.tensor import DTensor, Replicate
        from torch.distributed.tensor import Shard as DShard
    except ImportError:  # pragma: no cover - torch builds without distributed
        return student, teacher, target, group_name(process_group)
    logits = [("student", student)] + ([("teacher", teacher)] if teacher is not None else [])
    dts = [isinstance(x, DTensor) for _, x in logits]
    if not any(dts):
        if isinstance(target, DTensor):
            raise TypeError("target is a DTensor but the logits are not")
        return student, teacher, target, group_name(process_group)
    if not all(dts):
        raise TypeError("student and teacher logits must both be DTensors, or neither")
    mesh = student.device_mesh
    for name, x in logits:
        p = x.placements
        if (
            x.device_mesh != mesh
            or mesh.ndim != 1
            or len(p) != 1
            or not (isinstance(p[0], DShard) and p[0].dim % x.dim() == x.dim() - 1)
        ):
            raise ValueError(
                f"{name} logits must be DTensors sharded on their last dim (Shard(-1)) of one 1-D mesh, "
                f"got placements {tuple(p)} on a {mesh.ndim}-D mesh"
            )
    group = mesh.get_group()
    if process_group is not None and process_group is not group:
        raise ValueError("process_group must be None or the DTensor logits' mesh group")
    if isinstance(target, DTensor):
        if target.placements != (Replicate(),):
            raise ValueError(f"a DTensor target must be replicated, got placements {target.placements}")
        target = target.to_local()
    teacher = teacher.to_local() if teacher is not None else None
    return student.to_local(), teacher, target, group_name(group)


def setup(name: str, student, prepare):
    """Runs ``prepare()`` -> (result, local vocabulary size, rows, signature of the options) on every
    rank of the group ``name``; one all-gather of (failed, size, rows, hash of the signature) per
    rank then gives each rank its slice's offset. A rank whose arguments failed its checks, or whose
    rows or options differ from the others', makes every rank raise (no later hang).
    Returns (result, Shard)."""
    group = _GROUPS[name]
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    error, result, size, rows, sig = None, None, 0, 0, 0
    try:
        result, size, rows, signature = prepare()
        # the group's members too: ranks that passed different groups disagree here when their
        # gathers happen to meet (a group's own collectives cannot see another group's)
        sig = zlib.crc32(repr((signature, dist.get_process_group_ranks(group))).encode())
    except (TypeError, ValueError) as e:
        error = e
    dev = student.device if isinstance(student, torch.Tensor) else torch.device("cpu")
    mine = torch.tensor([error is not None, size, rows, sig], dtype=torch.int64)
    mine = mine.to(_comm_device(group, dev))
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    table = torch.stack(every).cpu().tolist()
    failed = [r for r, row in enumerate(table) if row[0]]
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"rank(s) {failed} of process_group rejected their arguments (see their errors)")
    if any(row[2] != rows for row in table):
        raise ValueError(
            f"process_group ranks hold different numbers of rows ({[row[2] for row in table]}): every "
            "rank must pass the same rows, each with its own slice of the vocabulary"
        )
    if any(row[3] != sig for row in table):
        raise ValueError(
            "process_group ranks called the op with different options (divergence, temperature, "
            "alpha, target, reduction, dtype...): every rank must make the same call"
        )
    sizes = [row[1] for row in table]
    even = -(-sum(sizes) // world)  # ceil: the largest slice of an even split
    if max(sizes) > even:  # e.g. one rank passed the whole vocabulary, the others their slices
        raise ValueError(
            f"process_group ranks' vocabulary slices {sizes} do not split the vocabulary evenly (none "
            f"may exceed {even} = ceil({sum(sizes)} / {world}), as torch.tensor_split and DTensor's "
            "Shard give): every rank passes its own contiguous slice"
        )
    out = Shard(group, rank, world, sum(sizes[:rank]), size, sum(sizes))
    return result, out


def shard(name: str, size: int, start: int, total: int) -> Shard:
    """The Shard a custom op's arguments (group name, slice size, offset, total) describe."""
    group = _GROUPS[name]
    return Shard(group, dist.get_rank(group), dist.get_world_size(group), start, size, total)


def _comm_device(group, device):
    """Where the op's small collective tensors live: CPU for gloo, the current GPU for NCCL, else
    the logits' device."""
    backend = str(dist.get_backend(group))
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _all_reduce(x: torch.Tensor, op, shard: Shard, kind: str = "row_stats") -> torch.Tensor:
    """x all-reduced over the shard's group, in place (through a copy when x is not contiguous or
    not on the group's device); returns x."""
    dev = _comm_device(shard.group, x.device)
    y = x.to(dev) if dev != x.device else x.contiguous()
    COMM_BYTES[kind] += y.numel() * y.element_size()
    dist.all_reduce(y, op=op, group=shard.group)
    if y.data_ptr() != x.data_ptr():
        x.copy_(y)
    return x


def sum_hidden_grad_(grad: torch.Tensor, shard: Shard) -> None:
    """In place: the hidden states' gradient summed over the ranks. Each rank's slice of the lm_head
    gives a partial d loss / d hidden; the hidden states are the same on every rank (replicated, as
    a column-parallel lm_head takes them), so their gradient is the sum."""
    if grad.numel():
        _all_reduce(grad, dist.ReduceOp.SUM, shard, kind="hidden_grad")


# Bytes this process has all-reduced through the vocabulary-parallel ops, by kind (benchmarks read it).
COMM_BYTES = {"row_stats": 0, "hidden_grad": 0}


def check_target(target, shard: Shard, ignore_index: int) -> None:
    """Targets index the whole vocabulary: [0, total) or ignore_index (on CPU always, on CUDA under
    pykd.set_debug, as for the single-process ops)."""
    if target is None or not (target.device.type == "cpu" or _backend.debug()):
        return
    counted = target[target != ignore_index]
    bad = counted[(counted < 0) | (counted >= shard.total)]
    if bad.numel():
        raise ValueError(
            f"target values must be in [0, {shard.total}) (the vocabulary over every rank of "
            f"process_group) or ignore_index={ignore_index}, found {bad[0].item()}"
        )


def _combine_stats(stats: torch.Tensor, acc_col: int | None, shard: Shard, *, empty_is_nan: bool):
    """Phase-1 stats of every rank, (R, >= 8) with three (max, sum-exp) pairs in columns 0-5, an
    accumulator in 6 and the target's logit in 7 -> the global (lse (R, 3), sums (R, 3), the
    accumulator (rescaled to the global max of pair ``acc_col`` unless None), the target's logit).
    A slice whose entries are all -inf adds 0; a pair that is -inf on every rank gives NaN
    (``empty_is_nan``: kd_loss's rows, as a whole row does) or -inf (top-K's empty tail)."""
    m = stats[:, [0, 2, 4]]
    big = _all_reduce(m.clone(), dist.ReduceOp.MAX, shard)
    empty = (m == _NEG_INF) & (big != _NEG_INF) if empty_is_nan else m == _NEG_INF
    fac = torch.where(empty, 0.0, torch.exp(m - big))
    sums = torch.empty((stats.shape[0], 5), device=stats.device, dtype=torch.float32)
    sums[:, :3] = stats[:, [1, 3, 5]] * fac
    sums[:, 3] = stats[:, 6] if acc_col is None else stats[:, 6] * fac[:, acc_col]
    sums[:, 4] = stats[:, 7]
    _all_reduce(sums, dist.ReduceOp.SUM, shard)
    lse = big + torch.log(sums[:, :3])
    return lse, sums[:, :3], sums[:, 3], sums[:, 4]


def kd_loss_rows(
    student, teacher, target, num_items, divergence, temperature, alpha, beta, ignore_index, scale_by_t2,
    logit_map, reduction, compute_grad, shard: Shard, grad_dtype=None,
):  # fmt: skip
    """``pykd::kd_loss_fwd``'s (loss, soft, hard, grad) on this rank's (R, V_local) slices; loss,
    soft and hard are the full-vocabulary values (the same on every rank), grad the local slice of
    d loss / d student."""
    has_t = target is not None
    need_h = has_t and (temperature != 1.0 or divergence == "mse")
    n, scale, op = _phase_op("kd_loss_shard", student, target, ignore_index, num_items, reduction, grad_dtype)

    def phase(k, stats=None):
        return op(student, teacher, target, stats, scale, divergence, temperature, alpha, beta, ignore_index,
                  scale_by_t2, logit_map, k, shard.start, shard.total)  # fmt: skip

    acc_col = {"kl": 1, "soft_ce": 1, "reverse_kl": 0}.get(divergence)
    lse, l_sum, acc, s_y = _combine_stats(phase(1), acc_col, shard, empty_is_nan=True)
    lse_s, lse_t = lse[:, 0], lse[:, 1]
    lse_h = lse[:, 2] if need_h else lse_s
    stat = torch.zeros_like(lse_s)
    if divergence == "kl":
        soft = acc / l_sum[:, 1] - lse_t + lse_s
    elif divergence == "reverse_kl":
        soft = stat = acc / l_sum[:, 0] - lse_s + lse_t
    elif divergence == "soft_ce":
        soft = -acc / l_sum[:, 1] + lse_s
    elif divergence == "mse":
        soft = acc / shard.total
    else:  # jsd, tvd: a second sweep from the global log-sum-exps
        x = _all_reduce(phase(2, torch.stack([lse_s, lse_t], 1)), dist.ReduceOp.SUM, shard)
        soft = beta * x[:, 0] + (1.0 - beta) * x[:, 1] if divergence == "jsd" else 0.5 * x[:, 0]
        stat = x[:, 1]
    poison = torch.zeros_like(lse_s)
    if divergence != "mse":
        poison = torch.where(torch.isnan(lse_s + lse_t), math.nan, 0.0)
    soft = soft + poison
    grad = phase(3, torch.stack([lse_s, lse_t, lse_h, stat, poison], 1)) if compute_grad else None
    alpha_w = _backend.soft_weight(divergence, temperature, alpha, scale_by_t2)
    return _finish(soft, lse_h - s_y, grad, student, target, ignore_index, alpha_w, alpha, reduction, n,
                   grad_dtype)  # fmt: skip


def _phase_op(name, student, target, ignore_index, num_items, reduction, grad_dtype):
    """(n, scale, op) for a row loss on a slice: the "mean" denominator, the factor the stored
    gradient carries, and the phase op ``pykd::<name>`` (Triton's launcher itself when the gradient's
    dtype is not the logits', an option the op's schema does not carry)."""
    R, dev = student.shape[0], student.device
    n, scale = _backend.row_loss_scale(target, R, ignore_index, num_items, reduction, student.dtype, dev)
    op = getattr(torch.ops.pykd, name)
    if grad_dtype is not None and grad_dtype != student.dtype and _backend.runs_triton(dev):
        launcher = _backend.triton_launcher(name)

        def op(*args):
            return launcher(*args, grad_dtype=grad_dtype)

    return n, scale, op


def _finish(soft, hard, grad, student, target, ignore_index, alpha_w, alpha, reduction, n, grad_dtype):
    """kd_loss_fwd's (loss, soft, hard, grad) from the rows' full-vocabulary soft and hard terms:
    ignored rows count for nothing (their stats are zeros, so their terms are garbage until here)."""
    if target is None:
        hard = torch.zeros_like(soft)
    else:
        keep = target != ignore_index
        soft = torch.where(keep, soft, 0.0)
        hard = torch.where(keep, hard, 0.0)
    if grad is None:
        grad = student.new_empty((0,), dtype=grad_dtype or student.dtype)
    loss, soft, hard = _backend.finish_rows(soft, hard, alpha_w, alpha, reduction, n)
    return loss, soft, hard, grad


def topk_loss_rows(
    student, lp, idx, target, num_items, temperature, alpha, tail, ignore_index, scale_by_t2, logit_map,
    reduction, compute_grad, shard: Shard, grad_dtype=None,
):  # fmt: skip
    """``pykd::topk_kd_loss_fwd``'s (loss, soft, hard, grad) on this rank's (R, V_local) student slice;
    the top-K rows (R, K) hold global ids, sorted; ids >= the whole vocabulary are dropped."""
    need_h = target is not None and temperature != 1.0
    n, scale, op = _phase_op("topk_kd_loss_shard", student, target, ignore_index, num_items, reduction,
                             grad_dtype)  # fmt: skip

    def phase(k, stats=None):
        return op(student, lp, idx, target, stats, scale, temperature, alpha, tail, ignore_index, scale_by_t2,
                  logit_map, k, shard.start, shard.total)  # fmt: skip

    st = phase(1)  # (m, l) of the sweep, of the raw logits, of the K entries; pz, f(s)[y], sum_p, plp
    lse3, _, pz, s_y = _combine_stats(st, None, shard, empty_is_nan=False)
    lse_a, lse_hh, lse_in = lse3.unbind(1)
    sum_p, plp = st[:, 8], st[:, 9]
    zero = torch.zeros_like(lse_a)
    if tail:
        lse_out, lse = lse_a, torch.logaddexp(lse_in, lse_a)
        kept = ((idx >= 0) & (idx < shard.total)).sum(-1)
        has_tail = (kept < shard.total) & (lse_out > _NEG_INF)
        p_tail = torch.where(has_tail, (1.0 - sum_p).clamp_min(0.0), 0.0)
        mass = sum_p + p_tail
    else:
        lse_out, lse, p_tail, mass = zero, lse_a, zero, torch.ones_like(lse_a)
    soft = plp - pz + sum_p * lse
    p_safe = torch.where(p_tail > 0, p_tail, 1.0)
    soft = soft + torch.where(p_tail > 0, p_tail * (torch.log(p_safe) - lse_out + lse), 0.0)
    lse_h = lse_hh if need_h else lse
    grad = phase(2, torch.stack([lse, lse_out, lse_h, p_tail, mass], 1)) if compute_grad else None
    alpha_w = _backend.soft_weight("kl", temperature, alpha, scale_by_t2)
    return _finish(soft, lse_h - s_y, grad, student, target, ignore_index, alpha_w, alpha, reduction, n,
                   grad_dtype)  # fmt: skip
