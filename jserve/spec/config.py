"""``speculative_config`` in vLLM's convention, validated before anything is allocated.

E.g. ``{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
"prompt_lookup_max": 5}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from jserve.errors import ConfigError

METHODS = ("ngram", "draft_model", "eagle")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    # The draft (draft_model) or EAGLE head (eagle): a Hugging Face directory; None = the
    # embedded model's shipped draft or head, for the embedded model.
    model: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | SpeculativeConfig | str) -> SpeculativeConfig:
        """The config a dict (or a JSON string) describes; unknown keys are errors."""
        if isinstance(d, SpeculativeConfig):
            return d
        if isinstance(d, str):
            try:
                d = json.loads(d)
            except json.JSONDecodeError as e:
                raise ConfigError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(d, Mapping):
            raise ConfigError(
                f"speculative_config must be a dict such as "
                f'{{"method": "ngram", "num_speculative_tokens": 4}}, got {d!r}'
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"speculative_config has unknown keys {unknown}; known: {sorted(names)}"
            )
        return cls(**d).validate()

    def validate(self) -> SpeculativeConfig:
        if self.method not in METHODS:
            raise ConfigError(
                f"speculative_config method {self.method!r} is unknown; choose one of {METHODS}"
            )
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(
                f"speculative_config num_speculative_tokens must be an integer >= 1, got {k!r}"
            )
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        for name, v in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"speculative_config {name} must be an integer >= 1, got {v!r}")
        if lo > hi:
            raise ConfigError(
                f"speculative_config prompt_lookup_min ({lo}) exceeds prompt_lookup_max ({hi}); "
                "the lookup tries n-grams from max down to min"
            )
        if self.method != "ngram":
            self._check_model_dir()
        return self

    def _check_model_dir(self) -> None:
        """A draft's directory must exist and hold a config.json."""
        path = self.model
        if path is None:
            return
        if not os.path.isdir(path):
            raise ConfigError(
                f"speculative_config model {path!r} is not a directory; give the draft "
                "model's Hugging Face directory"
            )
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"speculative_config model {path!r} has no config.json")

    def check_draft_vocab(self, target_vocab: int) -> None:
        """A draft must share the target's vocabulary (its token ids are the target's)."""
        if self.model is None:
            return
        with open(os.path.join(self.model, "config.json")) as fh:
            vocab = json.load(fh).get("vocab_size")
        if vocab != target_vocab:
            raise ConfigError(
                f"the draft model {self.model!r} has vocab_size {vocab} but the target has "
                f"{target_vocab}; a draft must share the target's tokenizer"
            )
