"""Vocabulary-parallel logit distillation: per-rank peak memory, communication and time of one training
step (forward + backward) of pykd's ``process_group=`` ops against gathering the logits, at TP 2 and 4.

Each rank holds a contiguous slice of the vocabulary:

- ``kd_loss``: each rank has its (R, V/P) slices of the student's and the teacher's logits.
  ``pykd``: ``pykd.kd_loss(..., process_group=)``; ``gather``: all-gather both models' slices into
  (R, V) logits on every rank, then the single-process ``pykd.kd_loss`` (the gradient's own slice kept).
- ``fused_linear_kd``: each rank has its (V/P, H) slices of both lm_heads and the full hidden states.
  ``pykd``: ``pykd.fused_linear_kd_loss(..., process_group=)``; ``gather``: local logits, a
  differentiable all-gather (torch.distributed.nn), the single-process ``pykd.kd_loss``.
- ``single`` (TP 1): the single-process op on the whole vocabulary, the reference for the target
  "peak logits-side memory per rank <= 1.1 / P of the single-process op's".

Metrics per (provider, TP): ``memory`` (MB): the step's peak above what was allocated before it, the
largest over the ranks (CPU: RSS high-water mark, each provider in fresh processes whose large
blocks glibc maps and unmaps, MALLOC_MMAP_THRESHOLD_); ``comm`` (bytes
per row): the payload of the step's collectives on one rank (all-reduce: its tensor; all-gather: its
output; the fused baseline's backward reduce-scatter: its input), divided by the rows; ``time`` (ms,
rank 0). CPU runs use gloo; a GPU run (``--device cuda``) uses NCCL, one GPU per rank.

    python -m pykd.benchmarks.bench_distributed [--quick] [--tp 2 4] [--rows R] [--vocab V] [--hidden H]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from pykd.benchmarks.common import Recorder, device_name, peak_extra_mb, wall_ms

OPS = ("kd_loss", "fused_linear_kd")


def _step(op, provider, rows, vocab, hidden, device, group):
    """(the measured step, its collectives' payload in bytes on this rank, the tensors it gives
    gradients)."""
    import torch.distributed as dist

    import pykd
    from pykd import vocab_parallel

    world = dist.get_world_size() if group is not None else 1
    rank = dist.get_rank() if group is not None else 0
    g = torch.Generator().manual_seed(0)
    sl = torch.tensor_split(torch.arange(vocab), world)[rank]
    y = torch.randint(0, vocab, (rows,), generator=g).to(device)
    if op == "kd_loss":
        s = (torch.randn(rows, vocab, generator=g)[:, sl] * 2).to(device).requires_grad_()
        t = (torch.randn(rows, vocab, generator=g)[:, sl] * 2).to(device)
        if provider == "gather":
            gs = [torch.empty_like(t) for _ in range(world)]

            def step():
                with torch.no_grad():
                    dist.all_gather(gs, s.detach(), group=group)
                    full_s = torch.cat(gs, 1)
                    dist.all_gather(gs, t, group=group)
                    full_t = torch.cat(gs, 1)
                full_s.requires_grad_()
                pykd.kd_loss(full_s, full_t, y).backward()
                s.grad = full_s.grad[:, sl]

            return step, 2 * rows * vocab * s.element_size(), [s]
        pg = group if provider == "pykd" else None

        def step():
            pykd.kd_loss(s, t, y, process_group=pg).backward()

    else:
        h = torch.randn(rows, hidden, generator=g).to(device).requires_grad_()
        ht = torch.randn(rows, 2 * hidden, generator=g).to(device)
        w = (torch.randn(vocab, hidden, generator=g)[sl] / hidden**0.5).to(device).requires_grad_()
        wt = (torch.randn(vocab, 2 * hidden, generator=g)[sl] / (2 * hidden) ** 0.5).to(device)
        if provider == "gather":
            import torch.distributed.nn.functional as dnn

            def step():
                full_s = torch.cat(dnn.all_gather(h @ w.t(), group=group), 1)
                with torch.no_grad():
                    full_t = torch.cat(dnn.all_gather(ht @ wt.t(), group=group), 1)
                pykd.kd_loss(full_s, full_t, y).backward()

            # both all-gathers' outputs, the student's backward reduce-scatter; the hidden states'
            # gradient all-reduce that a column-parallel lm_head needs anyway is not included
            return step, 3 * rows * vocab * h.element_size(), [h, w]
        pg = group if provider == "pykd" else None

        def step():
            pykd.fused_linear_kd_loss(h, w, ht, wt, y, process_group=pg).backward()

    leaves = [s] if op == "kd_loss" else [h, w]
    if provider == "pykd":
        before = sum(vocab_parallel.COMM_BYTES.values())
        step()
        return step, sum(vocab_parallel.COMM_BYTES.values()) - before, leaves
    return step, 0, leaves


def worker(argv: list[str]) -> None:
    """One provider at one TP degree under torchrun (or TP 1 in one process); prints a JSON line."""
    p = argparse.ArgumentParser()
    p.add_argument("--op", choices=OPS)
    p.add_argument("--provider")
    p.add_argument("--rows", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--device")
    p.add_argument("--reps", type=int)
    a = p.parse_args(argv)
    import torch.distributed as dist

    group = None
    device = torch.device(a.device)
    if a.provider != "single":
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        group = dist.group.WORLD
    step, comm, leaves = _step(a.op, a.provider, a.rows, a.vocab, a.hidden, device, group)

    def reset():  # each measured step starts without gradients, so it allocates them
        for x in leaves:
            x.grad = None

    step()  # warm-up
    reset()
    mb = peak_extra_mb(step, device)
    ms = wall_ms(step, device, reps=a.reps, setup=reset)
    out = dict(memory=mb, comm=comm / a.rows, time=ms)
    if group is not None:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, out)
        if dist.get_rank() == 0:
            out = dict(memory=max(o["memory"] for o in every), comm=every[0]["comm"], time=every[0]["time"])
            print("RESULT " + json.dumps(out), flush=True)
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)  # gloo's teardown can abort after a clean run
    print("RESULT " + json.dumps(out), flush=True)


def _launch(args, op, provider, tp) -> dict:
    module = ["-m", "pykd.benchmarks.bench_distributed", "--worker"]
    opts = ["--op", op, "--provider", provider, "--rows", args.rows, "--vocab", args.vocab, "--hidden",
            args.hidden, "--device", args.device, "--reps", args.reps]  # fmt: skip
    launch = [sys.executable]
    if provider != "single":
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(tp)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(tp, 1)))}
    # glibc serves blocks above this with mmap and returns them at free (no adaptive threshold), so
    # the RSS high-water mark follows the live tensors rather than the allocator's reuse
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    r = subprocess.run([*launch, *module, *map(str, opts)], capture_output=True, text=True, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{op} {provider} TP {tp} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tp", type=int, nargs="+", default=None, help="default 2 4 (--quick: 2)")
    p.add_argument("--rows", type=int, default=None, help="default 2048 (--quick: 128)")
    p.add_argument("--vocab", type=int, default=None, help="default 32000 (--quick: 2048)")
    p.add_argument("--hidden", type=int, default=None, help="default 512 (--quick: 64)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="a smoke run at small sizes")
    args = p.parse_args(argv)
    args.tp = args.tp or ([2] if args.quick else [2, 4])
    args.rows = args.rows or (128 if args.quick else 2048)
    args.vocab = args.vocab or (2048 if args.quick else 32000)
    args.hidden = args.hidden or (64 if args.quick else 512)
    device = torch.device(args.device)
    rec = Recorder("distributed", device, "float32", "tp", [])
    single = {}
    for op in OPS:
        print(f"{op}: rows {args.rows}, V {args.vocab}" + (f", H {args.hidden}" if op != "kd_loss" else ""))
        single[op] = _launch(args, op, "single", 1)
        for provider, tp in [("pykd", tp) for tp in args.tp] + [("gather", tp) for tp in args.tp]:
            res = _launch(args, op, provider, tp)
            for metric, unit in (("memory", "MB"), ("comm", "B/row"), ("time", "ms")):
                value = res[metric]
                rec.add(
                    f"{op}:{provider}",
                    "full",
                    metric,
                    unit,
                    tp,
                    tuple(value) if isinstance(value, list) else value,
                )
        for metric, unit in (("memory", "MB"), ("time", "ms")):
            value = single[op][metric]
            rec.add(
                f"{op}:single", "full", metric, unit, 1, tuple(value) if isinstance(value, list) else value
            )
    for op in OPS:
        for r in rec.rows:
            if r["provider"] == f"{op}:pykd" and r["metric"] == "memory":
                tp = int(r["x_value"])
                base = single[op]["memory"]
                ratio = (
                    f"{float(r['median']) * tp / base:.3f}" if base > 0 else "n/a (no single-process peak)"
                )
                print(f"{op} TP {tp}: per-rank peak x P / single-process peak = {ratio} (target <= 1.1)")
    out = f"{args.out_dir}/{device_name(device)}"
    stem = "distributed" + ("_quick" if args.quick else "")
    print("wrote", *rec.write(out, stem, baseline=("kd_loss:gather",), target="kd_loss:pykd"))


if __name__ == "__main__":
    main()
