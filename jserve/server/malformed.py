"""Requests whose bytes are not the message they should be: INVALID_ARGUMENT, plainly.

gRPC answers a request its deserializer cannot parse with UNKNOWN and a
message naming Python exception classes. ``MalformedRequestInterceptor`` wraps
every method's deserializer so a parse failure becomes a marker instead, and
the method's behaviour answers the marker with INVALID_ARGUMENT naming the
message type that was expected, before any servicer code runs.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc


class _Malformed:
    """What a request deserializes to when its bytes do not parse."""

    def __init__(self, message: str) -> None:
        self.message = message


def _expected_name(deserializer: Callable[[bytes], Any]) -> str:
    cls = getattr(deserializer, "__self__", None)  # Message.FromString's class
    descriptor = getattr(cls, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", None) or "request"


def _wrap_deserializer(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    name = _expected_name(deserializer)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return _Malformed(
                f"malformed request: the bytes sent ({len(data)}) are not a valid {name} "
                "message; check that the client uses this server's .proto files"
            )

    return deserialize


async def _refuse(context: grpc.aio.ServicerContext, request: _Malformed) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def _guard_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a unary-request behaviour (a coroutine or an async generator function)."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, _Malformed):
                await _refuse(context, request)
            async for msg in behavior(request, context):
                yield msg

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            await _refuse(context, request)
        return await behavior(request, context)

    return call


def _guard_streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a streaming-request behaviour: each malformed message ends the call."""

    def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        async def gen() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, _Malformed):
                    await _refuse(context, request)
                yield request

        return gen()

    if inspect.isasyncgenfunction(behavior):

        async def stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for msg in behavior(checked(requests, context), context):
                yield msg

        return stream

    async def call(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(checked(requests, context), context)

    return call


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        kind = (
            ("stream" if handler.request_streaming else "unary")
            + "_"
            + ("stream" if handler.response_streaming else "unary")
        )
        behavior = getattr(handler, kind)
        if behavior is None:
            return handler
        guard = _guard_streaming if handler.request_streaming else _guard_unary
        return handler._replace(
            request_deserializer=_wrap_deserializer(handler.request_deserializer),
            **{kind: guard(behavior)},
        )
