"""Random ragged batches in the paged layout, with NaN wherever no real data lives.

Pages are handed out in a shuffled order (so a sequence's pages are not
contiguous), page slots past a sequence's last page point at NaN-filled
spare pages or at garbage indices, the unused tail of each last page is NaN,
and query rows past cu_q_lens[num_seqs] are NaN. A kernel that reads any of
those into a real row produces NaN, which the tests check for.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Batch(NamedTuple):
    q: jnp.ndarray  # [T, Hq, D]
    kv_pages: jnp.ndarray  # [P, S, 2*Hkv, D]
    kv_lens: jnp.ndarray  # i32[max_num_seqs]
    page_indices: jnp.ndarray  # i32[max_num_seqs, pages_per_seq]
    cu_q_lens: jnp.ndarray  # i32[max_num_seqs + 1]
    num_seqs: jnp.ndarray  # i32[1]

    @property
    def num_real_tokens(self) -> int:
        return int(self.cu_q_lens[int(self.num_seqs[0])])

    def args(self) -> tuple:
        return tuple(self)


def make_batch(
    seqs: list[tuple[int, int]],  # (q_len, kv_len) per sequence
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int = 16,
    dtype=jnp.float32,
    extra_tokens: int = 3,
    extra_seqs: int = 1,
    extra_pages: int = 3,
    seed: int = 0,
) -> Batch:
    rng = np.random.default_rng(seed)
    n = len(seqs)
    max_num_seqs = n + extra_seqs
    pages_per_seq = max(-(-kv // page_size) for _, kv in seqs) + 1
    needed = [-(-kv // page_size) for _, kv in seqs]
    total_pages = sum(needed) + extra_pages
    perm = rng.permutation(total_pages)
    kv = np.full((total_pages, page_size, 2 * num_kv_heads, head_dim), np.nan, np.float32)
    page_indices = np.zeros((max_num_seqs, pages_per_seq), np.int32)
    # Unused slots: garbage that must never be dereferenced (-1, huge) or NaN pages.
    spare = perm[sum(needed) :]
    nxt = 0
    for i, (_, kv_len) in enumerate(seqs):
        mine = perm[nxt : nxt + needed[i]]
        nxt += needed[i]
        page_indices[i, : needed[i]] = mine
        fill = rng.choice([-1, 1 << 30] + [int(p) for p in spare], size=pages_per_seq - needed[i])
        page_indices[i, needed[i] :] = fill
        vals = rng.standard_normal((kv_len, 2 * num_kv_heads, head_dim)).astype(np.float32)
        for t in range(kv_len):
            kv[mine[t // page_size], t % page_size] = vals[t]
    page_indices[n:] = -7
    q_lens = [q for q, _ in seqs]
    cu = np.zeros(max_num_seqs + 1, np.int32)
    cu[1 : n + 1] = np.cumsum(q_lens)
    cu[n + 1 :] = cu[n] + 1000  # garbage past num_seqs
    num_tokens = int(cu[n]) + extra_tokens
    q = rng.standard_normal((num_tokens, num_q_heads, head_dim)).astype(np.float32)
    q[cu[n] :] = np.nan
    kv_lens = np.zeros(max_num_seqs, np.int32)
    kv_lens[:n] = [k for _, k in seqs]
    kv_lens[n:] = 1 << 20  # garbage past num_seqs
    return Batch(
        jnp.asarray(q, dtype),
        jnp.asarray(kv, dtype),
        jnp.asarray(kv_lens),
        jnp.asarray(page_indices),
        jnp.asarray(cu),
        jnp.asarray([n], jnp.int32),
    )
