"""Backends, seeds and markers for every op test.

Without CUDA, Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET must be set
before pykd.kernels is imported, so it is set here, first.
"""

from __future__ import annotations

import contextlib
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_bf16_fixes() -> None:
    """Make the interpreter's bf16 and fp8 behave as a GPU's. It rounds fp32 -> bf16 and fp32 -> fp8
    e4m3 to nearest even, as the GPU's cvt.rn.bf16.f32 and cvt.rn.satfinite.e4m3x2.f32 do.

    Triton's interpreter truncates that conversion (whatever rounding the kernel asks for), which
    would leave interpreted bf16 outputs up to 1 ulp off where the hardware is within 1/2 ulp.
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original = interpreter._convert_float

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.float8e4nv:
            # Its fp8 downcast flushes results below fp8's normal range wrongly and rounds ties
            # up; the GPU's cvt.rn.satfinite rounds to nearest even (pykd's inputs are in range).
            x = torch.from_numpy(np.ascontiguousarray(input).astype(np.float32))
            return x.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(np.shape(input))
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            bits = np.ascontiguousarray(input).view(np.uint32).astype(np.uint64)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            nan = np.isnan(np.ascontiguousarray(input).view(np.float32))
            out = np.where(nan, (bits >> 16) | 0x40, rounded).astype(np.uint16)
            return out.reshape(np.shape(input))
        return original(input, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert

    # Its tl.dot multiplies bf16 operands as their raw uint16 storage (integers), so bf16 matrix
    # products come out as garbage; a GPU multiplies the values (exactly, into fp32).
    builder = interpreter.InterpreterBuilder
    original_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(h):
            if h.dtype.scalar == tl.bfloat16:
                f = (h.data.astype(np.uint32) << 16).view(np.float32)
                return interpreter.TensorHandle(f, tl.float32)
            return h

        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_bf16_fixes()

import pytest  # noqa: E402
from helpers import TRITON  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import pykd  # noqa: E402,F401
from pykd import _backend  # noqa: E402

settings.register_profile(
    "pykd",
    deadline=None,
    max_examples=100 * int(os.environ.get("PYKD_EXAMPLES_SCALE", "1")),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=os.environ.get("CI", "") != "",  # CI reproducible; local runs explore
    print_blob=True,
)
settings.load_profile("pykd")

HAS_CUDA = torch.cuda.is_available()


class Backend:
    """Where an op test runs: ``cpp`` (C++ on CPU) or ``triton`` (CUDA if present, else the
    interpreter on CPU tensors). ``triton_atomic_dq`` is ``triton`` with the attention backward's
    dq added by the dk/dv kernel with atomics (kernels/attention_kd.py DQ_MODE), ``triton_tma`` with
    the attention kernels' tensor-descriptor loads (LOADS); attention tests opt in to the first with
    ``@pytest.mark.parametrize("backend", ATTENTION_BACKENDS, indirect=True)``."""

    MODES = {"triton_atomic_dq": {"DQ_MODE": "atomic"}, "triton_tma": {"LOADS": "tma"}}

    def __init__(self, name: str):
        self.name = name
        triton = name.startswith("triton")
        self.device = torch.device("cuda" if (triton and HAS_CUDA) else "cpu")
        self.interpreted = triton and not HAS_CUDA

    @contextlib.contextmanager
    def __call__(self):
        """Routes CPU tensors to Triton when interpreting; sets the attention modes of the variants."""
        with contextlib.ExitStack() as stack:
            if self.interpreted:
                stack.enter_context(_backend.triton_on_cpu())
            if self.name in self.MODES:
                from pykd.kernels import attention_kd

                stack.enter_context(attention_kd.modes(**self.MODES[self.name]))
            yield

    def __repr__(self):
        return self.name


BACKENDS = ["cpp"] + (["triton"] if TRITON else [])


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    return Backend(request.param)


@pytest.fixture(autouse=True)
def seed(request):
    """A fixed seed per test, different across tests."""
    s = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(s)
    return s


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
