"""Teacher attention capture (pykd.attention(..., capture=...), attention_kd(..., teacher=capture)) on
both backends against pykd.reference in float64: the captured top-k, and the tail-bucket KL's value
and gradients."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from helpers import ATTENTION_BACKENDS, assert_close, examples
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention_kd import cancel_scale, check_compiled, compare, delta_rounding, make, ref, run

import pykd
from pykd import reference

F32 = torch.float32


def capture(backend, q, k, v, kind, K=None, **kw):
    with backend():
        return pykd.attention(q, k, v, capture=kind, capture_k=K, **kw)


@pytest.mark.parametrize("causal", [False, True])
def test_topk_capture_matches_reference(backend, causal):
    q, k, v, _, _, m = make(Nq=21, device=backend.device, pad=0.3)
    out, cap = capture(backend, q, k, v, "topk", 5, causal=causal, key_padding_mask=m)
    assert cap.kind == "topk" and cap.probs.shape == (2, 4, 21, 5) and cap.indices.dtype == torch.int64
    e_p, e_i = reference.attention_capture_topk(q.double(), k.double(), 5, causal=causal, key_padding_mask=m)
    assert_close(cap.probs, e_p, name="probs")
    seen = e_p > 0  # rows with fewer than K keys have 0 probabilities at arbitrary indices
    assert torch.equal(cap.indices[seen], e_i[seen])
    assert_close(
        out, reference.attention(q.double(), k.double(), v.double(), causal=causal, key_padding_mask=m)
    )


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS, indirect=True)
@pytest.mark.parametrize("K", [1, 4, 21])
@pytest.mark.parametrize("causal", [False, True])
def test_distill_from_topk_capture(backend, K, causal):
    """KL(teacher top-K + tail || student): values and dq, dk, dv against float64 (K = N_k: no tail)."""
    q, k, v, qt, kt, m = make(Nq=21, Ds=16, Dt=16, device=backend.device, pad=0.2)
    vt = torch.randn(qt.shape[0], kt.shape[1], 21, 16, device=backend.device)
    _, cap = capture(backend, qt, kt, vt, "topk", K, causal=causal, key_padding_mask=m)
    go = torch.randn(q.shape, device=q.device)
    kw = dict(causal=causal, key_padding_mask=m, teacher_heads=[1, 0, 1, 1])
    a = run(backend, pykd.attention_kd, q, k, v, go=go, teacher=cap, **kw)
    e = ref(reference.attention_kd_topk, q, k, v, go=go, probs=cap.probs.double(), indices=cap.indices, **kw)
    u = cancel_scale(q, k, v, go)
    compare(a, e, F32, {"dq": u, "dk": u, "loss": 10.0})


def test_tail_keeps_its_digits(backend):
    """The student holds all but ~1e-30 of its mass on the teacher's K keys while the teacher leaves
    0.3 outside: log Q comes from the keys outside K, so loss and gradients stay exact."""
    B, H, N, D = 1, 2, 12, 8
    q = torch.zeros(B, H, N, D, device=backend.device)
    q[..., 0] = 1.0
    k = torch.zeros(B, H, N, D, device=backend.device)
    k[:, :, :3, 0] = 200.0  # keys 0..2 score 200 / sqrt(8) ~ 70.7 above the rest
    v = torch.randn(B, H, N, D, device=backend.device)
    probs = torch.tensor([0.3, 0.2, 0.2], device=backend.device).expand(B, H, N, 3).contiguous()
    idx = torch.tensor([0, 1, 2], device=backend.device).expand(B, H, N, 3).contiguous()
    lse = torch.zeros(B, H, N, device=backend.device)
    cap = pykd.AttentionCapture("topk", lse, False, N, 1.0, probs=probs, indices=idx)
    go = torch.randn(q.shape, device=q.device)
    a = run(backend, pykd.attention_kd, q, k, v, go=go, teacher=cap)
    e = ref(reference.attention_kd_topk, q, k, v, go=go, probs=probs.double(), indices=idx)
    assert e[1].item() > 20  # 0.3 log(0.3 / Q) with Q ~ 3e^-71: the tail dominates
    # The loss and out are exact to fp32. dq, dk: an fp32 score of size s_max (~71 here) is exact
    # only to s_max 2^-24, so each probability is exact to ~s_max ulps: atol grows with s_max.
    s_max = 200.0 / 8**0.5
    compare(a, e, F32, {n: s_max * e[2][i].abs().max().item() for i, n in enumerate(("dq", "dk"))})


def test_lse_capture_is_the_teacher(backend):
    """An "lse" capture distills exactly like passing q_t, k_t (any divergence)."""
    q, k, v, qt, kt, m = make(Nq=17, Ds=16, Dt=16, device=backend.device, pad=0.2)
    vt = torch.randn(kt.shape, device=backend.device)
    _, lse, cap = capture(backend, qt, kt, vt, "lse", key_padding_mask=m, return_lse=True)
    assert cap.kind == "lse" and torch.equal(cap.lse, lse) and cap.q is not None
    go = torch.randn(q.shape, device=q.device)
    kw = dict(key_padding_mask=m, teacher_heads=[0, 1, 1, 0], divergence="mse")
    a = run(backend, pykd.attention_kd, q, k, v, go=go, teacher=cap, **kw)
    b = run(backend, pykd.attention_kd, q, k, v, qt, kt, go=go, **kw)
    for x, y in zip((a[0], a[1], *a[2]), (b[0], b[1], *b[2])):
        assert torch.equal(x, y)


def test_quantized_student_against_capture(backend):
    """A quantized student distills from a top-k capture through its dequantized q, k."""
    spec = pykd.AttentionSpec(qk_format="int8", block_size=16)
    q, k, v, qt, kt, _ = make(Nq=20, Ds=16, Dt=16, device=backend.device)
    _, cap = capture(backend, qt, kt, torch.randn(kt.shape, device=backend.device), "topk", 4)
    go = torch.randn(q.shape, device=q.device)
    kw = dict(teacher_heads=[0, 1, 1, 0], student_spec=spec)
    a = run(backend, pykd.attention_kd, q, k, v, go=go, teacher=cap, **kw)
    e = ref(reference.attention_kd_topk, q, k, v, go=go, probs=cap.probs.double(), indices=cap.indices, **kw)
    u = cancel_scale(q, k, v, go)
    compare(a, e, F32, {"dq": u, "dk": u, "loss": 10.0})


def check_topk(backend, q, k, v, cap, *, dtype=F32, **kw):
    """attention_kd (or attention_divergence with v None) against a top-k capture, on backend,
    against the float64 reference; fp16/bf16 by the baseline criterion."""
    go = torch.randn(q.shape).to(q.dtype).to(q.device)
    fn = pykd.attention_kd if v is not None else pykd.attention_divergence
    a = run(backend, fn, q, k, v, go=go, teacher=cap, **kw)
    teacher = dict(probs=cap.probs.double(), indices=cap.indices.long())
    rfn = reference.attention_kd_topk if v is not None else partial(reference.attention_kd_topk, v_s=None)
    e = ref(rfn, q, k, v, go=go, **teacher, **kw)
    base = None
    if dtype != F32:
        cpu = {n: x.cpu() if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
        t16 = dict(probs=cap.probs.cpu().to(dtype), indices=cap.indices.long().cpu())
        base = ref(rfn, q.cpu(), k.cpu(), v.cpu() if v is not None else None,
                   go=go.cpu(), dtype=dtype, **t16, **cpu)  # fmt: skip
    scales, extra = {"loss": 10.0}, None
    if v is not None:
        u = cancel_scale(q, k, v, go)
        scales.update(dq=u, dk=u)
        if dtype != F32:
            extra = delta_rounding(q, k, v, go, kw.get("key_padding_mask"), kw.get("causal", False),
                                   kw.get("scale_s"), dtype)  # fmt: skip
    # TOL's fp32 atol holds for scores up to ~8; an fp32 score of size s_max is exact only to
    # s_max 2^-24, so each probability to ~s_max ulps: sharper maps scale atol by s_max / 8.
    kr = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    s_max = (q.double() @ kr.transpose(-1, -2)).abs().max().item() * kw.get("scale_s", q.shape[-1] ** -0.5)
    if s_max > 8.0:
        for i, name in enumerate(("out", "loss", "dq", "dk", "dv")):
            x = e[i] if i < 2 else e[2][i - 2]
            if x is not None:
                scales[name] = s_max / 8.0 * max(scales.get(name) or 0.0, x.abs().max().item())
    compare(a, e, dtype, scales, base, extra)
    return a


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_students(backend, dtype):
    """fp16/bf16 students against an fp32 capture (GQA, padding, causal)."""
    q, k, v, qt, kt, m = make(Nq=26, Ds=32, Dt=16, device=backend.device, pad=0.2)
    _, cap = capture(backend, qt, kt, torch.randn(kt.shape, device=backend.device), "topk", 6, causal=True,
                     key_padding_mask=m)  # fmt: skip
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    check_topk(backend, q, k, v, cap, dtype=dtype, causal=True, key_padding_mask=m,
               teacher_heads=[1, 0, 1, 1])  # fmt: skip


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS, indirect=True)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_divergence_only_and_int32_indices(backend, reduction):
    """attention_divergence (no V) from a capture; int32 indices give the same results as int64."""
    q, k, _, qt, kt, m = make(Nq=19, Ds=16, Dt=16, device=backend.device, pad=0.25)
    _, cap = capture(backend, qt, kt, torch.randn(kt.shape, device=backend.device), "topk", 3,
                     key_padding_mask=m)  # fmt: skip
    kw = dict(key_padding_mask=m, teacher_heads=[0, 0, 1, 1], reduction=reduction)
    a = check_topk(backend, q, k, None, cap, **kw)
    cap32 = pykd.AttentionCapture("topk", cap.lse, False, 19, cap.scale, probs=cap.probs,
                                  indices=cap.indices.int())  # fmt: skip
    b = run(backend, pykd.attention_divergence, q, k, None, teacher=cap32, **kw)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2][0], b[2][0]) and torch.equal(a[2][1], b[2][1])


def test_rows_that_count_and_poison(backend, monkeypatch):
    """Outputs start as NaN and are all written; a batch whose keys are all padded gives loss 0,
    out 0 and zero gradients; rows whose whole tail is among the K keys have no tail term."""
    monkeypatch.setenv("PYKD_POISON_OUTPUTS", "1")
    q, k, v, qt, kt, _ = make(Nq=13, Ds=16, Dt=16, device=backend.device)
    m = torch.ones(2, 13, dtype=torch.bool, device=backend.device)
    m[1] = False
    m[0, 5:] = False  # batch 0 sees 5 keys, all in the capture: K = 5, T = 0 up to rounding
    _, cap = capture(backend, qt, kt, torch.randn(kt.shape, device=backend.device), "topk", 5,
                     key_padding_mask=m)  # fmt: skip
    a = check_topk(backend, q, k, v, cap, key_padding_mask=m, teacher_heads=[1, 1, 0, 0])
    assert (a[0][1] == 0).all() and all((g[1] == 0).all() for g in a[2])


@settings(max_examples=examples(12))  # each example runs the kernels twice in the interpreter
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    group=st.integers(1, 2),
    Ht=st.integers(1, 3),
    N=st.integers(1, 40),
    K=st.integers(1, 12),
    causal=st.booleans(),
    pad=st.sampled_from([0.0, 0.3]),
    scale=st.sampled_from([1.0, 4.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    data=st.data(),
)
def test_property(backend, B, Hkv, group, Ht, N, K, causal, pad, scale, reduction, data):
    """Shapes, GQA, K up to N_k, masks and sharper maps: values and gradients."""
    Hs = Hkv * group
    K = min(K, N)
    th = data.draw(st.lists(st.integers(0, Ht - 1), min_size=Hs, max_size=Hs))
    q, k, v, qt, kt, m = make(B=B, Hs=Hs, Hkv=Hkv, Ht=Ht, Nq=N, Ds=16, Dt=8, device=backend.device, pad=pad,
                              scale=scale)  # fmt: skip
    _, cap = capture(backend, qt, kt, torch.randn(kt.shape, device=backend.device), "topk", K, causal=causal,
                     key_padding_mask=m)  # fmt: skip
    check_topk(
        backend, q, k, v, cap, causal=causal, key_padding_mask=m, teacher_heads=th, reduction=reduction
    )


def test_opcheck(backend):
    """The internal divergence "topk_kl": the capture's probs and indices in place of q_t, k_t."""
    q, k, v, qt, kt, m = make(Nq=9, Ds=16, Dt=16, device=backend.device, pad=0.2)
    _, cap = capture(backend, qt, kt, torch.randn(kt.shape, device=backend.device), "topk", 3,
                     key_padding_mask=m)  # fmt: skip
    th = torch.tensor([0, 1, 1, 0], device=backend.device)
    ops = torch.ops.pykd
    with backend():
        args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cap.probs, cap.indices, m, th,
                "topk_kl", False, 0.3, 1.0, 1.0)  # fmt: skip
        torch.library.opcheck(ops.attention_kd_fwd.default, args)
        out, row, lse, stats = ops.attention_kd_fwd(*args)
        bargs = (torch.randn_like(out), torch.randn_like(row), q.detach(), k.detach(), v.detach(), cap.probs,
                 cap.indices, m, th, out.detach(), lse, stats, "topk_kl", False, 0.3, 1.0, 1.0)  # fmt: skip
        torch.library.opcheck(ops.attention_kd_bwd.default, bargs)


@pytest.mark.parametrize("causal", [False, True])
def test_uint8_capture_matches_reference(backend, causal):
    """code_ij = round(255 exp(t_ij - max_j t_ij)): within half a code (+ fp32 rounding) of the
    float64 value, 255 at each row's largest entry, 0 where hidden."""
    q, k, v, _, _, m = make(Nq=21, device=backend.device, pad=0.3)
    _, cap = capture(backend, q, k, v, "uint8", causal=causal, key_padding_mask=m)
    assert cap.kind == "uint8" and cap.codes.dtype == torch.uint8 and cap.codes.shape == (2, 4, 21, 21)
    kr = k.double().repeat_interleave(2, 1)
    t = (q.double() @ kr.transpose(-1, -2)) / 4.0
    vis = reference._visible(2, 21, 21, causal, m, q.device).expand(t.shape)
    t = t.masked_fill(~vis, float("-inf"))
    has = vis.any(-1, keepdim=True)
    exact = 255.0 * torch.exp(t - torch.where(has, t.amax(-1, keepdim=True), 0.0))
    assert ((cap.codes.double() - exact).abs() <= 0.5 + 1e-4).all()
    assert (cap.codes[~vis] == 0).all() and (cap.codes.amax(-1)[has[..., 0]] == 255).all()
    e = reference.attention_capture_uint8(q.double(), k.double(), causal=causal, key_padding_mask=m)
    assert ((cap.codes.int() - e.int()).abs() <= 1).all()


ref_map = partial(reference.attention_kd, q_t=None, k_t=None)  # with teacher_map=<codes>


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS, indirect=True)
@pytest.mark.parametrize("divergence", ["kl", "mse"])
@pytest.mark.parametrize("causal", [False, True])
def test_distill_from_uint8_capture(backend, divergence, causal):
    """The stored map as the teacher, t = ln(code): values and gradients against float64, with
    GQA, padding, temperature, and 0 codes (a sharp teacher)."""
    q, k, v, qt, kt, m = make(Nq=23, Ds=16, Dt=16, device=backend.device, pad=0.2)
    vt = torch.randn(kt.shape, device=backend.device)
    _, cap = capture(backend, qt * 3, kt, vt, "uint8", causal=causal, key_padding_mask=m)
    assert (cap.codes == 0).any()
    go = torch.randn(q.shape, device=q.device)
    kw = dict(causal=causal, key_padding_mask=m, teacher_heads=[1, 0, 1, 1], divergence=divergence,
              temperature=2.0)  # fmt: skip
    a = run(backend, pykd.attention_kd, q, k, v, go=go, teacher=cap, **kw)
    e = ref(ref_map, q, k, v, go=go, teacher_map=cap.codes, **kw)
    u = cancel_scale(q, k, v, go)
    compare(a, e, F32, {"dq": u, "dk": u, "loss": 10.0})


def test_uint8_capture_sparse_student_and_divergence_only(backend):
    """A block-sparse student against a map (renormalized over the keys it sees), through
    attention_divergence; bf16 student."""
    q, k, _, qt, kt, m = make(Nq=40, Ds=16, Dt=16, device=backend.device, pad=0.2)
    vt = torch.randn(kt.shape, device=backend.device)
    _, cap = capture(backend, qt, kt, vt, "uint8", key_padding_mask=m)
    bm = (torch.rand(1, 4, 3, 3) < 0.6).to(backend.device)
    bm[..., 0] = True
    spec = pykd.AttentionSpec(block_mask=bm, block_size=16)
    kw = dict(key_padding_mask=m, teacher_heads=[0, 1, 1, 0], student_spec=spec)
    a = run(backend, pykd.attention_divergence, q, k, None, teacher=cap, **kw)
    e = ref(partial(ref_map, v_s=None), q, k, None, teacher_map=cap.codes, **kw)
    compare(a, e, F32, {"loss": 10.0})
    qb, kb = q.bfloat16(), k.bfloat16()
    a = run(backend, pykd.attention_divergence, qb, kb, None, teacher=cap, **kw)
    e = ref(partial(ref_map, v_s=None), qb, kb, None, teacher_map=cap.codes, **kw)
    kw_cpu = dict(
        kw, key_padding_mask=m.cpu(), student_spec=pykd.AttentionSpec(block_mask=bm.cpu(), block_size=16)
    )
    base = ref(partial(ref_map, v_s=None), qb.cpu(), kb.cpu(), None,
               teacher_map=cap.codes.cpu(), dtype=torch.bfloat16, **kw_cpu)  # fmt: skip
    compare(a, e, torch.bfloat16, {"loss": 10.0}, base)


def test_uint8_opcheck(backend):
    q, k, v, qt, kt, m = make(Nq=9, Ds=16, Dt=16, device=backend.device, pad=0.2)
    vt = torch.randn(kt.shape, device=backend.device)
    _, cap = capture(backend, qt, kt, vt, "uint8", key_padding_mask=m)
    th = torch.tensor([0, 1, 1, 0], device=backend.device)
    ops = torch.ops.pykd
    none = (None, 0, None, None, None, None, None, "none")
    with backend():
        qkv = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_())
        args = (*qkv, cap.codes, None, m, th, "kl", False, 0.3, 1.0, 2.0, *none, True)
        torch.library.opcheck(ops.attention_kd_fwd.default, args)
        out, row, lse, stats = ops.attention_kd_fwd(*args)
        grads = (torch.randn_like(out), torch.randn_like(row))
        bargs = (*grads, q.detach(), k.detach(), v.detach(), cap.codes, None, m, th, out.detach(), lse, stats,
                 "kl", False, 0.3, 1.0, 2.0, None, 0, None, False, None, None, None, None, True)  # fmt: skip
        torch.library.opcheck(ops.attention_kd_bwd.default, bargs)


def test_compile_fullgraph(backend):
    q, k, v, qt, kt, _ = make(Nq=20, Ds=16, Dt=16, device=backend.device)
    _, cap = capture(backend, qt, kt, torch.randn(kt.shape, device=backend.device), "topk", 3)

    def f(q, k, v):
        out, loss = pykd.attention_kd(q, k, v, teacher=cap, teacher_heads=[0, 1, 1, 0])
        return out.sum() + loss

    check_compiled(backend, f, (q, k, v))


def test_bad_input():
    q, k, v, qt, kt, _ = make(Nq=10)
    _, cap = pykd.attention(qt, kt, torch.zeros_like(kt), capture="topk", capture_k=3)
    with pytest.raises(ValueError, match="capture must be one of"):
        pykd.attention(q, k, v, capture="probs")
    with pytest.raises(ValueError, match=r"capture_k in \[1, N_k=10\]"):
        pykd.attention(q, k, v, capture="topk", capture_k=11)
    with pytest.raises(ValueError, match=r"capture_k in \[1"):
        pykd.attention(q, k, v, capture="topk")
    with pytest.raises(ValueError, match="capture_k needs"):
        pykd.attention(q, k, v, capture_k=3)
    with pytest.raises(ValueError, match='capture_k is for capture="topk"'):
        pykd.attention(q, k, v, capture="uint8", capture_k=3)
    _, cap8 = pykd.attention(qt, kt, torch.zeros_like(kt), capture="uint8")
    with pytest.raises(ValueError, match='divergence "kl" or "mse"'):
        pykd.attention_kd(q, k, v, teacher=cap8, divergence="reverse_kl", teacher_heads=[0, 1, 1, 0])
    with pytest.raises(ValueError, match=r"codes of shape \(B, H_t, N_q, N_k\)"):
        bad8 = pykd.AttentionCapture("uint8", cap8.lse, False, 10, 1.0, codes=cap8.codes[..., :9])
        pykd.attention_kd(q, k, v, teacher=bad8, teacher_heads=[0, 1, 1, 0])
    with pytest.raises(TypeError, match="uint8 codes"):
        bad8 = pykd.AttentionCapture("uint8", cap8.lse, False, 10, 1.0, codes=cap8.codes.float())
        pykd.attention_kd(q, k, v, teacher=bad8, teacher_heads=[0, 1, 1, 0])
    with pytest.raises(ValueError, match="spec must be None"):
        pykd.attention(q, k, v, capture="lse", spec=pykd.AttentionSpec(topk=2))
    with pytest.raises(TypeError, match="teacher must be a pykd.AttentionCapture"):
        pykd.attention_kd(q, k, v, teacher=(qt, kt))
    with pytest.raises(TypeError, match="needs the teacher"):
        pykd.attention_kd(q, k, v)
    with pytest.raises(ValueError, match="not both"):
        pykd.attention_kd(q, k, v, qt, kt, teacher=cap)
    with pytest.raises(ValueError, match='divergence="kl" only'):
        pykd.attention_kd(q, k, v, teacher=cap, divergence="mse", teacher_heads=[0, 1, 1, 0])
    with pytest.raises(ValueError, match="temperature 1"):
        pykd.attention_kd(q, k, v, teacher=cap, temperature=2.0, teacher_heads=[0, 1, 1, 0])
    with pytest.raises(ValueError, match="causal=False"):
        pykd.attention_kd(q, k, v, teacher=cap, causal=True, teacher_heads=[0, 1, 1, 0])
    with pytest.raises(ValueError, match="sparse student"):
        pykd.attention_kd(
            q, k, v, teacher=cap, teacher_heads=[0, 1, 1, 0], student_spec=pykd.AttentionSpec(topk=2)
        )
    with pytest.raises(ValueError, match="does not match"):
        pykd.attention_kd(q[:, :, :5], k, v, teacher=cap, teacher_heads=[0, 1, 1, 0])
    with pytest.raises(ValueError, match="teacher_heads"):
        pykd.attention_kd(q, k, v, teacher=cap)
    kw = dict(teacher_heads=[0, 1, 1, 0])

    def bad(**fields):
        return pykd.AttentionCapture("topk", cap.lse, False, 10, cap.scale, **{"probs": cap.probs,
                                     "indices": cap.indices, **fields})  # fmt: skip

    with pytest.raises(TypeError, match="float probs"):
        pykd.attention_kd(q, k, v, teacher=bad(probs=cap.indices), **kw)
    with pytest.raises(TypeError, match="int32/int64 indices"):
        pykd.attention_kd(q, k, v, teacher=bad(indices=cap.probs), **kw)
    with pytest.raises(ValueError, match=r"shape \(B, H_t, N_q, K\)"):
        pykd.attention_kd(q, k, v, teacher=bad(indices=cap.indices[..., :2]), **kw)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, N_k=10\), got 10"):
        pykd.attention_kd(q, k, v, teacher=bad(indices=cap.indices + 10 - cap.indices.max()), **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_real_sizes(D):
    """Real tiles on the GPU: a bf16 GQA student, causal with padding, distilled from a K = 32
    capture of a teacher with another head count; N not a multiple of the tiles."""
    from conftest import Backend

    cuda = Backend("triton")
    q, k, v, qt, kt, m = make(B=2, Hs=8, Hkv=2, Ht=4, Htkv=2, Nq=300, Ds=D, Dt=D, device="cuda", pad=0.1)
    _, cap = capture(cuda, qt, kt, torch.randn(kt.shape, device="cuda"), "topk", 32, causal=True,
                     key_padding_mask=m)  # fmt: skip
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    check_topk(cuda, q, k, v, cap, dtype=torch.bfloat16, causal=True, key_padding_mask=m,
               teacher_heads=[0, 1, 2, 3, 3, 2, 1, 0])  # fmt: skip
