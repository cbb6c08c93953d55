"""Sampling parameters, with the meaning and defaults vLLM users know."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from jserve.errors import InvalidRequestError


@dataclasses.dataclass
class SamplingParams:
    """How to sample one request's continuation.

    ``temperature=0`` is greedy. ``top_k=-1`` (or 0 in some clients, which we
    reject to avoid ambiguity) disables top-k; ``top_p=1`` and ``min_p=0``
    disable those filters. Penalties follow vLLM: ``repetition_penalty`` > 1
    discourages tokens seen in the prompt or output, ``presence_penalty`` and
    ``frequency_penalty`` act on tokens already generated.

    ``logprobs=K`` returns, per generated token, its logprob and rank plus the
    K most likely tokens; ``prompt_logprobs=K`` does the same for every prompt
    token after the first (``RequestOutput.prompt_logprobs``, None for the
    first). Both are of the raw model distribution, as vLLM's default
    ("raw_logprobs"): before penalties, banned ids, temperature and the
    top-k/top-p/min-p filters, so they do not depend on how tokens are drawn.
    ``max_tokens=0`` only scores the prompt and needs ``prompt_logprobs`` (the
    request ends with finish_reason "length" and no tokens); without it,
    max_tokens must be at least 1, as in vLLM.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def seed32(self) -> int | None:
        """The seed folded to the 32 bits the device's random keys take."""
        if self.seed is None:
            return None
        s = self.seed % 2**64
        return (s ^ (s >> 32)) & 0xFFFFFFFF

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
        )

    def validate(self, max_logprobs: int = 20) -> None:
        """Raises InvalidRequestError naming the first bad field."""

        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"invalid sampling parameters: {msg}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise bad(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise bad(f"{name} must be finite, got {value}")
            return float(value)

        def integer(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(f"{name} must be an integer, got {value!r}")
            return value

        if integer("n") < 1:
            raise bad(f"n must be at least 1, got {self.n}")
        if self.max_tokens is not None:
            if integer("max_tokens") < 0:
                raise bad(f"max_tokens must be at least 1, got {self.max_tokens}")
            if self.max_tokens == 0 and self.prompt_logprobs is None:
                raise bad(
                    "max_tokens must be at least 1 (0, scoring the prompt only, needs "
                    "prompt_logprobs)"
                )
        if integer("min_tokens") < 0:
            raise bad(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if number("temperature") < 0:
            raise bad(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0.0 < number("top_p") <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        top_k = integer("top_k")
        if top_k < -1 or top_k == 0:
            raise bad(f"top_k must be -1 (disabled) or >= 1, got {top_k}")
        if not 0.0 <= number("min_p") <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < number("repetition_penalty") <= 10.0:
            raise bad(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= number(name) <= 2.0:
                raise bad(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and not -(2**63) <= integer("seed") < 2**64:
            raise bad(f"seed must fit in 64 bits, got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                k = integer(name)
                if not 0 <= k <= max_logprobs:
                    raise bad(
                        f"{name} must be in [0, {max_logprobs}] (the engine's max_logprobs), "
                        f"got {k}"
                    )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise bad(f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise bad(f"stop_token_ids must be non-negative integers, got {t!r}")
