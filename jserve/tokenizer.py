"""Tokenizer wrapper on the ``tokenizers`` library: encode, decode, streaming decode."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import tokenizers
from tokenizers.decoders import DecodeStream

from checkpoints.files import check_file, read_json
from jserve.errors import ConfigError


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A Hugging Face ``tokenizer.json`` plus the model's special token ids."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        eos_token_ids: Iterable[int] = (),
        bos_token_id: int | None = None,
    ) -> None:
        self._tok = tok
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self.bos_token_id = bos_token_id
        self.special_token_ids = frozenset(
            i for i, t in tok.get_added_tokens_decoder().items() if t.special
        )

    @classmethod
    def from_dir(
        cls, model_dir: str | os.PathLike[str], eos_token_ids: Iterable[int] = ()
    ) -> Tokenizer:
        path = os.path.join(model_dir, "tokenizer.json")
        if not check_file(path, ConfigError, required=False):
            raise ConfigError(
                f"{path} not found: text prompts need a Hugging Face fast tokenizer "
                "(tokenizer.json); pass token ids instead, or add the file"
            )
        try:
            tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the library raises a bare Exception for any bad file
            raise ConfigError(
                f"{path} is not a valid Hugging Face tokenizer ({e}); replace it with the "
                "tokenizer.json that belongs to the model"
            ) from None
        eos = list(eos_token_ids)
        bos = None
        cfg_path = os.path.join(model_dir, "tokenizer_config.json")
        tcfg = read_json(cfg_path, ConfigError, required=False)
        if tcfg is not None:
            eos_tok = _token_content(tcfg.get("eos_token"))
            if eos_tok is not None and tok.token_to_id(eos_tok) is not None:
                eos.append(tok.token_to_id(eos_tok))
            bos_tok = _token_content(tcfg.get("bos_token"))
            if bos_tok is not None:
                bos = tok.token_to_id(bos_tok)
        return cls(tok, eos, bos)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_id(self) -> int:
        """The largest id the tokenizer can produce (ids need not be contiguous)."""
        return max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def to_json(self) -> str:
        """The tokenizer as Hugging Face's tokenizer.json text, for libraries that build
        their own view of the vocabulary (the grammar engine of jserve.structured)."""
        return self._tok.to_str()

    def stream(
        self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> IncrementalDecoder:
        return IncrementalDecoder(self, prompt_ids, skip_special_tokens)


class IncrementalDecoder:
    """Turns generated ids into text pieces as they arrive.

    A token that ends inside a multi-byte UTF-8 character yields "" until the
    character is complete, so the concatenated pieces are always valid text
    and equal to decoding all generated ids at once. The prompt ids give the
    decoder context (e.g. whether a leading space belongs to the first word).
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool
    ) -> None:
        self._tokenizer = tokenizer
        # Only the tail of the prompt matters for context.
        self._stream = DecodeStream(list(prompt_ids[-8:]), skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        piece = self._stream.step(self._tokenizer._tok, int(token_id))
        return piece or ""
