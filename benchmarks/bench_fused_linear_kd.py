"""Benchmark of pykd.fused_linear_kd_loss: lm_head matmuls + JSD (beta 0.5, T 1) from hidden states,
forward / backward / both, with gradients to the student's hidden states and lm_head weight.

Providers: ``pykd``; ``eager`` (materialized fp32 logits of both models, log_softmax, JSD: what users
write); ``compile`` (torch.compile of eager); ``liger_fused_linear_jsd`` (Liger-Kernel's
LigerFusedLinearJSDLoss) when liger-kernel is installed and the device is a GPU; ``gemm_floor`` (GPU:
the four BT x H x V matmuls the op cannot avoid, timed with torch.mm in the input dtype: student and
teacher logits, the hidden and weight gradients). JSD is the divergence Liger offers fused; pykd's
others cost the same GEMMs.
Times are medians (p20, p80) in ms; memory is the peak above what was allocated before the call
(MB), for forward+backward (CPU: in a fresh process). A provider that runs out of memory is
reported and skipped for larger BT.

    python benchmarks/bench_fused_linear_kd.py                 # CPU: BT 1024..4096, H 512, V 32000, fp32
    python benchmarks/bench_fused_linear_kd.py --device cuda   # GPU: BT 1024..16384, H 4096, V 128256, bf16
    pykd bench fused_linear_kd --quick
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import sys

import torch

import pykd
from pykd.benchmarks.common import (
    ProviderLoop,
    Recorder,
    device_name,
    fresh_process_peak_mb,
    peak_extra_mb,
    record_times,
    time_ms,
)

BETA = 0.5


def fused(hs, ws, ht, wt, y):
    return pykd.fused_linear_kd_loss(hs, ws, ht, wt, y, divergence="jsd", beta=BETA, alpha=1.0)


def eager(hs, ws, ht, wt, y):
    ls = torch.log_softmax((hs @ ws.t()).float(), -1)
    lt = torch.log_softmax((ht @ wt.t()).float(), -1)
    lm = torch.logsumexp(torch.stack([lt + math.log(BETA), ls + math.log1p(-BETA)]), 0)
    jsd = BETA * (lt.exp() * (lt - lm)).sum(-1) + (1 - BETA) * (ls.exp() * (ls - lm)).sum(-1)
    valid = y != -100
    return (jsd * valid).sum() / valid.sum().clamp_min(1)


def providers(device: torch.device, wanted: list[str]):
    out = {"pykd": fused, "eager": eager}
    if "compile" in wanted:
        out["compile"] = torch.compile(eager, dynamic=False)
    if device.type == "cuda" and any(w.startswith("liger") for w in wanted):
        try:
            from liger_kernel.transformers import LigerFusedLinearJSDLoss
        except ImportError:
            print("liger-kernel not installed: skipping liger_fused_linear_jsd")
        else:
            mod = LigerFusedLinearJSDLoss(jsd_beta=BETA, ignore_index=-100, temperature=1.0)
            out["liger_fused_linear_jsd"] = lambda hs, ws, ht, wt, y: mod(hs, ws, ht, wt, y)
    return {k: v for k, v in out.items() if any(k == w or k.startswith(w + "_") for w in wanted)}


def _inputs(bt, h, v, device, dtype):
    torch.manual_seed(0)
    hs = torch.randn(bt, h, device=device).to(dtype)
    ws = (torch.randn(v, h, device=device) * (3 / h**0.5)).to(dtype)
    ht = torch.randn(bt, h, device=device).to(dtype)
    wt = (torch.randn(v, h, device=device) * (3 / h**0.5)).to(dtype)
    y = torch.randint(0, v, (bt,), device=device)
    y[torch.rand(bt, device=device) < 0.1] = -100
    return hs, ws, ht, wt, y


def measure(rec: Recorder, name: str, fn, inputs, bt: int, device, reps: int, args) -> None:
    hs0, ws0, ht, wt, y = inputs
    state = {}

    def fresh():
        state["x"] = [hs0.clone().requires_grad_(True), ws0.clone().requires_grad_(True)]

    def forward():
        state["loss"] = fn(*state["x"], ht, wt, y)

    def backward():
        state["loss"].backward()

    full = record_times(rec, name, bt, device, reps, fresh, forward, backward)
    state.clear()
    gc.collect()
    if device.type == "cpu":
        peak = fresh_process_peak_mb(
            "pykd.benchmarks.bench_fused_linear_kd", [name, bt, args.hidden, args.vocab, args.dtype]
        )
    else:
        fresh()
        peak = peak_extra_mb(full, device)
    rec.add(name, "full", "memory", "MB", bt, peak)
    state.clear()
    gc.collect()


def gemm_floor(rec: Recorder, inputs, bt: int, device, reps: int) -> None:
    """The four unavoidable GEMMs, each BT x H x V, in the input dtype."""
    hs, ws, ht, wt, _ = inputs
    g = torch.randn(bt, ws.shape[0], device=device).to(hs.dtype)

    def four():
        torch.mm(hs, ws.t())
        torch.mm(ht, wt.t())
        torch.mm(g, ws)
        torch.mm(g.t(), hs)

    four()
    rec.add("gemm_floor", "full", "time", "ms", bt, time_ms(four, device, reps=reps))


def _child_memory(name, bt, h, v, dtype) -> None:
    hs, ws, ht, wt, y = _inputs(int(bt), int(h), int(v), torch.device("cpu"), getattr(torch, dtype))
    x = [hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)]
    fn = providers(torch.device("cpu"), [name])[name]

    def full():
        fn(*x, ht, wt, y).backward()

    print("peak_extra_mb", peak_extra_mb(full, torch.device("cpu")))


def run(args) -> Recorder:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rec = Recorder("fused_linear_kd", device, args.dtype, "BT", [])
    print(f"fused_linear_kd on {device_name(device)}: H={args.hidden} V={args.vocab} {args.dtype}, jsd")
    fns = providers(device, args.providers)
    loop = ProviderLoop(device, "BT")
    for bt in args.rows:
        inputs = _inputs(bt, args.hidden, args.vocab, device, dtype)
        if device.type == "cuda" and "gemm_floor" in args.providers:
            gemm_floor(rec, inputs, bt, device, args.reps)
        for name, fn in fns.items():
            loop.run(name, bt, functools.partial(measure, rec, name, fn, inputs, bt, device, args.reps, args))
    return rec


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child-memory"]:
        return _child_memory(*argv[1:])
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    p.add_argument("--rows", type=int, nargs="+", default=None, help="BT values")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--providers", nargs="+", default=["pykd", "eager", "compile", "liger", "gemm_floor"])
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="one small size (256 rows), pykd and eager only")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.hidden = args.hidden or (4096 if gpu else 512)
    args.vocab = args.vocab or (128256 if gpu else 8192 if args.quick else 32000)
    args.rows = args.rows or ([1024, 2048, 4096, 8192, 16384] if gpu else [1024, 2048, 4096])
    args.reps = args.reps or (10 if gpu else 3)
    if args.quick:  # 256 rows (and V 8192 on CPU): a smoke run of the main code path in seconds
        args.rows, args.reps = [min(256, min(args.rows))], 3
        args.providers = [x for x in args.providers if x in ("pykd", "eager")]
    rec = run(args)
    out = f"{args.out_dir}/{device_name(torch.device(args.device))}"
    csv_path, png = rec.write(out, "fused_linear_kd" + ("_quick" if args.quick else ""))
    print(f"wrote {csv_path}" + (f" and {png}" if png else ""))
    return rec


if __name__ == "__main__":
    main()
