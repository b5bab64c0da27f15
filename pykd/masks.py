"""Block-mask builders for :class:`pykd.AttentionSpec` (block-sparse student attention).

Every builder returns a bool tensor (B or 1, H or 1, query blocks, key blocks), True = the block is
computed. Static builders return (1, 1, nb, nb) for a sequence of ``seq_len`` tokens in blocks of
``block_size``; combine them with ``&`` and ``|`` (broadcasting over batch and heads). Masks are
block-granular: pass ``causal=True`` / ``key_padding_mask`` to the attention call for exact
token-level masking inside the kept blocks.
"""

from __future__ import annotations

import torch

from . import _checks


def num_blocks(seq_len: int, block_size: int = 64) -> int:
    """ceil(seq_len / block_size)."""
    return -(-_positive("seq_len", seq_len) // _positive("block_size", block_size))


def _positive(name, x) -> int:
    x = _checks.integer(name, x)
    if x < 1:
        raise ValueError(f"{name} must be >= 1, got {x}")
    return x


def _grid(seq_len, block_size, device):
    nb = num_blocks(seq_len, block_size)
    i = torch.arange(nb, device=device)
    return i[:, None], i[None, :]


def _out(m: torch.Tensor) -> torch.Tensor:
    return m[None, None]


def causal(seq_len: int, *, block_size: int = 64, device=None) -> torch.Tensor:
    """Key block kb visible to query block qb iff kb <= qb."""
    qb, kb = _grid(seq_len, block_size, device)
    return _out(kb <= qb)


def sliding_window(seq_len: int, window: int, *, block_size: int = 64, causal: bool = False,
                   device=None) -> torch.Tensor:  # fmt: skip
    """Blocks holding some (query i, key j) pair with |i - j| <= window (with ``causal``, 0 <= i - j
    <= window): the local attention of Longformer / Mistral at block granularity."""
    window = _checks.integer("window", window)
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    qb, kb = _grid(seq_len, block_size, device)
    gap = (qb - kb).abs()
    near = (gap == 0) | ((gap - 1) * block_size + 1 <= window)
    if causal:
        near = near & (kb <= qb)
    return _out(near)


def global_tokens(seq_len: int, num_global: int, *, block_size: int = 64, device=None) -> torch.Tensor:
    """The blocks of the first ``num_global`` tokens attend to everything and are attended by
    everything (BigBird / Longformer global tokens)."""
    g = num_blocks(_positive("num_global", num_global), block_size)
    qb, kb = _grid(seq_len, block_size, device)
    return _out((qb < g) | (kb < g))


def dilated(seq_len: int, dilation: int, *, block_size: int = 64, causal: bool = False,
            device=None) -> torch.Tensor:  # fmt: skip
    """Key block kb visible to query block qb iff (qb - kb) is a multiple of ``dilation``."""
    d = _positive("dilation", dilation)
    qb, kb = _grid(seq_len, block_size, device)
    m = (qb - kb) % d == 0
    if causal:
        m = m & (kb <= qb)
    return _out(m)


def random_blocks(seq_len: int, density: float, *, block_size: int = 64, seed: int = 0, batch: int = 1,
                  heads: int = 1, keep_diagonal: bool = True, device=None) -> torch.Tensor:  # fmt: skip
    """(batch, heads, nb, nb) blocks kept independently with probability ``density`` from a
    generator seeded with ``seed`` (the same seed gives the same mask on every device); with
    ``keep_diagonal`` every query block also keeps its own block, so no row sees nothing."""
    density = _checks.real("density", density, lo=0.0, hi=1.0)
    nb = num_blocks(seq_len, block_size)
    gen = torch.Generator().manual_seed(_checks.integer("seed", seed))
    m = torch.rand((_positive("batch", batch), _positive("heads", heads), nb, nb), generator=gen) < density
    if _checks.boolean("keep_diagonal", keep_diagonal):
        m = m | torch.eye(nb, dtype=torch.bool)
    return m.to(device) if device is not None else m


def topk_blocks(q: torch.Tensor, k: torch.Tensor, topk: int, *, block_size: int = 64,
                causal: bool = False) -> torch.Tensor:  # fmt: skip
    """Dynamic block sparsity: mean-pool q (B, H, N_q, D) and k (B, H_kv, N_k, D) over blocks of
    tokens and keep, for each query block, the ``topk`` key blocks with the largest pooled score
    (SpargeAttn / MoBA style). With ``causal`` only blocks kb <= qb compete, and the diagonal block
    is always kept. Returns (B, H, nbq, nbk) bool; no gradient flows through the selection."""
    topk = _positive("topk", topk)
    _positive("block_size", block_size)
    for name, x in (("q", q), ("k", k)):
        _checks.tensor(name, x, float_dtype=True)
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, D), got shape {tuple(x.shape)}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(f"k heads ({k.shape[1]}) must divide q heads ({q.shape[1]})")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head dim")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"q and k need at least one token, got N_q={q.shape[2]}, N_k={k.shape[2]}")

    def pool(x):
        B, H, N, D = x.shape
        nb = -(-N // block_size)
        xp = torch.nn.functional.pad(x.detach().float(), (0, 0, 0, nb * block_size - N))
        n = torch.full((nb,), float(block_size), device=x.device)
        n[-1] = N - (nb - 1) * block_size
        return xp.view(B, H, nb, block_size, D).sum(3) / n[:, None]

    pq = pool(q)
    pk = pool(k).repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = pq @ pk.transpose(-1, -2)
    nbq, nbk = s.shape[-2:]
    if causal:
        qb = torch.arange(nbq, device=q.device)[:, None]
        kb = torch.arange(nbk, device=q.device)[None, :]
        s = s.masked_fill(kb > qb, float("-inf"))
        s = s.masked_fill(kb == qb, float("inf"))  # the diagonal always stays
    idx = s.topk(min(topk, nbk), -1).indices
    m = torch.zeros(s.shape, dtype=torch.bool, device=q.device).scatter_(-1, idx, True)
    return m & (s > float("-inf"))


def density(block_mask: torch.Tensor) -> float:
    """The fraction of blocks kept."""
    return block_mask.float().mean().item()


__all__ = ["causal", "density", "dilated", "global_tokens", "num_blocks", "random_blocks", "sliding_window",
           "topk_blocks"]  # fmt: skip
