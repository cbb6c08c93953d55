"""The scheduler's one hook into speculation (host only, no JAX): proposals and counters."""

from __future__ import annotations

from collections.abc import Sequence

from jserve.spec.config import SpeculativeConfig
from jserve.spec.ngram import NgramProposer
from jserve.spec.stats import SpecStats


class Speculator:
    def __init__(self, cfg: SpeculativeConfig, on_device: bool) -> None:
        self.cfg = cfg
        self.num_speculative_tokens = cfg.num_speculative_tokens
        # Whether a proposer runs on the device, inside the step (what ``load_proposer``
        # loaded: a draft model or EAGLE head); else n-gram lookup here, on the host.
        self.on_device = on_device
        self.proposer = NgramProposer(cfg.prompt_lookup_min, cfg.prompt_lookup_max)
        self.stats = SpecStats()

    def propose(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """Up to min(k, max_tokens) proposed next tokens for a sequence with these tokens."""
        k = min(self.num_speculative_tokens, max_tokens)
        if k <= 0:
            return []
        if self.on_device:  # placeholders: the step fills them in
            return [-1] * k
        return self.proposer.propose(token_ids, k)

    @staticmethod
    def num_accepted(drafts: Sequence[int], tokens: Sequence[int]) -> int:
        """How many leading proposals the step kept: a verifying row gives back its
        proposal exactly when it was accepted (see ``rejection``)."""
        n = 0
        for d, t in zip(drafts, tokens, strict=False):
            if d != t:
                break
            n += 1
        return n
