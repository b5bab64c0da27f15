"""One DistillationTrainer step under torchrun (gloo, CPU: DDP, or HF's FSDP2 launch) or in one process;
writes the student's updated lm_head and embeddings (or, with --shard-lm-head, their gradients) to --out
(rank 0). tests/test_llm.py compares 2-process runs with a 1-process run of the same global batch."""

from __future__ import annotations

import argparse
import os
import sys

import torch
import transformers

from pykd.data import collate
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
    p.add_argument("--fsdp", action="store_true", help="HF's FSDP2 launch (decoder layers + root)")
    p.add_argument("--shard-lm-head", action="store_true",
                   help="no train(): fully_shard the decoder layers, the lm_head and the root by hand, "
                        "and write the gradients of one compute_loss + backward")  # fmt: skip
    args = p.parse_args()
    V = 80
    teacher, student = tiny(V, 2, 0), tiny(V, 1, 1)
    g = torch.Generator().manual_seed(2)
    data = [{"input_ids": torch.randint(0, V, (n,), generator=g)} for n in (9, 6, 12, 4)]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = {}
    if args.fsdp:
        fsdp = dict(
            fsdp="full_shard",
            fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        )
    if args.shard_lm_head and world > 1:
        from torch.distributed.fsdp import fully_shard

        torch.distributed.init_process_group("gloo")
        for layer in student.model.layers:
            fully_shard(layer)
        fully_shard(student.lm_head)  # its own unit: resharded right after its forward
        fully_shard(student)
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
        **fsdp,
    )
    tr = DistillationTrainer(model=student, args=cfg, teacher_model=teacher, train_dataset=data)
    if args.shard_lm_head:  # one accumulated batch: this rank's share, the global token count
        rank = int(os.environ.get("RANK", "0"))
        batch = collate(data[rank * args.per_device : (rank + 1) * args.per_device])
        n_items = sum(len(d["input_ids"]) - 1 for d in data)
        tr.compute_loss(student, batch, num_items_in_batch=n_items).backward()
    else:
        tr.train()
    # read after the step: FSDP swaps the registered parameters between sharded and unsharded
    weights = {"lm_head": student.lm_head.weight, "embed": student.model.embed_tokens.weight}
    if args.shard_lm_head:
        weights = {k: w.grad for k, w in weights.items()}
    save_and_exit(weights, args.out)


def save_and_exit(tensors: dict, out: str) -> None:
    """Rank 0 saves the (DTensors gathered) tensors and the world size to `out`; a distributed run
    then leaves every rank cleanly."""
    tensors = {k: t.full_tensor() if hasattr(t, "full_tensor") else t for k, t in tensors.items()}
    if int(os.environ.get("RANK", "0")) == 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        torch.save({**{k: t.detach() for k, t in tensors.items()}, "world": world}, out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        # gloo's background threads can still std::terminate at interpreter teardown (seen once under
        # load): not what the tests check, so the ranks leave without it once their work is written
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
