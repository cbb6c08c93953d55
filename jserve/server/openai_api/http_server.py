"""The HTTP server: uvicorn serving the FastAPI app as a task of the caller's event loop.

The socket is bound here, so a port in use is an OSError at start-up and port
0 gives the bound port at once. uvicorn's own signal handling is left out:
the gRPC server's SIGTERM/SIGINT handling stops both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HTTPServer:
    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        grace_period: float = 30.0,
    ) -> None:
        self.app = app
        self.host = host
        self.tls = tls_cert is not None
        self._sock = _bind(host, port)
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            ssl_certfile=tls_cert,
            ssl_keyfile=tls_key,
            lifespan="off",
            ws="none",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=grace_period,
        )
        # uvicorn's start and stop lines repeat what `jserve serve` announces itself.
        uv_logger = logging.getLogger("uvicorn.error")
        if uv_logger.level == logging.NOTSET:
            uv_logger.setLevel(logging.WARNING)
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def start(self) -> None:
        """Serves from now on; returns once the socket accepts connections."""
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._sock.close()
                self._task.result()  # raises what stopped it (e.g. unreadable TLS files)
                raise OSError(f"the HTTP server on {self.url} stopped while starting")
            await asyncio.sleep(0.01)

    def begin_shutdown(self, grace: float) -> None:
        """Stops accepting connections; open ones get ``grace`` seconds to finish."""
        self._server.config.timeout_graceful_shutdown = grace
        self._server.should_exit = True

    async def wait_closed(self) -> None:
        if self._task is None:
            self._sock.close()
            return
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def stop(self, grace: float = 0.0) -> None:
        self.begin_shutdown(grace)
        await self.wait_closed()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        # SO_REUSEADDR (set by create_server) lets a restart reuse a port in TIME_WAIT;
        # a port another process listens on is still an error.
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port} for HTTP: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock
