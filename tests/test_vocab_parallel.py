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
