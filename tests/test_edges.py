"""Edges: empty inputs give empty results with empty gradients (both backends), options outside
the range the fp32 kernels serve are refused with an error naming the argument, before any kernel
runs. See docs/robustness.md."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import assert_close, grad_of

import pykd
from pykd import reference


def _logit_case(op, R, dev, V=11, K=3, H=5):
    """(f(leaf) -> loss, leaf values, ref(leaf64) -> loss) for a row-loss op with R rows on dev."""
    t = torch.randn(R, V)
    lp, idx = torch.log_softmax(t, -1).topk(K, -1)
    ht, wt, w = torch.randn(R, H), torch.randn(V, H), torch.randn(V, H)
    d = {k: v.to(dev) for k, v in dict(t=t, lp=lp, idx=idx, ht=ht, wt=wt, w=w).items()}
    cases = {
        "kd_loss": (lambda s, **o: pykd.kd_loss(s, d["t"], **o), torch.randn(R, V),
                    lambda s, **o: reference.kd_loss(s, t.double(), **o)),
        "topk_kd_loss": (lambda s, **o: pykd.topk_kd_loss(s, d["lp"], d["idx"], **o), torch.randn(R, V),
                         lambda s, **o: reference.topk_kd_loss(s, lp.double(), idx, **o)),
        "fused_linear_kd_loss": (
            lambda h, **o: pykd.fused_linear_kd_loss(h, d["w"], d["ht"], d["wt"], **o), torch.randn(R, H),
            lambda h, **o: reference.fused_linear_kd_loss(h, w.double(), ht.double(), wt.double(), **o)),
        "fused_linear_topk_kd_loss": (
            lambda h, **o: pykd.fused_linear_topk_kd_loss(h, d["w"], d["lp"], d["idx"], **o),
            torch.randn(R, H),
            lambda h, **o: reference.fused_linear_topk_kd_loss(h, w.double(), lp.double(), idx, **o)),
    }  # fmt: skip
    return cases[op]


LOGIT_OPS = ["kd_loss", "topk_kd_loss", "fused_linear_kd_loss", "fused_linear_topk_kd_loss"]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("op", LOGIT_OPS)
def test_zero_rows(backend, op, reduction):
    f, x, ref = _logit_case(op, 0, backend.device)
    leaf = x.to(backend.device).requires_grad_(True)
    with backend():
        loss = f(leaf, reduction=reduction)
        loss.sum().backward()
    want = ref(x.double(), reduction=reduction)
    assert loss.shape == want.shape and torch.equal(loss.cpu().double(), want)
    assert leaf.grad is not None and leaf.grad.shape == x.shape


def test_attention_empty_sequence(backend):
    q = torch.randn(1, 2, 0, 8, device=backend.device, requires_grad=True)
    with backend():
        out = pykd.attention(q, q, q)
        out.sum().backward()
    assert out.shape == (1, 2, 0, 8) and q.grad.shape == q.shape


@pytest.mark.parametrize("T", [1e-5, 101.0, float("nan"), float("inf")])
def test_temperature_range(T):
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    q = torch.randn(1, 1, 3, 4)
    for call in (lambda: pykd.kd_loss(s, t, temperature=T),
                 lambda: pykd.topk_kd_loss(s, *torch.log_softmax(t, -1).topk(2, -1), temperature=T),
                 lambda: pykd.attention_kd(q, q, q, q, q, temperature=T)):  # fmt: skip
        with pytest.raises(ValueError, match="temperature"):
            call()


@pytest.mark.parametrize("T", [1e-4, 100.0])
def test_temperature_range_ends_are_served(T):
    """At both ends of the accepted range the fp32 loss keeps its digits (docs/robustness.md)."""
    s, t = torch.randn(16, 300) * 3, torch.randn(16, 300) * 3
    got = pykd.kd_loss(s, t, temperature=T)
    want = reference.kd_loss(s.double(), t.double(), temperature=T)
    assert_close(got, want, rtol=1e-3, atol=0)


@pytest.mark.parametrize("n", [torch.tensor(0), torch.tensor(-3), torch.tensor(float("nan")), 1e-50, 0.0])
def test_num_items_in_batch_must_be_positive(n):
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        pykd.kd_loss(s, t, num_items_in_batch=n)


def test_integers_must_fit_int64():
    s, t, y = torch.randn(2, 5), torch.randn(2, 5), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        pykd.kd_loss(s, t, y, ignore_index=2**70)
    h, w = torch.randn(2, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="chunk_size must fit in int64"):
        pykd.fused_linear_kd_loss(h, w, h, w, chunk_size=2**64)


@pytest.mark.parametrize("X,R", [(600, 2), (0, 2), (6, 4)])
def test_relation_heads_name_the_argument(X, R):
    with pytest.raises(ValueError, match="num_relation_heads"):
        pykd.relation_kd(torch.randn(1, 4, X), torch.randn(1, 4, X), R)


def test_distillation_loss_takes_numpy_weights():
    loss = pykd.nn.DistillationLoss(logit_weight=np.float32(0.5), hidden_weight=np.float64(0.25))
    assert loss.weights["logit"] == 0.5 and loss.weights["hidden"] == 0.25
    with pytest.raises(ValueError, match="logit_weight"):
        pykd.nn.DistillationLoss(logit_weight=float("nan"))


@pytest.mark.parametrize("q,k", [((1, 1, 0, 8), (1, 1, 0, 8)), ((1, 1, 4, 8), (1, 1, 4, 6)),
                                 ((2, 1, 4, 8), (1, 1, 4, 8))])  # fmt: skip
def test_topk_blocks_bad_shapes(q, k):
    with pytest.raises(ValueError, match="q"):
        pykd.masks.topk_blocks(torch.randn(q), torch.randn(k), 1, block_size=2)


# --- the CPU kernels' results depend neither on the thread count nor on the caller's autocast


def _attention_grads(threads, autocast):
    torch.manual_seed(0)
    # one (batch, head) of 3 query tiles: the backward may split its tiles among threads
    q, k, v = (torch.randn(1, 1, 150, 16, requires_grad=True) for _ in range(3))
    qt, kt = torch.randn(1, 1, 150, 8), torch.randn(1, 1, 150, 8)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, loss = pykd.attention_kd(q, k, v, qt, kt, causal=True)
            (out.square().sum() + loss).backward()
    finally:
        torch.set_num_threads(old)
    return [out.detach(), loss.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("autocast", [False, True])
def test_attention_bitwise_across_threads_and_autocast(autocast):
    ref = _attention_grads(1, False)
    for threads in (1, 2):
        got = _attention_grads(threads, autocast)
        for name, a, b in zip(("out", "loss", "dq", "dk", "dv"), got, ref):
            assert a.dtype == torch.float32, name
            assert torch.equal(a, b), f"{name} differs with {threads} threads, autocast={autocast}"


def test_fused_linear_ignores_autocast():
    torch.manual_seed(0)
    h, w = torch.randn(9, 16), torch.randn(40, 16)
    ht, wt = torch.randn(9, 12), torch.randn(40, 12)
    plain = pykd.fused_linear_kd_loss(h, w, ht, wt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = pykd.fused_linear_kd_loss(h, w, ht, wt)
    assert auto.dtype == torch.float32 and torch.equal(auto, plain)


# --- user-built captures are checked before they reach a kernel


def _topk_capture(probs, idx, N_k=6):
    B, H, N, K = probs.shape
    return pykd.AttentionCapture("topk", torch.zeros(B, H, N), False, N_k, 1.0, probs=probs, indices=idx)


def _student(N=3, N_k=6):
    return torch.randn(1, 1, N, 4), torch.randn(1, 1, N_k, 4), torch.randn(1, 1, N_k, 4)


@pytest.mark.parametrize(
    "probs,idx,match",
    [
        ([0.5, 0.3], [1, 1], "distinct"),  # a key counted twice: a negative KL
        ([-0.1, 0.3], [0, 1], "probabilities"),
        ([float("nan"), 0.3], [0, 1], "probabilities"),
        ([0.8, 0.7], [0, 1], "probabilities"),  # sums above 1
    ],
)
def test_bad_topk_capture(probs, idx, match):
    p = torch.tensor(probs).expand(1, 1, 3, 2).contiguous()
    i = torch.tensor(idx).expand(1, 1, 3, 2).contiguous()
    with pytest.raises(ValueError, match=match):
        pykd.attention_kd(*_student(), teacher=_topk_capture(p, i))


def test_topk_capture_zero_probability_entries_may_repeat():
    p = torch.tensor([0.6, 0.0, 0.0]).expand(1, 1, 3, 3).contiguous()
    i = torch.tensor([2, 0, 0]).expand(1, 1, 3, 3).contiguous()
    _, loss = pykd.attention_kd(*_student(), teacher=_topk_capture(p, i))
    assert torch.isfinite(loss)


def test_unknown_capture_kind_and_empty_uint8_rows():
    cap = _topk_capture(torch.full((1, 1, 3, 2), 0.4), torch.tensor([0, 1]).expand(1, 1, 3, 2).contiguous())
    cap = dataclasses.replace(cap, kind="top-k")
    with pytest.raises(ValueError, match="teacher.kind"):
        pykd.attention_kd(*_student(), teacher=cap)
    codes = torch.randint(1, 256, (1, 1, 3, 6), dtype=torch.uint8)
    codes[0, 0, 1] = 0  # a row that sees keys but holds no probability
    cap = pykd.AttentionCapture("uint8", torch.zeros(1, 1, 3), False, 6, 1.0, codes=codes)
    with pytest.raises(ValueError, match="nonzero code"):
        pykd.attention_kd(*_student(), teacher=cap)


def test_uint8_capture_without_keys():
    q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 0, 4), torch.randn(1, 1, 0, 4)
    out, cap = pykd.attention(q, k, v, capture="uint8")
    assert cap.codes.shape == (1, 1, 3, 0) and torch.equal(out, torch.zeros(1, 1, 3, 4))


def test_meta_tensors_with_a_capture():
    """Shape inference on the meta device never reads values (no .item() on a meta tensor)."""
    q, k, v = (torch.empty(1, 2, 5, 8, device="meta") for _ in range(3))
    cap = pykd.AttentionCapture("topk", torch.empty(1, 2, 5, device="meta"), False, 5, 1.0,
                                probs=torch.empty(1, 2, 5, 3, device="meta"),
                                indices=torch.empty(1, 2, 5, 3, dtype=torch.long, device="meta"))  # fmt: skip
    out, loss = pykd.attention_kd(q, k, v, teacher=cap)
    assert out.shape == (1, 2, 5, 8) and out.device.type == "meta" and loss.shape == ()


# --- item 7 of issue 15: tail=False renormalizes the teacher without absorbing log(sum) into a huge lp


def test_topk_renormalization_at_huge_logprobs(backend):
    V, K = 40, 6
    s = torch.randn(4, V)
    idx = torch.stack([torch.randperm(V)[:K] for _ in range(4)])
    lp = torch.log_softmax(torch.randn(4, K), -1)
    lp[0] = -1e30  # all equal: the renormalized teacher is uniform, as float64 says
    lp[1] = torch.tensor([-1e30, -1e30, -1e30, -2e30, -3e30, -1e30])
    lp[2] = lp[2] - 1e4  # a constant shift changes nothing after renormalization
    with backend():
        (got, got_g) = grad_of(lambda x: pykd.topk_kd_loss(x, lp, idx, tail=False, reduction="none"), s)
    want, want_g = grad_of(
        lambda x: reference.topk_kd_loss(x, lp.double(), idx, tail=False, reduction="none"), s.double()
    )
    assert_close(got, want, dtype=torch.float32, name="loss")
    assert_close(got_g, want_g, dtype=torch.float32, name="grad")


# --- item 8 of issue 15: which logits layouts the row losses read in place (docs/robustness.md)

_LAYOUTS = {  # name: (make (R, V) logits, read in place?)
    "contiguous": (lambda R, V: torch.randn(R, V), True),
    "row slice": (lambda R, V: torch.randn(R, V + 5)[:, :V], True),
    "expanded rows": (lambda R, V: torch.randn(1, V).expand(R, V), True),
    "transposed": (lambda R, V: torch.randn(V, R).t(), False),
}


@pytest.mark.parametrize("layout", list(_LAYOUTS))
@pytest.mark.parametrize("op", ["kd_loss", "topk_kd_loss"])
def test_logits_layouts(backend, op, layout):
    """Each layout gives the reference's values and gradients; unit-stride vocabularies are read in
    place (no aten::clone of the logits), others are copied once (peak 2x one logits tensor)."""
    from torch.profiler import ProfilerActivity, profile

    R, V = 6, 37
    make, in_place = _LAYOUTS[layout]
    s = make(R, V).requires_grad_(True)
    t = make(R, V)
    lp, idx = torch.log_softmax(torch.randn(R, V), -1).topk(5, -1)
    if op == "kd_loss":
        f = lambda x, T, **o: pykd.kd_loss(x, T, **o)  # noqa: E731
        ref = lambda x, T: reference.kd_loss(x, T.double(), reduction="none")  # noqa: E731
    else:
        f = lambda x, T, **o: pykd.topk_kd_loss(x, lp, idx, **o)  # noqa: E731
        ref = lambda x, T: reference.topk_kd_loss(x, lp.double(), idx, reduction="none")  # noqa: E731
    with backend(), profile(activities=[ProfilerActivity.CPU]) as prof:
        got = f(s, t, reduction="none")
    copies = [e for e in prof.events() if e.name == "aten::clone"]
    assert (not copies) == in_place, [e.name for e in copies]
    with backend():
        got.sum().backward()
    leaf = s.detach().double().requires_grad_(True)
    want = ref(leaf, t)
    want.sum().backward()
    assert_close(got, want, dtype=torch.float32, name="loss")
    assert_close(s.grad, leaf.grad, dtype=torch.float32, name="grad")
