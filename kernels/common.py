"""Pieces shared by the Triton launchers."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._backend import finish_rows, row_loss_scale, soft_weight  # noqa: F401  (the launchers' imports)

# Order is the kernels' DIV constexpr; pykd.kd_loss validates names against it.
DIVERGENCES = ("kl", "reverse_kl", "soft_ce", "jsd", "tvd", "mse")


@triton.jit
def rint_even(x):
    """x rounded to the nearest integer, ties to even, for |x| < 2^22: adding 1.5 * 2^23 leaves no
    fraction bits (what torch.round does)."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def tanh(x):
    """tanh(x): an odd Taylor polynomial below |x| = 1/4 (where 1 - e^{-2|x|} would cancel), else
    (1 - e) / (1 + e) with e = e^{-2|x|} (the C++ kernels' vtanh). tanh(+-inf) = +-1."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    poly = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    return tl.where(ax < 0.25, poly, tl.where(x < 0.0, -big, big))


@triton.jit
def logit_map(x, mask, scale, cap, CAP: tl.constexpr):
    """logit_scale / logit_softcap: f(x) = cap tanh(scale x / cap) (CAP), else scale x. Entries off
    `mask` stay -inf (f(-inf) = -cap would give them mass)."""
    x = x * scale
    if CAP:
        x = tl.where(mask, cap * tanh(x / cap), float("-inf"))
    return x


@triton.jit
def logit_map_grad(y, scale, cap, CAP: tl.constexpr):
    """f'(x) from y = f(x): scale (1 - (y / cap)^2) (CAP), else scale."""
    if CAP:
        u = y / cap
        d = scale * (1.0 - u) * (1.0 + u)
    else:
        d = tl.zeros_like(y) + scale  # one return type for both branches (the GPU compiler's rule)
    return d


def logit_map_args(logit_map):
    """(scale, cap, CAP) kernel arguments of one side of a logit_map list."""
    scale, cap = float(logit_map[0]), float(logit_map[1])
    return scale, (cap if cap > 0 else 1.0), cap > 0


def new_output(shape, *, device, dtype) -> torch.Tensor:
    """A fresh output tensor; NaN-filled when PYKD_POISON_OUTPUTS=1 (tests), so any element a
    kernel fails to write shows up instead of passing on whatever memory held."""
    return _poisoned(torch.empty(shape, device=device, dtype=dtype))


def grad_output(shape, *, device, dtype, out=None) -> torch.Tensor:
    """A row kernel's (R, V) gradient: fresh, or ``out`` (a caller's contiguous buffer of that shape
    and dtype: fused_linear_kd_loss's gradient group), poisoned like new_output."""
    if out is None:
        return new_output(shape, device=device, dtype=dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"grad_out must be a contiguous {tuple(shape)} {dtype} tensor")
    return _poisoned(out)


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    if os.environ.get("PYKD_POISON_OUTPUTS") == "1" and t.is_floating_point():
        t.fill_(float("nan"))
    return t


@triton.jit
def zero_row(
    soft_ptr, hard_ptr, g_ptr, row64, stride_g, V, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr
):
    """A row that counts for nothing (ignored target): exactly 0 loss and 0 gradient."""
    tl.store(soft_ptr + row64, 0.0)
    tl.store(hard_ptr + row64, 0.0)
    if COMPUTE_GRAD:
        zero_grad_row(g_ptr, row64, stride_g, V, BLOCK_V)


@triton.jit
def zero_grad_row(g_ptr, row64, stride_g, V, BLOCK_V: tl.constexpr):
    """Row row64 of the (R, V) gradient set to exactly 0."""
    g_row = g_ptr + row64 * stride_g
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        zero = tl.zeros([BLOCK_V], dtype=tl.float32)
        tl.store(g_row + offs, zero.to(g_ptr.dtype.element_ty), mask=offs < V)


@triton.jit
def _scale_rows_kernel(x_ptr, scale_ptr, C, n_elem, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """x[r, c] *= scale[r] (PER_ROW) or scale[0]; returns at once when a shared scale is exactly 1,
    so the common loss.backward() costs no pass over x."""
    if not PER_ROW:
        sc = tl.load(scale_ptr).to(tl.float32)
        if sc == 1.0:
            return
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elem
    if PER_ROW:
        sc = tl.load(scale_ptr + offs // C, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_ptr + offs, (x * sc).to(x_ptr.dtype.element_ty), mask=mask)


def scale_rows_(x: torch.Tensor, scale: torch.Tensor) -> None:
    """In place: contiguous x (R, C) times scale (0-d or (R,))."""
    n = x.numel()
    if n == 0:
        return
    C = x.shape[-1] if x.dim() > 0 else 1
    scale = scale.contiguous()
    block = 4096
    _scale_rows_kernel[(triton.cdiv(n, block),)](x, scale, C, n, PER_ROW=scale.numel() != 1, BLOCK=block)


@triton.jit
def block_start(v0, V, BLOCK_V: tl.constexpr, BACKWARD: tl.constexpr):
    """First column of the block that a row sweep ``for v0 in range(0, V, BLOCK_V)`` visits at v0:
    v0 itself (the loop keeps its plain form, and its code, when not BACKWARD), or, BACKWARD, the
    blocks from last to first."""
    if BACKWARD:
        return (tl.cdiv(V, BLOCK_V) - 1) * BLOCK_V - v0
    return v0


_SM_COUNT: dict = {}


def row_programs(R: int, device: torch.device, cap: int, per_sm: int) -> int:
    """Grid of a row kernel for R rows: one program per row up to cap, or (per_sm > 0, CUDA) per_sm
    programs per SM striding over the rows."""
    n = min(R, cap)
    if per_sm and device.type == "cuda":
        if device not in _SM_COUNT:
            _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
        n = min(n, per_sm * _SM_COUNT[device])
    return n
