"""Benchmark of pykd.kd_loss: kl at T=2 plus hard CE (alpha=0.5), forward / backward / both.

Providers: ``pykd``; ``eager`` (log_softmax + kl_div + cross_entropy, what users write);
``compile`` (torch.compile of eager); ``liger_kl`` and ``liger_jsd`` (Liger-Kernel's KL and JSD
losses on log-softmaxed logits, plus torch cross_entropy for the hard term) when liger-kernel is
installed and the device is a GPU; ``copy_floor`` (the memory-traffic floor measured in the same run:
one elementwise pass that reads both logits and writes a tensor of their size, as the fused op must at
least do). Times are medians (p20, p80) in ms; memory is the peak above what was allocated before the
call (MB), for forward+backward.

    python benchmarks/bench_kd_loss.py                 # CPU: rows 1024..4096, V 32000, fp32
    python benchmarks/bench_kd_loss.py --device cuda   # GPU: rows 1024..16384, V 128256, bf16
    pykd bench kd_loss --quick
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.nn.functional as F

import pykd
from pykd.benchmarks.common import Recorder, device_name, peak_extra_mb, record_times, time_ms

T = 2.0
ALPHA = 0.5


def eager(s, t, y):
    soft = F.kl_div(
        F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True
    )
    return ALPHA * T * T * soft + (1 - ALPHA) * F.cross_entropy(s, y)


def fused(s, t, y):
    return pykd.kd_loss(s, t, y, temperature=T, alpha=ALPHA)


def providers(device: torch.device, wanted: list[str]):
    out = {"pykd": fused, "eager": eager}
    if "compile" in wanted:
        out["compile"] = torch.compile(eager, dynamic=False)
    if device.type == "cuda" and any(w.startswith("liger") for w in wanted):
        try:
            from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
        except ImportError:
            print("liger-kernel not installed: skipping liger providers")
        else:
            kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
            jsd = LigerJSD(beta=0.5)

            def liger_kl(s, t, y):
                soft = kl(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1))
                return ALPHA * T * T * soft + (1 - ALPHA) * F.cross_entropy(s, y)

            def liger_jsd(s, t, y):
                soft = jsd(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1))
                return ALPHA * T * T * soft + (1 - ALPHA) * F.cross_entropy(s, y)

            out["liger_kl"] = liger_kl
            out["liger_jsd"] = liger_jsd
    return {k: v for k, v in out.items() if k in wanted}


def measure(rec: Recorder, name: str, fn, s0, t, y, rows: int, device, reps: int) -> None:
    """fwd, bwd and full times and full peak memory of one provider at one size."""
    state = {}

    def fresh():
        state["s"] = s0.clone().requires_grad_(True)

    def forward():
        state["loss"] = fn(state["s"], t, y)

    def backward():
        state["loss"].backward()

    full = record_times(rec, name, rows, device, reps, fresh, forward, backward)
    state.clear()
    gc.collect()
    fresh()
    rec.add(name, "full", "memory", "MB", rows, peak_extra_mb(full, device))
    state.clear()
    gc.collect()


def copy_floor(s, t, device, reps):
    """Time of one pass that reads both logits and writes a tensor of their size."""
    g = torch.empty_like(s)
    return time_ms(lambda: torch.add(s, t, out=g), device, reps=reps)


def run(args) -> Recorder:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rec = Recorder("kd_loss", device, args.dtype, "rows", [])
    print(f"kd_loss on {device_name(device)}: V={args.vocab} {args.dtype}, kl T={T} + hard CE")
    fns = providers(device, args.providers)
    for rows in args.rows:
        torch.manual_seed(0)
        s0 = (torch.randn(rows, args.vocab, device=device) * 3).to(dtype)
        t = (torch.randn(rows, args.vocab, device=device) * 3).to(dtype)
        y = torch.randint(0, args.vocab, (rows,), device=device)
        for name, fn in fns.items():
            measure(rec, name, fn, s0, t, y, rows, device, args.reps)
        if "copy_floor" in args.providers:
            rec.add("copy_floor", "full", "time", "ms", rows, copy_floor(s0, t, device, args.reps))
        rec.add("logits", "full", "memory", "MB", rows, s0.numel() * s0.element_size() / 2**20)
    return rec


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    p.add_argument("--rows", type=int, nargs="+", default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--providers", nargs="+",
                   default=["pykd", "eager", "compile", "liger_kl", "liger_jsd", "copy_floor"])  # fmt: skip
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="1024 rows (CPU) or 4096 (GPU), pykd and eager")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.vocab = args.vocab or (128256 if gpu else 32000)
    args.rows = args.rows or ([1024, 2048, 4096, 8192, 16384] if gpu else [1024, 2048, 4096])
    args.reps = args.reps or (20 if gpu else 5)
    if args.quick:  # one size at which peak memory is measurable on CPU (the allocator hides less)
        args.rows, args.reps = [4096 if gpu else 1024], 3
        args.providers = [x for x in args.providers if x in ("pykd", "eager")]
    rec = run(args)
    out = f"{args.out_dir}/{device_name(torch.device(args.device))}"
    csv_path, png = rec.write(out, "kd_loss" + ("_quick" if args.quick else ""))
    print(f"wrote {csv_path}" + (f" and {png}" if png else ""))
    return rec


if __name__ == "__main__":
    main()
