"""Teacher attention capture (pykd.attention(..., capture=...), attention_kd(..., teacher=capture)) on
both backends against pykd.reference in float64: the captured top-k, and the tail-bucket KL's value
and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from test_attention_kd import cancel_scale, check_compiled, compare, make, ref, run

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
    compare(a, e, F32)


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
