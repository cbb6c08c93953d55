"""Running one API call on the engine: its prompts' requests, admitted together, merged.

A completions call with several prompts becomes one engine request per prompt
(each with the call's ``n``), all admitted before the answer starts, so a bad
prompt or a full queue is an HTTP error status rather than a broken stream.
Closing a run (the client went away, the server is stopping) aborts every
request of it that is still running, which frees their KV pages.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from starlette.requests import Request

from jserve.outputs import RequestOutput
from jserve.sampling_params import SamplingParams
from jserve.server import convert
from jserve.server.openai_api.errors import APIError, engine_failed, from_engine_error
from jserve.server.servicers import ServingCore
from jserve.structured import StructuredOutputsParams

_END = object()  # a prompt's stream ended
T = TypeVar("T")


def sampling_params(req: Any, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """The engine's SamplingParams for a completions or chat request."""

    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    return SamplingParams(
        n=req.n,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        temperature=given(req.temperature, 1.0),
        top_p=given(req.top_p, 1.0),
        top_k=given(req.top_k, -1),
        min_p=given(req.min_p, 0.0),
        repetition_penalty=given(req.repetition_penalty, 1.0),
        presence_penalty=given(req.presence_penalty, 0.0),
        frequency_penalty=given(req.frequency_penalty, 0.0),
        seed=req.seed,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        logit_bias=logit_bias(req.logit_bias),
        structured_outputs=structured_outputs(req),
    )


_STRUCTURED_FIELDS = ("json", "regex", "choice", "grammar", "json_object", "whitespace_pattern")


def structured_outputs(req: Any) -> StructuredOutputsParams | None:
    """vLLM's ``structured_outputs`` field, or chat's OpenAI ``response_format``."""
    fmt = getattr(req, "response_format", None)
    so = req.structured_outputs
    if fmt is not None and fmt.get("type") != "text":
        if so is not None:
            raise APIError(
                400,
                "give either response_format or structured_outputs, not both",
                "response_format",
            )
        return response_format(fmt)
    if so is None:
        return None
    for key in so:
        if key not in _STRUCTURED_FIELDS:
            raise APIError(
                400,
                f"unknown structured_outputs field {key!r}; give one of "
                f"{', '.join(_STRUCTURED_FIELDS[:-1])} (and optionally whitespace_pattern)",
                f"structured_outputs.{key}",
            )
    return StructuredOutputsParams(**so)


def response_format(fmt: dict[str, Any]) -> StructuredOutputsParams:
    """OpenAI's response_format: {"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": ...}}."""
    kind = fmt.get("type")
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(
                400,
                "response_format json_schema needs json_schema.schema, a JSON schema object",
                "response_format.json_schema.schema",
            )
        return StructuredOutputsParams(json=schema)
    raise APIError(
        400,
        f"response_format type must be text, json_object or json_schema, got {kind!r:.40}",
        "response_format.type",
    )


def logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias (token ids as JSON object keys, so strings) -> the engine's."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(
                400, f"logit_bias keys must be token ids, got {key!r:.40}", "logit_bias"
            ) from None
        out[token] = value
    return out


async def until_disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits ``work``, cancelling it (and raising ClientGone) if the client goes away."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        task.cancel()  # no-op once done
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


class EngineRun:
    """The engine requests of one API call, one per prompt, as one stream of outputs."""

    def __init__(
        self,
        core: ServingCore,
        api: str,
        prompts: Sequence[str | list[int]],
        params: SamplingParams,
        priority: int,
        fields: dict[str, str],
        lora_name: str | None = None,
    ) -> None:
        self.core = core
        self.api = api
        self.prompts = list(prompts)
        self.params = params
        self.priority = priority
        self.fields = fields  # SamplingParams names -> the request's, for error messages
        self.lora_name = lora_name  # the adapter the request's model names; None: the base
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._first: list[tuple[int, Any]] = []
        self._open = 0
        # Each prompt's prompt logprobs (SamplingParams.prompt_logprobs), from its first output.
        self.prompt_logprobs: dict[int, Any] = {}

    async def admit(self) -> None:
        """Starts every prompt's request and waits for each to be admitted (its first
        output), raising an APIError for the first one refused."""
        if not self.core.live:
            err = self._not_live()
            self.core.metrics.recorder(self.api).finish(
                "error" if err.status == 500 else "rejected"
            )
            raise err
        for i, prompt in enumerate(self.prompts):
            self._tasks.append(asyncio.create_task(self._pump(i, prompt)))
        self._open = len(self._tasks)
        started: set[int] = set()
        try:
            while len(started) < len(self.prompts):
                i, item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise from_engine_error(item, self.fields) from None
                started.add(i)
                self._first.append((i, item))
        except BaseException:
            await self.close()
            raise

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, incremental output) until every request has finished."""
        for i, item in self._first:
            if item is _END:
                self._open -= 1
            else:
                yield i, item
        self._first.clear()
        while self._open:
            i, item = await self._queue.get()
            if item is _END:
                self._open -= 1
            elif isinstance(item, BaseException):
                raise from_engine_error(item, self.fields)
            else:
                yield i, item

    async def close(self) -> None:
        """Aborts whatever is still running and waits until it has been handed back."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _pump(self, i: int, prompt: str | list[int]) -> None:
        core = self.core
        rec = core.metrics.recorder(self.api)
        rid = core.new_request_id(self.api)
        outcome: str | None = None
        gen = core.generate(prompt, self.params, rid, self.priority, self.lora_name)
        try:
            async with contextlib.aclosing(gen):
                async for out in gen:
                    rec.observe(out)
                    if out.finished:
                        outcome = convert.outcome_of(out)
                    plp = getattr(out, "prompt_logprobs", None)
                    if plp is not None and i not in self.prompt_logprobs:
                        self.prompt_logprobs[i] = plp
                    self._queue.put_nowait((i, out))
            self._queue.put_nowait((i, _END))
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as e:
            outcome = core.failure_outcome(e, rid)
            self._queue.put_nowait((i, e))
        finally:
            rec.finish(outcome or "cancelled")

    def _not_live(self) -> APIError:
        reason = self.core._not_live_reason()
        if engine_failed(self.core.aengine.dead):
            return APIError(500, reason, None, "engine_dead")
        return APIError(503, reason, None, "unavailable")
