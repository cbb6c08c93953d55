"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

| status | type | when |
| --- | --- | --- |
| 400 | invalid_request_error | a bad field (``param`` names it), a prompt beyond the model's length (code ``context_length_exceeded``) |
| 401 | authentication_error | no token or a wrong one, when the server requires one |
| 403 | permission_error | loading or unloading a LoRA adapter on a server started without ``--allow-runtime-lora-updating`` |
| 404 | invalid_request_error | an unknown model (code ``model_not_found``: neither the base model nor a loaded LoRA adapter) or path |
| 409 | invalid_request_error | unloading a LoRA adapter that unfinished requests use (code ``lora_adapter_in_use``) |
| 413 | invalid_request_error | a request body over ``--max-request-bytes`` |
| 429 | rate_limit_error | the engine's queue is full; retry later |
| 500 | server_error | the engine failed |
| 503 | service_unavailable | warming up or shutting down, or the engine lost a process of its group; retry later or elsewhere |
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse

from jserve.engine.async_engine import LORA_IN_USE, LORA_NOT_FOUND, LORA_UPDATES_OFF
from jserve.errors import (
    CapacityError,
    EngineDeadError,
    EngineUnavailableError,
    InvalidRequestError,
)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = {"www-authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def engine_failed(dead: BaseException | None) -> bool:
    """Whether the engine itself failed (500), rather than being unavailable for a reason
    outside it, e.g. a lost process of its group (503), or not failed at all."""
    return dead is not None and not isinstance(dead, EngineUnavailableError)


def from_engine_error(e: Exception, fields: dict[str, str] | None = None) -> APIError:
    """The APIError for one of the engine's typed errors, naming the request's field
    (the engine's field names mapped through the endpoint's own, ``fields``: e.g.
    chat's logprobs are ``top_logprobs``)."""
    fields = fields or {}
    msg = str(e)
    if isinstance(e, CapacityError):
        return APIError(429, msg, None, "queue_full")
    if isinstance(e, EngineUnavailableError):  # e.g. a process of the group is gone
        return APIError(503, msg, None, "engine_unavailable")
    if isinstance(e, EngineDeadError):
        return APIError(500, msg, None, "engine_dead")
    if not isinstance(e, InvalidRequestError):
        return APIError(500, "internal error", None, "internal_error")
    if e.code == LORA_NOT_FOUND:  # e.g. unloaded between the model check and admission
        return APIError(404, msg, "model", "model_not_found")
    field = fields.get(e.field, e.field) if e.field is not None else None
    return bad_request(msg, field, e.code)


def from_lora_error(e: Exception, param: str) -> APIError:
    """The APIError for a failed LoRA load or unload (``param``: the field at fault when
    the adapter cannot be served)."""
    if isinstance(e, InvalidRequestError):
        if e.code == LORA_NOT_FOUND:
            return APIError(404, str(e), "lora_name", LORA_NOT_FOUND)
        if e.code == LORA_IN_USE:
            return APIError(409, str(e), "lora_name", LORA_IN_USE)
        if e.code == LORA_UPDATES_OFF:
            return APIError(403, str(e), None, LORA_UPDATES_OFF)
        return bad_request(str(e), param, e.code)
    return from_engine_error(e)


# How pydantic names the member of a union in an error's location: str, list[int], ...
_UNION_TAG = re.compile(r"^(str|int|float|bool|none)$|[\[\]-]")


def from_validation_errors(errors: list[dict[str, Any]]) -> APIError:
    """A 400 for pydantic's first complaint about a request body, naming the field."""
    if not errors:
        return bad_request("invalid request body")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {err.get('msg', '')}")
    if not loc:
        return bad_request(f"the request body must be a JSON object: {err.get('msg', '')}")
    # Union members add their type names to the location (prompt.str, prompt.list[int]...).
    parts = [p for p in loc if not _UNION_TAG.search(p)]
    param = ""
    for p in parts or loc[:1]:
        param += f"[{p}]" if p.isdigit() else (f".{p}" if param else p)
    if kind == "extra_forbidden":
        return bad_request(f"unknown field {param!r}: this server does not support it", param)
    if kind == "missing":
        return bad_request(f"{param} is required", param)
    if param in _SHAPES:
        return bad_request(f"invalid {param}: {_SHAPES[param]}", param)
    return bad_request(f"invalid {param}: {err.get('msg', '')}", param)


# Fields whose type is a union, where pydantic's first complaint names only one member.
_SHAPES = {
    "prompt": "give text, a list of texts, a list of token ids, or a list of token-id lists",
    "stop": "give a string or a list of strings",
}
