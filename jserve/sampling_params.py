"""Sampling parameters, with the meaning and defaults vLLM users know."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jserve.errors import InvalidRequestError
from jserve.structured.params import StructuredOutputsParams

# The device holds integer fields (top_k, token ids, counts) as int32 and float
# fields (temperature, top_p, min_p, penalties) as float32.
INT32_MAX = 2**31 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Below this a temperature is greedy, as in vLLM: dividing logits by a smaller
# one overflows float32.
MIN_TEMPERATURE = 1e-5
# logit_bias: at most this many entries, each bias in [-LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT],
# as OpenAI documents; the device holds a fixed-width per-row list of that many.
MAX_LOGIT_BIAS = 300
LOGIT_BIAS_LIMIT = 100.0


def _as_list(name: str, value: Any, what: str) -> Any:
    """None -> [], a tuple -> a list; a lone string stays for the caller to wrap;
    anything else that is not a list is refused."""
    if value is None:
        return []
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, list):
        return value
    raise InvalidRequestError(
        f"invalid sampling parameters: {name} must be {what}, got {type(value).__name__} "
        f"{value!r:.40}",
        field=name,
    )


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

    ``logit_bias={token_id: bias}`` (vLLM's convention; OpenAI's API sends the
    ids as strings) adds each bias to that token's logit before sampling, after
    the penalties and before temperature and the filters: -100 in effect bans a
    token, +100 in effect forces it. At most 300 entries, biases in [-100, 100].

    ``structured_outputs=StructuredOutputsParams(json=... | regex=... | choice=[...] |
    grammar=... | json_object=True)`` constrains the output (``jserve.structured``): a
    grammar that completes ends the request with finish_reason "stop", max_tokens
    reached before that with "length".
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
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _as_list("stop", self.stop, "a string or a list of strings")
        self.stop_token_ids = _as_list("stop_token_ids", self.stop_token_ids, "a list of ids")
        temperature = self.temperature
        if isinstance(temperature, int | float) and 0 < temperature < MIN_TEMPERATURE:
            self.temperature = 0.0

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
            # Every message here starts with the name of the field it is about.
            field = msg.split(" ", 1)[0]
            return InvalidRequestError(f"invalid sampling parameters: {msg}", field=field)

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise bad(f"{name} must be a number, got {value!r:.40}")
            if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
                raise bad(f"{name} must be finite in float32, got {value}")
            return float(value)

        def integer(name: str, lo: int = -INT32_MAX - 1, hi: int = INT32_MAX) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(f"{name} must be an integer, got {value!r:.40}")
            if value < lo and hi == INT32_MAX:
                raise bad(f"{name} must be at least {lo}, got {value}")
            if not lo <= value <= hi:
                raise bad(f"{name} must be in [{lo}, {hi}], got {value}")
            return value

        def flag(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise bad(f"{name} must be true or false, got {getattr(self, name)!r:.40}")

        integer("n", 1)
        if self.max_tokens is not None:
            integer("max_tokens", 0)
            if self.max_tokens == 0 and self.prompt_logprobs is None:
                raise bad(
                    "max_tokens must be at least 1 (0, scoring the prompt only, needs "
                    "prompt_logprobs)"
                )
        integer("min_tokens", 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        temperature = number("temperature")
        if temperature < 0 or 0 < temperature < MIN_TEMPERATURE:
            raise bad(
                f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got "
                f"{self.temperature}"
            )
        # Positive in float32 too: a top_p that rounds to 0 would keep no token.
        if not (0.0 < number("top_p") <= 1.0 and np.float32(self.top_p) > 0):
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        top_k = integer("top_k")
        if top_k < -1 or top_k == 0:
            raise bad(f"top_k must be -1 (disabled) or >= 1, got {top_k}")
        if not 0.0 <= number("min_p") <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not (0.0 < number("repetition_penalty") <= 10.0 and np.float32(self.repetition_penalty)):
            raise bad(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= number(name) <= 2.0:
                raise bad(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and not -(2**63) <= integer("seed", -(2**63), 2**64) < 2**64:
            raise bad(f"seed must fit in 64 bits, got {self.seed}")  # folded to 32 (seed32)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                integer(name, 0, max_logprobs)  # the engine's max_logprobs
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            flag(name)
        if not isinstance(self.stop, list):
            raise bad(f"stop must be a string or a list of strings, got {self.stop!r:.40}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise bad(f"stop strings must be non-empty strings, got {s!r:.40}")
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise bad(
                    f"stop string {s!r:.40} is not valid Unicode (a lone surrogate)"
                ) from None
        if not isinstance(self.stop_token_ids, list):
            raise bad(f"stop_token_ids must be a list, got {self.stop_token_ids!r:.40}")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= INT32_MAX:
                raise bad(f"stop_token_ids must be non-negative integers, got {t!r:.40}")
        self._validate_logit_bias(bad)
        so = self.structured_outputs
        if so is not None:
            if not isinstance(so, StructuredOutputsParams):
                raise bad(
                    f"structured_outputs must be a StructuredOutputsParams, got {type(so).__name__}"
                )
            so.key()  # the fields' shape; the engine compiles the content

    def _validate_logit_bias(self, bad: Any) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise bad(f"logit_bias must be a mapping of token ids to biases, got {bias!r:.40}")
        if len(bias) > MAX_LOGIT_BIAS:
            raise bad(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS} are allowed")
        for t, b in bias.items():
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= INT32_MAX:
                raise bad(f"logit_bias keys must be non-negative token ids, got {t!r:.40}")
            if isinstance(b, bool) or not isinstance(b, int | float) or not math.isfinite(b):
                raise bad(f"logit_bias of token {t} must be a finite number, got {b!r:.40}")
            if not -LOGIT_BIAS_LIMIT <= b <= LOGIT_BIAS_LIMIT:
                raise bad(
                    f"logit_bias of token {t} must be in [-{LOGIT_BIAS_LIMIT:g}, "
                    f"{LOGIT_BIAS_LIMIT:g}], got {b}"
                )
