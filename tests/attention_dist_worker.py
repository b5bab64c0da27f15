"""AttentionDistiller (attention maps + MiniLMv2 relations) with the student under DDP or FSDP2
(``fully_shard`` per encoder layer and the root), gloo on CPU under torchrun, or in one process: two
steps of ``losses.total(output).backward()``; writes the student's gradients (rank 0).
tests/test_transformers.py compares 2-process runs with one process on the whole batch."""

from __future__ import annotations

import argparse
import os

import torch
import transformers
from ddp_trainer_worker import save_and_exit

from pykd.integrations import transformers as hf

hf.register()


def bert(hidden, heads, seed):
    cfg = transformers.BertConfig(
        vocab_size=97,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
        attn_implementation="pykd",
    )
    torch.manual_seed(seed)
    return transformers.BertModel(cfg, add_pooling_layer=False)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--wrap", choices=("none", "ddp", "fsdp"), default="none")
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    teacher, student = bert(64, 4, 1).eval(), bert(32, 4, 2)
    ids = torch.randint(1, 97, (4, 13), generator=torch.Generator().manual_seed(3))
    distiller = hf.AttentionDistiller(
        student, teacher, layer_map="uniform", divergence="kl", relation_heads=4
    )
    model = student
    if args.wrap != "none":
        torch.distributed.init_process_group("gloo")
        if args.wrap == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(student)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in student.encoder.layer:
                fully_shard(layer)
            fully_shard(student)
    share = ids[rank * 4 // world : (rank + 1) * 4 // world]  # equal shares: the ranks' means average
    for _ in range(2):  # a second step: DDP and FSDP leave no state behind that breaks the next one
        student.zero_grad()
        with distiller.teacher_pass():
            teacher(input_ids=share)
        with distiller.student_pass() as losses:
            out = model(input_ids=share)
        losses.total(out).backward()
    grads = {
        "query": student.encoder.layer[1].attention.self.query.weight.grad,
        "key0": student.encoder.layer[0].attention.self.key.weight.grad,
        "embed": student.embeddings.word_embeddings.weight.grad,
    }
    save_and_exit(grads, args.out)


if __name__ == "__main__":
    main()
