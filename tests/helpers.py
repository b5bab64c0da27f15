"""Test harness shared by every op test: tolerances and comparison. (Output poisoning is the
PYKD_POISON_OUTPUTS switch of the ops themselves.)"""

from __future__ import annotations

import os

import torch

from pykd import _backend

# Triton runs where CUDA is, or in the interpreter (tests/conftest.py sets TRITON_INTERPRET first).
TRITON = _backend.HAS_TRITON and (torch.cuda.is_available() or _backend.interpreting())
# The backends of the attention tests that also cover the atomic-dq backward (tests/conftest.py).
ATTENTION_BACKENDS = ["cpp"] + (["triton", "triton_atomic_dq"] if TRITON else [])


# (rtol, atol) per dtype of the tensor being checked. atol is relative to the largest |expected|
# entry of that tensor, so one table serves gradients of any scale. fp32 values come from fp32
# accumulation; fp16/bf16 values are fp32 results rounded once to the dtype (half an ulp: 2^-11,
# 2^-8), with a margin for the fp32 error before rounding.
TOL = {
    torch.float32: (2e-5, 2e-6),
    torch.float16: (1.2e-3, 2e-5),
    torch.bfloat16: (8e-3, 1e-4),
}


def examples(n: int) -> int:
    """Hypothesis examples for a property test: n, times PYKD_EXAMPLES_SCALE (tests/long_properties.sh)."""
    return n * int(os.environ.get("PYKD_EXAMPLES_SCALE", "1"))


def assert_close(actual, expected, *, dtype=None, rtol=None, atol=None, scale=None, name="tensor"):
    """|actual - expected| <= rtol |expected| + atol max(max|expected|, scale), elementwise.

    ``scale`` is the size of the terms that cancel into ``expected`` when it can be far smaller
    than they are (a gradient p_s - p_t that is exactly 0).

    ``dtype`` picks (rtol, atol) from TOL (default: actual's dtype); explicit rtol/atol override.
    On failure, reports the worst element (index, values, error, bound) and how many mismatch.
    """
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    dt = dtype if dtype is not None else actual.dtype
    r, a = TOL.get(dt, TOL[torch.float32])
    rtol = r if rtol is None else rtol
    atol = a if atol is None else atol
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    act = actual.detach().to(torch.float64).cpu()
    exp = expected.detach().to(torch.float64).cpu()
    both_inf = torch.isinf(act) & torch.isinf(exp) & (torch.sign(act) == torch.sign(exp))
    finite_exp = exp[torch.isfinite(exp)]
    scale = max(finite_exp.abs().max().item() if finite_exp.numel() else 0.0, scale or 0.0)
    bound = rtol * exp.abs() + atol * scale
    err = (act - exp).abs()
    bad = ~((err <= bound) | both_inf)
    bad |= torch.isnan(act) & ~torch.isnan(exp)
    if bad.any():
        ratio = torch.where(bad, err / bound.clamp_min(1e-300), torch.zeros_like(err))
        ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, float("inf")), ratio)
        flat = int(torch.argmax(ratio.reshape(-1)))
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), act.shape)) if act.dim() else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements mismatch (rtol={rtol}, atol={atol} x "
            f"max|expected|={scale:.3g}); worst at {idx}: actual={act.reshape(-1)[flat].item():.9g} "
            f"expected={exp.reshape(-1)[flat].item():.9g} err={err.reshape(-1)[flat].item():.3g} "
            f"bound={bound.reshape(-1)[flat].item():.3g}"
        )


def grad_of(fn, x: torch.Tensor, grad_output: torch.Tensor | float = 1.0):
    """(output, d(sum(output * grad_output))/dx) for a fresh leaf copy of x."""
    leaf = x.detach().clone().requires_grad_(True)
    out = fn(leaf)
    main = out[0] if isinstance(out, tuple) else out
    go = torch.as_tensor(grad_output, dtype=main.dtype, device=main.device)
    main.backward(go.expand_as(main) if main.dim() else go)
    return out, leaf.grad


def assert_close_to_baseline(actual, expected, baseline, *, dtype, scale=None, extra=0.0, name="tensor"):
    """For fp16/bf16 kernels whose products round their operands to the input dtype (flash
    attention's P before P.V, dS before dS.K, Delta from the rounded output): the largest error
    against the float64 ``expected`` is at most twice that of ``baseline``, the same math run
    eagerly in that dtype (FlashAttention's criterion), plus TOL's atol x max(max|expected|, scale)
    (scale as in assert_close), plus ``extra``: a bound on an error the kernel has by design and the
    eager baseline has not (see test_attention_kd.delta_rounding)."""
    act = actual.detach().to(torch.float64).cpu()
    exp = expected.detach().to(torch.float64).cpu()
    base = baseline.detach().to(torch.float64).cpu()
    assert act.shape == exp.shape, f"{name}: shape {tuple(act.shape)} != expected {tuple(exp.shape)}"
    assert not torch.isnan(act).any(), f"{name}: NaN"
    err = (act - exp).abs().max().item() if act.numel() else 0.0
    base_err = (base - exp).abs().max().item() if act.numel() else 0.0
    scale = max(exp.abs().max().item() if act.numel() else 0.0, scale or 0.0)
    bound = 2 * base_err + TOL[dtype][1] * scale + extra
    assert err <= bound, (
        f"{name}: max error {err:.3g} > 2 x {dtype} eager's {base_err:.3g} + {TOL[dtype][1]} x {scale:.3g}"
        f" + {extra:.3g}"
    )


def assert_close_abs(actual, expected, *, rtol, atol, name="tensor"):
    """|actual - expected| <= rtol |expected| + atol elementwise, atol absolute (for losses whose
    error is set by the size of the logits, not of the loss, which may be exactly 0)."""
    act = torch.as_tensor(actual).detach().to(torch.float64).cpu()
    exp = torch.as_tensor(expected).detach().to(torch.float64).cpu()
    assert act.shape == exp.shape, f"{name}: shape {tuple(act.shape)} != expected {tuple(exp.shape)}"
    err = (act - exp).abs()
    bad = ~(err <= rtol * exp.abs() + atol)
    assert not bad.any(), (
        f"{name}: {int(bad.sum())}/{bad.numel()} elements mismatch; worst err {err.max().item():.3g} "
        f"(rtol {rtol}, atol {atol:.3g})"
    )
