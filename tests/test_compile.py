"""Every public op under torch.compile(fullgraph=True), as models call them: contiguous, transposed
(Hugging Face's q.transpose(1, 2)), expanded and sliced inputs, with dynamic=False and dynamic=True
over two shapes each. The compiled value and input gradients must equal the eager op's. The full
matrix runs with the cheap aot_eager backend on C++ (fake kernels and real kernels must agree on
every output's strides); inductor runs one non-contiguous layout per op, and the Triton backend the
transposed layout under dynamic shapes."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

import pykd

LAYOUTS = ("contiguous", "transposed", "expanded", "sliced")


@pytest.fixture(autouse=True)
def no_compile_caches():
    """Compile afresh: a graph cached from another version of pykd's fake kernels would hide a
    stride mismatch (the caches key on the graph, not on the fake kernels' code)."""
    import torch._functorch.config
    import torch._inductor.config

    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        yield


def view(base: torch.Tensor, layout: str, shape) -> torch.Tensor:
    """A tensor of `shape` in `layout`, as a differentiable view of a leaf `base` (made by leaf())."""
    if layout == "transposed":
        return base.transpose(-2, -3) if len(shape) == 4 else base.transpose(-1, -2)
    if layout == "expanded":
        return base.expand(shape)
    if layout == "sliced":
        return base[..., : shape[-1]]
    return base


def leaf(layout: str, shape, scale=1.0) -> torch.Tensor:
    """The leaf that view() turns into a `shape` tensor in `layout`."""
    if layout == "transposed":
        s = list(shape)
        if len(s) == 4:  # (B, H, N, D) from (B, N, H, D)
            s[1], s[2] = s[2], s[1]
        else:
            s[-1], s[-2] = s[-2], s[-1]
        x = torch.randn(s)
    elif layout == "expanded":
        x = torch.randn((1,) + tuple(shape[1:]))
    elif layout == "sliced":
        x = torch.randn(tuple(shape[:-1]) + (shape[-1] + 3,))
    else:
        x = torch.randn(shape)
    return (x * scale).requires_grad_(True)


def logits_ops(R, V, layout):
    """(op name, f(*leaves), leaves) for the logit ops at R rows, V vocabulary."""
    K, H = 5, 8
    t = view(leaf(layout, (R, V), 2.0), layout, (R, V)).detach()
    lp, idx = torch.log_softmax(t, -1).topk(K, -1)
    y = torch.randint(0, V, (R,))
    ht, wt = torch.randn(R, 6), torch.randn(V + 3, 6)  # a padded teacher vocabulary
    s = leaf(layout, (R, V), 2.0)
    h, w = leaf(layout, (R, H)), leaf("contiguous", (V, H))
    cap = dict(logit_softcap=5.0, logit_scale=0.9)  # the LLM options trace too
    return [
        ("kd_loss", lambda s: pykd.kd_loss(view(s, layout, (R, V)), t, y, temperature=2.0), [s]),
        ("topk_kd_loss", lambda s: pykd.topk_kd_loss(view(s, layout, (R, V)), lp, idx, y, **cap), [s]),
        ("fused_linear_kd_loss",
         lambda h, w: pykd.fused_linear_kd_loss(view(h, layout, (R, H)), w, ht, wt, y, **cap), [h, w]),
        ("fused_linear_topk_kd_loss",
         lambda h, w: pykd.fused_linear_topk_kd_loss(view(h, layout, (R, H)), w, lp, idx, y,
                                                     teacher_vocab_size=V + 3), [h, w]),
    ]  # fmt: skip


def attention_ops(B, N, layout):
    """The attention ops at batch B, length N, in `layout` (student q, k, v)."""
    H, D, Dt = 2, 16, 8
    shp = (B, H, N, D)
    qt, kt = torch.randn(B, H, N, Dt), torch.randn(B, H, N, Dt)
    q, k, v = (leaf(layout, shp) for _ in range(3))
    xs, xt = leaf(layout, (B, N, 12)), torch.randn(B, N, 18)
    bm = torch.ones(1, 1, -(-N // 16), -(-N // 16), dtype=torch.bool)
    bm[..., 0, -1] = False

    def qkv(q, k, v):
        return view(q, layout, shp), view(k, layout, shp), view(v, layout, shp)

    return [
        ("attention", lambda q, k, v: pykd.attention(*qkv(q, k, v), causal=True).square().sum(), [q, k, v]),
        ("attention_kd", lambda q, k, v: _out_and_loss(pykd.attention_kd(*qkv(q, k, v), qt, kt)), [q, k, v]),
        ("attention_divergence", lambda q, k, v: pykd.attention_divergence(*qkv(q, k, v)[:2], qt, kt),
         [q, k, v]),
        ("relation_kd", lambda x: pykd.relation_kd(view(x, layout, (B, N, 12)), xt, 2), [xs]),
        ("sparse_attention",
         lambda q, k, v: pykd.sparse_attention(*qkv(q, k, v), block_mask=bm, block_size=16).square().sum(),
         [q, k, v]),
        ("quantized_attention",
         lambda q, k, v: pykd.quantized_attention(*qkv(q, k, v), block_size=16).square().sum(), [q, k, v]),
    ]  # fmt: skip


def _out_and_loss(pair):
    out, loss = pair
    return out.square().sum() + loss


def cases(size: int, layout: str):
    return logits_ops(3 + size, 37 + 11 * size, layout) + attention_ops(1 + size, 19 + 14 * size, layout)


OPS = [name for name, _, _ in cases(0, "contiguous")]


def check(backend, name, layout, dynamic, compiler="aot_eager"):
    for size in (0, 1):  # two shapes (each case closes over its own constants: one compile each)
        torch.manual_seed(size)
        (f, leaves) = next((f, xs) for n, f, xs in cases(size, layout) if n == name)
        compiled = torch.compile(f, fullgraph=True, dynamic=dynamic, backend=compiler)
        a_in = [x.detach().clone().requires_grad_(True) for x in leaves]
        b_in = [x.detach().clone().requires_grad_(True) for x in leaves]
        with backend():
            a = compiled(*a_in)
            a.backward()
            b = f(*b_in)
            b.backward()
        assert_close(a, b, rtol=1e-5, atol=1e-6, name=f"{name} value")
        for i, (ga, gb) in enumerate(zip(a_in, b_in)):
            assert (ga.grad is None) == (gb.grad is None)
            if gb.grad is not None:
                assert_close(ga.grad, gb.grad, rtol=1e-5, atol=1e-6, name=f"{name} grad {i}")


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", OPS)
def test_compile_layouts(name, layout, dynamic):
    from conftest import Backend

    torch._dynamo.reset()
    check(Backend("cpp"), name, layout, dynamic)


@pytest.mark.parametrize("name", OPS)
def test_compile_triton_backend(backend, name):
    """The Triton kernels' outputs have the strides the fake kernels promise (transposed inputs,
    dynamic shapes)."""
    if backend.name != "triton":
        pytest.skip("test_compile_layouts covers C++")
    torch._dynamo.reset()
    check(backend, name, "transposed", True)


@pytest.mark.parametrize("name", OPS)
def test_compile_inductor(name):
    from conftest import Backend

    torch._dynamo.reset()
    check(Backend("cpp"), name, "transposed", False, compiler="inductor")


@pytest.mark.parametrize("op", ["attention", "attention_kd"])
def test_inductor_one_transposed_input_for_q_k_v(op):
    """Hugging Face's pattern: q, k and v are views of one transposed tensor. Inductor then hands
    the backward op a non-contiguous q and checks its outputs against the fake kernel's strides."""
    torch._dynamo.reset()
    x = torch.randn(2, 8, 2, 16, requires_grad=True)
    qt, kt = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)

    def f(x):
        y = x.transpose(1, 2)
        if op == "attention":
            return pykd.attention(y, y, y).sum()
        out, loss = pykd.attention_kd(y, y, y, qt, kt)
        return out.sum() + loss

    xa, xb = x.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    a = torch.compile(f, fullgraph=True)(xa)
    a.backward()
    b = f(xb)
    b.backward()
    assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)


def test_opcheck_non_contiguous_inputs():
    """The custom ops themselves, called with transposed (non-contiguous) tensors: schema, fake
    kernel (strides included), autograd registration and dispatch all agree."""
    ops = torch.ops.pykd
    q, k, v = (torch.randn(2, 9, 3, 16).transpose(1, 2).requires_grad_() for _ in range(3))  # HF layout
    assert not q.is_contiguous()
    qt, kt = torch.randn(2, 9, 3, 8).transpose(1, 2), torch.randn(2, 9, 3, 8).transpose(1, 2)
    args = (q, k, v, qt, kt, None, None, "kl", True, 0.25, 0.35, 2.0)
    torch.library.opcheck(ops.attention_kd_fwd.default, args)
    s = torch.randn(17, 5).t().requires_grad_()  # (5, 17), column-major
    t = torch.randn(17, 5).t()
    torch.library.opcheck(
        ops.kd_loss_fwd.default,
        (s, t, None, None, "kl", 2.0, 1.0, 0.5, -100, True, [1.0, 0.0, 1.0, 0.0], "mean", True),
    )
