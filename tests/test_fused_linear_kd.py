"""pykd.fused_linear_kd_loss / fused_linear_topk_kd_loss on both backends against pykd.reference in
float64 (kd_loss / topk_kd_loss on the materialized logits): loss and gradients of hidden, weight, bias.

Precision contract tested here: each chunk's logits are fp32, the logit gradient G is rounded once to
the input dtype for the two gradient GEMMs, and the weight/bias gradients accumulate in fp32 and are
rounded once. So for 16-bit inputs, elementwise,
    |grad_h - exact| <= u (|G| @ |W|),   |grad_w - exact| <= u (|G|^T @ |H|),   u = 2^-8 (bf16), 2^-11 (fp16)
(two roundings of half an ulp each), plus the fp32 row kernel's error on G; G the float64 logit
gradient. fp32 inputs get the same form with u = the row kernel's fp32 tolerance.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, assert_close, assert_close_abs
from hypothesis import given
from hypothesis import strategies as st

import pykd
from pykd import reference

F32 = torch.float32
DIVS = ["kl", "reverse_kl", "soft_ce", "jsd", "tvd", "mse"]
# u per dtype: two roundings to the dtype (2^-8 / 2^-11) plus the fp32 row kernel's own relative error
# on G (TOL's fp32 rtol, as kd_loss's tests allow).
UNIT = {torch.float32: 2e-5, torch.float16: 2.0**-11 + 2e-5, torch.bfloat16: 2.0**-8 + 2e-5}


def make(R, H, V, *, Ht=None, dtype=F32, device="cpu", bias=True, teacher_bias=True, ignore_frac=0.3,
         with_target=True, scale=3.0):  # fmt: skip
    """Hidden states and lm_head weights whose logits have a spread of about `scale`."""
    Ht = H if Ht is None else Ht
    x = dict(
        h=torch.randn(R, H),
        w=torch.randn(V, H) * scale / H**0.5,
        b=torch.randn(V) if bias else None,
        ht=torch.randn(R, Ht),
        wt=torch.randn(V, Ht) * scale / Ht**0.5,
        bt=torch.randn(V) if teacher_bias else None,
        y=None,
    )
    if with_target:
        y = torch.randint(0, V, (R,))
        y[torch.rand(R) < ignore_frac] = -100
        x["y"] = y
    return {
        k: (None if v is None else (v.to(dtype) if v.is_floating_point() else v).to(device))
        for k, v in x.items()
    }


def _leaves(x, names, dtype=None):
    out = {}
    for k in names:
        v = x[k]
        if v is not None:
            v = v.detach().clone() if dtype is None else v.detach().cpu().to(dtype)
            v.requires_grad_(True)
        out[k] = v
    return out


def run(backend, x, go, topk=None, frozen=(), **opts):
    """pykd on backend: (loss, soft, hard, {h, w, b: grad})."""
    lv = _leaves(x, ["h", "w", "b"])
    for k in frozen:
        lv[k].requires_grad_(False)
    with backend():
        if topk is None:
            loss, soft, hard = pykd.fused_linear_kd_loss(
                lv["h"], lv["w"], x["ht"], x["wt"], x["y"], student_bias=lv["b"], teacher_bias=x["bt"],
                return_components=True, **opts,
            )  # fmt: skip
        else:
            loss, soft, hard = pykd.fused_linear_topk_kd_loss(
                lv["h"],
                lv["w"],
                topk[0],
                topk[1],
                x["y"],
                student_bias=lv["b"],
                return_components=True,
                **opts,
            )
        loss.backward(go.to(loss.device))
    return loss, soft, hard, {k: (None if v is None else v.grad) for k, v in lv.items()}


def run_ref(x, go, topk=None, **opts):
    """float64 reference; also returns the logit gradient G (for the 16-bit error bound)."""
    opts = {k: v for k, v in opts.items() if k != "chunk_size"}
    lv = _leaves(x, ["h", "w", "b"], torch.float64)
    logits = torch.nn.functional.linear(lv["h"], lv["w"], lv["b"])
    logits.retain_grad()
    y = None if x["y"] is None else x["y"].cpu()
    if topk is None:
        bt = None if x["bt"] is None else x["bt"].cpu().double()
        t = torch.nn.functional.linear(x["ht"].cpu().double(), x["wt"].cpu().double(), bt)
        loss, soft, hard = reference.kd_loss(logits, t, y, return_components=True, **opts)
    else:
        loss, soft, hard = reference.topk_kd_loss(
            logits, topk[0].cpu().double(), topk[1].cpu(), y, return_components=True, **opts
        )
    loss.backward(go.double())
    return loss, soft, hard, {k: (None if v is None else v.grad) for k, v in lv.items()}, logits.grad


def check(backend, x, go=None, topk=None, frozen=(), **opts):
    reduction = opts.get("reduction", "mean")
    R = x["h"].shape[0]
    if go is None:
        go = torch.rand(R) + 0.5 if reduction == "none" else torch.tensor(0.75)
    loss, soft, hard, grads = run(backend, x, go, topk, frozen, **opts)
    rl, rs, rh, rgrads, G = run_ref(x, go, topk, **opts)
    dtype = x["h"].dtype
    W = x["w"].cpu().double().abs()
    Hh = x["h"].cpu().double().abs()
    logit_size = (Hh @ W.t()).max().item() + 1.0
    T = opts.get("temperature", 1.0)
    w_t2 = T * T if opts.get("scale_by_t2", True) else 1.0
    atol_loss = (
        8e-6 * (1 + logit_size / T) * max(w_t2, 1) * (logit_size if opts.get("divergence") == "mse" else 1)
    )
    for name, a, e in (("loss", loss, rl), ("soft", soft, rs), ("hard", hard, rh)):
        assert a.dtype == F32
        assert_close_abs(a, e, rtol=2e-5, atol=atol_loss, name=name)
    u = UNIT[dtype]
    gabs = G.abs()
    bounds = {"h": gabs @ W, "w": gabs.t() @ Hh, "b": gabs.sum(0)}
    # the row kernel's absolute error on G, through the GEMM: TOL's fp32 atol plus softmax's
    # conditioning (fp32 log p = z - lse errs by eps32 |z|), in units of a probability term
    g_atol = (TOL[F32][1] + 2.0**-22 * logit_size / T) * grad_unit(x, go, opts, logit_size)
    floors = {"h": g_atol * W.sum(0).expand(R, -1), "w": g_atol * Hh.sum(0).expand(W.shape[0], -1),
              "b": g_atol * R * torch.ones(W.shape[0], dtype=torch.float64)}  # fmt: skip
    for k in ("h", "w", "b"):
        if k in frozen or x[k] is None:
            assert grads[k] is None
            continue
        a, e = grads[k], rgrads[k]
        assert a.dtype == dtype and a.shape == x[k].shape, k
        err = (a.cpu().double() - e).abs()
        # half an ulp of the output, u of the cancelling terms, and fp32 logits' error through softmax
        bound = TOL[dtype][0] * e.abs() + (u + 2.0**-20 * logit_size / T) * bounds[k] + floors[k] + 1e-12
        bad = err > bound
        assert not bad.any(), (
            f"grad_{k}: {int(bad.sum())}/{bad.numel()} over the bound; worst err "
            f"{(err / bound).max().item():.3g} x bound"
        )
    return loss, grads


def grad_unit(x, go, opts, logit_size):
    """Size of the probability terms (or, for mse, logit differences) that make up a logit gradient."""
    T = opts.get("temperature", 1.0)
    y = x["y"]
    alpha = opts.get("alpha")
    alpha = (0.5 if y is not None else 1.0) if alpha is None else alpha
    mse = opts.get("divergence") == "mse"
    w = T * T if opts.get("scale_by_t2", True) and not mse else 1.0
    unit = alpha * (2 * logit_size / x["w"].shape[0] if mse else w / T) + (1 - alpha)
    if opts.get("reduction", "mean") == "mean":
        n = opts.get("num_items_in_batch")
        if n is None:
            n = (y != -100).sum().item() if y is not None else x["h"].shape[0]
        unit /= max(float(n), 1.0)
    return unit * go.abs().max().item()


def topk_of(x, K, T=1.0):
    """A teacher's top-K log-probabilities from the teacher logits in x."""
    t = torch.nn.functional.linear(
        x["ht"].float(), x["wt"].float(), None if x["bt"] is None else x["bt"].float()
    )
    lp, idx = torch.log_softmax(t / T, -1).topk(K, -1)
    return lp, idx


# ------------------------------------------------------------------ values and gradients


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize(
    "temperature,alpha,with_target,reduction,chunk_size",
    [
        (1.0, None, False, "mean", 5),  # 13 rows: chunks 5, 5, 3
        (2.0, None, True, "mean", 64),  # one chunk, BT < chunk_size
        (0.7, 0.3, True, "sum", 1),
        (3.0, 0.8, True, "none", 4),
    ],
)
def test_matches_reference(backend, divergence, temperature, alpha, with_target, reduction, chunk_size):
    x = make(13, 24, 37, Ht=20, device=backend.device, with_target=with_target)
    check(backend, x, divergence=divergence, temperature=temperature, alpha=alpha, reduction=reduction,
          chunk_size=chunk_size)  # fmt: skip


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("reduction,chunk_size", [("mean", 4), ("none", 5), ("sum", None)])
def test_topk_matches_reference(backend, tail, reduction, chunk_size):
    x = make(11, 16, 41, device=backend.device)
    lp, idx = topk_of(x, 6, T=2.0)
    check(backend, x, topk=(lp, idx), tail=tail, temperature=2.0, reduction=reduction, chunk_size=chunk_size)


@pytest.mark.parametrize("tail", [True, False])
def test_topk_gradient_when_teacher_mass_is_not_one(backend, tail):
    """K == V with a teacher whose mass over the student's vocabulary is below 1: no tail bucket, so
    the gradient is (sum_k p_k) q - p, not q - p."""
    x = make(11, 16, 13, device=backend.device)
    lp = torch.log_softmax(torch.randn(11, 13 + 5) * 2, -1)[:, :13].to(backend.device)
    idx = torch.arange(13, device=backend.device).repeat(11, 1)
    check(backend, x, topk=(lp, idx), tail=tail, temperature=2.0, chunk_size=4)


@pytest.mark.parametrize("divergence", ["kl", "jsd", "mse"])
@pytest.mark.parametrize("reduction,chunk_size", [("mean", 4), ("none", 5)])
def test_logit_map_and_padded_teacher(backend, divergence, reduction, chunk_size):
    """logit_softcap / logit_scale on each chunk's logits (per model), and a teacher lm_head with a
    larger (padded) vocabulary whose extra rows are dropped."""
    x = make(13, 24, 37, Ht=20, device=backend.device)
    wide = make(13, 24, 45, Ht=20, device=backend.device)
    x["wt"], x["bt"] = wide["wt"], wide["bt"] * 3  # rows 37..44 must not leak into the loss
    check(backend, x, divergence=divergence, temperature=2.0, reduction=reduction, chunk_size=chunk_size,
          logit_softcap=(5.0, 4.0), logit_scale=(1.0, 0.8))  # fmt: skip


@pytest.mark.parametrize("tail", [True, False])
def test_topk_logit_map_and_teacher_vocab_size(backend, tail):
    x = make(11, 16, 41, device=backend.device)
    t = torch.randn(11, 50) * 2
    t[:, 41:] += 2.0
    lp, idx = torch.log_softmax(t, -1).topk(6, -1)
    assert (idx >= 41).any()
    topk = (lp.to(backend.device), idx.to(backend.device))
    check(backend, x, topk=topk, tail=tail, temperature=2.0, chunk_size=4, teacher_vocab_size=50,
          logit_softcap=6.0, logit_scale=0.9)  # fmt: skip


def test_no_bias_and_default_chunk(backend):
    x = make(9, 16, 29, device=backend.device, bias=False, teacher_bias=False)
    check(backend, x, temperature=2.0)


@pytest.mark.parametrize("frozen", [("w", "b"), ("h",), ("b",)])
def test_frozen_parameters(backend, frozen):
    """Only the tensors that require grad get one (a frozen lm_head skips the weight GEMM)."""
    x = make(10, 16, 23, device=backend.device)
    check(backend, x, frozen=frozen, chunk_size=3, temperature=2.0)
    check(backend, x, frozen=frozen, chunk_size=3, reduction="none")


def test_leading_dims(backend):
    x = make(12, 16, 19, device=backend.device)
    h3, ht3, y3 = x["h"].reshape(3, 4, 16), x["ht"].reshape(3, 4, 16), x["y"].reshape(3, 4)
    leaf = h3.clone().requires_grad_(True)
    with backend():
        loss = pykd.fused_linear_kd_loss(leaf, x["w"], ht3, x["wt"], y3, reduction="none", chunk_size=5)
        loss.sum().backward()
    ref_leaf = h3.double().requires_grad_(True)
    ref = reference.fused_linear_kd_loss(ref_leaf, x["w"].double(), ht3.double(), x["wt"].double(), y3,
                                         reduction="none")  # fmt: skip
    ref.sum().backward()
    assert loss.shape == (3, 4)
    assert_close(loss, ref, atol=1e-5)
    assert_close(leaf.grad, ref_leaf.grad, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, reduction):
    x = make(7, 16, 19, device=backend.device)
    x["y"] = torch.full((7,), -100, device=backend.device)
    loss, grads = check(backend, x, reduction=reduction, chunk_size=3)
    assert (loss == 0).all() and all((g == 0).all() for g in grads.values())


def test_num_items_and_options(backend):
    x = make(10, 16, 21, device=backend.device)
    check(backend, x, num_items_in_batch=17, temperature=1.5, alpha=0.4, chunk_size=4)
    check(backend, x, num_items_in_batch=torch.tensor(3.0), scale_by_t2=False, divergence="jsd", beta=0.3,
          chunk_size=4)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_gradient_bound(backend, dtype, reduction):
    """The stated 16-bit bound (module docstring) against float64, with fp32 logits."""
    x = make(21, 32, 53, Ht=24, dtype=dtype, device=backend.device)
    check(backend, x, temperature=2.0, reduction=reduction, chunk_size=8)
    check(backend, x, topk=topk_of(x, 5), reduction=reduction, chunk_size=8)


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradient_groups(backend, monkeypatch, dtype, reduction):
    """Triton gathers two chunks' logit gradients per weight-gradient GEMM (a partial last group and
    chunk included); the C++ path runs one per chunk. Both match the reference."""
    from pykd import fused_linear_kd as flk

    R, V, chunk = 13, 29, 3
    monkeypatch.setattr(flk, "GRAD_GROUP_ELEMS", 2 * V * chunk + V)  # two whole chunks
    calls = []
    add = flk._add_weight_grad
    monkeypatch.setattr(flk, "_add_weight_grad", lambda gw, g, h: (calls.append(g.shape[0]), add(gw, g, h)))
    x = make(R, 16, V, dtype=dtype, device=backend.device)
    for topk in (None, topk_of(x, 4)):
        calls.clear()
        check(backend, x, topk=topk, temperature=2.0, reduction=reduction, chunk_size=chunk)
        expect = [6, 6, 1] if backend.name == "triton" else [3, 3, 3, 3, 1]
        assert calls == expect


def test_fp16_loss_scaler(backend):
    """A GradScaler-sized grad_output reaches fp16 grad_h before the mean's 1/n could underflow it."""
    x = make(64, 16, 24, dtype=torch.float16, device=backend.device, scale=0.5)
    check(backend, x, go=torch.tensor(65536.0), temperature=2.0, alpha=0.9, chunk_size=16)


def test_backward_twice_raises_and_none_recomputes(backend):
    x = make(6, 16, 17, device=backend.device)
    leaf = x["h"].clone().requires_grad_(True)
    with backend():
        loss = pykd.fused_linear_kd_loss(leaf, x["w"], x["ht"], x["wt"], x["y"])
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="backward ran twice"):
            loss.backward()
        # "none" recomputes in backward, so it may run twice
        leaf.grad = None
        loss = pykd.fused_linear_kd_loss(leaf, x["w"], x["ht"], x["wt"], x["y"], reduction="none")
        loss.sum().backward(retain_graph=True)
        first = leaf.grad.clone()
        loss.sum().backward()
    assert_close(leaf.grad, 2 * first)


def test_no_grad_and_teacher_gets_no_grad(backend):
    x = make(6, 16, 17, device=backend.device)
    wt = x["wt"].clone().requires_grad_(True)
    ht = x["ht"].clone().requires_grad_(True)
    leaf = x["h"].clone().requires_grad_(True)
    with backend():
        with torch.no_grad():
            a = pykd.fused_linear_kd_loss(leaf, x["w"], ht, wt, x["y"])
        b = pykd.fused_linear_kd_loss(leaf, x["w"], ht, wt, x["y"])
        b.backward()
    assert not a.requires_grad and a.item() == pytest.approx(b.item(), rel=1e-6)
    assert wt.grad is None and ht.grad is None and leaf.grad is not None


def test_outputs_poisoned_then_written(backend, monkeypatch):
    monkeypatch.setenv("PYKD_POISON_OUTPUTS", "1")
    x = make(9, 16, 19, device=backend.device)
    for reduction in ("mean", "none"):
        check(backend, x, reduction=reduction, chunk_size=4, temperature=2.0)
        check(backend, x, topk=topk_of(x, 3), reduction=reduction, chunk_size=4)


def test_module(backend):
    x = make(6, 16, 17, device=backend.device)
    mod = pykd.nn.FusedLinearKDLoss(divergence="jsd", temperature=2.0, chunk_size=4)
    assert "divergence='jsd'" in repr(mod)
    with backend():
        a = mod(x["h"], x["w"], x["ht"], x["wt"], x["y"], student_bias=x["b"], teacher_bias=x["bt"])
        opts = dict(divergence="jsd", temperature=2.0, chunk_size=4)
        b = pykd.fused_linear_kd_loss(
            x["h"], x["w"], x["ht"], x["wt"], x["y"], student_bias=x["b"], teacher_bias=x["bt"], **opts
        )
    assert torch.equal(a, b)


@given(
    R=st.integers(1, 12),
    H=st.integers(1, 20),
    V=st.integers(1, 40),
    chunk=st.integers(1, 14),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    divergence=st.sampled_from(DIVS + ["topk", "topk_renorm"]),
    bias=st.booleans(),
    with_target=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_property(backend, R, H, V, chunk, dtype, divergence, bias, with_target, reduction):
    x = make(
        R, H, V, Ht=max(1, H - 3), dtype=dtype, device=backend.device, bias=bias, with_target=with_target
    )
    if divergence.startswith("topk"):
        K = max(1, V // 3)
        check(
            backend, x, topk=topk_of(x, K), tail=divergence == "topk", reduction=reduction, chunk_size=chunk
        )
    else:
        check(backend, x, divergence=divergence, temperature=2.0, reduction=reduction, chunk_size=chunk)


test_property = pytest.mark.hypothesis(test_property)


# ------------------------------------------------------------------ tracing


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(backend, reduction):
    x = make(9, 16, 19, device=backend.device)

    def f(h, w):
        return pykd.fused_linear_kd_loss(
            h, w, x["ht"], x["wt"], x["y"], reduction=reduction, chunk_size=4
        ).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ha, wa = x["h"].clone().requires_grad_(True), x["w"].clone().requires_grad_(True)
    hb, wb = x["h"].clone().requires_grad_(True), x["w"].clone().requires_grad_(True)
    with backend():
        a = compiled(ha, wa)
        a.backward()
        b = f(hb, wb)
        b.backward()
    assert_close(a, b, rtol=1e-6, atol=0)
    assert_close(ha.grad, hb.grad, rtol=1e-6, atol=1e-6)
    assert_close(wa.grad, wb.grad, rtol=1e-6, atol=1e-6)


def test_opcheck(backend):
    x = make(7, 16, 19, device=backend.device)
    lp, idx = topk_of(x, 4)
    idx, perm = idx.sort(-1)
    lp = lp.gather(-1, perm)
    h, w, b = (x[k].clone().requires_grad_(True) for k in ("h", "w", "b"))
    kd = (x["ht"], x["wt"], x["bt"], None, None)
    tk = (None, None, None, lp, idx)
    cases = [
        (
            h,
            w,
            b,
            *kd,
            x["y"],
            None,
            "kl",
            2.0,
            0.5,
            0.5,
            False,
            -100,
            True,
            [1.0, 5.0, 1.0, 0.0],
            "mean",
            True,
            True,
            True,
            3,
            "",
            0,
            0,
        ),
        (
            h,
            w,
            None,
            *kd,
            None,
            None,
            "jsd",
            1.0,
            1.0,
            0.3,
            False,
            -100,
            True,
            [1.0, 0.0, 1.0, 0.0],
            "sum",
            True,
            False,
            False,
            4,
            "",
            0,
            0,
        ),
        (
            h,
            w,
            b,
            *tk,
            x["y"],
            torch.tensor(5.0),
            "kl",
            1.5,
            0.2,
            0.5,
            True,
            -100,
            False,
            [0.5, 0.0, 1.0, 0.0],
            "none",
            True,
            True,
            True,
            2,
            "",
            0,
            0,
        ),  # fmt: skip
    ]
    with backend():
        for args in cases:
            torch.library.opcheck(torch.ops.pykd.fused_linear_kd_fwd.default, args)
        dloss = torch.rand(7, device=backend.device)
        bwd = (dloss, x["h"], x["w"], x["b"], *kd, x["y"], None, "kl", 2.0, 0.5, 0.5, False, -100, True,
               [1.0, 5.0, 1.0, 0.0], True, True, True, 3, "", 0, 0)  # fmt: skip
        torch.library.opcheck(torch.ops.pykd.fused_linear_kd_bwd.default, bwd)


# ------------------------------------------------------------------ bad input

H_ = torch.zeros(4, 8)
W_ = torch.zeros(10, 8)
HT = torch.zeros(4, 6)
WT = torch.zeros(10, 6)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((H_.long(), W_, HT, WT), {}, TypeError, "student_hidden must be float32"),
        ((H_, W_.half(), HT, WT), {}, TypeError, "student_weight must have student_hidden's dtype"),
        ((H_[0], W_, HT, WT), {}, ValueError, "student_hidden must have shape"),
        ((H_, torch.zeros(10, 7), HT, WT), {}, ValueError, r"student_weight must have shape \(V, 8\)"),
        ((H_, W_, HT, torch.zeros(10, 5)), {}, ValueError, r"teacher_weight must have shape \(V, 6\)"),
        (
            (H_, W_, HT, torch.zeros(9, 6)),
            {},
            ValueError,
            "teacher_weight must have at least the student's vocabulary V=10 rows",
        ),
        ((H_, W_, HT, WT), {"logit_softcap": 0.0}, ValueError, "logit_softcap must be a finite number"),
        ((H_, W_, HT, WT), {"logit_scale": (1.0, -1.0)}, ValueError, r"logit_scale\[1\] must be"),
        ((H_, W_, torch.zeros(3, 6), WT), {}, ValueError, "teacher_hidden must have the student's leading"),
        (
            (H_, W_, HT, WT),
            {"student_bias": torch.zeros(9)},
            ValueError,
            r"student_bias must have shape \(10,\)",
        ),
        ((H_, W_, HT, WT), {"teacher_bias": torch.zeros(10).half()}, TypeError, "teacher_bias must have"),
        ((H_, W_, HT, WT), {"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ((H_, W_, HT, WT), {"chunk_size": 2.5}, TypeError, "chunk_size must be an int"),
        ((H_, W_, HT, WT), {"divergence": "kld"}, ValueError, "divergence must be one of"),
        ((H_, W_, HT, WT), {"temperature": -1.0}, ValueError, "temperature"),
        ((H_, W_, HT, WT, torch.zeros(5, dtype=torch.long)), {}, ValueError, "target must have shape"),
        ((H_, W_, HT, WT.to("meta")), {}, ValueError, "one device"),
    ],
)
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pykd.fused_linear_kd_loss(*args, **kwargs)


@pytest.mark.parametrize(
    "lp,idx,match",
    [
        (torch.log(torch.full((4, 3), 0.2)), torch.tensor([[0, 1, 1]] * 4), "distinct"),
        (torch.log(torch.full((4, 3), 0.2)), torch.tensor([[0, 1, 10]] * 4), r"\[0, 10\)"),
        (
            torch.log(torch.full((3, 3), 0.2)),
            torch.tensor([[0, 1, 2]] * 3),
            "teacher_topk_logprobs must have shape",
        ),
        (torch.log(torch.full((4, 3), 0.2)), torch.tensor([[0, 1, 10]] * 4), "pass teacher_vocab_size"),
    ],
)
def test_topk_bad_input(lp, idx, match):
    with pytest.raises(ValueError, match=match):
        pykd.fused_linear_topk_kd_loss(H_, W_, lp, idx)


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_large_vocab(dtype, reduction):
    from conftest import Backend

    x = make(96, 256, 32000, Ht=384, dtype=dtype, device="cuda")
    check(Backend("triton"), x, temperature=2.0, reduction=reduction, chunk_size=40)
    check(Backend("triton"), x, topk=topk_of(x, 50), reduction=reduction, chunk_size=40)
