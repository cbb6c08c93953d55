"""``POST /v1/completions``: prompts in, text (and logprobs) out, whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from jserve.outputs import CompletionOutput, RequestOutput, merge_delta
from jserve.prompts import normalize_prompts
from jserve.server.openai_api import format as fmt
from jserve.server.openai_api.call import APICall
from jserve.server.openai_api.errors import APIError, bad_request
from jserve.server.openai_api.protocol import CompletionRequest
from jserve.server.openai_api.runs import EngineRun, sampling_params
from jserve.server.openai_api.state import APIState

API = "completions"
OBJECT = "text_completion"
# SamplingParams names that differ from this endpoint's fields (for error messages).
FIELDS = {"prompt_logprobs": "logprobs"}  # echo's prompt scoring takes logprobs' count


class _Choice:
    """What one choice has sent so far, for the next streamed piece."""

    def __init__(self, index: int, decode: Any) -> None:
        self.index = index
        self.logprobs = fmt.LegacyLogprobs(decode)
        self.started = False
        self.tokens = 0


class CompletionCall(APICall):
    def __init__(self, state: APIState, req: CompletionRequest) -> None:
        super().__init__(state, req, "cmpl")
        prompts = normalize_prompts(req.prompt)
        if not prompts:
            raise bad_request("prompt is empty; give text or token ids", "prompt")
        for p in prompts:
            state.check_prompt_size(p, "prompt")
        self.prompts = prompts
        self.params = sampling_params(req, req.max_tokens, req.logprobs)
        # echo with logprobs scores the prompt's own tokens (lm-eval's loglikelihood);
        # echo with max_tokens 0 only returns the prompt, which the engine runs as scoring.
        self.echo_logprobs = req.echo and req.logprobs is not None
        if self.echo_logprobs or (req.echo and req.max_tokens == 0):
            self.params = state.with_prompt_logprobs(self.params, req.logprobs or 0)

    async def prepare(self) -> None:
        req = self.req
        self.run = EngineRun(
            self.state.core, API, self.prompts, self.params, req.priority, FIELDS, self.lora_name
        )

    # -- the echoed prompt --------------------------------------------------

    def _prompt_text(self, i: int, out: RequestOutput) -> str:
        p = self.prompts[i]
        if isinstance(p, str):
            return p
        return self.state.decode_text(out.prompt_token_ids)

    def _echo(self, i: int, out: RequestOutput, choice: _Choice) -> tuple[str, Any]:
        """The prompt's text (and logprobs) that open an echoed choice."""
        text = self._prompt_text(i, out)
        if not self.echo_logprobs:
            choice.logprobs.offset += len(text)
            return text, None
        plp = self.run.prompt_logprobs.get(i)
        if plp is None:
            raise APIError(500, "the engine returned no prompt logprobs", None, "internal_error")
        return text, choice.logprobs.add_prompt(out.prompt_token_ids, plp)

    def _piece(
        self, i: int, out: RequestOutput, c: CompletionOutput, choice: _Choice
    ) -> tuple[str, Any]:
        text, logprobs = "", None
        if not choice.started:
            choice.started = True
            if self.req.echo:
                text, logprobs = self._echo(i, out, choice)
        text += c.text
        if self.req.logprobs is not None:
            new = choice.logprobs.add(c.token_ids, c.logprobs or [])
            logprobs = fmt.merge_legacy(logprobs, new)
        choice.tokens += len(c.token_ids)
        return text, logprobs

    def _choice_body(
        self, index: int, text: str, logprobs: Any, c: CompletionOutput
    ) -> dict[str, Any]:
        return {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }

    # -- whole answers ------------------------------------------------------

    async def complete(self) -> dict[str, Any]:
        accs: dict[int, RequestOutput] = {}
        try:
            await self.run.admit()
            async for i, out in self.run.outputs():
                accs[i] = merge_delta(accs.get(i), out)
        finally:
            await self.run.close()
        n = self.params.n
        choices = []
        prompt_tokens = completion_tokens = 0
        for i in range(len(self.prompts)):
            acc = accs[i]
            prompt_tokens += len(acc.prompt_token_ids)
            for c in acc.outputs:
                choice = _Choice(i * n + c.index, self.state.decode_token)
                text, logprobs = self._piece(i, acc, c, choice)
                choices.append(self._choice_body(choice.index, text, logprobs, c))
                completion_tokens += len(c.token_ids)
        choices.sort(key=lambda ch: ch["index"])
        return {
            **self.head(OBJECT),
            "choices": choices,
            "usage": fmt.usage(prompt_tokens, completion_tokens),
        }

    # -- streamed answers ---------------------------------------------------

    async def events(self) -> AsyncIterator[str]:
        n = self.params.n
        head = self.head(OBJECT)
        extra = {"usage": None} if self.include_usage else {}
        choices: dict[int, _Choice] = {}
        prompt_tokens = 0
        seen: set[int] = set()
        async for i, out in self.run.outputs():
            if i not in seen:
                seen.add(i)
                prompt_tokens += len(out.prompt_token_ids)
            for c in out.outputs:
                index = i * n + c.index
                choice = choices.get(index)
                if choice is None:
                    choice = choices[index] = _Choice(index, self.state.decode_token)
                if not (c.token_ids or c.text or c.finish_reason or not choice.started):
                    continue
                text, logprobs = self._piece(i, out, c, choice)
                body = self._choice_body(index, text, logprobs, c)
                yield fmt.sse({**head, "choices": [body], **extra})
        if self.include_usage:
            completion = sum(ch.tokens for ch in choices.values())
            yield self.usage_event(OBJECT, prompt_tokens, completion)


async def create_completion(state: APIState, req: CompletionRequest, request: Request) -> Response:
    return await CompletionCall(state, req).respond(request)
