"""The gRPC servicers: jserve's Generation API and JetStream's Orchestrator API.

Both run requests through ``ServingCore.stream``, which owns admission, error
mapping, metrics and cleanup:

- bad input -> INVALID_ARGUMENT with the engine's message;
- queue full or a request the KV pool can never hold -> RESOURCE_EXHAUSTED;
- not warmed up yet or shutting down -> UNAVAILABLE (retry elsewhere or later);
- engine failure -> INTERNAL for the affected calls; health turns NOT_SERVING;
- client cancel or deadline -> the engine request is aborted and its KV pages
  freed at once (when the handler is cancelled or closed, and again from the
  RPC's done-callback as a safety net).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from jserve.engine.async_engine import AsyncLLMEngine
from jserve.errors import CapacityError, EngineDeadError, InvalidRequestError
from jserve.outputs import RequestOutput
from jserve.prompts import tokenize_prompt
from jserve.sampling_params import SamplingParams
from jserve.server import convert
from jserve.server.metrics import ServerMetrics
from jserve.server.proto import generation_pb2 as pb
from jserve.server.proto import generation_pb2_grpc as pb_grpc
from jserve.server.proto import jetstream_pb2 as js
from jserve.server.proto import jetstream_pb2_grpc as js_grpc

logger = logging.getLogger(__name__)

# A text prompt longer than this many characters per token of the model's
# maximum length is refused before tokenizing it (real text averages ~4).
MAX_CHARS_PER_TOKEN = 32


_END = object()


class EngineStream:
    """Reads one engine stream on a task of its own and hands the outputs over a queue.

    The RPC's task may be cancelled at any moment (client cancel, deadline).
    Cancelling ``AsyncLLMEngine.generate`` while it waits for admission would
    cancel the future the engine thread later completes, which kills the
    engine thread, and would skip the request's abort. So the engine stream is
    never cancelled: the RPC side reads from the queue, and ``stop()`` aborts
    the request in the engine, after which the stream ends with the abort.
    """

    def __init__(self, aengine: AsyncLLMEngine, job: Job) -> None:
        self.aengine = aengine
        self.request_id = job.request_id
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.stopped = False
        self._gen = aengine.generate(job.prompt, job.params, job.request_id, job.priority)
        self.task = asyncio.get_running_loop().create_task(self._run())

    @classmethod
    async def run_to_end(cls, aengine: AsyncLLMEngine, job: Job) -> None:
        """Runs a request whose outputs nobody reads; if interrupted, aborts it and waits."""
        stream = cls(aengine, job)
        finished = False
        try:
            async for out in stream:
                finished = out.finished
        finally:
            if not finished:
                stream.stop()
                await asyncio.wait({stream.task}, timeout=10)

    async def _run(self) -> None:
        try:
            async for out in self._gen:
                if self.stopped:
                    break  # closing the stream below aborts the request
                self.queue.put_nowait(out)
        except BaseException as e:  # handed to the reader, who maps it to a status
            self.queue.put_nowait(e)
        finally:
            # Closing an unfinished engine stream aborts its request.
            await self._gen.aclose()
            self.queue.put_nowait(_END)

    def stop(self) -> None:
        """Aborts the request (idempotent). The engine's abort output ends the stream."""
        if not self.stopped:
            self.stopped = True
            self.aengine.abort(self.request_id)

    def __aiter__(self) -> EngineStream:
        return self

    async def __anext__(self) -> RequestOutput:
        item = await self.queue.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item


@dataclasses.dataclass
class Job:
    """One admitted-to-be request: what to send to the engine and how to answer."""

    prompt: list[int]
    params: SamplingParams
    request_id: str
    priority: int
    respond: Callable[[RequestOutput], list[Any]]


class ServingCore:
    """State shared by the servicers: the engine, metrics and the serving phase."""

    def __init__(
        self,
        aengine: AsyncLLMEngine,
        metrics: ServerMetrics,
        model_name: str,
        jetstream_params: SamplingParams,
        on_engine_dead: Callable[[], None],
    ) -> None:
        self.aengine = aengine
        self.engine = aengine.engine
        self.metrics = metrics
        self.model_name = model_name
        self.jetstream_params = jetstream_params
        self.on_engine_dead = on_engine_dead
        self.ready = False
        self.shutting_down = False
        self.max_prompt_chars = self.engine.max_model_len * MAX_CHARS_PER_TOKEN
        self._id_prefix = uuid.uuid4().hex[:8]
        self._next_id = 0
        # The tasks of open generation RPCs, so shutdown can wait for or cancel them.
        self.active: set[asyncio.Task[Any]] = set()
        self.pumps: set[asyncio.Task[Any]] = set()  # engine streams still open
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def bos_token_id(self) -> int | None:
        bos = self.engine.cfg.bos_token_id
        if bos is None and self.tokenizer is not None:
            bos = self.tokenizer.bos_token_id
        return bos

    @property
    def live(self) -> bool:
        return self.ready and not self.shutting_down and self.aengine.dead is None

    def new_request_id(self, api: str) -> str:
        self._next_id += 1
        return f"{api}-{self._id_prefix}-{self._next_id}"

    async def tokenize(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt. Text is tokenized off the event loop and the engine thread."""
        if not isinstance(prompt, str):
            return prompt
        if len(prompt) > self.max_prompt_chars:
            raise InvalidRequestError(
                f"prompt has {len(prompt)} characters; at most {self.max_prompt_chars} are "
                f"accepted for a model whose maximum length is {self.engine.max_model_len} tokens"
            )
        vocab = self.engine.cfg.vocab_size

        def encode() -> list[int]:
            if add_special_tokens or self.tokenizer is None or not prompt:
                return tokenize_prompt(prompt, self.tokenizer, vocab)[1]
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            if not ids:
                raise InvalidRequestError(f"prompt {prompt[:40]!r} tokenized to nothing")
            return ids

        return await asyncio.get_running_loop().run_in_executor(None, encode)

    async def stream(
        self,
        api: str,
        context: grpc.aio.ServicerContext,
        make_job: Callable[[], Awaitable[Job]],
    ) -> AsyncIterator[Any]:
        """Runs one generation RPC: admission, streaming, error mapping, cleanup."""
        task = asyncio.current_task()
        if task is not None:
            self.active.add(task)
            self.idle.clear()
        try:
            async for msg in self._stream(api, context, make_job):
                yield msg
        finally:
            if task is not None:
                self.active.discard(task)
                if not self.active:
                    self.idle.set()

    async def _stream(
        self,
        api: str,
        context: grpc.aio.ServicerContext,
        make_job: Callable[[], Awaitable[Job]],
    ) -> AsyncIterator[Any]:
        rec = self.metrics.recorder(api)
        if not self.live:
            rec.finish("error" if self.aengine.dead is not None else "rejected")
            context.set_code(
                grpc.StatusCode.INTERNAL
                if self.aengine.dead is not None
                else grpc.StatusCode.UNAVAILABLE
            )
            context.set_details(self._not_live_reason())
            return
        try:
            job = await make_job()
        except InvalidRequestError as e:
            rec.finish("invalid")
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details(str(e))
            return
        except asyncio.CancelledError:
            rec.finish("cancelled")
            raise
        except Exception:
            logger.exception("preparing request failed")
            rec.finish("error")
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details("internal error while preparing the request")
            return

        finished = False
        outcome: str | None = None  # stays None if the client goes away first
        pump = EngineStream(self.aengine, job)
        self.pumps.add(pump.task)
        pump.task.add_done_callback(self.pumps.discard)

        def stop_unless_finished(_: Any = None) -> None:
            # The RPC ended (cancel, deadline, disconnect, shutdown) before the
            # engine finished: stop the request and free its pages now.
            if not finished:
                pump.stop()

        context.add_done_callback(stop_unless_finished)
        try:
            async for out in pump:
                rec.observe(out)
                if out.finished:
                    finished = True
                    outcome = convert.outcome_of(out)
                for msg in job.respond(out):
                    yield msg
        except InvalidRequestError as e:
            outcome = "invalid"
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details(str(e))
        except CapacityError as e:
            outcome = "rejected"
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(str(e))
        except EngineDeadError as e:
            outcome = "error"
            self.on_engine_dead()
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details(str(e))
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception:
            logger.exception("request %s failed", job.request_id)
            outcome = "error"
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details(f"internal error while serving request {job.request_id}")
        finally:
            stop_unless_finished()
            rec.finish(outcome or "cancelled")

    def _not_live_reason(self) -> str:
        if self.aengine.dead is not None:
            return f"the engine stopped after an error: {self.aengine.dead}"
        if self.shutting_down:
            return "the server is shutting down; retry on another replica"
        return "the server is warming up; retry when its health check reports SERVING"


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, core: ServingCore) -> None:
        self.core = core

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        core = self.core

        async def make_job() -> Job:
            prompt = convert.generate_prompt(request)
            params = convert.sampling_params(request.sampling)
            ids = await core.tokenize(prompt)
            rid = request.request_id or core.new_request_id("gen")
            return Job(ids, params, rid, request.priority, convert.GenerateResponder(rid, params))

        async for msg in core.stream("generation", context, make_job):
            yield msg

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        tok = self.core.tokenizer
        if tok is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "this model has no tokenizer (tokenizer.json)"
            )
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        ids = await asyncio.get_running_loop().run_in_executor(
            None, lambda: tok.encode(request.text, add_special_tokens=add)
        )
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        tok = self.core.tokenizer
        if tok is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "this model has no tokenizer (tokenizer.json)"
            )
        vocab = self.core.engine.cfg.vocab_size
        bad = [t for t in request.token_ids if not 0 <= t < vocab]
        if bad:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"token id {bad[0]} is outside the vocabulary [0, {vocab}) of this model",
            )
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        ids = list(request.token_ids)
        text = await asyncio.get_running_loop().run_in_executor(
            None, lambda: tok.decode(ids, skip_special_tokens=skip)
        )
        return pb.DetokenizeResponse(text=text)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        core = self.core
        eng = core.engine
        info = pb.GetModelInfoResponse(
            model_name=core.model_name,
            max_model_len=eng.max_model_len,
            vocab_size=eng.cfg.vocab_size,
            eos_token_ids=list(eng.cfg.eos_token_ids),
            has_tokenizer=core.tokenizer is not None,
            max_logprobs=eng.ecfg.max_logprobs,
            max_n=eng.ecfg.max_num_seqs,
        )
        if core.bos_token_id is not None:
            info.bos_token_id = core.bos_token_id
        return info


class OrchestratorServicer(js_grpc.OrchestratorServicer):
    """JetStream's API on the jserve engine (see jetstream.proto and convert.jetstream_request)."""

    def __init__(self, core: ServingCore) -> None:
        self.core = core

    async def Decode(
        self, request: js.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[js.DecodeResponse]:
        core = self.core

        async def make_job() -> Job:
            jp = convert.jetstream_request(request, core.bos_token_id, core.jetstream_params)
            ids = await core.tokenize(jp.prompt, jp.add_special_tokens)
            respond = convert.JetStreamResponder(
                jp.params.n, jp.text_mode, core.engine.cfg.eos_token_ids
            )
            return Job(ids, jp.params, core.new_request_id("js"), 0, respond)

        async for msg in core.stream("jetstream", context, make_job):
            yield msg

    async def HealthCheck(
        self, request: js.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> js.HealthCheckResponse:
        return js.HealthCheckResponse(is_live=self.core.live)
