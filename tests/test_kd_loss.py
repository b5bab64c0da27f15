"""pykd.kd_loss on both backends against pykd.reference in float64: values and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, assert_close
from hypothesis import given
from hypothesis import strategies as st

import pykd
from pykd import reference

DIVS = ["kl", "reverse_kl", "soft_ce", "jsd", "tvd", "mse"]
F32 = torch.float32


def make(shape, dtype=F32, device="cpu", scale=3.0, ignore_frac=0.0, with_target=True):
    V = shape[-1]
    s = (torch.randn(shape) * scale).to(dtype).to(device)
    t = (torch.randn(shape) * scale).to(dtype).to(device)
    y = None
    if with_target:
        y = torch.randint(0, V, shape[:-1])
        if ignore_frac > 0:
            y[torch.rand(shape[:-1]) < ignore_frac] = -100
        y = y.to(device)
    return s, t, y


def loss_atol(s, t, temperature, opts):
    """Absolute error of an fp32 loss built from lse's and dot products of size |z|."""
    z = max(s.abs().max().item(), t.abs().max().item()) / temperature
    w = temperature**2 if opts.get("scale_by_t2", True) and opts.get("divergence") != "mse" else 1
    if opts.get("divergence") == "mse":
        return 4e-6 * (1 + max(s.abs().max().item(), t.abs().max().item())) ** 2
    return 4e-6 * (1 + z) * max(w, 1)


def grad_unit(s, y, go, opts):
    """Size of the probability terms that make up a gradient entry (they cancel in p_s - p_t)."""
    T = opts.get("temperature", 1.0)
    alpha = opts.get("alpha")
    alpha = (0.5 if y is not None else 1.0) if alpha is None else alpha
    div = opts.get("divergence", "kl")
    w = T * T if opts.get("scale_by_t2", True) and div != "mse" else 1.0
    unit = alpha * w / T + (1 - alpha)
    if opts.get("reduction", "mean") == "mean":
        n = opts.get("num_items_in_batch")
        n = (y != opts.get("ignore_index", -100)).sum().item() if n is None and y is not None else n
        n = s[..., 0].numel() if n is None else n
        unit /= max(float(n), 1.0)
    gmax = 0.75 if go is None else go.abs().max().item()
    return 0.0 if div == "mse" else unit * gmax


def run(backend, s, t, y, go=None, **opts):
    """pykd on backend: (loss, soft, hard, grad wrt student) with grad_output go."""
    leaf = s.detach().clone().requires_grad_(True)
    with backend():
        loss, soft, hard = pykd.kd_loss(leaf, t, y, return_components=True, **opts)
        if go is None:
            go = torch.full_like(loss, 0.75) if loss.dim() else torch.tensor(0.75)
        loss.backward(go.to(loss.device))
    return loss, soft, hard, leaf.grad


def run_ref(s, t, y, go, **opts):
    leaf = s.detach().cpu().double().requires_grad_(True)
    yy = None if y is None else y.cpu()
    loss, soft, hard = reference.kd_loss(leaf, t.detach().cpu().double(), yy, return_components=True, **opts)
    if go is None:
        go = torch.full_like(loss, 0.75) if loss.dim() else torch.tensor(0.75)
    loss.backward(go.double().cpu())
    return loss, soft, hard, leaf.grad


def check(backend, s, t, y, go=None, **opts):
    loss, soft, hard, grad = run(backend, s, t, y, go, **opts)
    rl, rs, rh, rg = run_ref(s, t, y, go, **opts)
    T = opts.get("temperature", 1.0)
    atol_abs = loss_atol(s.float(), t.float(), T, opts)
    for name, a, e in (("loss", loss, rl), ("soft", soft, rs), ("hard", hard, rh)):
        assert a.dtype == torch.float32, f"{name} must be fp32"
        ok = (a.double().cpu() - e).abs() <= 2e-5 * e.abs() + atol_abs
        assert bool(ok.all()), f"{name}: pykd {a} vs reference {e} (atol {atol_abs:.3g})"
    assert grad.dtype == s.dtype and grad.shape == s.shape
    # fp32 log p = z - lse carries an absolute error ~ eps32 |z|: softmax's conditioning at large
    # logits, on top of the dtype's rounding (negligible for O(1) logits, 6e-4 at |z| = 5000).
    finite = [x.float()[torch.isfinite(x.float())] for x in (s, t)]
    zmax = max(f.abs().max().item() if f.numel() else 0.0 for f in finite) / T
    cond = 2.0**-23 * zmax
    rtol, atol = TOL[s.dtype]
    assert_close(grad, rg, rtol=rtol + cond, atol=atol + cond, scale=grad_unit(s, y, go, opts), name="grad")
    return loss, grad


# ------------------------------------------------------------------ values and gradients


@pytest.mark.parametrize("divergence", DIVS)
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
def test_matches_reference(backend, divergence, temperature, alpha, with_target, reduction):
    s, t, y = make((3, 5, 37), device=backend.device, ignore_frac=0.3, with_target=with_target)
    go = torch.rand(3, 5) + 0.5 if reduction == "none" else None
    check(
        backend,
        s,
        t,
        y,
        go,
        divergence=divergence,
        temperature=temperature,
        alpha=alpha,
        reduction=reduction,
    )


@pytest.mark.parametrize("divergence", ["kl", "jsd", "tvd"])
def test_options(backend, divergence):
    s, t, y = make((9, 23), device=backend.device, ignore_frac=0.2)
    check(backend, s, t, y, divergence=divergence, temperature=1.5, beta=0.2, scale_by_t2=False)
    check(backend, s, t, y, divergence=divergence, num_items_in_batch=40)
    y3 = torch.where(y == -100, 3, y)
    check(backend, s, t, y3, divergence=divergence, ignore_index=3, temperature=2.0)


def test_num_items_tensor(backend):
    s, t, y = make((6, 19), device=backend.device)
    n = torch.tensor(13.0, device=backend.device)
    a = run(backend, s, t, y, num_items_in_batch=n)
    b = run(backend, s, t, y, num_items_in_batch=13)
    assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])


@pytest.mark.parametrize("V", [1, 2, 17, 64, 100])
def test_vocab_sizes(backend, V):
    s, t, y = make((7, V), device=backend.device)
    for div in DIVS:
        check(backend, s, t, y, divergence=div, temperature=2.0)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_multiple_blocks_and_programs(backend, monkeypatch, reverse):
    """V not a multiple of the vocabulary block, and more rows than programs (grid-stride loop);
    with the later sweeps walking the row backward (REVERSE; Triton only, C++ ignores it)."""
    from pykd.kernels import kd_loss as k

    monkeypatch.setattr(k, "MAX_BLOCK_V", 16)
    monkeypatch.setattr(k, "MAX_PROGRAMS", 3)
    monkeypatch.setattr(k, "REVERSE", reverse)
    s, t, y = make((11, 53), device=backend.device, ignore_frac=0.3)
    for div in DIVS:
        check(backend, s, t, y, divergence=div, temperature=1.3)


def test_many_rows(backend):
    """Rows past the 65535 grid limit. The interpreter runs programs one by one, so there the
    same grid-stride loop is covered by test_multiple_blocks_and_programs instead."""
    if backend.interpreted:
        pytest.skip("65535 interpreted programs take minutes; see test_multiple_blocks_and_programs")
    s, t, y = make((70000, 3), device=backend.device, ignore_frac=0.1)
    check(backend, s, t, y, temperature=2.0)


# ------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, reduction):
    s, t, _ = make((4, 29), device=backend.device)
    y = torch.full((4,), -100, device=backend.device)
    for div in DIVS:
        loss, soft, hard, grad = run(backend, s, t, y, divergence=div, reduction=reduction)
        assert torch.equal(loss, torch.zeros_like(loss)), (div, loss)
        assert torch.equal(soft, torch.zeros_like(soft)) and torch.equal(hard, torch.zeros_like(hard))
        assert torch.equal(grad, torch.zeros_like(grad)), div


@pytest.mark.parametrize("divergence", DIVS)
def test_extreme_logits(backend, divergence):
    s, t, y = make((6, 41), device=backend.device)
    s = torch.where(torch.rand_like(s) < 0.5, 1e4, -1e4) * torch.rand_like(s)
    t = torch.where(torch.rand_like(t) < 0.5, 1e4, -1e4) * torch.rand_like(t)
    s[0] = 1e4  # a row of ties at the extreme
    loss, grad = check(backend, s, t, y, divergence=divergence, temperature=2.0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("divergence", ["kl", "soft_ce", "jsd", "tvd"])
def test_teacher_neg_inf(backend, divergence):
    """Masked teacher vocabulary (-inf) gives finite, exact results."""
    s, t, y = make((5, 40), device=backend.device)
    t[:, 7:23] = float("-inf")
    t[2, :-1] = float("-inf")  # one row with a single allowed entry
    loss, grad = check(backend, s, t, y, divergence=divergence, temperature=1.5)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_both_neg_inf(backend):
    """Entries masked in both student and teacher contribute nothing, for every divergence."""
    s, t, _ = make((4, 33), device=backend.device)
    s[:, 10:20] = float("-inf")
    t[:, 10:20] = float("-inf")
    for div in DIVS:
        loss, _, _, grad = run(backend, s, t, None, divergence=div)
        rl, _, _, rg = run_ref(s, t, None, None, divergence=div)
        assert torch.isfinite(loss), div
        assert_close(loss, rl, dtype=torch.float32, rtol=2e-5, atol=1e-5, name=f"{div} loss")
        assert_close(grad, rg, name=f"{div} grad")


# ------------------------------------------------------------------ LLM families' options


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize(
    "softcap,scale",
    [(5.0, 1.0), (None, 0.3), ((4.0, None), (1.0, 0.5)), ((None, 2.5), 1.0), (30.0, (0.8, 1.25))],
)
def test_logit_map(backend, divergence, softcap, scale):
    """logit_softcap / logit_scale (Gemma-2, Cohere) match the reference on f(logits), gradient
    through f, with the hard CE on f(logits) too."""
    s, t, y = make((3, 5, 37), device=backend.device, ignore_frac=0.2)
    check(backend, s, t, y, divergence=divergence, temperature=1.5, logit_softcap=softcap, logit_scale=scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_logit_map_low_precision(backend, dtype):
    s, t, y = make((4, 45), dtype=dtype, device=backend.device)
    check(backend, s, t, y, temperature=2.0, logit_softcap=4.0, logit_scale=(1.0, 0.7))


def test_softcap_tanh_digits(backend):
    """The kernels' tanh keeps its relative digits near 0 (a Taylor branch) and across |x| = c / 4
    where it switches, and saturates at +-inf: f(+inf) = c with f' = 0 there, f(-inf) = -c."""
    c = 8.0
    s = torch.cat([torch.logspace(-6, 0, 20), torch.linspace(0.2, 0.3, 20) * c, torch.tensor([50.0, 1e4])])
    s = torch.stack([s, -s, s.flip(0)])
    t = torch.randn_like(s)
    s[2, 3] = float("inf")
    s[1, 5] = float("-inf")
    loss, grad = check(backend, s, t, None, logit_softcap=c, divergence="kl")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # soft_ce grows with log-ratio terms of size |z|: a relative check of the small logits' gradient
    leaf = s[:1, :20].clone().requires_grad_(True)
    with backend():
        pykd.kd_loss(leaf, torch.zeros_like(leaf), divergence="mse", logit_softcap=c).backward()
    x = s[:1, :20].double()
    expect = 2 * c * torch.tanh(x / c) * (1 - torch.tanh(x / c) ** 2) / 20
    assert_close(leaf.grad, expect, rtol=2e-6, atol=0.0, name="mse grad at tiny logits")


def test_logit_map_nan_and_identity(backend):
    s, t, y = make((4, 23), device=backend.device)
    s[1, 3] = float("nan")
    with backend():
        out = pykd.kd_loss(s, t, y, reduction="none", logit_softcap=3.0)
        plain = pykd.kd_loss(s, t, y, reduction="none")
        same = pykd.kd_loss(s, t, y, reduction="none", logit_softcap=None, logit_scale=(1.0, 1.0))
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()
    torch.testing.assert_close(same, plain, rtol=0, atol=0, equal_nan=True)  # scale 1: bitwise the same


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "mse"])
def test_larger_teacher_vocab(backend, divergence):
    """A padded teacher vocabulary (V_t > V) is conditioned on the student's: its first V logits,
    read in place."""
    s, _, y = make((2, 3, 29), device=backend.device, ignore_frac=0.2)
    t = torch.randn(2, 3, 40, device=backend.device) * 3
    t[..., 29:] += 5.0  # mass on the padding that must not leak into the loss
    check(backend, s, t, y, divergence=divergence, temperature=2.0, logit_softcap=(None, 6.0))
    with backend():
        wide = pykd.kd_loss(s, t, y, divergence=divergence, reduction="none")
        sliced = pykd.kd_loss(s, t[..., :29].contiguous(), y, divergence=divergence, reduction="none")
        with torch.profiler.profile() as prof:
            pykd.kd_loss(s, t, y, divergence=divergence)
    torch.testing.assert_close(wide, sliced, rtol=0, atol=0)
    assert "aten::clone" not in [e.name for e in prof.events()]  # as test_edges.py::test_logits_layouts


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVS)
def test_low_precision(backend, dtype, divergence):
    s, t, y = make((5, 3, 45), dtype=dtype, device=backend.device, ignore_frac=0.2)
    check(backend, s, t, y, divergence=divergence, temperature=2.0, reduction="sum")


def test_mixed_teacher_dtype(backend):
    s, t, y = make((6, 31), device=backend.device)
    check(backend, s, t.to(torch.bfloat16), y, temperature=2.0)
    check(backend, s.half(), t, y)


def test_noncontiguous(backend):
    s, t, y = make((31, 8), device=backend.device)
    s, t = s.t(), t.t()  # (8, 31), row stride 1
    y = torch.randint(0, 31, (8,), device=backend.device)
    check(backend, s, t, y, temperature=2.0)


def test_no_grad_and_inference(backend):
    s, t, y = make((5, 21), device=backend.device)
    with backend():
        a = pykd.kd_loss(s, t, y, temperature=2.0)  # s does not require grad
        with torch.no_grad():
            b = pykd.kd_loss(s.clone().requires_grad_(), t, y, temperature=2.0)
    assert not a.requires_grad and not b.requires_grad
    rl, *_ = run_ref(s, t, y, None, temperature=2.0)
    assert_close(a, rl, rtol=2e-5, atol=1e-5)
    assert torch.equal(a, b)


def test_teacher_gets_no_grad(backend):
    s, t, y = make((4, 19), device=backend.device)
    t.requires_grad_(True)
    sl = s.clone().requires_grad_(True)
    with backend():
        pykd.kd_loss(sl, t, y).backward()
    assert t.grad is None and sl.grad is not None


def test_backward_twice_raises(backend):
    s, t, y = make((4, 19), device=backend.device)
    sl = s.clone().requires_grad_(True)
    with backend():
        loss = pykd.kd_loss(sl, t, y)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="backward ran twice"):
            loss.backward()


@pytest.mark.parametrize("divergence", DIVS)
def test_outputs_poisoned_then_written(backend, monkeypatch, divergence):
    """Every output element is written: outputs start as NaN (PYKD_POISON_OUTPUTS) on both
    backends, including ignored rows, multi-block rows and the no-grad path."""
    monkeypatch.setenv("PYKD_POISON_OUTPUTS", "1")
    from pykd.kernels import kd_loss as k

    monkeypatch.setattr(k, "MAX_BLOCK_V", 16)
    s, t, y = make((6, 37), device=backend.device, ignore_frac=0.4)
    check(backend, s, t, y, divergence=divergence, temperature=2.0, reduction="none", go=torch.rand(6) + 0.5)
    with backend():
        loss = pykd.kd_loss(s, t, y, divergence=divergence, reduction="none")
    assert torch.isfinite(loss).all()


def test_poison_switch_poisons():
    """The switch itself works (else the test above could not fail)."""
    import os

    from pykd.kernels.common import new_output

    os.environ["PYKD_POISON_OUTPUTS"] = "1"
    try:
        assert torch.isnan(new_output((3,), device="cpu", dtype=torch.float32)).all()
        # The op itself (C++ on CPU): with V = 0 (which the public API rejects) the kernel has
        # nothing to write, so its per-row outputs come back as allocated: poisoned.
        out = torch.ops.pykd.kd_loss_fwd(
            torch.zeros(2, 0),
            torch.zeros(2, 0),
            None,
            None,
            "kl",
            1.0,
            1.0,
            0.5,
            -100,
            True,
            [1.0, 0.0, 1.0, 0.0],
            "none",
            True,
        )
        assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()
    finally:
        del os.environ["PYKD_POISON_OUTPUTS"]


def test_module(backend):
    s, t, y = make((2, 3, 27), device=backend.device)
    mod = pykd.nn.KDLoss(divergence="jsd", temperature=2.0, reduction="sum")
    with backend():
        a = mod(s, t, y)
    b = reference.kd_loss(s.double(), t.double(), y, divergence="jsd", temperature=2.0, reduction="sum")
    assert_close(a, b, rtol=2e-5, atol=1e-5)
    assert "jsd" in repr(mod)
    capped = pykd.nn.KDLoss(temperature=2.0, logit_softcap=(3.0, 5.0), logit_scale=(1.0, 0.5))
    with backend():
        a = capped(s, t, y)
    b = reference.kd_loss(s.double(), t.double(), y, temperature=2.0, logit_softcap=(3.0, 5.0),
                          logit_scale=(1.0, 0.5))  # fmt: skip
    assert_close(a, b, rtol=2e-5, atol=1e-5)


# ------------------------------------------------------------------ properties


@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    V=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    divergence=st.sampled_from(DIVS),
    temperature=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    with_target=st.booleans(),
    alpha=st.sampled_from([None, 0.0, 0.5, 1.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    ignore_frac=st.sampled_from([0.0, 0.5, 1.0]),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    softcap=st.sampled_from([None, None, 2.0, 20.0]),
)
def test_property(
    backend,
    lead,
    V,
    dtype,
    divergence,
    temperature,
    with_target,
    alpha,
    reduction,
    ignore_frac,
    scale,
    softcap,
):
    if alpha is not None and alpha < 1 and not with_target:
        alpha = None
    s, t, y = make(
        (*lead, V),
        dtype=dtype,
        device=backend.device,
        scale=scale,
        ignore_frac=ignore_frac,
        with_target=with_target,
    )
    go = torch.rand(lead) + 0.5 if reduction == "none" else None
    check(
        backend,
        s,
        t,
        y,
        go,
        logit_softcap=softcap,
        divergence=divergence,
        temperature=temperature,
        alpha=alpha,
        reduction=reduction,
    )


# ------------------------------------------------------------------ tracing


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend, compiler):
    if compiler == "inductor" and backend.interpreted:
        pytest.skip("inductor codegen is backend-independent; the C++ run covers it")
    s, t, y = make((4, 6, 33), device=backend.device, ignore_frac=0.2)

    def f(s, t, y):
        return pykd.kd_loss(s.tanh() * 3, t, y, temperature=2.0, divergence="jsd") * 1.5

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    sa = s.clone().requires_grad_(True)
    sb = s.clone().requires_grad_(True)
    with backend():
        a = compiled(sa, t, y)
        a.backward()
        b = f(sb, t, y)
        b.backward()
    # aot_eager runs the same ops; inductor fuses tanh into its own code (fp32 rounding differs)
    rtol = 1e-6 if compiler == "aot_eager" else 1e-5
    assert_close(a, b, rtol=rtol, atol=0)
    assert_close(sa.grad, sb.grad, rtol=rtol, atol=rtol)


def test_opcheck(backend):
    s, t, y = make((5, 17), device=backend.device, ignore_frac=0.2)
    sg = s.clone().requires_grad_(True)
    n = torch.tensor(7.0)
    cases = [
        (sg, t, y, None, "kl", 2.0, 0.5, 0.5, -100, True, [1.0, 0.0, 1.0, 0.0], "mean", True),
        (sg, t, None, None, "jsd", 1.0, 1.0, 0.3, -100, True, [1.0, 4.0, 1.0, 6.0], "sum", True),
        (sg, t, y, n, "tvd", 1.5, 0.2, 0.5, -100, False, [0.5, 0.0, 2.0, 0.0], "mean", True),
        (s, t, y, None, "mse", 1.0, 0.5, 0.5, -100, True, [1.0, 3.0, 1.0, 3.0], "none", False),
    ]
    with backend():
        for args in cases:
            torch.library.opcheck(torch.ops.pykd.kd_loss_fwd.default, args)
        torch.library.opcheck(torch.ops.pykd.scale_rows_.default, (s.clone(), torch.rand(5, device=s.device)))
        # the vocabulary-slice phases of process_group=: stats, partial sums, gradient
        lse = torch.randn(5, 2, device=s.device)
        row = torch.cat([lse, torch.randn(5, 2, device=s.device), torch.zeros(5, 1, device=s.device)], 1)
        one = torch.tensor(0.25, device=s.device)
        for phase, st, div in (
            (1, None, "kl"),
            (1, None, "mse"),
            (2, lse, "jsd"),
            (3, row, "tvd"),
            (3, row, "mse"),
        ):
            args = (s, t, y, st, one, div, 2.0, 0.5, 0.5, -100, True, [1.0, 3.0, 1.0, 0.0], phase, 4, 40)
            torch.library.opcheck(torch.ops.pykd.kd_loss_shard.default, args)
        torch.library.opcheck(
            torch.ops.pykd.scale_rows_.default, (s.clone(), torch.tensor(0.5, device=s.device))
        )


# ------------------------------------------------------------------ bad input

S = torch.zeros(4, 10)
T = torch.zeros(4, 10)
Y = torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((S.numpy(), T), {}, TypeError, "student_logits must be a torch.Tensor"),
        ((S.long(), T), {}, TypeError, "student_logits must be float32"),
        ((S.double(), T), {}, TypeError, "student_logits must be float32"),
        ((S, T.int()), {}, TypeError, "teacher_logits must be float32"),
        (
            (S, torch.zeros(4, 9)),
            {},
            ValueError,
            r"teacher_logits must have shape \(4, 'V_t'\) with V_t >= V=10",
        ),
        ((S, torch.zeros(5, 10)), {}, ValueError, "teacher_logits must have shape"),
        ((S, T), {"logit_softcap": 0.0}, ValueError, r"logit_softcap must be a finite number in \(0"),
        ((S, T), {"logit_softcap": float("inf")}, ValueError, "logit_softcap"),
        ((S, T), {"logit_softcap": (1.0, 2.0, 3.0)}, ValueError, "logit_softcap must be a number or a"),
        ((S, T), {"logit_softcap": (1.0, -2.0)}, ValueError, r"logit_softcap\[1\] must be"),
        ((S, T), {"logit_scale": 0.0}, ValueError, r"logit_scale must be a finite number in \(0"),
        ((S, T), {"logit_scale": None}, TypeError, "logit_scale must be a real number"),
        ((S, T), {"logit_scale": (1.0, "2")}, TypeError, r"logit_scale\[1\] must be a real number"),
        ((torch.zeros(4, 0), torch.zeros(4, 0)), {}, ValueError, "V >= 1"),
        ((S, T, Y.int()), {}, TypeError, "target must be int64"),
        ((S, T, torch.zeros(4, 1, dtype=torch.long)), {}, ValueError, "target must have shape"),
        (
            (S, T, torch.tensor([0, 1, 10, 2])),
            {},
            ValueError,
            r"target values must be in \[0, 10\)",
        ),
        ((S, T, torch.tensor([0, -1, 1, 2])), {}, ValueError, "found -1"),
        ((S, T), {"divergence": "kld"}, ValueError, "divergence must be one of"),
        ((S, T), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        ((S, T), {"temperature": 0.0}, ValueError, "temperature must be a finite number in"),
        ((S, T), {"temperature": -1.0}, ValueError, "temperature"),
        ((S, T), {"temperature": float("inf")}, ValueError, "temperature"),
        ((S, T), {"temperature": "2"}, TypeError, "temperature must be a real number"),
        (
            (S, T),
            {"divergence": "jsd", "beta": 0.0},
            ValueError,
            r"beta must be a finite number in \(0",
        ),
        ((S, T), {"divergence": "jsd", "beta": 1.0}, ValueError, "beta"),
        ((S, T, Y), {"alpha": 1.5}, ValueError, r"alpha must be a finite number in \[0"),
        ((S, T, Y), {"alpha": -0.1}, ValueError, "alpha"),
        ((S, T), {"alpha": 0.5}, ValueError, "needs target"),
        ((S, T), {"num_items_in_batch": 0}, ValueError, "num_items_in_batch"),
        ((S, T), {"num_items_in_batch": torch.ones(2)}, ValueError, "num_items_in_batch"),
        ((S, T), {"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ((S, T), {"scale_by_t2": 1}, TypeError, "scale_by_t2 must be a bool"),
    ],
)
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pykd.kd_loss(*args, **kwargs)


def test_bad_input_meta_device():
    with pytest.raises(ValueError, match="one device"):
        pykd.kd_loss(S, T.to("meta"))


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_large_vocab(dtype):
    s, t, y = make((64, 128256), dtype=dtype, device="cuda", ignore_frac=0.1)
    from conftest import Backend

    check(Backend("triton"), s, t, y, divergence="kl", temperature=2.0)
    check(Backend("triton"), s, t, y, divergence="jsd", temperature=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("per_sm,warps,block", [(1, 8, 4096), (2, 0, 0)])
def test_gpu_launch_choices(monkeypatch, per_sm, warps, block):
    """The launch choices benchmarks/tune_kd_loss.py sweeps: fewer programs than rows (per SM),
    other warps and blocks, reversed later sweeps."""
    from conftest import Backend

    from pykd.kernels import kd_loss as k

    monkeypatch.setattr(k, "PROGRAMS_PER_SM", per_sm)
    monkeypatch.setattr(k, "NUM_WARPS", warps)
    monkeypatch.setattr(k, "MAX_BLOCK_V", block or k.MAX_BLOCK_V)
    monkeypatch.setattr(k, "REVERSE", True)
    s, t, y = make((600, 32000), dtype=torch.bfloat16, device="cuda", ignore_frac=0.1)
    for div in ("kl", "jsd"):
        check(Backend("triton"), s, t, y, divergence=div, temperature=2.0)


@pytest.mark.gpu
def test_gpu_debug_target_check():
    s, t, _ = make((4, 10), device="cuda")
    y = torch.tensor([0, 1, 12, 2], device="cuda")
    pykd.set_debug(True)
    try:
        with pytest.raises(ValueError, match="target values"):
            pykd.kd_loss(s, t, y)
    finally:
        pykd.set_debug(False)


def test_fp16_mean_survives_loss_scaling(backend):
    """fp16 + "mean" with a GradScaler-sized grad_output: the 1/n of the mean must not be applied
    before grad_output arrives, or small gradient entries underflow fp16 and stay zero."""
    rows = 512
    s, t, y = make((rows, 24), dtype=torch.float16, device=backend.device, scale=1.0)
    t = s.float().cpu() + 0.002 * torch.randn(rows, 24)  # a close teacher: (p_s - p_t) / n ~ 1e-7
    t = t.to(torch.float16).to(backend.device)
    go = torch.tensor(65536.0)
    _, grad = check(backend, s, t, y, go, divergence="kl", temperature=2.0, alpha=1.0)
    # scaling by 1/n in fp16 first would flush ~18% of these entries to zero
    assert (grad == 0).float().mean().item() < 0.01


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_fp16_loss_scaler_grad_output(backend, reduction):
    """GradScaler's initial 65536 exceeds fp16's range: backward must scale in fp32, round once."""
    s, t, y = make((64, 30), dtype=torch.float16, device=backend.device, scale=1.0)
    t = (s.float() + 0.01 * torch.randn(64, 30)).to(torch.float16).to(backend.device)
    go = torch.full((64,), 65536.0) if reduction == "none" else torch.tensor(65536.0)
    check(backend, s, t, y, go, divergence="kl", temperature=2.0, alpha=0.7, reduction=reduction)


def test_scale_rows_op(backend):
    """The shared backward op: in place, fp32 multiply, shared or per-row scale, any dtype."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = (torch.randn(5, 37) * 1e-3).to(dtype).to(backend.device)
        for scale in (torch.tensor(65536.0), torch.rand(5) * 1e4, torch.tensor(1.0)):
            y = x.clone()
            with backend():
                torch.ops.pykd.scale_rows_(y, scale.to(backend.device))
            sc = scale.float().reshape(-1, 1) if scale.dim() else scale.float()
            expected = (x.float().cpu() * sc).to(dtype)  # fp32 product, rounded once
            assert torch.equal(y.cpu(), expected), (dtype, scale)
