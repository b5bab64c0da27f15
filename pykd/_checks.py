"""Argument checks shared by the public ops. Each raises TypeError/ValueError naming the argument."""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum", "none")


def tensor(name: str, x, *, float_dtype: bool = False) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if float_dtype and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def inspectable(x: torch.Tensor) -> bool:
    """Whether a tensor's values can be checked: not while tracing, not on the meta device."""
    return not torch.compiler.is_compiling() and x.device.type != "meta"


def same_device(names: Sequence[str], xs: Sequence[torch.Tensor]) -> None:
    devs = {x.device for x in xs}
    if len(devs) > 1:
        listing = ", ".join(f"{n} on {x.device}" for n, x in zip(names, xs))
        raise ValueError(f"tensors must be on one device: {listing}")


def choice(name: str, value, options: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")


def real(name: str, value, *, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    """A finite real number within [lo, hi] (open ends where asked)."""
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    bad = not (v - v == 0)  # not finite (math.isfinite breaks torch.compile(dynamic=True)'s trace)
    if lo is not None:
        bad = bad or (v <= lo if lo_open else v < lo)
    if hi is not None:
        bad = bad or (v >= hi if hi_open else v > hi)
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise ValueError(f"{name} must be a finite number in {left}{lo_s}, {hi_s}{right}, got {value!r}")
    return v


INT64 = (-(2**63), 2**63 - 1)
# Temperatures the fp32 kernels serve (docs/robustness.md). Below, s / T and T^2 leave fp32's range;
# above, the two distributions approach uniform and the divergence, a difference of two log-sum-exps,
# loses its digits to cancellation (measured: ~1e-3 relative at T = 100 for logits of spread 1, 3e-2
# at T = 1000).
TEMPERATURE = (1e-4, 100.0)


def integer(name: str, value) -> int:
    """An int that fits int64 (what the ops' schemas carry)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    v = int(value)
    if not INT64[0] <= v <= INT64[1]:
        raise ValueError(f"{name} must fit in int64, got {v}")
    return v


def temperature(name: str, value) -> float:
    return real(name, value, lo=TEMPERATURE[0], hi=TEMPERATURE[1])


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def logit_map(logit_softcap, logit_scale, *, teacher: bool = True) -> list[float]:
    """The kernels' logit map [s_scale, s_cap(, t_scale, t_cap)] (cap 0: none) from the ops'
    ``logit_softcap`` (None, c > 0, or a (student, teacher) pair of those) and ``logit_scale``
    (a > 0, or a pair). Without a teacher side (top-K ops) only a single value is accepted."""
    out = []
    for name, value, default, lo in (
        ("logit_scale", logit_scale, 1.0, 0.0),
        ("logit_softcap", logit_softcap, None, 0.0),
    ):
        if isinstance(value, (tuple, list)):
            if not teacher:
                raise TypeError(
                    f"{name} must be one number here (the teacher comes as log-probabilities), got {value!r}"
                )
            if len(value) != 2:
                raise ValueError(f"{name} must be a number or a (student, teacher) pair, got {value!r}")
            pair = list(value)
        else:
            pair = [value, value]
        for i, v in enumerate(pair):
            who = f"{name}[{i}]" if isinstance(value, (tuple, list)) else name
            pair[i] = 0.0 if v is None and default is None else real(who, v, lo=lo, lo_open=True)
        out.append(pair)
    (s_scale, t_scale), (s_cap, t_cap) = out
    return [s_scale, s_cap, t_scale, t_cap] if teacher else [s_scale, s_cap]
