"""Mixture-of-experts models against transformers: logits, greedy tokens through the
engine, expert counts, export round trips, and the grouped expert matmul itself."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jserve import LLM, SamplingParams
from jserve.config import MoeOptions, config_from_dict, config_to_dict, load_config
from jserve.errors import ConfigError
from jserve.model_export import save_hf_checkpoint
from jserve.model_loader import load_params, placement
from jserve.models import moe
from jserve.models.presets import preset_config
from sharding import ParallelConfig
from tests.engine.test_compile_guard import no_compiles
from tests.hf_models import hf_greedy, hf_logits
from tests.models.moe_models import TINY_MOE, make_tiny_moe
from tests.models.test_parity import PROMPTS, jserve_prefill_logits


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("moe")
    return {name: make_tiny_moe(name, str(root / name)) for name in TINY_MOE}


@pytest.mark.parametrize("name", sorted(TINY_MOE))
def test_prefill_logits_match_transformers(name: str, moe_dirs: dict[str, str]) -> None:
    # A ragged batch of 3 prompts plus 3 padding tokens; the 64-expert model has
    # more experts than the batch has tokens.
    ours = jserve_prefill_logits(moe_dirs[name], PROMPTS)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        want = hf_logits(moe_dirs[name], prompt)
        assert got.shape == want.shape
        assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()


def test_config_fields(moe_dirs: dict[str, str]) -> None:
    mix = load_config(moe_dirs["mixtral-top1"]).options
    assert isinstance(mix, MoeOptions)
    assert (mix.num_experts, mix.top_k, mix.norm_topk_prob, mix.moe_intermediate_size) == (
        4,
        1,
        True,
        32,
    )
    q2 = load_config(moe_dirs["qwen2_moe"]).options
    assert q2.moe_layers == (True, False, True) and q2.shared_expert_size == 96
    assert q2.qkv_bias and not q2.norm_topk_prob
    q3 = load_config(moe_dirs["qwen3_moe-top8"]).options
    assert (q3.num_experts, q3.top_k, q3.norm_topk_prob, q3.qk_norm) == (16, 8, True, True)


# Greedy tokens through the engine, one engine per family. The Qwen3-MoE engine is
# warmed up and must then compile nothing; its decode steps have 1-3 tokens for 64
# experts.
ENGINE_CASES = [("mixtral", False), ("qwen2_moe", False), ("qwen3_moe-64", True)]


@pytest.mark.parametrize(("name", "warm"), ENGINE_CASES)
def test_greedy_tokens_match_transformers(name: str, warm: bool, moe_dirs: dict) -> None:
    model_dir = moe_dirs[name]
    llm = LLM(
        model=model_dir,
        dtype="float32",
        page_size=4,
        max_num_seqs=4,
        max_num_batched_tokens=16,
        max_model_len=64,
        warmup=warm,
    )
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    if warm:
        with no_compiles():
            outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    else:
        outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(model_dir, prompt, 12)
    # Every real token went to exactly top_k experts in every expert layer; the
    # bucket padding (slot -1) was counted nowhere.
    stats = llm.engine.get_stats()
    o = llm.cfg.options
    assert stats.expert_tokens.shape == (sum(o.moe_layers), o.num_experts)
    np.testing.assert_array_equal(stats.expert_tokens.sum(axis=1), stats.scheduled_tokens * o.top_k)
    assert stats.expert_load_imbalance() >= 1.0
    assert f"top-{o.top_k}" in llm.engine.describe()


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe-top8"])
def test_export_round_trip(name: str, moe_dirs: dict[str, str], tmp_path) -> None:
    src = moe_dirs[name]
    cfg = load_config(src)
    params = load_params(src, cfg, jnp.float32)
    out = save_hf_checkpoint(params, cfg, str(tmp_path / "out"))
    want, got = load_file(f"{src}/model.safetensors"), load_file(f"{out}/model.safetensors")
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    back = load_config(out)
    assert back.options == cfg.options and back.family == cfg.family
    # transformers reads the exported directory as the same model.
    np.testing.assert_allclose(hf_logits(out, PROMPTS[2]), hf_logits(src, PROMPTS[2]), atol=1e-6)


def _reference_experts(h, top_w, top_i, valid, w_gu, w_down):
    """Token by token, expert by expert: the definition the grouped version must meet."""
    out = np.zeros_like(h)
    for t in range(h.shape[0]):
        if not valid[t]:
            continue
        for w, x in zip(top_w[t], top_i[t], strict=True):
            g, u = np.einsum("e,ecf->cf", h[t], w_gu[x])
            out[t] += w * ((g / (1 + np.exp(-g)) * u) @ w_down[x])
    return out


@pytest.mark.parametrize(("num_experts", "held"), [(64, 64), (8, 2)])
def test_grouped_experts_match_the_definition(num_experts: int, held: int) -> None:
    # 5 tokens (the last 2 padding), top-2; 64 experts outnumber the tokens; with 8
    # experts, a device holding experts 4-5 computes only their share.
    rng = np.random.default_rng(0)
    t, e, f, k = 5, 8, 6, 2
    h = rng.normal(size=(t, e)).astype(np.float32)
    w_gu = rng.normal(size=(num_experts, e, 2, f)).astype(np.float32)
    w_down = rng.normal(size=(num_experts, f, e)).astype(np.float32)
    top_i = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(t)]).astype(np.int32)
    top_i[:3, 0] = [4, 5, 4]  # some pairs on the held experts in either case
    top_w = rng.uniform(size=(t, k)).astype(np.float32)
    valid = np.array([True, True, True, False, False])
    first = 4 if held < num_experts else 0
    got = moe.grouped_experts(
        jnp.asarray(h),
        jnp.asarray(top_w),
        jnp.asarray(top_i),
        jnp.asarray(valid),
        jnp.asarray(w_gu[first : first + held]),
        jnp.asarray(w_down[first : first + held]),
        first,
    )
    mine = (top_i >= first) & (top_i < first + held)
    want = _reference_experts(h, top_w * mine, top_i, valid, w_gu, w_down)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    counts = moe.expert_counts(jnp.asarray(top_i), jnp.asarray(valid), num_experts)
    np.testing.assert_array_equal(
        np.asarray(counts), np.bincount(top_i[valid].ravel(), minlength=num_experts)
    )


def test_no_dense_token_by_expert_intermediate() -> None:
    # The MoE block of a step of 16 tokens (top-2: 32 pairs) over 64 experts holds no
    # array with both a token axis and an expert axis beyond the router's [T, X]; the
    # experts run as grouped matmuls. (JAX lowers ragged_dot to chlo.ragged_dot on GPU
    # and TPU; only its CPU fallback expands it into a masked dense product.)
    cfg = config_from_dict(
        dict(
            architectures=["Qwen3MoeForCausalLM"], vocab_size=32, hidden_size=8,
            intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, num_experts=64, num_experts_per_tok=2,
            moe_intermediate_size=16,
        )
    )  # fmt: skip
    lp = jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, jnp.float32), moe.param_specs(cfg)["layers"][0],
        is_leaf=lambda s: hasattr(s, "source"),
    )  # fmt: skip
    x, valid = jnp.zeros((16, 8)), jnp.ones(16, bool)
    jaxpr = jax.make_jaxpr(lambda lp, x: moe.moe_block(lp, cfg, x, valid, None))(lp, x)
    shapes = [v.aval.shape for e in jaxpr.eqns for v in e.outvars]
    assert [e.primitive.name for e in jaxpr.eqns].count("ragged_dot_general") == 2
    assert not [s for s in shapes if len(s) >= 3 and s[0] in (16, 32) and 64 in s[1:]]
    assert not [s for s in shapes if len(s) >= 3 and s[0] == 64 and s[1] in (16, 32)]


def test_expert_parallel_errors(moe_dirs: dict[str, str]) -> None:
    dense = preset_config("llama3-1b")
    with pytest.raises(ConfigError, match="needs a mixture-of-experts model"):
        moe.with_expert_parallel(dense, True, 2)
    cfg = load_config(moe_dirs["mixtral"])  # 4 experts
    with pytest.raises(ConfigError, match="does not divide them"):
        moe.with_expert_parallel(cfg, True, 8)
    assert moe.with_expert_parallel(cfg, True, 2).options.expert_parallel
    # Under pipeline parallelism 2, layer 1 (dense) and layer 3 (experts) share slot 1.
    q2 = load_config(moe_dirs["qwen2_moe"])
    q2 = q2.replace(
        num_layers=4,
        sliding_windows=(None,) * 4,
        options=dataclasses.replace(q2.options, moe_layers=(True, False, True, True)),
    )
    with pytest.raises(ConfigError, match="layer slot 1"):
        moe.check_pipeline(q2, 2)
    # The flag reaches the model config through the parallel layout.
    placed, _, _ = placement(cfg, ParallelConfig(enable_expert_parallel=True))
    assert placed.options.expert_parallel
    assert not placement(cfg, ParallelConfig())[0].options.expert_parallel


def test_config_refusals() -> None:
    base = dict(
        architectures=["Qwen2MoeForCausalLM"], vocab_size=32, hidden_size=8,
        intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=8,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="no expert layers"):
        config_from_dict({**base, "mlp_only_layers": [0, 1]})
    with pytest.raises(ConfigError, match="exceeds the 4 experts"):
        config_from_dict({**base, "num_experts_per_tok": 5})
    with pytest.raises(ConfigError, match="num_experts must be"):
        config_from_dict({**base, "num_experts": 0})
    # decoder_sparse_step 2: layers 1, 3, ... are the expert layers.
    cfg = config_from_dict({**base, "decoder_sparse_step": 2})
    assert cfg.options.moe_layers == (False, True)
    assert config_to_dict(cfg)["mlp_only_layers"] == [0]


def test_bench_throughput_reports_tokens_per_expert(moe_dirs: dict[str, str], tmp_path) -> None:
    from jserve.cli.main import main

    out = tmp_path / "t.json"
    args = ["bench", "throughput", "--random-weights", "--config", moe_dirs["mixtral"]]
    args += ["--num-prompts", "3", "--random-input-len", "6", "--random-output-len", "3"]
    args += ["--max-num-seqs", "4", "--max-num-batched-tokens", "16", "--disable-tqdm"]
    assert main([*args, "--no-warmup", "--result-filename", str(out)]) == 0
    r = json.loads(out.read_text())
    assert len(r["expert_tokens"]) == 4 and sum(r["expert_tokens"]) > 0
    assert r["expert_load_imbalance"] >= 1.0


def test_prometheus_exports_tokens_per_expert() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from jserve.engine.stats import EngineStats
    from jserve.server.metrics import EngineCollector

    stats = EngineStats(num_pages=4)
    stats.record_experts(np.array([[3, 1], [2, 2]], np.int32))
    stats.record_experts(np.array([[1, 1], [0, 2]], np.int32))

    class Engine:
        dead = False

        def get_stats(self) -> EngineStats:
            return stats

    registry = CollectorRegistry()
    registry.register(EngineCollector(Engine()))
    text = generate_latest(registry).decode()
    assert 'jserve_expert_tokens_total{expert="0"} 6.0' in text
    assert 'jserve_expert_tokens_total{expert="1"} 6.0' in text
    # Layer 0 has [4, 2]: the busiest expert took 4 / mean 3.
    assert "jserve_expert_load_imbalance 1.3333" in text
