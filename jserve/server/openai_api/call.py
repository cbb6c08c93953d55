"""What the completions and chat endpoints share: the common checks, the response head,
and answering an HTTP request whole or as a server-sent event stream."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from jserve.server.openai_api import format as fmt
from jserve.server.openai_api.errors import APIError, bad_request
from jserve.server.openai_api.runs import EngineRun, unless_disconnected
from jserve.server.openai_api.state import APIState
from jserve.server.servicers import SHUTDOWN_ABORT_MESSAGE


class APICall(abc.ABC):
    """One completions or chat call: a subclass checks its own fields in ``__init__``,
    makes ``run`` in ``prepare`` (chat renders its template there, on the tokenizer
    threads) and answers through ``complete`` and ``events``."""

    run: EngineRun | None = None

    def __init__(self, state: APIState, req: Any, id_prefix: str) -> None:
        self.state = state
        self.req = req
        lora = state.check_model(req.model)
        self.lora_name = lora.lora_name if lora is not None else None  # None: the base model
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options needs stream: true", "stream_options")
        self.include_usage = req.stream_options is not None and req.stream_options.include_usage
        self.id = fmt.new_id(id_prefix)
        self.created = fmt.now()

    def head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.lora_name or self.state.model_name,
        }

    def usage_event(self, obj: str, prompt_tokens: int, completion_tokens: int) -> str:
        """The stream's closing usage chunk (stream_options.include_usage)."""
        usage = fmt.usage(prompt_tokens, completion_tokens)
        return fmt.sse({**self.head(obj), "choices": [], "usage": usage})

    @abc.abstractmethod
    async def prepare(self) -> None:
        """Makes ``run``: the call's engine requests, not yet started."""

    @abc.abstractmethod
    async def complete(self) -> dict[str, Any]:
        """The whole answer's body, once every request has finished."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[str]:
        """The streamed answer's server-sent events, before [DONE]."""

    async def respond(self, request: Request) -> Response:
        """The HTTP answer: every prompt is admitted before the status is sent, so a refused
        request is an error status; a client that leaves cancels its requests."""
        core = self.state.core
        if not self.req.stream:
            with core.tracked():
                body = await unless_disconnected(request, self._whole())
            if core.aborting.is_set() and any(
                c.get("finish_reason") == "abort" for c in body["choices"]
            ):
                # A shutdown out of patience stopped it (gRPC answers UNAVAILABLE): not a
                # 200 with a cut answer, but a status a client retries elsewhere.
                raise APIError(503, SHUTDOWN_ABORT_MESSAGE)
            return JSONResponse(body)
        with core.tracked():
            await self.prepare()
            assert self.run is not None
            try:
                await unless_disconnected(request, self.run.admit())
            except BaseException:
                await self.run.close()
                raise
        return StreamingResponse(
            self._stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )

    async def _whole(self) -> dict[str, Any]:
        await self.prepare()
        return await self.complete()

    async def _stream(self) -> AsyncIterator[str]:
        assert self.run is not None
        with self.state.core.tracked():
            try:
                async with contextlib.aclosing(self.events()) as events:
                    async for event in events:
                        yield event
            except APIError as e:  # after the 200: the error goes in the stream
                yield fmt.sse(e.body())
            finally:
                await self.run.close()
        yield fmt.DONE
