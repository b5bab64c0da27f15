"""Benchmark of pykd.attention_kd: the student's attention output plus KL(p_t || p_s) of the attention
maps, forward / backward / both, against what users run today.

Providers: ``pykd`` (one fused kernel each way); ``eager`` (materialized maps: scores, softmax,
P·V, log_softmax of both, kl_div, what MiniLM-style code does with output_attentions); ``sdpa``
(scaled_dot_product_attention for the student alone, no loss: the practical floor); ``sdpa_chunked``
(SDPA plus a separate KL pass over query chunks, each chunk checkpointed so its maps are freed);
``pykd_topk`` (pykd against a stored top-32 capture of the teacher, taken once before timing: KL with
a tail bucket, no teacher q_t, k_t); ``pykd_atomic_dq`` (CUDA only: pykd with the backward's dq added
by the dk/dv kernel with fp32 atomics, kernels/attention_kd.py DQ_MODE "atomic"); ``pykd_tma`` (CUDA
only: pykd with tensor-descriptor tile loads, LOADS "tma").
Backward is of ``sum(out * dO) + loss``. Times are medians (p20, p80) in ms; memory is the peak
above what was allocated before the call (MB), for forward+backward. A provider that runs out of
memory is reported and skipped for larger N.

``--op relation``: MiniLMv2 self-relation KD instead (``pykd.relation_kd`` of one projection, student
(B, N, 384) against teacher (B, N, 768), R = 12 relation heads, loss only, ``loss.backward()``),
providers ``pykd`` and ``eager`` (materialized (B, R, N, N) relation maps, log_softmax, kl_div).

    python benchmarks/bench_attention_kd.py                 # CPU: B1 H4 D64 fp32, N 1024..4096
    python benchmarks/bench_attention_kd.py --device cuda   # GPU: B1 H16 bf16, D 64 and 128, N 512..16k
    python benchmarks/bench_attention_kd.py --batch 32 --heads 12 --seq 128 512 --tag bert   # BERT shapes
    python benchmarks/bench_attention_kd.py --op relation   # B32 R12 X 384/768, N 128 and 512
    pykd bench attention_kd --quick
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import math
import sys

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import pykd
from pykd.benchmarks.common import (
    ProviderLoop,
    Recorder,
    device_name,
    fresh_process_peak_mb,
    peak_extra_mb,
    record_times,
)

TAU = 1.0


def fused(q, k, v, qt, kt):
    return pykd.attention_kd(q, k, v, qt, kt, divergence="kl", temperature=TAU)


def _kl_rows(q, k, qt, kt):
    """Summed KL(p_t || p_s) of the rows of q against all keys, materializing their maps."""
    s = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    t = (qt @ kt.transpose(-1, -2)).float() / math.sqrt(qt.shape[-1])
    return F.kl_div(F.log_softmax(s / TAU, -1), F.log_softmax(t / TAU, -1), log_target=True, reduction="sum")


def eager(q, k, v, qt, kt):
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = torch.softmax(s.float(), -1).to(v.dtype) @ v
    t = (qt @ kt.transpose(-1, -2)).float() / math.sqrt(qt.shape[-1])
    loss = F.kl_div(F.log_softmax(s.float() / TAU, -1), F.log_softmax(t / TAU, -1), log_target=True,
                    reduction="sum")  # fmt: skip
    return out, loss / (q.shape[0] * q.shape[1] * q.shape[2])


def sdpa(q, k, v, qt, kt):
    return F.scaled_dot_product_attention(q, k, v), None


def sdpa_chunked(q, k, v, qt, kt):
    out = F.scaled_dot_product_attention(q, k, v)
    B, H, N, _ = q.shape
    rows = max(16, min(N, 2**27 // (B * H * N)))  # each chunk's fp32 map <= 512 MB
    loss = 0.0
    for i in range(0, N, rows):
        loss = loss + checkpoint(
            _kl_rows, q[:, :, i : i + rows], k, qt[:, :, i : i + rows], kt, use_reentrant=False
        )
    return out, loss / (B * H * N)


CAPTURE_K = 32
_CAPTURE = {}


def _capture_of(qt, kt):
    """The teacher's top-K capture, taken once per input (outside the timed and measured region)."""
    key = (qt.data_ptr(), kt.data_ptr(), tuple(qt.shape))
    if key not in _CAPTURE:
        _CAPTURE.clear()
        _CAPTURE[key] = pykd.attention(qt, kt, kt, capture="topk", capture_k=CAPTURE_K)[1]
    return _CAPTURE[key]


def fused_topk(q, k, v, qt, kt):
    return pykd.attention_kd(q, k, v, teacher=_capture_of(qt, kt))


PROVIDERS = {
    "pykd": fused,
    "pykd_atomic_dq": fused,
    "pykd_tma": fused,
    "pykd_topk": fused_topk,
    "eager": eager,
    "sdpa": sdpa,
    "sdpa_chunked": sdpa_chunked,
}
PREPARE = {"pykd_topk": _capture_of}  # run before a provider is timed or its memory measured
# provider -> the Triton kernels' modes it runs (kernels/attention_kd.py DQ_MODE, LOADS); the others
# run as configured (the defaults, or PYKD_ATTENTION_*). CUDA only: the C++ kernels have no modes.
TRITON_MODES = {"pykd_atomic_dq": {"DQ_MODE": "atomic"}, "pykd_tma": {"LOADS": "tma"}}


def _modes(name: str):
    """A context that sets provider name's Triton modes for its block."""
    if name not in TRITON_MODES:
        return contextlib.nullcontext()
    from pykd.kernels import attention_kd

    return attention_kd.modes(**TRITON_MODES[name])


RELATION_HEADS, X_S, X_T = 12, 384, 768  # MiniLMv2: a MiniLM-L12-H384 student, a BERT-base teacher


def relation_eager(x_s, x_t):
    """What MiniLMv2 code does: materialized (B, R, N, N) self-relation maps, log_softmax, kl_div."""

    def log_rel(x):
        B, N, X = x.shape
        h = x.reshape(B, N, RELATION_HEADS, X // RELATION_HEADS).transpose(1, 2).float()
        return F.log_softmax(h @ h.transpose(-1, -2) / math.sqrt(h.shape[-1]), -1)

    ls, lt = log_rel(x_s), log_rel(x_t)
    return F.kl_div(ls, lt, log_target=True, reduction="sum") / (ls.shape[0] * ls.shape[1] * ls.shape[2])


RELATION_PROVIDERS = {
    "pykd": lambda x_s, x_t: pykd.relation_kd(x_s, x_t, RELATION_HEADS),
    "eager": relation_eager,
}


def relation_inputs(B, n, device, dtype):
    torch.manual_seed(0)
    return torch.randn(B, n, X_S, device=device).to(dtype), torch.randn(B, n, X_T, device=device).to(dtype)


def measure_relation(rec: Recorder, name: str, B: int, n: int, device, dtype, reps: int) -> None:
    x_s0, x_t = relation_inputs(B, n, device, dtype)
    state = {}

    def fresh():
        state["x"] = x_s0.clone().requires_grad_(True)

    def forward():
        state["loss"] = RELATION_PROVIDERS[name](state["x"], x_t)

    def backward():
        state["loss"].backward()

    full = record_times(rec, name, n, device, reps, fresh, forward, backward)
    if device.type == "cpu":
        dt = str(dtype).replace("torch.", "")
        peak = fresh_process_peak_mb("pykd.benchmarks.bench_attention_kd", ["relation", name, B, n, dt])
    else:
        fresh()
        peak = peak_extra_mb(full, device)
    rec.add(name, "full", "memory", "MB", n, peak)
    state.clear()
    gc.collect()


def run_relation(args) -> Recorder:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rec = Recorder("relation_kd", device, args.dtype, "N", [])
    print(
        f"relation_kd on {device_name(device)}: B={args.batch} R={RELATION_HEADS} X={X_S}/{X_T} {args.dtype}"
    )
    loop = ProviderLoop(device, "N")
    for n in args.seq:
        for name in args.providers:
            loop.run(name, n, functools.partial(measure_relation, rec, name, args.batch, n, device, dtype,
                                                args.reps))  # fmt: skip
    return rec


def measure(rec: Recorder, name: str, fn, inputs, go, n: int, device, reps: int) -> None:
    """fwd, bwd and full times and full peak memory of one provider at one size."""
    q0, k0, v0, qt, kt = inputs
    if name in PREPARE:
        PREPARE[name](qt, kt)
    state = {}

    def fresh():
        state["x"] = [x.clone().requires_grad_(True) for x in (q0, k0, v0)]

    def forward():
        state["r"] = fn(*state["x"], qt, kt)

    def backward():
        out, loss = state["r"]
        total = (out * go).sum() + (loss if loss is not None else 0.0)
        total.backward()

    with _modes(name):
        full = record_times(rec, name, n, device, reps, fresh, forward, backward)
        state.clear()
        gc.collect()
        if device.type == "cpu":
            # A process's freed memory stays mapped and is reused, so on CPU each peak is taken in a
            # fresh process (DESIGN.md section 7).
            B, H, _, D = q0.shape
            dtype = str(q0.dtype).replace("torch.", "")
            peak = fresh_process_peak_mb("pykd.benchmarks.bench_attention_kd", [name, B, H, n, D, dtype])
            rec.add(name, "full", "memory", "MB", n, peak)
        else:
            fresh()
            rec.add(name, "full", "memory", "MB", n, peak_extra_mb(full, device))
    state.clear()
    gc.collect()


def _inputs(shape, device, dtype):
    torch.manual_seed(0)
    inputs = [torch.randn(shape, device=device).to(dtype) for _ in range(5)]
    return inputs, torch.randn(shape, device=device).to(dtype)


def _child_memory(name, *rest) -> None:
    if name == "relation":
        provider, B, n, dtype = rest
        x_s, x_t = relation_inputs(int(B), int(n), torch.device("cpu"), getattr(torch, dtype))
        x_s.requires_grad_(True)
        peak = peak_extra_mb(lambda: RELATION_PROVIDERS[provider](x_s, x_t).backward(), torch.device("cpu"))
        print("peak_extra_mb", peak)
        return
    B, H, n, D, dtype = rest
    inputs, go = _inputs((int(B), int(H), int(n), int(D)), torch.device("cpu"), getattr(torch, dtype))
    x = [t.clone().requires_grad_(True) for t in inputs[:3]]
    if name in PREPARE:
        PREPARE[name](*inputs[3:])

    def full():
        out, loss = PROVIDERS[name](*x, *inputs[3:])
        ((out * go).sum() + (loss if loss is not None else 0.0)).backward()

    print("peak_extra_mb", peak_extra_mb(full, torch.device("cpu")))


def run(args, head_dim: int) -> Recorder:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rec = Recorder("attention_kd", device, args.dtype, "N", [])
    print(
        f"attention_kd on {device_name(device)}: B={args.batch} H={args.heads} D={head_dim} {args.dtype}, kl"
    )
    loop = ProviderLoop(device, "N")
    for n in args.seq:
        inputs, go = _inputs((args.batch, args.heads, n, head_dim), device, dtype)
        for name in args.providers:
            loop.run(
                name,
                n,
                functools.partial(measure, rec, name, PROVIDERS[name], inputs, go, n, device, args.reps),
            )
    return rec


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child-memory"]:
        return _child_memory(*argv[1:])
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    p.add_argument("--seq", type=int, nargs="+", default=None, help="sequence lengths N")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dims", type=int, nargs="+", default=None)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--quick", action="store_true", help="one N (2048 CPU, 4096 GPU), pykd and eager only")
    p.add_argument("--op", choices=("attention", "relation"), default="attention")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.op == "relation":
        args.batch = 32 if args.batch == 1 else args.batch  # MiniLMv2's batch unless one was given
        args.seq = args.seq or ([128] if args.quick else [128, 512])
        args.reps = args.reps or (10 if gpu else 3)
        args.providers = [x for x in args.providers if x in RELATION_PROVIDERS]
        rec = run_relation(args)
        out = f"{args.out_dir}/{device_name(torch.device(args.device))}"
        csv_path, png = rec.write(
            out, "relation_kd" + (f"_{args.tag}" if args.tag else "") + ("_quick" if args.quick else "")
        )
        print(f"wrote {csv_path}" + (f" and {png}" if png else ""))
        return [rec]
    args.heads = args.heads or (16 if gpu else 4)
    args.head_dims = args.head_dims or ([64, 128] if gpu else [64])
    args.seq = args.seq or ([512, 1024, 2048, 4096, 8192, 16384] if gpu else [1024, 2048, 4096])
    args.reps = args.reps or (10 if gpu else 3)
    if not gpu:  # Triton modes: CPU runs the C++ kernels
        args.providers = [x for x in args.providers if x not in TRITON_MODES]
    if args.quick:  # one N where the fused kernel's advantage over eager maps shows (CPU: from ~2k)
        args.seq, args.reps, args.head_dims = [4096 if gpu else 2048], 3, args.head_dims[:1]
        args.providers = [x for x in args.providers if x in ("pykd", "pykd_topk", "eager")]
    recs = []
    for d in args.head_dims:
        rec = run(args, d)
        out = f"{args.out_dir}/{device_name(torch.device(args.device))}"
        stem = f"attention_kd_d{d}" + (f"_{args.tag}" if args.tag else "") + ("_quick" if args.quick else "")
        csv_path, png = rec.write(out, stem)
        print(f"wrote {csv_path}" + (f" and {png}" if png else ""))
        recs.append(rec)
    return recs


if __name__ == "__main__":
    main()
