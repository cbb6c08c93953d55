"""fp8 x fp8 matmuls: activations quantized per token (dynamic scales), the fp8 weight's
values as they are, float32 accumulation. Numerics on CPU (XLA runs the fp8 dot there by
upcasting), the model's logits, no compiles after warm-up, and the typed errors. The H100
lowering to cuBLASLt's fp8 GEMM is checked by tests/aot/test_fp8_matmul.py."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jserve.engine.config import EngineConfig
from jserve.engine.llm_engine import LLMEngine
from jserve.errors import ConfigError
from jserve.model_loader import default_model_path, load_model
from jserve.models import get_model
from jserve.models.quant import (
    QuantArray,
    QuantConfig,
    _explicit,
    fp8_einsum,
    qeinsum,
    quantize_activations,
    quantize_array,
    with_fp8_activations,
)
from jserve.sampling_params import SamplingParams
from tests.engine.helpers import run
from tests.engine.test_compile_guard import no_compiles

TOKENS = jnp.array([[1, 5, 7, 9, 100, 200, 30, 40], [3, 4, 5, 6, 7, 8, 9, 10]])
# (subscripts, x shape, w shape, w's contracted dims): the shapes llama.py multiplies.
CASES = [
    ("...e,ef->...f", (2, 5, 64), (64, 48), (0,)),
    ("...hd,hde->...e", (7, 4, 16), (4, 16, 32), (0, 1)),
    ("...e,ekgd->...kgd", (6, 64), (64, 2, 3, 8), (0,)),
    ("ne,ve->nv", (5, 32), (40, 32), (1,)),
]


def _operands(case, seed: int = 0):
    subscripts, xshape, wshape, contract = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xshape).astype(np.float32)
    x.reshape(-1, xshape[-1])[1] = 0.0  # an all-zero token: scale 1, output 0
    x.reshape(-1, xshape[-1])[2] *= 1e3  # a token far outside fp8's range before scaling
    wf = rng.standard_normal(wshape).astype(np.float32)
    values, scales = quantize_array(jnp.asarray(wf), contract, "fp8", 0, jnp)
    w = QuantArray(values, scales, None, 8, contract[-1], True)
    return subscripts, jnp.asarray(x), w, wf


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp8_einsum_matches_the_float_product_of_its_quantized_operands(case) -> None:
    subscripts, x, w, _ = _operands(case)
    got = qeinsum(subscripts, x, w)
    assert got.dtype == x.dtype
    # The same fp8 operands, dequantized and multiplied in float64.
    xs, _, out = _explicit(subscripts, x.ndim)
    xq, sx = quantize_activations(x, tuple(i for i, c in enumerate(xs) if c not in out))
    assert xq.dtype == jnp.float8_e4m3fn
    xd = np.asarray(xq, np.float64) * np.asarray(sx, np.float64)
    wd = np.asarray(w.values, np.float64) * np.asarray(w.scales, np.float64)
    ref = np.einsum(subscripts, xd, wd)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp8_einsum_stays_close_to_the_float_matmul(case) -> None:
    """e4m3 keeps 3 mantissa bits (relative rounding up to 1/16 per operand); over
    16..64-term dot products of random operands the error norm stays under 8% of the
    result's (measured 3-5%)."""
    subscripts, x, w, wf = _operands(case, seed=1)
    got = np.asarray(qeinsum(subscripts, x, w), np.float64)
    exact = np.einsum(subscripts, np.asarray(x, np.float64), wf.astype(np.float64))
    err = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert err < 0.08, err
    # Weight-only fp8 (the weight dequantized, x in float32) is closer: the activations'
    # rounding is the difference.
    wo = np.asarray(qeinsum(subscripts, x, QuantArray(w.values, w.scales)), np.float64)
    assert np.linalg.norm(wo - exact) / np.linalg.norm(exact) < err


def test_zero_token_gives_zeros_and_no_nans() -> None:
    _, x, w, _ = _operands(CASES[0])
    got = np.asarray(fp8_einsum("...e,ef->...f", x, w)).reshape(-1, 48)
    assert np.isfinite(got).all()
    assert (got[1] == 0).all()


def test_model_logits_close_to_weight_only_fp8() -> None:
    """The trained Shakespeare model: fp8 activations move the logits by under 5% of
    their largest magnitude from weight-only fp8 (measured ~2%)."""
    wo = load_model(default_model_path(), "float32", quantization="fp8", fp8_activations=False)
    act = load_model(default_model_path(), "float32", quantization="fp8", fp8_activations=True)
    assert act.cfg.quant.fp8_activations and not wo.cfg.quant.fp8_activations
    layer = act.params["layers"][0]
    assert layer["wqkv"].fp8_activations and layer["w_down"].fp8_activations
    ref = get_model(wo.cfg).forward_dense(wo.params, wo.cfg, TOKENS)
    got = get_model(act.cfg).forward_dense(act.params, act.cfg, TOKENS)
    err = float(jnp.abs(got - ref).max() / jnp.abs(ref).max())
    assert 0 < err < 0.05, err
    top = (jnp.argmax(got, -1) == jnp.argmax(ref, -1)).mean()
    assert float(top) >= 0.85, float(top)


def test_fp8_activation_engine_compiles_nothing_after_warmup(llama_dir: str) -> None:
    model = load_model(llama_dir, "float32", quantization="fp8", fp8_activations=True)
    ecfg = EngineConfig(page_size=4, max_num_seqs=2, max_num_batched_tokens=16, num_pages=32)
    engine = LLMEngine(model, ecfg, warmup=True, progress=False)
    reqs = [
        ("a", list(range(1, 20)), SamplingParams(max_tokens=4, temperature=0), 0),
        ("b", [5, 6], SamplingParams(max_tokens=5, temperature=0.8, top_p=0.9), 1),
    ]
    with no_compiles():
        out = run(engine, reqs)
    assert sorted(out) == ["a", "b"]


FP8 = QuantConfig("fp8")


def test_auto_turns_on_only_for_fp8_weights_on_a_gpu_with_fp8_units() -> None:
    assert with_fp8_activations(FP8, "auto", capability=(9, 0)).fp8_activations
    assert with_fp8_activations(FP8, "auto", capability=(8, 9)).fp8_activations
    assert not with_fp8_activations(FP8, "auto", capability=(8, 0)).fp8_activations
    assert not with_fp8_activations(FP8, "auto", capability=None).fp8_activations  # CPU/TPU
    assert not with_fp8_activations(FP8, "auto").fp8_activations  # detected: CPU here
    assert with_fp8_activations(QuantConfig("int8"), "auto", capability=(9, 0)).weights == "int8"
    assert with_fp8_activations(None, "auto", capability=(9, 0)) is None
    assert not with_fp8_activations(QuantConfig("fp8", 32), "auto", (9, 0)).fp8_activations
    assert with_fp8_activations(FP8, "true", capability=None).fp8_activations  # the CLI's
    assert with_fp8_activations(FP8, "false") == FP8


@pytest.mark.parametrize(
    ("q", "mode", "cap", "words"),
    [
        (None, True, None, "no quantization"),
        (QuantConfig("int8"), True, None, "int8 weights"),
        (QuantConfig("int4", 64), True, (9, 0), "int4 weights"),
        (QuantConfig("fp8", 32), True, None, "groups of 32"),
        (FP8, True, (8, 6), "compute capability 8.9"),
        (FP8, "yes", None, "True, False or 'auto'"),
        (FP8, 1, None, "True, False or 'auto'"),
    ],
)
def test_bad_fp8_activations_is_a_config_error(q, mode, cap, words: str) -> None:
    with pytest.raises(ConfigError, match="fp8_activations") as e:
        with_fp8_activations(q, mode, capability=cap)
    assert words in str(e.value)


def test_load_model_refuses_fp8_activations_without_fp8_weights(llama_dir: str) -> None:
    with pytest.raises(ConfigError, match=r"fp8_activations=True.*int8 weights"):
        load_model(llama_dir, "float32", quantization="int8", fp8_activations=True)
