"""get_model: the registry of model families and the shared decoder layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve import ConfigError
from jserve.config import load_config
from jserve.model_loader import load_params
from jserve.models import MODELS, get_model, llama


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_llama_family_maps_to_the_llama_implementation(family: str, llama_dir: str) -> None:
    cfg = load_config(llama_dir).replace(family=family)
    assert get_model(cfg) is llama
    assert set(MODELS) >= {"llama", "mistral", "qwen2", "qwen3"}


def test_unknown_family_is_a_config_error(llama_dir: str) -> None:
    cfg = load_config(llama_dir).replace(family="gpt-neox")
    with pytest.raises(ConfigError, match="gpt-neox"):
        get_model(cfg)


def test_interface_functions_exist() -> None:
    for name in (
        "param_specs",
        "embed",
        "decoder_layer",
        "final_norm",
        "compute_logits",
        "paged_attend",
        "dense_attend",
        "forward",
        "forward_dense",
    ):
        assert callable(getattr(llama, name)), name


def test_decoder_layer_with_a_custom_attend(llama_dir: str) -> None:
    """forward_dense is the blocks with dense attention: rebuilding it from the interface,
    with an attend that counts its calls through the state, gives the same logits."""
    cfg = load_config(llama_dir)
    model = get_model(cfg)
    params = load_params(llama_dir, cfg, jnp.float32)
    tokens = jnp.asarray([[5, 17, 200, 3, 9, 41]], jnp.int32)
    positions = jnp.arange(tokens.shape[1])[None]
    x = model.embed(params, cfg, tokens)
    calls = 0
    for i, lp in enumerate(params["layers"]):
        dense = model.dense_attend(cfg, cfg.sliding_windows[i])

        def attend(q, k, v, n, dense=dense):
            out, _ = dense(q, k, v, None)
            return out, n + 1

        x, calls = model.decoder_layer(lp, cfg, x, positions, attend, calls)
    logits = model.compute_logits(params, cfg, model.final_norm(params, cfg, x)[0])
    want = model.forward_dense(params, cfg, tokens)[0]
    assert calls == cfg.num_layers
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(want))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        jax.tree_util.tree_map(lambda s: 0, model.param_specs(cfg))
    )
