"""Shared benchmark machinery (DESIGN.md section 7): timing, peak memory, long-format CSV, PNG.

GPU: ``triton.testing.do_bench`` and ``torch.cuda.max_memory_allocated``. CPU: wall-clock medians of
repeated runs, and peak RSS above a baseline (VmHWM, reset through /proc/self/clear_refs before each
case so one process measures every case from its own start).
"""

from __future__ import annotations

import csv
import datetime
import gc
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

FIELDS = [
    "op",
    "provider",
    "mode",
    "metric",
    "unit",
    "x_name",
    "x_value",
    "median",
    "p20",
    "p80",
    "device",
    "dtype",
    "pykd_version",
    "commit",
    "date",
]


def device_name(device: torch.device) -> str:
    """A folder name for results: the GPU model, or the CPU model and core count."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                m = re.search(r"model name\s*:\s*(.+)", f.read())
            if m:
                name = m.group(1)
        except OSError:
            pass
        name = f"cpu {name} {torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _git(*args: str) -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit() -> str:
    """The short commit of the code being measured, "-dirty" if tracked files differ from it (results
    written under benchmarks/results by an earlier sweep of the same run do not count).

    PYKD_COMMIT overrides it, for copies of the tree without .git (a remote GPU run)."""
    if os.environ.get("PYKD_COMMIT"):
        return os.environ["PYKD_COMMIT"]
    head = _git("rev-parse", "--short", "HEAD")
    if head is None:
        return "unknown"
    results = ":(top,exclude)benchmarks/results"
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", ":/", results)
    return head + ("-dirty" if changed else "")


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return statistics.median(xs), q[1], q[7]


def time_ms(fn: Callable[[], None], device: torch.device, *, reps: int, setup=None):
    """(median, p20, p80) milliseconds of fn(); setup() runs untimed before each call."""
    if device.type == "cuda":
        import triton.testing

        if setup is None:
            ms = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=200)
            return tuple(ms)
    return wall_ms(fn, device, reps=reps, setup=setup)


def wall_ms(fn: Callable[[], None], device: torch.device, *, reps: int, setup=None):
    """(median, p20, p80) wall-clock milliseconds of fn(), one call at a time (host time included:
    a GPU is synchronized before and after each call); setup() runs untimed before each call."""
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def record_times(rec, name: str, x_value, device: torch.device, reps: int, fresh, forward, backward):
    """Record fwd, bwd and full (forward then backward) times of one provider at one size.

    fresh() makes new leaf inputs, forward() runs the op, backward() backpropagates what forward
    left; each timed call starts from untimed fresh inputs. Returns full, for a memory probe."""

    def setup_bwd():
        fresh()
        forward()

    def full():
        forward()
        backward()

    fresh()
    full()  # warm-up (compiles)
    rec.add(name, "fwd", "time", "ms", x_value, time_ms(forward, device, reps=reps, setup=fresh))
    rec.add(name, "bwd", "time", "ms", x_value, time_ms(backward, device, reps=reps, setup=setup_bwd))
    rec.add(name, "full", "time", "ms", x_value, time_ms(full, device, reps=reps, setup=fresh))
    return full


def _rss_hwm_kb() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def peak_extra_mb(fn: Callable[[], None], device: torch.device) -> float:
    """Peak memory fn() needs above what is allocated when it starts, in MB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _rss_kb()
    fn()
    return (_rss_hwm_kb() - base) / 1024


class ProviderLoop:
    """Runs each provider at each size; a provider that runs out of memory is reported and skipped
    at every larger size."""

    def __init__(self, device: torch.device, x_name: str):
        self.device, self.x_name, self.out_of_memory = device, x_name, set()

    def run(self, name: str, x_value, measure: Callable[[], None]) -> None:
        if name in self.out_of_memory:
            print(
                f"  {name:>12} skipped at {self.x_name}={x_value} (out of memory at a smaller {self.x_name})"
            )
            return
        try:
            measure()
        except torch.OutOfMemoryError:
            self.out_of_memory.add(name)
            print(f"  {name:>12} out of memory at {self.x_name}={x_value}")
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def fresh_process_peak_mb(module: str, args: list[str]) -> float:
    """CPU peak memory of a case measured in a fresh process: a process's freed memory stays
    mapped and is reused, so each CPU peak is taken from its own start (DESIGN.md section 7).
    Runs ``python -m <module> --child-memory <args>``, which must print the MB last."""
    cmd = [sys.executable, "-m", module, "--child-memory", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1].split()[-1])


# What a user would run without pykd, most specific first: Liger-Kernel's losses, the eager ops
# (materialized maps for attention distillation), SDPA (plain attention).
BASELINES = ("liger", "eager", "sdpa")
PANEL_ORDER = ("fwd", "bwd", "full")


@dataclass
class Recorder:
    op: str
    device: torch.device
    dtype: str
    x_name: str
    rows: list
    commit: str = ""  # taken once, when the run starts: the code being measured
    device_label: str = ""

    def __post_init__(self):
        self.commit = self.commit or commit()
        self.device_label = self.device_label or device_name(self.device)
        # PYKD_PARTIAL_DIR (set by gpu_check.sh): every row is also saved at once, so a run stopped
        # by its time limit keeps what it measured; write() removes the partial file.
        partial = os.environ.get("PYKD_PARTIAL_DIR")
        self._partial = (
            os.path.join(partial, f"{self.op}_{os.getpid()}_{id(self)}.partial.csv") if partial else None
        )

    def add(self, provider, mode, metric, unit, x_value, stats):
        import pykd

        med, p20, p80 = stats if isinstance(stats, tuple) else (stats, stats, stats)
        self.rows.append(
            dict(
                op=self.op,
                provider=provider,
                mode=mode,
                metric=metric,
                unit=unit,
                x_name=self.x_name,
                x_value=x_value,
                median=f"{med:.6g}",
                p20=f"{p20:.6g}",
                p80=f"{p80:.6g}",
                device=self.device_label,
                dtype=self.dtype,
                pykd_version=pykd.__version__,
                commit=self.commit,
                date=datetime.date.today().isoformat(),
            )
        )
        print(
            f"  {provider:>10} {mode:>4} {metric:>6} {self.x_name}={x_value}: {med:.4g} {unit}",
            flush=True,
        )
        if self._partial:
            self._write_csv(self._partial)

    def _write_csv(self, path: str) -> None:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(self.rows)

    def write(self, out_dir: str, stem: str, baseline=BASELINES, target="pykd") -> tuple[str, str | None]:
        """The CSV, and the PNG with a ratio panel of ``target`` against the first provider of
        ``baseline`` that was measured (the one a user would otherwise pick)."""
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{stem}.csv")
        self._write_csv(path)
        if self._partial and os.path.exists(self._partial):
            os.remove(self._partial)
        return path, plot(self.rows, os.path.join(out_dir, f"{stem}.png"), baseline=baseline, target=target)


def panel_key(panel: tuple[str, str]):
    """Order of (metric, mode) panels and tables: time fwd, bwd, full, then the other metrics."""
    metric, mode = panel
    order = PANEL_ORDER.index(mode) if mode in PANEL_ORDER else len(PANEL_ORDER)
    return (metric != "time", metric, order, mode)


def pick_baseline(providers, baseline=BASELINES) -> str | None:
    """The first of ``baseline`` (exact name, or a prefix as 'liger' for 'liger_jsd') measured."""
    for b in baseline:
        hits = sorted(p for p in providers if p == b or p.startswith(b + "_"))
        if hits:
            return hits[0]
    return None


def ratios(rows: list[dict], base: str, target: str = "pykd") -> dict:
    """{(metric, mode): [(x, base / target)]}: speed-up (time) and memory saving of target."""
    val = {(r["provider"], r["metric"], r["mode"], float(r["x_value"])): float(r["median"]) for r in rows}
    out: dict = {}
    for (prov, metric, mode, x), v in sorted(val.items()):
        b = val.get((base, metric, mode, x))
        if prov == target and metric in ("time", "memory") and b is not None and v > 0:
            out.setdefault((metric, mode), []).append((x, b / v))
    return out


def _log_axes(ax, xs) -> None:
    """Log x and y; the x ticks at the measured sizes, written out (1024, not 2^10)."""
    import matplotlib.ticker

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    xs = sorted(xs)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def plot(rows: list[dict], path: str, baseline=BASELINES, target="pykd") -> str | None:
    """Panels fwd, bwd, full time then memory (median against x per provider, p20-p80 as error bars,
    log axes), and one of target's speed-up and memory saving against the baseline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install pykd[bench]); no PNG written")
        return None
    panels = sorted({(r["metric"], r["mode"]) for r in rows}, key=panel_key)
    base = pick_baseline({r["provider"] for r in rows} - {target}, baseline)
    rat = ratios(rows, base, target) if base else {}
    n = len(panels) + bool(rat)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    colors = {
        p: f"C{i % 10}" for i, p in enumerate(sorted({r["provider"] for r in rows}))
    }  # one per provider
    for ax, (metric, mode) in zip(axes[0], panels):
        sel = [r for r in rows if r["metric"] == metric and r["mode"] == mode]
        for prov in sorted({r["provider"] for r in sel}):
            pts = sorted(
                (float(r["x_value"]), float(r["median"]), float(r["p20"]), float(r["p80"]))
                for r in sel
                if r["provider"] == prov
            )
            xs, med, lo, hi = zip(*pts)
            ax.errorbar(
                xs,
                med,
                yerr=[[m - a for m, a in zip(med, lo)], [b - m for m, b in zip(med, hi)]],
                marker="o",
                capsize=3,
                label=prov,
                color=colors[prov],
            )
        r0 = sel[0]
        ax.set_title(f"{r0['op']} {mode} {metric}")
        ax.set_xlabel(r0["x_name"])
        ax.set_ylabel(r0["unit"])
        _log_axes(ax, {float(r["x_value"]) for r in sel})
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    if rat:
        ax = axes[0][-1]
        for (metric, mode), pts in sorted(rat.items(), key=lambda kv: panel_key(kv[0])):
            xs, ys = zip(*pts)
            label = f"memory saving ({mode})" if metric == "memory" else f"speed-up {mode}"
            ax.plot(xs, ys, marker="o", linestyle="--" if metric == "memory" else "-", label=label)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_title(f"{target} vs {base} (ratio {base} / {target})")
        ax.set_xlabel(rows[0]["x_name"])
        _log_axes(ax, {x for pts in rat.values() for x, _ in pts})
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(
        f"{r0['device']}  {r0['dtype']}  pykd {r0['pykd_version']} @ {r0['commit']}  {r0['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
