"""The GPU design choice of pykd.fused_linear_kd_loss, by measurement (issue: "choose between chunked
cuBLAS matmuls + the Triton row kernel and a Triton kernel that fuses the vocabulary-tile matmul with
the online-softmax accumulators").

Forward only (the loss, no gradient), bf16, KL at T = 1, on the GPU:

- ``chunked``: what pykd ships: per chunk of rows, two cuBLAS GEMMs with fp32 output, then the
  kd_loss row kernel over the fp32 logits.
- ``vocab_tile``: the alternative, prototyped here: one Triton kernel per (row block, vocabulary
  split) computes the student and teacher logit tiles with tl.dot (fp32 accumulators) and folds
  them into online-softmax accumulators at once, so no logit ever reaches memory; a tiny combine
  merges the splits.
- ``gemm_floor_2``: the two logit GEMMs alone (cuBLAS, bf16 output).

The forward is where the fused design's advantage lies (no logits written or re-read). Its backward
must recompute both logit tiles once the row's lse is known (two more GEMMs) before the two gradient
GEMMs, six in all against the chunked design's four, so unless ``vocab_tile`` beats ``chunked`` in
the forward by more than two GEMMs' time, chunked wins fwd+bwd. Not part of the library: the
kernel here is a measurement prototype.

Also sweeps pykd's two sizes (fwd+bwd time and peak memory, ``chunk<rows>_group<rows>``): the chunk
(rows of fp32 logits per row-kernel launch, ``chunk_size``) and the gradient group (rows of logit
gradient per weight-gradient GEMM, ``GRAD_GROUP_ELEMS``; ``--groups 0`` is one chunk per group, the
design before the groups: one read-modify-write of the fp32 (V, H) accumulator per chunk).

    python benchmarks/design_fused_linear_kd.py                          # GPU only
    python benchmarks/design_fused_linear_kd.py --rows 8192 --sizes-only # the size sweep alone
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import triton
import triton.language as tl

import pykd
from pykd import fused_linear_kd as flk
from pykd.benchmarks.common import Recorder, device_name, peak_extra_mb, time_ms


@triton.jit
def _vocab_tile_kl_kernel(
    hs_ptr, ws_ptr, ht_ptr, wt_ptr, part_ptr, R, V, H, HT, v_per_split,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """Per row block and vocabulary split: online (m_s, l_s, m_t, l_t, A) of KL(p_t || p_s) over the
    split's vocabulary tiles, A = sum exp(z_t - m_t)(z_t - z_s); logits tiles never leave registers."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < R
    kk = tl.arange(0, BK)
    NEG: tl.constexpr = float("-inf")
    m_s = tl.full([BM], NEG, tl.float32)
    m_t = tl.full([BM], NEG, tl.float32)
    l_s = tl.zeros([BM], tl.float32)
    l_t = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM], tl.float32)
    v0 = pid_v * v_per_split
    v1 = tl.minimum(v0 + v_per_split, V)
    for n0 in range(v0, v1, BN):
        cols = n0 + tl.arange(0, BN)
        cmask = cols < v1
        zs = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, H, BK):
            a = tl.load(
                hs_ptr + rows[:, None].to(tl.int64) * H + (k0 + kk)[None, :], mask=rmask[:, None], other=0.0
            )
            b = tl.load(
                ws_ptr + cols[:, None].to(tl.int64) * H + (k0 + kk)[None, :], mask=cmask[:, None], other=0.0
            )
            zs = tl.dot(a, tl.trans(b), zs)
        zt = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, HT, BK):
            a = tl.load(
                ht_ptr + rows[:, None].to(tl.int64) * HT + (k0 + kk)[None, :], mask=rmask[:, None], other=0.0
            )
            b = tl.load(
                wt_ptr + cols[:, None].to(tl.int64) * HT + (k0 + kk)[None, :], mask=cmask[:, None], other=0.0
            )
            zt = tl.dot(a, tl.trans(b), zt)
        zs = tl.where(cmask[None, :], zs, NEG)
        zt = tl.where(cmask[None, :], zt, NEG)
        ms_new = tl.maximum(m_s, tl.max(zs, 1))
        mt_new = tl.maximum(m_t, tl.max(zt, 1))
        es = tl.exp(zs - ms_new[:, None])
        et = tl.exp(zt - mt_new[:, None])
        rt = tl.exp(m_t - mt_new)
        l_s = l_s * tl.exp(m_s - ms_new) + tl.sum(es, 1)
        l_t = l_t * rt + tl.sum(et, 1)
        acc = acc * rt + tl.sum(tl.where(et > 0.0, et * (zt - zs), 0.0), 1)
        m_s = ms_new
        m_t = mt_new
    base = part_ptr + pid_v.to(tl.int64) * 5 * R
    tl.store(base + rows, m_s, mask=rmask)
    tl.store(base + R + rows, l_s, mask=rmask)
    tl.store(base + 2 * R + rows, m_t, mask=rmask)
    tl.store(base + 3 * R + rows, l_t, mask=rmask)
    tl.store(base + 4 * R + rows, acc, mask=rmask)


def vocab_tile_kl(hs, ws, ht, wt, splits=8, BM=128, BN=128, BK=64, warps=8, stages=3):
    """Mean KL(p_t || p_s) over rows, T = 1, through the fused vocabulary-tile kernel."""
    R, H = hs.shape
    V, HT = wt.shape[0], ht.shape[1]
    per = triton.cdiv(triton.cdiv(V, splits), BN) * BN
    splits = triton.cdiv(V, per)
    part = torch.empty(splits, 5, R, device=hs.device, dtype=torch.float32)
    grid = (triton.cdiv(R, BM), splits)
    _vocab_tile_kl_kernel[grid](hs, ws, ht, wt, part, R, V, H, HT, per, BM=BM, BN=BN, BK=BK,
                                num_warps=warps, num_stages=stages)  # fmt: skip
    m_s, l_s, m_t, l_t, a = part.unbind(1)
    ms, mt = m_s.amax(0), m_t.amax(0)
    ls = (l_s * torch.exp(m_s - ms)).sum(0)
    rt = torch.exp(m_t - mt)
    lt, at = (l_t * rt).sum(0), (a * rt).sum(0)
    kl = at / lt - (mt + lt.log()) + (ms + ls.log())
    return kl.mean()


def run(args) -> Recorder:
    dev = torch.device("cuda")
    rec = Recorder("fused_linear_kd_design", dev, "bfloat16", "BT", [])
    H, V = args.hidden, args.vocab
    torch.manual_seed(0)
    ws = (torch.randn(V, H, device=dev) * (3 / H**0.5)).bfloat16()
    wt = (torch.randn(V, H, device=dev) * (3 / H**0.5)).bfloat16()
    for bt in args.rows:
        hs = torch.randn(bt, H, device=dev).bfloat16()
        ht = torch.randn(bt, H, device=dev).bfloat16()
        y = torch.randint(0, V, (bt,), device=dev)
        measure(rec, args, bt, hs, ws, ht, wt, y)
    return rec


def measure(rec, args, bt, hs, ws, ht, wt, y):
    if not args.sizes_only:
        compare_designs(rec, args, bt, hs, ws, ht, wt)
    sweep_sizes(rec, args, bt, hs, ws, ht, wt, y)


def compare_designs(rec, args, bt, hs, ws, ht, wt):
    dev = hs.device

    def chunked():
        with torch.no_grad():
            return pykd.fused_linear_kd_loss(hs, ws, ht, wt)

    ref, got = chunked().item(), vocab_tile_kl(hs, ws, ht, wt).item()
    print(f"BT={bt}: chunked KL {ref:.6f}, vocab_tile KL {got:.6f} (rel diff {abs(got - ref) / ref:.2e})")
    rec.add("chunked", "fwd", "time", "ms", bt, time_ms(chunked, dev, reps=args.reps))
    for cfg in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 4, 4)):
        fn = functools.partial(vocab_tile_kl, hs, ws, ht, wt, args.splits, *cfg)
        fn()
        name = "vocab_tile_" + "x".join(map(str, cfg[:3]))
        rec.add(name, "fwd", "time", "ms", bt, time_ms(fn, dev, reps=args.reps))

    def two():
        torch.mm(hs, ws.t())
        torch.mm(ht, wt.t())

    rec.add("gemm_floor_2", "fwd", "time", "ms", bt, time_ms(two, dev, reps=args.reps))


def sweep_sizes(rec, args, bt, hs, ws, ht, wt, y):
    dev = hs.device
    state = {}

    def fresh():
        state["h"] = hs.clone().requires_grad_(True)
        state["w"] = ws.clone().requires_grad_(True)

    def full():
        kw = dict(chunk_size=state["chunk"], alpha=0.5)
        pykd.fused_linear_kd_loss(state["h"], state["w"], ht, wt, y, **kw).backward()

    default = flk.GRAD_GROUP_ELEMS
    try:
        for chunk in args.chunks:
            for elems in args.groups:
                flk.GRAD_GROUP_ELEMS = elems
                group = flk.group_rows(dev, ws.shape[0], bt, chunk)
                name = f"chunk{chunk}_group{group}"
                if name in state:
                    continue  # another budget gave the same group
                state["chunk"], state[name] = chunk, True
                fresh()
                full()
                rec.add(name, "full", "time", "ms", bt, time_ms(full, dev, reps=args.reps, setup=fresh))
                fresh()
                rec.add(name, "full", "memory", "MB", bt, peak_extra_mb(full, dev))
    finally:
        flk.GRAD_GROUP_ELEMS = default


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--splits", type=int, default=8)
    p.add_argument("--chunks", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--groups", type=int, nargs="+", default=[0, 1 << 28, 1 << 29, 1 << 30],
                   help="GRAD_GROUP_ELEMS values (0: one chunk per group)")  # fmt: skip
    p.add_argument("--sizes-only", action="store_true", help="only the chunk and group sweep")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out-dir", default="benchmarks/results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("design_fused_linear_kd.py measures the GPU design choice: it needs a CUDA device")
    rec = run(args)
    csv_path, png = rec.write(f"{args.out_dir}/{device_name(torch.device('cuda'))}", "fused_linear_kd_design")
    print(f"wrote {csv_path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
