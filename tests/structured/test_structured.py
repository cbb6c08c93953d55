"""Structured output end to end in the engine: every kind of spec gives output that parses,
greedy and at temperature 1, on the embedded model and a random-weight one; unconstrained
requests beside constrained ones are untouched; n, stop strings, logprobs, preemption and
abort; concurrent constrained streams through the gRPC server, some cancelled, leave no
KV page or grammar state; no compilation after warm-up."""

from __future__ import annotations

import asyncio
import json
import random
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from jserve import SamplingParams, StructuredOutputsParams
from jserve.engine.async_engine import AsyncLLMEngine
from jserve.engine.llm_engine import LLMEngine
from jserve.engine.sampler import apply_bitmask
from jserve.errors import InvalidRequestError
from jserve.model_loader import default_model_path
from jserve.server.client import generate_request
from jserve.server.proto import generation_pb2 as pb
from tests.engine.helpers import greedy, make_engine, run
from tests.engine.test_compile_guard import no_compiles
from tests.server.helpers import serving, wait_until_free

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
        "role": {"enum": ["king", "queen", "fool"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {
            "type": "array",
            "items": {"type": "string", "pattern": "^[a-z]{1,5}$"},
            "minItems": 1,
            "maxItems": 3,
        },
        "home": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Verona", "Mantua", "Padua"]},
                "year": {"type": "integer", "minimum": 1300, "maximum": 1600},
            },
            "required": ["city", "year"],
            "additionalProperties": False,
        },
        "score": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.25},
    },
    "required": ["name", "role", "age", "tags", "home"],
    "additionalProperties": False,
}
REGEX = r"(Act|Scene) [IVX]{1,4}: [a-z]{2,8}( [a-z]{2,8}){0,3}\."
# Bounded (a small model may otherwise repeat "3-3-3-..." up to max_tokens): at most four
# terms of three factors, parentheses one level deep.
GRAMMAR = """root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= factor (("*" | "/") factor){0,2}
factor ::= num | "(" inner ")"
inner ::= num (("+" | "-" | "*" | "/") num){0,3}
num ::= [0-9]{1,3}
"""
CHOICE = ["Romeo", "Juliet", "Mercutio", "the Nurse"]
SPECS = {
    "json": StructuredOutputsParams(json=SCHEMA),
    "regex": StructuredOutputsParams(regex=REGEX),
    "grammar": StructuredOutputsParams(grammar=GRAMMAR),
    "choice": StructuredOutputsParams(choice=CHOICE),
}


def parse_arithmetic(text: str) -> None:
    """Raises ValueError unless text is a sentence of GRAMMAR."""
    pos = 0

    def peek() -> str:
        return text[pos] if pos < len(text) else ""

    def factor() -> None:
        nonlocal pos
        if peek() == "(":
            pos += 1
            expr()
            if peek() != ")":
                raise ValueError(f"expected ) at {pos} in {text!r}")
            pos += 1
            return
        m = re.match(r"[0-9]{1,3}", text[pos:])
        if not m:
            raise ValueError(f"expected a number at {pos} in {text!r}")
        pos += m.end()

    def chain(sub, ops: str) -> None:
        nonlocal pos
        sub()
        while peek() and peek() in ops:
            pos += 1
            sub()

    def term() -> None:
        chain(factor, "*/")

    def expr() -> None:
        chain(term, "+-")

    expr()
    if pos != len(text):
        raise ValueError(f"trailing text at {pos} in {text!r}")


def check(kind: str, text: str) -> None:
    if kind == "json":
        assert "\n" not in text, text  # bounded whitespace: separators only
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "grammar":
        parse_arithmetic(text)
    else:
        assert text in CHOICE, text


def requests(num_random: int, max_tokens: int = 160) -> list[tuple]:
    """Per kind: seeded requests at temperature 1, and one greedy."""
    out = []
    for kind, spec in SPECS.items():
        for i in range(num_random):
            sp = SamplingParams(max_tokens=max_tokens, seed=i, structured_outputs=spec)
            out.append((f"{kind}-{i}", f"ROMEO:\n{i}", sp, i))
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_outputs=spec)
        out.append((f"{kind}-greedy", "JULIET:\n", sp, 0))
    return out


def check_all(out: dict, reqs: list[tuple]) -> None:
    for rid, *_ in reqs:
        kind = rid.split("-")[0]
        for c in out[rid].outputs:
            assert c.finish_reason == "stop", (rid, c.text)
            check(kind, c.text)


@pytest.fixture(scope="module")
def embedded() -> LLMEngine:
    """The embedded model, warmed up: the tests here then compile nothing."""
    return make_engine(default_model_path(), warmup=True, max_model_len=256, max_logprobs=2)


@pytest.fixture(scope="module")
def random_model(tok_model_dir: str) -> LLMEngine:
    """A random-weight Llama with a byte-level BPE tokenizer, and a small KV pool."""
    return make_engine(tok_model_dir, num_pages=64, max_model_len=256)


def assert_clean(engine: LLMEngine) -> None:
    assert engine.is_idle() and engine.structured.num_active == 0


def test_every_kind_validates_on_the_embedded_model(embedded: LLMEngine) -> None:
    reqs = requests(num_random=4)
    with no_compiles():
        out = run(embedded, reqs)
    check_all(out, reqs)
    assert_clean(embedded)


@pytest.mark.slow
def test_many_seeds_of_every_kind_validate(embedded: LLMEngine, random_model) -> None:
    for engine, max_tokens in ((embedded, 160), (random_model, 200)):
        reqs = requests(num_random=16, max_tokens=max_tokens)
        out = run(engine, reqs)
        check_all(out, reqs)
        assert_clean(engine)


def test_every_kind_validates_on_a_random_model_under_preemption(random_model) -> None:
    reqs = requests(num_random=4, max_tokens=200)  # its tokens are mostly single bytes
    out = run(random_model, reqs)
    check_all(out, reqs)
    # 64 pages of 4 tokens for 8 running sequences of up to ~200: some are preempted
    # and recompute, their grammar state kept.
    assert random_model.scheduler.num_preemptions > 0
    assert_clean(random_model)


def test_unconstrained_requests_keep_their_solo_greedy_tokens(embedded: LLMEngine) -> None:
    def steps_until(rid: str, reqs: list[tuple]) -> tuple[list[int], int]:
        for r in reqs:
            embedded.add_request(r[0], r[1], r[2])
        tokens, steps, done = [], 0, False
        while embedded.has_unfinished_requests():
            for o in embedded.step():
                if o.request_id == rid:
                    tokens += o.outputs[0].token_ids
                    done = done or o.finished
            steps += not done
        return tokens, steps

    plain = [("u1", "ROMEO:\n", greedy(24)), ("u2", "KING:\n", greedy(20))]
    solo, solo_steps = steps_until("u1", plain)
    constrained = [
        (f"c{i}", "ROMEO:\n", SamplingParams(max_tokens=60, seed=i, structured_outputs=spec))
        for i, spec in enumerate(SPECS.values())
    ]
    with no_compiles():
        mixed, mixed_steps = steps_until("u1", [plain[0], *constrained, plain[1]])
    assert mixed == solo
    # Constrained sequences skip the steps their next mask waits on; the others never wait.
    assert mixed_steps == solo_steps
    assert_clean(embedded)


def test_constrained_sequences_decode_every_step(embedded: LLMEngine) -> None:
    """With asynchronous scheduling too, a constrained sequence takes a token every step:
    its mask is filled once the previous step's token arrives, just before dispatch."""
    assert embedded.ecfg.async_scheduling
    spec = StructuredOutputsParams(regex=r"[a-z ]+")
    params = SamplingParams(max_tokens=24, seed=1, ignore_eos=True, structured_outputs=spec)
    for i in range(3):
        embedded.add_request(f"m{i}", "ROMEO:\n", params)
    calls, tokens = 0, 0
    while embedded.has_unfinished_requests():
        tokens += sum(len(o.outputs[0].token_ids) for o in embedded.step())
        calls += 1
    assert tokens == 3 * 24
    assert calls <= 24 + 2  # the prompt, then one token a step (not one every other step)
    assert_clean(embedded)


def test_n_stop_strings_logprobs_and_length(embedded: LLMEngine) -> None:
    words = StructuredOutputsParams(regex=r"[a-z]{3,6}(, [a-z]{3,6}){2,5}\.")
    reqs = [
        ("n", "ROMEO:\n", SamplingParams(n=3, max_tokens=160, structured_outputs=SPECS["json"]), 0),
        ("stop", "A", SamplingParams(max_tokens=40, stop=[","], structured_outputs=words), 0),
        (
            "lp",
            "B",
            SamplingParams(max_tokens=20, logprobs=2, structured_outputs=SPECS["choice"]),
            0,
        ),
        ("short", "C", SamplingParams(max_tokens=5, structured_outputs=SPECS["json"]), 0),
    ]
    with no_compiles():
        out = run(embedded, reqs)
    assert len(out["n"].outputs) == 3
    for c in out["n"].outputs:
        assert c.finish_reason == "stop"
        check("json", c.text)
    (stop,) = out["stop"].outputs
    assert (stop.finish_reason, stop.stop_reason) == ("stop", ",")
    assert re.fullmatch(r"[a-z]{3,6}", stop.text), stop.text
    (lp,) = out["lp"].outputs
    assert lp.text in CHOICE and len(lp.logprobs) == len(lp.token_ids) > 0
    (short,) = out["short"].outputs  # max_tokens mid-structure
    assert short.finish_reason == "length" and len(short.token_ids) == 5
    assert short.text.startswith("{")
    assert_clean(embedded)


def test_abort_frees_the_grammar_state(embedded: LLMEngine) -> None:
    sp = SamplingParams(max_tokens=100, n=2, structured_outputs=SPECS["json"])
    embedded.add_request("a", "ROMEO:\n", sp)
    embedded.add_request("b", "JULIET:\n", SamplingParams(max_tokens=4))
    for _ in range(6):
        embedded.step()
    assert embedded.structured.num_active == 2
    embedded.abort_request("a")
    while embedded.has_unfinished_requests():
        embedded.step()
    assert_clean(embedded)


@pytest.mark.parametrize(
    "spec, match",
    [
        (StructuredOutputsParams(json={"type": "objectx"}), "invalid JSON schema"),
        (StructuredOutputsParams(json="{not json"), "json is not valid JSON"),
        (StructuredOutputsParams(regex="[0-9"), "invalid regex"),
        (StructuredOutputsParams(grammar="root ::= missing"), "invalid grammar"),
        (StructuredOutputsParams(choice=[]), "choice must be a non-empty list"),
        (StructuredOutputsParams(choice=["a", 3]), "choice must hold non-empty strings"),
        (StructuredOutputsParams(regex="a", choice=["a"]), "got regex, choice"),
        (StructuredOutputsParams(json_object=False), "got none"),
        ({"json": {}}, "must be a StructuredOutputsParams"),
    ],
)
def test_invalid_specs_are_refused_before_queueing(
    embedded: LLMEngine, spec: object, match: str
) -> None:
    with pytest.raises(InvalidRequestError, match=match) as e:
        embedded.add_request("bad", "A", SamplingParams(structured_outputs=spec))
    assert "structured_outputs" in str(e.value)
    assert not embedded.requests and not embedded.scheduler.waiting


def test_json_object_and_whitespace_pattern(embedded: LLMEngine) -> None:
    reqs = [
        (
            f"o{i}",
            "A",
            SamplingParams(
                max_tokens=60,
                seed=i,
                structured_outputs=StructuredOutputsParams(
                    json={
                        "type": "object",
                        "properties": {"x": {"type": "integer"}, "y": {"enum": ["a", "b"]}},
                        "required": ["x", "y"],
                        "additionalProperties": False,
                    },
                    whitespace_pattern=r"[\n ]{1,2}" if i % 2 else None,
                ),
            ),
            0,
        )
        for i in range(4)
    ]
    reqs.append(
        (
            "any",
            "B",
            SamplingParams(
                max_tokens=40, structured_outputs=StructuredOutputsParams(json_object=True)
            ),
            0,
        )
    )
    out = run(embedded, reqs)
    for rid, *_ in reqs:
        c = out[rid].outputs[0]
        if rid == "any" and c.finish_reason == "length":
            assert c.text.startswith("{")
            continue
        assert isinstance(json.loads(c.text), dict), c.text
    assert "\n" not in out["o0"].outputs[0].text and "\n" in out["o1"].outputs[0].text


def test_refused_with_speculative_decoding(llama_dir: str) -> None:
    spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1}
    engine = make_engine(llama_dir, speculative_config=spec)
    with pytest.raises(InvalidRequestError, match="speculative decoding"):
        engine.add_request("x", [1, 2], SamplingParams(structured_outputs=SPECS["regex"]))


def test_bitmask_bits_are_tokens() -> None:
    logits = jnp.zeros((2, 40))
    mask = np.zeros((2, 2), np.int32)
    mask[0, 0] = 0b101  # tokens 0 and 2
    mask[1, 1] = np.int32(-(2**31))  # bit 31 of word 1: token 63, past the vocabulary
    mask[1, 0] = np.int32(-(2**31))  # token 31
    out = np.asarray(apply_bitmask(logits, jnp.asarray(mask)))
    assert np.flatnonzero(np.isfinite(out[0])).tolist() == [0, 2]
    assert np.flatnonzero(np.isfinite(out[1])).tolist() == [31]


# -- through the gRPC server ------------------------------------------------------

KINDS = {
    "json": pb.StructuredOutputs(json=json.dumps(SCHEMA)),
    "regex": pb.StructuredOutputs(regex=REGEX),
    "grammar": pb.StructuredOutputs(grammar=GRAMMAR),
    "choice": pb.StructuredOutputs(choice=pb.Choices(choices=CHOICE)),
}


@pytest.fixture
def warm_aengine(embedded: LLMEngine):
    """The warm embedded engine behind the async front end, for one test (its loop thread
    must not step the engine while other tests do)."""
    eng = AsyncLLMEngine(embedded)
    yield eng
    eng.shutdown()


def _concurrent(aengine: AsyncLLMEngine, num: int) -> None:
    rng = random.Random(num)
    kinds = list(KINDS)

    async def one(client, i: int) -> tuple[str, str | None, str | None]:
        kind = kinds[i % len(kinds)]
        cancel = rng.random() < 0.3
        req = generate_request(
            f"ROMEO:\n{i}", max_tokens=200, seed=i, structured_outputs=KINDS[kind]
        )
        call = client.generation.Generate(req, metadata=client.metadata)
        text, reason = "", None
        async for msg in call:
            text += msg.text
            if msg.finish_reason:
                reason = pb.FinishReason.Name(msg.finish_reason)
            if cancel:
                call.cancel()
                return kind, None, None
        return kind, text, reason

    async def main() -> list:
        async with serving(aengine) as (_, client):
            results = await asyncio.gather(*(one(client, i) for i in range(num)))
            await wait_until_free(aengine, timeout=30)
            return results

    with no_compiles():
        results = asyncio.run(main())
    done = [(k, t, r) for k, t, r in results if t is not None]
    assert len(done) >= num // 2
    for kind, text, reason in done:
        assert reason == "FINISH_REASON_STOP", (kind, text)
        check(kind, text)
    assert_clean(aengine.engine)


def test_concurrent_constrained_streams_with_cancellations(warm_aengine) -> None:
    _concurrent(warm_aengine, 16)


def test_an_invalid_spec_is_invalid_argument(warm_aengine) -> None:
    import grpc

    async def main() -> None:
        async with serving(warm_aengine) as (_, client):
            for so in (pb.StructuredOutputs(regex="[0-"), pb.StructuredOutputs()):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await client.generate("A", structured_outputs=so)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "structured_outputs" in e.value.details()

    asyncio.run(main())
    assert warm_aengine.engine.is_idle()


@pytest.mark.slow
def test_64_concurrent_constrained_streams_with_cancellations(warm_aengine) -> None:
    _concurrent(warm_aengine, 64)
