"""Property-based fuzz of the gRPC API: SamplingParameters and prompt forms through
Generate, JetStream Decode, and raw bytes where a request message should be.

Every request either runs to the end (finished samples, valid token ids, within
max_tokens) or gets INVALID_ARGUMENT, and leaves no request or KV page behind;
afterwards the server gives a known-good request the same tokens as before.
Bounded for the default suite: one server on the server tests' shared engine, short
generations, a fixed number of examples, derandomized so a run is repeatable.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jserve.engine.async_engine import AsyncLLMEngine
from jserve.server.app import start_server
from jserve.server.client import Client, decode_request, generate_request
from jserve.server.proto import generation_pb2 as pb
from jserve.server.proto import jetstream_pb2 as js
from tests.server.helpers import wait_until_free

VOCAB = 320  # tok_model_dir's embedding rows
KNOWN_GOOD = generate_request([5, 17, 200, 3, 9], max_tokens=6, temperature=0.0, ignore_eos=True)
GENERATE = "/jserve.v1.Generation/Generate"
DECODE = "/jetstream_proto.Orchestrator/Decode"
FINISHED = (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)

int32 = st.integers(-(2**31), 2**31 - 1)
float32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
# Valid values for each SamplingParameters field, so that generation runs...
VALID = {
    "n": st.integers(1, 3),
    "max_tokens": st.integers(1, 8),
    "min_tokens": st.integers(0, 4),
    "temperature": st.one_of(st.just(0.0), st.floats(0, 2, width=32)),
    "top_p": st.floats(0, 1, exclude_min=True, width=32),
    "top_k": st.one_of(st.just(-1), st.integers(1, 400)),
    "min_p": st.floats(0, 1, width=32),
    "repetition_penalty": st.floats(0, 3, exclude_min=True, width=32),
    "presence_penalty": st.floats(-2, 2, width=32),
    "frequency_penalty": st.floats(-2, 2, width=32),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3),
    "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "logprobs": st.integers(0, 5),
    "skip_special_tokens": st.booleans(),
}
# ...and whatever else the wire can carry for it.
# Lengths past the model's maximum (512) are refused; the valid ones stay short, so
# that no example generates for long.
refused_lengths = st.one_of(st.integers(-(2**31), 0), st.integers(600, 2**31 - 1))
HOSTILE = {
    **{k: int32 for k in ("n", "min_tokens", "top_k", "logprobs")},
    "max_tokens": refused_lengths,
    **{
        k: float32
        for k in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        )
    },
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.lists(st.text(max_size=40), max_size=6),
    "stop_token_ids": st.lists(int32, max_size=4),
    "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(),
}


@st.composite
def sampling(draw: st.DrawFn) -> pb.SamplingParameters:
    """Valid fields, with up to two replaced by anything of their wire type."""
    fields = draw(st.fixed_dictionaries({}, optional=VALID))
    for key in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=2, unique=True)):
        fields[key] = draw(HOSTILE[key])
    return pb.SamplingParameters(**fields)


# Text with control characters and any code point protobuf can carry (no surrogates),
# short enough to stay in the small step shapes (each new one compiles on first use).
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=4)
good_text = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=4)
good_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)
any_ids = st.lists(int32, max_size=8)


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    req = pb.GenerateRequest(sampling=draw(sampling()))
    form = draw(st.sampled_from(["text", "ids", "text", "ids", "any text", "any ids", "none"]))
    if form in ("text", "any text"):
        req.text = draw(good_text if form == "text" else any_text)
    elif form in ("ids", "any ids"):
        req.token_ids.ids.extend(draw(good_ids if form == "ids" else any_ids))
    req.request_id = draw(st.one_of(st.just(""), st.text(max_size=8)))
    req.priority = draw(st.one_of(st.just(0), int32))
    return req


@st.composite
def decode_requests(draw: st.DrawFn) -> js.DecodeRequest:
    form = draw(st.sampled_from(["text", "ids", "any text", "any ids", "none"]))
    prompt: Any = {
        "text": good_text,
        "any text": any_text,
        "ids": good_ids,
        "any ids": any_ids,
        "none": st.just(None),
    }[form]
    req = decode_request(
        "",
        # 0 means up to the model's maximum length: long, and covered elsewhere.
        max_tokens=draw(st.one_of(st.integers(1, 8), refused_lengths.filter(bool))),
        num_samples=draw(st.one_of(st.integers(0, 3), int32)),
        has_bos=draw(st.booleans()),
    )
    req.ClearField("content")
    value = draw(prompt)
    if isinstance(value, str):
        req.text_content.text = value
    elif isinstance(value, list):
        req.token_content.token_ids.extend(value)
    return req


@st.composite
def raw_messages(draw: st.DrawFn) -> tuple[str, bytes]:
    """Bytes on a Generate or Decode call: random, or a real message cut short or
    with junk after it."""
    method = draw(st.sampled_from([GENERATE, DECODE]))
    real = draw(generate_requests() if method == GENERATE else decode_requests())
    data = real.SerializeToString()
    how = draw(st.sampled_from(["random", "cut", "appended"]))
    if how == "random":
        data = draw(st.binary(max_size=48))
    elif how == "cut":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    else:
        data += draw(st.binary(min_size=1, max_size=16))
    return method, data


requests = st.one_of(generate_requests(), generate_requests(), decode_requests(), raw_messages())


def _check_generate(msgs: list[pb.GenerateResponse], req: pb.GenerateRequest) -> None:
    finished: dict[int, int] = {}
    tokens: dict[int, int] = {}
    for m in msgs:
        assert all(0 <= t < VOCAB for t in m.token_ids), m
        tokens[m.index] = tokens.get(m.index, 0) + len(m.token_ids)
        if m.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            assert m.finish_reason in FINISHED, m
            finished[m.index] = m.finish_reason
    n = req.sampling.n if req.sampling.HasField("n") else 1
    assert sorted(finished) == list(range(n)), msgs
    assert msgs[-1].HasField("usage")
    if req.sampling.HasField("max_tokens"):
        assert all(t <= req.sampling.max_tokens for t in tokens.values()), tokens


def _check_decode(msgs: list[js.DecodeResponse]) -> None:
    for m in msgs:
        for s in m.stream_content.samples:
            assert all(0 <= t < VOCAB for t in s.token_ids), m


@pytest.mark.timeout(240)
def test_fuzz_grpc_requests(aengine: AsyncLLMEngine) -> None:
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    server = run(start_server(aengine, port=0))

    async def connect() -> Client:  # the channel belongs to the loop it is made in
        return Client(f"127.0.0.1:{server.port}")

    client = run(connect())
    raw = {
        m: client.channel.unary_stream(m, request_serializer=None, response_deserializer=None)
        for m in (GENERATE, DECODE)
    }
    outcomes = {"ran": 0, "refused": 0}

    async def call(req: Any) -> list[Any]:
        if isinstance(req, pb.GenerateRequest):
            msgs = [m async for m in client.generation.Generate(req, timeout=60)]
            _check_generate(msgs, req)
        elif isinstance(req, js.DecodeRequest):
            msgs = [m async for m in client.jetstream.Decode(req, timeout=60)]
            _check_decode(msgs)
        else:
            method, data = req
            msgs = [m async for m in raw[method](data, timeout=60)]
        return msgs

    async def one_request(req: Any) -> None:
        try:
            await call(req)
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (req, e)
            assert e.details(), req
            outcomes["refused"] += 1
        else:
            outcomes["ran"] += 1
        await wait_until_free(aengine)

    try:
        expected = run(client.generate(KNOWN_GOOD)).token_ids

        @settings(
            max_examples=80,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(requests)
        def one(req: Any) -> None:
            run(one_request(req))

        one()
        # Both branches were exercised, and the server serves as before.
        assert outcomes["ran"] >= 10 and outcomes["refused"] >= 10, outcomes
        assert run(client.generate(KNOWN_GOOD)).token_ids == expected
        assert aengine.dead is None and server.core.live
    finally:
        run(client.close())
        run(server.stop(grace=1))
        loop.close()
