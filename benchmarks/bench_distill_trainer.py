"""Benchmark of pykd's DistillationTrainer (online teacher): one training step's peak memory and time
against the same Trainer computing the KD loss on materialized logits.

Providers: ``pykd`` (``DistillationTrainer.training_step``: both models' final hidden states and
lm_head weights through ``fused_linear_kd_loss``; no (tokens x vocabulary) logits); ``eager`` (a
``transformers.Trainer`` whose ``compute_loss`` takes both models' logits from their forward and
computes ``alpha T^2 KL + (1 - alpha) CE`` with log_softmax, as users write it). Same tiny
Llama-style models (student 2 layers, teacher 4, vocabulary 32000), batch, options and loss. One
step = forward + backward (the optimizer step is the same for both and not timed). Memory is the
peak above what was allocated before the step (CPU: in a fresh process, after a warm-up step).

    python benchmarks/bench_distill_trainer.py             # CPU, fp32: batch 4 x seq 512, V 32000
    python benchmarks/bench_distill_trainer.py --device cuda --dtype bfloat16
    pykd bench distill_trainer --quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

from pykd.benchmarks.common import Recorder, device_name, fresh_process_peak_mb, peak_extra_mb, wall_ms

ALPHA, T = 0.5, 2.0


def models(V: int, dtype: torch.dtype, device: torch.device):
    import transformers  # noqa: PLC0415

    def llama(hidden, layers, seed):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=4096)  # fmt: skip
        return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)

    return llama(256, 2, 1), llama(384, 4, 0).requires_grad_(False).eval()


def make_trainer(provider: str, student, teacher, device: torch.device):
    import transformers  # noqa: PLC0415

    from pykd.integrations.transformers import DistillationConfig, DistillationTrainer  # noqa: PLC0415

    common = dict(
        output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=device.type == "cpu", save_strategy="no"
    )
    if provider == "pykd":
        args = DistillationConfig(kd_temperature=T, kd_alpha=ALPHA, **common)
        return DistillationTrainer(model=student, args=args, teacher_model=teacher, train_dataset=[{}])

    class MaterializedKDTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            s = model(**inputs).logits.float()
            with torch.no_grad():
                t = teacher(**inputs).logits.float()
            V = s.shape[-1]
            target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1).reshape(-1)
            s, t = s.reshape(-1, V), t.reshape(-1, V)
            counted = target != -100
            ls, lt = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
            kl = (lt.exp() * (lt - ls)).sum(-1)
            ce = torch.nn.functional.cross_entropy(s, target, reduction="none")
            n = num_items_in_batch if num_items_in_batch is not None else counted.sum()
            return ((ALPHA * T * T * kl + (1 - ALPHA) * ce) * counted).sum() / n

    args = transformers.TrainingArguments(**common)
    return MaterializedKDTrainer(model=student, args=args, train_dataset=[{}])


def setup(provider: str, B: int, N: int, V: int, dtype: torch.dtype, device: torch.device):
    student, teacher = models(V, dtype, device)
    tr = make_trainer(provider, student, teacher, device)
    ids = torch.randint(0, V, (B, N), device=device, generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    n_items = torch.tensor(B * (N - 1), device=device)
    student.train()

    def step():
        tr.training_step(student, dict(batch), num_items_in_batch=n_items)

    return step


def child_memory(argv: list[str]) -> None:
    provider, B, N, V, dtype = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), getattr(torch, argv[4])
    step = setup(provider, B, N, V, dtype, torch.device("cpu"))
    step()  # warm-up: the gradients and the trainer's state exist before the measured step
    print(f"peak_mb {peak_extra_mb(step, torch.device('cpu')):.3f}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-memory":
        child_memory(argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=None, help="default 512 (--quick: 64)")
    p.add_argument("--vocab", type=int, default=None, help="default 32000 (--quick: 4096)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="a smoke run: batch 2 x seq 64, V 4096")
    args = p.parse_args(argv)
    try:
        import transformers  # noqa: F401, PLC0415
    except ImportError:
        print("distill_trainer: skipped, it needs transformers and accelerate (pip install 'pykd[llm]')")
        return
    if args.quick:
        args.batch = 2
    args.seq = args.seq or (64 if args.quick else 512)
    args.vocab = args.vocab or (4096 if args.quick else 32000)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rec = Recorder("distill_trainer", device, args.dtype, "seq", [])
    for provider in ("pykd", "eager"):
        step = setup(provider, args.batch, args.seq, args.vocab, dtype, device)
        step()  # warm-up
        rec.add(provider, "full", "time", "ms", args.seq, wall_ms(step, device, reps=args.reps))
        if device.type == "cpu":
            mb = fresh_process_peak_mb("pykd.benchmarks.bench_distill_trainer",
                                       [provider, args.batch, args.seq, args.vocab, args.dtype])  # fmt: skip
        else:
            mb = peak_extra_mb(step, device)
        rec.add(provider, "full", "memory", "MB", args.seq, mb)
        del step
    peak = {r["provider"]: float(r["median"]) for r in rec.rows if r["metric"] == "memory"}
    print(f"peak memory pykd / eager: {peak['pykd'] / peak['eager']:.3f} (target <= 0.3)")
    out = f"{args.out_dir}/{device_name(device)}"
    print("wrote", *rec.write(out, "distill_trainer" + ("_quick" if args.quick else "")))


if __name__ == "__main__":
    main()
