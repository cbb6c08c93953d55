"""Wire <-> engine conversions, without a server."""

from __future__ import annotations

import pytest

from jserve import InvalidRequestError, SamplingParams, StructuredOutputsParams
from jserve.outputs import CompletionOutput, Logprob, RequestOutput
from jserve.server import convert
from jserve.server.proto import generation_pb2 as pb
from jserve.server.proto import jetstream_pb2 as js

GREEDY = SamplingParams(temperature=0.0)


def test_unset_sampling_fields_keep_defaults() -> None:
    sp = convert.sampling_params(pb.SamplingParameters(temperature=0.0, stop=["\n"]))
    default = SamplingParams()
    assert sp.temperature == 0.0 and sp.stop == ["\n"]
    assert (sp.n, sp.max_tokens, sp.top_p, sp.top_k, sp.seed, sp.logprobs) == (
        default.n,
        default.max_tokens,
        default.top_p,
        default.top_k,
        default.seed,
        default.logprobs,
    )
    assert convert.sampling_params(pb.SamplingParameters(n=0)).n == 0  # explicit 0 is kept


def test_logit_bias_map() -> None:
    sp = convert.sampling_params(pb.SamplingParameters(logit_bias={5: 2.5, 7: -100}))
    assert sp.logit_bias == {5: 2.5, 7: -100.0}
    assert convert.sampling_params(pb.SamplingParameters()).logit_bias is None


def test_structured_outputs_message() -> None:
    def so(**kw) -> object:
        return convert.sampling_params(
            pb.SamplingParameters(structured_outputs=pb.StructuredOutputs(**kw))
        ).structured_outputs

    assert so(json='{"type": "object"}') == StructuredOutputsParams(json='{"type": "object"}')
    assert so(regex="a+") == StructuredOutputsParams(regex="a+")
    assert so(grammar="root ::= x") == StructuredOutputsParams(grammar="root ::= x")
    assert so(json_object=True) == StructuredOutputsParams(json_object=True)
    assert so(json_object=True, whitespace_pattern=" ?") == StructuredOutputsParams(
        json_object=True, whitespace_pattern=" ?"
    )
    assert so(choice=pb.Choices(choices=["a", "b"])) == StructuredOutputsParams(choice=["a", "b"])
    assert convert.sampling_params(pb.SamplingParameters()).structured_outputs is None
    with pytest.raises(InvalidRequestError, match="structured_outputs is set but empty"):
        so()


def test_any_int64_seed_is_passed_through() -> None:
    for seed in (-1, 2**32, 2**63 - 1):
        sp = convert.sampling_params(pb.SamplingParameters(seed=seed))
        sp.validate()
        assert sp.seed == seed


def test_jetstream_bos_handling() -> None:
    tokens = js.DecodeRequest(token_content=js.DecodeRequest.TokenContent(token_ids=[5, 6]))
    assert convert.jetstream_request(tokens, 1, GREEDY).prompt == [1, 5, 6]
    assert convert.jetstream_request(tokens, None, GREEDY).prompt == [5, 6]
    tokens.has_bos = True
    assert convert.jetstream_request(tokens, 1, GREEDY).prompt == [5, 6]
    text = js.DecodeRequest(text_content=js.DecodeRequest.TextContent(text="hi"))
    jp = convert.jetstream_request(text, 1, GREEDY)
    assert jp.prompt == "hi" and jp.add_bos and jp.text_mode
    assert not convert.jetstream_request(text, None, GREEDY).add_bos
    text.has_bos = True
    assert not convert.jetstream_request(text, 1, GREEDY).add_bos


def test_jetstream_defaults_and_errors() -> None:
    req = js.DecodeRequest(token_content=js.DecodeRequest.TokenContent(token_ids=[5]))
    jp = convert.jetstream_request(req, None, GREEDY)
    assert (jp.params.n, jp.params.max_tokens, jp.params.temperature) == (1, None, 0.0)
    assert not jp.text_mode
    req.num_samples, req.max_tokens = 3, 7
    assert convert.jetstream_request(req, None, GREEDY).params.n == 3
    with pytest.raises(InvalidRequestError, match="no content"):
        convert.jetstream_request(js.DecodeRequest(max_tokens=3), None, GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        convert.jetstream_request(
            js.DecodeRequest(token_content=js.DecodeRequest.TokenContent()), 1, GREEDY
        )
    with pytest.raises(InvalidRequestError, match="num_samples"):
        convert.jetstream_request(js.DecodeRequest(num_samples=-1, text_content={}), None, GREEDY)


def _out(outputs: list[CompletionOutput], finished: bool = False) -> RequestOutput:
    return RequestOutput("r", None, [1, 2, 3], outputs, finished=finished, num_cached_tokens=2)


def test_generate_responder_messages_and_usage() -> None:
    params = SamplingParams(n=2, logprobs=1)
    lp = {7: Logprob(-0.5, 2, "a"), 9: Logprob(-0.1, 1, "b")}
    respond = convert.GenerateResponder("r", params)
    msgs = respond(
        _out([CompletionOutput(0, "a", [7], logprobs=[lp]), CompletionOutput(1, "", [])])
    )
    assert [(m.index, list(m.token_ids)) for m in msgs] == [(0, [7])]
    assert msgs[0].logprobs[0].sampled.token_id == 7 and msgs[0].logprobs[0].sampled.rank == 2
    assert [t.token_id for t in msgs[0].logprobs[0].top] == [9]  # rank <= 1 only
    msgs = respond(
        _out(
            [
                CompletionOutput(0, "", [], logprobs=[], finish_reason="stop", stop_reason="x"),
                CompletionOutput(1, "b", [9], logprobs=[lp], finish_reason="length"),
            ],
            finished=True,
        )
    )
    assert [m.index for m in msgs] == [0, 1]
    assert msgs[0].finish_reason == pb.FINISH_REASON_STOP and msgs[0].stop_string == "x"
    assert not msgs[0].HasField("usage")
    assert msgs[1].finish_reason == pb.FINISH_REASON_LENGTH
    assert msgs[1].usage == pb.Usage(prompt_tokens=3, completion_tokens=2, cached_tokens=2)


def test_jetstream_responder_drops_eos_and_empty_steps() -> None:
    respond = convert.JetStreamResponder(2, text_mode=True, eos_token_ids=[0])
    assert respond(_out([CompletionOutput(0, "", [])])) == []
    (msg,) = respond(
        _out([CompletionOutput(0, "", [0], finish_reason="stop"), CompletionOutput(1, "z", [4])])
    )
    samples = msg.stream_content.samples
    assert [list(s.token_ids) for s in samples] == [[], [4]]
    assert [s.text for s in samples] == ["", "z"]
