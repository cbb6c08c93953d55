"""``POST /v1/chat/completions``: messages rendered with the model's chat template."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from jserve.outputs import CompletionOutput, RequestOutput, merge_delta
from jserve.server.openai_api import format as fmt
from jserve.server.openai_api.call import APICall
from jserve.server.openai_api.chat_template import TemplateError
from jserve.server.openai_api.errors import bad_request
from jserve.server.openai_api.protocol import ChatCompletionRequest, ChatMessage
from jserve.server.openai_api.runs import EngineRun, sampling_params
from jserve.server.openai_api.state import APIState

API = "chat"
CHUNK = "chat.completion.chunk"


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the template sees them: content parts joined into one string."""
    out = []
    for i, m in enumerate(messages):
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(
                        f"messages[{i}].content[{j}] is not a text part "
                        f"({{'type': 'text', 'text': ...}}); this model takes text only",
                        f"messages[{i}].content[{j}]",
                    )
                texts.append(part["text"])
            d["content"] = "\n".join(texts)
        out.append(d)
    return out


async def render_chat(
    state: APIState,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """The conversation's prompt token ids (tokenized without adding special tokens:
    the template places them)."""
    if state.chat_template is None:
        raise bad_request(
            "this model has no chat template (no chat_template in tokenizer_config.json and no "
            "chat_template.jinja); start the server with --chat-template FILE, or use "
            "/v1/completions",
            "messages",
            "no_chat_template",
        )
    tok = state.need_tokenizer("messages")
    dicts = message_dicts(messages)
    template = state.chat_template
    try:  # rendering a large conversation is tokenizer-sized work: off the event loop
        text = await state.core.in_tokenizer_pool(
            lambda: template.render(dicts, add_generation_prompt, tools, **(kwargs or {}))
        )
    except TemplateError as e:
        raise bad_request(str(e), "messages") from None
    state.check_prompt_size(text, "messages")
    ids = await state.core.in_tokenizer_pool(lambda: tok.encode(text, add_special_tokens=False))
    if not ids:
        raise bad_request("the chat template rendered these messages to nothing", "messages")
    return ids


class ChatCall(APICall):
    def __init__(self, state: APIState, req: ChatCompletionRequest) -> None:
        super().__init__(state, req, "chatcmpl")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        max_tokens = req.max_completion_tokens
        self.fields = {"logprobs": "top_logprobs", "max_tokens": "max_completion_tokens"}
        if max_tokens is None:
            max_tokens = req.max_tokens
            self.fields["max_tokens"] = "max_tokens"
        self.fields["prompt"] = "messages"
        if req.response_format is not None and req.structured_outputs is None:
            self.fields["structured_outputs"] = "response_format"
        self.top_n = (req.top_logprobs or 0) if req.logprobs else None
        self.params = sampling_params(req, max_tokens, self.top_n)

    async def prepare(self) -> None:
        req = self.req
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        ids = await render_chat(
            self.state, req.messages, req.add_generation_prompt, tools, req.chat_template_kwargs
        )
        self.run = EngineRun(
            self.state.core, API, [ids], self.params, req.priority, self.fields, self.lora_name
        )

    def _logprobs(self, c: CompletionOutput) -> dict[str, Any] | None:
        if self.top_n is None:
            return None
        content = fmt.chat_logprobs(
            c.token_ids, c.logprobs or [], self.top_n, self.state.decode_token
        )
        return {"content": content}

    async def complete(self) -> dict[str, Any]:
        assert self.run is not None
        acc: RequestOutput | None = None
        try:
            await self.run.admit()
            async for _, out in self.run.outputs():
                acc = merge_delta(acc, out)
        finally:
            await self.run.close()
        assert acc is not None
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self._logprobs(c),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for c in acc.outputs
        ]
        tokens = sum(len(c.token_ids) for c in acc.outputs)
        return {
            **self.head("chat.completion"),
            "choices": choices,
            "usage": fmt.usage(len(acc.prompt_token_ids), tokens),
        }

    async def events(self) -> AsyncIterator[str]:
        assert self.run is not None
        head = self.head(CHUNK)
        extra = {"usage": None} if self.include_usage else {}

        def chunk(index: int, delta: dict[str, Any], c: CompletionOutput | None) -> str:
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": self._logprobs(c) if c is not None else None,
                "finish_reason": c.finish_reason if c is not None else None,
            }
            if c is not None and c.finish_reason is not None:
                choice["stop_reason"] = c.stop_reason
            return fmt.sse({**head, "choices": [choice], **extra})

        prompt_tokens = completion_tokens = 0
        # Each choice opens with the role, before any content.
        for index in range(self.params.n):
            yield chunk(index, {"role": "assistant", "content": ""}, None)
        async for _, out in self.run.outputs():
            prompt_tokens = len(out.prompt_token_ids)
            for c in out.outputs:
                if not (c.token_ids or c.text or c.finish_reason):
                    continue
                completion_tokens += len(c.token_ids)
                yield chunk(c.index, {"content": c.text} if c.text else {}, c)
        if self.include_usage:
            yield self.usage_event(CHUNK, prompt_tokens, completion_tokens)


async def create_chat_completion(
    state: APIState, req: ChatCompletionRequest, request: Request
) -> Response:
    return await ChatCall(state, req).respond(request)
