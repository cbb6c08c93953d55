"""Typed errors. Each says what was wrong and what to do about it."""

from __future__ import annotations


class JserveError(Exception):
    """Base class of every error jserve raises on purpose."""


class ConfigError(JserveError, ValueError):
    """A model or engine configuration is invalid or unsupported."""


class CheckpointError(JserveError, ValueError):
    """A checkpoint is missing files or tensors, or they do not fit the config."""


class InvalidRequestError(JserveError, ValueError):
    """A request (prompt or sampling parameters) is invalid; nothing was changed."""


class RequestTooLargeError(InvalidRequestError):
    """The request could never run in this engine (it needs more KV pages than exist)."""


class CapacityError(JserveError):
    """The engine cannot take the request now (queue full); retrying later may succeed."""


class EngineDeadError(JserveError):
    """The engine's step loop failed and no longer serves requests."""
