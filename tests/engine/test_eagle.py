"""The EAGLE head (jserve.spec.eagle): its checkpoint layout, clear errors for heads the
target cannot use, and in the engine the features it is fed match its dense reference."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jserve.config import load_config
from jserve.errors import CheckpointError, ConfigError
from jserve.model_loader import default_model_path, load_model
from jserve.models import get_model
from jserve.spec import eagle
from tests.engine.helpers import greedy, make_engine, run


@pytest.fixture(scope="module")
def head_dir(llama_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    cfg, hp = eagle.random_head(load_config(llama_dir), seed=7)
    out = str(tmp_path_factory.mktemp("eagle") / "head")
    eagle.save_head(hp, cfg, out, "float32")
    return out


def _copy_head(src: str, dst: str, rename=lambda k: k, config=lambda c: c) -> str:
    os.makedirs(dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as fh:
        cfg = config(json.load(fh))
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    return dst


def test_the_layout_is_eagle_ones_and_loads_back(llama_dir: str, head_dir: str, tmp_path) -> None:
    names = set(load_file(os.path.join(head_dir, "model.safetensors")))
    assert {"fc.weight", "fc.bias", "layers.0.self_attn.q_proj.weight"} <= names
    assert "layers.0.mlp.down_proj.weight" in names
    assert not any("input_layernorm" in n or "embed" in n for n in names)
    target = load_model(llama_dir, "float32")
    a = eagle.load_head(head_dir, target)
    # The same tensors under EAGLE's "model." prefix, plus an embedding copy (not read).
    e = target.cfg.hidden_size
    prefixed = _copy_head(head_dir, str(tmp_path / "prefixed"), rename=lambda k: f"model.{k}")
    tensors = load_file(os.path.join(prefixed, "model.safetensors"))
    tensors["model.embed_tokens.weight"] = np.zeros((target.cfg.vocab_size, e), np.float32)
    save_file(tensors, os.path.join(prefixed, "model.safetensors"))
    b = eagle.load_head(prefixed, target)
    assert a.cfg.num_layers == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)
    assert a.params["fc"].shape == (2 * e, e)
    # A head whose fc has no bias (EAGLE-1's "bias": false).
    plain = _copy_head(head_dir, str(tmp_path / "plain"))
    tensors = load_file(os.path.join(plain, "model.safetensors"))
    del tensors["fc.bias"]
    save_file(tensors, os.path.join(plain, "model.safetensors"))
    assert "fc_bias" not in eagle.load_head(plain, target).params


def test_heads_the_target_cannot_use_are_refused(llama_dir: str, head_dir: str, tmp_path) -> None:
    def engine(path: str) -> None:
        spec = {"method": "eagle", "model": path}
        make_engine(llama_dir, speculative_config=spec)

    two = _copy_head(
        head_dir, str(tmp_path / "two"), config=lambda c: {**c, "num_hidden_layers": 2}
    )
    with pytest.raises(ConfigError, match="one decoder layer"):
        engine(two)
    vocab = _copy_head(head_dir, str(tmp_path / "v"), config=lambda c: {**c, "vocab_size": 7})
    with pytest.raises(ConfigError, match="vocab_size"):
        engine(vocab)
    wide = _copy_head(head_dir, str(tmp_path / "w"), config=lambda c: {**c, "hidden_size": 96})
    with pytest.raises(ConfigError, match="hidden_size"):
        engine(wide)
    other = _copy_head(head_dir, str(tmp_path / "o"), rename=lambda k: k.replace("fc.", "proj."))
    with pytest.raises(ConfigError, match=r"no fc\.weight"):
        engine(other)
    pickled = str(tmp_path / "pickled")
    shutil.copytree(head_dir, pickled)
    os.remove(os.path.join(pickled, "model.safetensors"))
    with pytest.raises(CheckpointError, match="safetensors"):
        engine(pickled)


def _dense_proposals(model: str, head: str, tokens: list[int]) -> np.ndarray:
    """The head's greedy proposal at every position of ``tokens`` from the target's
    true features (teacher-forced, no cache): what a one-token proposal must be."""
    target = load_model(model, "float32")
    loaded = eagle.load_head(head, target)
    cfg, params = target.cfg, target.params
    ids = jnp.asarray([tokens], jnp.int32)
    feat = eagle.target_features(params, cfg, ids)
    emb = get_model(cfg).embed(params, cfg, ids)
    g = eagle.forward_dense(loaded.params, loaded.cfg, emb, eagle.shifted(feat))[0]
    return np.asarray(jnp.argmax(get_model(cfg).compute_logits(params, cfg, g), axis=-1))


def test_one_token_proposals_equal_the_dense_reference() -> None:
    """With k = 1 and greedy decoding, every proposal comes from the head's pool filled by
    catch-ups and the feature kept at the last accepted position; under chunked prefill
    (the kept feature of a chunk's last token) the drafts and acceptances the engine counts
    are exactly those the head's dense forward over the final tokens implies."""
    model = default_model_path()
    spec = {"method": "eagle", "num_speculative_tokens": 1}
    kw = dict(max_num_batched_tokens=16, min_token_bucket=8, enable_prefix_caching=False)
    engine = make_engine(model, speculative_config=spec, **kw)
    prompt = engine.tokenizer.encode("ROMEO:\nWhat light through yonder window breaks?")
    n = 48
    out = run(engine, [("r", prompt, greedy(n), 0)])["r"]
    tokens = prompt + out.outputs[0].token_ids
    prop = _dense_proposals(model, eagle.DEFAULT_EAGLE, tokens)
    drafts = accepted = 0
    produced, t = 1, len(prompt)  # the prefill sampled the first token, at len(prompt)
    while produced < n:
        if n - produced - 1 >= 1:  # room for a proposal and its bonus token
            drafts += 1
            if prop[t] == tokens[t + 1]:
                accepted += 1
                produced, t = produced + 2, t + 2
                continue
        produced, t = produced + 1, t + 1
    s = engine.get_stats()
    assert (s.spec_decode_num_drafts, s.spec_decode_num_accepted_tokens) == (drafts, accepted)
    assert accepted > 5
