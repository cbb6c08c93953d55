"""Typed errors. Each says what was wrong and what to do about it.

``JserveError`` and ``ConfigError`` are defined in ``sharding.errors`` and
``CheckpointError`` in ``checkpoints.errors``: those packages raise them and
must not import ``jserve``. They are re-exported here so callers catch every
jserve error through this module (or the ``jserve`` package).
"""

from __future__ import annotations

from checkpoints.errors import CheckpointError
from sharding.errors import ConfigError, JserveError

__all__ = [
    "CapacityError",
    "CheckpointError",
    "ConfigError",
    "EngineDeadError",
    "EngineStepError",
    "InvalidRequestError",
    "JserveError",
    "RequestTooLargeError",
]


class InvalidRequestError(JserveError, ValueError):
    """A request (prompt or sampling parameters) is invalid; nothing was changed.

    ``field`` names the request field at fault where there is one (``"top_p"``,
    ``"prompt"``, ...) and ``code`` says more where a client may act on it
    (``"context_length_exceeded"``), so the APIs report them without reading the
    message.
    """

    def __init__(self, message: str, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.code = code


class RequestTooLargeError(InvalidRequestError):
    """The request could never run in this engine (it needs more KV pages than exist)."""


class CapacityError(JserveError):
    """The engine cannot take the request now (queue full); retrying later may succeed."""


class EngineDeadError(JserveError):
    """The engine's step loop failed and no longer serves requests."""


class EngineUnavailableError(EngineDeadError):
    """The engine no longer serves for a reason outside it (e.g. a process of its
    multi-host group was lost): a restart or another replica can serve the request."""


class EngineStepError(JserveError):
    """A step failed inside the engine: the requests in it were aborted and their pages
    freed, and the engine serves on (retrying the request may succeed)."""
