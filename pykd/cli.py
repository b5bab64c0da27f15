"""The ``pykd`` command: ``pykd distill`` (the main job), ``pykd cache-teacher`` and ``pykd distill-lm``
(LLM distillation, :mod:`pykd.llm`), ``pykd bench [op ...]`` and ``pykd info``."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

BENCHMARKS = (
    "kd_loss",
    "attention_kd",
    "fused_linear_kd",
    "sparse_quant",
    "host_overhead",
    "distill_trainer",
    "distributed",
)


def info() -> dict:
    """Versions, devices, and which backends are built and usable."""
    import torch

    import pykd
    from pykd import _backend

    out = {
        "pykd": pykd.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpp_backend": "ok" if _backend.has_cpp() else f"unusable: {_backend._C_ERROR}",
        "cuda": torch.version.cuda or "not in this torch build",
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    if _backend.HAS_TRITON:
        import triton

        usable = torch.cuda.is_available() or _backend.interpreting()
        how = "interpreter (TRITON_INTERPRET=1)" if _backend.interpreting() else "GPU"
        out["triton"] = f"{triton.__version__} ({how})" if usable else f"{triton.__version__} (no GPU)"
    else:
        out["triton"] = "not installed"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pykd", description="pykd: fused knowledge-distillation kernels")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser(
        "bench",
        help="run benchmarks (CSV + PNG under benchmarks/results/<device>/)",
        add_help=False,
    )
    b.add_argument("ops", nargs="*", help=f"ops to benchmark (default: all of {', '.join(BENCHMARKS)})")
    sub.add_parser("info", help="versions, devices and usable backends")
    d = sub.add_parser("distill", help="the main job: distill all-MiniLM-L6-v2 into a shallower student")
    from .distill import add_arguments  # noqa: PLC0415

    add_arguments(d)
    from .llm import add_cache_teacher_arguments, add_distill_lm_arguments  # noqa: PLC0415

    c = sub.add_parser("cache-teacher", help="cache a causal LM teacher's top-k log-probs")
    add_cache_teacher_arguments(c)
    lm = sub.add_parser("distill-lm", help="distill a causal LM teacher into a student")
    add_distill_lm_arguments(lm)
    argv = sys.argv[1:] if argv is None else list(argv)
    rest = []
    if argv[:1] == ["bench"]:
        # ops are the words before the first option; the rest goes to each benchmark unparsed
        # (argparse would take an option's value, e.g. a path after --out-dir, for an op).
        i = next((k for k, a in enumerate(argv) if k > 0 and a.startswith("-")), len(argv))
        argv, rest = argv[:i], argv[i:]
    args, more = p.parse_known_args(argv)
    rest = more + rest
    if args.cmd == "distill":
        if more:
            p.error(f"unrecognized arguments: {' '.join(more)}")
        from .distill import run  # noqa: PLC0415

        run(args)
        return 0
    if args.cmd in ("cache-teacher", "distill-lm"):
        if more:
            p.error(f"unrecognized arguments: {' '.join(more)}")
        from . import llm  # noqa: PLC0415

        (llm.cache_teacher if args.cmd == "cache-teacher" else llm.distill_lm)(args)
        return 0
    if args.cmd == "info":
        for k, v in info().items():
            print(f"{k:>12}: {v}")
        return 0
    if "-h" in rest or "--help" in rest:
        print("usage: pykd bench [op ...] [benchmark options]; ops:", ", ".join(BENCHMARKS))
        print(
            "options are the benchmark script's, e.g. --quick, --device, --rows; see "
            "python -m pykd.benchmarks.bench_<op> --help"
        )
        return 0
    unknown = [op for op in args.ops if op not in BENCHMARKS]
    if unknown:
        p.error(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    for op in args.ops or BENCHMARKS:
        importlib.import_module(f"pykd.benchmarks.bench_{op}").main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
