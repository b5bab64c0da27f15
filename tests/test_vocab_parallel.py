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
