"""Packaging: pykd.kernels in editable and regular installs, clear errors for a missing or stale
pykd._C, and the pykd command."""

from __future__ import annotations

import csv
import glob
import importlib.util
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
        "import pykd, pykd.kernels.kd_loss, pykd.benchmarks.common as b;"
        "print(pykd.kernels.kd_loss.__file__); print(b.__file__)",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    kfile, bfile = r.stdout.split()[:2]
    if "site-packages" not in kfile:
        assert os.path.samefile(kfile, os.path.join(ROOT, "kernels", "kd_loss.py"))
        assert os.path.samefile(bfile, os.path.join(ROOT, "benchmarks", "common.py"))


# --- no shadowing: the repository never hides an installed top-level package (Hugging Face's
# `kernels`, which transformers imports) when its root is on sys.path.


def test_no_toplevel_package_but_pykd():
    """The general rule behind it: no top-level folder but pykd/ is a regular package, so from the
    root `kernels/` and `benchmarks/` are at most namespace portions, which lose to any installed
    package of the same name wherever it is on sys.path."""
    pkgs = [d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))]
    assert pkgs == ["pykd"], pkgs
    for name in ("kernels", "benchmarks"):
        link = os.path.join(ROOT, "pykd", name)
        assert os.path.islink(link) and os.path.samefile(link, os.path.join(ROOT, name))


TINY_BERT = (
    "import transformers, pykd\n"
    "from transformers import AutoModel, BertConfig, BertModel\n"
    "cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)\n"
    "m = AutoModel.from_config(cfg)\n"
    "assert isinstance(m, BertModel)\n"
    "import importlib.util\n"
    "spec = importlib.util.find_spec('kernels')\n"
    "print('kernels', spec and (spec.origin or list(spec.submodule_search_locations)))\n"
)


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_transformers_imports_next_to_pykd(where, tmp_path):
    pytest.importorskip("transformers")
    cwd = ROOT if where == "root" else tmp_path
    # `-c` puts the working directory first on sys.path, as `python -m` does
    r = py(TINY_BERT, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    found = r.stdout.split("kernels", 1)[1]
    # an installed `kernels` is the one found; without one, at most our namespace portion is
    if importlib.util.find_spec("kernels") is not None and importlib.util.find_spec("kernels").origin:
        assert ROOT not in found, found


def test_python_m_from_root():
    """`python -m pytest` (the README's test command) and `python -m pykd` with the root on sys.path."""
    pytest.importorskip("transformers")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                        os.path.join("tests", "test_transformers.py")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=env)  # fmt: skip
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout[-3000:] + r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "pykd", "info"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=env)  # fmt: skip
    assert r.returncode == 0 and "cpp_backend: ok" in r.stdout, r.stderr[-2000:]


def test_ci_runs_the_readme_test_command():
    """.ci/run runs the README's test command verbatim (in a fresh virtual environment)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    cmds = [line for line in readme.splitlines() if line.startswith("pip install") and "pytest" in line]
    assert len(cmds) == 1, cmds
    assert cmds[0] in ci.splitlines()
    assert "venv" in ci and "mktemp" in ci


def test_regular_install_layout(regular_layout, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(regular_layout, site)
    for f in ("kernels/kd_loss.py", "benchmarks/bench_kd_loss.py"):  # copies, not the links
        assert (site / "pykd" / f).is_file() and not (site / "pykd" / f).parent.is_symlink(), f
    assert not (site / "kernels").exists() and not (site / "benchmarks").exists()
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
        "distill_trainer_quick.csv",
        "distributed_quick.csv",
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


def test_fast_fill_defaults_agrees_with_torch():
    """pykd replaces torch._library.utils.fill_defaults (see pykd._backend) with an O(n) equivalent:
    on every pykd op's schema, with every count of trailing arguments left to their defaults, both
    give the same (args, kwargs)."""
    import torch
    from torch._library import utils

    import pykd  # noqa: F401  (installs it)

    fast = utils.fill_defaults
    assert getattr(fast, "_pykd", False), "pykd did not install its fill_defaults"
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("pykd::")]
    assert len(names) >= 10, names
    for name in names:
        packet = getattr(torch.ops.pykd, name.split("::")[1].split(".")[0])
        schema = getattr(packet, packet.overloads()[0])._schema
        args = schema.arguments
        positional = [a for a in args if not a.kwarg_only]
        required = sum(1 for a in positional if not a.has_default_value())
        for n in range(required, len(positional) + 1):
            given = tuple(object() for _ in range(n))
            assert fast(schema, given, {}) == fast.original(schema, given, {}), (name, n)
