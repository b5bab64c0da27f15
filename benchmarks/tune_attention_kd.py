"""Sweep the block shapes of the attention_kd Triton kernels on a GPU (one kernel at a time, the
others at their current defaults); prints a table and writes attention_kd_tune.csv. The winners go
into kernels/attention_kd.py CONFIGS by hand: the script ends by printing them as CONFIGS entries,
one per head dim and N of the sweep. Every row times one whole forward+backward step, so
the ``dkdv_atomic`` rows (DQ_MODE "atomic": no dq kernel) compare directly with the others.

    python benchmarks/tune_attention_kd.py --seq 8192 --head-dims 64 128
    python benchmarks/tune_attention_kd.py --seq 512 2048 8192 16384 --head-dims 64   # N buckets
    python benchmarks/tune_attention_kd.py --loads tma    # with tensor-descriptor loads (LOADS)
"""

from __future__ import annotations

import argparse
import csv
import os

import torch
import triton.testing

import pykd
from pykd.benchmarks.common import commit, device_name
from pykd.kernels import attention_kd as K

CANDIDATES = {
    "fwd": [
        (128, 64, 8, 3),
        (128, 64, 4, 3),
        (64, 64, 4, 3),
        (128, 32, 4, 3),
        (64, 32, 4, 2),
        (128, 128, 8, 2),
        (64, 64, 8, 3),  # spill-free at D = 128 (sm_90 compile, typical launch)
    ],
    "dkdv": [
        (64, 64, 4, 2),
        (32, 64, 4, 2),
        (64, 32, 4, 2),
        (32, 128, 4, 2),
        (64, 128, 8, 2),
        (64, 64, 8, 1),
        (32, 64, 8, 2),  # spill-free at D = 128
    ],
    "dq": [(64, 64, 4, 2), (128, 32, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (32, 64, 4, 2)],
    # the dk/dv kernel that also adds dq with atomics (DQ_MODE "atomic": no dq kernel runs)
    "dkdv_atomic": [(64, 64, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, nargs="+", default=[8192], help="one CONFIGS entry per N")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--loads", default="pointer", choices=K.LOAD_MODES, help="the kernels' LOADS mode")
    p.add_argument("--out-dir", default="benchmarks/results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_attention_kd.py needs a CUDA device (the CPU kernels have no block shapes)")
    dev = torch.device("cuda")
    rows = []
    best = {}  # (kernel, head dim bucket, N) -> (ms, config)
    for d in args.head_dims:
        key = 64 if d <= 64 else 128
        for n in args.seq:
            x = [torch.randn(1, args.heads, n, d, device=dev, dtype=torch.bfloat16) for _ in range(6)]
            q, k, v = (t.requires_grad_() for t in x[:3])

            def step(q=q, k=k, v=v, x=x):
                out, loss = pykd.attention_kd(q, k, v, x[3], x[4])
                torch.autograd.backward([out, loss], [x[5], None])

            for kernel, cands in CANDIDATES.items():
                table = K.CONFIGS[kernel][key]
                default = K._config(kernel, d, n, dev)
                dq_mode = "atomic" if kernel == "dkdv_atomic" else "split"  # each row: one whole step
                for cfg in cands:
                    K.CONFIGS[kernel][key] = {n: cfg}
                    try:
                        with K.modes(DQ_MODE=dq_mode, LOADS=args.loads):
                            step()
                            ms = triton.testing.do_bench(step, rep=100)
                    except Exception as e:  # noqa: BLE001 - out of shared memory / registers
                        ms = float("nan")
                        print(f"  {kernel} {cfg}: {type(e).__name__}")
                    rows.append(dict(kernel=kernel, D=d, N=n, loads=args.loads, config=cfg, ms=round(ms, 4),
                                     default=cfg == default))  # fmt: skip
                    print(
                        f"D={d} N={n} {kernel:>5} {cfg}: {ms:.3f} ms{' (default)' if cfg == default else ''}"
                    )
                    if ms == ms and ms < best.get((kernel, key, n), (float("inf"),))[0]:
                        best[(kernel, key, n)] = (ms, cfg)
                K.CONFIGS[kernel][key] = table
    out = os.path.join(args.out_dir, device_name(dev))
    os.makedirs(out, exist_ok=True)
    name = "attention_kd_tune.csv" if args.loads == "pointer" else f"attention_kd_tune_{args.loads}.csv"
    with open(os.path.join(out, name), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], "commit"])
        w.writeheader()
        w.writerows({**r, "commit": commit()} for r in rows)
    print(winners(best))


def winners(best: dict) -> str:
    """The fastest configuration per kernel, head dim and N, as CONFIGS entries to paste."""
    lines = ["CONFIGS entries from this sweep (kernels/attention_kd.py):"]
    for kernel in CANDIDATES:
        dims = sorted({key for (kn, key, _) in best if kn == kernel})
        per_dim = []
        for key in dims:
            by_n = {n: cfg for (kn, kk, n), (_, cfg) in sorted(best.items()) if kn == kernel and kk == key}
            per_dim.append(f"{key}: {{" + ", ".join(f"{n}: {cfg}" for n, cfg in by_n.items()) + "}")
        lines.append(f'    "{kernel}": {{' + ", ".join(per_dim) + "},")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
