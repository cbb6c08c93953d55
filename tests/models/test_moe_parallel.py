"""Mixture-of-experts models on 8 virtual CPU devices: expert parallelism 2, 4 and 8
(attention split over the same devices), experts split by hidden units under tensor
parallelism, and expert parallelism with pipeline stages, all giving the tokens of
one device; the compiled step's collectives counted in its HLO."""

from __future__ import annotations

import textwrap

import pytest

from tests.sharding.probe import run_probe

pytestmark = pytest.mark.timeout(900)

# One fresh interpreter runs every layout (the virtual device count is fixed when
# JAX starts). A layout is "TP:PP:EP" (EP 1 = experts split by hidden units).
PROBE = textwrap.dedent(
    """
    import json, os, re, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from jserve import LLM, SamplingParams

    def count(op, hlo):
        return len(re.findall(r"= [^ ]+ " + op + r"(?:-start)?\\(", hlo))

    prompts = [[5, 17, 200, 3, 9, 41, 77], [42]]
    out = {}
    for layout in sys.argv[2].split(","):
        tp, pp, ep = (int(v) for v in layout.split(":"))
        llm = LLM(model=sys.argv[1], dtype="float32", page_size=4, max_num_seqs=2,
                  max_num_batched_tokens=16, min_token_bucket=16, max_model_len=32,
                  tensor_parallel_size=tp,
                  pipeline_parallel_size=pp, enable_expert_parallel=bool(ep), warmup=False)
        res = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0,
                           ignore_eos=True), use_tqdm=False)
        r = {"tokens": [x.outputs[0].token_ids for x in res],
             "describe": llm.engine.describe(),
             "spec": list(getattr(llm.model.params["layers" if pp == 1 else "stages"][0]
                                  ["experts_gate_up"].sharding, "spec", ()))}
        if pp == 1:
            text = llm.engine.runner.lower(("step", 16, 2)).compile().as_text()
            r.update({op: count(op, text) for op in
                      ("all-reduce", "all-to-all", "reduce-scatter", "collective-permute")})
            r["gathered"] = re.findall(r"= (\\S+) all-gather(?:-start)?\\(", text)
            s = llm.engine.get_stats()
            r["counts_ok"] = bool((s.expert_tokens.sum(1) == 4 * s.scheduled_tokens).all())
        out[layout] = r
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def ep_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.models.moe_models import make_tiny_moe

    # Qwen2-MoE: 8 experts (top-4) and a shared expert in layers 0 and 2, dense MLPs in
    # layers 1 and 3 (so pipeline stage slots line up); 8 query and 4 KV heads.
    return make_tiny_moe(
        "qwen2_moe",
        str(tmp_path_factory.mktemp("ep") / "m"),
        num_hidden_layers=4,
        mlp_only_layers=[1, 3],
        num_attention_heads=8,
        num_key_value_heads=4,
    )


def _probe(model_dir: str, layouts: list[str]) -> dict:
    return run_probe(PROBE, model_dir, ",".join(layouts), timeout=850)


def _check_split(r: dict, layout: str) -> None:
    # Per layer one all-reduce after attention and one after the MLP or the
    # experts (4 layers), plus one for the vocabulary-split embedding; no token
    # exchange beyond that, no weight gathered: only the 2 sampled rows' logits.
    assert r["all-reduce"] == 2 * 4 + 1, (layout, r)
    assert r["all-to-all"] == r["reduce-scatter"] == r["collective-permute"] == 0, r
    assert [g.split("{")[0] for g in r["gathered"]] == ["f32[2,256]"], r
    assert r["counts_ok"], layout


def test_expert_parallel_matches_one_device(ep_model_dir: str) -> None:
    """Expert parallel 4, experts split by hidden units at TP 4, and expert
    parallel 2 under pipeline parallel 2 give the tokens of one device."""
    layouts = ["1:1:0", "4:1:1", "4:1:0", "2:2:1"]
    res = _probe(ep_model_dir, layouts)
    one = res["1:1:0"]
    assert one["all-reduce"] == 0 and one["counts_ok"]
    for layout in layouts[1:]:
        assert res[layout]["tokens"] == one["tokens"], layout
    for layout in ("4:1:1", "4:1:0"):
        _check_split(res[layout], layout)
    assert "device 3 holds experts 6-7" in res["4:1:1"]["describe"]
    assert "every device holds all 8 experts, 8 of their 32" in res["4:1:0"]["describe"]
    assert "stage=2, model=2" in res["2:2:1"]["describe"]
    # Where the experts' weights live: whole experts per device, or hidden units.
    assert res["4:1:1"]["spec"] == ["model", None, None, None]
    assert res["4:1:0"]["spec"] == [None, None, None, "model"]
    assert res["2:2:1"]["spec"] == ["stage", "model", None, None, None]


@pytest.mark.slow
def test_expert_parallel_2_and_8_match_one_device(ep_model_dir: str) -> None:
    res = _probe(ep_model_dir, ["1:1:0", "2:1:1", "8:1:1"])
    for layout in ("2:1:1", "8:1:1"):
        assert res[layout]["tokens"] == res["1:1:0"]["tokens"], layout
        _check_split(res[layout], layout)
    assert "device 7 holds expert 7" in res["8:1:1"]["describe"]
