"""The gRPC servicers: jserve's Generation API and JetStream's Orchestrator API.

Both run requests through ``ServingCore.stream``, which owns admission, error
mapping, metrics and cleanup:

- bad input, or a request that could never fit in the KV pool
  (``RequestTooLargeError``) -> INVALID_ARGUMENT with the engine's message;
- queue full -> RESOURCE_EXHAUSTED (retrying later may succeed);
- not warmed up yet or shutting down -> UNAVAILABLE (retry elsewhere or later);
- engine failure -> INTERNAL for the affected calls; health turns NOT_SERVING
  (UNAVAILABLE for EngineUnavailableError, e.g. a lost multi-host process);
- client cancel or deadline -> the RPC's handler is cancelled or closed, which
  closes its ``AsyncLLMEngine.generate`` stream: the engine aborts that very
  request (never another one with the same id) and frees its KV pages at once;
- a shutdown that cannot wait for a request any longer (``abort_all``: a second
  signal, or the grace period is over) -> the request's last message says
  FINISH_REASON_ABORT and carries its usage, then the call ends UNAVAILABLE
  with ``SHUTDOWN_ABORT_MESSAGE``.

LoRA adapters: a Generate request names a loaded adapter (``lora_name``),
looked up as the engine admits it (unknown: INVALID_ARGUMENT, nothing queued).
``LoadLoRAAdapter`` and ``UnloadLoRAAdapter`` change the set at run time
through ``ServingCore.load_lora`` / ``unload_lora``, which the HTTP API's
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` share; the adapter's
files are read on the engine's step thread, between steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from jserve.engine.async_engine import (
    LORA_IN_USE,
    LORA_NOT_FOUND,
    LORA_UPDATES_OFF,
    AsyncLLMEngine,
)
from jserve.errors import (
    CapacityError,
    EngineDeadError,
    EngineUnavailableError,
    InvalidRequestError,
)
from jserve.lora import AdapterError, LoRARequest
from jserve.outputs import RequestOutput
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
# Threads for the server's tokenizer work (Tokenize, Detokenize, chat templates,
# text prompts):
# few, so a burst of such calls queues here instead of crowding the engine's step
# thread off the CPU (and the GIL); first come, first served.
TOKENIZER_THREADS = 2
T = TypeVar("T")
SHUTDOWN_ABORT_MESSAGE = (
    "the server is shutting down and stopped this request before it finished; "
    "retry on another replica"
)
# The engine's errors whose message is the client's to read, and each outcome's status.
_TYPED_ERRORS = (InvalidRequestError, CapacityError, EngineDeadError)
_LORA_CODES = {
    LORA_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    LORA_IN_USE: grpc.StatusCode.FAILED_PRECONDITION,
    LORA_UPDATES_OFF: grpc.StatusCode.PERMISSION_DENIED,
}
_GRPC_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "rejected": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "error": grpc.StatusCode.INTERNAL,
}


@dataclasses.dataclass
class Job:
    """One request to run: what to send to the engine and how to answer."""

    prompt: str | list[int]  # text is tokenized by the engine (off its step thread)
    params: SamplingParams
    request_id: str  # the engine's id: always made by the server (new_request_id)
    priority: int
    respond: Callable[[RequestOutput], list[Any]]
    client_id: str | None = None  # the id the client chose, if any (never sent to the engine)
    lora_name: str | None = None  # a loaded LoRA adapter; None: the base model


class ServingCore:
    """State shared by the servicers: the engine, metrics and the serving phase."""

    def __init__(
        self,
        aengine: AsyncLLMEngine,
        metrics: ServerMetrics,
        model_name: str,
        jetstream_params: SamplingParams,
        on_engine_dead: Callable[[], None],
        runtime_lora_updates: bool = False,
    ) -> None:
        self.aengine = aengine
        # Whether the APIs may load and unload adapters (allow_runtime_lora_updating).
        self.runtime_lora_updates = runtime_lora_updates
        self.engine = aengine.engine
        self.metrics = metrics
        self.model_name = model_name
        self.jetstream_params = jetstream_params
        self.on_engine_dead = on_engine_dead
        self.ready = False
        self.shutting_down = False
        self.max_prompt_chars = self.engine.max_model_len * MAX_CHARS_PER_TOKEN
        # No list of token ids in a request is longer than a sequence can be.
        self.max_token_ids = self.engine.max_model_len
        self._tokenizer_pool = concurrent.futures.ThreadPoolExecutor(
            TOKENIZER_THREADS, thread_name_prefix="jserve-tokenizer"
        )
        # Ids clients chose, of their running requests: a client's own namespace, apart
        # from the engine's ids, which only the server makes (new_request_id).
        self.client_ids: set[str] = set()
        # The tasks of open generation RPCs, so shutdown can wait for or cancel them.
        self.active: set[asyncio.Task[Any]] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        # Set once shutdown stops waiting for running requests (abort_all).
        self.aborting = asyncio.Event()

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
        """A fresh engine request id. Unguessable, and only ever made here: ids clients
        choose are kept apart (``client_ids``), so no client can take one ahead of time."""
        return f"{api}-{uuid.uuid4().hex}"

    def size_error(self, prompt: str | Sequence[int], field: str = "prompt") -> str | None:
        """Why text or a token id list is too long for this model, or None if it is not."""
        if isinstance(prompt, str):
            if len(prompt) > self.max_prompt_chars:
                return (
                    f"{field} has {len(prompt)} characters; at most {self.max_prompt_chars} "
                    f"are accepted for a model whose maximum length is "
                    f"{self.engine.max_model_len} tokens"
                )
        elif len(prompt) > self.max_token_ids:
            return (
                f"{field} has {len(prompt)} token ids; at most {self.max_token_ids} (the "
                f"model's maximum length) are accepted"
            )
        return None

    def check_prompt_size(self, prompt: str | Sequence[int], field: str = "prompt") -> None:
        """Refuses text too long to be worth tokenizing, or more ids than a sequence holds."""
        error = self.size_error(prompt, field)
        if error is not None:
            raise InvalidRequestError(error, field=field)

    def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        priority: int,
        lora_name: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """The engine stream of one request; a text prompt is tokenized on the tokenizer
        threads, in turn with Tokenize calls, so a flood of either cannot crowd out the
        step thread. ``lora_name`` names a loaded adapter (AdapterError if none is)."""
        return self.aengine.generate(
            prompt, params, request_id, priority, self._tokenizer_pool, lora_name=lora_name
        )

    # -- LoRA adapters -----------------------------------------------------------

    @property
    def lora_enabled(self) -> bool:
        return self.engine.lora is not None

    @property
    def loras(self) -> tuple[LoRARequest, ...]:
        """The adapters loaded now, by id (a snapshot the engine's thread keeps)."""
        return self.aengine.loras

    def lora(self, name: str) -> LoRARequest | None:
        """The loaded adapter called ``name``, or None."""
        return next((r for r in self.aengine.loras if r.lora_name == name), None)

    def lora_disabled_error(self) -> AdapterError:
        return AdapterError(
            "this server runs no LoRA adapters; start it with --enable-lora (and "
            "--max-lora-rank at least the adapters' rank) to load them"
        )

    def _check_lora_updates(self) -> None:
        if not self.lora_enabled:
            raise self.lora_disabled_error()
        if not self.runtime_lora_updates:
            e = AdapterError(
                "loading and unloading LoRA adapters at run time is off on this server; start "
                "it with --allow-runtime-lora-updating, or serve adapters with --lora-modules"
            )
            e.code = LORA_UPDATES_OFF
            raise e

    async def load_lora(self, name: str, path: str) -> LoRARequest:
        """Loads adapter ``name`` from ``path``; the errors of ``AsyncLLMEngine.add_lora``
        (AdapterError), or ``lora_disabled_error`` without --enable-lora."""
        self._check_lora_updates()
        if name == self.model_name:
            raise AdapterError(
                f"LoRA adapter name {name!r} is the base model's name; give the adapter "
                "another name"
            )
        req = await self.aengine.add_lora(name, path)
        logger.info("loaded LoRA adapter %r (id %d) from %s", name, req.lora_int_id, path)
        return req

    async def unload_lora(self, name: str) -> LoRARequest:
        """Unloads adapter ``name``; the errors of ``AsyncLLMEngine.remove_lora``."""
        self._check_lora_updates()
        req = await self.aengine.remove_lora(name)
        logger.info("unloaded LoRA adapter %r (id %d)", name, req.lora_int_id)
        return req

    async def in_tokenizer_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs tokenizer work on the server's few tokenizer threads."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn, *args)

    def abort_all(self) -> None:
        """Ends every running request now (shutdown out of patience): the engine aborts
        them, so each stream still sends its last output, which says "abort"."""
        self.aborting.set()
        self.aengine.abort_all()

    def close(self) -> None:
        """Drops queued tokenizer work (the server has stopped)."""
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    async def encode_without_special_tokens(self, text: str) -> str | list[int]:
        """Token ids of text without the tokenizer's special tokens (JetStream's BOS is
        the server's to add), tokenized on the tokenizer threads. Text the engine must refuse anyway (empty, no tokenizer) is
        returned as is, for the engine's own message."""
        tok = self.tokenizer
        if tok is None or not text:
            return text
        ids = await self.in_tokenizer_pool(lambda: tok.encode(text, add_special_tokens=False))
        if not ids:
            raise InvalidRequestError(f"prompt {text[:40]!r} tokenized to nothing", field="prompt")
        return ids

    async def stream(
        self,
        api: str,
        context: grpc.aio.ServicerContext,
        make_job: Callable[[], Awaitable[Job]],
    ) -> AsyncIterator[Any]:
        """Runs one generation RPC: admission, streaming, error mapping, cleanup."""
        with self.tracked():
            async for msg in self._stream(api, context, make_job):
                yield msg

    @contextlib.contextmanager
    def tracked(self) -> Iterator[None]:
        """Counts the current task among the open requests (``active``, which shutdown
        waits for or cancels), for the gRPC and HTTP APIs alike."""
        task = asyncio.current_task()
        if task is None:
            yield
            return
        self.active.add(task)
        self.idle.clear()
        try:
            yield
        finally:
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
            dead = self.aengine.dead
            context.set_code(
                grpc.StatusCode.INTERNAL
                if dead is not None and not isinstance(dead, EngineUnavailableError)
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
        if self.aborting.is_set():  # shutdown gave up on requests while this one was prepared
            rec.finish("rejected")
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(self._not_live_reason())
            return

        if job.client_id is not None:
            if job.client_id in self.client_ids:
                rec.finish("invalid")
                context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                context.set_details(
                    f"request id {job.client_id!r} is already in use by a running request; "
                    "choose another, or leave it empty for the server to choose one"
                )
                return
            self.client_ids.add(job.client_id)
        outcome: str | None = None  # stays None if the RPC ends before the request does
        late_abort = False
        gen = self.generate(job.prompt, job.params, job.request_id, job.priority, job.lora_name)
        try:
            # Leaving this block before the request finished (the RPC was cancelled,
            # ran out of time or was closed) closes the engine stream, which aborts
            # the request it admitted and frees its pages. A cancel that lands while
            # gRPC sends a message leaves this generator suspended at its yield;
            # asyncio closes it when gRPC drops it, to the same effect.
            async with contextlib.aclosing(gen):
                async for out in gen:
                    rec.observe(out)
                    if out.finished:
                        outcome = convert.outcome_of(out)
                    elif self.aborting.is_set() and not late_abort:
                        late_abort = True  # admitted after abort_all went out
                        self.aengine.abort(job.request_id)
                    for msg in job.respond(out):
                        yield msg
            if outcome == "aborted" and self.aborting.is_set():
                context.set_code(grpc.StatusCode.UNAVAILABLE)
                context.set_details(SHUTDOWN_ABORT_MESSAGE)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as e:
            outcome = self.failure_outcome(e, job.request_id)
            context.set_code(
                grpc.StatusCode.UNAVAILABLE
                if isinstance(e, EngineUnavailableError)
                else _GRPC_CODES[outcome]
            )
            context.set_details(
                str(e)
                if isinstance(e, _TYPED_ERRORS)
                else f"internal error while serving request {job.request_id}"
            )
        finally:
            if job.client_id is not None:
                self.client_ids.discard(job.client_id)
            rec.finish(outcome or "cancelled")

    def failure_outcome(self, e: Exception, request_id: str) -> str:
        """The metrics outcome of a request the engine ended with ``e``: "invalid",
        "rejected" or "error". An engine failure is passed on (``on_engine_dead``); an
        error of no expected type is logged with its traceback."""
        if isinstance(e, InvalidRequestError):
            return "invalid"
        if isinstance(e, CapacityError):
            return "rejected"
        if isinstance(e, EngineDeadError):
            self.on_engine_dead()
        else:
            logger.error("request %s failed", request_id, exc_info=e)
        return "error"

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
            core.check_prompt_size(prompt)
            params = convert.sampling_params(request.sampling)
            rid = core.new_request_id("gen")
            client_id = request.request_id or None
            respond = convert.GenerateResponder(client_id or rid, params)
            lora = request.lora_name or None
            return Job(prompt, params, rid, request.priority, respond, client_id, lora)

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
        error = self.core.size_error(request.text, "text")
        if error is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        text = request.text
        ids = await self.core.in_tokenizer_pool(lambda: tok.encode(text, add_special_tokens=add))
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        tok = self.core.tokenizer
        if tok is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "this model has no tokenizer (tokenizer.json)"
            )
        error = self.core.size_error(request.token_ids, "token_ids")
        if error is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        vocab = self.core.engine.cfg.vocab_size
        bad = [t for t in request.token_ids if not 0 <= t < vocab]
        if bad:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"token id {bad[0]} is outside the vocabulary [0, {vocab}) of this model",
            )
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        ids = list(request.token_ids)
        text = await self.core.in_tokenizer_pool(lambda: tok.decode(ids, skip_special_tokens=skip))
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
        info.lora_enabled = core.lora_enabled
        info.lora_adapters.extend(convert.lora_adapter(r) for r in core.loras)
        return info

    async def LoadLoRAAdapter(
        self, request: pb.LoadLoRAAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadLoRAAdapterResponse:
        req = await self._lora_call(
            context, self.core.load_lora(request.lora_name, request.lora_path)
        )
        return pb.LoadLoRAAdapterResponse(adapter=convert.lora_adapter(req))

    async def UnloadLoRAAdapter(
        self, request: pb.UnloadLoRAAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadLoRAAdapterResponse:
        req = await self._lora_call(context, self.core.unload_lora(request.lora_name))
        return pb.UnloadLoRAAdapterResponse(adapter=convert.lora_adapter(req))

    async def _lora_call(
        self, context: grpc.aio.ServicerContext, call: Awaitable[LoRARequest]
    ) -> LoRARequest:
        """Awaits a load or unload, aborting the RPC with its error's status."""
        try:
            return await call
        except AdapterError as e:
            code = _LORA_CODES.get(e.code, grpc.StatusCode.INVALID_ARGUMENT)
            if not self.core.lora_enabled:
                code = grpc.StatusCode.FAILED_PRECONDITION
            await context.abort(code, str(e))
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineDeadError as e:
            unavailable = isinstance(e, EngineUnavailableError)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE if unavailable else grpc.StatusCode.INTERNAL, str(e)
            )
        raise AssertionError("unreachable: context.abort raises")


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
            prompt = jp.prompt
            core.check_prompt_size(prompt)
            if isinstance(prompt, str):
                prompt = await core.encode_without_special_tokens(prompt)
                bos = core.bos_token_id
                if jp.add_bos and bos is not None and isinstance(prompt, list):
                    prompt.insert(0, bos)
                    core.check_prompt_size(prompt)
            respond = convert.JetStreamResponder(
                jp.params.n, jp.text_mode, core.engine.cfg.eos_token_ids
            )
            return Job(prompt, jp.params, core.new_request_id("js"), 0, respond)

        async for msg in core.stream("jetstream", context, make_job):
            yield msg

    async def HealthCheck(
        self, request: js.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> js.HealthCheckResponse:
        return js.HealthCheckResponse(is_live=self.core.live)
