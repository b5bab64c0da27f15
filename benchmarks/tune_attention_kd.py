"""Sweep the block shapes of the attention_kd Triton kernels on a GPU (one kernel at a time, the
others at their current defaults); prints a table and writes attention_kd_tune.csv. The winners go
into kernels/attention_kd.py CONFIGS by hand. Every row times one whole forward+backward step, so
the ``dkdv_atomic`` rows (DQ_MODE "atomic": no dq kernel) compare directly with the others.

    python benchmarks/tune_attention_kd.py --seq 8192 --head-dims 64 128
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
    ],
    "dkdv": [
        (64, 64, 4, 2),
        (32, 64, 4, 2),
        (64, 32, 4, 2),
        (32, 128, 4, 2),
        (64, 128, 8, 2),
        (64, 64, 8, 1),
    ],
    "dq": [(64, 64, 4, 2), (128, 32, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (32, 64, 4, 2)],
    # the dk/dv kernel that also adds dq with atomics (DQ_MODE "atomic": no dq kernel runs)
    "dkdv_atomic": [(64, 64, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, nargs="+", default=[8192])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--out-dir", default="benchmarks/results")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    rows = []
    for d in args.head_dims:
        key = 64 if d <= 64 else 128
        for n in args.seq:
            x = [torch.randn(1, args.heads, n, d, device=dev, dtype=torch.bfloat16) for _ in range(6)]
            q, k, v = (t.requires_grad_() for t in x[:3])

            def step(q=q, k=k, v=v, x=x):
                out, loss = pykd.attention_kd(q, k, v, x[3], x[4])
                torch.autograd.backward([out, loss], [x[5], None])

            for kernel, cands in CANDIDATES.items():
                default = K.CONFIGS[kernel][key]
                K.DQ_MODE = "atomic" if kernel == "dkdv_atomic" else "split"  # each row: one whole step
                for cfg in cands:
                    K.CONFIGS[kernel][key] = cfg
                    try:
                        step()
                        ms = triton.testing.do_bench(step, rep=100)
                    except Exception as e:  # noqa: BLE001 - out of shared memory / registers
                        ms = float("nan")
                        print(f"  {kernel} {cfg}: {type(e).__name__}")
                    rows.append(
                        dict(kernel=kernel, D=d, N=n, config=cfg, ms=round(ms, 4), default=cfg == default)
                    )
                    print(
                        f"D={d} N={n} {kernel:>5} {cfg}: {ms:.3f} ms{' (default)' if cfg == default else ''}"
                    )
                K.CONFIGS[kernel][key] = default
    K.DQ_MODE = "split"
    out = os.path.join(args.out_dir, device_name(dev))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "attention_kd_tune.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], "commit"])
        w.writeheader()
        w.writerows({**r, "commit": commit()} for r in rows)


if __name__ == "__main__":
    main()
