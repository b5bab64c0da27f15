"""pykd.attention_kd, attention_divergence, attention and relation_kd on both backends against
pykd.reference in float64: outputs, losses and dq, dk, dv."""

from __future__ import annotations

import pytest
import torch
from helpers import ATTENTION_BACKENDS, TRITON, assert_close, assert_close_to_baseline, examples
from hypothesis import given, settings
from hypothesis import strategies as st

import pykd
from pykd import reference

DIVS = ["kl", "reverse_kl", "mse", "mse_scores"]
F32 = torch.float32


def make(B=2, Hs=4, Hkv=2, Ht=2, Htkv=1, Nq=17, Nk=None, Ds=16, Dt=24, dtype=F32, device="cpu", pad=0.0,
         scale=1.0):  # fmt: skip
    """Student q, k, v, teacher q_t, k_t and an optional key padding mask (some rows all padded)."""
    Nk = Nq if Nk is None else Nk

    def r(*shape):
        return (torch.randn(shape) * scale).to(dtype).to(device)

    q, k, v = r(B, Hs, Nq, Ds), r(B, Hkv, Nk, Ds), r(B, Hkv, Nk, Ds)
    qt, kt = r(B, Ht, Nq, Dt), r(B, Htkv, Nk, Dt)
    mask = None
    if pad:
        mask = (torch.rand(B, Nk) > pad).to(device)
        mask[0, 0] = True  # batch 0 keeps a key (batch 1 may lose all)
    return q, k, v, qt, kt, mask


def run(backend, fn, q, k, v, *teacher, go=None, loss_weight=3.0, **kw):
    """fn on backend with fresh leaves: (out, loss, (dq, dk, dv)) for sum(out * go) + w * loss."""
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in (q, k, v)]
    with backend():
        res = fn(*[x for x in leaves if x is not None], *teacher, **kw)
        out, loss = res if isinstance(res, tuple) else (None, res)
        total = loss_weight * loss.sum() if loss is not None else 0.0
        if out is not None:
            total = total + (out.float() * go.float()).sum()
        total.backward()
    return out, loss, [x.grad if x is not None else None for x in leaves]


def ref(fn, q, k, v, *teacher, go=None, loss_weight=3.0, dtype=torch.float64, **kw):
    leaves = [x.detach().to(dtype).requires_grad_(True) if x is not None else None for x in (q, k, v)]
    teacher = [x.to(dtype) for x in teacher]
    res = fn(*[x for x in leaves if x is not None], *teacher, **kw)
    out, loss = res if isinstance(res, tuple) else (None, res)
    total = loss_weight * loss.sum() if loss is not None else 0.0
    if out is not None:
        total = total + (out * go.to(dtype)).sum()
    total.backward()
    return out, loss, [x.grad if x is not None else None for x in leaves]


def cancel_scale(q, k, v, go, scale_s=None):
    """Size of the terms that cancel in dq and dk: dS_ij = P_ij (dO_i.v_j - dO_i.out_i) is 0 in
    exact math when row i sees one key, so an fp32 result is exact only to scale_s |dO|.|v| |k|
    (the rounding of a dot product scales with the sum of its terms' magnitudes, not with its
    value, which may itself cancel: found by a fresh seed at N = 1)."""
    scale_s = q.shape[-1] ** -0.5 if scale_s is None else scale_s
    dp = torch.einsum("bhnd,bgmd->bhgnm", go.double().abs(), v.double().abs()).max().item()
    return scale_s * dp * k.abs().max().item()


def loss_scale(q, k, qt, kt, kw):
    """Size of the terms that cancel in a row loss: a KL is a difference of lse's and mean scores
    (each as large as the scores; exactly 0 for a row with one key), an mse one of probabilities."""
    div = kw.get("divergence", "kl")
    if div == "mse_scores":
        return None
    if div == "mse":
        return 1.0

    def smax(a, b, scale):
        scale = a.shape[-1] ** -0.5 if scale is None else scale
        return scale * torch.einsum("bhnd,bgmd->bhgnm", a.double(), b.double()).abs().max().item()

    return smax(q, k, kw.get("scale_s")) + smax(qt, kt, kw.get("scale_t"))


def check(backend, q, k, v, qt, kt, mask, *, dtype=F32, scales=None, **kw):
    go = torch.randn(q.shape).to(q.dtype).to(q.device)
    if scales is None:
        u = cancel_scale(q, k, v, go, kw.get("scale_s"))
        scales = {"dq": u, "dk": u, "loss": loss_scale(q, k, qt, kt, kw)}
    a = run(backend, pykd.attention_kd, q, k, v, qt, kt, go=go, key_padding_mask=mask, **kw)
    e = ref(reference.attention_kd, q, k, v, qt, kt, go=go, key_padding_mask=mask, **kw)
    base = extra = None
    if dtype != F32:
        cpu = [x.cpu() for x in (q, k, v, qt, kt)]
        m_cpu = mask.cpu() if mask is not None else None
        base = ref(reference.attention_kd, *cpu, go=go.cpu(), dtype=dtype, key_padding_mask=m_cpu, **kw)
        extra = delta_rounding(*cpu[:3], go.cpu(), m_cpu, kw.get("causal", False), kw.get("scale_s"), dtype)
    compare(a, e, dtype, scales, base, extra)
    return a


def delta_rounding(q, k, v, go, mask, causal, scale_s, dtype, spec=None):
    """Bounds on the dq and dk error that flash attention's backward has by design in fp16/bf16 and
    an eager softmax backward has not: D_i = rowsum(dO_i * O_i) is taken from the output as stored
    (rounded to the dtype, computed from P rounded before P.V), not from sum_j P_ij dP_ij, and
    dS_ij = P_ij (dP_ij - D_i) cancels when P_i is nearly one-hot. With u the unit roundoff,
    |dD_i| <= u sum_d |dO_id| (|O_id| + (P|V|)_id), so |d dq_i| <= scale_s |dD_i| (P|K|_max)_i and
    |d dk_j| <= scale_s sum_i P_ij |dD_i| |Q_i|_max (summed over a K/V head's query heads).
    ``spec``: the student's AttentionSpec (its P is the sparse/quantized one)."""
    u = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    q, k, v, go = (x.detach().cpu().double() for x in (q, k, v, go))
    B, H, N_q, D = q.shape
    g = H // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale_s = D**-0.5 if scale_s is None else scale_s
    vis = reference._visible(B, N_q, k.shape[2], causal, None if mask is None else mask.cpu(), q.device)
    s, vis = reference.student_scores(q, kk, scale_s, vis, spec)
    p = reference._softmax_masked(s, vis)
    dd = u * (go.abs() * ((p @ vv).abs() + p @ vv.abs())).sum(-1)  # (B, H, N_q)
    e_dq = scale_s * dd * (p @ kk.abs().amax(-1, keepdim=True)).squeeze(-1)
    e_dk = scale_s * (p * (dd * q.abs().amax(-1))[..., None]).sum(-2)  # (B, H, N_k)
    e_dk = e_dk.reshape(B, k.shape[1], g, -1).sum(2)
    return {name: e.max().item() if e.numel() else 0.0 for name, e in (("dq", e_dq), ("dk", e_dk))}


def compare(a, e, dtype, scales=None, base=None, extra=None):
    """scales: name -> size of the terms that cancel into that result (see assert_close); base: the
    reference run in the half dtype, for the fp16/bf16 criterion (see assert_close_to_baseline);
    extra: name -> the additive bound of delta_rounding."""
    if base is not None:
        for name, x, y, z in [("out", a[0], e[0], base[0]), ("loss", a[1], e[1], base[1])] + list(
            zip(("dq", "dk", "dv"), a[2], e[2], base[2])
        ):
            if y is None:  # no V: no out, no dv
                assert x is None, name
                continue
            assert x.dtype == (torch.float32 if name == "loss" else dtype), name
            assert_close_to_baseline(x, y, z, dtype=dtype, name=name, scale=(scales or {}).get(name),
                                     extra=(extra or {}).get(name, 0.0))  # fmt: skip
        return
    for name, x, y in [("out", a[0], e[0]), ("loss", a[1], e[1])] + list(zip(("dq", "dk", "dv"), a[2], e[2])):
        if y is None:
            assert x is None, name
            continue
        assert x.dtype == (torch.float32 if name == "loss" else dtype), name
        assert torch.isfinite(x).all(), f"{name} has non-finite entries"
        assert_close(x, y, dtype=dtype, name=name, scale=(scales or {}).get(name))


# ------------------------------------------------------------------ values and gradients


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS, indirect=True)
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "pad"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("divergence", DIVS)
def test_matches_reference(backend, divergence, causal, mask):
    """Every divergence x causal x padding, with GQA on both sides, a teacher head map, D_s != D_t
    and a temperature."""
    q, k, v, qt, kt, m = make(device=backend.device, pad=0.3 if mask else 0.0)
    check(backend, q, k, v, qt, kt, m, divergence=divergence, causal=causal, temperature=2.0,
          teacher_heads=[1, 0, 1, 1])  # fmt: skip


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_plain_heads_and_reductions(backend, divergence, reduction):
    """No GQA, no head map, D_s == D_t, tau = 1; several key and query tiles."""
    q, k, v, qt, kt, m = make(
        B=1, Hs=2, Hkv=2, Ht=2, Htkv=2, Nq=45, Ds=32, Dt=32, device=backend.device, pad=0.2
    )
    check(backend, q, k, v, qt, kt, m, divergence=divergence, reduction=reduction)


@pytest.mark.parametrize("N", [1, 17, 129])
def test_odd_lengths(backend, N):
    q, k, v, qt, kt, m = make(B=1, Hs=2, Hkv=1, Ht=2, Htkv=2, Nq=N, Ds=24, Dt=8, device=backend.device)
    check(backend, q, k, v, qt, kt, m, divergence="kl", causal=True, scale_s=0.3, scale_t=0.2)


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_tiles_accumulate(divergence, causal):
    """The C++ kernel's long tiles (128 query rows up to 1024 keys) with 16 heads, so one task runs
    every tile of its head: the first tile writes the task's dk/dv buffers (zeroing the keys a causal
    tile does not see yet), later ones add, and the rows cross tile edges (N = 300: 3 tiles)."""
    q, k, v, qt, kt, m = make(B=2, Hs=8, Hkv=4, Ht=8, Htkv=2, Nq=300, Ds=16, Dt=8, pad=0.2)
    from conftest import Backend

    check(Backend("cpp"), q, k, v, qt, kt, m, divergence=divergence, causal=causal, temperature=2.0)


def test_cross_lengths_and_scales(backend):
    """N_q != N_k (no causal): the mask only marks keys; all queries count."""
    q, k, v, qt, kt, m = make(Nq=9, Nk=23, device=backend.device, pad=0.4)
    check(backend, q, k, v, qt, kt, m, divergence="reverse_kl", temperature=0.5, teacher_heads=[0, 0, 1, 1])


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS, indirect=True)
@pytest.mark.parametrize("divergence", ["kl", "mse_scores"])
def test_all_padded(backend, divergence):
    """A batch whose keys are all padded: out 0, loss 0, gradients 0, never NaN; a fully padded
    input gives loss exactly 0."""
    q, k, v, qt, kt, _ = make(device=backend.device)
    m = torch.ones(2, 17, dtype=torch.bool, device=backend.device)
    m[1] = False
    th = [0, 1, 1, 0]
    out, loss, grads = check(
        backend, q, k, v, qt, kt, m, divergence=divergence, causal=True, teacher_heads=th
    )
    assert (out[1] == 0).all()
    assert all((g[1] == 0).all() for g in grads)
    out, loss, grads = run(
        backend,
        pykd.attention_kd,
        q,
        k,
        v,
        qt,
        kt,
        go=torch.ones_like(q),
        key_padding_mask=torch.zeros_like(m),
        divergence=divergence,
        teacher_heads=th,
    )
    assert loss.item() == 0.0 and (out == 0).all()
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("divergence", ["kl", "mse"])
def test_half_dtypes(backend, dtype, divergence):
    """fp16/bf16 inputs against the float64 reference on the same rounded inputs."""
    q, k, v, qt, kt, m = make(Nq=33, Ds=32, Dt=16, dtype=dtype, device=backend.device, pad=0.2)
    check(backend, q, k, v, qt, kt, m, dtype=dtype, divergence=divergence, causal=True,
          teacher_heads=[0, 1, 1, 0])  # fmt: skip


def test_teacher_dtype_may_differ(backend):
    q, k, v, qt, kt, m = make(device=backend.device)
    check(backend, q, k, v, qt.bfloat16(), kt.bfloat16(), m, divergence="kl", teacher_heads=[0, 1, 0, 1])


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS, indirect=True)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "mse_scores"])
def test_extreme_scores(backend, divergence):
    """Scores near +-1e4 (one-hot maps): finite, and as close as fp32 scores allow."""
    q, k, v, qt, kt, m = make(Ds=16, Dt=16, device=backend.device, pad=0.2, scale=25.0)
    go = torch.randn(q.shape, device=backend.device)
    kw = dict(divergence=divergence, key_padding_mask=m, teacher_heads=[0, 1, 1, 0])
    a = run(backend, pykd.attention_kd, q, k, v, qt, kt, go=go, **kw)
    e = ref(reference.attention_kd, q, k, v, qt, kt, go=go, **kw)
    for x in (a[0], a[1], *a[2]):
        assert torch.isfinite(x).all()
    s = reference.attention_kd(q.double(), k.double(), v.double(), qt.double(), kt.double(), reduction="none",
                               divergence="mse_scores", teacher_heads=[0, 1, 1, 0])[1]  # fmt: skip
    s_max = (q.abs().amax() * k.abs().amax() * 4).item()  # |s| <= |q| |k| sqrt(D) / sqrt(D) * D / 4
    assert s_max > 1e3
    # An fp32 score of size s is off by up to ~s * 2^-24 * sqrt(D) (dot-product rounding): that
    # moves a KL by at most 2 eps, an (s - t)^2 by 2 |s - t| eps, and out by 2 eps max|v|.
    eps = s_max * 2.0**-24 * 4 * 4
    loss_err = 2 * eps if divergence != "mse_scores" else 2 * s.sqrt().max().item() * eps
    assert abs(a[1].item() - e[1].item()) <= loss_err + 2e-5 * abs(e[1].item())
    out_err = (a[0].double() - e[0]).abs().max().item()
    assert out_err <= 2 * eps * v.abs().max().item() + 2e-6 * e[0].abs().max().item(), out_err


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS, indirect=True)
def test_non_contiguous_layouts(backend):
    """(B, N, H, D) storage transposed to (B, H, N, D), as Hugging Face attention passes it."""
    q, k, v, qt, kt, m = make(device=backend.device, pad=0.2)
    q, k, v, qt, kt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, qt, kt))
    assert not q.is_contiguous()
    check(backend, q, k, v, qt, kt, m, divergence="mse", teacher_heads=[1, 1, 0, 0])


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS, indirect=True)
def test_only_output_or_only_loss_backward(backend):
    q, k, v, qt, kt, m = make(device=backend.device, pad=0.2)
    go = torch.randn(q.shape, device=backend.device)
    kw = dict(key_padding_mask=m, teacher_heads=[0, 1, 1, 0], causal=True)
    a = run(backend, pykd.attention_kd, q, k, v, qt, kt, go=go, loss_weight=0.0, **kw)
    e = ref(reference.attention_kd, q, k, v, qt, kt, go=go, loss_weight=0.0, **kw)
    compare(a, e, F32)
    a = run(backend, pykd.attention_divergence, q, k, None, qt, kt, **kw)
    e = ref(reference.attention_divergence, q, k, None, qt, kt, **kw)
    compare(a, e, F32)


def test_double_backward_raises():
    q, k, v, qt, kt, _ = make()
    q.requires_grad_()
    out, loss = pykd.attention_kd(q, k, v, qt, kt, teacher_heads=[0, 1, 1, 0])
    (g,) = torch.autograd.grad(loss + out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        g.sum().backward()


def test_teacher_gets_no_gradient_and_no_grad_mode(backend):
    q, k, v, qt, kt, m = make(device=backend.device)
    qt.requires_grad_(True)
    with backend():
        out, loss = pykd.attention_kd(q.requires_grad_(), k, v, qt, kt, teacher_heads=[0, 1, 0, 1])
        loss.backward()
        assert qt.grad is None and q.grad is not None
        with torch.no_grad():
            out2, loss2 = pykd.attention_kd(q, k, v, qt, kt, teacher_heads=[0, 1, 0, 1])
    assert_close(out2, out)
    assert_close(loss2, loss)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_op_without_autograd(backend, reduction):
    """attention_kd's loss op below autograd (inference mode: its composite kernel, no graph) gives the
    values of the autograd path, padded queries and rows that see no key included."""
    q, k, v, qt, kt, m = make(device=backend.device, pad=0.3)
    m[0] = False  # batch 0 sees no key: its rows don't count
    kw = dict(key_padding_mask=m, teacher_heads=[0, 1, 0, 1], reduction=reduction, divergence="mse_scores")
    with backend():
        out, loss = pykd.attention_kd(q.requires_grad_(), k, v, qt, kt, **kw)
        with torch.inference_mode():
            out2, loss2 = pykd.attention_kd(q.detach(), k, v, qt, kt, **kw)
    assert_close(out2, out.detach(), rtol=0, atol=0)
    assert_close(loss2, loss.detach(), rtol=0, atol=0)


# ------------------------------------------------------------------ attention, relation_kd


@pytest.mark.parametrize("causal", [False, True])
def test_attention(backend, causal):
    q, k, v, _, _, m = make(Nq=37, Ds=40, device=backend.device, pad=0.3)
    go = torch.randn(q.shape, device=backend.device)
    kw = dict(causal=causal, key_padding_mask=m, scale=0.2)
    a = run(backend, pykd.attention, q, k, v, go=go, **kw)
    e = ref(reference.attention, q, k, v, go=go, **kw)
    compare(a, e, F32)
    with backend():
        out, lse = pykd.attention(q, k, v, return_lse=True, **kw)
    e_out, e_lse = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)
    assert_close(out, e_out, name="out")
    assert_close(lse, e_lse, name="lse")


def test_attention_cross_lengths(backend):
    q, k, v, _, _, m = make(Nq=5, Nk=40, Hs=3, Hkv=1, device=backend.device, pad=0.5)
    go = torch.randn(q.shape, device=backend.device)
    a = run(backend, pykd.attention, q, k, v, go=go, key_padding_mask=m)
    e = ref(reference.attention, q, k, v, go=go, key_padding_mask=m)
    compare(a, e, F32)


@pytest.mark.parametrize("divergence", ["kl", "mse"])
def test_relation_kd(backend, divergence):
    B, N, R = 2, 19, 4
    xs = torch.randn(B, N, 32, device=backend.device)
    xt = torch.randn(B, N, 48, device=backend.device)
    m = torch.rand(B, N, device=backend.device) > 0.2
    leaf = xs.clone().requires_grad_(True)
    with backend():
        loss = pykd.relation_kd(leaf, xt, R, key_padding_mask=m, divergence=divergence)
        loss.backward()
    lref = xs.double().requires_grad_(True)
    e = reference.relation_kd(lref, xt.double(), R, key_padding_mask=m, divergence=divergence)
    e.backward()
    assert_close(loss, e, name="loss")
    assert_close(leaf.grad, lref.grad, name="dx")
    with backend():
        mod = pykd.nn.RelationKDLoss(R, divergence=divergence)
        total = mod([xs, xs * 2], [xt, xt], key_padding_mask=m)
        parts = [pykd.relation_kd(a, xt, R, key_padding_mask=m, divergence=divergence) for a in (xs, xs * 2)]
    assert_close(total, parts[0] + parts[1], rtol=1e-6, atol=0)


# ------------------------------------------------------------------ properties


@settings(max_examples=examples(25))  # each example runs 3 kernels twice in the interpreter
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    group=st.integers(1, 2),
    Ht=st.integers(1, 3),
    Nq=st.integers(1, 40),
    Ds=st.sampled_from([8, 16, 20, 32]),
    Dt=st.sampled_from([8, 16, 33]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    divergence=st.sampled_from(DIVS),
    causal=st.booleans(),
    pad=st.sampled_from([0.0, 0.3]),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    data=st.data(),
)
def test_property(backend, B, Hkv, group, Ht, Nq, Ds, Dt, dtype, divergence, causal, pad, temperature,
                  reduction, data):  # fmt: skip
    Hs = Hkv * group
    th = data.draw(st.lists(st.integers(0, Ht - 1), min_size=Hs, max_size=Hs))
    q, k, v, qt, kt, m = make(B=B, Hs=Hs, Hkv=Hkv, Ht=Ht, Htkv=1, Nq=Nq, Ds=Ds, Dt=Dt, dtype=dtype,
                              device=backend.device, pad=pad)  # fmt: skip
    check(backend, q, k, v, qt, kt, m, dtype=dtype, divergence=divergence, causal=causal,
          temperature=temperature, teacher_heads=th, reduction=reduction)  # fmt: skip


# ------------------------------------------------------------------ machinery


def test_outputs_poisoned_then_written(backend, monkeypatch):
    monkeypatch.setenv("PYKD_POISON_OUTPUTS", "1")
    q, k, v, qt, kt, m = make(device=backend.device, pad=0.3)
    check(backend, q, k, v, qt, kt, m, divergence="reverse_kl", causal=True, teacher_heads=[0, 1, 1, 0])
    with backend():
        out, lse = pykd.attention(q, k, v, key_padding_mask=m, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend, compiler):
    if compiler == "inductor" and backend.interpreted:
        pytest.skip("inductor codegen is backend-independent; the C++ run covers it")
    q, k, v, qt, kt, m = make(device=backend.device, pad=0.2)

    def f(q, k, v):
        out, loss = pykd.attention_kd(q * 1.5, k, v, qt, kt, key_padding_mask=m, teacher_heads=[0, 1, 1, 0],
                                      causal=True, temperature=2.0)  # fmt: skip
        return out.sum() + loss + pykd.attention(q, k, v).square().sum()

    check_compiled(backend, f, (q, k, v), compiler)


def check_compiled(backend, f, inputs, compiler="aot_eager"):
    """torch.compile(f, fullgraph=True) gives f's value and input gradients."""
    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    xa = [x.clone().requires_grad_(True) for x in inputs]
    xb = [x.clone().requires_grad_(True) for x in inputs]
    with backend():
        a = compiled(*xa)
        a.backward()
        b = f(*xb)
        b.backward()
    rtol = 1e-6 if compiler == "aot_eager" else 1e-5
    assert_close(a, b, rtol=rtol, atol=0)
    for ga, gb in zip(xa, xb):
        assert_close(ga.grad, gb.grad, rtol=rtol, atol=rtol)


def test_opcheck(backend):
    q, k, v, qt, kt, m = make(Nq=9, device=backend.device, pad=0.2)
    th = torch.tensor([0, 1, 1, 0], device=backend.device)
    ops = torch.ops.pykd
    # Registration and fake kernels are shared; the interpreter (slow) checks two divergences.
    divs = ["kl", "mse_scores"] if backend.interpreted else DIVS
    with backend():
        for div in divs:
            args = (
                q.requires_grad_(),
                k.requires_grad_(),
                v.requires_grad_(),
                qt,
                kt,
                m,
                th,
                div,
                True,
                0.3,
                0.2,
                2.0,
            )
            torch.library.opcheck(ops.attention_kd_fwd.default, args)
            out, row, lse, stats = ops.attention_kd_fwd(*args)
            # The backward op has no derivative of its own (double backward raises): constant inputs.
            bargs = (
                torch.randn_like(out),
                torch.randn_like(row),
                q.detach(),
                k.detach(),
                v.detach(),
                qt,
                kt,
                m,
                th,
                out.detach(),
                lse,
                stats,
                div,
                True,
                0.3,
                0.2,
                2.0,
            )
            torch.library.opcheck(ops.attention_kd_bwd.default, bargs)
            # the forward and its reduction in one op: each reduction, padded queries counted or not
            cases = (("mean", True), ("sum", False), ("none", True))
            for reduction, mask_queries in cases[: 1 + 2 * (div == "kl")]:
                largs = args + (None, 0, None, None, None, None, None, "none", False, reduction, mask_queries)
                torch.library.opcheck(ops.attention_kd_loss.default, largs)
        torch.library.opcheck(
            ops.attention_kd_fwd.default, (q, k, v, None, None, None, None, "none", False, 0.25, 1.0, 1.0)
        )
        torch.library.opcheck(
            ops.attention_kd_fwd.default, (q, k, None, qt, kt, None, th, "kl", False, 0.25, 0.2, 1.0)
        )


# ------------------------------------------------------------------ bad input

Q = torch.zeros(2, 4, 8, 16)
K = torch.zeros(2, 2, 8, 16)
QT = torch.zeros(2, 2, 8, 24)
KT = torch.zeros(2, 1, 8, 24)
M = torch.ones(2, 8, dtype=torch.bool)
TH = [0, 1, 1, 0]


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((Q[0], K, K, QT, KT), {}, ValueError, "q_s must be 4-D"),
        ((Q, K, K.double(), QT, KT), {}, TypeError, "v_s must be float32"),
        ((Q, K.half(), K, QT, KT), {}, TypeError, "k_s must have the dtype of q_s"),
        ((Q, K[:1], K[:1], QT, KT), {}, ValueError, "k_s must have shape"),
        ((Q, torch.zeros(2, 3, 8, 16), torch.zeros(2, 3, 8, 16), QT, KT), {}, ValueError, "k_s heads"),
        ((Q, K, K, QT[:, :, :5], KT), {}, ValueError, "sequence lengths"),
        ((Q, K, K, QT[:1], KT[:1]), {}, ValueError, "batch"),
        ((Q, K, K, torch.zeros(2, 3, 8, 24), torch.zeros(2, 2, 8, 24)), {}, ValueError, "k_t heads"),
        ((Q, K, K, QT, KT), {}, ValueError, "pass teacher_heads"),
        ((Q, K, K, QT, KT), {"teacher_heads": [0, 1]}, ValueError, "teacher_heads must have length"),
        (
            (Q, K, K, QT, KT),
            {"teacher_heads": [0, 1, 2, 0]},
            ValueError,
            r"teacher_heads values must be in \[0, 2\)",
        ),
        ((Q, K, K, QT, KT), {"teacher_heads": [0, 1, 1.0, 0]}, TypeError, "teacher_heads must hold ints"),
        (
            (Q, K, K, QT, KT),
            {"teacher_heads": torch.tensor([0, 1, -1, 0])},
            ValueError,
            "teacher_heads values",
        ),
        (
            (Q, K, K, QT, KT),
            {"teacher_heads": TH, "key_padding_mask": M.float()},
            TypeError,
            "key_padding_mask must be torch.bool",
        ),
        (
            (Q, K, K, QT, KT),
            {"teacher_heads": TH, "key_padding_mask": M[:, :5]},
            ValueError,
            r"key_padding_mask must have shape \(B, N_k\)",
        ),
        (
            (Q, K, K, QT, KT),
            {"teacher_heads": TH, "divergence": "js"},
            ValueError,
            "divergence must be one of",
        ),
        (
            (Q, K, K, QT, KT),
            {"teacher_heads": TH, "reduction": "avg"},
            ValueError,
            "reduction must be one of",
        ),
        ((Q, K, K, QT, KT), {"teacher_heads": TH, "temperature": 0.0}, ValueError, "temperature must be"),
        ((Q, K, K, QT, KT), {"teacher_heads": TH, "causal": 1}, TypeError, "causal must be a bool"),
        ((Q, K, K, QT, KT), {"teacher_heads": TH, "scale_s": float("nan")}, ValueError, "scale_s must be"),
        (
            (Q, torch.zeros(2, 2, 5, 16), torch.zeros(2, 2, 5, 16), QT[:, :, :, :], torch.zeros(2, 1, 5, 24)),
            {"teacher_heads": TH, "causal": True},
            ValueError,
            "causal=True needs N_q == N_k",
        ),
        (
            (torch.zeros(2, 4, 8, 300), torch.zeros(2, 2, 8, 300), torch.zeros(2, 2, 8, 300), QT, KT),
            {},
            ValueError,
            "head dim must be in",
        ),
    ],
)
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pykd.attention_kd(*args, **kwargs)


def test_bad_input_other_entry_points():
    with pytest.raises(ValueError, match="must divide x_s's width"):
        pykd.relation_kd(torch.zeros(2, 8, 30), torch.zeros(2, 8, 32), 4)
    with pytest.raises(ValueError, match="num_relation_heads must be >= 1"):
        pykd.relation_kd(torch.zeros(2, 8, 32), torch.zeros(2, 8, 32), 0)
    with pytest.raises(ValueError, match="x_t must have the"):
        pykd.relation_kd(torch.zeros(2, 8, 32), torch.zeros(2, 9, 32), 4)
    with pytest.raises(ValueError, match="x_s must be 3-D"):
        pykd.relation_kd(torch.zeros(8, 32), torch.zeros(8, 32), 4)
    with pytest.raises(ValueError, match="causal=True needs N_q == N_k"):
        pykd.attention(Q, torch.zeros(2, 2, 5, 16), torch.zeros(2, 2, 5, 16), causal=True)
    with pytest.raises(ValueError, match="v must have the shape of k"):
        pykd.attention(Q, K, K[:, :1])
    with pytest.raises(ValueError, match="tensors must be on one device"):
        pykd.attention_kd(Q, K, K, QT.to("meta"), KT.to("meta"), teacher_heads=TH)
    with pytest.raises(ValueError, match="student and teacher must be"):
        pykd.nn.RelationKDLoss(4)([torch.zeros(2, 8, 32)], torch.zeros(2, 8, 32))


@pytest.mark.skipif(not TRITON, reason="needs Triton (CUDA or the interpreter)")
def test_atomic_dq_mode(monkeypatch):
    """DQ_MODE "atomic": the dk/dv kernel adds dq (no dq kernel runs), within fp32 rounding of the
    split backward; under torch.use_deterministic_algorithms the split runs, bitwise as without;
    a DQ_MODE that is not a mode raises."""
    from conftest import Backend

    from pykd.kernels import attention_kd as K

    launches = []

    class Counting:  # counts the dq kernel's launches
        def __getitem__(self, grid):
            launches.append(grid)
            return dq_kernel[grid]

    dq_kernel = K._attention_kd_bwd_dq_kernel
    monkeypatch.setattr(K, "_attention_kd_bwd_dq_kernel", Counting())
    q, k, v, qt, kt, m = make(Nq=37, Ds=24, pad=0.2)  # scale 24^-0.5: rounding differs from split
    go = torch.randn(q.shape)
    kw = dict(go=go, key_padding_mask=m, teacher_heads=[0, 1, 1, 0], causal=True)
    backend = Backend("triton")

    def grads(mode, deterministic=False):
        launches.clear()
        monkeypatch.setattr(K, "DQ_MODE", mode)
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            g = run(backend, pykd.attention_kd, q, k, v, qt, kt, **kw)[2]
        finally:
            torch.use_deterministic_algorithms(was)
        return g, len(launches)

    split, n_split = grads("split")
    atomic, n_atomic = grads("atomic")
    assert (n_split, n_atomic) == (1, 0)
    scale = cancel_scale(q, k, v, go)
    for name, a, b in zip(("dq", "dk", "dv"), atomic, split):
        assert_close(a, b, name=name, scale=scale)
    if backend.interpreted:  # one tile shape for both: dk, dv come from the same sums
        assert torch.equal(atomic[1], split[1]) and torch.equal(atomic[2], split[2])
    det, n_det = grads("atomic", deterministic=True)
    assert n_det == 1 and all(torch.equal(a, b) for a, b in zip(det, split))
    monkeypatch.setattr(K, "DQ_MODE", "atomics")
    with pytest.raises(ValueError, match=r"dq mode \(PYKD_ATTENTION_DQ or .*\) must be one of"):
        run(backend, pykd.attention_kd, q, k, v, qt, kt, **kw)


@pytest.mark.skipif(not TRITON, reason="needs Triton (CUDA or the interpreter)")
@pytest.mark.parametrize("case", ["gqa_causal_padded", "bf16", "atomic_dq", "relation", "unaligned"])
def test_tma_loads(monkeypatch, case):
    """LOADS "tma": q, k, v, dO and the teacher's q, k come through tensor descriptors (the copy engine
    fills rows past N and columns past D with zeros), and every value and gradient still matches the
    reference; rows that are not 16-byte aligned (D_s = 6 fp32) load through pointers. A LOADS that is
    not a mode raises."""
    from conftest import Backend

    from pykd.kernels import attention_kd as K

    backend = Backend("triton")
    if backend.device.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90")
    monkeypatch.setattr(K, "LOADS", "tma")
    made = []
    descriptor = K._descriptor
    monkeypatch.setattr(K, "_descriptor", lambda *a: made.append(descriptor(*a)) or made[-1])
    dtype = torch.bfloat16 if case == "bf16" else F32
    Ds = 6 if case == "unaligned" else 24  # BLOCK_D 32: columns past D come from the fill
    causal = case != "bf16"  # causal needs N_q == N_k; bf16 runs cross lengths
    q, k, v, qt, kt, m = make(Nq=37, Nk=None if causal else 45, Ds=Ds, Dt=40, pad=0.2, dtype=dtype,
                              device=backend.device)  # fmt: skip
    kw = dict(teacher_heads=[0, 1, 1, 0], causal=causal)
    if case == "relation":  # divergence only: no V, no dO
        a = run(backend, pykd.attention_divergence, q, k, None, qt, kt, key_padding_mask=m, **kw)
        e = ref(reference.attention_divergence, q, k, None, qt, kt, key_padding_mask=m, **kw)
        compare(a, e, F32)
    else:
        if case == "atomic_dq":
            monkeypatch.setattr(K, "DQ_MODE", "atomic")
        check(backend, q, k, v, qt, kt, m, dtype=dtype, **kw)
    if case == "unaligned":
        assert made and None in made  # the student's q: no descriptor, pointer loads
    else:
        assert made and None not in made
        if backend.interpreted:  # 16 x 16 tiles; BLOCK_D 32 (D_s 24) and 64 (D_t 40)
            assert {tuple(d.block_shape) for d in made} == {(1, 1, 16, 32), (1, 1, 16, 64)}
    monkeypatch.setattr(K, "LOADS", "descriptor")
    with pytest.raises(ValueError, match=r"load mode \(PYKD_ATTENTION_LOADS or .*\) must be one of"):
        run(backend, pykd.attention_kd, q, k, v, qt, kt, go=torch.ones_like(q), **kw)


@pytest.mark.skipif(not TRITON, reason="needs Triton (CUDA or the interpreter)")
def test_modes_context():
    """kernels/attention_kd.modes sets DQ_MODE and LOADS for its block and restores them, also when
    the block raises; any other name is refused before anything changes."""
    from pykd.kernels import attention_kd as K

    before = (K.DQ_MODE, K.LOADS)
    with K.modes(DQ_MODE="atomic", LOADS="tma"):
        assert (K.DQ_MODE, K.LOADS) == ("atomic", "tma")
    assert (K.DQ_MODE, K.LOADS) == before
    with pytest.raises(RuntimeError, match="inside"), K.modes(LOADS="tma"):
        raise RuntimeError("inside")
    assert (K.DQ_MODE, K.LOADS) == before
    with (
        pytest.raises(TypeError, match=r"DQ_MODE and LOADS, got \['CONFIGS'\]"),
        K.modes(CONFIGS={}, LOADS="tma"),
    ):
        pass
    assert (K.DQ_MODE, K.LOADS) == before


def test_block_shapes_by_sequence_length(monkeypatch):
    """A launch takes the CONFIGS entry of the smallest listed N >= its length, past them all the
    largest's; head dims up to 64 and above share a table each; off CUDA the interpreter's."""
    from pykd.kernels import attention_kd as K

    small, large, wide = (64, 32, 4, 2), (128, 64, 8, 3), (32, 64, 4, 2)
    monkeypatch.setitem(K.CONFIGS, "fwd", {64: {1024: small, 8192: large}, 128: {8192: wide}})
    cuda = torch.device("cuda")
    got = [K._config("fwd", 64, n, cuda) for n in (1, 1024, 1025, 8192, 100_000)]
    assert got == [small, small, large, large, large]
    assert K._config("fwd", 65, 10, cuda) == K._config("fwd", 128, 10**6, cuda) == wide
    assert K._config("fwd", 64, 10, torch.device("cpu")) == K.CONFIGS["interpret"]


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["triton", "triton_atomic_dq", "triton_tma"])
def test_gpu_real_sizes(D, dtype, mode):
    """Real block shapes: N not a multiple of the tiles, GQA, causal and padding, on the GPU; with
    either dq mode of the backward, and with tensor-descriptor loads."""
    from conftest import Backend

    q, k, v, qt, kt, m = make(B=2, Hs=8, Hkv=2, Ht=4, Htkv=2, Nq=777, Ds=D, Dt=D, dtype=dtype, device="cuda",
                              pad=0.1)  # fmt: skip
    for div in DIVS:
        check(Backend(mode), q, k, v, qt, kt, m, dtype=dtype, divergence=div, causal=True,
              teacher_heads=[0, 1, 2, 3, 3, 2, 1, 0], temperature=2.0)  # fmt: skip


@pytest.mark.gpu
def test_gpu_fp32_matches():
    from conftest import Backend

    q, k, v, qt, kt, m = make(B=1, Hs=4, Hkv=4, Ht=4, Htkv=4, Nq=300, Ds=64, Dt=32, device="cuda", pad=0.1)
    check(Backend("triton"), q, k, v, qt, kt, m, divergence="kl", causal=False)


@pytest.mark.gpu
def test_gpu_cuda_graphs_capture():
    """torch.compile(mode="reduce-overhead") captures attention_kd's forward and backward in CUDA
    graphs (no graph skipped), and its replays give eager's loss and gradients."""
    from torch._dynamo.utils import counters

    q, k, v, qt, kt, m = make(B=2, Hs=4, Hkv=2, Ht=2, Htkv=1, Nq=200, Ds=64, Dt=64, device="cuda", pad=0.1)

    def step(q, k, v):
        out, loss = pykd.attention_kd(q, k, v, qt, kt, key_padding_mask=m, teacher_heads=[0, 1, 0, 1])
        return out.square().mean() + loss

    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    expected = step(*leaves)
    expected.backward()
    grads = [x.grad.clone() for x in leaves]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        for x in leaves:
            x.grad = None
        got = compiled(*leaves)
        got.backward()
        assert_close(got.detach().clone(), expected.detach(), rtol=1e-5, atol=1e-6)
        for x, g in zip(leaves, grads):
            assert_close(x.grad, g, rtol=1e-4, atol=1e-6)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
