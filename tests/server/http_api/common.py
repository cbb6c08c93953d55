"""What the OpenAI API tests share: the model's chat template, the served name and
prompts, and small request helpers."""

from __future__ import annotations

import asyncio

import httpx

from jserve.server.client import Client
from tests.server.openai_process import ServeProcess

MODEL = "tiny"
PROMPT = "First Citizen:"
EOS_PROMPT = "Resolved."  # the tiny model's greedy continuation reaches EOS at its 12th token
# Exercises the variables Hugging Face templates use: bos/eos tokens, tools, raise_exception.
TEMPLATE = (
    "{%- if tools %}Tools: {{ tools | map(attribute='function') | map(attribute='name') "
    "| join(',') }}\n{% endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('no ' + m['role'] + ' messages') }}{% endif -%}"
    "{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}assistant:{% endif -%}"
    "{%- if greeting is defined %} {{ greeting }}{% endif -%}"
)


def render(messages, add_generation_prompt=True, tools=None, greeting=None) -> str:
    """TEMPLATE by hand, to check the server's rendering against."""
    out = f"Tools: {','.join(t['function']['name'] for t in tools)}\n" if tools else ""
    out += "".join(f"{m['role']}: {m['content']}<|endoftext|>\n" for m in messages)
    out += "assistant:" if add_generation_prompt else ""
    return out + (f" {greeting}" if greeting else "")


def grpc_generate(server: ServeProcess, prompt, **kw):
    async def main():
        async with Client(f"127.0.0.1:{server.grpc_port}") as c:
            return await c.generate(prompt, **kw)

    return asyncio.run(main())


def sse_events(lines) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]
