"""Speculation counters (host): what was proposed and what the target accepted.

The engine copies them into ``EngineStats``, which derives the mean accepted length.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class SpecStats:
    num_drafts: int = 0  # sequence-steps that carried at least one proposed token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
