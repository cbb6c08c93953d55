"""The tokenizer wrapper: encode/decode, special tokens, streaming decode."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from jserve.tokenizer import Tokenizer

TEXT = "To be, or not to be: that is the question. Ünïcödé — 日本語 ✓ 🙂\n" * 20


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer)
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return str(d)


def test_round_trip_and_eos(tok_dir: str) -> None:
    tok = Tokenizer.from_dir(tok_dir)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.eos_token_ids == (tok.token_to_id("<|endoftext|>"),)
    assert tok.token_to_id("<|endoftext|>") in tok.special_token_ids
    # Special tokens are dropped from text unless asked for.
    with_eos = [*ids[:3], tok.eos_token_ids[0]]
    assert tok.decode(with_eos) == tok.decode(ids[:3])
    assert tok.decode(with_eos, skip_special_tokens=False).endswith("<|endoftext|>")


def test_streaming_decode_never_emits_broken_utf8(tok_dir: str) -> None:
    tok = Tokenizer.from_dir(tok_dir)
    ids = tok.encode(TEXT)
    stream = tok.stream()
    pieces = [stream.step(t) for t in ids]
    for p in pieces:
        p.encode("utf-8")  # each piece is valid text on its own
        assert "\ufffd" not in p
    assert "".join(pieces) == TEXT
    # Some token ended inside a multi-byte character and had to wait.
    assert "" in pieces


def test_streaming_decode_with_prompt_context(tok_dir: str) -> None:
    tok = Tokenizer.from_dir(tok_dir)
    prompt = tok.encode("To be, or")
    cont = tok.encode(" not to be")
    stream = tok.stream(prompt)
    assert "".join(stream.step(t) for t in cont) == " not to be"
