"""The error checkpoint loading raises; ``jserve.errors`` re-exports it.

Defined here rather than in ``jserve`` so that ``checkpoints`` never imports
``jserve``; it derives from the shared base in ``sharding.errors``.
"""

from __future__ import annotations

from sharding.errors import JserveError


class CheckpointError(JserveError, ValueError):
    """A checkpoint is missing files or tensors, or they do not fit the config."""
