"""The FastAPI application: routes, the token check, body limits, errors in OpenAI's shape.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``, ``GET /health`` (200 once warmed up, 503 while warming up,
draining or after an engine failure), ``GET /metrics`` (the server's
Prometheus registry, the one the gRPC server's ``--metrics-port`` serves),
``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info`` (vLLM's
shapes, which lm-evaluation-harness's ``local-completions`` tokenizes with). With a token set,
every route but ``/health`` needs ``Authorization: Bearer <token>``.

LoRA adapters, as vLLM serves them: a request's ``model`` may name a loaded adapter;
``/v1/models`` lists each one after the base model (``parent``: the base model's id);
``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` and ``POST
/v1/unload_lora_adapter`` ``{"lora_name"}`` change them at run time (400 for an adapter
that cannot be served, 404 for unloading an unknown name, 409 while requests use it).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jserve.errors import JserveError
from jserve.lora import LoRARequest
from jserve.server.openai_api.chat import create_chat_completion, render_chat
from jserve.server.openai_api.completions import create_completion
from jserve.server.openai_api.errors import (
    APIError,
    bad_request,
    engine_failed,
    from_lora_error,
    from_validation_errors,
)
from jserve.server.openai_api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from jserve.server.openai_api.runs import ClientGone
from jserve.server.openai_api.state import APIState

logger = logging.getLogger(__name__)

AUTH_EXEMPT = frozenset({"/health"})


class _BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class GuardMiddleware:
    """Checks the bearer token and bounds the request body before any route runs."""

    def __init__(self, app: ASGIApp, state: APIState) -> None:
        self.app = app
        self.state = state
        token = state.auth_token
        self._expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self._expected is not None and scope.get("path") not in AUTH_EXEMPT:
            given = headers.get(b"authorization")
            if given is None or not hmac.compare_digest(given, self._expected):
                self.state.core.metrics.auth_failures.inc()
                message = (
                    "missing credentials: send the header 'Authorization: Bearer <token>'"
                    if given is None
                    else "invalid token in the 'Authorization' header"
                )
                err = APIError(401, message, None, "invalid_api_key")
                await err.response()(scope, receive, send)
                return
        limit = self.state.max_request_bytes
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await _too_large(limit).response()(scope, receive, send)
            return
        seen = 0

        async def bounded_receive() -> Message:  # for bodies sent without a length
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()  # answered by the HTTPException handler
            return message

        await self.app(scope, bounded_receive, send)


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body exceeds {limit} bytes (--max-request-bytes)",
        None,
        "request_too_large",
    )


def build_app(state: APIState) -> FastAPI:
    app = FastAPI(
        title="jserve",
        summary="OpenAI-compatible API on the jserve engine",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(GuardMiddleware, state=state)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return from_validation_errors(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        status = exc.status_code
        if status == 413:  # _BodyTooLarge, from a body sent without a length
            return _too_large(state.max_request_bytes).response()
        code = {404: "not_found", 405: "method_not_allowed"}.get(status)
        return APIError(status, str(exc.detail), None, code).response()

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody is listening

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return APIError(500, "internal error", None, "internal_error").response()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await create_completion(state, req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(state, req, request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards = [_model_card(state), *(_lora_card(state, r) for r in state.core.loras)]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        lora = state.check_model(model)
        return _model_card(state) if lora is None else _lora_card(state, lora)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoRAAdapterRequest) -> Response:
        try:
            lora = await state.core.load_lora(req.lora_name, req.lora_path)
        except JserveError as e:
            raise from_lora_error(e, "lora_path") from None
        return PlainTextResponse(
            f"Success: LoRA adapter {lora.lora_name!r} loaded (id {lora.lora_int_id})"
        )

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoRAAdapterRequest) -> Response:
        known = state.core.lora(req.lora_name)
        given = req.lora_int_id
        if given is not None and known is not None and known.lora_int_id != given:
            raise bad_request(
                f"LoRA adapter {req.lora_name!r} has id {known.lora_int_id}, not {given}",
                "lora_int_id",
            )
        try:
            lora = await state.core.unload_lora(req.lora_name)
        except JserveError as e:
            raise from_lora_error(e, "lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter {lora.lora_name!r} unloaded")

    @app.get("/health")
    async def health() -> Response:
        core = state.core
        if core.live:
            return Response(status_code=200)
        status = 500 if engine_failed(core.aengine.dead) else 503
        return APIError(status, core._not_live_reason(), None, "unavailable").response()

    @app.get("/metrics")
    async def metrics() -> Response:
        registry = state.core.metrics.registry
        data = await asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)
        return PlainTextResponse(data, media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> Response:
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give either prompt (text) or messages", "prompt")
        if req.messages is not None:
            ids = await render_chat(state, req.messages, req.add_generation_prompt)
        else:
            assert req.prompt is not None
            tok = state.need_tokenizer("prompt")
            state.check_prompt_size(req.prompt, "prompt")
            text, special = req.prompt, req.add_special_tokens
            ids = await state.core.in_tokenizer_pool(
                lambda: tok.encode(text, add_special_tokens=special)
            )
        return JSONResponse(
            {"count": len(ids), "max_model_len": state.core.engine.max_model_len, "tokens": ids}
        )

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> Response:
        # vLLM's endpoint, which lm-evaluation-harness uses to tokenize through the server.
        state.need_tokenizer("model")
        template = state.chat_template
        return JSONResponse(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": state.bos_token,
                "eos_token": state.eos_token,
                "pad_token": None,
                "chat_template": template.source if template is not None else None,
                "model_max_length": state.core.engine.max_model_len,
            }
        )

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> Response:
        state.check_model(req.model)
        tok = state.need_tokenizer("tokens")
        state.check_prompt_size(req.tokens, "tokens")
        vocab = state.core.engine.cfg.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(
                f"token id {bad[0]} is outside the vocabulary [0, {vocab}) of this model",
                "tokens",
            )
        ids = list(req.tokens)
        text = await state.core.in_tokenizer_pool(tok.decode, ids)
        return JSONResponse({"prompt": text})

    return app


def _model_card(state: APIState) -> dict[str, Any]:
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "jserve",
        "parent": None,
        "max_model_len": state.core.engine.max_model_len,
    }


def _lora_card(state: APIState, lora: LoRARequest) -> dict[str, Any]:
    return {
        **_model_card(state),
        "id": lora.lora_name,
        "root": str(lora.lora_path),
        "parent": state.model_name,
    }
