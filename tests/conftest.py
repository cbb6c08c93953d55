"""Shared fixtures: tiny random-weight Hugging Face models written by transformers itself."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests.hf_models import TINY_ARCHS, make_tiny_hf_model


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One persistent compilation cache for the whole run, never the user's own: the
    CLI and LLM() turn it on by default, and subprocesses inherit the variable."""
    path = str(tmp_path_factory.mktemp("jax-cache"))
    os.environ["JSERVE_COMPILATION_CACHE_DIR"] = path
    return path


@pytest.fixture(scope="module", autouse=True)
def _release_programs() -> Iterator[None]:
    """Frees each test module's compiled programs when it ends. Every program holds
    machine code in memory mappings, and the whole suite in one process would
    otherwise run into the kernel's per-process limit (vm.max_map_count)."""
    yield
    import jax

    from jserve.engine import runner

    runner._COMPILED.clear()
    gc.collect()
    jax.clear_caches()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One saved model directory per architecture: {"llama": path, ...}."""
    root = tmp_path_factory.mktemp("hf")
    return {arch: make_tiny_hf_model(arch, str(root / arch)) for arch in TINY_ARCHS}


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dirs: dict[str, str]) -> str:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def tok_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama with a real tokenizer (eos id 0), for engine tests."""
    from tests.hf_models import make_tiny_model_with_tokenizer

    return make_tiny_model_with_tokenizer(str(tmp_path_factory.mktemp("tokmodel") / "m"))


@pytest.fixture(scope="module")
def tok_llm(tok_model_dir: str):
    """An LLM over tok_model_dir, one per test module, not warmed up: for tests of the
    Python API (short prompts; max_model_len 64 keeps its programs small)."""
    from jserve import LLM

    return LLM(
        model=tok_model_dir,
        dtype="float32",
        page_size=4,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=64,
        warmup=False,
    )
