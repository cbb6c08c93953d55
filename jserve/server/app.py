"""The jserve gRPC server: build, start, warm up, serve, shut down gracefully.

    handle = await start_server(aengine, port=0, metrics_port=0)
    ...                                    # serve; handle.port is the bound port
    await handle.stop()                    # graceful: drains running requests

With ``http_port`` set, the OpenAI-compatible HTTP API (jserve.server.openai_api)
is served too, from the same event loop, engine, TLS files and token; both
share the shutdown below.

Shutdown (``stop``, or SIGTERM/SIGINT in ``serve``): health turns NOT_SERVING
at once while both listeners stay open (new generation calls get UNAVAILABLE),
running requests get the grace period, and then, or at once on a second
signal (``force_stop``), every request still running is aborted: its stream
ends with FINISH_REASON_ABORT and usage, then UNAVAILABLE with jserve's
message (an HTTP stream: finish_reason "abort", then [DONE]). Only then do
the listeners close.

or, for a process that serves until SIGTERM/SIGINT:

    await serve(aengine, ServerConfig(port=50051, metrics_port=9090))

Services: ``jserve.v1.Generation``, ``jetstream_proto.Orchestrator``,
``grpc.health.v1.Health`` and server reflection. Health reports NOT_SERVING
until the warm-up request went through the engine, SERVING after, and
NOT_SERVING again while shutting down or once the engine died. The server
binds 127.0.0.1 unless another host is given explicitly; the metrics endpoint
has a host of its own (``metrics_host``, 127.0.0.1 by default), so serving the
APIs on all interfaces does not publish the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import signal
import ssl
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jserve.engine.async_engine import AsyncLLMEngine
from jserve.errors import ConfigError
from jserve.sampling_params import SamplingParams
from jserve.server.auth import BearerTokenInterceptor
from jserve.server.malformed import MalformedRequestInterceptor
from jserve.server.metrics import MetricsHTTPServer, ServerMetrics
from jserve.server.proto import (
    generation_pb2,
    generation_pb2_grpc,
    jetstream_pb2,
    jetstream_pb2_grpc,
)
from jserve.server.servicers import GenerationServicer, OrchestratorServicer, ServingCore

logger = logging.getLogger(__name__)

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
JETSTREAM_SERVICE = jetstream_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name
SERVED_SERVICES = (GENERATION_SERVICE, JETSTREAM_SERVICE)
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Seconds a shutdown gives the engine to end the requests it aborts (their last
# messages) before it cancels their calls outright.
ABORT_WAIT = 2.0
# Seconds calls other than generation (e.g. a Tokenize) get once every request is
# done and the listeners close.
CLOSE_GRACE = 1.0


@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (see ServerHandle.port)
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    # Metrics have no token check: this machine only, whatever `host` is, unless asked.
    metrics_host: str = "127.0.0.1"
    http_port: int | None = None  # None: no HTTP API; 0: any free port
    chat_template: str | None = None  # a Jinja file overriding the model's chat template
    tls_cert: str | None = None  # PEM files; both or neither
    tls_key: str | None = None
    auth_token: str | None = None  # require "authorization: Bearer <token>" (health exempt)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    grace_period: float = 30.0  # seconds running requests get to finish on shutdown
    model_name: str | None = None  # None: the model directory's name
    warmup: bool = True  # send one tiny request through the engine before SERVING
    # Sampling of JetStream Decode requests (they carry no sampling fields);
    # n and max_tokens come from each request. Default: greedy.
    jetstream_params: SamplingParams | None = None
    # Load and unload LoRA adapters through the APIs (LoadLoRAAdapter, /v1/load_lora_adapter):
    # off unless asked, since a load makes the server read a directory its caller names.
    allow_runtime_lora_updating: bool = False

    def validate(self) -> ServerConfig:
        """Checks every option (ports, TLS files, token, limits); ConfigError naming it."""
        for name, port in (
            ("port", self.port),
            ("http_port", self.http_port),
            ("metrics_port", self.metrics_port),
        ):
            if port is not None and not 0 <= port <= 65535:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(
                    f"{flag} {port} is not a TCP port: give 1-65535, or 0 for any free port"
                )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both a certificate and a key file (--tls-cert, --tls-key)")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"TLS file {path!r} does not exist")
        if self.tls_cert is not None and self.tls_key is not None:
            check_tls_files(self.tls_cert, self.tls_key)
        if self.chat_template is not None and not os.path.isfile(self.chat_template):
            raise ConfigError(f"chat template file {self.chat_template!r} does not exist")
        if self.auth_token is not None and not self.auth_token:
            raise ConfigError("the auth token is empty")
        if self.max_request_bytes < 1024:
            raise ConfigError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if self.grace_period < 0:
            raise ConfigError(f"grace_period must be >= 0, got {self.grace_period}")
        return self


def check_tls_files(cert: str, key: str) -> None:
    """Loads the certificate chain and key as a TLS server would; ConfigError saying what
    is wrong (gRPC itself only reports a failed bind, and only once the model is loaded)."""
    try:
        ssl.create_default_context().load_verify_locations(cafile=cert)
    except (ssl.SSLError, OSError, ValueError) as e:
        raise ConfigError(
            f"--tls-cert {cert!r} holds no usable PEM certificate ({_ssl_reason(e)})"
        ) from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError, ValueError) as e:
        if getattr(e, "reason", None) == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"--tls-key {key!r} does not match the certificate in --tls-cert {cert!r}"
            ) from None
        raise ConfigError(
            f"--tls-key {key!r} holds no usable unencrypted PEM private key ({_ssl_reason(e)})"
        ) from None


def _ssl_reason(e: Exception) -> str:
    reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
    return str(reason).replace("_", " ").lower()


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def warm_up(aengine: AsyncLLMEngine) -> None:
    """Runs one tiny greedy request through the whole engine path."""
    cfg = aengine.engine.cfg
    token = cfg.bos_token_id if cfg.bos_token_id is not None else 0
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    rid = f"jserve-server-warmup-{uuid.uuid4().hex[:8]}"
    # Cancelling this (a stop during warm-up) aborts the request and frees its pages.
    async for _ in aengine.generate([token], params, rid):
        pass


class _HealthServicer(health.aio.HealthServicer):
    """The standard health service, whose Watch streams end when the server stops.

    Otherwise an open Watch (load balancers keep one) would hold a graceful
    shutdown for its whole grace period.
    """

    def __init__(self) -> None:
        super().__init__()
        self.closing = asyncio.Event()

    async def Watch(self, request: Any, context: Any) -> None:
        watch = asyncio.ensure_future(super().Watch(request, context))
        closing = asyncio.ensure_future(self.closing.wait())
        try:
            await asyncio.wait({watch, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (watch, closing):
                t.cancel()
            for t in (watch, closing):
                with contextlib.suppress(asyncio.CancelledError):
                    await t


class ServerHandle:
    """A started server. ``port``/``metrics_port`` are the bound ports."""

    def __init__(self, aengine: AsyncLLMEngine, config: ServerConfig) -> None:
        self.aengine = aengine
        self.config = config
        self.metrics = ServerMetrics(aengine)
        self.health = _HealthServicer()
        model_name = config.model_name or aengine.engine.cfg.name or "model"
        js_params = config.jetstream_params or SamplingParams(temperature=0.0)
        self.core = ServingCore(
            aengine,
            self.metrics,
            model_name,
            js_params,
            self._engine_died,
            config.allow_runtime_lora_updating,
        )
        self.port = 0
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self.ready = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._metrics_http: MetricsHTTPServer | None = None
        self._http: Any = None  # openai_api.http_server.HTTPServer
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping: asyncio.Task[None] | None = None
        self._force = asyncio.Event()
        self._stopped = asyncio.Event()

    @property
    def address(self) -> str:
        return _hostport(self.config.host, self.port)

    async def _set_health(self, status: Any) -> None:
        for name in ("", *SERVED_SERVICES):
            await self.health.set(name, status)

    def _engine_died(self) -> None:
        if self.core.ready:
            logger.error("the engine died (%s); health is now NOT_SERVING", self.aengine.dead)
        self.core.ready = False
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to update
            self.spawn(self._set_health(NOT_SERVING))

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Runs a coroutine in the background, keeping a reference until it is done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _watch_engine(self) -> None:
        while self.aengine.dead is None:
            await asyncio.sleep(0.5)
        self._engine_died()

    @property
    def http_url(self) -> str | None:
        return self._http.url if self._http is not None else None

    async def start(self) -> None:
        cfg = self.config
        http_app = self._http_app() if cfg.http_port is not None else None
        await self._set_health(NOT_SERVING)
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if cfg.auth_token is not None:
            interceptors.append(
                BearerTokenInterceptor(cfg.auth_token, self.metrics.auth_failures.inc)
            )
        interceptors.append(MalformedRequestInterceptor())
        options = [
            ("grpc.max_receive_message_length", cfg.max_request_bytes),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not silently shared
        ]
        server = grpc.aio.server(interceptors=interceptors, options=options)
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self.core), server)
        jetstream_pb2_grpc.add_OrchestratorServicer_to_server(
            OrchestratorServicer(self.core), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                *SERVED_SERVICES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = _hostport(cfg.host, cfg.port)
        try:
            if cfg.tls_cert is not None and cfg.tls_key is not None:
                with open(cfg.tls_key, "rb") as f:
                    key = f.read()
                with open(cfg.tls_cert, "rb") as f:
                    cert = f.read()
                creds = grpc.ssl_server_credentials([(key, cert)])
                self.port = server.add_secure_port(address, creds)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as e:  # gRPC's way of saying the bind failed
            raise OSError(f"cannot listen on {address}: {e}") from None
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        if not _is_loopback(cfg.host):
            if cfg.auth_token is None:
                logger.warning(
                    "serving on %s without a token: anyone who can reach it can use the server",
                    cfg.host,
                )
            if cfg.tls_cert is None:
                logger.warning("serving on %s without TLS: traffic is plaintext", cfg.host)
        await server.start()
        self._server = server
        if http_app is not None:
            from jserve.server.openai_api.http_server import HTTPServer

            assert cfg.http_port is not None
            http = HTTPServer(
                http_app, cfg.host, cfg.http_port, cfg.tls_cert, cfg.tls_key, cfg.grace_period
            )
            await http.start()
            self._http = http
            self.http_port = http.port
        if cfg.metrics_port is not None:
            self._metrics_http = MetricsHTTPServer(
                self.metrics.registry, cfg.metrics_host, cfg.metrics_port
            )
            if not _is_loopback(cfg.metrics_host):
                logger.warning(
                    "metrics on %s: anyone who can reach it can read them (no token)",
                    cfg.metrics_host,
                )
            self.metrics_port = self._metrics_http.port
        self._tasks.append(asyncio.create_task(self._watch_engine()))

    def _http_app(self) -> Any:
        """The OpenAI-compatible API's app (ConfigError for an unusable chat template)."""
        from jserve.server.openai_api.app import build_app
        from jserve.server.openai_api.chat_template import ChatTemplate, special_tokens
        from jserve.server.openai_api.state import APIState

        cfg = self.config
        engine = self.aengine.engine
        template = ChatTemplate.load(engine.model.path, cfg.chat_template)
        bos, eos = special_tokens(engine.model.path)
        tok = engine.tokenizer
        if eos is None and tok is not None and engine.cfg.eos_token_ids:
            eos = tok.id_to_token(engine.cfg.eos_token_ids[0])
        state = APIState(self.core, template, cfg.auth_token, cfg.max_request_bytes, bos, eos)
        return build_app(state)

    async def warm_up_and_serve(self) -> None:
        """Marks the server ready (health SERVING) after the warm-up request."""
        try:
            if self.config.warmup:
                await warm_up(self.aengine)
        except Exception:
            logger.exception("warm-up failed; the server stays NOT_SERVING")
            self._engine_died()
            return
        if self.core.shutting_down or self.aengine.dead is not None:
            return
        self.core.ready = True
        await self._set_health(SERVING)
        self.ready.set()
        logger.info("warm-up done; health is SERVING")

    async def wait_ready(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self.ready.wait(), timeout)

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting RPCs, lets running ones finish within ``grace`` seconds, closes."""
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float | None) -> None:
        grace = self.config.grace_period if grace is None else grace
        self.core.shutting_down = True
        # NOT_SERVING at once, while the listeners still answer health checks (new
        # generation calls get UNAVAILABLE), so load balancers see the drain.
        await self.health.enter_graceful_shutdown()
        waits = {
            asyncio.ensure_future(self.core.idle.wait()),
            asyncio.ensure_future(self._force.wait()),
        }
        await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if not self.core.idle.is_set():  # forced or out of time
            logger.warning(
                "stopping %d request(s) that did not finish in time", len(self.core.active)
            )
            # Each stream sends its last output (FINISH_REASON_ABORT, usage) and ends.
            self.core.abort_all()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.core.idle.wait(), ABORT_WAIT)
            for task in list(self.core.active):  # the engine did not end them in time
                task.cancel()
        self.health.closing.set()
        if self._http is not None:
            self._http.begin_shutdown(CLOSE_GRACE)
        if self._server is not None:
            await self._server.stop(CLOSE_GRACE)
        if self._http is not None:
            await self._http.wait_closed()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._metrics_http is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._metrics_http.close)
        self.core.close()
        self._stopped.set()

    async def force_stop(self) -> None:
        """Cancels running requests now (e.g. on a second signal during a graceful stop)."""
        self._force.set()
        await self.stop(0)

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> ServerHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def start_server(
    aengine: AsyncLLMEngine,
    config: ServerConfig | None = None,
    *,
    wait_ready: bool = True,
    **overrides: Any,
) -> ServerHandle:
    """Binds and starts the server; with ``wait_ready`` also waits for the warm-up.

    Without ``wait_ready`` the warm-up runs in the background and
    ``handle.ready`` is set when health turns SERVING. ``overrides`` replace
    fields of ``config`` (e.g. ``port=0``). Raises ConfigError for an invalid
    config and OSError when the port cannot be bound.
    """
    config = config or ServerConfig()
    if overrides:
        config = dataclasses.replace(config, **overrides)
    config.validate()
    handle = ServerHandle(aengine, config)
    try:
        await handle.start()
        warm = asyncio.create_task(handle.warm_up_and_serve())
        handle._tasks.append(warm)
        if wait_ready:
            await asyncio.shield(warm)
            if not handle.ready.is_set():
                raise RuntimeError(f"the server did not become ready: {aengine.dead}")
    except BaseException:
        await handle.stop(0)
        raise
    return handle


async def serve(
    aengine: AsyncLLMEngine,
    config: ServerConfig,
    *,
    on_started: Callable[[ServerHandle], None] | None = None,
) -> None:
    """Serves until SIGTERM/SIGINT (graceful: running requests get the grace period).

    ``on_started(handle)`` is called once the ports are bound (before warm-up
    finishes).
    """
    handle = await start_server(aengine, config, wait_ready=False)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    count = 0

    def on_signal(signum: int) -> None:
        nonlocal count
        count += 1
        if count == 1:
            logger.info(
                "%s: draining %d running request(s) (up to %.0fs), then stopping",
                signal.Signals(signum).name,
                len(handle.core.active),
                handle.config.grace_period,
            )
            handle.spawn(handle.stop())
        else:
            logger.warning("second signal: cancelling running requests now")
            handle.spawn(handle.force_stop())

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        if on_started is not None:
            on_started(handle)
        await handle.wait_for_termination()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await handle.stop()
