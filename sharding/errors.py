"""The base of jserve's error classes, at the bottom of the package layers.

The packages depend one way: ``jserve`` imports ``checkpoints`` and
``sharding``; ``checkpoints`` imports ``sharding`` only for these errors;
``sharding`` imports none of them. Errors the lower packages raise must still
be caught by ``except jserve.JserveError`` / ``except jserve.ConfigError``,
so the classes are defined here, where the lowest raiser lives, and
``jserve.errors`` re-exports them (the same class objects, not copies).
"""

from __future__ import annotations


class JserveError(Exception):
    """Base class of every error jserve raises on purpose."""


class ConfigError(JserveError, ValueError):
    """A model, parallel or engine configuration is invalid or unsupported."""
