"""Writing Hugging Face directories: exact round trips and parity with transformers."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from checkpoints.source import named_leaves
from jserve.config import config_from_dict, config_to_dict, load_config
from jserve.model_export import save_hf_checkpoint
from jserve.model_loader import load_params
from jserve.models import get_model
from jserve.models.params import init_params
from tests.hf_models import TINY_ARCHS, hf_logits

PROMPT = [5, 17, 200, 3, 9, 41, 77, 128, 255, 0, 12, 13, 14, 99, 100, 101, 7]


def _random_params(cfg, seed: int = 0):
    """init_params, then noise on every leaf so norms and biases are not 1 and 0."""
    params = init_params(
        get_model(cfg).param_specs(cfg), jax.random.key(seed), jnp.float32, std=0.08
    )
    leaves = jax.tree_util.tree_leaves(params)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(leaves)))
    return jax.tree_util.tree_map(
        lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), params
    )


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_config_round_trips(arch: str, tiny_model_dirs: dict[str, str]) -> None:
    cfg = load_config(tiny_model_dirs[arch]).replace(eos_token_ids=(3, 4), bos_token_id=1)
    back = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))), name=cfg.name)
    assert back == cfg


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_save_then_load_is_identical(arch: str, tiny_model_dirs: dict[str, str], tmp_path) -> None:
    cfg = load_config(tiny_model_dirs[arch])
    params = _random_params(cfg)
    out = save_hf_checkpoint(params, cfg, tmp_path / "out")
    assert load_config(out).replace(name=cfg.name) == cfg
    got = dict(named_leaves(load_params(out, cfg, jnp.float32)))
    want = dict(named_leaves(params))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_export_inverts_the_loader(arch: str, tiny_model_dirs: dict[str, str], tmp_path) -> None:
    """A transformers-written checkpoint, loaded and saved again, has identical tensors."""
    src = tiny_model_dirs[arch]
    cfg = load_config(src)
    out = save_hf_checkpoint(load_params(src, cfg, jnp.float32), cfg, tmp_path / "out")
    want = load_file(os.path.join(src, "model.safetensors"))
    got = load_file(os.path.join(out, "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_transformers_loads_saved_dir(arch: str, tiny_model_dirs: dict[str, str], tmp_path) -> None:
    cfg = load_config(tiny_model_dirs[arch])
    params = _random_params(cfg, seed=3)
    out = str(save_hf_checkpoint(params, cfg, tmp_path / "out"))
    want = hf_logits(out, PROMPT)
    got = np.asarray(get_model(cfg).forward_dense(params, cfg, jnp.asarray([PROMPT], jnp.int32)))[0]
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()


def test_bfloat16_checkpoint(llama_dir: str, tmp_path) -> None:
    cfg = load_config(llama_dir).replace(eos_token_ids=(7,), bos_token_id=2)
    params = _random_params(cfg)
    out = save_hf_checkpoint(params, cfg, tmp_path / "bf16", dtype="bfloat16")
    with open(os.path.join(out, "config.json")) as f:
        raw = json.load(f)
    assert raw["dtype"] == raw["torch_dtype"] == "bfloat16"
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": 2, "eos_token_id": 7}
    assert {t.dtype.name for t in load_file(os.path.join(out, "model.safetensors")).values()} == {
        "bfloat16"
    }
    got = dict(named_leaves(load_params(out, load_config(out), jnp.bfloat16)))
    for k, x in named_leaves(params):
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(x.astype(jnp.bfloat16)))


def test_inexpressible_config_is_refused(llama_dir: str, tmp_path) -> None:
    cfg = load_config(llama_dir)
    cfg = cfg.replace(options=dataclasses.replace(cfg.options, o_bias=False))
    with pytest.raises(ValueError, match="attention_bias"):
        save_hf_checkpoint(_random_params(cfg), cfg, tmp_path / "x")


def test_replicated_kv_heads_load_and_export(tiny_model_dirs: dict[str, str], tmp_path) -> None:
    """With more tensor-parallel devices than KV heads, each head is held twice; exporting
    gives back the checkpoint's tensors, and the logits do not change."""
    from jserve.models.attention import AttentionMetadata

    src = tiny_model_dirs["qwen3"]  # 4 query heads, 2 KV heads
    cfg = load_config(src)
    wide = cfg.with_kv_heads_for(4)
    assert (wide.num_kv_heads, wide.kv_repeat, wide.source_kv_heads) == (4, 2, 2)
    params = load_params(src, wide, jnp.float32)
    wqkv = np.asarray(params["layers"][0]["wqkv"])  # [E, 4, 1 + 2, D]
    np.testing.assert_array_equal(wqkv[:, 0, 1:], wqkv[:, 1, 1:])  # head 0's K/V twice
    out = save_hf_checkpoint(params, wide, tmp_path / "out")
    want = load_file(os.path.join(src, "model.safetensors"))
    got = load_file(os.path.join(out, "model.safetensors"))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    def logits(c, p):
        n = len(PROMPT)
        md = AttentionMetadata(
            positions=jnp.arange(n, dtype=jnp.int32),
            slot_mapping=jnp.arange(n, dtype=jnp.int32),
            kv_lens=jnp.array([n], jnp.int32),
            page_indices=jnp.arange(8, dtype=jnp.int32)[None],
            cu_q_lens=jnp.array([0, n], jnp.int32),
            num_seqs=jnp.array([1], jnp.int32),
        )
        pages = [jnp.zeros((8, 4, 2 * c.num_kv_heads, c.head_dim))] * c.num_layers
        model = get_model(c)
        hidden, _, _ = model.forward(p, c, jnp.asarray(PROMPT, jnp.int32), pages, md)
        return np.asarray(model.compute_logits(p, c, hidden))

    narrow = logits(cfg, load_params(src, cfg, jnp.float32))
    np.testing.assert_allclose(logits(wide, params), narrow, atol=1e-5)
