"""Numerical parity with Hugging Face transformers on tiny random models."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jserve import LLM, SamplingParams
from jserve.config import load_config
from jserve.model_loader import load_params
from jserve.models import get_model
from jserve.models.attention import AttentionMetadata
from tests.hf_models import TINY_ARCHS, hf_greedy, hf_logits

PROMPTS = [
    [5, 17, 200, 3, 9, 41, 77, 128, 255, 0, 12, 13, 14, 99, 100, 101, 7, 8, 9, 10, 11],
    [42],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
]


def jserve_prefill_logits(model_dir: str, prompts: list[list[int]]) -> list[np.ndarray]:
    """Runs all prompts as one flat ragged batch through the paged forward."""
    cfg = load_config(model_dir)
    model = get_model(cfg)
    params = load_params(model_dir, cfg, jnp.float32)
    page_size, pps = 4, 8
    # Non-contiguous pages: sequence i owns pages i, i+3, i+6, ...
    page_indices = np.array([[i + 3 * j for j in range(pps)] for i in range(len(prompts))])
    ids, pos, slots = [], [], []
    for i, p in enumerate(prompts):
        for t, tok in enumerate(p):
            ids.append(tok)
            pos.append(t)
            slots.append(page_indices[i, t // page_size] * page_size + t % page_size)
    pad = 3
    cu = np.concatenate([[0], np.cumsum([len(p) for p in prompts])])
    md = AttentionMetadata(
        positions=jnp.asarray(pos + [0] * pad, jnp.int32),
        slot_mapping=jnp.asarray(slots + [-1] * pad, jnp.int32),
        kv_lens=jnp.asarray([len(p) for p in prompts], jnp.int32),
        page_indices=jnp.asarray(page_indices, jnp.int32),
        cu_q_lens=jnp.asarray(cu, jnp.int32),
        num_seqs=jnp.asarray([len(prompts)], jnp.int32),
    )
    pages = [
        jnp.full((3 * pps, page_size, 2 * cfg.num_kv_heads, cfg.head_dim), jnp.nan, jnp.float32)
        for _ in range(cfg.num_layers)
    ]
    hidden, _, _ = model.forward(params, cfg, jnp.asarray(ids + [0] * pad, jnp.int32), pages, md)
    logits = np.asarray(model.compute_logits(params, cfg, hidden))
    return [logits[cu[i] : cu[i + 1]] for i in range(len(prompts))]


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_prefill_logits_match_transformers(arch: str, tiny_model_dirs: dict[str, str]) -> None:
    model_dir = tiny_model_dirs[arch]
    ours = jserve_prefill_logits(model_dir, PROMPTS)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        want = hf_logits(model_dir, prompt)
        assert got.shape == want.shape
        assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_greedy_tokens_match_transformers(arch: str, tiny_model_dirs: dict[str, str]) -> None:
    model_dir = tiny_model_dirs[arch]
    llm = LLM(
        model=model_dir,
        dtype="float32",
        page_size=4,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        warmup=False,  # tokens are what is checked; the shapes used compile on first use
    )
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(model_dir, prompt, 32)
        assert out.outputs[0].finish_reason == "length"
