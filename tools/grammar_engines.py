"""Compares grammar engines on a model's tokenizer: compile time, per-token mask cost, validity.

    python -m tools.grammar_engines [--model DIR] [--runs 20]

Each run walks one JSON-schema-constrained sequence, drawing a random allowed token at every
step (the worst case for a cache-friendly engine: no model steers it into familiar paths),
and times only the mask computation. The output is checked with ``jsonschema``. xgrammar
is measured when it is installed (it is not a jserve dependency: it needs torch).
"""

from __future__ import annotations

import argparse
import json
import time

import jsonschema
import numpy as np

from jserve.model_loader import default_model_path
from jserve.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def _allowed(mask_row: np.ndarray, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(mask_row.view(np.uint8), bitorder="little")[:vocab])


def llguidance_runs(tok: Tokenizer, vocab: int, runs: int, rng: np.random.Generator) -> dict:
    import llguidance
    import llguidance.numpy as llnp

    from jserve.structured.manager import COMPACT_JSON

    llt = llguidance.LLTokenizer(
        tok._tok.to_str(), n_vocab=vocab, eos_token=list(tok.eos_token_ids)
    )
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), defaults=COMPACT_JSON
    )
    proto = llguidance.LLMatcher(llt, grammar, log_level=0)
    compile_s = time.perf_counter() - t0
    mask = llnp.allocate_token_bitmask(1, vocab)
    spent, tokens, valid = 0.0, 0, 0
    for _ in range(runs):
        m, out = proto.deep_copy(), []
        while not m.is_stopped() and len(out) < 400:
            t0 = time.perf_counter()
            llnp.fill_next_token_bitmask(m, mask, 0)
            spent += time.perf_counter() - t0
            t = int(rng.choice(_allowed(mask[0], vocab)))
            assert m.consume_token(t), m.get_error()
            out.append(t)
        tokens += len(out)
        valid += _valid(tok.decode(out))
    return dict(compile_ms=1e3 * compile_s, mask_us=1e6 * spent / tokens, valid=valid)


def xgrammar_runs(tok: Tokenizer, vocab: int, model: str, runs: int, rng) -> dict | None:
    try:
        import xgrammar
        from transformers import AutoTokenizer
    except ImportError:
        return None
    info = xgrammar.TokenizerInfo.from_huggingface(
        AutoTokenizer.from_pretrained(model), vocab_size=vocab
    )
    compiler = xgrammar.GrammarCompiler(info)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - t0
    mask = xgrammar.allocate_token_bitmask(1, vocab)
    spent, tokens, valid = 0.0, 0, 0
    for _ in range(runs):
        m, out = xgrammar.GrammarMatcher(compiled), []
        while not m.is_terminated() and len(out) < 400:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask, 0)
            spent += time.perf_counter() - t0
            t = int(rng.choice(_allowed(mask[0].numpy(), vocab)))
            assert m.accept_token(t)
            out.append(t)
        tokens += len(out)
        valid += _valid(tok.decode(out))
    return dict(compile_ms=1e3 * compile_s, mask_us=1e6 * spent / tokens, valid=valid)


def _valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=default_model_path())
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args()
    tok = Tokenizer.from_dir(args.model)
    vocab = tok.vocab_size
    for name, fn in (
        ("llguidance", lambda rng: llguidance_runs(tok, vocab, args.runs, rng)),
        ("xgrammar", lambda rng: xgrammar_runs(tok, vocab, args.model, args.runs, rng)),
    ):
        r = fn(np.random.default_rng(0))
        if r is None:
            print(f"{name}: not installed")
            continue
        print(
            f"{name}: compile {r['compile_ms']:.2f} ms, mask {r['mask_us']:.1f} us/token, "
            f"{r['valid']}/{args.runs} valid (vocabulary {vocab})"
        )


if __name__ == "__main__":
    main()
