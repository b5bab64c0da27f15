"""Per-call time of every public op at tiny shapes, next to scaled_dot_product_attention: what the
Python and dispatch path costs before any kernel work (on a GPU the same run gives launch-bound
times, when the device waits for the host). Forward without grad (``fwd``) and forward+backward
(``full``), median microseconds per call over many calls, one thread.

    python benchmarks/bench_host_overhead.py                 # CPU, 1 thread
    python benchmarks/bench_host_overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F

import pykd
from pykd.benchmarks.common import Recorder, device_name, wall_ms

N = 16  # tokens (attention) and rows (logit ops): small enough that the kernels cost ~nothing


def cases(device):
    """{name: (make_inputs() -> leaves, f(*leaves) -> scalar or tensor)}."""
    B, H, D, V = 1, 2, 16, 64

    def qkv():
        return [torch.randn(B, H, N, D, device=device, requires_grad=True) for _ in range(3)]

    qt, kt = torch.randn(B, H, N, D, device=device), torch.randn(B, H, N, D, device=device)
    t = torch.randn(N, V, device=device)
    lp, idx = torch.log_softmax(t, -1).topk(8, -1)
    ht, wt = torch.randn(N, D, device=device), torch.randn(V, D, device=device)
    xt = torch.randn(B, N, 32, device=device)
    bm = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)

    def logits():
        return [torch.randn(N, V, device=device, requires_grad=True)]

    def linear():
        return [torch.randn(N, D, device=device, requires_grad=True),
                torch.randn(V, D, device=device, requires_grad=True)]  # fmt: skip

    return {
        "sdpa": (qkv, lambda q, k, v: F.scaled_dot_product_attention(q, k, v)),
        "attention": (qkv, lambda q, k, v: pykd.attention(q, k, v)),
        "attention_kd": (qkv, lambda q, k, v: pykd.attention_kd(q, k, v, qt, kt)),
        "attention_divergence": (qkv, lambda q, k, v: pykd.attention_divergence(q, k, qt, kt)),
        "relation_kd": (lambda: [torch.randn(B, N, 32, device=device, requires_grad=True)],
                        lambda x: pykd.relation_kd(x, xt, 2)),
        "sparse_attention": (qkv, lambda q, k, v: pykd.sparse_attention(q, k, v, block_mask=bm,
                                                                        block_size=16)),
        "kd_loss": (logits, lambda s: pykd.kd_loss(s, t)),
        "topk_kd_loss": (logits, lambda s: pykd.topk_kd_loss(s, lp, idx)),
        "fused_linear_kd_loss": (linear, lambda h, w: pykd.fused_linear_kd_loss(h, w, ht, wt)),
    }  # fmt: skip


def scalar(out):
    if isinstance(out, tuple):  # attention_kd: (out, loss)
        return out[0].sum() + out[1]
    return out if out.dim() == 0 else out.sum()


def per_call_us(fn, device, reps: int) -> tuple[float, float, float]:
    """(median, p20, p80) microseconds of fn(), timed one call at a time after a warm-up (long: the
    first calls of a process run allocator and dispatcher warm-up that would bill the first op)."""
    for _ in range(200):
        fn()
    return tuple(1e3 * x for x in wall_ms(fn, device, reps=reps))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="fewer calls")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    out = f"{args.out_dir}/{device_name(device)}"  # the machine's folder, as every benchmark's
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    reps = args.reps or (100 if args.quick else 1000)
    rec = Recorder("host_overhead", device, "float32", "N", [])
    print(f"host overhead on {device_name(device)}, {args.threads} thread(s), N={N}, us per call")
    for name, (make, f) in cases(device).items():
        xs = make()
        with torch.no_grad():
            rec.add(name, "fwd", "time", "us", N, per_call_us(functools.partial(f, *xs), device, reps))
        full = functools.partial(lambda f, xs: scalar(f(*xs)).backward(), f, xs)
        rec.add(name, "full", "time", "us", N, per_call_us(full, device, reps))
    torch.set_num_threads(threads)
    csv_path, png = rec.write(out, "host_overhead" + ("_quick" if args.quick else ""),
                              baseline=("sdpa",), target="attention")  # fmt: skip
    print(f"wrote {csv_path}" + (f" and {png}" if png else ""))
    return rec


if __name__ == "__main__":
    main()
