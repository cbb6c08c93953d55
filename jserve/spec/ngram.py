"""N-gram prompt lookup (host only, no model): propose what followed the last time the
sequence's newest n tokens appeared in it.

E.g. tokens [5, 6, 7, 8, 5, 6] with n = 2: the suffix [5, 6] last appeared at
index 0, followed by [7, 8, 5, 6], so with k = 3 the proposal is [7, 8, 5].
Longer n-grams are tried first (``prompt_lookup_max`` down to ``prompt_lookup_min``),
and the most recent earlier occurrence wins.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` proposed next tokens (fewer or none when nothing matches)."""
        n_tok = len(tokens)
        if k <= 0 or n_tok <= self.min_n:
            return []
        arr = np.asarray(tokens, np.int64)
        for n in range(min(self.max_n, n_tok - 1), self.min_n - 1, -1):
            suffix = arr[n_tok - n :]
            # Every window starting at 0 .. n_tok - n - 1 (not the suffix itself).
            windows = np.lib.stride_tricks.sliding_window_view(arr[: n_tok - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return arr[start : start + k].tolist()
        return []
