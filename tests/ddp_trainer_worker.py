"""One DistillationTrainer step under torchrun (gloo, CPU) or in one process; writes the student's
updated lm_head and embeddings to --out (rank 0). tests/test_llm.py::test_trainer_ddp_matches_one_process
compares a 2-process run with a 1-process run of the same global batch."""

from __future__ import annotations

import argparse
import os

import torch
import transformers

from pykd.integrations.transformers import DistillationConfig, DistillationTrainer


def tiny(vocab, layers, seed):
    """A tiny Llama-style causal LM (tests/test_llm.py uses it too)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(cfg)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--per-device", type=int, required=True)
    args = p.parse_args()
    V = 80
    teacher, student = tiny(V, 2, 0), tiny(V, 1, 1)
    g = torch.Generator().manual_seed(2)
    data = [{"input_ids": torch.randint(0, V, (n,), generator=g)} for n in (9, 6, 12, 4)]
    cfg = DistillationConfig(
        output_dir=os.path.join(os.path.dirname(args.out), "trainer"),
        max_steps=1,
        per_device_train_batch_size=args.per_device,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        ddp_find_unused_parameters=False,
        kd_temperature=2.0,
        kd_alpha=0.7,
    )
    DistillationTrainer(model=student, args=cfg, teacher_model=teacher, train_dataset=data).train()
    if int(os.environ.get("RANK", "0")) == 0:
        weights = {"lm_head": student.lm_head.weight, "embed": student.model.embed_tokens.weight}
        world = int(os.environ.get("WORLD_SIZE", "1"))
        torch.save({**{k: w.detach() for k, w in weights.items()}, "world": world}, args.out)


if __name__ == "__main__":
    main()
