"""One small engine per test module, on the tiny model with a real tokenizer."""

from __future__ import annotations

import pytest

from jserve.engine.async_engine import AsyncLLMEngine
from tests.engine.helpers import make_engine

# Small enough to step fast on 2 CPU cores; 8 sequences share 256 pages of 4 tokens.
ENGINE = dict(page_size=4, num_pages=256, max_num_seqs=8, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def aengine(tok_model_dir: str):
    eng = AsyncLLMEngine(make_engine(tok_model_dir, **ENGINE))
    yield eng
    eng.shutdown()
