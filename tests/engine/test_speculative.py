"""Speculative decoding (n-gram, draft model, EAGLE head): the same tokens as without it (greedy),
under chunked prefill, a tiny page pool, prefix caching, n > 1, stops and logprobs;
no new programs; clear start-up errors for bad configurations."""

from __future__ import annotations

import json
import random

import pytest

from jserve.engine.llm_engine import LLMEngine
from jserve.errors import ConfigError
from jserve.model_loader import default_model_path
from jserve.sampling_params import SamplingParams
from jserve.spec.config import SpeculativeConfig
from jserve.spec.ngram import NgramProposer
from tests.engine.helpers import greedy, make_engine, run
from tests.engine.test_compile_guard import no_compiles

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}
# One engine shape for the random model, so every engine here shares its programs:
# 48 pages of 4 tokens (a tiny pool) and 16-token steps (chunked prompts).
SMALL = dict(
    num_pages=48, max_num_batched_tokens=16, max_num_seqs=8, max_logprobs=2, min_token_bucket=8
)

rng = random.Random(13)
# Repeating patterns give the lookup something to find in a random model too.
PATTERNED = [[rng.randrange(1, 200) for _ in range(n)] * r for n, r in ((3, 4), (5, 3), (2, 9))]
RANDOM = [[rng.randrange(1, 200) for _ in range(n)] for n in (7, 30, 2)]


def outputs(engine: LLMEngine, reqs: list) -> dict[str, list[list[int]]]:
    return {rid: [c.token_ids for c in out.outputs] for rid, out in run(engine, reqs).items()}


def mixed_requests(prompts: list, max_tokens: int = 24) -> list:
    """Arrivals spread over steps, so proposals meet prefill chunks in one step."""
    return [(f"r{i}", p, greedy(max_tokens - i), i) for i, p in enumerate(prompts)]


# -- the proposer and the configuration ---------------------------------------


def test_ngram_lookup_prefers_long_and_recent_matches() -> None:
    p = NgramProposer(1, 3)
    assert p.propose([5, 6, 7, 8, 5, 6], 3) == [7, 8, 5]
    assert p.propose([1, 2, 9, 1, 2, 4, 2], 2) == [4, 2]  # [2] last seen at index 4
    assert p.propose([4, 1, 2, 3, 1, 2], 2) == [3, 1]  # [1, 2] seen at index 1
    assert p.propose([1, 2, 3], 4) == []
    assert NgramProposer(2, 3).propose([7, 9, 7], 2) == []  # only a 1-gram matches
    assert p.propose([3, 3, 3, 3], 0) == []


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": -2}, "num_speculative_tokens"),
        ({"method": "ngram", "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "exceeds"),
        ({"method": "ngram", "prompt_lookup_min": 0}, "prompt_lookup_min"),
        ({"method": "medusa"}, "unknown"),
        ({"method": "ngram", "lookahead": 3}, "unknown keys"),
        ({"method": "draft_model", "model": "/no/such/dir"}, "not a directory"),
        ({"method": "eagle", "model": "/no/such/dir"}, "not a directory"),
        ("{not json", "JSON"),
        (["ngram"], "must be a dict"),
    ],
)
def test_bad_configs_fail_at_start_up(cfg: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SpeculativeConfig.from_dict(cfg)  # type: ignore[arg-type]


def test_a_draft_with_another_vocabulary_is_refused(llama_dir: str, tmp_path) -> None:
    with open(f"{llama_dir}/config.json") as fh:
        cfg = json.load(fh)
    draft = tmp_path / "draft"
    draft.mkdir()
    (draft / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 1}))
    spec = {"method": "draft_model", "model": str(draft)}
    with pytest.raises(ConfigError, match="vocab_size"):
        make_engine(llama_dir, speculative_config=spec)
    # Only the embedded model has a default draft (and head).
    for method in ("draft_model", "eagle"):
        with pytest.raises(ConfigError, match="needs"):
            make_engine(llama_dir, speculative_config={"method": method})


# -- greedy: exactly the tokens without speculation ---------------------------


@pytest.fixture(scope="module")
def warm(llama_dir: str) -> LLMEngine:
    """Warmed up, so the tests below compile nothing new (and the guard can tell)."""
    return make_engine(llama_dir, warmup=True, speculative_config=NGRAM, **SMALL)


@pytest.fixture(scope="module")
def random_draft(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A draft for the random model: its weights with one layer fewer."""
    from tests.hf_models import make_tiny_hf_model

    out = str(tmp_path_factory.mktemp("draft") / "m")
    return make_tiny_hf_model("llama", out, num_hidden_layers=1)


@pytest.fixture(scope="module")
def warm_draft(llama_dir: str, random_draft: str) -> LLMEngine:
    """With a draft model, warmed up; its own programs, so a pool tighter still."""
    spec = {"method": "draft_model", "model": random_draft, "num_speculative_tokens": 4}
    return make_engine(
        llama_dir, warmup=True, speculative_config=spec, **{**SMALL, "num_pages": 28}
    )


@pytest.fixture(scope="module")
def random_head(llama_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An EAGLE head for the random model whose output is its input feature (fc passes the
    feature half through, the layer adds nothing): at position i it proposes what the target
    predicted at i - 1, i.e. that the last token repeats, which greedy random models often do."""
    import numpy as np

    from jserve.config import load_config
    from jserve.spec import eagle

    cfg, hp = eagle.random_head(load_config(llama_dir), seed=5)
    e = cfg.hidden_size
    hp["fc"] = np.concatenate([np.zeros((e, e)), np.eye(e)]).astype(np.float32)
    hp["layer"]["wo"] = np.zeros_like(hp["layer"]["wo"])
    hp["layer"]["w_down"] = np.zeros_like(hp["layer"]["w_down"])
    out = str(tmp_path_factory.mktemp("eagle") / "head")
    eagle.save_head(hp, cfg, out, "float32")
    return out


@pytest.fixture(scope="module")
def warm_eagle(llama_dir: str, random_head: str) -> LLMEngine:
    spec = {"method": "eagle", "model": random_head, "num_speculative_tokens": 4}
    return make_engine(
        llama_dir, warmup=True, speculative_config=spec, **{**SMALL, "num_pages": 28}
    )


@pytest.fixture
def warm_engines(request: pytest.FixtureRequest) -> dict:
    return {
        "ngram": lambda: request.getfixturevalue("warm"),
        "draft_model": lambda: request.getfixturevalue("warm_draft"),
        "eagle": lambda: request.getfixturevalue("warm_eagle"),
    }


@pytest.mark.parametrize("method", ["ngram", "draft_model", "eagle"])
def test_greedy_random_model_mixed_batch_chunked_and_tiny_pool(
    llama_dir: str, warm_engines: dict, method: str
) -> None:
    """48 pages of 4 tokens for 6 requests of up to 52 tokens: proposals are shed and
    sequences preempted; 16-token steps chunk the prompts beside verifications."""
    reqs = mixed_requests(PATTERNED + RANDOM, max_tokens=28)
    # A one-token prompt forking into two samples when it completes.
    reqs.append(("one", [7], SamplingParams(max_tokens=12, temperature=0, n=2), 3))
    want = outputs(make_engine(llama_dir, **SMALL), reqs)
    engine = warm_engines[method]()
    assert outputs(engine, reqs) == want
    s = engine.get_stats()
    assert s.spec_decode_num_drafts > 0 and s.spec_decode_num_accepted_tokens > 0
    assert engine.scheduler.num_preemptions > 0
    assert engine.is_idle()


@pytest.mark.parametrize(
    "spec",
    # The shipped draft and head are the embedded model's defaults.
    [NGRAM, *({"method": m, "num_speculative_tokens": 4} for m in ("draft_model", "eagle"))],
    ids=["ngram", "draft_model", "eagle"],
)
def test_greedy_embedded_model_with_prefix_cache_n_and_stops(spec: dict) -> None:
    model = default_model_path()
    prompts = [
        "ROMEO:\nI will, I will, I will",
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.",
        "KING RICHARD III:\nA horse! a horse! my kingdom for a horse!",
    ]
    reqs = mixed_requests(prompts, max_tokens=40)
    # The same prompt again (a prefix-cache hit), n = 2, and a stop id and string.
    reqs.append(("again", prompts[1], greedy(30), 6))
    reqs.append(("n2", prompts[0], SamplingParams(max_tokens=20, temperature=0, n=2), 7))
    reqs.append(("stop", prompts[2], greedy(40, stop=[" horse"], stop_token_ids=[13]), 8))
    reqs.append(("lp", prompts[1], greedy(25, logprobs=2), 9))
    kw = dict(
        max_num_batched_tokens=16, max_num_seqs=8, page_size=8, max_logprobs=2, min_token_bucket=8
    )
    base = run(make_engine(model, **kw), reqs)
    engine = make_engine(model, speculative_config=spec, **kw)
    got = run(engine, reqs)
    for rid, out in base.items():
        for a, b in zip(out.outputs, got[rid].outputs, strict=True):
            assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
            if a.logprobs is not None:
                for x, y in zip(a.logprobs, b.logprobs, strict=True):
                    assert list(x) == list(y)
                    for t in x:
                        assert y[t].logprob == pytest.approx(x[t].logprob, abs=1e-4)
                        assert y[t].rank == x[t].rank
    assert len(got["r0"].outputs[0].token_ids) == 40  # max_tokens, never more
    s = engine.get_stats()
    assert s.spec_decode_mean_accepted_length > 1.3, s
    assert got["again"].num_cached_tokens > 0
    assert engine.is_idle()


def test_abort_mid_speculation_frees_everything(warm: LLMEngine) -> None:
    engine = warm
    drafts = engine.get_stats().spec_decode_num_drafts
    for i, p in enumerate(PATTERNED):
        engine.add_request(str(i), p, greedy(40))
    for _ in range(6):
        engine.step()
    assert engine.get_stats().spec_decode_num_drafts > drafts
    for i in range(len(PATTERNED)):
        engine.abort_request(str(i))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.is_idle()


@pytest.mark.parametrize("method", ["ngram", "draft_model", "eagle"])
def test_speculation_compiles_nothing_after_warm_up(warm_engines: dict, method: str) -> None:
    engine = warm_engines[method]()
    drafts = engine.get_stats().spec_decode_num_drafts
    reqs = mixed_requests(PATTERNED + RANDOM, max_tokens=20)
    reqs += [
        ("t", PATTERNED[0], SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9), 3),
        ("p", PATTERNED[2], SamplingParams(max_tokens=12, presence_penalty=0.5, seed=1), 4),
        ("l", PATTERNED[1], SamplingParams(max_tokens=12, logprobs=2, top_k=4), 5),
    ]
    with no_compiles():
        run(engine, reqs)
    assert engine.get_stats().spec_decode_num_drafts > drafts
    assert engine.is_idle()


# -- the interfaces: LLM, the CLI flag, metrics -------------------------------


def test_llm_takes_the_config_and_reports_metrics(llama_dir: str, warm: LLMEngine) -> None:
    from jserve import LLM

    llm = LLM(llama_dir, warmup=False, compilation_cache_dir=None, speculative_config=NGRAM,
              page_size=4, **SMALL)  # fmt: skip
    out = llm.generate([PATTERNED[0]], greedy(16), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 16
    m = llm.get_metrics()
    assert m["jserve_spec_decode_num_drafts"] > 0
    assert m["jserve_spec_decode_num_draft_tokens"] >= m["jserve_spec_decode_num_accepted_tokens"]
    assert m["jserve_spec_decode_mean_accepted_length"] == pytest.approx(
        1 + m["jserve_spec_decode_num_accepted_tokens"] / m["jserve_spec_decode_num_drafts"]
    )
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        LLM(llama_dir, warmup=False, speculative_config={"num_speculative_tokens": 0})


def test_the_cli_flag_and_the_prometheus_exporter(warm: LLMEngine) -> None:
    import argparse
    import types

    from jserve.cli.engine_args import add_engine_arguments, engine_config_from_args
    from jserve.server.metrics import EngineCollector

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["--speculative-config", json.dumps(NGRAM)])
    assert engine_config_from_args(args).speculative_config == SpeculativeConfig(**NGRAM)
    with pytest.raises(ConfigError, match="exceeds"):
        bad = {"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}
        engine_config_from_args(parser.parse_args(["--speculative-config", json.dumps(bad)]))

    run(warm, [("m", PATTERNED[1], greedy(12), 0)])
    aengine = types.SimpleNamespace(get_stats=warm.get_stats, dead=False)
    metrics = {m.name: m.samples[0].value for m in EngineCollector(aengine).collect()}
    s = warm.get_stats()
    assert metrics["jserve_spec_decode_num_drafts"] == s.spec_decode_num_drafts > 0
    assert metrics["jserve_spec_decode_num_accepted_tokens"] == s.spec_decode_num_accepted_tokens
    assert metrics["jserve_spec_decode_mean_accepted_length"] == s.spec_decode_mean_accepted_length


TP_PROBE = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
from jserve import LLM, SamplingParams

model, draft, head, prompts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
specs = {
    "none": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1},
    "draft": {"method": "draft_model", "model": draft, "num_speculative_tokens": 3},
    "eagle": {"method": "eagle", "model": head, "num_speculative_tokens": 3},
}
out = {}
for tp in (1, 2):
    for name, spec in specs.items():
        if tp == 1 and name != "none":
            continue
        llm = LLM(model, dtype="float32", page_size=4, max_num_seqs=4, max_num_batched_tokens=16,
                  tensor_parallel_size=tp, warmup=False, compilation_cache_dir=None,
                  speculative_config=spec)
        res = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0,
                           ignore_eos=True), use_tqdm=False)
        m = llm.get_metrics()
        out[f"{tp}-{name}"] = [[r.outputs[0].token_ids for r in res],
                               m["jserve_spec_decode_num_accepted_tokens"]]
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_tensor_parallel_speculation_matches_one_device(
    llama_dir: str, random_draft: str, random_head: str
) -> None:
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            TP_PROBE,
            llama_dir,
            random_draft,
            random_head,
            json.dumps(PATTERNED),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    res = json.loads(line[len("RESULT") :])
    want = res["1-none"][0]
    for name in ("none", "ngram", "draft", "eagle"):
        assert res[f"2-{name}"][0] == want, name
    assert res["2-ngram"][1] > 0 and res["2-draft"][1] > 0


def test_a_draft_identical_to_the_target_is_always_accepted(llama_dir: str) -> None:
    """The draft's pool mirrors the target's and its proposals are drawn from the very
    distribution the target's rows sample (penalties, bans, temperature, filters): with the
    target as its own draft, nothing is ever rejected, greedy or not."""
    spec = {"method": "draft_model", "model": llama_dir, "num_speculative_tokens": 3}
    engine = make_engine(llama_dir, speculative_config=spec, **{**SMALL, "min_token_bucket": 8})
    reqs = [
        ("g", PATTERNED[0], greedy(20), 0),
        ("t", RANDOM[1], SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=1), 1),
        ("p", RANDOM[0], SamplingParams(max_tokens=20, presence_penalty=1.5, top_k=8, seed=2), 2),
        (
            "m",
            RANDOM[2],
            SamplingParams(max_tokens=20, min_tokens=6, stop_token_ids=[3], seed=3),
            2,
        ),
        # The bias reaches the draft's proposals too (else they would be rejected often).
        ("b", RANDOM[0], SamplingParams(max_tokens=20, seed=4, logit_bias={5: 4.0, 9: -100}), 3),
    ]
    out = run(engine, reqs)
    assert 9 not in out["b"].outputs[0].token_ids
    assert all(len(o.outputs[0].token_ids) > 0 for o in out.values())
    s = engine.get_stats()
    assert s.spec_decode_num_draft_tokens > 20
    assert s.spec_decode_num_accepted_tokens == s.spec_decode_num_draft_tokens
