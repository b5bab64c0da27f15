"""Sweep the launch choices of the kd_loss and topk_kd_loss Triton row kernels on a GPU, in one call
(issue 18): the vocabulary block and warps, programs per SM (0: one program per row) and REVERSE (each
sweep after the first walks the row from where the last one ended, so it starts on blocks still in
L2). Each row of the table times one forward+backward of the public op at the issue's size (KL at
T = 2 plus hard CE, bf16), next to the copy floor measured in the same run, and checks the loss and
gradient against the default configuration's. Writes kd_loss_tune.csv; the winners go into the
kernels' module constants (kernels/kd_loss.py, kernels/topk_kd_loss.py) by hand.

    python benchmarks/tune_kd_loss.py                       # 16384 x 128256, both ops
    python benchmarks/tune_kd_loss.py --rows 4096 --quick   # fewer configurations
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import os

import torch
import triton.testing

import pykd
from pykd.benchmarks.common import commit, device_name
from pykd.kernels import kd_loss as KD
from pykd.kernels import topk_kd_loss as TK

T, ALPHA, TOPK = 2.0, 0.5, 64
# (MAX_BLOCK_V, NUM_WARPS): about 4 to 32 elements per thread and tensor
BLOCKS = {
    "kd_loss": [(2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16), (8192, 32), (16384, 32)],
    "topk_kd_loss": [(1024, 4), (2048, 8), (4096, 8), (4096, 16)],
}
PER_SM = (0, 1, 2, 4)


def _configs(op: str, quick: bool):
    blocks = BLOCKS[op][1::2] if quick else BLOCKS[op]
    per_sm = (0, 2) if quick else PER_SM
    return list(itertools.product(blocks, per_sm, (False, True)))


def _set(module, block, warps, per_sm, reverse):
    module.MAX_BLOCK_V, module.NUM_WARPS = block, warps
    module.PROGRAMS_PER_SM, module.REVERSE = per_sm, reverse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--ops", nargs="+", default=list(BLOCKS), choices=list(BLOCKS))
    p.add_argument("--quick", action="store_true", help="every other block shape, 0 or 2 programs per SM")
    p.add_argument("--out-dir", default="benchmarks/results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_kd_loss.py needs a CUDA device (the CPU kernels have no launch choices)")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    R, V = args.rows, args.vocab
    s = (torch.randn(R, V, device=dev) * 3).to(torch.bfloat16).requires_grad_()
    t = (torch.randn(R, V, device=dev) * 3).to(torch.bfloat16)
    y = torch.randint(0, V, (R,), device=dev)
    lp, idx = torch.log_softmax(t.float() / T, -1).topk(TOPK, -1)
    steps = {
        "kd_loss": (KD, lambda: pykd.kd_loss(s, t, y, temperature=T, alpha=ALPHA)),
        "topk_kd_loss": (TK, lambda: pykd.topk_kd_loss(s, lp, idx, y, temperature=T, alpha=ALPHA)),
    }
    out = torch.empty_like(t)
    floor = triton.testing.do_bench(lambda: torch.add(s.detach(), t, out=out), rep=200)
    del out
    print(f"{device_name(dev)}: {R} x {V} bf16, copy floor (read both, write one) {floor:.3f} ms")
    rows = []
    for op in args.ops:
        module, fn = steps[op]
        constants = (module.MAX_BLOCK_V, module.NUM_WARPS, module.PROGRAMS_PER_SM, module.REVERSE)
        default = (module.launch_config(V), module.PROGRAMS_PER_SM, module.REVERSE)

        def step(fn=fn):
            s.grad = None
            fn().backward()

        step()
        ref_loss, ref_grad = fn().item(), s.grad.float()
        for (block, warps), per_sm, reverse in _configs(op, args.quick):
            _set(module, block, warps, per_sm, reverse)
            try:
                s.grad = None
                loss = fn()
                loss.backward()
                g_err = (s.grad.float() - ref_grad).abs().max() / ref_grad.abs().max()
                diff = max(abs(loss.item() - ref_loss) / max(abs(ref_loss), 1e-30), g_err.item())
                ms = triton.testing.do_bench(step, rep=100)
            except Exception as e:  # noqa: BLE001 - out of registers / shared memory
                ms, diff = float("nan"), float("nan")
                print(f"  {op} {(block, warps, per_sm, reverse)}: {type(e).__name__}: {e}")
            is_default = (module.launch_config(V), per_sm, reverse) == default
            rows.append(dict(op=op, rows=R, V=V, block_v=block, num_warps=warps, programs_per_sm=per_sm,
                             reverse=reverse, ms=round(ms, 4), x_copy_floor=round(ms / floor, 3),
                             rel_diff=f"{diff:.2g}", default=is_default))  # fmt: skip
            mark = " (default)" if is_default else ""
            print(f"{op:>12} block {block:>5} warps {warps:>2} per_sm {per_sm} reverse {reverse!s:>5}: "
                  f"{ms:.3f} ms = {ms / floor:.2f}x floor (rel diff {diff:.1g}){mark}")  # fmt: skip
        _set(module, *constants)
    out = os.path.join(args.out_dir, device_name(dev))
    os.makedirs(out, exist_ok=True)
    stamp = dict(copy_floor_ms=round(floor, 4), device=device_name(dev), commit=commit(),
                 date=datetime.date.today().isoformat())  # fmt: skip
    path = os.path.join(out, "kd_loss_tune.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], *stamp])
        w.writeheader()
        w.writerows({**r, **stamp} for r in rows)
    best = {}
    for r in rows:
        if r["ms"] == r["ms"] and (r["op"] not in best or r["ms"] < best[r["op"]]["ms"]):
            best[r["op"]] = r
    for op, r in best.items():
        print(f"fastest {op}: {r}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
