"""Quantized weights: the QuantArray declarations, logits against a dequantized float
reference, memory, Orbax round trips, the engine, and typed errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve.errors import ConfigError
from jserve.model_loader import default_model_path, load_model
from jserve.models import get_model
from jserve.models.quant import (
    QuantArray,
    dequantize,
    dequantize_params,
    param_bytes,
    parse_quantization,
    quantize_array,
    scale_shape,
)

TOKENS = jnp.array([[1, 5, 7, 9, 100, 200, 30, 40], [3, 4, 5, 6, 7, 8, 9, 10]])


def dequantized(params):
    """The float tree a quantized one stands for (the reference the matmuls must match)."""
    return dequantize_params(params)


def float_logits(m, params=None):
    cfg = m.cfg.replace(quant=None)
    return get_model(cfg).forward_dense(params or m.params, cfg, TOKENS)


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4", "int4-g32"])
def test_logits_match_dequantized_reference(llama_dir: str, fmt: str) -> None:
    m = load_model(llama_dir, "float32", quantization=fmt)
    layer = m.params["layers"][0]
    assert isinstance(layer["wqkv"], QuantArray) and isinstance(m.params["embed"], QuantArray)
    assert not isinstance(layer["attn_norm"], QuantArray)  # norms and biases stay float
    want_dtype = jnp.float8_e4m3fn if fmt == "fp8" else jnp.int8
    assert layer["w_down"].values.dtype == want_dtype
    if fmt.startswith("int4"):  # packed two per byte along the inputs
        assert layer["w_down"].values.shape[0] * 2 == layer["w_down"].shape[0]
    got = get_model(m.cfg).forward_dense(m.params, m.cfg, TOKENS)
    ref = float_logits(m, dequantized(m.params))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("fmt", "tol"), [("int8", 0.01), ("fp8", 0.04), ("int4", 0.08)])
def test_trained_model_logits_stay_close(fmt: str, tol: float) -> None:
    exact = float_logits(load_model(default_model_path(), "float32"))
    m = load_model(default_model_path(), "float32", quantization=fmt)
    got = get_model(m.cfg).forward_dense(m.params, m.cfg, TOKENS)
    err = float(jnp.abs(got - exact).max() / jnp.abs(exact).max())
    assert err < tol, err


def test_quantize_array_round_trip_and_groups() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 6)).astype(np.float32)  # inputs (0, 1), outputs 6
    assert scale_shape(w.shape, (0, 1), 0) == (1, 1, 6)
    assert scale_shape(w.shape, (0, 1), 2) == (8, 2, 6)  # groups of 2 within a row of 4
    assert scale_shape(w.shape, (0, 1), 8) == (4, 1, 6)  # groups span two rows of 4
    for fmt, group, tol in [("int8", 0, 0.01), ("fp8", 0, 0.07), ("int4", 8, 0.15)]:
        v, s = quantize_array(w, (0, 1), fmt, group)
        bits = 4 if fmt == "int4" else 8
        back = np.asarray(dequantize(QuantArray(jnp.asarray(v), jnp.asarray(s), None, bits, 1)))
        assert back.shape == w.shape
        assert np.abs(back - w).max() / np.abs(w).max() < tol, fmt


def test_parameter_bytes_against_bfloat16() -> None:
    path = default_model_path()
    bf16 = param_bytes(load_model(path, "bfloat16").params)
    for fmt in ("int8", "fp8"):
        q = param_bytes(load_model(path, "bfloat16", quantization=fmt).params)
        assert q <= 0.55 * bf16, (fmt, q / bf16)
    m = load_model(path, "bfloat16", quantization="int4")
    values = sum(
        x.values.nbytes
        for x in jax.tree_util.tree_leaves(m.params, is_leaf=lambda x: isinstance(x, QuantArray))
        if isinstance(x, QuantArray)
    )
    floats = sum(
        x.nbytes
        for x in jax.tree_util.tree_leaves(m.params, is_leaf=lambda x: isinstance(x, QuantArray))
        if not isinstance(x, QuantArray)
    )
    assert values + floats <= 0.30 * bf16, (values + floats) / bf16  # plus the scales


def test_orbax_round_trip(llama_dir: str, tmp_path) -> None:
    from checkpoints.orbax_ckpt import load_orbax_params, save_orbax_checkpoint

    m = load_model(llama_dir, "float32", quantization="int4")
    out = str(tmp_path / "orbax")
    save_orbax_checkpoint(m.params, out, "float32")
    back = load_orbax_params(out, get_model(m.cfg).param_specs(m.cfg), jnp.float32)
    flat, tree = jax.tree_util.tree_flatten(m.params)
    flat_back, tree_back = jax.tree_util.tree_flatten(back)
    assert tree == tree_back
    for a, b in zip(flat, flat_back, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_hf_export_writes_dequantized_weights(llama_dir: str, tmp_path) -> None:
    from jserve.model_export import save_hf_checkpoint

    m = load_model(llama_dir, "float32", quantization="int8")
    out = save_hf_checkpoint(m.params, m.cfg, str(tmp_path / "hf"))
    back = load_model(out, "float32")
    np.testing.assert_allclose(
        np.asarray(float_logits(back)),
        np.asarray(get_model(m.cfg).forward_dense(m.params, m.cfg, TOKENS)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_engine_generates_and_reports_the_format(tok_model_dir: str, tmp_path) -> None:
    from jserve import LLM, SamplingParams
    from jserve.model_export import save_hf_checkpoint

    kw = dict(dtype="float32", page_size=4, max_num_seqs=4, max_num_batched_tokens=32)
    llm = LLM(model=tok_model_dir, max_model_len=64, warmup=False, quantization="int8", **kw)
    assert "int8 weights (per channel)" in llm.engine.describe()
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[5, 17, 200, 3, 9], [42, 7]]
    got = [r.outputs[0].token_ids for r in llm.generate(prompts, sp, use_tqdm=False)]
    # The same weights dequantized into a float checkpoint decode the same tokens.
    ref_dir = save_hf_checkpoint(
        dequantized(llm.model.params), llm.cfg.replace(quant=None), str(tmp_path / "deq")
    )
    ref = LLM(model=ref_dir, max_model_len=64, warmup=False, **kw)
    assert got == [r.outputs[0].token_ids for r in ref.generate(prompts, sp, use_tqdm=False)]


def test_random_weights_quantize(tmp_path) -> None:
    from jserve.model_loader import random_model

    m = random_model(default_model_path(), "float32", quantization="fp8")
    assert m.params["layers"][0]["wo"].values.dtype == jnp.float8_e4m3fn
    assert m.params["layers"][0]["wo"].scales.shape == (1, 1, m.cfg.hidden_size)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("int3", "not a weight format"),
        ("int4-gx", "not a weight format"),
        ("int4-g0", "positive group size"),
        ("int4-g48", "group size 48"),
    ],
)
def test_bad_quantization_is_a_config_error(llama_dir: str, name: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_model(llama_dir, "float32", quantization=name)


def test_parse_quantization() -> None:
    assert parse_quantization(None) is None
    q = parse_quantization("int4-g32")
    assert (q.weights, q.group_size, q.bits) == ("int4", 32, 4)
    assert parse_quantization("int8").group_size == 0
    with pytest.raises(ConfigError, match="quantization"):
        parse_quantization(8)  # type: ignore[arg-type]


def test_moe_quantizes_attention_and_keeps_experts_float(tmp_path) -> None:
    from tests.models.moe_models import make_tiny_moe

    d = make_tiny_moe("qwen2_moe", str(tmp_path / "moe"))
    m = load_model(d, "float32", quantization="int8")
    layer = m.params["layers"][0]
    assert isinstance(layer["wqkv"], QuantArray) and isinstance(layer["wo"], QuantArray)
    assert not any(isinstance(layer[k], QuantArray) for k in ("router", "experts_gate_up"))
    got = get_model(m.cfg).forward_dense(m.params, m.cfg, TOKENS)
    ref = float_logits(m, dequantized(m.params))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
