"""The OpenAI-compatible HTTP API of a real ``jserve serve`` process, through the official
``openai`` client (sync and async, streamed and whole) and plain HTTP.

One server process serves the whole package (the tiny random Llama with a real
tokenizer; its chat template sits in tokenizer_config.json). Sampling fields
are checked against the gRPC API of the same process: the same fields there
give the same tokens, and leaving a field out changes them.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from jserve.server.client import Client
from jserve.server.proto import generation_pb2 as pb
from tests.server.helpers import metric
from tests.server.http_api.common import (
    EOS_PROMPT,
    MODEL,
    PROMPT,
    error_of,
    grpc_generate,
    render,
    sse_events,
)
from tests.server.openai_process import ServeProcess

pytestmark = pytest.mark.timeout(300)


# -- models, completions --------------------------------------------------------


def test_models(client: openai.OpenAI, http: httpx.Client) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 512


def test_completion_matches_grpc_and_counts_usage(
    server: ServeProcess, client: openai.OpenAI, tok: Tokenizer
) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    ref = grpc_generate(server, PROMPT, max_tokens=12, temperature=0.0)
    (choice,) = r.choices
    assert choice.text == ref.text[0] and choice.finish_reason == "length"
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    n_prompt = len(tok.encode(PROMPT).ids)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 12)
    assert r.usage.total_tokens == n_prompt + 12
    # The default max_tokens is OpenAI's 16; the default temperature 1 samples.
    r = client.completions.create(model=MODEL, prompt=PROMPT, seed=1)
    assert r.usage.completion_tokens == 16


def test_prompt_forms(client: openai.OpenAI, tok: Tokenizer) -> None:
    ids = tok.encode(PROMPT).ids
    greedy = dict(model=MODEL, max_tokens=6, temperature=0)
    text = client.completions.create(prompt=PROMPT, **greedy).choices[0].text
    assert client.completions.create(prompt=ids, **greedy).choices[0].text == text
    r = client.completions.create(prompt=[ids, ids[:2]], **greedy)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == text
    r = client.completions.create(prompt=["Speak, speak.", PROMPT], n=2, **greedy)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]  # prompt i, sample j: i * n + j
    assert r.choices[2].text == r.choices[3].text == text != r.choices[0].text
    assert r.usage.prompt_tokens == len(tok.encode("Speak, speak.").ids) + len(ids)
    assert r.usage.completion_tokens == 4 * 6


@pytest.mark.parametrize(
    "field, value, base",
    [
        ("temperature", 0.0, {"seed": 3}),
        ("top_p", 0.3, {"seed": 3}),
        ("top_k", 2, {"seed": 3}),
        ("min_p", 0.5, {"seed": 3}),
        ("seed", 4, {"seed": 3}),
        ("presence_penalty", 2.0, {"temperature": 0.0}),
        ("frequency_penalty", 2.0, {"temperature": 0.0}),
        ("repetition_penalty", 2.0, {"temperature": 0.0}),
        ("logit_bias", {"11": 100, "12": -100}, {"temperature": 0.0}),
    ],
)
def test_sampling_fields_reach_the_engine(
    server: ServeProcess, client: openai.OpenAI, field: str, value, base: dict
) -> None:
    prompt = "All: 1 citizens"  # greedy repeats one token: penalties change it
    kw = {**base, field: value}

    def create(**kw):  # vLLM's extras go in the body beside OpenAI's fields
        extra = {k: kw.pop(k) for k in ("top_k", "min_p", "repetition_penalty") if k in kw}
        return client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=16, extra_body=extra, **kw
        )

    got = create(**kw)
    if field == "logit_bias":  # the gRPC map takes integer keys
        kw["logit_bias"] = {int(k): float(v) for k, v in value.items()}
    ref = grpc_generate(server, prompt, max_tokens=16, **kw)
    assert got.choices[0].text == ref.text[0]
    without = create(**base)
    assert without.choices[0].text != got.choices[0].text, f"{field} made no difference"


def test_n_samples_like_grpc(server: ServeProcess, client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=3, seed=7)
    ref = grpc_generate(server, PROMPT, max_tokens=8, n=3, seed=7)
    assert [c.text for c in r.choices] == ref.text
    assert len(set(ref.text)) > 1 and r.usage.completion_tokens == 24


def test_stop_fields(server: ServeProcess, client: openai.OpenAI) -> None:
    greedy = dict(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=16)
    ref = grpc_generate(server, PROMPT, max_tokens=16, temperature=0.0)
    ids, text = ref.token_ids[0], ref.text[0]
    stop = text[5:7]
    r = client.completions.create(stop=[stop], **greedy)
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.text == text[: text.index(stop)]
    assert c.model_extra["stop_reason"] == stop
    r = client.completions.create(
        stop=stop, extra_body={"include_stop_str_in_output": True}, **greedy
    )
    assert r.choices[0].text == text[: text.index(stop) + len(stop)]
    r = client.completions.create(extra_body={"stop_token_ids": [ids[3]]}, **greedy)
    c = r.choices[0]
    assert (c.finish_reason, c.model_extra["stop_reason"]) == ("stop", ids[3])
    assert r.usage.completion_tokens == ids.index(ids[3]) + 1
    # min_tokens holds the stop token back for its first tokens.
    first = dict(stop_token_ids=[ids[0]], min_tokens=4)
    r = client.completions.create(extra_body=first, **greedy)
    assert r.usage.completion_tokens >= 4


def test_eos_fields(client: openai.OpenAI) -> None:
    greedy = dict(model=MODEL, prompt=EOS_PROMPT, temperature=0, max_tokens=16)
    r = client.completions.create(**greedy)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 12
    assert "<|endoftext|>" not in r.choices[0].text
    r = client.completions.create(extra_body={"ignore_eos": True}, **greedy)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 16
    assert "<|endoftext|>" not in r.choices[0].text
    r = client.completions.create(
        extra_body={"ignore_eos": True, "skip_special_tokens": False}, **greedy
    )
    assert "<|endoftext|>" in r.choices[0].text


def test_accepted_fields(client: openai.OpenAI) -> None:
    """Fields with no effect on a single request's tokens are accepted (unknown ones are not)."""
    r = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=2,
        user="someone",
        logit_bias={},
        extra_body={"priority": 5},
    )
    assert r.usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, extra_body={"best_of": 2})
    assert e.value.body["param"] == "best_of"


def test_logprobs(server: ServeProcess, client: openai.OpenAI, tok: Tokenizer) -> None:
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3
    )
    ref = grpc_generate(server, PROMPT, max_tokens=8, temperature=0.0, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in ref.token_ids[0]]
    want = [p.sampled.logprob for p in ref.logprobs[0]]
    assert lp.token_logprobs == pytest.approx(want, abs=1e-5)
    for i, top in enumerate(lp.top_logprobs):
        # The 3 most likely tokens by their text (greedy: the chosen one is among them;
        # two tokens with the same text share one entry, as in OpenAI's legacy format).
        want_top = {t.token: t.logprob for t in reversed(ref.logprobs[0][i].top)}
        assert top == pytest.approx(want_top, abs=1e-5)
        assert max(top.values()) == pytest.approx(lp.token_logprobs[i])
    offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.text_offset == offsets


def test_echo_returns_the_prompt_first(server: ServeProcess, client: openai.OpenAI, tok) -> None:
    ref = grpc_generate(server, PROMPT, max_tokens=4, temperature=0.0)
    kw = dict(model=MODEL, max_tokens=4, temperature=0, echo=True)
    r = client.completions.create(prompt=PROMPT, **kw)
    assert r.choices[0].text == PROMPT + ref.text[0]
    r = client.completions.create(prompt=tok.encode(PROMPT).ids, **kw)  # ids: decoded
    assert r.choices[0].text == PROMPT + ref.text[0]
    chunks = list(client.completions.create(prompt=PROMPT, stream=True, **kw))
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + ref.text[0]


def test_streamed_completion_equals_whole(client: openai.OpenAI, http: httpx.Client) -> None:
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=1)
    whole = client.completions.create(**kw)
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    streamed_lp = [t for c in chunks if c.choices for t in c.choices[0].logprobs.token_logprobs]
    assert streamed_lp == pytest.approx(whole.choices[0].logprobs.token_logprobs)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    # Without include_usage no usage chunk; the stream ends with [DONE].
    body = {"prompt": PROMPT, "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert all(p["choices"] and "usage" not in p for p in payloads)


def test_async_client_streams_and_completes(server: ServeProcess) -> None:
    async def main():
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="unused", max_retries=0
        ) as c:
            kw = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
            whole = await c.completions.create(**kw)
            stream = await c.completions.create(stream=True, **kw)
            text = "".join([ch.choices[0].text async for ch in stream])
            messages = [{"role": "user", "content": "Speak"}]
            chat = await c.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=5, temperature=0
            )
            stream = await c.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=5, temperature=0, stream=True
            )
            deltas = [ch.choices[0].delta async for ch in stream]
            return whole, text, chat, deltas

    whole, text, chat, deltas = asyncio.run(main())
    assert text == whole.choices[0].text
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == chat.choices[0].message.content


# -- chat -----------------------------------------------------------------------


def test_chat_renders_the_models_template(
    server: ServeProcess, client: openai.OpenAI, tok: Tokenizer, http: httpx.Client
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    prompt_ids = tok.encode(render(messages), add_special_tokens=False).ids
    ref = grpc_generate(server, prompt_ids, max_tokens=6, temperature=0.0)
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == ref.text[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt_ids), 6)
    # Text parts are joined as one string; tools and template kwargs reach the template.
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "Speak"}]}]
    r2 = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=6, temperature=0)
    assert r2.choices[0].message.content == ref.text[0]
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    body = {"messages": messages, "add_generation_prompt": False}
    assert http.post("/tokenize", json=body).json()["tokens"] == (
        tok.encode(render(messages, False), add_special_tokens=False).ids
    )
    r3 = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=tools,
        tool_choice="auto",
        max_tokens=2,
        extra_body={"chat_template_kwargs": {"greeting": "Hail"}},
    )
    want = tok.encode(render(messages, tools=tools, greeting="Hail"), add_special_tokens=False)
    assert r3.usage.prompt_tokens == len(want.ids)
    r4 = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, extra_body={"add_generation_prompt": False}
    )
    assert r4.usage.prompt_tokens == len(
        tok.encode(render(messages, False), add_special_tokens=False).ids
    )


def test_chat_streams_role_first(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Speak"}]
    kw = dict(model=MODEL, messages=messages, max_completion_tokens=6, seed=5, n=2)
    whole = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    by_index: dict[int, list] = {0: [], 1: []}
    for ch in chunks[:-1]:
        (c,) = ch.choices
        by_index[c.index].append(c)
    for i, cs in by_index.items():
        assert cs[0].delta.role == "assistant" and all(c.delta.role is None for c in cs[1:])
        assert "".join(c.delta.content or "" for c in cs) == whole.choices[i].message.content
        assert cs[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 12 == whole.usage.completion_tokens
    assert chunks[0].object == "chat.completion.chunk"
    # max_tokens (the older name) limits the same way.
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_chat_logit_bias(client: openai.OpenAI, tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Speak"}]
    kw = dict(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    r = client.chat.completions.create(logit_bias={"11": 100}, **kw)
    assert r.choices[0].message.content == tok.decode([11] * 4)
    assert client.chat.completions.create(**kw).choices[0].message.content != tok.decode([11] * 4)


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,6}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "side": {"enum": ["Montague", "Capulet"]},
    },
    "required": ["name", "age", "side"],
    "additionalProperties": False,
}


def test_chat_response_format(client: openai.OpenAI) -> None:
    import jsonschema

    messages = [{"role": "user", "content": "Who are you?"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=120, seed=seed, response_format=fmt
        )
        c = r.choices[0]
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PERSON)
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=200,
        temperature=0,
        response_format={"type": "json_object"},
        stream=True,
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in r if ch.choices)
    assert text.startswith("{")
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, temperature=0, response_format=fmt
    )
    assert r.choices[0].finish_reason == "length"  # mid-structure


def test_structured_outputs_extra_field(
    server: ServeProcess, client: openai.OpenAI, http: httpx.Client
) -> None:
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0)
    so = {"regex": "[a-z]{2,5}( [a-z]{2,5}){1,3}!"}
    r = client.completions.create(extra_body={"structured_outputs": so}, **kw)
    c = r.choices[0]
    assert re.fullmatch(so["regex"], c.text) and c.finish_reason == "stop", c.text
    ref = grpc_generate(
        server, PROMPT, max_tokens=40, temperature=0.0,
        structured_outputs=pb.StructuredOutputs(regex=so["regex"]),
    )  # fmt: skip
    assert ref.text[0] == c.text
    choice = {"choice": ["Romeo", "Juliet"]}
    r = client.completions.create(extra_body={"structured_outputs": choice}, n=3, seed=1, **{
        **kw, "temperature": 1.0})  # fmt: skip
    assert all(c.text in choice["choice"] for c in r.choices)
    chat = http.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "Speak"}],
            "max_tokens": 40,
            "structured_outputs": {"grammar": 'root ::= "ay" | "nay"'},
        },
    ).json()
    assert chat["choices"][0]["message"]["content"] in ("ay", "nay")


def test_chat_logprobs(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Speak"}]
    kw = dict(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    r = client.chat.completions.create(logprobs=True, top_logprobs=2, **kw)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for t in content:
        assert t.top_logprobs[0].token == t.token  # greedy: the top one
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert t.bytes == list(t.token.encode())
    r = client.chat.completions.create(logprobs=True, **kw)
    assert all(t.top_logprobs == [] for t in r.choices[0].logprobs.content)
    assert client.chat.completions.create(**kw).choices[0].logprobs is None
    chunks = list(client.chat.completions.create(stream=True, logprobs=True, top_logprobs=1, **kw))
    streamed = [
        t.logprob for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.content
    ]
    assert streamed == pytest.approx([t.logprob for t in content])


# -- errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),  # more than max_num_seqs
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"seed": "x"}, "seed"),
        ({"seed": 2**70}, "seed"),
        ({"logprobs": 100}, "logprobs"),
        ({"logprobs": 100, "echo": True}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [10**6]}, "stop_token_ids"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 20, "max_tokens": 5}, "min_tokens"),
        ({"priority": "high"}, "priority"),
        ({"logit_bias": {"five": 10}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"100000000": 1}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream_options": {"sometimes": True}, "stream": True}, "stream_options.sometimes"),
        ({"echo": "maybe"}, "echo"),
        ({"bogus": 1}, "bogus"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 10**6]}, "prompt"),
        ({"prompt": None}, "prompt"),
    ],
)
def test_completion_field_errors(http: httpx.Client, body: dict, param: str) -> None:
    err = error_of(http.post("/v1/completions", json={"prompt": PROMPT, **body}), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert err["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": None}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),  # the template refuses
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0]",
        ),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 100}, "top_logprobs"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 600}, "max_completion_tokens"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
            "response_format",
        ),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "response_format",
        ),
        ({"structured_outputs": {"regex": "[0-"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"pattern": "a"}}, "structured_outputs.pattern"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"temperature": -1}, "temperature"),
        ({"logit_bias": {"1": -200}}, "logit_bias"),
        ({"functions": []}, "functions"),
    ],
)
def test_chat_field_errors(http: httpx.Client, body: dict, param: str) -> None:
    req = {"messages": [{"role": "user", "content": "Speak"}], **body}
    err = error_of(http.post("/v1/chat/completions", json=req), 400)
    assert err["param"] == param, err


def test_request_errors(http: httpx.Client) -> None:
    err = error_of(http.post("/v1/completions", json={"prompt": PROMPT, "model": "gpt-4"}), 404)
    assert (err["param"], err["code"]) == ("model", "model_not_found") and MODEL in err["message"]
    chat = {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}
    assert error_of(http.post("/v1/chat/completions", json=chat), 404)["code"] == "model_not_found"
    # Beyond the model's length (512): the prompt alone, or with max_tokens.
    err = error_of(http.post("/v1/completions", json={"prompt": [5] * 600}), 400)
    assert err["code"] == "context_length_exceeded" and "512" in err["message"]
    err = error_of(http.post("/v1/completions", json={"prompt": [5] * 500, "max_tokens": 20}), 400)
    assert (err["param"], err["code"]) == ("max_tokens", "context_length_exceeded")
    long_chat = {"messages": [{"role": "user", "content": "x " * 600}]}
    err = error_of(http.post("/v1/chat/completions", json=long_chat), 400)
    assert (err["param"], err["code"]) == ("messages", "context_length_exceeded")
    # Bodies: not JSON, too large (--max-request-bytes 65536), not an object.
    headers = {"content-type": "application/json"}
    err = error_of(http.post("/v1/completions", content=b"{oops", headers=headers), 400)
    assert "JSON" in err["message"]
    big = {"prompt": "x" * 70_000}
    assert error_of(http.post("/v1/completions", json=big), 413)["code"] == "request_too_large"
    error_of(http.post("/v1/completions", json=[1, 2]), 400)
    assert error_of(http.get("/v1/nothing"), 404)["code"] == "not_found"
    error_of(http.get("/v1/completions"), 405)


def test_tokenize_detokenize(http: httpx.Client, tok: Tokenizer) -> None:
    r = http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert r["tokens"] == tok.encode(PROMPT).ids and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 512
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": PROMPT}
    assert error_of(http.post("/detokenize", json={"tokens": [10**6]}), 400)["param"] == "tokens"
    assert error_of(http.post("/tokenize", json={}), 400)["param"] == "prompt"


def test_health_and_shared_metrics(server: ServeProcess, http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    before = http.get("/metrics").text
    grpc_generate(server, PROMPT, max_tokens=2, ignore_eos=True)
    http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "ignore_eos": True})
    http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
    )
    after = http.get("/metrics").text
    for api in ("generation", "completions", "chat"):
        done = metric(after, "jserve_requests_total", api=api, outcome="length")
        assert done == metric(before, "jserve_requests_total", api=api, outcome="length") + 1, api
    assert metric(after, "jserve_kv_pages_total") > 0


# -- many clients ---------------------------------------------------------------


def _many_clients(server: ServeProcess, clients: int) -> None:
    """Streaming clients, every third one leaving after its first token, while gRPC serves."""
    max_tokens = 16

    async def stream(c: httpx.AsyncClient, i: int) -> tuple[bool, int]:
        leave = i % 3 == 0  # asks for far more tokens than it waits for
        body = {"prompt": f"All: {i} citizens", "max_tokens": 100 if leave else max_tokens,
                "stream": True, "ignore_eos": True, "temperature": 0}  # fmt: skip
        texts = 0
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                texts += 1
                if leave:
                    break  # closes the connection mid-stream
        return leave, texts

    async def grpc_meanwhile(done: asyncio.Event) -> int:
        served = 0
        async with Client(f"127.0.0.1:{server.grpc_port}") as g:
            while not done.is_set():
                r = await g.generate(PROMPT, max_tokens=4, ignore_eos=True)
                assert r.finish_reasons == ["length"]
                served += 1
        return served

    async def main():
        limits = httpx.Limits(max_connections=clients + 10)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            before = (await c.get("/metrics")).text
            done = asyncio.Event()
            side = asyncio.create_task(grpc_meanwhile(done))
            results = await asyncio.gather(*(stream(c, i) for i in range(clients)))
            done.set()
            served = await side
            for _ in range(200):  # every request ends and hands back its pages
                after = (await c.get("/metrics")).text
                busy = [
                    metric(after, name)
                    for name in ("jserve_num_requests_running", "jserve_num_requests_waiting",
                                 "jserve_kv_pages_used", "jserve_requests_in_flight")
                ]  # fmt: skip
                if not any(busy):
                    break
                await asyncio.sleep(0.05)
            return before, after, busy, results, served

    before, after, busy, results, served = asyncio.run(main())
    assert busy == [0, 0, 0, 0]
    assert served >= 1
    left = [n for leave, n in results if leave]
    assert all(n == 1 for n in left)
    assert all(n == max_tokens for leave, n in results if not leave)

    def delta(outcome: str) -> float:
        return metric(after, "jserve_requests_total", api="completions", outcome=outcome) - metric(
            before, "jserve_requests_total", api="completions", outcome=outcome
        )

    # A leaver's request is aborted unless it ran to its end before the client's close
    # reached the server (a busy client can be that slow); every other one runs to its end.
    assert delta("cancelled") + delta("length") == clients
    assert len(left) // 2 <= delta("cancelled") <= len(left)


def test_40_streaming_clients_a_third_leaving(server: ServeProcess) -> None:
    _many_clients(server, 40)


@pytest.mark.slow
def test_200_streaming_clients_a_third_leaving(server: ServeProcess) -> None:
    _many_clients(server, 200)
