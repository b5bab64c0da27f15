"""pykd.topk_kd_loss on both backends against pykd.reference in float64: values and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, assert_close, assert_close_abs
from hypothesis import given
from hypothesis import strategies as st

import pykd
from pykd import reference

F32 = torch.float32


def make(R, V, K, *, dtype=F32, device="cpu", T=1.0, scale=3.0, ignore_frac=0.3, with_target=True):
    """Student logits, and a teacher's top-K log-probabilities at temperature T in shuffled order."""
    s = (torch.randn(R, V) * scale).to(dtype)
    t = torch.randn(R, V) * scale
    lp, idx = torch.log_softmax(t / T, -1).topk(K, -1)
    perm = torch.argsort(torch.rand(R, K), -1)
    lp, idx = lp.gather(-1, perm), idx.gather(-1, perm)
    y = None
    if with_target:
        y = torch.randint(0, V, (R,))
        y[torch.rand(R) < ignore_frac] = -100
        y = y.to(device)
    return s.to(device), lp.to(device), idx.to(device), y


def run(backend, s, lp, idx, y, go, **opts):
    leaf = s.detach().clone().requires_grad_(True)
    with backend():
        loss, soft, hard = pykd.topk_kd_loss(leaf, lp, idx, y, return_components=True, **opts)
        loss.backward(go.to(loss.device))
    return loss, soft, hard, leaf.grad


def run_ref(s, lp, idx, y, go, **opts):
    leaf = s.detach().cpu().double().requires_grad_(True)
    yy = None if y is None else y.cpu()
    loss, soft, hard = reference.topk_kd_loss(
        leaf, lp.cpu().double(), idx.cpu(), yy, return_components=True, **opts
    )
    loss.backward(go.double())
    return loss, soft, hard, leaf.grad


def grad_unit(y, go, opts, rows):
    """Size of the probability terms that cancel into one gradient entry."""
    T = opts.get("temperature", 1.0)
    alpha = opts.get("alpha")
    alpha = (0.5 if y is not None else 1.0) if alpha is None else alpha
    w = T * T if opts.get("scale_by_t2", True) else 1.0
    unit = alpha * w / T + (1 - alpha)
    if opts.get("reduction", "mean") == "mean":
        n = opts.get("num_items_in_batch")
        if n is None:
            n = (y != -100).sum().item() if y is not None else rows
        unit /= max(float(n), 1.0)
    return unit * go.abs().max().item()


def check(backend, s, lp, idx, y, go=None, **opts):
    reduction = opts.get("reduction", "mean")
    if go is None:
        go = torch.rand(s.shape[0]) + 0.5 if reduction == "none" else torch.tensor(0.75)
    loss, soft, hard, grad = run(backend, s, lp, idx, y, go, **opts)
    rl, rs, rh, rg = run_ref(s, lp, idx, y, go, **opts)
    T = opts.get("temperature", 1.0)
    finite = s.float()[torch.isfinite(s.float())]
    z = (finite.abs().max().item() if finite.numel() else 0.0) / T
    w = T * T if opts.get("scale_by_t2", True) else 1.0
    atol = 4e-6 * (1 + z) * max(w, 1)  # fp32 lse's and dot products of size |z|
    for name, a, e in (("loss", loss, rl), ("soft", soft, rs), ("hard", hard, rh)):
        assert a.dtype == F32, f"{name} must be fp32"
        assert_close_abs(a, e, rtol=2e-5, atol=atol, name=name)
    assert grad.dtype == s.dtype and grad.shape == s.shape
    cond = 2.0**-23 * z  # softmax's conditioning: fp32 log q = z - lse errs by eps32 |z|
    rtol, atol_g = TOL[s.dtype]
    assert_close(grad, rg, rtol=rtol + cond, atol=atol_g + cond, scale=grad_unit(y, go, opts, s.shape[0]),
                 name="grad")  # fmt: skip
    return loss, grad


# ------------------------------------------------------------------ values and gradients


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize(
    "temperature,alpha,with_target,reduction",
    [
        (1.0, None, False, "mean"),
        (2.0, None, True, "mean"),
        (0.7, 0.3, True, "sum"),
        (3.0, 1.0, True, "none"),
        (2.0, 0.0, True, "mean"),
    ],
)
def test_matches_reference(backend, tail, temperature, alpha, with_target, reduction):
    s, lp, idx, y = make(9, 37, 5, device=backend.device, T=temperature, with_target=with_target)
    check(backend, s, lp, idx, y, temperature=temperature, alpha=alpha, tail=tail, reduction=reduction)


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("V,K", [(1, 1), (2, 1), (17, 17), (40, 1), (300, 20), (2500, 33)])
def test_vocab_and_k(backend, tail, V, K):
    """K == V (no tail), K == 1, K beyond one index window (16), V over several blocks."""
    s, lp, idx, y = make(5, V, K, device=backend.device, T=2.0)
    check(backend, s, lp, idx, y, temperature=2.0, tail=tail)


@pytest.mark.parametrize("case", ["K == V", "no student mass outside K", "probabilities sum above 1"])
@pytest.mark.parametrize("tail", [True, False])
def test_gradient_when_teacher_mass_is_not_one(backend, case, tail):
    """The gradient's q coefficient is the teacher's total mass sum_k p_k + P, which is not 1 where
    there is no tail bucket for a top-K mass below 1, or where the given probabilities sum above 1.
    (A kernel that wrote q - p assumed it was 1.)"""
    R, V, K = 6, 23, 7
    s = torch.randn(R, V) * 2
    t = torch.randn(R, V + 9) * 2  # the teacher's vocabulary is larger: its top-K mass over V is < 1
    if case == "K == V":
        K = V
        lp = torch.log_softmax(t, -1)[:, :V]
        idx = torch.arange(V).repeat(R, 1)
    else:
        lp, idx = torch.log_softmax(t, -1)[:, :V].topk(K, -1)
    if case == "no student mass outside K":
        s = torch.full((R, V), float("-inf")).scatter(-1, idx, s.gather(-1, idx))
    if case == "probabilities sum above 1":
        lp = torch.log_softmax(lp, -1) + 0.05
    mass = lp.exp().sum(-1)
    assert ((mass - 1).abs() > 0.01).all()
    y = idx[:, 0].clone()
    y[1] = -100
    dev = backend.device
    s, lp, idx, y = s.to(dev), lp.to(dev), idx.to(dev), y.to(dev)
    if tail and case == "probabilities sum above 1":  # the tail form needs sum_k p_k <= 1
        with pytest.raises(ValueError, match="summing to at most 1"):
            pykd.topk_kd_loss(s, lp, idx, y, tail=True)
        return
    check(backend, s, lp, idx, y, temperature=2.0, tail=tail)


def test_window_walks_dense_blocks(backend):
    """Many top-K indices inside one vocabulary block (the membership window must advance several
    times within a block) and indices at both ends of the vocabulary."""
    R, V = 4, 70
    s = torch.randn(R, V) * 2
    idx = torch.cat([torch.arange(0, 40), torch.tensor([V - 1])]).repeat(R, 1)
    lp = torch.log_softmax(torch.randn(R, V), -1).gather(-1, idx)
    check(backend, s.to(backend.device), lp.to(backend.device), idx.to(backend.device), None, tail=True)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_multiple_blocks_and_programs(backend, monkeypatch, reverse):
    """V not a multiple of the vocabulary block, more rows than programs (grid-stride loop), the
    gradient sweep in either direction (REVERSE; Triton only, C++ ignores it)."""
    from pykd.kernels import topk_kd_loss as k

    monkeypatch.setattr(k, "MAX_BLOCK_V", 16)
    monkeypatch.setattr(k, "MAX_PROGRAMS", 3)
    monkeypatch.setattr(k, "REVERSE", reverse)
    s, lp, idx, y = make(11, 53, 7, device=backend.device)
    for tail in (True, False):
        check(backend, s, lp, idx, y, temperature=1.3, tail=tail)


def test_tail_keeps_its_digits(backend):
    """The student puts all but ~1e-30 of its mass on the K entries while the teacher leaves 0.3
    outside them: 1 - sum q_k would be 0 (or negative) in fp32; the masked log-sum-exp is exact."""
    R, V, K = 3, 50, 4
    s = torch.full((R, V), -60.0)
    idx = torch.stack([torch.randperm(V)[:K] for _ in range(R)])
    s.scatter_(-1, idx, 10.0)
    lp = torch.full((R, K), torch.log(torch.tensor(0.7 / K)).item())
    loss, _ = check(
        backend, s.to(backend.device), lp.to(backend.device), idx.to(backend.device), None, tail=True
    )
    assert torch.isfinite(loss) and loss.item() > 10  # 0.3 log(0.3 / ~1e-30)


def test_extreme_logits(backend):
    s, lp, idx, y = make(6, 29, 4, device=backend.device)
    s = s.cpu()
    s[0, :5] = 1e4
    s[1, :] = -1e4
    s[2, 3] = -1e4
    s[3, idx[3, 0].item()] = 1e4
    for tail in (True, False):
        check(backend, s.to(backend.device), lp, idx, y, tail=tail, temperature=2.0)


def test_teacher_zero_probabilities(backend):
    """-inf teacher log-probs are probability 0: no NaN, exact terms."""
    s, lp, idx, y = make(5, 23, 6, device=backend.device)
    lp = lp.cpu()
    lp[0, 2] = float("-inf")
    lp[1, :] = float("-inf")  # a teacher with all its mass in the tail
    lp = lp.to(backend.device)
    check(backend, s, lp, idx, y, tail=True)
    lp2 = lp.cpu()
    lp2[1, 0] = -0.5
    check(backend, s, lp2.to(backend.device), idx, y, tail=False)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, reduction):
    s, lp, idx, _ = make(4, 19, 3, device=backend.device)
    y = torch.full((4,), -100, device=backend.device)
    loss, grad = check(backend, s, lp, idx, y, reduction=reduction)
    assert (loss == 0).all() and (grad == 0).all()


def test_ignored_rows_may_hold_garbage_indices(backend):
    """Padding positions of a dump are not checked: repeated or out-of-range indices there are fine."""
    s, lp, idx, y = make(4, 19, 3, device=backend.device)
    y = y.cpu()
    idx = idx.cpu()
    y[1] = -100
    idx[1] = torch.tensor([0, 0, 99])
    check(backend, s, lp, idx.to(backend.device), y.to(backend.device), tail=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, dtype):
    s, lp, idx, y = make(7, 45, 6, dtype=dtype, device=backend.device, T=2.0)
    check(backend, s, lp, idx, y, temperature=2.0, alpha=0.6)
    check(backend, s, lp.to(dtype), idx, y, temperature=2.0, tail=False)


def test_leading_dims_and_noncontiguous(backend):
    s, lp, idx, y = make(12, 31, 4, device=backend.device)
    s3 = s.reshape(3, 4, 31).transpose(0, 1)  # (4, 3, 31), non-contiguous
    lp3 = lp.reshape(3, 4, 4).transpose(0, 1)
    idx3 = idx.reshape(3, 4, 4).transpose(0, 1)
    y3 = y.reshape(3, 4).transpose(0, 1)
    go = torch.rand(4, 3) + 0.5
    leaf = s3.detach().clone().requires_grad_(True)
    with backend():
        loss = pykd.topk_kd_loss(leaf, lp3, idx3, y3, reduction="none", temperature=2.0)
        loss.backward(go)
    ref_leaf = s3.detach().double().requires_grad_(True)
    ref = reference.topk_kd_loss(ref_leaf, lp3.double(), idx3, y3, reduction="none", temperature=2.0)
    ref.backward(go.double())
    assert loss.shape == (4, 3)
    assert_close(loss, ref, atol=1e-5)
    assert_close(leaf.grad, ref_leaf.grad, scale=2.0)


def test_num_items_and_components(backend):
    s, lp, idx, y = make(8, 21, 3, device=backend.device)
    check(backend, s, lp, idx, y, num_items_in_batch=13, temperature=1.5, alpha=0.4)
    check(backend, s, lp, idx, y, num_items_in_batch=torch.tensor(5.0), scale_by_t2=False, temperature=3.0)


def test_no_grad_and_teacher_gets_no_grad(backend):
    s, lp, idx, y = make(5, 17, 3, device=backend.device)
    lpg = lp.clone().requires_grad_(True)
    leaf = s.clone().requires_grad_(True)
    with backend():
        with torch.no_grad():
            a = pykd.topk_kd_loss(leaf, lpg, idx, y)
        b = pykd.topk_kd_loss(leaf, lpg, idx, y)
        b.backward()
    assert not a.requires_grad and a.item() == pytest.approx(b.item(), rel=1e-6)
    assert lpg.grad is None and leaf.grad is not None


def test_outputs_poisoned_then_written(backend, monkeypatch):
    monkeypatch.setenv("PYKD_POISON_OUTPUTS", "1")
    s, lp, idx, y = make(6, 27, 4, device=backend.device)
    for tail in (True, False):
        for reduction in ("none", "mean"):
            check(backend, s, lp, idx, y, tail=tail, reduction=reduction, temperature=2.0)


def test_module(backend):
    s, lp, idx, y = make(5, 17, 3, device=backend.device)
    mod = pykd.nn.TopKKDLoss(temperature=2.0, tail=False)
    assert "tail=False" in repr(mod)
    with backend():
        a = mod(s, lp, idx, y)
        b = pykd.topk_kd_loss(s, lp, idx, y, temperature=2.0, tail=False)
    assert torch.equal(a, b)


@given(
    R=st.integers(1, 9),
    V=st.integers(1, 80),
    k_frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    tail=st.booleans(),
    temperature=st.sampled_from([1.0, 0.5, 2.0]),
    with_target=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    scale_by_t2=st.booleans(),
)
def test_property(backend, R, V, k_frac, dtype, tail, temperature, with_target, reduction, scale_by_t2):
    K = max(1, round(k_frac * V))
    s, lp, idx, y = make(R, V, K, dtype=dtype, device=backend.device, T=temperature, with_target=with_target)
    check(backend, s, lp, idx, y, tail=tail, temperature=temperature, reduction=reduction,
          scale_by_t2=scale_by_t2)  # fmt: skip


test_property = pytest.mark.hypothesis(test_property)


# ------------------------------------------------------------------ tracing


def test_compile_fullgraph(backend):
    s, lp, idx, y = make(6, 23, 4, device=backend.device)

    def f(x):
        return pykd.topk_kd_loss(x, lp, idx, y, temperature=2.0) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    sa = s.clone().requires_grad_(True)
    sb = s.clone().requires_grad_(True)
    with backend():
        a = compiled(sa)
        a.backward()
        b = f(sb)
        b.backward()
    assert_close(a, b, rtol=1e-6, atol=0)
    assert_close(sa.grad, sb.grad, rtol=1e-6, atol=1e-6)


def test_opcheck(backend):
    s, lp, idx, y = make(5, 17, 4, device=backend.device)
    idx, perm = idx.sort(-1)
    lp = lp.gather(-1, perm)
    sg = s.clone().requires_grad_(True)
    cases = [
        (sg, lp, idx, y, None, 2.0, 0.5, True, -100, True, [1.0, 0.0], "mean", True),
        (sg, lp, idx, None, None, 1.0, 1.0, False, -100, True, [1.0, 5.0], "sum", True),
        (sg, lp, idx, y, torch.tensor(7.0), 1.5, 0.2, True, -100, False, [0.5, 0.0], "mean", True),
        (s, lp, idx, y, None, 1.0, 0.5, False, -100, True, [1.0, 2.0], "none", False),
    ]
    with backend():
        for args in cases:
            torch.library.opcheck(torch.ops.pykd.topk_kd_loss_fwd.default, args)


# ------------------------------------------------------------------ bad input

S = torch.zeros(4, 10)
LP = torch.log(torch.full((4, 3), 0.2))
IX = torch.tensor([[0, 1, 2]] * 4)


# ------------------------------------------------------------------ LLM families' options


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("softcap,scale", [(5.0, 1.0), (None, 0.4), (3.0, 1.7)])
def test_logit_map(backend, tail, softcap, scale):
    """The student's logit_softcap / logit_scale, gradient through the map (the teacher's log-probs
    are used as given)."""
    s, lp, idx, y = make(9, 37, 5, device=backend.device, T=2.0)
    check(backend, s, lp, idx, y, temperature=2.0, tail=tail, logit_softcap=softcap, logit_scale=scale)
    s[2, 5] = float("nan")  # NaN in, NaN out: softcap must not turn it into a finite loss
    y[2] = 0
    with backend():
        out = pykd.topk_kd_loss(s, lp, idx, y, tail=tail, logit_softcap=softcap, reduction="none")
    assert torch.isnan(out[2]) and not torch.isnan(out[[0, 1, 3]]).any()


def teacher_over_padded_vocab(R, V, V_t, K, device):
    """Top-K of a teacher whose vocabulary V_t > V puts real mass on ids >= V."""
    t = torch.randn(R, V_t) * 2
    t[:, V:] += 2.0
    lp, idx = torch.log_softmax(t, -1).topk(K, -1)
    assert (idx >= V).any(-1).float().mean() > 0.5
    return t.to(device), lp.to(device), idx.to(device)


@pytest.mark.parametrize("tail", [True, False])
def test_teacher_vocab_size(backend, tail):
    """Indices >= V are dropped and the teacher conditioned on the student's vocabulary."""
    R, V, V_t = 11, 29, 38
    s = (torch.randn(R, V) * 3).to(backend.device)
    _, lp, idx = teacher_over_padded_vocab(R, V, V_t, 7, backend.device)
    y = torch.randint(0, V, (R,), device=backend.device)
    y[3] = -100
    check(backend, s, lp, idx, y, temperature=1.5, tail=tail, teacher_vocab_size=V_t, logit_softcap=6.0)
    lp[0] = float("-inf")  # a row without teacher mass on the student's vocabulary stays finite (tail)
    lp[0, 0] = 0.0
    idx[0] = torch.arange(V, V + 7)
    if tail:
        check(backend, s, lp, idx, y, tail=True, teacher_vocab_size=V_t)


@pytest.mark.parametrize("tail", [True, False])
def test_teacher_vocab_size_agrees_with_kd_loss(backend, tail):
    """With K = V_t the whole teacher is known: dropping ids >= V and renormalizing is kd_loss's
    conditioning of a wider teacher on the student's vocabulary (an independent check of the rule)."""
    R, V, V_t = 6, 21, 27
    s = (torch.randn(R, V) * 2).to(backend.device)
    t, lp, idx = teacher_over_padded_vocab(R, V, V_t, V_t, backend.device)
    with backend():
        topk = pykd.topk_kd_loss(s, lp, idx, tail=tail, teacher_vocab_size=V_t, reduction="none")
        full = pykd.kd_loss(s, t, reduction="none")
    torch.testing.assert_close(topk, full, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((S.long(), LP, IX), {}, TypeError, "student_logits must be float32"),
        ((S, LP.long(), IX), {}, TypeError, "teacher_topk_logprobs must be float32"),
        ((S, LP, IX.int()), {}, TypeError, "teacher_topk_indices must be int64"),
        ((S, LP, IX.numpy()), {}, TypeError, "teacher_topk_indices must be a torch.Tensor"),
        ((S, LP[:3], IX[:3]), {}, ValueError, "teacher_topk_logprobs must have shape"),
        ((S, LP, IX[:, :2]), {}, ValueError, "teacher_topk_indices must have the shape"),
        ((S, torch.zeros(4, 11), torch.zeros(4, 11, dtype=torch.long)), {}, ValueError, "1 <= K <= V"),
        ((S, LP, torch.tensor([[0, 1, 10]] * 4)), {}, ValueError, r"must be in \[0, 10\)"),
        ((S, LP, torch.tensor([[0, -1, 3]] * 4)), {}, ValueError, r"must be in \[0, 10\)"),
        ((S, LP, torch.tensor([[0, 1, 1]] * 4)), {}, ValueError, "distinct"),
        ((S, LP + 1.0, IX), {}, ValueError, "must be log-probabilities"),
        ((S, torch.full((4, 3), float("nan")), IX), {}, ValueError, "must be log-probabilities"),
        ((S, torch.log(torch.full((4, 3), 0.4)), IX), {}, ValueError, "summing to at most 1"),
        ((S, LP, IX), {"tail": 1}, TypeError, "tail must be a bool"),
        ((S, LP, IX), {"temperature": 0.0}, ValueError, "temperature"),
        ((S, LP, IX), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        ((S, LP, IX), {"alpha": 0.5}, ValueError, "needs target"),
        ((S, LP, IX, torch.zeros(3, dtype=torch.long)), {}, ValueError, "target must have shape"),
        ((S, LP, IX.to("meta")), {}, ValueError, "one device"),
        ((S, LP, torch.tensor([[0, 1, 12]] * 4)), {}, ValueError, "pass teacher_vocab_size"),
        ((S, LP, IX), {"teacher_vocab_size": 9}, ValueError, "teacher_vocab_size must be at least"),
        ((S, LP, IX), {"teacher_vocab_size": 12.0}, TypeError, "teacher_vocab_size must be an int"),
        (
            (S, LP, torch.tensor([[0, 1, 12]] * 4)),
            {"teacher_vocab_size": 12},
            ValueError,
            r"must be in \[0, 12\)",
        ),
        ((S, LP, IX), {"logit_softcap": (2.0, 3.0)}, TypeError, "logit_softcap must be one number here"),
        ((S, LP, IX), {"logit_softcap": -1.0}, ValueError, "logit_softcap must be a finite number"),
        ((S, LP, IX), {"logit_scale": 0}, ValueError, "logit_scale must be a finite number"),
    ],
)
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pykd.topk_kd_loss(*args, **kwargs)


def test_renormalized_teacher_may_exceed_one():
    """tail=False renormalizes, so only the tail form requires the K probabilities to sum to <= 1."""
    lp = torch.log(torch.full((4, 3), 0.4))
    loss = pykd.topk_kd_loss(S, lp, IX, tail=False)
    assert torch.isfinite(loss)


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tail", [True, False])
def test_gpu_large_vocab(dtype, tail):
    from conftest import Backend

    s, lp, idx, y = make(64, 128256, 64, dtype=dtype, device="cuda", T=2.0)
    check(Backend("triton"), s, lp, idx, y, temperature=2.0, tail=tail)


@pytest.mark.gpu
def test_gpu_launch_choices(monkeypatch):
    """benchmarks/tune_kd_loss.py's choices: programs per SM, warps, the reversed gradient sweep."""
    from conftest import Backend

    from pykd.kernels import topk_kd_loss as k

    monkeypatch.setattr(k, "PROGRAMS_PER_SM", 1)
    monkeypatch.setattr(k, "NUM_WARPS", 4)
    monkeypatch.setattr(k, "REVERSE", True)
    s, lp, idx, y = make(600, 32000, 64, dtype=torch.bfloat16, device="cuda", T=2.0)
    check(Backend("triton"), s, lp, idx, y, temperature=2.0, tail=True)
