"""An asyncio front for the engine: the step loop runs on its own thread.

The engine itself stays single-threaded: callers never touch it. They send
commands (add, abort) through a queue that the loop drains before each
step, and receive incremental outputs on per-request asyncio queues. An
add is validated on the loop thread and its error (bad input, queue full)
is raised to the caller before the stream starts. A step that fails raises
EngineStepError to the streams of the requests it held and the loop serves
on; only an engine that cannot recover (EngineDeadError) stops it.

LoRA adapters are loaded and unloaded the same way (``add_lora``,
``remove_lora``): the step thread reads the adapter's files and changes the
engine's registry between steps, and ``loras`` is a snapshot of what is
registered for callers on other threads to read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from jserve.engine.llm_engine import LLMEngine
from jserve.engine.request import Request
from jserve.engine.stats import EngineStats
from jserve.errors import EngineDeadError, EngineUnavailableError, JserveError
from jserve.lora import AdapterError, LoRARequest
from jserve.lora.adapter import HostAdapter
from jserve.outputs import RequestOutput
from jserve.prompts import PromptType, prompt_parts
from jserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# AdapterError codes for the two failures an API answers apart: no adapter by
# that name (NOT_FOUND / 404), and one that unfinished requests still use.
LORA_NOT_FOUND = "lora_adapter_not_found"
LORA_IN_USE = "lora_adapter_in_use"
# Loading or unloading adapters at run time while the server does not allow it.
LORA_UPDATES_OFF = "lora_runtime_updates_off"


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's loop may be closed
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stop = threading.Event()
        self._ids = itertools.count()
        self.dead: BaseException | None = None
        # Registered adapters, replaced whole on the step thread after each change.
        self.loras: tuple[LoRARequest, ...] = tuple(engine.list_loras())
        self._next_lora_id = 1 + max((r.lora_int_id for r in self.loras), default=0)
        self._thread = threading.Thread(target=self._loop, name="jserve-engine", daemon=True)
        self._thread.start()

    # -- caller side (any thread, any event loop) ----------------------------

    async def generate(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        tokenizer_executor: concurrent.futures.Executor | None = None,
        lora_request: LoRARequest | None = None,
        lora_name: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yields incremental outputs (new tokens, text delta, logprobs) until finished.

        A text prompt is tokenized on ``tokenizer_executor`` (default: the event
        loop's default executor), off the step thread. Leaving the iteration early
        (client gone, cancelled, deadline) aborts the request and frees its pages.
        The request runs with adapter ``lora_request`` (registered if new, as the
        engine's ``add_request``) or the registered adapter named ``lora_name``,
        looked up on the step thread as the request is admitted, so an adapter
        unloaded just before is refused (AdapterError, code LORA_NOT_FOUND).
        """
        if lora_request is not None and lora_name is not None:
            raise AdapterError("give lora_request or lora_name, not both")
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.dead}")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        text, ids = prompt_parts(prompt)  # the form and the text; raises before any state
        tokenizer = self.engine.tokenizer
        if text is not None and tokenizer is not None:
            # Tokenize here, off the step thread, so a long prompt never stalls a step.
            ids = await loop.run_in_executor(tokenizer_executor, tokenizer.encode, text)
        if getattr(params, "structured_outputs", None) is not None:
            # Compile the grammar here too (cached), so the step thread only looks it up.
            await loop.run_in_executor(
                tokenizer_executor, self.engine.structured.compile, params.structured_outputs
            )
        prompt = ids if ids is not None else text
        stream = _Stream(loop)
        admitted: concurrent.futures.Future[Request] = concurrent.futures.Future()
        lora = lora_request if lora_name is None else lora_name
        self._send(("add", rid, prompt, params, priority, text, lora, stream, admitted))
        try:
            req = await asyncio.wrap_future(admitted)
        except asyncio.CancelledError:
            # If the step thread already took the add, abort the request it admits
            # (and only that one: another request may carry the same id).
            def abort_admitted(done: concurrent.futures.Future[Request]) -> None:
                if not done.cancelled() and done.exception() is None:
                    self._send(("abort", rid, done.result()))

            admitted.add_done_callback(abort_admitted)
            raise
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._send(("abort", rid, req))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id, None))

    def abort_all(self) -> None:
        """Aborts every request admitted or being admitted so far (a server that stops
        now): each stream still gets its final output, whose samples say "abort"."""
        self._send(("abort_all",))

    async def add_lora(self, name: str, path: str) -> LoRARequest:
        """Loads adapter ``name`` from directory ``path`` under the next unused id (ids
        are never reused, so nothing cached for an unloaded adapter can match a new one).
        AdapterError, with nothing registered, for an adapter that cannot be served or a
        name already loaded. The files are read here, off the step thread, so running
        streams do not wait for them."""
        adapter = None
        if self.engine.lora is not None:
            loop = asyncio.get_running_loop()
            adapter = await loop.run_in_executor(None, self.engine.lora.read, name, path)
        return await self._call(self._add_lora, name, path, adapter)

    async def remove_lora(self, name: str) -> LoRARequest:
        """Unloads adapter ``name``. AdapterError with code LORA_NOT_FOUND for a name
        not loaded, LORA_IN_USE while unfinished requests use it."""
        return await self._call(self._remove_lora, name)

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()

    @property
    def num_active(self) -> int:
        return len(self._streams)

    def fail(self, error: EngineDeadError) -> None:
        """Fails every request now, from any thread: for an engine whose step thread
        may never return (a device call waiting on a lost process)."""
        if self.dead is None:
            self.dead = error
        for stream in list(self._streams.values()):
            stream.put(error)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the loop; requests still running are aborted."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    async def _call(self, fn: Any, *args: Any) -> Any:
        """Runs ``fn(*args)`` on the step thread between steps; its result or error."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.dead}")
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._send(("call", fn, args, done))
        return await asyncio.wrap_future(done)

    def _send(self, command: tuple[Any, ...]) -> None:
        self._commands.put(command)
        self._wake.set()

    # -- engine thread -------------------------------------------------------

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt, params, priority, text, lora, stream, admitted = cmd
                if not admitted.set_running_or_notify_cancel():
                    continue  # the caller gave up before admission
                if self.dead is not None:
                    admitted.set_exception(EngineDeadError(f"the engine stopped: {self.dead}"))
                    continue
                try:
                    named = isinstance(lora, str)
                    if named:
                        lora = self._lora_by_name(lora)
                    req = self.engine.add_request(
                        rid, prompt, params, priority, prompt_text=text, lora_request=lora
                    )
                    if lora is not None and not named:
                        self._snapshot_loras()  # the request may have registered it
                except Exception as e:  # validation changes nothing: only this add fails
                    if not isinstance(e, JserveError):
                        logger.exception("adding request %s failed", rid)
                    admitted.set_exception(e)
                    continue
                self._streams[rid] = stream
                admitted.set_result(req)
            elif cmd[0] == "abort":
                self.engine.abort_request(cmd[1], only=cmd[2])
            elif cmd[0] == "abort_all":
                for rid in list(self._streams):
                    self.engine.abort_request(rid)
            elif cmd[0] == "call":
                _, fn, args, done = cmd
                if not done.set_running_or_notify_cancel():
                    continue
                if self.dead is not None:
                    done.set_exception(EngineDeadError(f"the engine stopped: {self.dead}"))
                    continue
                try:
                    done.set_result(fn(*args))
                except Exception as e:  # each call checks before it changes anything
                    if not isinstance(e, JserveError):
                        logger.exception("engine call %s failed", getattr(fn, "__name__", fn))
                    done.set_exception(e)

    # LoRA registry changes, on the step thread (through _call).

    def _snapshot_loras(self) -> None:
        self.loras = tuple(self.engine.list_loras())
        self._next_lora_id = max(
            self._next_lora_id, 1 + max((r.lora_int_id for r in self.loras), default=0)
        )

    def _lora_by_name(self, name: str) -> LoRARequest:
        try:
            return self.engine.lora_by_name(name)
        except AdapterError as e:
            e.code = LORA_NOT_FOUND
            raise

    def _add_lora(self, name: str, path: str, adapter: HostAdapter | None) -> LoRARequest:
        if self.engine.lora is not None and self.engine.lora.get(name) is not None:
            known = self.engine.lora_by_name(name)
            raise AdapterError(
                f"LoRA adapter {name!r} is already loaded (from {known.lora_path}); unload it "
                "first to load it again, or choose another name"
            )
        req = self.engine.add_lora(LoRARequest(name, self._next_lora_id, path), adapter)
        self._snapshot_loras()
        return req

    def _remove_lora(self, name: str) -> LoRARequest:
        self._lora_by_name(name)
        try:
            req = self.engine.remove_lora(name)
        except AdapterError as e:  # the name is known: unfinished requests use it
            e.code = LORA_IN_USE
            raise
        self._snapshot_loras()
        return req

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        errors = self.engine.step_errors  # requests a failed step aborted: raise to them
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.put(errors.get(out.request_id, out))
            if out.finished:
                del self._streams[out.request_id]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
            except Exception as e:  # the engine could not recover (EngineDeadError): fail all
                cause = _unavailable_cause(e)
                if cause is not None:  # not the engine's fault: its message says it all
                    logger.error("engine stopped: %s", cause)
                else:
                    logger.exception("engine step failed")
                self._fail_all(e)
                return
            self._deliver(outputs)
        for rid in list(self._streams):
            self.engine.abort_request(rid)
        with contextlib.suppress(Exception):
            self._deliver(self.engine.step())

    def _fail_all(self, error: BaseException) -> None:
        cause = _unavailable_cause(error)
        self.dead = cause or error
        for stream in self._streams.values():
            stream.put(
                cause or EngineDeadError(f"the engine failed while serving this request: {error}")
            )
        self._streams.clear()
        # Answer adds that arrive after the failure instead of leaving them hanging.
        while not self._stop.is_set():
            self._drain_commands()
            self._wake.wait(timeout=0.5)
            self._wake.clear()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Blocks until no request is active (for tests and graceful shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._streams and self._commands.empty() and self.engine.is_idle():
                return True
            time.sleep(0.01)
        return False


def _unavailable_cause(error: BaseException) -> EngineUnavailableError | None:
    """The EngineUnavailableError behind an engine failure (e.g. a lost multi-host
    process under a failed step), if there is one."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, EngineUnavailableError):
            return seen
        seen = seen.__cause__
    return None
