"""The OpenAI-compatible API's parts that need no engine: chat templates, serving phases."""

from __future__ import annotations

import asyncio
import json
import types

import httpx
import pytest
from jinja2.exceptions import SecurityError

from jserve.errors import ConfigError, EngineUnavailableError
from jserve.model_loader import default_model_path
from jserve.sampling_params import SamplingParams
from jserve.server.metrics import ServerMetrics
from jserve.server.openai_api.app import build_app
from jserve.server.openai_api.chat_template import ChatTemplate, TemplateError
from jserve.server.openai_api.state import APIState
from jserve.server.servicers import ServingCore

MESSAGES = [{"role": "user", "content": "Hi"}]


# -- chat templates -------------------------------------------------------------


def write_model(tmp_path, config: dict | None = None, jinja: str | None = None) -> str:
    d = tmp_path / "model"
    d.mkdir()
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (d / "chat_template.jinja").write_text(jinja)
    return str(d)


def test_template_sources(tmp_path) -> None:
    cfg = {"bos_token": "<s>", "eos_token": {"content": "</s>"}}
    d = write_model(tmp_path, {**cfg, "chat_template": "{{ bos_token }}A{{ eos_token }}"})
    t = ChatTemplate.load(d)
    assert t is not None and t.render(MESSAGES) == "<s>A</s>"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert ChatTemplate.load(d).render(MESSAGES) == "D"
    # A chat_template.jinja file beside a config without a template.
    (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "model" / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}")
    assert ChatTemplate.load(d).render(MESSAGES) == "JHi"
    # --chat-template overrides both, with the model's special tokens.
    override = tmp_path / "mine.jinja"
    override.write_text("{{ bos_token }}mine")
    assert ChatTemplate.load(d, str(override)).render(MESSAGES) == "<s>mine"
    (tmp_path / "model" / "chat_template.jinja").unlink()
    assert ChatTemplate.load(d) is None
    assert ChatTemplate.load("random:llama3-8b") is None  # random weights: no directory
    with pytest.raises(ConfigError, match="does not parse"):
        ChatTemplate("{% for %}")
    with pytest.raises(ConfigError, match="cannot read"):
        ChatTemplate.load(d, str(tmp_path / "missing.jinja"))


def test_template_variables_and_helpers() -> None:
    t = ChatTemplate(
        "{% if not add_generation_prompt %}{{ raise_exception('need a prompt') }}{% endif %}"
        "{{ tools | tojson }}|{{ extra }}|{{ strftime_now('%Y') | length }}"
    )
    tools = [{"type": "function", "function": {"name": "f<&>", "description": "é"}}]
    out = t.render(MESSAGES, True, tools, extra="x")
    assert out.startswith(json.dumps(tools, ensure_ascii=False)) and out.endswith("|x|4")
    with pytest.raises(TemplateError, match="need a prompt"):
        t.render(MESSAGES, add_generation_prompt=False)


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # reaching Python internals
        "{{ messages.append(1) }}",  # mutating what it was given
        "{{ messages[0].update({'role': 'system'}) }}",
    ],
)
def test_templates_run_sandboxed(source: str) -> None:
    with pytest.raises((TemplateError, SecurityError)):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_embedded_model_has_a_template() -> None:
    t = ChatTemplate.load(default_model_path())
    assert t is not None
    messages = [
        {"role": "system", "content": "A street in Verona."},
        {"role": "user", "content": "Wherefore art thou?"},
        {"role": "assistant", "content": "Here."},
        {"role": "user", "content": "Speak.", "name": "Nurse"},
    ]
    assert t.render(messages) == (
        "A street in Verona.\n\nJULIET:\nWherefore art thou?\n\nROMEO:\nHere.\n\n"
        "NURSE:\nSpeak.\n\nROMEO:\n"
    )
    assert t.render(messages[:2], add_generation_prompt=False).endswith("thou?\n\n")
    with pytest.raises(TemplateError, match="not tool"):
        t.render([{"role": "tool", "content": "x"}])


# -- serving phases, without an engine -----------------------------------------


class _Stats:
    num_running = num_waiting = pages_used = pages_cached = num_pages = 0
    prefix_cache_hits = prefix_cache_queries = preemptions = generation_tokens = 0
    num_steps = scheduled_tokens = 0
    step_time = 0.0


def fake_state(template: ChatTemplate | None = None) -> APIState:
    engine = types.SimpleNamespace(
        max_model_len=64,
        tokenizer=None,
        cfg=types.SimpleNamespace(vocab_size=16, bos_token_id=None, name="m"),
        model=types.SimpleNamespace(path="m"),
    )
    aengine = types.SimpleNamespace(engine=engine, dead=None, get_stats=_Stats)
    core = ServingCore(aengine, ServerMetrics(aengine), "m", None, lambda: None)
    return APIState(core, template)


def call(state: APIState, method: str, path: str, body: dict | None = None) -> httpx.Response:
    async def main():
        transport = httpx.ASGITransport(app=build_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.request(method, path, json=body)

    return asyncio.run(main())


def test_warming_draining_unavailable_and_dead_answer_503_or_500() -> None:
    state = fake_state()
    completion = {"prompt": [1, 2], "max_tokens": 2}
    for phase in ("warming", "draining", "dead", "peer lost"):
        core = state.core
        core.ready = phase != "warming"
        core.shutting_down = phase == "draining"
        core.aengine.dead = {
            "dead": RuntimeError("boom"),
            "peer lost": EngineUnavailableError("process 1 is gone"),
        }.get(phase)
        status = 500 if phase == "dead" else 503
        for method, path, body in [
            ("GET", "/health", None),
            ("POST", "/v1/completions", completion),
            ("POST", "/v1/chat/completions", {"messages": MESSAGES}),
        ]:
            if path.endswith("chat/completions"):
                state.chat_template = ChatTemplate("x")
                state.core.engine.tokenizer = types.SimpleNamespace(encode=lambda t, **kw: [1])
            r = call(state, method, path, body)
            assert r.status_code == status, (phase, path, r.text)
            err = r.json()["error"]
            want = {
                "warming": "warming up",
                "draining": "shutting down",
                "dead": "boom",
                "peer lost": "process 1 is gone",
            }[phase]
            assert want in err["message"]
            assert err["type"] == ("server_error" if phase == "dead" else "service_unavailable")
    state.core.aengine.dead = None
    state.core.shutting_down = False
    assert call(state, "GET", "/health").status_code == 200


def test_chat_without_a_template_names_the_flag() -> None:
    state = fake_state(template=None)
    state.core.ready = True
    r = call(state, "POST", "/v1/chat/completions", {"messages": MESSAGES})
    assert r.status_code == 400
    err = r.json()["error"]
    assert "--chat-template" in err["message"] and err["code"] == "no_chat_template"
    assert err["param"] == "messages"


def test_engine_errors_name_the_endpoints_field() -> None:
    from jserve.errors import CapacityError, InvalidRequestError, RequestTooLargeError
    from jserve.server.openai_api.errors import from_engine_error

    chat = {"max_tokens": "max_completion_tokens", "prompt": "messages"}
    too_large = RequestTooLargeError("needs 9 pages", "max_tokens", "context_length_exceeded")
    err = from_engine_error(too_large, chat)
    assert (err.status, err.param, err.code) == (
        400,
        "max_completion_tokens",
        "context_length_exceeded",
    )
    too_long = InvalidRequestError("prompt has 9 tokens", "prompt", "context_length_exceeded")
    err = from_engine_error(too_long, chat)
    assert (err.param, err.code) == ("messages", "context_length_exceeded")
    # The field comes from where the error is raised.
    with pytest.raises(InvalidRequestError) as bad:
        SamplingParams(top_p=2.0).validate()
    assert from_engine_error(bad.value).param == "top_p"
    with pytest.raises(InvalidRequestError) as bad:
        SamplingParams(logit_bias={3: 500.0}).validate()
    assert from_engine_error(bad.value).param == "logit_bias"
    assert from_engine_error(InvalidRequestError("no field")).param is None
    assert from_engine_error(CapacityError("the queue is full")).status == 429


def test_a_body_sent_without_a_length_is_bounded_too() -> None:
    state = fake_state()
    state.core.ready = True
    state.max_request_bytes = 1024

    async def main():
        async def body():
            for _ in range(4):
                yield b"x" * 512

        transport = httpx.ASGITransport(app=build_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            headers = {"content-type": "application/json"}
            return await c.post("/v1/completions", content=body(), headers=headers)

    r = asyncio.run(main())
    assert r.status_code == 413 and "content-length" not in r.request.headers
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and "exceeds 1024 bytes" in err["message"]
