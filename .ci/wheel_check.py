"""A regular install works: run from a directory outside the repository, in a virtual environment that
holds torch and the pykd wheel alone. Proves that pykd._C, pykd.kernels and pykd.benchmarks ship in
the wheel, and that one tiny CPU call of every public op matches pykd.reference (float64), values and
gradients. Exits non-zero on the first failure."""

from __future__ import annotations

import importlib
import os
import pkgutil
import shutil
import subprocess
import sys

import torch

import pykd
from pykd import _backend, reference

torch.manual_seed(0)
F64 = torch.float64


def check(name, got, want, tol=2e-5):
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    err = (got - want).abs().max().item() if want.numel() else 0.0
    bound = tol * max(1.0, want.abs().max().item() if want.numel() else 0.0)
    if not (err <= bound):
        sys.exit(f"FAIL {name}: max error {err:.3g} > {bound:.3g}")
    print(f"ok   {name} (max error {err:.2g})")


def op(name, fn, ref, *inputs):
    """fn on fp32 leaves and ref on float64 leaves of the same values: the loss/output and the
    gradient of its sum with respect to every floating input."""
    a = [x.detach().float().requires_grad_() if x.is_floating_point() else x for x in inputs]
    b = [x.detach().double().clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
    out_a, out_b = fn(*a), ref(*b)
    check(name, out_a.detach(), out_b.detach())
    out_a.sum().backward()
    out_b.sum().backward()
    for i, (xa, xb) in enumerate(zip(a, b)):
        if xa.is_floating_point() and xb.grad is not None:
            check(f"{name} grad[{i}]", xa.grad, xb.grad)


def main() -> None:
    here = os.path.abspath(os.getcwd())
    root = os.path.dirname(os.path.dirname(os.path.abspath(pykd.__file__)))
    if "site-packages" not in pykd.__file__:
        sys.exit(f"FAIL pykd imported from {pykd.__file__}, not from an installed wheel")
    print("pykd from", pykd.__file__, "(cwd", here + ")")
    if not _backend.has_cpp():
        sys.exit(f"FAIL pykd._C unusable: {_backend._C_ERROR}")
    for pkg in ("pykd.kernels", "pykd.benchmarks"):
        mod = importlib.import_module(pkg)
        names = sorted(m.name for m in pkgutil.iter_modules(mod.__path__))
        if not names or any(not p.startswith(root) for p in mod.__path__):
            sys.exit(f"FAIL {pkg}: {list(mod.__path__)} holds {names}")
        for n in names:
            importlib.import_module(f"{pkg}.{n}")
        print(f"ok   {pkg}: {', '.join(names)}")
    exe = shutil.which("pykd")
    info = subprocess.run([exe, "info"], capture_output=True, text=True, check=True).stdout
    if "cpp_backend: ok" not in info:
        sys.exit("FAIL pykd info:\n" + info)
    print("ok   pykd info")

    R, V, K = 5, 37, 6
    s, t = torch.randn(R, V, dtype=F64) * 2, torch.randn(R, V, dtype=F64) * 2
    y = torch.tensor([1, -100, 7, 36, 0])
    op("kd_loss", lambda s, t: pykd.kd_loss(s, t, y, temperature=2.0),
       lambda s, t: reference.kd_loss(s, t, y, temperature=2.0), s, t)  # fmt: skip
    lp, idx = torch.log_softmax(t, -1).topk(K, -1)
    op("topk_kd_loss", lambda s: pykd.topk_kd_loss(s, lp.float(), idx, y),
       lambda s: reference.topk_kd_loss(s, lp, idx, y), s)  # fmt: skip
    Hd = 11
    hs, ws = torch.randn(R, Hd, dtype=F64), torch.randn(V, Hd, dtype=F64) * 0.3
    ht, wt = torch.randn(R, 13, dtype=F64), torch.randn(V, 13, dtype=F64) * 0.3
    op("fused_linear_kd_loss", lambda h, w: pykd.fused_linear_kd_loss(h, w, ht.float(), wt.float(), y),
       lambda h, w: reference.fused_linear_kd_loss(h, w, ht, wt, y), hs, ws)  # fmt: skip
    op("fused_linear_topk_kd_loss", lambda h, w: pykd.fused_linear_topk_kd_loss(h, w, lp.float(), idx, y),
       lambda h, w: reference.fused_linear_topk_kd_loss(h, w, lp, idx, y), hs, ws)  # fmt: skip

    B, H, N, D = 2, 2, 19, 16
    q, k, v = (torch.randn(B, H, N, D, dtype=F64) for _ in range(3))
    qt, kt = torch.randn(B, H, N, 8, dtype=F64), torch.randn(B, H, N, 8, dtype=F64)
    op("attention", lambda q, k, v: pykd.attention(q, k, v, causal=True),
       lambda q, k, v: reference.attention(q, k, v, causal=True), q, k, v)  # fmt: skip
    op("attention_kd", lambda q, k, v: pykd.attention_kd(q, k, v, qt.float(), kt.float())[1],
       lambda q, k, v: reference.attention_kd(q, k, v, qt, kt)[1], q, k, v)  # fmt: skip
    op("attention_divergence", lambda q, k: pykd.attention_divergence(q, k, qt.float(), kt.float()),
       lambda q, k: reference.attention_divergence(q, k, qt, kt), q, k)  # fmt: skip
    xs, xt = torch.randn(B, N, 24, dtype=F64), torch.randn(B, N, 36, dtype=F64)
    op("relation_kd", lambda x: pykd.relation_kd(x, xt.float(), 4),
       lambda x: reference.relation_kd(x, xt, 4), xs)  # fmt: skip
    bm = torch.rand(1, 1, 2, 2) < 0.7
    bm[..., 0, 0] = True
    spec = pykd.AttentionSpec(block_mask=bm, block_size=16)
    op("sparse_attention", lambda q, k, v: pykd.sparse_attention(q, k, v, block_mask=bm, block_size=16),
       lambda q, k, v: reference.attention(q, k, v, spec=spec), q, k, v)  # fmt: skip
    # Quantized attention: the kernel and the reference use the same int8 codes; compare the outputs
    # at fp32 (the codes come from fp32 inputs in both).
    qf, kf, vf = q.float(), k.float(), v.float()
    qspec = pykd.AttentionSpec(qk_format="int8", pv_format=None, block_size=16)
    got = pykd.quantized_attention(qf, kf, vf, qk_format="int8", pv_format=None, block_size=16)
    check("quantized_attention", got, reference.attention(qf.double(), kf.double(), vf.double(), spec=qspec),
          tol=1e-4)  # fmt: skip
    cap = pykd.attention(q.float(), k.float(), v.float(), capture="topk", capture_k=4)[1]
    want = reference.attention_capture_topk(q, k, 4)[0]
    check("attention capture (top-k probs)", cap.probs, want)
    print("wheel check passed")


if __name__ == "__main__":
    main()
