"""Triton kernel of ``pykd::quantize_tokens``: the Q/K quantization pre-pass of a quantized student
(DESIGN.md section 6; CPU version in csrc/sparse_quant.cpp).

One program per (block of BS tokens, batch * head) of x (B, H, N, D), one read of x:

    y      = x - mean_{b,h}            (the token mean, when given: K smoothing)
    scale  = amax|y| / L               (L = 127 int8, 448 fp8 e4m3; 1 for an all-zero block, NaN
                                        for a block holding a NaN)
    codes  = rne(y / scale) in [-127, 127]  or  fp8_e4m3_rne(clamp(y / scale, +-448))
    deq    = codes * scale

in fp32 with IEEE-rounded divisions (div_rn), so the codes are those of
``pykd.reference.quantize_tokens`` bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import new_output, rint_even

FORMATS = ("int8", "fp8_e4m3")


@triton.jit
def _quantize_tokens_kernel(
    x_ptr, mean_ptr, codes_ptr, scale_ptr, deq_ptr,
    stride_xb, stride_xh, stride_xn, stride_xd, H, N, NB, levels,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr, HAS_MEAN: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = blk * BS + tl.arange(0, BS)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    x_base = x_ptr + b * stride_xb + h * stride_xh
    x = tl.load(x_base + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=ok, other=0.0)
    y = x.to(tl.float32)
    if HAS_MEAN:
        mu = tl.load(mean_ptr + bh * D + offs_d, mask=offs_d < D, other=0.0)
        y = tl.where(ok, y - mu[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(y), 1), 0)
    scale = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, levels))
    has_nan = tl.sum(tl.sum((y != y).to(tl.int32), 1), 0) > 0
    scale = tl.where(has_nan, float("nan"), scale)  # a NaN in the block: NaN scale, NaN scores
    z = tl.math.div_rn(y, tl.zeros_like(y) + scale)
    if FP8:
        c = tl.minimum(tl.maximum(z, -448.0), 448.0).to(tl.float8e4nv, fp_downcast_rounding="rtne")
        cf = c.to(tl.float32)
    else:
        cf = tl.minimum(tl.maximum(rint_even(z), -127.0), 127.0)
        c = cf.to(tl.int8)
    out = bh * N * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(codes_ptr + out, c, mask=ok)
    tl.store(deq_ptr + out, cf * scale, mask=ok)
    tl.store(scale_ptr + bh * NB + blk, scale)


def quantize_tokens(x: torch.Tensor, mean: torch.Tensor | None, fmt: str, block_size: int):
    """Launcher of ``pykd::quantize_tokens``: (codes (B, H, N, D) int8 / float8_e4m3fn, scale
    (B, H, ceil(N / block_size)) fp32, deq (B, H, N, D) fp32); see the module docstring."""
    if x.dim() != 4 or fmt not in FORMATS or block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(
            f"pykd: quantize_tokens needs x (B, H, N, D), fmt in {FORMATS} and a power-of-two block_size"
        )
    B, H, N, D = x.shape
    nb = -(-N // block_size)
    fp8 = fmt == "fp8_e4m3"
    codes = torch.empty((B, H, N, D), device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    scale = new_output((B, H, nb), device=x.device, dtype=torch.float32)
    deq = new_output((B, H, N, D), device=x.device, dtype=torch.float32)
    if B * H * nb == 0 or D == 0:
        return codes, scale, deq
    mu = mean.float().contiguous() if mean is not None else scale
    BLOCK_D = triton.next_power_of_2(D)
    _quantize_tokens_kernel[(nb, B * H)](
        x, mu, codes, scale, deq, *x.stride(), H, N, nb, 448.0 if fp8 else 127.0,
        D=D, BLOCK_D=BLOCK_D, BS=block_size, HAS_MEAN=mean is not None, FP8=fp8,
        num_warps=4 if block_size * BLOCK_D <= 8192 else 8,
    )  # fmt: skip
    return codes, scale, deq


__all__ = ["quantize_tokens", "FORMATS"]
