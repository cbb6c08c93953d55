"""Prompt normalization and validation shared by every entry point."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jserve.errors import InvalidRequestError
from jserve.tokenizer import Tokenizer

PromptType = str | Sequence[int]


def normalize_prompts(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """A single prompt (text or token ids) or a list of them -> a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int | np.integer) for p in prompts):
        return [prompts]
    return prompts


def tokenize_prompt(
    prompt: PromptType, tokenizer: Tokenizer | None, vocab_size: int
) -> tuple[str | None, list[int]]:
    """Returns (text or None, token ids), raising InvalidRequestError on bad input."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt is empty; give at least one character or token")
        if tokenizer is None:
            raise InvalidRequestError(
                "this model has no tokenizer.json, so prompts must be lists of token ids"
            )
        ids = tokenizer.encode(prompt)
        if not ids:
            raise InvalidRequestError(f"prompt {prompt[:40]!r} tokenized to nothing")
        return prompt, ids
    try:
        ids = [int(t) for t in prompt]
    except (TypeError, ValueError):
        raise InvalidRequestError(
            f"prompt must be a string or a list of token ids, got {type(prompt).__name__}"
        ) from None
    if not ids:
        raise InvalidRequestError("prompt is empty; give at least one token id")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"token id {bad[0]} is outside the vocabulary [0, {vocab_size}) of this model"
        )
    return None, ids
