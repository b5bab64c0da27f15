"""Teacher caches for offline LLM distillation: the teacher's top-k log-probabilities per token, written
once (by ``pykd cache-teacher``, or converted from vLLM, SGLang or axolotl dumps) and read back as a
memory-mapped dataset that feeds :func:`pykd.fused_linear_topk_kd_loss` / :func:`pykd.topk_kd_loss`.

Alignment (everywhere in pykd): for a sequence of T token ids, row i of the teacher's top-k is the
teacher's distribution over token i + 1 given tokens 0..i, i.e. it pairs with the student's logits at
position i, as a causal LM's logits do. The last row has no next token in the sequence; a converter
(whose sources give distributions of prompt tokens 1..T-1 only) returns T - 1 rows, and the cache
stores its last row as "no data" (probability 0 at the first k ids): a trainer must ignore it, as it
ignores the last position's label.

On disk, a directory holding ``meta.json`` and safetensors shards ``shard-NNNNN.safetensors``, each
with ``input_ids`` int32 (tokens,), ``logprobs`` float16/bfloat16 (tokens, k), ``indices`` int32
(tokens, k) and ``offsets`` int64 (sequences + 1,): 6·k + 4 bytes per token plus 8 per sequence. No
pickle anywhere; ``meta.json`` names the teacher, hashes of its config and tokenizer, k, the
temperature and the vocabulary size, and a cache whose meta does not match the model or tokenizer in
use is refused (:meth:`TeacherCache.check`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
from typing import Any, Iterable, Sequence

import torch

FORMAT = "pykd-teacher-cache"
VERSION = 1
_META_KEYS = {  # key: (type, required)
    "vocab_size": (int, True),
    "temperature": (float, False),
    "teacher": (str, False),
    "teacher_config_hash": (str, False),
    "tokenizer_hash": (str, False),
}
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _safetensors():
    try:
        from safetensors import safe_open
        from safetensors.torch import save_file
    except ImportError as e:  # pragma: no cover - a listed dependency of the llm extra
        raise ImportError("pykd.data needs safetensors: pip install safetensors") from e
    return safe_open, save_file


# ------------------------------------------------------------------------------ hashes


def tokenizer_hash(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary (token -> id) and special tokens: equal for tokenizers that
    map text to the same ids, whatever directory they were loaded from."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = sorted((str(k), str(v)) for k, v in getattr(tokenizer, "special_tokens_map", {}).items())
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation",
             "_attn_implementation_autoset", "_commit_hash", "architectures", "use_cache"}  # fmt: skip


def config_hash(config) -> str:
    """sha256 of a Hugging Face model config without the fields that change with how it was loaded
    (path, dtype, attention implementation, library version)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: v for k, v in d.items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------ writer


def _check_meta(meta: dict, k: int) -> dict:
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    out = {}
    for key, (typ, required) in _META_KEYS.items():
        if key not in meta or meta[key] is None:
            if required:
                raise ValueError(f"meta must give {key!r} (the teacher's vocabulary size)")
            continue
        v = meta[key]
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, typ) or isinstance(v, bool):
            raise TypeError(f"meta[{key!r}] must be {typ.__name__}, got {type(v).__name__}")
        out[key] = v
    if out["vocab_size"] < k:
        raise ValueError(f"meta['vocab_size']={out['vocab_size']} must be >= k={k}")
    if "temperature" in out and not (out["temperature"] > 0 and math.isfinite(out["temperature"])):
        raise ValueError(f"meta['temperature'] must be positive and finite, got {out['temperature']}")
    extra = {key: v for key, v in meta.items() if key not in _META_KEYS}
    try:
        json.dumps(extra)
    except TypeError as e:
        raise TypeError(f"meta's extra entries must be JSON-serializable: {e}") from e
    return {**out, **extra}


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # atomic: a crash leaves the old meta.json or the new one


class TeacherCacheWriter:
    """Writes a teacher cache (module docstring), one sequence per :meth:`add`.

    Args:
        path: directory to create (or to resume, see ``resume``).
        k: top-k entries per token, >= 1.
        meta: dict with ``vocab_size`` (required), and ``teacher``, ``teacher_config_hash``,
            ``tokenizer_hash``, ``temperature`` (the teacher's log-probs are log_softmax(t / T)) as
            known; other JSON-serializable entries are kept.
        logprob_dtype: torch.float16 (default) or torch.bfloat16 on disk.
        shard_tokens: tokens per shard file (a shard is written when its buffer reaches this).
        resume: continue a cache at ``path`` written with the same k, dtype and meta; its
            :attr:`num_sequences` are kept (a producer skips that many). Without it an existing
            cache at ``path`` is an error.

    Use as a context manager, or call :meth:`close`; sequences not yet in a shard when the process
    dies are lost, those in shards are kept (meta.json is rewritten atomically per shard).
    """

    def __init__(self, path, *, k: int, meta: dict, logprob_dtype=torch.float16, shard_tokens: int = 1 << 22,
                 resume: bool = False):  # fmt: skip
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if logprob_dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"logprob_dtype must be torch.float16 or torch.bfloat16, got {logprob_dtype}")
        if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
            raise ValueError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
        self.path, self.k, self.shard_tokens = os.fspath(path), k, shard_tokens
        self.meta = _check_meta(meta, k)
        self.dtype = logprob_dtype
        self._meta_path = os.path.join(self.path, "meta.json")
        self._shards: list[dict] = []
        if os.path.exists(self._meta_path):
            if not resume:
                raise FileExistsError(f"{self.path} holds a teacher cache; pass resume=True to extend it")
            old = _read_meta(self.path)
            want = {"k": k, "logprob_dtype": _dtype_name(logprob_dtype), "meta": self.meta}
            have = {key: old[key] for key in want}
            if have != want:
                raise ValueError(f"cannot resume {self.path}: it was written with {have}, not {want}")
            self._shards = list(old["shards"])
        else:
            os.makedirs(self.path, exist_ok=True)
        self._buf: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._buf_tokens = 0
        self._closed = False

    @property
    def num_sequences(self) -> int:
        """Sequences written so far (in shards and in the buffer)."""
        return sum(s["sequences"] for s in self._shards) + len(self._buf)

    def add(self, input_ids, topk_logprobs, topk_indices) -> None:
        """Appends one sequence: ``input_ids`` (T,) ints, ``topk_logprobs`` and ``topk_indices``
        (T, k) or (T - 1, k) (a converter's output; the last row is then stored as "no data"). Row i
        is the teacher's distribution over token i + 1 (module docstring)."""
        if self._closed:
            raise ValueError("add() on a closed TeacherCacheWriter")
        ids = torch.as_tensor(input_ids)
        lp = torch.as_tensor(topk_logprobs)
        ix = torch.as_tensor(topk_indices)
        if ids.dim() != 1 or ids.numel() < 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                f"input_ids must be a non-empty 1-D integer tensor, got {ids.dtype} {list(ids.shape)}"
            )
        T, k, V = ids.numel(), self.k, self.meta["vocab_size"]
        rows_ok = lp.dim() == 2 and lp.shape[1] == k and lp.shape[0] in (T, T - 1)
        if not rows_ok or not lp.dtype.is_floating_point:
            raise ValueError(
                f"topk_logprobs must be floating (T, k) or (T - 1, k) with T={T}, k={k}, got "
                f"{lp.dtype} {tuple(lp.shape)}"
            )
        if ix.shape != lp.shape or ix.dtype.is_floating_point or ix.dtype == torch.bool:
            raise ValueError(
                f"topk_indices must be integers of shape {tuple(lp.shape)}, got {ix.dtype} {tuple(ix.shape)}"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= V:
            raise ValueError(f"input_ids must be in [0, vocab_size={V})")
        if ix.numel() and (int(ix.min()) < 0 or int(ix.max()) >= V):
            raise ValueError(f"topk_indices must be in [0, vocab_size={V})")
        if torch.isnan(lp).any() or (lp > 1e-3).any():
            raise ValueError("topk_logprobs must be log-probabilities: no NaN, <= 0")
        if lp.shape[0] == T - 1:  # the last position: no data (probability 0)
            lp = torch.cat([lp.float(), torch.full((1, k), -math.inf)])
            ix = torch.cat([ix.to(torch.int64), torch.arange(k).unsqueeze(0)])
        self._buf.append((ids.to(torch.int32), lp.to(self.dtype), ix.to(torch.int32)))
        self._buf_tokens += T
        if self._buf_tokens >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        _, save_file = _safetensors()
        lengths = torch.tensor([b[0].numel() for b in self._buf], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        name = f"shard-{len(self._shards):05d}.safetensors"
        tensors = {
            "input_ids": torch.cat([b[0] for b in self._buf]),
            "logprobs": torch.cat([b[1] for b in self._buf]),
            "indices": torch.cat([b[2] for b in self._buf]),
            "offsets": offsets,
        }
        save_file(tensors, os.path.join(self.path, name), metadata={"format": FORMAT})
        self._shards.append({"file": name, "sequences": len(self._buf), "tokens": int(offsets[-1])})
        self._buf, self._buf_tokens = [], 0
        self._write_meta()

    def _write_meta(self) -> None:
        _write_json(self._meta_path, {
            "format": FORMAT, "version": VERSION, "k": self.k, "logprob_dtype": _dtype_name(self.dtype),
            "meta": self.meta, "shards": self._shards,
        })  # fmt: skip

    def close(self) -> None:
        """Writes the buffered sequences and meta.json (also for a cache of 0 sequences)."""
        if self._closed:
            return
        if self._buf:
            self._flush()  # writes meta.json
        else:
            self._write_meta()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _dtype_name(dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def _read_meta(path: str) -> dict:
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path} is not a teacher cache (no meta.json)")
    with open(meta_path, encoding="utf-8") as f:
        m = json.load(f)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is not a {FORMAT} meta file")
    if m.get("version") != VERSION:
        raise ValueError(f"{meta_path} has version {m.get('version')}; this pykd reads version {VERSION}")
    if m.get("logprob_dtype") not in _DTYPES or not isinstance(m.get("k"), int) or m["k"] < 1:
        raise ValueError(f"{meta_path}: bad k or logprob_dtype")
    for s in m.get("shards", []):
        f = s.get("file", "")
        # only plain file names inside the cache directory
        if not isinstance(f, str) or os.path.basename(f) != f or not f.endswith(".safetensors"):
            raise ValueError(f"{meta_path}: bad shard file name {f!r}")
    return m


# ------------------------------------------------------------------------------ reader


class TeacherCache(torch.utils.data.Dataset):
    """A teacher cache as a map-style dataset of sequences, read lazily through memory maps.

    ``cache[i]`` is a dict with ``input_ids`` (T,) int64, ``teacher_topk_logprobs`` (T, k) in the
    stored dtype (float16/bfloat16) and ``teacher_topk_indices`` (T, k) int64; row t pairs with the
    student's logits at position t (module docstring). ``.k``, ``.meta`` (the writer's meta dict),
    ``len(cache)`` sequences, ``cache.num_tokens``. Safe to use in DataLoader workers (each process
    opens its own maps)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        m = _read_meta(self.path)
        self.k, self.meta = m["k"], m["meta"]
        self.logprob_dtype = _DTYPES[m["logprob_dtype"]]
        self._shards = m["shards"]
        self._starts = [0]
        for s in self._shards:
            self._starts.append(self._starts[-1] + int(s["sequences"]))
        self.num_tokens = sum(int(s["tokens"]) for s in self._shards)
        self._open: dict[int, Any] = {}
        self._offsets: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self._starts[-1]

    def __getstate__(self):  # maps are per process
        return {**self.__dict__, "_open": {}, "_offsets": {}}

    def _shard(self, j: int):
        if j not in self._open:
            safe_open, _ = _safetensors()
            f = safe_open(os.path.join(self.path, self._shards[j]["file"]), framework="pt")
            offsets = f.get_tensor("offsets")
            if offsets.numel() != self._shards[j]["sequences"] + 1:
                raise ValueError(f"{self._shards[j]['file']}: offsets do not match meta.json")
            self._open[j], self._offsets[j] = f, offsets
        return self._open[j], self._offsets[j]

    def __getitem__(self, i: int) -> dict:
        if isinstance(i, bool) or not isinstance(i, int):
            i = int(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"TeacherCache index {i} out of range for {n} sequences")
        j = bisect.bisect_right(self._starts, i) - 1
        f, offsets = self._shard(j)
        r = i - self._starts[j]
        a, b = int(offsets[r]), int(offsets[r + 1])
        return {
            "input_ids": f.get_slice("input_ids")[a:b].to(torch.int64),
            "teacher_topk_logprobs": f.get_slice("logprobs")[a:b],
            "teacher_topk_indices": f.get_slice("indices")[a:b].to(torch.int64),
        }

    def check(self, *, tokenizer=None, teacher_config=None) -> None:
        """Refuses (ValueError) a cache written for another tokenizer or teacher config than the
        ones given; a hash the cache does not record is not checked. (A teacher vocabulary larger
        than the student's is served: see ``teacher_vocab_size`` of :func:`pykd.topk_kd_loss`.)"""
        checks = []
        if tokenizer is not None:
            checks.append(("tokenizer_hash", tokenizer_hash(tokenizer), "tokenizer"))
        if teacher_config is not None:
            checks.append(("teacher_config_hash", config_hash(teacher_config), "teacher config"))
        for key, have, what in checks:
            want = self.meta.get(key)
            if want is not None and want != have:
                raise ValueError(
                    f"teacher cache {self.path} was written with another {what} ({key} {want[:12]}..., "
                    f"this one's is {have[:12]}...): its token ids would not match"
                )


def collate(items: Sequence[dict], *, pad_id: int = 0, ignore_index: int = -100) -> dict:
    """Right-pads TeacherCache items (or dicts with just ``input_ids``) to a batch: ``input_ids``,
    ``attention_mask`` and ``labels`` (B, T) as a Hugging Face causal LM takes them (``labels`` are the
    input ids, ``ignore_index`` at padding; the loss shifts them, so a row's target is the next
    token, and the last position of a sequence, a cache's "no data" row, has none), plus the teacher
    tensors (B, T, k) when the items have them."""
    if not items:
        raise ValueError("collate needs at least one item")
    T = max(it["input_ids"].numel() for it in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.int64)
    mask = torch.zeros((B, T), dtype=torch.int64)
    labels = torch.full((B, T), ignore_index, dtype=torch.int64)
    for b, it in enumerate(items):
        n = it["input_ids"].numel()
        ids[b, :n] = it["input_ids"]
        mask[b, :n] = 1
        labels[b, :n] = it["input_ids"]
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if "teacher_topk_logprobs" in items[0]:
        k = items[0]["teacher_topk_logprobs"].shape[-1]
        lp = torch.full((B, T, k), -math.inf, dtype=items[0]["teacher_topk_logprobs"].dtype)
        ix = torch.arange(k, dtype=torch.int64).expand(B, T, k).clone()
        for b, it in enumerate(items):
            n = it["input_ids"].numel()
            lp[b, :n] = it["teacher_topk_logprobs"]
            ix[b, :n] = it["teacher_topk_indices"]
        out.update(teacher_topk_logprobs=lp, teacher_topk_indices=ix)
    return out


# ------------------------------------------------------------------------------ converters


def _rows_to_tensors(rows: list[list[tuple[int, float]]], k: int | None, source: str):
    """rows: per position a list of (token_id, logprob); keeps each row's k most probable entries,
    sorted by descending log-prob. k=None: the smallest number of entries any position has."""
    if not rows:
        return torch.zeros(0, k or 0), torch.zeros(0, k or 0, dtype=torch.int64)
    counts = [len(r) for r in rows]
    if k is None:
        k = min(counts)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int or None, got {k!r}")
    lp = torch.empty(len(rows), k, dtype=torch.float32)
    ix = torch.empty(len(rows), k, dtype=torch.int64)
    for i, r in enumerate(rows):
        if len(r) < k:
            raise ValueError(f"{source}: position {i + 1} has {len(r)} entries, fewer than k={k}")
        ids = [t for t, _ in r]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{source}: position {i + 1} lists a token id twice")
        best = sorted(r, key=lambda e: -e[1])[:k]
        for j, (t, v) in enumerate(best):
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"{source}: position {i + 1}: bad token id {t!r}")
            if not isinstance(v, (int, float)) or math.isnan(v) or v > 1e-3:
                raise ValueError(f"{source}: position {i + 1}: bad log-probability {v!r}")
            ix[i, j], lp[i, j] = t, float(v)
    return lp, ix


def _positions(seq, source: str, num_tokens: int | None) -> list:
    if isinstance(seq, (str, bytes)) or not isinstance(seq, Iterable):
        raise TypeError(f"{source}: expected a list, one entry per prompt token, got {type(seq).__name__}")
    seq = list(seq)
    if num_tokens is not None and len(seq) != num_tokens:
        raise ValueError(f"{source}: {len(seq)} positions for {num_tokens} prompt tokens")
    if not seq:
        raise ValueError(f"{source}: no positions")
    if seq[0]:
        raise ValueError(f"{source}: position 0 has data; expected None (no context before the first token)")
    for i, p in enumerate(seq[1:], 1):
        if p is None or (hasattr(p, "__len__") and len(p) == 0):
            raise ValueError(f"{source}: position {i} is missing (None or empty)")
    return seq[1:]


def from_vllm(prompt_logprobs, k: int | None = None, *, num_tokens: int | None = None):
    """vLLM's ``RequestOutput.prompt_logprobs`` (per prompt token None or {token_id: Logprob}; also
    its JSON dump, where a Logprob is {"logprob": x, ...} and ids are strings) to
    ``(logprobs (T - 1, k) float32, indices (T - 1, k) int64)``: row i is the teacher's distribution
    over prompt token i + 1 (vLLM's entry i + 1), sorted by descending log-prob. vLLM adds the prompt's
    own token when it is outside the top-k, so rows can hold k + 1 entries: each keeps its k most
    probable. k=None: the fewest entries any position has. ``num_tokens`` checks the prompt length."""

    def row(d):
        if not isinstance(d, dict):
            raise TypeError(f"vllm: a position must be a dict {{token_id: Logprob}}, got {type(d).__name__}")
        out = []
        for t, v in d.items():
            t = int(t) if isinstance(t, str) and t.lstrip("-").isdigit() else t
            v = v.get("logprob") if isinstance(v, dict) else getattr(v, "logprob", v)
            out.append((t, v))
        return out

    return _rows_to_tensors([row(d) for d in _positions(prompt_logprobs, "vllm", num_tokens)], k, "vllm")


def from_sglang(input_top_logprobs, k: int | None = None, *, num_tokens: int | None = None):
    """SGLang's ``meta_info["input_top_logprobs"]`` (per prompt token None or a list of
    (logprob, token_id[, text]) tuples) to ``(logprobs (T - 1, k), indices (T - 1, k))``, aligned
    as :func:`from_vllm`."""

    def row(entries):
        out = []
        for e in entries:
            if not isinstance(e, (list, tuple)) or len(e) not in (2, 3):
                raise TypeError(f"sglang: an entry must be (logprob, token_id[, text]), got {e!r}")
            out.append((e[1], e[0]))
        return out

    seq = _positions(input_top_logprobs, "sglang", num_tokens)
    return _rows_to_tensors([row(p) for p in seq], k, "sglang")


def from_axolotl(positions, k: int | None = None, *, num_tokens: int | None = None):
    """An OpenAI-style prompt-logprobs dump as axolotl's KD datasets hold it (per prompt token None or
    a list of {"token": "token_id:N", "logprob": x}, vLLM serve with ``return_tokens_as_token_ids``)
    to ``(logprobs (T - 1, k), indices (T - 1, k))``, aligned as :func:`from_vllm`."""

    def row(entries):
        out = []
        for e in entries:
            tok = e.get("token") if isinstance(e, dict) else None
            if not isinstance(tok, str) or not tok.startswith("token_id:") or "logprob" not in e:
                raise ValueError(f"axolotl: an entry must be {{'token': 'token_id:N', 'logprob': x}}: {e!r}")
            try:
                t = int(tok[len("token_id:") :])
            except ValueError:
                raise ValueError(f"axolotl: bad token {tok!r}") from None
            out.append((t, e["logprob"]))
        return out

    seq = _positions(positions, "axolotl", num_tokens)
    return _rows_to_tensors([row(p) for p in seq], k, "axolotl")
