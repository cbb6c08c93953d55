"""JAX's persistent compilation cache, so a second start-up loads compiled step programs.

Every step shape the runner compiles is written to a directory keyed by its
HLO, compile options, jax/jaxlib version and device kind; a later process
that builds the same programs reads them back instead of running XLA again.

The cache is a process-wide JAX setting. Enable it before the first compile
(the CLI and ``LLM`` do so before loading the model). Enabling it later still
takes effect, but only for programs compiled afterwards: what was already
compiled in this process stays in memory and is not written out. Moving to
another directory resets JAX's cache object so the next compile opens the new
one.

"Off" means jserve does not turn the cache on; it does not turn off a cache
that JAX was configured with on its own (``JAX_COMPILATION_CACHE_DIR``), nor
one enabled earlier in the same process. ``JAX_ENABLE_COMPILATION_CACHE=false``
(``jax_enable_compilation_cache``) wins over any directory given here.

The cache is trusted: whoever can write to the directory can run code in
processes that read it, so it is created private to the user.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

logger = logging.getLogger(__name__)

ENV_VAR = "JSERVE_COMPILATION_CACHE_DIR"


class _DefaultDir:
    """Marks "the default directory": ``$JSERVE_COMPILATION_CACHE_DIR`` if set (empty =
    off), else ``$XDG_CACHE_HOME/jserve/jax-cache``, else ``~/.cache/jserve/jax-cache``."""

    def __repr__(self) -> str:
        return "DEFAULT_CACHE_DIR"


DEFAULT_CACHE_DIR = _DefaultDir()

CacheDirArg = str | os.PathLike[str] | _DefaultDir | None

# jserve's step programs compile in well under JAX's default 1 s threshold on
# small models, and every one of them is on the start-up path, so cache them all.
# Options the user set through JAX's own environment variables are left alone.
_THRESHOLDS = {
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": -1,  # -1: no size limit, no override
}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/jserve/jax-cache``, else ``~/.cache/jserve/jax-cache``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "jserve" / "jax-cache"


def resolve_cache_dir(cache_dir: CacheDirArg = DEFAULT_CACHE_DIR) -> Path | None:
    """The directory ``cache_dir`` names, or None when caching is off (None or "")."""
    if isinstance(cache_dir, _DefaultDir):
        env = os.environ.get(ENV_VAR)
        if env is None:
            return default_cache_dir()
        cache_dir = env
    if cache_dir is None or os.fspath(cache_dir) == "":
        return None
    return Path(os.fspath(cache_dir)).expanduser().absolute()


def enable_compilation_cache(cache_dir: CacheDirArg = DEFAULT_CACHE_DIR) -> Path | None:
    """Points JAX's persistent compilation cache at ``cache_dir`` (see the module notes).

    Returns the directory in use, or None when caching is off or disabled by
    ``jax_enable_compilation_cache``. Calling it again with the same directory
    does nothing.
    """
    path = resolve_cache_dir(cache_dir)
    if path is None:
        return None
    if not jax.config.jax_enable_compilation_cache:
        logger.warning(
            "compilation cache at %s not used: jax_enable_compilation_cache is off "
            "(JAX_ENABLE_COMPILATION_CACHE); unset it to cache compiled programs",
            path,
        )
        return None
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, value in _THRESHOLDS.items():
        if name.upper() not in os.environ:
            jax.config.update(name, value)
    if jax.config.jax_compilation_cache_dir != str(path):
        jax.config.update("jax_compilation_cache_dir", str(path))
        # JAX opens its cache once, on the first compile that looks for it; without a
        # reset a process that already opened one (or, in some jax versions, already
        # compiled with no directory set) would keep using the old state.
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
    return path
