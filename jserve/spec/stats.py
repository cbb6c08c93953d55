"""Speculation counters (host): what was proposed and what the target accepted."""

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

    @property
    def mean_accepted_length(self) -> float:
        """Tokens each speculating sequence-step produced: 1 + accepted / drafts (0 if none)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0
