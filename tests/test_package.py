"""Packaging: pykd.kernels in editable and regular installs, clear errors for a missing or stale
pykd._C, and the pykd command."""

from __future__ import annotations

import csv
import glob
import os
import shutil
import subprocess
import sys

import pytest

import pykd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A subprocess that sees only the tree on PYTHONPATH: an editable install's import hook would
# otherwise serve pykd submodules (pykd._C) from the source checkout.
ISOLATE = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"


def py(code: str, *, cwd, env_extra=None, isolate=False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(env_extra or {})
    code = (ISOLATE if isolate else "") + code
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def regular_layout(tmp_path_factory):
    """The tree a wheel installs: build_py applies setup.py's package_dir mapping."""
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_editable_install_maps_kernels(tmp_path):
    r = py(
        "import importlib.util, pykd, pykd.kernels, pykd.kernels.kd_loss;"
        "print(pykd.kernels.__file__);"
        "print(importlib.util.find_spec('kernels'))",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    kfile, toplevel = r.stdout.split()[:2]
    assert os.path.samefile(kfile, os.path.join(ROOT, "kernels", "__init__.py")) or "site-packages" in kfile
    assert toplevel == "None", "a top-level 'kernels' package must not be installed"


def test_regular_install_layout(regular_layout, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(regular_layout, site)
    assert (site / "pykd" / "kernels" / "kd_loss.py").is_file()
    assert (site / "pykd" / "benchmarks" / "bench_kd_loss.py").is_file()
    assert not (site / "kernels").exists()
    so = glob.glob(os.path.join(os.path.dirname(pykd.__file__), "_C*.so"))
    assert so, "pykd._C is not built"
    shutil.copy(so[0], site / "pykd")
    r = py(
        "import torch, pykd, pykd.kernels.kd_loss as k;"
        "s = torch.randn(3, 7); print(pykd.__file__, k.__file__);"
        "print(float(pykd.kd_loss(s, s)))",
        cwd=tmp_path,
        env_extra={"PYTHONPATH": str(site)},
        isolate=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    files, loss = r.stdout.split("\n")[:2]
    assert files.count(str(site)) == 2
    assert abs(float(loss)) < 1e-6


def _kd_loss_error(site, cwd) -> str:
    """stdout of calling kd_loss from the tree at `site` alone: 'ERR <message>' if it raised."""
    r = py(
        "import torch, pykd\n"
        "try:\n    pykd.kd_loss(torch.zeros(2, 3), torch.zeros(2, 3))\n"
        "except RuntimeError as e:\n    print('ERR', e)\n",
        cwd=cwd,
        env_extra={"PYTHONPATH": str(site)},
        isolate=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]  # import pykd itself must not crash
    return r.stdout


def test_missing_extension_is_a_clear_error(regular_layout, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(regular_layout, site)
    assert not glob.glob(str(site / "pykd" / "_C*"))
    out = _kd_loss_error(site, tmp_path)
    assert "ERR" in out and "pip install --no-build-isolation" in out


def test_stale_extension_is_a_clear_error(regular_layout, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(regular_layout, site)
    (site / "pykd" / "_C.py").write_text("torch_version = '0.0.1'\nsource_hash = 'x'\n")
    out = _kd_loss_error(site, tmp_path)
    assert "built against torch 0.0.1" in out and "--no-build-isolation" in out


def test_cli_info():
    r = subprocess.run([sys.executable, "-m", "pykd", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cpp_backend: ok" in r.stdout and "torch:" in r.stdout


def test_cli_bench_writes_csv_and_png(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pykd",
            "bench",
            "kd_loss",
            "--rows",
            "8",
            "16",
            "--vocab",
            "64",
            "--reps",
            "2",
            "--providers",
            "pykd",
            "eager",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (dev,) = os.listdir(tmp_path)
    with open(tmp_path / dev / "kd_loss.csv") as f:
        rows = list(csv.DictReader(f))
    providers = {(r["provider"], r["mode"], r["metric"]) for r in rows}
    for prov in ("pykd", "eager"):
        for mode in ("fwd", "bwd", "full"):
            assert (prov, mode, "time") in providers
        assert (prov, "full", "memory") in providers
    assert all(float(r["median"]) >= 0 for r in rows)
    assert {r["x_value"] for r in rows} == {"8", "16"}
    assert rows[0]["commit"] and rows[0]["date"] and rows[0]["device"] == dev
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / dev / "kd_loss.png").stat().st_size > 1000


def test_cli_bench_all_quick(tmp_path):
    """No op named: every benchmark, with options (and an option's value) passed through."""
    r = subprocess.run(
        [sys.executable, "-m", "pykd", "bench", "--quick", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (dev,) = os.listdir(tmp_path)
    names = set(os.listdir(tmp_path / dev))
    want = {
        "kd_loss_quick.csv",
        "attention_kd_d64_quick.csv",
        "fused_linear_kd_quick.csv",
        "sparse_quant_n_quick.csv",
    }
    assert want <= names, names
    assert ",pykd_topk," in (tmp_path / dev / "attention_kd_d64_quick.csv").read_text()


def test_cli_rejects_unknown_op():
    r = subprocess.run(
        [sys.executable, "-m", "pykd", "bench", "nope"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0 and "unknown op" in r.stderr


def test_bench_commit_provenance(tmp_path):
    """A benchmark's commit is "-dirty" when tracked code differs from HEAD, but not when only results
    that an earlier sweep of the same run wrote under benchmarks/results have changed."""
    if shutil.which("git") is None:
        pytest.skip("no git")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "benchmarks", "common.py"), tmp_path / "benchmarks" / "common.py")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "a.csv").write_text("1\n")

    def git(*args) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    head = git("rev-parse", "--short", "HEAD")
    # one process (torch imports once): clean, then results changed, then code changed
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import common\n"
        "print(common.commit())\n"
        "open('benchmarks/results/a.csv', 'w').write('2')\n"
        "print(common.commit())\n"
        "open('code.py', 'w').write('x = 2')\n"
        "print(common.commit())\n"
    )
    r = py(code, cwd=tmp_path, env_extra={"PYKD_COMMIT": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [head, head, head + "-dirty"]
