"""pykd.nn.DistillationLoss: each part against its definition, the weighted total, and bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

import pykd
from pykd import reference


def _hidden(B=3, N=7, Hs=12, Ht=12):
    hs = torch.randn(B, N, Hs, requires_grad=True)
    ht = torch.randn(B, N, Ht)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 2:] = False
    return hs, ht, mask


def test_logit_part_is_kd_loss():
    s, t = torch.randn(5, 11, requires_grad=True), torch.randn(5, 11)
    y = torch.randint(0, 11, (5,))
    loss = pykd.nn.DistillationLoss(kd_options=dict(temperature=2.0, alpha=0.3))
    total, parts = loss(student_logits=s, teacher_logits=t, target=y)
    expected = reference.kd_loss(s.double(), t.double(), y, temperature=2.0, alpha=0.3)
    assert_close(total, expected, atol=1e-6)
    assert set(parts) == {"logit"} and not parts["logit"].requires_grad
    total.backward()
    assert s.grad is not None


def test_fused_logit_part():
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(13, 8)
    ht, wt = torch.randn(6, 5), torch.randn(13, 5)
    loss = pykd.nn.DistillationLoss(kd_options=dict(divergence="jsd"))
    total, _ = loss(student_lm_head=(h, w), teacher_lm_head=(ht, wt))
    expected = pykd.kd_loss(h @ w.t(), ht @ wt.t(), divergence="jsd")
    assert_close(total, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mse", "cosine", "pooled_cosine"])
def test_hidden_part(kind):
    hs, ht, mask = _hidden()
    loss = pykd.nn.DistillationLoss(logit_weight=0, hidden_weight=2.0, hidden_loss=kind)
    total, parts = loss(student_hidden=hs, teacher_hidden=ht, hidden_mask=mask)
    m = mask
    if kind == "mse":
        expected = ((hs - ht).pow(2).mean(-1))[m].mean()
    elif kind == "cosine":
        expected = (1 - torch.nn.functional.cosine_similarity(hs, ht, dim=-1))[m].mean()
    else:
        ps = torch.stack([hs[b][m[b]].mean(0) for b in range(3)])
        pt = torch.stack([ht[b][m[b]].mean(0) for b in range(3)])
        expected = (1 - torch.nn.functional.cosine_similarity(ps, pt, dim=-1)).mean()
    assert_close(parts["hidden"], expected, rtol=1e-5, atol=1e-6)
    assert_close(total, 2 * expected, rtol=1e-5, atol=1e-6)


def test_hidden_projection_and_layer_lists():
    hs, ht, mask = _hidden(Hs=6, Ht=10)
    loss = pykd.nn.DistillationLoss(
        logit_weight=0, hidden_weight=1.0, student_hidden_size=6, teacher_hidden_size=10
    )
    assert isinstance(loss.projection, torch.nn.Linear)
    total, _ = loss(student_hidden=[hs, hs], teacher_hidden=[ht, ht * 2], hidden_mask=mask)
    p = loss.projection(hs)
    expected = 0.5 * (((p - ht).pow(2).mean(-1))[mask].mean() + ((p - 2 * ht).pow(2).mean(-1))[mask].mean())
    assert_close(total, expected, rtol=1e-5, atol=1e-6)
    total.backward()
    assert loss.projection.weight.grad is not None and hs.grad is not None


def test_weighted_total_and_parts():
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    hs, ht, mask = _hidden()
    att, rel = torch.tensor(0.25), torch.tensor(1.5)
    loss = pykd.nn.DistillationLoss(
        logit_weight=0.5, hidden_weight=3.0, attention_weight=2.0, relation_weight=0.1
    )
    inputs = dict(student_hidden=hs, teacher_hidden=ht, hidden_mask=mask)
    inputs.update(attention_loss=att, relation_loss=rel)
    total, parts = loss(student_logits=s, teacher_logits=t, **inputs)
    assert set(parts) == {"logit", "hidden", "attention", "relation"}
    expected = 0.5 * parts["logit"] + 3.0 * parts["hidden"] + 2.0 * 0.25 + 0.1 * 1.5
    assert_close(total, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "ctor,call,match",
    [
        (dict(logit_weight=-1.0), {}, "logit_weight must be a finite number in \\[0.0, inf\\]"),
        (dict(hidden_loss="l1"), {}, "hidden_loss must be one of"),
        (dict(kd_options=dict(divergence="kld")), {}, "divergence"),
        (dict(student_hidden_size=4), {}, "give both"),
        (dict(), dict(student_logits=torch.zeros(2, 3)), "needs student_logits and teacher_logits"),
        (dict(logit_weight=0, hidden_weight=1.0), {}, "needs student_hidden and teacher_hidden"),
        (dict(logit_weight=0, attention_weight=1.0), {}, "needs attention_loss"),
        (dict(logit_weight=0), {}, "every weight is 0"),
        (
            dict(logit_weight=0, hidden_weight=1.0),
            dict(student_hidden=torch.zeros(2, 3, 4), teacher_hidden=torch.zeros(2, 3, 5)),
            "student_hidden_size and teacher_hidden_size",
        ),
        (
            dict(logit_weight=0, hidden_weight=1.0),
            dict(student_hidden=[torch.zeros(2, 3, 4)], teacher_hidden=[]),
            "equal-length",
        ),
    ],
)
def test_bad_input(ctor, call, match):
    with pytest.raises(ValueError, match=match):
        pykd.nn.DistillationLoss(**ctor)(**call)
