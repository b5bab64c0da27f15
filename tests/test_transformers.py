"""pykd.integrations.transformers: attn_implementation="pykd" against sdpa, and AttentionDistiller
against the same losses computed from eager attention maps (output_attentions)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, assert_close_abs

transformers = pytest.importorskip("transformers")

import pykd  # noqa: E402
from pykd.integrations import transformers as hf  # noqa: E402

hf.register()


def bert(layers=2, hidden=64, heads=4, impl="pykd", seed=0):
    cfg = transformers.BertConfig(
        vocab_size=97, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=64, attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0, attn_implementation=impl,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def llama(impl="pykd", seed=0):
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=64, attn_implementation=impl,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def padded_batch(B=3, N=13, left=False):
    ids = torch.randint(1, 97, (B, N))
    mask = torch.ones(B, N, dtype=torch.long)
    for b, n_pad in enumerate([0, 4, 9][:B]):
        if n_pad:
            if left:
                mask[b, :n_pad] = 0
            else:
                mask[b, N - n_pad :] = 0
    return ids, mask


def _same_weights(a, b):
    b.load_state_dict(a.state_dict())
    return b


@pytest.mark.parametrize("with_padding", [True, False])
def test_bert_matches_sdpa(backend, with_padding):
    ids, mask = padded_batch()
    if not with_padding:
        mask = torch.ones_like(mask)
    dev = backend.device
    ids, mask = ids.to(dev), mask.to(dev)
    ref = bert(impl="sdpa").to(dev)
    model = _same_weights(ref, bert(impl="pykd").to(dev))
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        with backend():
            got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert_close(got[real], expected[real], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("left", [False, True])
def test_llama_matches_sdpa(backend, left):
    """Causal, GQA (4 query heads over 2 KV heads), padded batch."""
    ids, mask = padded_batch(left=left)
    dev = backend.device
    ids, mask = ids.to(dev), mask.to(dev)
    ref = llama(impl="sdpa").to(dev)
    model = _same_weights(ref, llama(impl="pykd").to(dev))
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        with backend():
            got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close(got[real], expected[real], atol=2e-5, rtol=2e-5)


def test_llama_generate_matches_sdpa():
    """Decoding with a KV cache: one new query over all cached keys."""
    ids = torch.randint(1, 97, (2, 7))
    ref = llama(impl="sdpa")
    model = _same_weights(ref, llama(impl="pykd"))
    a = ref.generate(ids, max_new_tokens=5, do_sample=False)
    b = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def test_training_gradients_match_sdpa():
    ids, mask = padded_batch()
    ref = bert(impl="sdpa").train()
    model = _same_weights(ref, bert(impl="pykd")).train()
    r = torch.randn(*ids.shape, 64) * mask[..., None]  # a random cotangent on the real tokens
    for m in (ref, model):
        out = m(input_ids=ids, attention_mask=mask).last_hidden_state
        (out * r).sum().backward()
    # key biases have an exactly-zero gradient (softmax ignores a per-query constant): measure
    # every error against the largest gradient entry of the model
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, scale=scale, name=name)


def test_attention_dropout_is_refused():
    model = bert(impl="pykd").train()
    model.config.attention_probs_dropout_prob = 0.1
    for layer in hf.attention_layers(model):
        layer.dropout.p = 0.1
    with pytest.raises(ValueError, match="no attention dropout"):
        model(input_ids=torch.randint(1, 97, (1, 5)))


def test_unsupported_mask_pattern_raises():
    cfg = transformers.MistralConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, sliding_window=4, attn_implementation="pykd",
    )  # fmt: skip
    model = transformers.MistralForCausalLM(cfg).eval()
    with pytest.raises(NotImplementedError, match="sliding window"):
        model(input_ids=torch.randint(1, 97, (1, 9)))


# ------------------------------------------------------------------ distillation


def _eager_maps(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    return out.attentions


def _kl_rows(p_t, p_s, mask):
    """Mean over (batch, head, real query) rows of KL(p_t || p_s), from materialized maps."""
    kl = torch.where(p_t > 0, p_t * (p_t.clamp_min(1e-30).log() - p_s.clamp_min(1e-30).log()), 0.0).sum(-1)
    rows = mask.bool()[:, None, :].expand_as(kl)
    return kl[rows].mean()


@pytest.mark.parametrize("layer_map", ["last", "uniform", {0: 1, 1: 2}])
def test_distiller_matches_eager_maps(layer_map):
    teacher = bert(layers=4, hidden=64, heads=4, seed=1)
    student = bert(layers=2, hidden=32, heads=4, seed=2).train()  # D_s = 8, D_t = 16
    ids, mask = padded_batch()
    distiller = hf.AttentionDistiller(student, teacher, layer_map=layer_map)
    with distiller.teacher_pass():
        teacher(input_ids=ids, attention_mask=mask)
    with distiller.student_pass() as losses:
        student(input_ids=ids, attention_mask=mask)
    losses.attention.backward()
    got_grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in student.parameters()]

    # the same loss from eager maps
    pairs = hf.make_layer_map(layer_map, 2, 4)
    eager_t = _same_weights(teacher, bert(layers=4, hidden=64, heads=4, impl="eager"))
    eager_s = _same_weights(student, bert(layers=2, hidden=32, heads=4, impl="eager")).train()
    with torch.no_grad():
        maps_t = _eager_maps(eager_t, ids, mask)
    maps_s = _eager_maps(eager_s, ids, mask)
    expected = sum(_kl_rows(maps_t[t], maps_s[s], mask) for s, t in pairs.items())
    expected.backward()
    exp_grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in eager_s.parameters()]
    assert losses.layers == len(pairs)
    # a KL of near-equal maps is a small difference of O(1) terms: absolute fp32 error ~1e-8
    assert_close_abs(losses.attention, expected, rtol=1e-5, atol=1e-7)
    assert len(got_grads) == len(exp_grads)
    scale = max(e.abs().max().item() for e in exp_grads)
    for a, e in zip(got_grads, exp_grads):
        assert_close(a, e, rtol=1e-4, atol=1e-5, scale=scale)


def test_distiller_relations():
    """Relation KD of the mapped layers' q/k/v equals pykd.relation_kd on the same tensors."""
    teacher = bert(layers=2, hidden=64, heads=4, seed=1)
    student = bert(layers=2, hidden=32, heads=2, seed=2)
    ids, mask = padded_batch()
    distiller = hf.AttentionDistiller(student, teacher, layer_map="last", divergence=None, relation_heads=4)
    captured = {}

    def hook(name):
        def f(module, args, out):
            captured[name] = out.detach()

        return f

    layers_t, layers_s = hf.attention_layers(teacher), hf.attention_layers(student)
    handles = [
        getattr(layers_t[-1], p).register_forward_hook(hook("t" + p)) for p in ("query", "key", "value")
    ]
    handles += [
        getattr(layers_s[-1], p).register_forward_hook(hook("s" + p)) for p in ("query", "key", "value")
    ]
    with distiller.teacher_pass():
        teacher(input_ids=ids, attention_mask=mask)
    with distiller.student_pass() as losses:
        student(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    m = mask.bool()
    expected = sum(
        pykd.relation_kd(captured["s" + p], captured["t" + p], 4, key_padding_mask=m)
        for p in ("query", "key", "value")
    )
    assert_close_abs(losses.relation, expected, rtol=1e-5, atol=1e-7)


def _dist_worker(tmp_path, wrap):
    import os
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(__file__), "attention_dist_worker.py")
    launch = [sys.executable]
    if wrap != "none":
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    path = str(tmp_path / f"{wrap}.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*launch, worker, "--wrap", wrap, "--out", path], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=180)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(path)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_distiller_under_ddp_and_fsdp2(tmp_path, wrap):
    """Attention-map and relation KD alone (no loss uses the output) under DDP and FSDP2, two gloo
    processes: with ``losses.total(output)`` the gradients equal one process's on the whole batch.
    (Measured without the tie: DDP left them un-averaged, about 50% off; FSDP2's backward read freed
    weights.)"""
    one = _dist_worker(tmp_path, "none")
    two = _dist_worker(tmp_path, wrap)
    assert two["world"] == 2
    for key in ("query", "key0", "embed"):
        assert one[key].abs().max() > 1e-5, key
        assert_close(two[key], one[key], rtol=1e-4, atol=1e-9, name=key)


def test_losses_total_is_the_sum_and_ties_to_the_output():
    teacher, student = bert(layers=2, hidden=64, heads=4, seed=1), bert(layers=2, hidden=32, heads=4, seed=2)
    ids, mask = padded_batch()
    distiller = hf.AttentionDistiller(student, teacher, layer_map="last", relation_heads=4)
    with distiller.teacher_pass():
        teacher(input_ids=ids, attention_mask=mask)
    with distiller.student_pass() as losses:
        out = student(input_ids=ids, attention_mask=mask)
    out.last_hidden_state[0, 0, 0] = float("inf")  # a zero-weight tie must not turn this into NaN
    total = losses.total(out)
    assert torch.equal(total, losses.attention + losses.relation)
    assert total.grad_fn is not None and torch.isfinite(total)
    q = hf.attention_layers(student)[-1].query.weight
    (g_tied,) = torch.autograd.grad(total, q, retain_graph=True)
    (g_sum,) = torch.autograd.grad(losses.attention + losses.relation, q)
    assert torch.equal(g_tied, g_sum)


def test_distiller_with_gradient_checkpointing():
    teacher = bert(layers=2, hidden=64, heads=4, seed=1)
    ids, mask = padded_batch()
    grads = []
    for ckpt in (False, True):
        student = bert(layers=2, hidden=32, heads=4, seed=2).train()
        if ckpt:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        distiller = hf.AttentionDistiller(student, teacher, layer_map="uniform", relation_heads=2)
        with distiller.teacher_pass():
            teacher(input_ids=ids, attention_mask=mask)
        with distiller.student_pass() as losses:
            out = student(input_ids=ids, attention_mask=mask).last_hidden_state
        (losses.attention + losses.relation + out.pow(2).mean()).backward()
        grads.append([p.grad.clone() for p in student.parameters()])
    for a, b in zip(*grads):
        assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_distiller_bad_input():
    teacher = bert(layers=4, seed=1)
    student = bert(layers=2, seed=2)
    with pytest.raises(ValueError, match="out of range"):
        hf.AttentionDistiller(student, teacher, layer_map={2: 0})
    with pytest.raises(ValueError, match="out of range"):
        hf.AttentionDistiller(student, teacher, layer_map={0: 4})
    with pytest.raises(ValueError, match="multiple"):
        hf.AttentionDistiller(bert(layers=3), teacher, layer_map="uniform")
    with pytest.raises(ValueError, match="layer_map must be"):
        hf.AttentionDistiller(student, teacher, layer_map="first")
    with pytest.raises(ValueError, match="attn_implementation='pykd'"):
        hf.AttentionDistiller(student, bert(layers=4, impl="sdpa"))
    with pytest.raises(ValueError, match="no attention modules"):
        hf.AttentionDistiller(torch.nn.Linear(2, 2), teacher)
    student2 = bert(layers=2, heads=2, seed=3)  # 2 heads against the teacher's 4, no teacher_heads
    d = hf.AttentionDistiller(student2, teacher)
    ids = torch.randint(1, 97, (1, 5))
    with d.teacher_pass():
        teacher(input_ids=ids)
    with pytest.raises(ValueError, match="teacher_heads"):
        with d.student_pass():
            student2(input_ids=ids)
    with pytest.raises(RuntimeError, match="teacher_pass"):
        with d.student_pass():
            pass


# ------------------------------------------------------------------ sparse / quantized students


def _window_int8(n_q, n_k, device):
    """A length-dependent spec: 16-token blocks, neighbours only, int8 Q/K."""
    bm = pykd.masks.sliding_window(n_q, 8, block_size=16, device=device)
    return pykd.AttentionSpec(block_mask=bm, block_size=16, qk_format="int8")


def _reference_attention(spec_fn):
    """transformers attention function running pykd.reference.attention (float64) under spec_fn."""

    def fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
        spec = spec_fn(query.shape[2], key.shape[2], query.device)
        out = pykd.reference.attention(query.double(), key.double(), value.double(), causal=causal,
                                       key_padding_mask=attention_mask, scale=scaling, spec=spec)  # fmt: skip
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return fn


def test_set_attention_spec_matches_reference(backend):
    """A model whose layers run a sliding-window, int8 spec equals the same model with each layer's
    attention computed by pykd.reference under that spec (one layer: its q, k are the same inputs
    in both, so the int8 codes are too)."""
    interface, masks_interface, _ = hf._transformers()
    interface.register("pykd_reference_spec", _reference_attention(_window_int8))
    masks_interface.register("pykd_reference_spec", hf.padding_mask)
    ids, mask = padded_batch(N=40)
    dev = backend.device
    ids, mask = ids.to(dev), mask.to(dev)
    ref = bert(layers=1, impl="pykd_reference_spec").to(dev)
    model = _same_weights(ref, bert(layers=1, impl="pykd").to(dev))
    hf.set_attention_spec(model, _window_int8)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        with backend():
            got = model(input_ids=ids, attention_mask=mask).last_hidden_state
            hf.set_attention_spec(model, None)
            dense = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert_close(got[real], expected[real], atol=2e-5, rtol=2e-5)
    assert (got[real] - dense[real]).abs().max() > 1e-3  # the spec changed the attention
    with pytest.raises(TypeError, match="spec must be a pykd.AttentionSpec"):
        hf.set_attention_spec(model, "int8")


def test_distiller_with_quantized_student():
    """The student's mapped layers run attention_kd with the student's spec: an all-True block mask
    gives the dense losses exactly; int8 Q/K gives a finite, different loss with gradients."""
    teacher = bert(layers=2, hidden=64, heads=4, seed=1)
    student = bert(layers=2, hidden=32, heads=4, seed=2).train()
    ids, mask = padded_batch(N=20)
    distiller = hf.AttentionDistiller(student, teacher, layer_map="uniform")
    losses = {}
    for name, spec in [
        ("dense", None),
        (
            "all_blocks",
            pykd.AttentionSpec(block_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool), block_size=16),
        ),
        ("int8", pykd.AttentionSpec(qk_format="int8", pv_format="fp8_e4m3", block_size=16)),
    ]:
        hf.set_attention_spec(student, spec)
        student.zero_grad()
        with distiller.teacher_pass():
            teacher(input_ids=ids, attention_mask=mask)
        with distiller.student_pass() as out:
            student(input_ids=ids, attention_mask=mask)
        out.attention.backward()
        losses[name] = out.attention.item()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in student.parameters())
    assert losses["all_blocks"] == losses["dense"]
    assert (
        losses["int8"] != losses["dense"] and abs(losses["int8"] - losses["dense"]) < 0.05 * losses["dense"]
    )


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_compiled_training_step(arch):
    """torch.compile of a model running attn_implementation="pykd" (q.transpose(1, 2) layouts,
    padding masks): a training step's loss and gradients equal eager's."""
    ids, mask = padded_batch()
    models = [bert() if arch == "bert" else llama() for _ in range(2)]
    _same_weights(models[0], models[1])

    def step(model):
        model.train()
        out = model(input_ids=ids, attention_mask=mask)
        h = out.last_hidden_state if arch == "bert" else out.logits
        loss = (h.float().square() * mask[..., None]).mean()
        loss.backward()
        return loss.detach()

    eager = step(models[0])
    import torch._functorch.config
    import torch._inductor.config

    # inductor checks every custom op's output strides against its fake kernel; compile afresh
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        got = step(torch.compile(models[1]))
    assert_close(got, eager, rtol=1e-5, atol=0)
    # atol against the largest gradient: some are 0 up to rounding (a key bias cannot move a softmax)
    scale = max(p.grad.abs().max().item() for p in models[0].parameters())
    for (name, a), b in zip(models[1].named_parameters(), models[0].parameters()):
        assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, scale=scale, name=name)
