"""The Shakespeare models shipped in jserve/assets: config, tokenizer, parity with transformers."""

from __future__ import annotations

import filecmp
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jserve import LLM, SamplingParams
from jserve.config import load_config
from jserve.llm import default_model_path
from jserve.model_loader import load_params
from jserve.models import get_model
from jserve.tokenizer import Tokenizer
from tests.hf_models import hf_greedy

TARGET = default_model_path()
DRAFT = os.path.join(os.path.dirname(TARGET), "shakespeare-llama-draft")
MODELS = {"target": TARGET, "draft": DRAFT}
EOS = "<|endoftext|>"

# From the held-out end of Tiny Shakespeare (The Taming of the Shrew), plus
# spacing and characters the corpus lacks, to check exact round trips.
EXCERPT = (
    "BAPTISTA:\nNot in my house, Lucentio; for, you know,\n"
    "Pitchers have ears, and I have many servants:\n\n"
    "PETRUCHIO:\nNow, by my mother's son, and that's myself,\n"
    "It shall be moon, or star, or what I list,\nOr ere I journey to your father's house.\n"
    "   three spaces,\ttab,  two;\n\n\n\nfour newlines; café — “quoted” ✓ 🙂 日本\n"
)


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_dir(request) -> str:
    return MODELS[request.param]


def _hf_model(path: str):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def test_shipped_config(model_dir: str) -> None:
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["model_type"] == "llama"
    assert raw["torch_dtype"] == raw["dtype"] == "bfloat16"
    cfg = load_config(model_dir)
    tok = Tokenizer.from_dir(model_dir)
    eos = tok.token_to_id(EOS)
    assert cfg.vocab_size == tok.vocab_size == 2048
    assert cfg.eos_token_ids == tok.eos_token_ids == (eos,)
    assert eos in tok.special_token_ids
    assert cfg.max_position_embeddings == 2048
    assert cfg.num_kv_heads < cfg.num_q_heads  # GQA
    size = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir))
    assert size < 10e6
    with open(os.path.join(model_dir, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == eos


def test_target_and_draft_share_the_tokenizer() -> None:
    assert filecmp.cmp(
        os.path.join(TARGET, "tokenizer.json"), os.path.join(DRAFT, "tokenizer.json"), False
    )
    target, draft = load_config(TARGET), load_config(DRAFT)
    assert draft.vocab_size == target.vocab_size
    assert draft.eos_token_ids == target.eos_token_ids
    assert draft.num_params() * 4 < target.num_params()


def test_tokenizer_round_trips_exactly(model_dir: str) -> None:
    from transformers import AutoTokenizer

    tok = Tokenizer.from_dir(model_dir)
    ids = tok.encode(EXCERPT)
    assert tok.decode(ids) == EXCERPT
    stream = tok.stream()
    assert "".join(stream.step(t) for t in ids) == EXCERPT
    hf = AutoTokenizer.from_pretrained(model_dir)
    assert hf(EXCERPT)["input_ids"] == ids
    assert hf.decode(ids) == EXCERPT
    assert hf.eos_token == EOS


def test_logits_match_transformers(model_dir: str) -> None:
    """bf16 stored weights, both loaded in float32."""
    import torch

    ids = Tokenizer.from_dir(model_dir).encode(EXCERPT)
    cfg = load_config(model_dir)
    params = load_params(model_dir, cfg, jnp.float32)
    ours = np.asarray(get_model(cfg).forward_dense(params, cfg, jnp.asarray([ids], jnp.int32)))[0]
    with torch.no_grad():
        want = _hf_model(model_dir)(torch.tensor([ids])).logits[0].numpy()
    assert ours.shape == want.shape
    assert np.abs(ours - want).max() < 1e-4, np.abs(ours - want).max()


def test_default_llm_is_the_shipped_model() -> None:
    llm = LLM(dtype="float32", warmup=False)
    assert os.path.samefile(llm.model.path, TARGET)
    out = llm.generate("ROMEO:", SamplingParams(max_tokens=24, temperature=0.0))[0]
    prompt = out.prompt_token_ids
    assert out.outputs[0].token_ids == hf_greedy(TARGET, prompt, 24)
    assert out.outputs[0].text.strip()
