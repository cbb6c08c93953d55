"""Shared-token authentication: ``authorization: Bearer <token>`` call metadata.

Every call must carry the token except health checks: the standard
``grpc.health.v1.Health`` service and JetStream's ``HealthCheck``. Load
balancers and orchestrators probe those without credentials, and they reveal
nothing but serving status. Generation, JetStream Decode, tokenizer, model
info and reflection calls all need the token. Send the token only over TLS
unless client and server share the host.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

# Methods callable without the token.
EXEMPT_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/jetstream_proto.Orchestrator/HealthCheck",
    }
)


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that authenticates with ``token``."""
    return (("authorization", f"Bearer {token}"),)


def _deny_handler(handler: grpc.RpcMethodHandler, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that fails with UNAUTHENTICATED."""

    async def deny(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, on_failure: Callable[[], None] | None = None) -> None:
        if not token:
            raise ValueError("the auth token must not be empty")
        self._expected = f"Bearer {token}".encode()
        self._on_failure = on_failure

    def _authorized(self, metadata: Any) -> bool | None:
        """True/False for a right/wrong token, None when there is none."""
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in EXEMPT_METHODS:
            return handler
        ok = self._authorized(handler_call_details.invocation_metadata)
        if ok:
            return handler
        if self._on_failure is not None:
            self._on_failure()
        if ok is None:
            details = "missing credentials: send call metadata 'authorization: Bearer <token>'"
        else:
            details = "invalid token in the 'authorization' metadata"
        return _deny_handler(handler, details)
