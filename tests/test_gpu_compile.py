"""Every Triton kernel compiles to a cubin for Hopper (sm_90) and Ampere (sm_80), on a machine
without a GPU: catches what the interpreter cannot (types, layouts, control flow the compiler
rejects). This is not a run on a GPU; tests marked `gpu` do that.

For sm_90 the compiler's output is also checked against benchmarks/results/sm90-compile/kernels.csv
(regenerate it with ``python tests/aot_compile.py 90 --csv benchmarks/results/sm90-compile/kernels.csv``):
every attention dot lowers to wgmma (HGMMA/QGMMA in SASS, never mma.sync), every attention kernel's
tile loads are pipelined (asynchronous copies to shared memory; not yet those distilling from a
top-k capture), a kernel that does not spill never
starts to, and with the same Triton no kernel's spills grow. Each kernel is compiled as a launch at
a typical size specializes it (aligned pointers, ints divisible by 16; tests/aot_compile.py
``source``): without that the compiler builds a different kernel from the one that runs.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
COMMITTED = os.path.join(os.path.dirname(HERE), "benchmarks", "results", "sm90-compile", "kernels.csv")


def _has_cuda_backend() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except ImportError:
        return False


@pytest.mark.skipif(not _has_cuda_backend(), reason="triton without its CUDA backend")
@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_gpu(arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    stats = tmp_path / "kernels.csv"
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "aot_compile.py"), str(arch)]
        + (["--csv", str(stats)] if arch == 90 else []),
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    expected = 114 + 6 + 2 + 12 + 4 + attention_configs(arch) + 6 + 3 + 3 + (2 if arch >= 89 else 1)
    assert r.stdout.strip().splitlines()[-1] == f"compiled {expected}", r.stdout[-500:]
    if arch == 90:
        check_sm90(read(stats), read(COMMITTED))


def attention_configs(arch) -> int:
    """How many distinct block shapes the attention kernels ship (kernels/attention_kd.py CONFIGS: per
    kernel, head dim and sequence length) at the head dims compiled for arch (128 only on sm_90)."""
    from pykd.kernels.attention_kd import CONFIGS

    dims = (64, 128) if arch >= 90 else (64,)
    n = sum(len(set(CONFIGS[k][d].values())) for k in ("fwd", "dkdv", "dq", "dkdv_atomic") for d in dims)
    return 2 * n if arch >= 90 else n  # sm_90: each again with tensor-descriptor loads


def read(path) -> dict:
    with open(path, newline="") as f:
        return {r["kernel"]: r for r in csv.DictReader(f)}


def check_sm90(new: dict, old: dict) -> None:
    attention = [k for k in new if k.startswith("attention_kd")]
    assert attention
    bad = [k for k in attention if int(new[k]["wgmma"]) == 0 or int(new[k]["mma_sync"]) > 0]
    assert not bad, f"dots not on wgmma: {bad}"
    # a top-k capture's per-key compare loop (_topk_tile) nests a loop in the tile loop, which keeps
    # the software pipeliner off those three kernels
    bad = [k for k in attention if (int(new[k]["async_loads"]) == 0) != ("top-k capture" in k)]
    assert not bad, f"tile loads not pipelined (or newly pipelined: update this test): {bad}"
    same_triton = {r["triton"] for r in old.values()} == {r["triton"] for r in new.values()}
    for k, r in new.items():
        if k not in old:
            continue
        was, now = int(old[k]["stack_bytes"]), int(r["stack_bytes"])
        assert not (was == 0 and now > 0), f"{k} now spills ({now} bytes of stack)"
        if same_triton:
            assert now <= was, (
                f"{k}: spills grew from {was} to {now} bytes (commit a new kernels.csv only on purpose)"
            )
