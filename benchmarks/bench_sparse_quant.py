"""Benchmark of sparse and quantized student attention (pykd.sparse_attention, pykd.quantized_attention):
speed forward / backward / both, and accuracy beside it.

Providers: ``dense`` (pykd.attention, the same kernels without a spec); ``sparse`` (a random block
mask with exactly round(density * blocks) key blocks per query block row, block size 64);
``quant`` (int8 Q/K with K smoothing, fp8 e4m3 P; backward straight-through); ``quant_qk``
(int8 Q/K only); ``sdpa`` (torch scaled_dot_product_attention, dense); ``flex`` (FlexAttention with
the same block mask, compiled; forward only on CPU, where torch has no FlexAttention backward); on
CUDA ``sage`` (SageAttention, forward only, when installed).

Two sweeps, two CSVs: ``sparse_quant_n`` (x = N at --density, every provider) and
``sparse_quant_density`` (x = density in percent, at --density-n; dense, sparse, sdpa, flex).
Accuracy rows (metric ``cosine`` and ``rel_l1``, mode ``fwd``) compare each provider's output with
fp32 dense attention of the same pattern: on normal inputs, and (``*_koffset``) with a common offset
of 20 added to K.

    python benchmarks/bench_sparse_quant.py                 # CPU: B1 H4 D64 fp32
    python benchmarks/bench_sparse_quant.py --device cuda   # GPU: B1 H16 D128 bf16, N 1k..32k
    pykd bench sparse_quant --quick
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.nn.functional as F

import pykd
from pykd.benchmarks.common import ProviderLoop, Recorder, device_name, record_times

BLOCK = 64
DENSITY_PROVIDERS = ("dense", "sparse", "sdpa", "flex")  # the density sweep's: quantization is dense


def block_mask(H: int, N: int, density: float, device) -> torch.Tensor:
    """(1, H, nb, nb): each query block row keeps max(1, round(density * nb)) random key blocks."""
    nb = -(-N // BLOCK)
    keep = max(1, round(density * nb))
    g = torch.Generator().manual_seed(0)
    idx = torch.rand((1, H, nb, nb), generator=g).argsort(-1)[..., :keep]
    return torch.zeros(1, H, nb, nb, dtype=torch.bool).scatter_(-1, idx, True).to(device)


def _flex(bm, B, H, N, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q, kv):
        return bm[0, h, q // BLOCK, kv // BLOCK]

    mask = create_block_mask(mask_mod, B, H, N, N, device=device, BLOCK_SIZE=BLOCK)
    fn = torch.compile(flex_attention)
    return lambda q, k, v: fn(q, k, v, block_mask=mask)


def _sage():
    try:
        from sageattention import sageattn
    except ImportError:
        return None
    return lambda q, k, v: sageattn(q, k, v, tensor_layout="HND", is_causal=False)


def providers(args, bm, B, H, N, device):
    quant = pykd.AttentionSpec(qk_format="int8", pv_format="fp8_e4m3", block_size=BLOCK)
    quant_qk = pykd.AttentionSpec(qk_format="int8", block_size=BLOCK)
    sparse = pykd.AttentionSpec(block_mask=bm, block_size=BLOCK)
    out = {
        "dense": lambda q, k, v: pykd.attention(q, k, v),
        "sparse": lambda q, k, v: pykd.attention(q, k, v, spec=sparse),
        "quant": lambda q, k, v: pykd.attention(q, k, v, spec=quant),
        "quant_qk": lambda q, k, v: pykd.attention(q, k, v, spec=quant_qk),
        "sdpa": F.scaled_dot_product_attention,
    }
    if "flex" in args.providers:
        out["flex"] = _flex(bm, B, H, N, device)
    if device.type == "cuda":
        sage = _sage()
        if sage is not None:
            out["sage"] = sage
    return {k: v for k, v in out.items() if k in args.providers}


def accuracy(rec, name, fn, spec_ref, q, k, v, x):
    """cosine and relative L1 of fn's output against fp32 dense attention of the same pattern."""
    with torch.no_grad():
        ref = pykd.attention(q.float(), k.float(), v.float(), spec=spec_ref).double()
        out = fn(q, k, v).double()
    cos = F.cosine_similarity(out.flatten(), ref.flatten(), 0).item()
    l1 = ((out - ref).abs().sum() / ref.abs().sum()).item()
    rec.add(name, "fwd", "cosine", "1", x, cos)
    rec.add(name, "fwd", "rel_l1", "1", x, l1)


def measure(rec, name, fn, inputs, go, x, device, reps, spec_ref):
    q0, k0, v0 = inputs
    state = {}
    # SageAttention has no backward; FlexAttention has none on CPU
    forward_only = name == "sage" or (name == "flex" and device.type != "cuda")

    def fresh():
        state["x"] = [t.clone().requires_grad_(not forward_only) for t in (q0, k0, v0)]

    def forward():
        state["r"] = fn(*state["x"])

    def backward():
        (state["r"] * go).sum().backward()

    if forward_only:
        fresh()
        from pykd.benchmarks.common import time_ms

        forward()
        rec.add(name, "fwd", "time", "ms", x, time_ms(forward, device, reps=reps, setup=fresh))
    else:
        record_times(rec, name, x, device, reps, fresh, forward, backward)
    state.clear()
    accuracy(rec, name, fn, spec_ref, q0, k0, v0, x)
    if name in ("quant", "quant_qk", "sage"):
        accuracy(rec, f"{name}_koffset", fn, spec_ref, q0, k0 + 20.0, v0, x)


def _inputs(shape, device, dtype):
    torch.manual_seed(0)
    return [torch.randn(shape, device=device).to(dtype) for _ in range(4)]


def sweep(args, x_name, points):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rec = Recorder("sparse_quant", device, args.dtype, x_name, [])
    loop = ProviderLoop(device, x_name)
    B, H, D = args.batch, args.heads, args.head_dim
    for N, density, x in points:
        print(
            f"sparse_quant on {device_name(device)}: B={B} H={H} N={N} D={D} {args.dtype}, density {density}"
        )
        *inputs, go = _inputs((B, H, N, D), device, dtype)
        bm = block_mask(H, N, density, device)
        for name, fn in providers(args, bm, B, H, N, device).items():
            if x_name == "density_pct" and name not in DENSITY_PROVIDERS:
                continue
            spec_ref = (
                pykd.AttentionSpec(block_mask=bm, block_size=BLOCK) if name in ("sparse", "flex") else None
            )
            loop.run(
                name, x, functools.partial(measure, rec, name, fn, inputs, go, x, device, args.reps, spec_ref)
            )
    return rec


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cuda = torch.cuda.is_available()
    names = ["dense", "sparse", "quant", "quant_qk", "sdpa", "flex", "sage"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    p.add_argument("--seq", type=int, nargs="+", default=None, help="N of the N sweep")
    p.add_argument("--density", type=float, default=None, help="block density of the N sweep")
    p.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    p.add_argument("--density-n", type=int, default=None, help="N of the density sweep")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--providers", nargs="+", choices=names, help="default: all (--quick: all but flex)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="one small size, no density sweep")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    # a quick run skips flex: its torch.compile takes longer than the whole quick sweep
    args.providers = args.providers or [n for n in names if not (args.quick and n == "flex")]
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.heads = args.heads or (16 if gpu else 4)
    args.head_dim = args.head_dim or (128 if gpu else 64)
    args.seq = args.seq or ([1024, 2048, 4096, 8192, 16384, 32768] if gpu else [1024, 2048, 4096])
    args.density = args.density or (0.1 if gpu else 0.25)
    args.density_n = args.density_n or (16384 if gpu else 4096)
    args.reps = args.reps or (10 if gpu else 3)
    out = f"{args.out_dir}/{device_name(torch.device(args.device))}"
    runs = [("N", [(n, args.density, n) for n in args.seq], "sparse_quant_n")]
    if args.quick:
        runs = [("N", [(min(args.seq), args.density, min(args.seq))], "sparse_quant_n_quick")]
        args.reps = 3
    else:
        pts = [(args.density_n, d, round(100 * d, 3)) for d in args.densities]
        runs.append(("density_pct", pts, "sparse_quant_density"))
    recs = []
    for x_name, points, stem in runs:
        rec = sweep(args, x_name, points)
        csv_path, png = rec.write(out, stem, baseline=("sdpa", "dense"), target="sparse")
        print(f"wrote {csv_path}" + (f" and {png}" if png else ""))
        recs.append(rec)
    return recs


if __name__ == "__main__":
    main()
