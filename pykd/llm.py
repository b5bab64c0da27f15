"""LLM distillation from the command line: ``pykd cache-teacher`` (a causal LM's top-k log-probs into a
:class:`pykd.data.TeacherCache`) and ``pykd distill-lm`` (train a student with
:class:`pykd.integrations.transformers.DistillationTrainer`, online or from a cache, and report
held-out KL and perplexity before and after).

Data: ``--data FILE.jsonl`` (one object per line with ``"text"`` or ``"input_ids"``) or ``--corpus
stdlib`` (the docstring sentences of the installed standard library, as ``pykd distill`` uses), tokenized,
joined with the tokenizer's end-of-text token and cut into sequences of ``--seq-len`` tokens, in a
deterministic order. Models load from local directories with ``trust_remote_code`` off unless
``--trust-remote-code`` is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time

import torch

from . import data as kd_data
from . import fused_linear_kd_loss, reference
from .benchmarks.common import commit, device_name, peak_extra_mb

# ------------------------------------------------------------------------------ lm_head


def check_lm_head(model, who: str):
    """The nn.Linear lm_head of a causal LM (its ``get_output_embeddings()``); a ValueError otherwise."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{who} must be a causal LM whose get_output_embeddings() is an nn.Linear lm_head")
    return head


def logit_map_of(model, who: str) -> tuple[float | None, float]:
    """(logit_softcap, logit_scale) with which ``model`` turns its lm_head output z into logits,
    f(z) = c tanh(a z / c) or a z (the fused ops' options): from the config fields the transformers
    families use (Gemma-2/3 ``final_logit_softcapping``, Cohere ``logit_scale``, Granite
    ``logits_scaling`` = 1 / a), then verified on one short forward (the model's logits against f of
    its lm_head's output, one pass): a model that post-processes its logits otherwise is refused."""
    head = check_lm_head(model, who)
    cfg = getattr(model, "config", None)
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    scale = 1.0 if scale is None else float(scale)
    granite = getattr(cfg, "logits_scaling", None)
    if granite is not None:
        scale = scale / float(granite)
    cap = None if cap is None else float(cap)
    vocab = head.out_features
    device = head.weight.device
    if device.type == "meta":
        return cap, scale
    probe = (torch.arange(8, device=device) * 7919 % vocab)[None]
    seen = {}

    def keep(module, args, out):
        seen["z"] = out

    handle = head.register_forward_hook(keep)
    try:
        with torch.no_grad():
            logits = model(input_ids=probe).logits
    finally:
        handle.remove()
    want = reference.logit_map(seen["z"].float(), cap, scale)
    got = logits.float()
    # a few roundings of the lm_head's output dtype (the model may compute the map in it)
    tol = 8 * torch.finfo(seen["z"].dtype).eps * (1.0 + float(got.abs().max()))
    if got.shape != want.shape or float((got - want).abs().max()) > tol:
        raise ValueError(
            f"{who}'s logits are not f(hidden @ lm_head.T) with logit_softcap={cap}, logit_scale={scale} "
            "(read from its config): it post-processes its logits in a way pykd's fused losses do not know"
        )
    return cap, scale


def logit_options(student_map, teacher_map) -> dict:
    """The fused ops' ``logit_softcap`` / ``logit_scale`` (student, teacher) pairs from two
    (softcap, scale) maps, as :func:`logit_map_of` gives them."""
    (s_cap, s_scale), (t_cap, t_scale) = student_map, teacher_map
    return dict(logit_softcap=(s_cap, t_cap), logit_scale=(s_scale, t_scale))


class LMHeadTap:
    """Within ``with LMHeadTap(head) as tap: model(...)``, ``head`` (an lm_head nn.Linear) is handed
    zero rows, so the model computes no logits, and ``tap.hidden`` holds the (B, T, H) hidden states
    it was given (with their autograd graph)."""

    def __init__(self, head: torch.nn.Module):
        self.head, self.hidden, self._handle = head, None, None

    def _pre(self, module, args):
        self.hidden = args[0]
        return (args[0][..., :0, :],)

    def __enter__(self):
        self.hidden = None
        self._handle = self.head.register_forward_pre_hook(self._pre)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def call_head(head: torch.nn.Module, hidden: torch.Tensor, loss_fn):
    """``loss_fn(hidden, head.weight, head.bias)`` run as ``head``'s forward, through the module's
    call: the hooks FSDP (and any other wrapper) put on the lm_head run around it, so its weight is
    unsharded there and its gradient is reduced after backward, however the model was wrapped."""
    own = head.__dict__.get("forward")  # an instance-level forward (a wrapper's patch) is restored
    head.forward = lambda h: loss_fn(h, head.weight, head.bias)
    try:
        return head(hidden)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def shift_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B, T) labels as a causal LM takes them -> (B * T,) targets of each position's logits: the
    next position's label, ``ignore_index`` at the last position."""
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], 1).reshape(-1)


# ------------------------------------------------------------------------------ data


def token_sequences(tok, *, data: str | None, corpus: str | None, seq_len: int) -> list[torch.Tensor]:
    """The job's token stream cut into (seq_len,) int64 sequences (module docstring)."""
    if (data is None) == (corpus is None):
        raise SystemExit("give exactly one of --data FILE.jsonl or --corpus stdlib")
    if seq_len < 2:
        raise SystemExit(f"--seq-len must be >= 2, got {seq_len}")
    sep = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    stream: list[int] = []
    if corpus is not None:
        if corpus != "stdlib":
            raise SystemExit(f"--corpus must be 'stdlib', got {corpus!r}")
        from .distill import _stdlib_sentences  # noqa: PLC0415  (parsed once per process)

        ids_list = tok(list(_stdlib_sentences(6, 60)), add_special_tokens=False)["input_ids"]
    else:
        ids_list, texts, text_at = [], [], []  # texts are tokenized in one call, then put in place
        with open(data, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{data}:{n}: not JSON ({e})") from None
                if isinstance(obj, dict) and isinstance(obj.get("input_ids"), list):
                    ids_list.append([int(t) for t in obj["input_ids"]])
                elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
                    text_at.append(len(ids_list))
                    texts.append(obj["text"])
                    ids_list.append(None)
                else:
                    raise SystemExit(f'{data}:{n}: expected {{"text": ...}} or {{"input_ids": [...]}}')
        if texts:
            for i, ids in zip(text_at, tok(texts, add_special_tokens=False)["input_ids"]):
                ids_list[i] = ids
    for ids in ids_list:
        stream.extend(ids)
        if sep is not None:
            stream.append(sep)
    n = len(stream) // seq_len
    t = torch.tensor(stream[: n * seq_len], dtype=torch.int64)
    return list(t.view(n, seq_len)) if n else []


# ------------------------------------------------------------------------------ teacher


def load_causal_lm(path: str, *, trust_remote_code: bool, device, who: str):
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    if not os.path.isdir(path):
        raise SystemExit(f"{who} must be a local model directory, got {path!r}")
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code).to(device)
    logit_map_of(model, who)  # refuses a model whose logits pykd's fused losses cannot reproduce
    return model


@torch.no_grad()
def teacher_topk(model, input_ids, attention_mask=None, *, k: int, temperature: float = 1.0,
                 chunk_rows: int = 4096, logit_map=None):  # fmt: skip
    """(logprobs (B, T, k) fp32, indices (B, T, k) int64): the top-k of log_softmax(logits / T) at
    each position, from the final hidden states and the lm_head chunk by chunk (at most
    ``chunk_rows`` x V logits at a time). logit_map: the model's (logit_softcap, logit_scale), as
    :func:`logit_map_of` gives (called here when None)."""
    head = check_lm_head(model, "teacher")
    cap, scale = logit_map_of(model, "teacher") if logit_map is None else logit_map
    with LMHeadTap(head) as tap:
        model(input_ids=input_ids, attention_mask=attention_mask)
    h = tap.hidden
    B, T, H = h.shape
    h = h.reshape(-1, H)
    w = head.weight.float()
    b = None if head.bias is None else head.bias.float()
    lps, ixs = [], []
    for i in range(0, h.shape[0], chunk_rows):
        z = reference.logit_map(torch.nn.functional.linear(h[i : i + chunk_rows].float(), w, b), cap, scale)
        lp, ix = torch.log_softmax(z / temperature, -1).topk(k, -1)
        lps.append(lp)
        ixs.append(ix)
    return torch.cat(lps).view(B, T, k), torch.cat(ixs).view(B, T, k)


def cache_teacher(args) -> str:
    """``pykd cache-teacher``: writes (or resumes) a teacher cache; returns its path."""
    from tqdm.auto import tqdm  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = AutoTokenizer.from_pretrained(args.teacher, trust_remote_code=args.trust_remote_code)
    model = load_causal_lm(
        args.teacher, trust_remote_code=args.trust_remote_code, device=device, who="--teacher"
    )
    model.eval()
    logit_map = logit_map_of(model, "--teacher")
    V = model.get_output_embeddings().out_features
    if not 1 <= args.top_k <= V:
        raise SystemExit(f"--top-k must be in [1, {V}] (the teacher's vocabulary), got {args.top_k}")
    seqs = token_sequences(tok, data=args.data, corpus=args.corpus, seq_len=args.seq_len)
    if args.max_sequences is not None:
        seqs = seqs[: args.max_sequences]
    meta = {"vocab_size": V, "temperature": float(args.temperature), "teacher": os.path.abspath(args.teacher),
            "teacher_config_hash": kd_data.config_hash(model.config),
            "tokenizer_hash": kd_data.tokenizer_hash(tok), "seq_len": args.seq_len,
            "source": "pykd cache-teacher"}  # fmt: skip
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[args.logprob_dtype]
    resume = os.path.exists(os.path.join(args.output, "meta.json"))
    with kd_data.TeacherCacheWriter(args.output, k=args.top_k, meta=meta, logprob_dtype=dtype,
                                    resume=resume) as w:  # fmt: skip
        start = w.num_sequences
        if resume:
            print(f"resuming {args.output}: {start} of {len(seqs)} sequences already cached")
        for i in tqdm(range(start, len(seqs), args.batch_size), desc="cache-teacher", dynamic_ncols=True):
            batch = torch.stack(seqs[i : i + args.batch_size]).to(device)
            lp, ix = teacher_topk(
                model, batch, k=args.top_k, temperature=args.temperature, logit_map=logit_map
            )
            for b in range(batch.shape[0]):
                w.add(batch[b].cpu(), lp[b].cpu(), ix[b].cpu())
    print(f"wrote {len(seqs)} sequences x {args.seq_len} tokens, top-{args.top_k}, to {args.output}")
    return args.output


def add_cache_teacher_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="Hugging Face causal LM directory")
    _data_arguments(p)
    p.add_argument("--top-k", type=int, required=True)
    p.add_argument("--temperature", type=float, default=1.0, help="cache log_softmax(logits / T)")
    p.add_argument("--max-sequences", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--logprob-dtype", choices=("float16", "bfloat16"), default="float16")
    p.add_argument("--output", required=True, help="cache directory (resumed if it holds a cache)")


def _data_arguments(p):
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--data", help='JSONL file, one {"text": ...} or {"input_ids": [...]} per line')
    g.add_argument("--corpus", choices=("stdlib",), help="the standard library's docstrings")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--trust-remote-code", action="store_true", help="allow models' own Python code")


# ------------------------------------------------------------------------------ distill-lm


def make_student(teacher, num_layers: int):
    """A copy of the teacher's architecture with ``num_layers`` layers, initialized from its embeddings,
    final norm, lm_head and evenly spaced layers (first and last included)."""
    import copy  # noqa: PLC0415

    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from .distill import init_from_layers  # noqa: PLC0415

    cfg = copy.deepcopy(teacher.config)
    n_t = cfg.num_hidden_layers
    if not 1 <= num_layers <= n_t:
        raise SystemExit(f"--student-layers must be in [1, {n_t}] (the teacher's layers), got {num_layers}")
    cfg.num_hidden_layers = num_layers
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = cfg.layer_types[:num_layers]
    student = AutoModelForCausalLM.from_config(cfg)
    init_from_layers(student, teacher, n_t, num_layers, "layers")
    return student


@torch.no_grad()
def evaluate_lm(student, teacher, seqs, device, *, maps: dict, batch_size: int = 8) -> dict:
    """Held-out per-token forward KL(teacher || student) and the student's perplexity, over every
    next-token position of ``seqs``, through the fused loss (no logits materialized); ``maps``: the
    models' :func:`logit_options`."""
    student.eval()
    teacher.eval()
    s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    kl_sum = ce_sum = 0.0
    n = 0
    for i in range(0, len(seqs), batch_size):
        ids = torch.stack(seqs[i : i + batch_size]).to(device)
        with LMHeadTap(s_head) as s_tap:
            student(input_ids=ids)
        with LMHeadTap(t_head) as t_tap:
            teacher(input_ids=ids)
        target = shift_targets(ids)
        _, kl, ce = fused_linear_kd_loss(
            s_tap.hidden.reshape(-1, s_tap.hidden.shape[-1]), s_head.weight,
            t_tap.hidden.reshape(-1, t_tap.hidden.shape[-1]), t_head.weight, target,
            student_bias=s_head.bias, teacher_bias=t_head.bias, reduction="sum", return_components=True,
            **maps,
        )  # fmt: skip
        kl_sum += float(kl)
        ce_sum += float(ce)
        n += int((target != -100).sum())
    return {"kl": kl_sum / max(n, 1), "ppl": math.exp(ce_sum / max(n, 1)), "tokens": n}


def distill_lm(args) -> dict:
    """``pykd distill-lm``: the LLM job (module docstring); returns the report."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    from .integrations.trainer import DistillationConfig, DistillationTrainer  # noqa: PLC0415

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.teacher, trust_remote_code=args.trust_remote_code)
    teacher = load_causal_lm(
        args.teacher, trust_remote_code=args.trust_remote_code, device=device, who="--teacher"
    )
    teacher.requires_grad_(False).eval()
    if args.student is not None:
        student = load_causal_lm(args.student, trust_remote_code=args.trust_remote_code, device=device,
                                 who="--student")  # fmt: skip
    else:
        n_layers = args.student_layers or max(1, teacher.config.num_hidden_layers // 2)
        student = make_student(teacher, n_layers).to(device)
    seqs = token_sequences(tok, data=args.data, corpus=args.corpus, seq_len=args.seq_len)
    n_held = min(args.eval_sequences, len(seqs) // 5)
    if n_held < 1:
        raise SystemExit(f"only {len(seqs)} sequences of {args.seq_len} tokens: too little data")
    train, held = seqs[:-n_held], seqs[-n_held:]
    if args.cache is not None:
        train_ds = kd_data.TeacherCache(args.cache)
        train_ds.check(tokenizer=tok, teacher_config=teacher.config)
        if len(train_ds) > len(train):  # the held-out sequences are the stream's last ones
            raise SystemExit(
                f"--cache {args.cache} holds {len(train_ds)} sequences, more than the {len(train)} before "
                f"the held-out ones: cache with pykd cache-teacher --max-sequences {len(train)}"
            )
        teacher_model = None
    else:
        train_ds = [{"input_ids": s} for s in train]
        teacher_model = teacher
    s_map, t_map = logit_map_of(student, "student"), logit_map_of(teacher, "teacher")  # probed once
    maps = logit_options(s_map, t_map)
    before = evaluate_lm(student, teacher, held, device, maps=maps)
    print(f"before: held-out KL {before['kl']:.4f} / token, student perplexity {before['ppl']:.2f}")
    cfg = DistillationConfig(
        output_dir=os.path.join(args.output_dir, "trainer"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[],
        use_cpu=device.type == "cpu", seed=args.seed, kd_temperature=args.temperature,
        kd_alpha=args.alpha, kd_divergence="kl", dataloader_num_workers=0, disable_tqdm=False,
    )  # fmt: skip
    trainer = DistillationTrainer(model=student, args=cfg, teacher_model=teacher_model,
                                  train_dataset=train_ds, processing_class=tok)  # fmt: skip
    t0 = time.perf_counter()
    peak = peak_extra_mb(trainer.train, device)
    elapsed = time.perf_counter() - t0
    after = evaluate_lm(student, teacher, held, device, maps=maps)
    tokens = args.steps * args.batch_size * args.seq_len
    teacher_ppl = evaluate_lm(teacher, teacher, held, device, maps=logit_options(t_map, t_map))["ppl"]
    report = dict(
        kl_before=round(before["kl"], 5), kl_after=round(after["kl"], 5),
        ppl_before=round(before["ppl"], 3), ppl_after=round(after["ppl"], 3),
        steps=args.steps, tokens_per_s=round(tokens / elapsed, 1), peak_mem_mb=round(peak, 1),
        teacher_ppl=round(teacher_ppl, 3),
        mode="offline cache" if args.cache else "online teacher", held_out_tokens=after["tokens"],
        teacher_params=sum(p.numel() for p in teacher.parameters()),
        student_params=sum(p.numel() for p in student.parameters()),
        seq_len=args.seq_len, batch_size=args.batch_size, train_seconds=round(elapsed, 1), device=str(device),
        machine=device_name(device), commit=commit(), date=datetime.date.today().isoformat(),
    )  # fmt: skip
    from .distill import save_job  # noqa: PLC0415

    save_job(args.output_dir, report, student, tok)
    return report


def add_distill_lm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="Hugging Face causal LM directory")
    p.add_argument("--cache", default=None, help="train from this teacher cache (pykd cache-teacher)")
    s = p.add_mutually_exclusive_group()
    s.add_argument("--student", default=None, help="student causal LM directory (same tokenizer)")
    s.add_argument("--student-layers", type=int, default=None,
                   help="or: the teacher's architecture with N of its layers (default: half)")  # fmt: skip
    _data_arguments(p)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the KD term; 1 - alpha weighs CE")
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--output-dir", default="pykd-distill-lm")
    p.add_argument("--seed", type=int, default=0)
