"""Every Triton kernel compiles to a cubin for Hopper (sm_90) and Ampere (sm_80), on a machine
without a GPU: catches what the interpreter cannot (types, layouts, control flow the compiler
rejects). This is not a run on a GPU; tests marked `gpu` do that."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _has_cuda_backend() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except ImportError:
        return False


@pytest.mark.skipif(not _has_cuda_backend(), reason="triton without its CUDA backend")
@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_gpu(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "aot_compile.py"), str(arch)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    expected = 114 + 12 + (6 if arch >= 90 else 3) + 6 + 3 + 3 + (2 if arch >= 89 else 1)
    assert r.stdout.strip().splitlines()[-1] == f"compiled {expected}", r.stdout[-500:]
