"""Prompt normalization and validation shared by every entry point.

A prompt is text, a list of token ids, or one of vLLM's dict forms:
``{"prompt": "text"}`` (``TextPrompt``) or ``{"prompt_token_ids": [...]}``
(``TokensPrompt``). Anything else (bytes, None, numbers, sets, dicts with
other keys) is refused with an InvalidRequestError naming what was given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

import numpy as np

from jserve.errors import InvalidRequestError
from jserve.tokenizer import Tokenizer


class TextPrompt(TypedDict):
    prompt: str


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]


PromptType = str | Sequence[int] | TextPrompt | TokensPrompt

# vLLM's dict prompts may carry these; jserve has no use for them and says so
# rather than generating as if they were absent.
_UNSUPPORTED_KEYS = ("multi_modal_data", "mm_processor_kwargs", "cache_salt", "token_type_ids")


def _bad_prompt(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, field="prompt")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _kind(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def normalize_prompts(prompts: PromptType | Sequence[PromptType]) -> list[Any]:
    """A single prompt (text, token ids or a dict prompt) or a list of them -> a list of
    prompts. Each one is checked later, by ``tokenize_prompt``."""
    if isinstance(prompts, str | dict):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        if prompts.ndim not in (1, 2):
            raise _bad_prompt(
                f"prompts as an array must be 1-D (token ids) or 2-D (rows of ids), got "
                f"{prompts.ndim}-D"
            )
        return [prompts] if prompts.ndim == 1 else list(prompts)
    if not isinstance(prompts, Sequence) or isinstance(prompts, bytes | bytearray):
        raise _bad_prompt(
            f"prompts must be a prompt (text, token ids, {{'prompt': text}} or "
            f"{{'prompt_token_ids': ids}}) or a list of them, got {_kind(prompts)}"
        )
    prompts = list(prompts)
    if prompts and all(_is_token_id(p) for p in prompts):
        return [prompts]
    return prompts


def prompt_parts(prompt: Any, field: str = "prompt") -> tuple[str | None, Any]:
    """(text, None) for a text prompt, (None, ids) for token ids, either given plainly or
    as a vLLM dict prompt. Checks the form and the text (not yet the ids)."""
    if isinstance(prompt, dict):
        keys = set(prompt)
        unsupported = sorted(keys & set(_UNSUPPORTED_KEYS))
        if unsupported:
            raise _bad_prompt(f"{field}: {', '.join(unsupported)} is not supported")
        if keys == {"prompt"}:
            field, prompt = f"{field}['prompt']", prompt["prompt"]
            if not isinstance(prompt, str):
                raise _bad_prompt(f"{field} must be a string, got {_kind(prompt)}")
        elif keys == {"prompt_token_ids"}:
            field, prompt = f"{field}['prompt_token_ids']", prompt["prompt_token_ids"]
            if isinstance(prompt, str):
                raise _bad_prompt(f"{field} must be a list of token ids, got str")
        else:
            raise _bad_prompt(
                f"{field} as a dict must have exactly one key, 'prompt' (text) or "
                f"'prompt_token_ids' (ids); got keys {sorted(map(str, keys))}"
            )
    if isinstance(prompt, str):
        if not prompt:
            raise _bad_prompt(f"{field} is empty; give at least one character or token")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _bad_prompt(
                f"{field} is not valid Unicode: {e.object[e.start]!r} at index {e.start} is a "
                "lone surrogate"
            ) from None
        return prompt, None
    if (
        isinstance(prompt, np.ndarray)
        and prompt.ndim == 1
        and np.issubdtype(prompt.dtype, np.integer)
    ):
        return None, prompt.tolist()
    if isinstance(prompt, list | tuple | range):
        return None, prompt
    hint = "; decode bytes to str first" if isinstance(prompt, bytes | bytearray) else ""
    raise _bad_prompt(
        f"{field} must be a string, a list of token ids, {{'prompt': text}} or "
        f"{{'prompt_token_ids': ids}}, got {_kind(prompt)}{hint}"
    )


def check_token_ids(ids: Any, vocab_size: int, field: str = "prompt") -> list[int]:
    """A plain list of ints, each a token id of the vocabulary."""
    for t in ids:
        if not _is_token_id(t):
            raise _bad_prompt(f"{field} token ids must be integers, got {_kind(t)} {t!r:.40}")
    out = [int(t) for t in ids]
    if not out:
        raise _bad_prompt(f"{field} is empty; give at least one token id")
    outside = [t for t in out if not 0 <= t < vocab_size]
    if outside:
        raise _bad_prompt(
            f"token id {outside[0]} is outside the vocabulary [0, {vocab_size}) of this model"
        )
    return out


def tokenize_prompt(
    prompt: Any, tokenizer: Tokenizer | None, vocab_size: int, field: str = "prompt"
) -> tuple[str | None, list[int]]:
    """Returns (text or None, token ids), raising InvalidRequestError on bad input."""
    text, ids = prompt_parts(prompt, field)
    if text is not None:
        if tokenizer is None:
            raise _bad_prompt(
                "this model has no tokenizer.json, so prompts must be lists of token ids"
            )
        ids = tokenizer.encode(text)
        if not ids:
            raise _bad_prompt(f"{field} {text[:40]!r} tokenized to nothing")
        return text, ids
    if isinstance(prompt, dict):
        field = f"{field}['prompt_token_ids']"
    return None, check_token_ids(ids, vocab_size, field)
