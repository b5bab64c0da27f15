"""Vocabulary-parallel logit losses (``process_group=``): tests/vocab_parallel_worker.py under torchrun
with 2 and 4 gloo processes, each holding a slice of the vocabulary, against the single-process ops
on the whole vocabulary (values, every gradient, ignored rows, NaN, DTensor, bad input on one rank)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "vocab_parallel_worker.py")


def _launch(tmp_path, nproc, backend):
    out = tmp_path / f"{backend}{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           WORKER, "--out", str(out), "--backend", backend]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("nproc,backend", [(2, "cpp"), (4, "cpp"), (2, "triton")])
def test_vocab_parallel_matches_one_process(tmp_path, nproc, backend):
    ranks = _launch(tmp_path, nproc, backend)
    assert sorted(r["rank"] for r in ranks) == list(range(nproc))
    for r in ranks:
        assert r["checks"] > 90, r  # the cases ran (a worker that skipped them would pass vacuously)
        assert r["failures"] == [], f"rank {r['rank']}: " + "\n".join(r["failures"])


def test_slice_gradient_in_the_gemm_dtype():
    """The fused ops ask a slice's gradient phase for their GEMMs' dtype (bf16 from fp32 logits on
    CUDA): Triton stores it rounded once, the value of the fp32 gradient."""
    import torch

    from pykd import _backend, vocab_parallel

    if not (_backend.HAS_TRITON and _backend.interpreting()):
        pytest.skip("needs the Triton interpreter")
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 11, generator=g), torch.randn(3, 11, generator=g)
    y = torch.tensor([2, -100, 20])  # 20: another slice's entry
    stats = torch.stack([s.logsumexp(-1), t.logsumexp(-1), s.logsumexp(-1) + 0.5, torch.zeros(3),
                         torch.zeros(3)], 1)  # fmt: skip
    args = (s, t, y, stats, None, "kl", 1.0, 0.5, 0.5, -100, True, [1.0, 0.0, 1.0, 0.0], 3, 4, 30)
    with _backend.triton_on_cpu():
        outs = []
        for dtype in (None, torch.bfloat16):
            n, scale, op = vocab_parallel._phase_op("kd_loss_shard", s, y, -100, None, "mean", dtype)
            a = list(args)
            a[4] = scale
            outs.append(op(*a))
    assert outs[1].dtype == torch.bfloat16 and outs[0].dtype == torch.float32
    assert torch.equal(outs[1], outs[0].to(torch.bfloat16))
    assert outs[0][1].abs().max() == 0  # the ignored row


def _compare_slice_phases(dtype, R, V, start, total, K, triton):
    """The Triton phase kernels of process_group= (``triton()``: a context in which they run, and the
    device of their inputs) against the C++ ones on the same inputs, on the vocabulary slice
    [start, start + V) of ``total``: kd_loss's stats, partial sums and gradient, topk_kd_loss's stats
    and gradient."""
    import torch

    ctx, device = triton
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(R, V, generator=g) * 4).to(dt)
    t = (torch.randn(R, V, generator=g) * 4).to(dt)
    y = torch.randint(0, total, (R,), generator=g)
    y[:6] = start + torch.arange(6) * (V // 7)  # targets on this slice, the others elsewhere
    y[6] = -100
    scale = torch.tensor(1.0 / 30)
    tol = dict(rtol=2e-5, atol=1e-5) if dt == torch.float32 else dict(rtol=2e-2, atol=1e-3)

    def both(op, *args):
        cpu = op(*args)
        with ctx():
            other = op(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args])
        return cpu, other.cpu()

    kd = torch.ops.pykd.kd_loss_shard
    for div in ("kl", "jsd", "mse"):
        for T in (1.0, 2.0):
            opts = (div, T, 0.5, 0.5, -100, True, [1.0, 0.0, 1.0, 30.0])
            cpu, got = both(kd, s, t, y, None, scale, *opts, 1, start, total)
            cols = [4, 5, 6, 7] if div == "mse" else list(range(8))
            torch.testing.assert_close(got[:, cols], cpu[:, cols], **tol, equal_nan=True)
            lse = torch.stack([cpu[:, 0] + cpu[:, 1].log(), cpu[:, 2] + cpu[:, 3].log()], 1)
            if div == "jsd":
                cpu2, got2 = both(kd, s, t, y, lse, scale, *opts, 2, start, total)
                torch.testing.assert_close(got2, cpu2, **tol)
            stats = torch.cat([lse, lse[:, :1] + 0.1, torch.full((R, 1), 0.05), torch.zeros(R, 1)], 1)
            cpu3, got3 = both(kd, s, t, y, stats, scale, *opts, 3, start, total)
            torch.testing.assert_close(got3.float(), cpu3.float(), **tol)
    # top-K ids: 8 on this slice, the rest elsewhere, distinct; probabilities leaving a tail
    outside = torch.stack([torch.randperm(total - V, generator=g)[: K - 8] for _ in range(R)])
    outside = torch.where(outside < start, outside, outside + V)
    inside = torch.stack([start + torch.randperm(V, generator=g)[:8] for _ in range(R)])
    idx, _ = torch.cat([outside, inside], 1).sort(-1)
    lp = torch.randn(R, K + 1, generator=g).log_softmax(-1)[:, :K]
    topk = torch.ops.pykd.topk_kd_loss_shard
    for tail in (True, False):
        opts = (2.0, 0.5, tail, -100, True, [1.0, 0.0])
        cpu, got = both(topk, s, lp, idx, y, None, scale, *opts, 1, start, total)
        cols = list(range(10)) if tail else [0, 1, 2, 3, 6, 7, 8, 9]  # (m, l) of K: the tail's only
        torch.testing.assert_close(got[:, cols], cpu[:, cols], **tol, equal_nan=True)
        lse = cpu[:, 0] + cpu[:, 1].log()
        stats = torch.stack([lse + 0.2, lse, lse + 0.1, torch.full((R,), 0.1), torch.ones(R)], 1)
        cpu2, got2 = both(topk, s, lp, idx, y, stats, scale, *opts, 2, start, total)
        torch.testing.assert_close(got2.float(), cpu2.float(), **tol)


def test_slice_phases_triton_match_cpp():
    """Both backends' phase kernels agree on a small slice (the interpreter; a GPU runs the next)."""
    import torch

    from pykd import _backend

    if torch.cuda.is_available():
        pytest.skip("the gpu-marked test covers it")
    if not (_backend.HAS_TRITON and _backend.interpreting()):
        pytest.skip("needs the Triton interpreter")
    for dtype in ("float32", "bfloat16"):
        _compare_slice_phases(dtype, 9, 53, 40, 150, 12, (_backend.triton_on_cpu, "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_slice_phases_on_cuda_match_cpp(dtype):
    """On a GPU, at an LLM vocabulary's slice: a quarter of 128256 starting at id 32064."""
    import contextlib

    _compare_slice_phases(dtype, 37, 32064, 32064, 128256, 64, (contextlib.nullcontext, "cuda"))
