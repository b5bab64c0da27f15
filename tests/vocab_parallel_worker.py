"""Vocabulary-parallel logit losses under torchrun (gloo on CPU): every rank holds a contiguous slice of
the vocabulary (uneven when V does not divide) and compares the loss and its slice of every gradient
with the single-process op on the whole vocabulary, computed on the same rank. Mismatches are
recorded, never raised mid-run (a rank that stopped early would leave the others hanging in a
collective); rank 0 writes every rank's list to --out. tests/test_vocab_parallel.py runs it."""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import torch
import torch.distributed as dist

import pykd

DIVS = ("kl", "reverse_kl", "soft_ce", "jsd", "tvd", "mse")


class Checker:
    def __init__(self):
        self.failures: list[str] = []
        self.count = 0

    def close(self, name, got, want, *, rtol, atol):
        self.count += 1
        got, want = got.detach().double(), want.detach().double()
        if got.shape != want.shape:
            self.failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        nan_ok = torch.equal(torch.isnan(got), torch.isnan(want))
        g, w = torch.nan_to_num(got, nan=0.0), torch.nan_to_num(want, nan=0.0)
        err = ((g - w).abs() - atol - rtol * w.abs()).max().item() if g.numel() else -1.0
        if not nan_ok or err > 0:
            self.failures.append(f"{name}: max excess {err:.3g} (NaN pattern equal: {nan_ok})")

    def raises(self, name, fn, match):
        """fn must raise ValueError/TypeError containing ``match`` on this rank."""
        self.count += 1
        try:
            fn()
        except (ValueError, TypeError) as e:
            if match not in str(e):
                self.failures.append(f"{name}: raised {e!r}, expected {match!r}")
            return
        self.failures.append(f"{name}: did not raise")


def tol(dtype):
    return {torch.float32: (2e-5, 2e-6), torch.bfloat16: (2e-2, 2e-3), torch.float16: (4e-3, 4e-4)}[dtype]


def slice_of(V, rank, world):
    return torch.tensor_split(torch.arange(V), world)[rank]


def kd_cases(ck, group, rank, world, quick):
    g = torch.Generator().manual_seed(7)
    R, V = 6, 37
    divs = DIVS if not quick else ("kl", "jsd", "mse")
    for i, (div, T) in enumerate((d, T) for d in divs for T in (1.0, 2.5)):
        s = torch.randn(R, V, generator=g) * 3
        t = torch.randn(R, V, generator=g) * 3
        y = torch.randint(0, V, (R,), generator=g)
        y[1] = -100
        targets = {"none": None, "some_ignored": y, "all_ignored": torch.full((R,), -100)}
        reds = ("mean", "sum", "none") if not quick else ("mean", "none")
        for tname, tgt in targets.items():
            for red in reds:
                if tgt is None and tname != "none":
                    continue
                opts = dict(divergence=div, temperature=T, reduction=red)
                if i % 2 and tgt is not None:
                    opts["num_items_in_batch"] = 5
                if i % 3 == 1:
                    opts["logit_softcap"] = (4.0, 6.0)
                compare_kd(ck, f"kd {div} T{T} {tname} {red}", s, t, tgt, opts, group, rank, world)


def compare_kd(ck, name, s, t, tgt, opts, group, rank, world, dtype=torch.float32, transposed=False):
    sl = slice_of(s.shape[-1], rank, world)
    sf = s.to(dtype).clone().requires_grad_()
    full = pykd.kd_loss(sf, t.to(dtype), tgt, **opts)
    full.sum().backward()
    s_loc, t_loc = s[..., sl].to(dtype).clone(), t[..., sl].to(dtype)
    if transposed:  # a non-contiguous slice (rows strided)
        s_loc = s_loc.t().contiguous().t()
        t_loc = t_loc.t().contiguous().t()
    s_loc.requires_grad_()
    part = pykd.kd_loss(s_loc, t_loc, tgt, process_group=group, **opts)
    part.sum().backward()
    rtol, atol = tol(dtype)
    ck.close(f"{name} loss", part, full, rtol=rtol, atol=atol)
    ck.close(f"{name} grad", s_loc.grad, sf.grad[..., sl], rtol=rtol, atol=atol)


def topk_teacher(g, R, V, K, V_t):
    """A teacher's sorted-or-not top-K (log-probs at distinct ids < V_t) for R rows."""
    t = torch.randn(R, V_t, generator=g) * 2
    lp, idx = t.log_softmax(-1).topk(K, -1)
    perm = torch.randperm(K, generator=g)  # any order: the op sorts
    return lp[:, perm], idx[:, perm]


def topk_cases(ck, group, rank, world, quick):
    g = torch.Generator().manual_seed(13)
    R, V, K = 7, 33, 6
    sl = slice_of(V, rank, world)
    y = torch.randint(0, V, (R,), generator=g)
    y[3] = -100
    cases = [(tail, T, V_t) for tail in (True, False) for T in (1.0, 2.0) for V_t in (V, V + 5)]
    for i, (tail, T, V_t) in enumerate(cases[:3] if quick else cases):
        s = torch.randn(R, V, generator=g) * 3
        lp, idx = topk_teacher(g, R, V, K, V_t)
        for tname, tgt in (("none", None), ("target", y), ("all_ignored", torch.full((R,), -100))):
            for red in ("mean", "none"):
                opts = dict(temperature=T, tail=tail, reduction=red)
                if V_t > V:
                    opts["teacher_vocab_size"] = V_t
                if i % 3 == 1:
                    opts["logit_softcap"] = 5.0
                sf = s.clone().requires_grad_()
                full = pykd.topk_kd_loss(sf, lp, idx, tgt, **opts)
                full.sum().backward()
                sv = s[:, sl].clone().requires_grad_()
                part = pykd.topk_kd_loss(sv, lp, idx, tgt, process_group=group, **opts)
                part.sum().backward()
                name = f"topk tail={tail} T{T} V_t={V_t} {tname} {red}"
                ck.close(f"{name} loss", part, full, rtol=2e-5, atol=2e-6)
                ck.close(f"{name} grad", sv.grad, sf.grad[:, sl], rtol=2e-5, atol=2e-6)
    # K covering the whole vocabulary (no tail bucket), and a fused-linear top-K
    s = torch.randn(R, V, generator=g)
    lp, idx = topk_teacher(g, R, V, V, V)
    sf = s.clone().requires_grad_()
    full = pykd.topk_kd_loss(sf, lp, idx, y)
    full.backward()
    sv = s[:, sl].clone().requires_grad_()
    part = pykd.topk_kd_loss(sv, lp, idx, y, process_group=group)
    part.backward()
    ck.close("topk K=V loss", part, full, rtol=2e-5, atol=2e-6)
    # the module forms pass process_group through
    mod = pykd.nn.TopKKDLoss(temperature=2.0, process_group=group)
    ck.close("TopKKDLoss", mod(s[:, sl], lp, idx, y), pykd.topk_kd_loss(s, lp, idx, y, temperature=2.0),
             rtol=2e-5, atol=2e-6)  # fmt: skip
    t = torch.randn(R, V, generator=g)
    mod = pykd.nn.KDLoss(divergence="tvd", process_group=group)
    want = pykd.kd_loss(s, t, y, divergence="tvd")
    ck.close("KDLoss", mod(s[:, sl], t[:, sl], y), want, rtol=2e-5, atol=2e-6)
    ck.close("topk K=V grad", sv.grad, sf.grad[:, sl], rtol=2e-5, atol=2e-6)
    H = 8
    h, w = torch.randn(R, H, generator=g), torch.randn(V, H, generator=g)
    lp, idx = topk_teacher(g, R, V, K, V)
    for tail in (True, False):
        hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
        full = pykd.fused_linear_topk_kd_loss(hf, wf, lp, idx, y, tail=tail, temperature=1.5, chunk_size=3)
        full.backward()
        hv, wv = h.clone().requires_grad_(), w[sl].clone().requires_grad_()
        part = pykd.fused_linear_topk_kd_loss(hv, wv, lp, idx, y, tail=tail, temperature=1.5, chunk_size=3,
                                              process_group=group)  # fmt: skip
        part.backward()
        ck.close(f"fused topk tail={tail} loss", part, full, rtol=2e-5, atol=2e-6)
        ck.close(f"fused topk tail={tail} grad_h", hv.grad, hf.grad, rtol=2e-5, atol=2e-6)
        ck.close(f"fused topk tail={tail} grad_w", wv.grad, wf.grad[sl], rtol=2e-5, atol=2e-6)
    mod = pykd.nn.FusedLinearKDLoss(temperature=2.0, process_group=group)
    ht, wt = torch.randn(R, 5, generator=g), torch.randn(V, 5, generator=g)
    want = pykd.fused_linear_kd_loss(h, w, ht, wt, y, temperature=2.0)
    ck.close("FusedLinearKDLoss", mod(h, w[sl], ht, wt[sl], y), want, rtol=2e-5, atol=2e-6)


def special_cases(ck, group, rank, world):
    g = torch.Generator().manual_seed(11)
    R, V = 5, 29
    s = torch.randn(R, V, generator=g) * 2
    t = torch.randn(R, V, generator=g) * 2
    y = torch.randint(0, V, (R,), generator=g)
    # leading dims, non-contiguous slices, bf16 / fp16
    s3, t3, y3 = s.reshape(1, R, V), t.reshape(1, R, V), y.reshape(1, R)
    compare_kd(ck, "kd 3-d", s3, t3, y3, dict(divergence="kl", temperature=2.0), group, rank, world)
    compare_kd(ck, "kd transposed", s, t, y, dict(divergence="tvd"), group, rank, world, transposed=True)
    for dt in (torch.bfloat16, torch.float16):
        compare_kd(
            ck, f"kd {dt}", s, t, y, dict(divergence="kl", temperature=2.0), group, rank, world, dtype=dt
        )
    # a teacher slice masked to -inf on the last rank (its vocabulary is padding): exact for kl
    tm = t.clone()
    tm[:, slice_of(V, world - 1, world)] = float("-inf")
    compare_kd(ck, "kd masked slice", s, tm, y, dict(divergence="kl"), group, rank, world)
    # NaN on one rank's slice only: that row's loss is NaN on every rank, the others stay finite
    sn = s.clone()
    sn[2, slice_of(V, 0, world)[0]] = float("nan")
    compare_kd(ck, "kd nan", sn, t, y, dict(divergence="jsd", reduction="none"), group, rank, world)
    # return_components
    sl = slice_of(V, rank, world)
    want = pykd.kd_loss(s, t, y, divergence="soft_ce", return_components=True, alpha=0.3)
    got = pykd.kd_loss(s[:, sl], t[:, sl], y, divergence="soft_ce", return_components=True, alpha=0.3,
                       process_group=group)  # fmt: skip
    for k, (a, b) in enumerate(zip(got, want)):
        ck.close(f"components {k}", a, b, rtol=2e-5, atol=2e-6)


def op_cases(ck, group, rank, world):
    """opcheck on the vocabulary-parallel custom ops (every rank runs the same checks, so their
    collectives meet), and torch.compile of a call (the agreement gather breaks the graph)."""
    g = torch.Generator().manual_seed(17)
    R, V, K = 5, 21, 4
    sl = slice_of(V, rank, world)
    start = int(sl[0])
    s = torch.randn(R, V, generator=g)[:, sl].contiguous()
    t = torch.randn(R, V, generator=g)[:, sl].contiguous()
    y = torch.randint(0, V, (R,), generator=g)
    y[0] = -100
    name = group.group_name
    sg = s.clone().requires_grad_()
    for args in (
        (sg, t, y, None, "kl", 2.0, 0.5, 0.5, -100, True, [1.0, 0.0, 1.0, 0.0], "mean", True, name, start, V),
        (s, t, None, None, "jsd", 1.0, 1.0, 0.3, -100, True, [1.0, 3.0, 1.0, 0.0], "none", False, name, start,
         V),
    ):  # fmt: skip
        try:
            torch.library.opcheck(torch.ops.pykd.kd_loss_vp_fwd.default, args)
            ck.count += 1
        except Exception as e:  # noqa: BLE001 - recorded, not raised (the other ranks go on)
            ck.failures.append(f"opcheck kd_loss_vp_fwd {args[4]}: {e!r}"[:500])
    lp, idx = torch.randn(R, V, generator=g).log_softmax(-1).topk(K, -1)
    idx, perm = idx.sort(-1)
    lp = lp.gather(-1, perm)
    args = (sg, lp, idx, y, None, 2.0, 0.5, True, -100, True, [1.0, 0.0], "mean", True, name, start, V)
    try:
        torch.library.opcheck(torch.ops.pykd.topk_kd_loss_vp_fwd.default, args)
        ck.count += 1
    except Exception as e:  # noqa: BLE001
        ck.failures.append(f"opcheck topk_kd_loss_vp_fwd: {e!r}"[:500])
    sc = s.clone().requires_grad_()
    f = torch.compile(lambda a, b, c: pykd.kd_loss(a, b, c, temperature=2.0, process_group=group))
    got = f(sc, t, y)
    got.backward()
    se = s.clone().requires_grad_()
    want = pykd.kd_loss(se, t, y, temperature=2.0, process_group=group)
    want.backward()
    ck.close("compiled loss", got, want, rtol=1e-6, atol=1e-7)
    ck.close("compiled grad", sc.grad, se.grad, rtol=1e-6, atol=1e-7)


def dtensor_cases(ck, group, rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 3, 23, generator=g)
    t = torch.randn(2, 3, 23, generator=g)
    y = torch.randint(0, 23, (2, 3), generator=g)
    sf = s.clone().requires_grad_()
    want = pykd.kd_loss(sf, t, y, divergence="reverse_kl", temperature=1.5)
    want.backward()
    sd = distribute_tensor(s, mesh, [Shard(-1)]).requires_grad_()
    td = distribute_tensor(t, mesh, [Shard(2)])
    got = pykd.kd_loss(sd, td, y, divergence="reverse_kl", temperature=1.5)
    got.backward()
    ck.close("dtensor loss", got, want, rtol=2e-5, atol=2e-6)
    ck.close("dtensor grad", sd.grad.full_tensor(), sf.grad, rtol=2e-5, atol=2e-6)


def fused_cases(ck, group, rank, world, quick):
    g = torch.Generator().manual_seed(3)
    R, V, H, HT = 9, 31, 8, 6
    sl = slice_of(V, rank, world)
    h, w, b = torch.randn(R, H, generator=g), torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    ht, wt, bt = torch.randn(R, HT, generator=g), torch.randn(V, HT, generator=g), torch.randn(V, generator=g)
    y = torch.randint(0, V, (R,), generator=g)
    y[4] = -100
    for div in ("kl", "jsd", "mse") if not quick else ("kl",):
        for red in ("mean", "none"):
            opts = dict(divergence=div, temperature=2.0, reduction=red, chunk_size=4)
            hf, wf, bf = (x.clone().requires_grad_() for x in (h, w, b))
            full = pykd.fused_linear_kd_loss(hf, wf, ht, wt, y, student_bias=bf, teacher_bias=bt, **opts)
            full.sum().backward()
            hv, wv, bv = (
                h.clone().requires_grad_(),
                w[sl].clone().requires_grad_(),
                b[sl].clone().requires_grad_(),
            )
            part = pykd.fused_linear_kd_loss(hv, wv, ht, wt[sl], y, student_bias=bv, teacher_bias=bt[sl],
                                             process_group=group, **opts)  # fmt: skip
            part.sum().backward()
            name = f"fused {div} {red}"
            ck.close(f"{name} loss", part, full, rtol=2e-5, atol=2e-6)
            ck.close(f"{name} grad_h", hv.grad, hf.grad, rtol=2e-5, atol=2e-6)
            ck.close(f"{name} grad_w", wv.grad, wf.grad[sl], rtol=2e-5, atol=2e-6)
            ck.close(f"{name} grad_b", bv.grad, bf.grad[sl], rtol=2e-5, atol=2e-6)


def bad_input_cases(ck, group, rank, world):
    """Each call is bad on one rank (or all); every rank must raise, none may hang."""
    torch.manual_seed(0)  # the same data on every rank
    R, V = 4, 20
    sl = slice_of(V, rank, world)
    s, t = torch.randn(R, V)[:, sl], torch.randn(R, V)[:, sl]
    y = torch.randint(0, V, (R,))
    kd = pykd.kd_loss
    rows = R + 1 if rank == world - 1 else R
    s_rows, t_rows = torch.randn(rows, len(sl)), torch.randn(rows, len(sl))
    ck.raises("rows differ", lambda: kd(s_rows, t_rows, process_group=group), "different numbers of rows")
    T = 2.0 if rank == 0 else 1.0
    ck.raises("options differ", lambda: kd(s, t, temperature=T, process_group=group), "different options")
    ck.raises("target outside every slice", lambda: kd(s, t, torch.full((R,), V), process_group=group),
              f"[0, {V})")  # fmt: skip
    t_bad = torch.randn(R, len(sl) + 1) if rank == 0 else t
    ck.raises("teacher slice differs", lambda: kd(s, t_bad, y, process_group=group),
              "same vocabulary slice" if rank == 0 else "rejected their arguments")  # fmt: skip
    div = "nope" if rank == world - 1 else "kl"
    ck.raises("bad divergence on one rank", lambda: kd(s, t, divergence=div, process_group=group),
              "divergence" if rank == world - 1 else "rejected their arguments")  # fmt: skip
    ck.raises("process_group type", lambda: kd(s, t, process_group="world"), "ProcessGroup")
    h = torch.randn(R, 8)
    w = torch.randn(len(sl), 8)
    wt = torch.randn(len(sl) + (1 if rank == 1 else 0), 8)
    lp, idx = torch.zeros(R, 3), torch.tensor([[0, 1, V]] * R)
    lp = lp.log_softmax(-1)
    ck.raises("topk index outside every slice",
              lambda: pykd.topk_kd_loss(s, lp, idx, process_group=group), f"[0, {V})")  # fmt: skip
    ck.raises("fused teacher slice differs",
              lambda: pykd.fused_linear_kd_loss(h, w, h, wt, process_group=group),
              "student_weight's vocabulary slice" if rank == 1 else "rejected their arguments")  # fmt: skip
    # slices that do not add up: the last rank passes the whole vocabulary
    s_all = torch.randn(R, V) if rank == world - 1 else s
    ck.raises("slices do not split the vocabulary", lambda: kd(s_all, s_all, process_group=group),
              "do not split the vocabulary evenly")  # fmt: skip
    # an empty slice on one rank
    s_0 = s[:, :0] if rank == 0 else s
    ck.raises("empty slice", lambda: kd(s_0, s_0, process_group=group),
              "V >= 1" if rank == 0 else "rejected their arguments")  # fmt: skip
    # a group without this rank: a ValueError on the ranks outside it, before any collective
    last = dist.new_group([world - 1])  # every rank takes part in creating it
    if rank != world - 1:
        ck.raises("group without this rank", lambda: kd(s, t, process_group=last), "not contain this rank")
    # still in step after all that: a good call works
    g = torch.Generator().manual_seed(1)  # the calls above drew different numbers on different ranks
    s2, t2 = torch.randn(R, V, generator=g), torch.randn(R, V, generator=g)
    compare_kd(ck, "kd after errors", s2, t2, y, {}, group, rank, world)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--backend", choices=("cpp", "triton"), default="cpp")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    ck = Checker()
    quick = args.backend == "triton"  # the interpreter is slow: fewer cases, every kernel phase still
    ctx = contextlib.nullcontext()
    if args.backend == "triton":
        from pykd import _backend

        ctx = _backend.triton_on_cpu()
    with ctx:
        kd_cases(ck, group, rank, world, quick)
        special_cases(ck, group, rank, world)
        topk_cases(ck, group, rank, world, quick)
        fused_cases(ck, group, rank, world, quick)
        if not quick:
            op_cases(ck, group, rank, world)
            dtensor_cases(ck, group, rank, world)
            bad_input_cases(ck, group, rank, world)
    every = [None] * world
    dist.all_gather_object(every, {"rank": rank, "checks": ck.count, "failures": ck.failures})
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(every, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo's teardown can abort after a clean run; the results are written


if __name__ == "__main__":
    main()
