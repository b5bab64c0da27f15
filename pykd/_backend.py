"""Backend machinery shared by every op.

Dispatch rule: CUDA tensors run the Triton kernels (``pykd.kernels``), CPU tensors the C++ kernels
(``pykd._C``), through the ``torch.library`` dispatcher. ``triton_on_cpu()`` is the test-only switch that
routes CPU tensors to the Triton kernels too; with ``TRITON_INTERPRET=1`` set before ``pykd.kernels`` is
imported, they run in Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import warnings
from typing import Callable

import torch

_C = None
_C_ERROR: str | None = None
_REBUILD = "rebuild it: pip install --no-build-isolation -e . (from the pykd source tree)"


def _source_hash(csrc: str) -> str:
    h = hashlib.sha256()
    paths = [p for ext in ("*.cpp", "*.cu", "*.h") for p in glob.glob(os.path.join(csrc, ext))]
    for p in sorted(paths):
        if p.endswith(".cu") and not torch.version.cuda:
            continue
        with open(p, "rb") as f:
            h.update(os.path.basename(p).encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def _load() -> None:
    global _C, _C_ERROR
    try:
        from pykd import _C as c  # noqa: PLC0415
    except ImportError as e:
        _C_ERROR = f"pykd's C++ extension pykd._C could not be loaded ({e}); {_REBUILD}"
        return
    if c.torch_version != torch.__version__:
        _C_ERROR = (
            f"pykd._C was built against torch {c.torch_version} but torch {torch.__version__} is "
            f"installed; {_REBUILD}"
        )
        return
    # In a source checkout (editable install) a build older than csrc/ is stale.
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    if os.path.isdir(csrc) and _source_hash(csrc) != c.source_hash:
        _C_ERROR = f"pykd._C is older than the sources in {csrc}; {_REBUILD}"
        return
    _C = c


_load()


def _fast_fill_defaults() -> None:
    """torch's custom-op autograd calls ``torch._library.utils.fill_defaults`` on every forward with
    grad; in torch 2.11-2.13 it reads ``schema.arguments`` (a fresh list of pybind objects) once per
    argument: O(n^2) conversions, 120 us per call of a 21-argument op on a 2-core CPU (the
    attention op's, before its autograd moved to C++), more than its kernel. This equivalent reads
    the list once (tests/test_package.py checks that both agree on every pykd op)."""
    try:
        from torch._library import utils
    except ImportError:  # pragma: no cover - a torch without torch.library internals
        return
    original = getattr(utils, "fill_defaults", None)
    if original is None or getattr(original, "_pykd", False):
        return
    if original.__code__.co_varnames[:3] != ("schema", "args", "kwargs"):  # pragma: no cover
        return

    def fill_defaults(schema, args, kwargs):
        new_args = []
        new_kwargs = {}
        for i, info in enumerate(schema.arguments):
            if info.kwarg_only:
                new_kwargs[info.name] = kwargs[info.name] if info.name in kwargs else info.default_value
            else:
                new_args.append(args[i] if i < len(args) else info.default_value)
        return tuple(new_args), new_kwargs

    fill_defaults._pykd = True
    fill_defaults.original = original
    utils.fill_defaults = fill_defaults


_fast_fill_defaults()


def require_cpp() -> None:
    """Raise a clear error when the C++ extension is missing or stale."""
    if _C_ERROR is not None:
        raise RuntimeError(_C_ERROR)


def has_cpp() -> bool:
    return _C_ERROR is None


try:  # Triton is optional on machines that only use the C++ backend.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with Linux installs
    HAS_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_IMPLS: dict[str, Callable] = {}


def triton_impl(op: str) -> Callable[[Callable], Callable]:
    """Register ``fn`` as the CUDA kernel of ``pykd::<op>`` and remember it for ``triton_on_cpu``."""

    def deco(fn: Callable) -> Callable:
        _TRITON_IMPLS[op] = fn
        if has_cpp():
            torch.library.register_kernel(f"pykd::{op}", "cuda", fn)
        return fn

    return deco


@contextlib.contextmanager
def triton_on_cpu():
    """Test-only: run the Triton kernels on CPU tensors (needs ``TRITON_INTERPRET=1``)."""
    require_cpp()
    if not (HAS_TRITON and interpreting()):
        raise RuntimeError("triton_on_cpu needs triton and TRITON_INTERPRET=1 set before import")
    global _CPU_TO_TRITON
    lib = torch.library.Library("pykd", "IMPL")
    _CPU_TO_TRITON += 1
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
            for op, fn in _TRITON_IMPLS.items():
                lib.impl(op, fn, "CPU")
        yield
    finally:
        _CPU_TO_TRITON -= 1
        lib._destroy()


_CPU_TO_TRITON = 0


def runs_triton(device: torch.device) -> bool:
    """Whether pykd's ops on ``device`` run the Triton kernels: CUDA, or CPU inside triton_on_cpu."""
    return device.type == "cuda" or (device.type == "cpu" and _CPU_TO_TRITON > 0)


def triton_launcher(op: str) -> Callable:
    """The Triton launcher registered for ``pykd::<op>``, for callers that pass it launcher-only
    options (the ops' schemas stay those of the C++ kernels)."""
    return _TRITON_IMPLS[op]


_DEBUG = os.environ.get("PYKD_DEBUG", "0") == "1"


def set_debug(enabled: bool) -> None:
    """Check data-dependent preconditions (target ranges) on CUDA too, at the cost of a sync."""
    global _DEBUG
    _DEBUG = bool(enabled)


def debug() -> bool:
    return _DEBUG


def reduction_denominator(target, R, ignore_index, num_items, device) -> torch.Tensor:
    """The "mean" denominator as a 0-d fp32 device tensor (no host sync): num_items when given,
    else the rows that count, at least 1 so an all-ignored batch gives 0 rather than NaN."""
    if num_items is not None:
        return num_items.to(device=device, dtype=torch.float32).reshape(())
    if target is None:
        return torch.full((), float(max(R, 1)), device=device, dtype=torch.float32)
    return (target != ignore_index).sum().clamp_min(1).to(torch.float32)


def mean_scale_in_forward(dtype: torch.dtype) -> bool:
    """Whether a kernel folds the "mean" 1/n into a gradient it stores in the forward. Not for
    fp16: (p_s - p_t)/n underflows fp16's range before a loss scaler's grad_output arrives, so
    fp16 gradients are stored per row and backward applies grad_output / n."""
    return dtype != torch.float16


def refuse_double_backward(op: str) -> None:
    """For ops whose gradient the forward computes (it has no graph of its own): a backward with
    create_graph=True would return a constant and silently drop every second-order term, so it
    raises instead."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"pykd.{op}: double backward (create_graph=True) is not supported: the gradient is computed "
            f"in the forward and has no graph of its own; use pykd.reference.{op} for second-order terms"
        )


def row_loss_scale(target, R, ignore_index, num_items, reduction, dtype, device):
    """(n, scale) for a row-loss kernel: n the "mean" denominator (a device tensor) and scale the
    factor its stored gradient carries, 1/n for "mean" unless the dtype defers it to backward."""
    n = reduction_denominator(target, R, ignore_index, num_items, device)
    if reduction == "mean" and mean_scale_in_forward(dtype):
        return n, 1.0 / n
    return n, torch.ones((), device=device, dtype=torch.float32)


def soft_weight(divergence, temperature, alpha, scale_by_t2) -> float:
    """alpha w, the soft term's weight in a row loss: w = T^2 under scale_by_t2, never for "mse"."""
    return alpha * (1.0 if (divergence == "mse" or not scale_by_t2) else temperature * temperature)


def finish_rows(soft, hard, alpha_w, alpha, reduction, n):
    """(loss, soft, hard) from per-row soft divergence and hard CE, reduced like the C++ kernels:
    loss_r = alpha_w soft_r + (1 - alpha) hard_r; summed, and divided by n for "mean"."""
    loss = soft * alpha_w + hard * (1.0 - alpha)
    if reduction == "none":
        return loss, soft, hard
    loss, soft, hard = loss.sum(), soft.sum(), hard.sum()
    if reduction == "mean":
        loss, soft, hard = loss / n, soft / n, hard / n
    return loss, soft, hard
