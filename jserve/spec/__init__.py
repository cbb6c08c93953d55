"""Speculative decoding: proposals checked by the target model in its normal ragged step.

A speculating sequence that decodes schedules its last token plus k proposed
tokens (``num_scored = k + 1`` in its ``ScheduledEntry``); the step scores all
k + 1 positions and accepts a prefix of the proposals by rejection sampling on
the device (``rejection``), so the tokens keep the target model's distribution.
The scheduler rolls the rest back after the step.

- ``config``: ``SpeculativeConfig`` (vLLM's ``speculative_config`` dict), checked at start-up.
- ``ngram``: prompt lookup on the host, from the sequence's own tokens.
- ``draft``: a draft model proposing on the device, inside the step.
- ``eagle``: an EAGLE-style head over the target's features, proposing the same way.
- ``proposers``: resolving and loading the proposer a config names.
- ``rejection``: the acceptance math inside the jitted step.
- ``stats``: drafts, draft tokens and accepted tokens.
"""

from jserve.spec.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
