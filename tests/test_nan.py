"""NaN in, NaN out: a NaN (or an inf that makes one) in any input of any op gives a NaN loss / output
where the float64 reference gives one, never a finite value; rows it does not touch are unchanged.
Semantics (docs/robustness.md): the logit ops' rows are independent, so only the poisoned row's loss
and gradient are NaN (reduction "mean"/"sum": the total is NaN); attention: every query row that sees
a NaN key (or has a NaN query) has a NaN output and loss, and a mean over rows is NaN. Teacher
log-probabilities with a NaN are refused (ValueError), since they are data, not activations."""

from __future__ import annotations

import math

import pytest
import torch

import pykd
from pykd import reference

NAN = float("nan")
SOFTMAX_DIVS = ["kl", "reverse_kl", "soft_ce", "jsd", "tvd"]


@pytest.mark.parametrize("divergence", SOFTMAX_DIVS + ["mse"])
@pytest.mark.parametrize("where", ["student", "teacher", "student +inf"])
def test_kd_loss(backend, divergence, where):
    R, V = 4, 37
    s, t = torch.randn(R, V) * 2, torch.randn(R, V) * 2
    y = torch.tensor([3, 5, -100, 0])
    x = t if where == "teacher" else s
    x[1, 7] = float("inf") if where == "student +inf" else NAN
    leaf = s.to(backend.device).requires_grad_(True)
    with backend():
        loss = pykd.kd_loss(leaf, t.to(backend.device), y.to(backend.device), divergence=divergence,
                            temperature=2.0, reduction="none")  # fmt: skip
        loss.sum().backward()
    ref = reference.kd_loss(
        s.double(), t.double(), y, divergence=divergence, temperature=2.0, reduction="none"
    )
    loss, g = loss.cpu(), leaf.grad.cpu()
    assert torch.equal(loss.isfinite(), ref.isfinite()), (loss, ref)  # NaN or inf where the reference is
    if where != "student +inf":  # (an inf's lse may come out inf or NaN: both are not finite)
        assert torch.equal(loss.isnan(), ref.isnan()), (loss, ref)
    assert not loss[1].isfinite()  # NaN; mse's (s - t)^2 with an inf is inf, as in the reference
    assert torch.isfinite(loss[[0, 2, 3]]).all() and torch.isfinite(g[[0, 2, 3]]).all()
    if divergence != "mse":
        assert g[1].isnan().all()  # the softmax spreads it over the row, as autograd of the reference
    with backend():
        total = pykd.kd_loss(s.to(backend.device), t.to(backend.device), y.to(backend.device),
                             divergence=divergence)  # fmt: skip
    assert not total.isfinite()


def test_topk_kd_loss(backend):
    R, V, K = 3, 29, 4
    s = torch.randn(R, V)
    lp, idx = torch.log_softmax(torch.randn(R, V), -1).topk(K, -1)
    s[2, 11] = NAN
    leaf = s.to(backend.device).requires_grad_(True)
    with backend():
        loss = pykd.topk_kd_loss(leaf, lp.to(backend.device), idx.to(backend.device), reduction="none")
        loss.sum().backward()
    loss, g = loss.cpu(), leaf.grad.cpu()
    assert loss[2].isnan() and torch.isfinite(loss[:2]).all()
    assert g[2].isnan().all() and torch.isfinite(g[:2]).all()
    lp[0, 1] = NAN
    with pytest.raises(ValueError, match="teacher_topk_logprobs"):
        pykd.topk_kd_loss(s.to(backend.device), lp.to(backend.device), idx.to(backend.device))


@pytest.mark.parametrize("where", ["student hidden", "teacher weight"])
def test_fused_linear_kd_loss(backend, where):
    R, H, V = 5, 8, 23
    h, w = torch.randn(R, H), torch.randn(V, H) * 0.3
    ht, wt = torch.randn(R, H), torch.randn(V, H) * 0.3
    if where == "student hidden":
        h[3, 2] = NAN
    else:
        wt[4, 1] = NAN  # every row's teacher logit 4 is NaN
    dev = backend.device
    hl, wl = h.to(dev).requires_grad_(True), w.to(dev).requires_grad_(True)
    with backend():
        loss = pykd.fused_linear_kd_loss(hl, wl, ht.to(dev), wt.to(dev), reduction="none", chunk_size=2)
        loss.sum().backward()
    ref = reference.fused_linear_kd_loss(h.double(), w.double(), ht.double(), wt.double(), reduction="none")
    assert torch.equal(loss.cpu().isnan(), ref.isnan())
    assert loss.cpu().isnan().any()
    assert hl.grad.isnan().any() and wl.grad.isnan().any()


def attention_inputs(B=2, H=2, N=21, D=16, Dt=8):
    return [torch.randn(B, H, N, D) for _ in range(3)] + [torch.randn(B, H, N, Dt) for _ in range(2)]


@pytest.mark.parametrize("where", ["q_s", "k_s", "v_s", "q_t", "k_t"])
def test_attention_kd(backend, where):
    q, k, v, qt, kt = attention_inputs()
    names = ["q_s", "k_s", "v_s", "q_t", "k_t"]
    x = [q, k, v, qt, kt][names.index(where)]
    x[1, 0, 6, 3] = NAN  # batch 1, head 0, token 6
    dev = backend.device
    with backend():
        out, loss = pykd.attention_kd(*(t.to(dev) for t in (q, k, v, qt, kt)), reduction="none")
        _, mean = pykd.attention_kd(*(t.to(dev) for t in (q, k, v, qt, kt)))
    r_out, r_loss = reference.attention_kd(*(t.double() for t in (q, k, v, qt, kt)), reduction="none")
    assert torch.equal(out.cpu().isnan(), r_out.isnan())
    assert torch.equal(loss.cpu().isnan(), r_loss.isnan())
    if where == "v_s":  # the maps do not depend on V
        assert out.cpu().isnan().any() and not loss.cpu().isnan().any()
    else:
        assert loss.cpu().isnan().any() and mean.isnan()
    assert torch.isfinite(loss.cpu()[0]).all() and torch.isfinite(out.cpu()[0]).all()  # batch 0


def test_attention_lse_and_relation(backend):
    q, k, v, _, _ = attention_inputs()
    k[0, 1, 4, 0] = NAN
    dev = backend.device
    with backend():
        out, lse = pykd.attention(q.to(dev), k.to(dev), v.to(dev), return_lse=True)
    assert lse.cpu()[0, 1].isnan().all() and torch.isfinite(lse.cpu()[1]).all()
    assert out.cpu()[0, 1].isnan().all()
    xs, xt = torch.randn(2, 13, 24), torch.randn(2, 13, 36)
    xt[1, 3, 5] = NAN
    with backend():
        per_row = pykd.relation_kd(xs.to(dev), xt.to(dev), 4, reduction="none").cpu()
        assert pykd.relation_kd(xs.to(dev), xt.to(dev), 4).isnan()
    assert per_row[1].isnan().any() and torch.isfinite(per_row[0]).all()


@pytest.mark.parametrize("spec", ["int8", "int8_fp8", "topk", "block"])
def test_sparse_and_quantized(backend, spec):
    """A NaN key poisons the rows that can see it, whatever the student's attention spec."""
    q, k, v, qt, kt = attention_inputs(N=40)
    k[0, 0, 5, 2] = NAN
    specs = {
        "int8": pykd.AttentionSpec(qk_format="int8", block_size=16),
        "int8_fp8": pykd.AttentionSpec(qk_format="int8", pv_format="fp8_e4m3", block_size=16),
        "topk": pykd.AttentionSpec(topk=8),
        "block": pykd.AttentionSpec(block_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool), block_size=16),
    }
    dev = backend.device
    with backend():
        out = pykd.attention(q.to(dev), k.to(dev), v.to(dev), spec=specs[spec])
        _, loss = pykd.attention_kd(*(t.to(dev) for t in (q, k, v, qt, kt)), student_spec=specs[spec])
    assert out.cpu()[0, 0].isnan().any(), "a NaN key must reach the output"
    assert torch.isfinite(out.cpu()[1]).all()
    assert loss.isnan()


def test_no_finite_loss_from_nan_anywhere():
    """Sweep: one NaN at a random place of one input of each op never gives a finite mean loss."""
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        s, t = torch.randn(3, 17), torch.randn(3, 17)
        which = s if torch.rand((), generator=g) < 0.5 else t
        which.view(-1)[torch.randint(0, which.numel(), (), generator=g)] = NAN
        for div in SOFTMAX_DIVS + ["mse"]:
            assert math.isnan(pykd.kd_loss(s, t, divergence=div).item()), div


# --- double backward: the ops whose gradient the forward computes refuse create_graph=True instead
# of returning a constant gradient that silently drops the second-order term


@pytest.mark.parametrize(
    "op", ["kd_loss", "topk_kd_loss", "fused_linear_kd_loss", "fused_linear_topk_kd_loss"]
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_double_backward_raises(op, reduction):
    s, t = torch.randn(4, 11, requires_grad=True), torch.randn(4, 11)
    lp, idx = torch.log_softmax(t, -1).topk(3, -1)
    h, w = torch.randn(4, 5, requires_grad=True), torch.randn(11, 5, requires_grad=True)
    ht, wt = torch.randn(4, 5), torch.randn(11, 5)
    r = reduction
    calls = {
        "kd_loss": lambda: pykd.kd_loss(s, t, reduction=r),
        "topk_kd_loss": lambda: pykd.topk_kd_loss(s, lp, idx, reduction=r),
        "fused_linear_kd_loss": lambda: pykd.fused_linear_kd_loss(h, w, ht, wt, reduction=r),
        "fused_linear_topk_kd_loss": lambda: pykd.fused_linear_topk_kd_loss(h, w, lp, idx, reduction=r),
    }
    loss = calls[op]().sum()
    x = s if "fused" not in op else h
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    (g,) = torch.autograd.grad(calls[op]().sum(), x)  # first order alone is fine
    assert torch.isfinite(g).all()
