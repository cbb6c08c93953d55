"""The persistent compilation cache: where it lives, when it takes effect, and that a
second start-up of the engine reads its step programs back instead of compiling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from jserve.compile_cache import (
    DEFAULT_CACHE_DIR,
    ENV_VAR,
    enable_compilation_cache,
    resolve_cache_dir,
)

ROOT = str(Path(__file__).resolve().parents[1])

# Counts JAX's cache events, then runs whatever the script appends.
PRELUDE = """
import collections, json, sys
import jax
counts = collections.Counter()
jax.monitoring.register_event_listener(
    lambda event, **kw: counts.update([event.rsplit("/", 1)[-1]])
    if event.startswith("/jax/compilation_cache/") else None
)
"""


def _run(script: str, timeout: float = 60) -> dict[str, int]:
    """Runs ``script`` after PRELUDE in a fresh process; returns its last line as JSON."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_default_dir_follows_env_var_then_xdg_then_home(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_cache_dir() == tmp_path / "home/.cache/jserve/jax-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir(DEFAULT_CACHE_DIR) == tmp_path / "xdg/jserve/jax-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # the XDG spec says to ignore it
    assert resolve_cache_dir() == tmp_path / "home/.cache/jserve/jax-cache"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    monkeypatch.setenv(ENV_VAR, "")
    assert resolve_cache_dir() is None


def test_explicit_dir_wins_and_none_or_empty_is_off(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert resolve_cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_cache_dir("~/y") == tmp_path / "y"
    assert resolve_cache_dir(None) is None
    assert resolve_cache_dir("") is None


def test_off_leaves_jax_alone() -> None:
    before = jax.config.jax_compilation_cache_dir
    assert enable_compilation_cache("") is None
    assert enable_compilation_cache(None) is None
    assert jax.config.jax_compilation_cache_dir == before


def test_late_enable_and_a_second_dir_take_effect_for_later_compiles(tmp_path) -> None:
    """Enabling after JAX compiled still caches what compiles next, and moving to another
    directory sends later programs there, not to the first one."""
    a, b = tmp_path / "a", tmp_path / "b"
    out = _run(f"""
        import jax.numpy as jnp
        from jserve.compile_cache import enable_compilation_cache
        jax.jit(lambda x: x - 1)(jnp.ones(3)).block_until_ready()  # before any cache
        assert enable_compilation_cache({str(a)!r}) is not None
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
        jax.jit(lambda x: x + 1)(jnp.ones(5)).block_until_ready()
        after_a = counts["cache_misses"]
        enable_compilation_cache({str(b)!r})
        enable_compilation_cache({str(b)!r})  # again: no change
        jax.jit(lambda x: x * 2)(jnp.ones(7)).block_until_ready()
        print(json.dumps({{"a": after_a, "b": counts["cache_misses"] - after_a}}))
    """)
    assert out["a"] >= 1 and out["b"] >= 1
    names_a = {p.name.split("-")[0] for p in a.iterdir()}
    names_b = {p.name.split("-")[0] for p in b.iterdir()}
    assert "jit__lambda" in names_a and "jit__lambda" in names_b
    assert len(list(a.iterdir())) == out["a"] and len(list(b.iterdir())) == out["b"]


def test_llm_enables_the_dir_it_is_given(tok_model_dir: str, tmp_path) -> None:
    from jserve.llm import LLM

    before = os.environ[ENV_VAR]  # the run's own cache, from tests/conftest.py
    try:
        LLM(tok_model_dir, "float32", num_pages=8, max_num_seqs=2, warmup=False,
            max_num_batched_tokens=32, compilation_cache_dir=tmp_path / "llm")  # fmt: skip
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "llm")
    finally:
        enable_compilation_cache(before)
    assert jax.config.jax_compilation_cache_dir == before


@pytest.mark.timeout(120)
def test_second_start_reads_every_program_from_the_cache(tok_model_dir: str, tmp_path) -> None:
    """`jserve generate --warmup` twice in fresh processes: the first compiles and writes
    every program, the second compiles nothing and gets the same text."""
    cache = tmp_path / "cache"
    script = f"""
        import contextlib, io
        from jserve.cli.main import main
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            rc = main(["generate", "--model", {tok_model_dir!r}, "--dtype", "float32",
                       "--max-tokens", "4", "--temperature", "0", "--warmup",
                       "--max-num-seqs", "2", "--max-num-batched-tokens", "32",
                       "--num-pages", "16", "--compilation-cache-dir", {str(cache)!r}])
        print(json.dumps({{"rc": rc, "text": text.getvalue(), **counts}}))
    """
    first = _run(script)
    assert first["rc"] == 0 and first.get("cache_hits", 0) == 0
    assert first["cache_misses"] >= 5  # step shapes, samplers, page copies
    assert len(list(cache.iterdir())) >= first["cache_misses"]
    second = _run(script)
    assert second["rc"] == 0 and second["text"] == first["text"]
    assert second.get("cache_misses", 0) == 0
    assert second["cache_hits"] >= first["cache_misses"]
