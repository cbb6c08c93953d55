"""Multi-LoRA serving: PEFT adapters made with peft, mixed with base requests in one batch,
against transformers with each adapter merged."""

from __future__ import annotations

import json
import os
import shutil
import textwrap

import numpy as np
import pytest

from jserve import LLM, AdapterError, LoRARequest, SamplingParams
from jserve.errors import ConfigError
from tests.hf_models import make_tiny_hf_model
from tests.lora.adapters import ADAPTERS, make_peft_adapter, merged_greedy
from tests.sharding.probe import run_probe

pytestmark = pytest.mark.timeout(600)

# Beyond the three of the acceptance mix: two more, so a stream needs more adapters
# than max_loras (3) and than max_cpu_loras (4).
EXTRA = {
    "kv2": dict(r=2, lora_alpha=4, target_modules=["k_proj", "v_proj"]),
    "up12": dict(r=12, lora_alpha=6, target_modules=["up_proj", "q_proj"]),
}
PROMPTS = [
    [5, 17, 99, 3, 42, 7],
    list(range(1, 23)),  # longer than a step's 16 tokens: chunked prefill
    [200, 100, 50],
    [9, 9, 8, 120, 33, 1, 250, 77, 64, 12, 5],
]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("lora")
    base = make_tiny_hf_model("llama", str(d / "base"))
    dirs = {}
    for i, (name, kw) in enumerate({**ADAPTERS, **EXTRA}.items()):
        dirs[name] = make_peft_adapter(base, str(d / name), seed=i + 1, **kw)
    reqs = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(dirs.items())}
    llm = LLM(
        base,
        dtype="float32",
        enable_lora=True,
        max_loras=3,
        max_lora_rank=16,
        max_cpu_loras=4,
        page_size=4,
        num_pages=48,
        max_num_seqs=8,
        max_num_batched_tokens=16,
        compilation_cache_dir=None,
    )
    return {"base": base, "dirs": dirs, "reqs": reqs, "llm": llm, "tmp": d, "refs": {}}


def reference(setup: dict, name: str | None, prompt: list[int]) -> list[int]:
    key = (name, tuple(prompt))
    if key not in setup["refs"]:
        adapter = None if name is None else setup["dirs"][name]
        setup["refs"][key] = merged_greedy(setup["base"], adapter, prompt, MAX_TOKENS)
    return setup["refs"][key]


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


def test_mixed_batch_matches_merged_transformers(setup: dict) -> None:
    """Three adapters of different ranks and modules plus base-only requests, in one batch:
    each request's greedy tokens are those of transformers with its adapter merged."""
    llm = setup["llm"]
    names = [None, "qv8", "all4", "mlp16"] * 2
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    loras = [None if n is None else setup["reqs"][n] for n in names]
    outs = llm.generate(prompts, greedy(), lora_request=loras, use_tqdm=False)
    for name, prompt, out in zip(names, prompts, outs, strict=True):
        assert out.outputs[0].token_ids == reference(setup, name, prompt), (name, prompt)
    # The adapters really change the tokens (a zero update would pass the above trivially).
    base = reference(setup, None, PROMPTS[0])
    assert all(reference(setup, n, PROMPTS[0]) != base for n in ("qv8", "all4", "mlp16"))
    assert llm.engine.is_idle()


def test_more_adapters_than_slots_stream(setup: dict) -> None:
    """Five adapters through three device slots and four host slots: every request gets
    its adapter's tokens, an adapter is never evicted while a running sequence uses it,
    and nothing compiles after warm-up."""
    llm = setup["llm"]
    engine, lora = llm.engine, llm.engine.lora
    compiles, evictions = engine.runner.compiles, lora.num_evictions
    order = ["kv2", None, "up12", "qv8", "all4", "mlp16", "kv2", "up12", None, "qv8", "mlp16"]
    rng = np.random.default_rng(0)
    expected: dict[str, tuple] = {}
    got: dict[str, list[int]] = {}
    pending = list(enumerate(order))
    while pending or engine.has_unfinished_requests():
        # A few requests arrive every step, so adapters come and go while others run.
        for _ in range(int(rng.integers(0, 3))):
            if pending:
                i, name = pending.pop(0)
                prompt = PROMPTS[i % len(PROMPTS)]
                expected[f"s{i}"] = (name, prompt)
                lr = None if name is None else setup["reqs"][name]
                engine.add_request(f"s{i}", prompt, greedy(), lora_request=lr)
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
            if out.finished:
                name, prompt = expected.pop(out.request_id)
                assert got[out.request_id] == reference(setup, name, prompt), name
        for seq in engine.scheduler.running:  # a running sequence's adapter stays put
            rid = seq.request.lora_id
            assert rid == 0 or lora.slot_of.get(rid) == seq.lora_slot
    assert not expected
    assert lora.num_evictions > evictions
    assert len(lora.host) <= 4 and len(lora.slot_of) <= 3
    assert engine.runner.compiles == compiles
    metrics = llm.get_metrics()
    assert metrics["jserve_lora_adapters_device"] == len(lora.slot_of)
    assert metrics["jserve_lora_evictions"] == lora.num_evictions
    assert metrics['jserve_lora_running_requests{adapter="qv8"}'] == 0


def test_prefix_cache_never_crosses_adapters(setup: dict) -> None:
    llm = setup["llm"]
    prompt = list(range(30, 50))  # five full pages of 4
    qv8 = setup["reqs"]["qv8"]
    first = llm.generate([prompt], greedy(), lora_request=qv8, use_tqdm=False)[0]
    base = llm.generate([prompt], greedy(), use_tqdm=False)[0]
    again = llm.generate([prompt], greedy(), lora_request=qv8, use_tqdm=False)[0]
    assert base.num_cached_tokens == 0  # the adapter's pages are not the base model's
    assert again.num_cached_tokens >= 16
    assert first.outputs[0].token_ids == again.outputs[0].token_ids
    assert first.outputs[0].token_ids == reference(setup, "qv8", prompt)
    assert base.outputs[0].token_ids == reference(setup, None, prompt)


def test_a_reused_id_never_finds_the_old_adapters_pages(setup: dict) -> None:
    llm = setup["llm"]
    prompt = list(range(60, 80))
    first = LoRARequest("reused", 600, setup["dirs"]["all4"])
    out = llm.generate([prompt], greedy(), lora_request=first, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == reference(setup, "all4", prompt)
    llm.remove_lora("reused")
    second = LoRARequest("reused", 600, setup["dirs"]["mlp16"])  # same id, other weights
    out = llm.generate([prompt], greedy(), lora_request=second, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    assert out.outputs[0].token_ids == reference(setup, "mlp16", prompt)
    llm.remove_lora("reused")


def test_a_request_waiting_for_a_slot_is_not_starved(setup: dict) -> None:
    """All three slots busy with adapters that keep getting new requests: a request for a
    fourth adapter still runs, because later adapter requests wait behind it."""
    llm = setup["llm"]
    engine = llm.engine
    resident = ["qv8", "all4", "mlp16"]
    llm.generate(PROMPTS[:3], greedy(), lora_request=[setup["reqs"][n] for n in resident])
    step, done = 0, set()
    while "starved" not in done and step < 150:
        for k, name in enumerate(resident):  # each resident adapter gets a request a step
            lr = setup["reqs"][name]
            engine.add_request(f"r{step}-{k}", PROMPTS[k], greedy(), lora_request=lr)
        if step == 3:
            engine.add_request("starved", PROMPTS[0], greedy(), lora_request=setup["reqs"]["kv2"])
        done |= {o.request_id for o in engine.step() if o.finished}
        step += 1
    assert "starved" in done, step
    for rid in list(engine.requests):
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()


def test_a_failed_generate_registers_nothing(setup: dict) -> None:
    llm = setup["llm"]
    before = llm.list_loras()
    good = LoRARequest("fresh", 700, setup["dirs"]["kv2"])
    bad = LoRARequest("broken", 701, str(setup["tmp"] / "nowhere"))
    with pytest.raises(AdapterError, match=r"prompts\[1\]: LoRA adapter directory"):
        llm.generate([PROMPTS[0], PROMPTS[1]], greedy(), lora_request=[good, bad], use_tqdm=False)
    assert llm.list_loras() == before


def _pickle_adapter(setup: dict) -> str:
    import peft
    import torch
    import transformers

    out = str(setup["tmp"] / "pickled")
    model = transformers.AutoModelForCausalLM.from_pretrained(setup["base"], dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.save_pretrained(out, safe_serialization=False)
    return out


def test_bad_adapters_are_refused_with_nothing_loaded(setup: dict) -> None:
    llm = setup["llm"]
    engine = llm.engine
    d = setup["tmp"]
    llm.add_lora(setup["reqs"]["qv8"])
    before = (sorted(engine.lora.known), sorted(engine.lora.host), engine.lora.num_host_loads)
    wide = make_tiny_hf_model("llama", str(d / "wide"), hidden_size=96)
    cases = {
        "rank": (
            make_peft_adapter(setup["base"], str(d / "r32"), r=32, target_modules=["q_proj"]),
            r"rank 32, above max_lora_rank=16",
        ),
        "hidden": (
            make_peft_adapter(wide, str(d / "wide_lora"), r=4, target_modules=["q_proj"]),
            r"another architecture or hidden size",
        ),
        "missing": (str(d / "nowhere"), r"not found"),
        "pickle": (_pickle_adapter(setup), r"only pickle weights"),
        "module": (
            make_peft_adapter(setup["base"], str(d / "emb"), r=4, target_modules=["embed_tokens"]),
            r"target module\(s\) \['embed_tokens'\] are not supported",
        ),
    }
    # A half-valid adapter: its first layer fits, its second names a layer the model lacks.
    deep = str(d / "deep")
    shutil.copytree(setup["dirs"]["qv8"], deep)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(os.path.join(deep, "adapter_model.safetensors"))
    extra = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items() if "layers.1." in k}
    save_file({**tensors, **extra}, os.path.join(deep, "adapter_model.safetensors"))
    cases["layers"] = (deep, r"base model has 2 layers")
    for i, (case, (path, message)) in enumerate(cases.items()):
        req = LoRARequest(f"bad-{case}", 100 + i, path)
        with pytest.raises(AdapterError, match=message):
            llm.generate([[1, 2, 3]], greedy(), lora_request=req, use_tqdm=False)
        with pytest.raises(AdapterError, match=message):
            llm.add_lora(req)
    with pytest.raises(AdapterError, match=r"unknown LoRA adapter 'nope'.*'qv8'"):
        engine.lora_by_name("nope")
    # An id or a name already given to another adapter.
    with pytest.raises(AdapterError, match="already adapter"):
        llm.add_lora(LoRARequest("other", 1, setup["dirs"]["all4"]))
    with pytest.raises(AdapterError, match="already adapter id"):
        llm.add_lora(LoRARequest("qv8", 99, setup["dirs"]["qv8"]))
    after = (sorted(engine.lora.known), sorted(engine.lora.host), engine.lora.num_host_loads)
    assert after == before
    assert engine.is_idle() and not engine.requests
    # The engine serves on.
    out = llm.generate([PROMPTS[0]], greedy(), lora_request=setup["reqs"]["all4"], use_tqdm=False)
    assert out[0].outputs[0].token_ids == reference(setup, "all4", PROMPTS[0])


def test_adapter_gone_from_disk_fails_only_its_requests(setup: dict) -> None:
    """An adapter that left host memory (LRU) and whose directory was then removed: its
    request ends with an error when it is to run; the others complete."""
    from jserve.errors import EngineStepError

    llm = setup["llm"]
    gone = str(setup["tmp"] / "gone")
    shutil.copytree(setup["dirs"]["kv2"], gone)
    req = LoRARequest("gone", 500, gone)
    llm.add_lora(req)
    llm.engine.lora.host.pop(500)  # as the host LRU drops it when others need the room
    assert 500 not in llm.engine.lora.slot_of
    shutil.rmtree(gone)
    with pytest.raises(EngineStepError, match=r"1 of 2 prompts failed.*gone.*not found"):
        llm.generate([PROMPTS[0], PROMPTS[2]], greedy(), lora_request=[req, None], use_tqdm=False)
    assert llm.engine.is_idle()
    llm.remove_lora("gone")
    out = llm.generate([PROMPTS[2]], greedy(), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == reference(setup, None, PROMPTS[2])


def test_unsupported_adapter_options(setup: dict, tmp_path) -> None:
    with open(os.path.join(setup["dirs"]["qv8"], "adapter_config.json")) as f:
        base_cfg = json.load(f)
    for key, value, message in (
        ("use_dora", True, "DoRA"),
        ("bias", "all", "bias='all'"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
    ):
        path = tmp_path / key
        shutil.copytree(setup["dirs"]["qv8"], path)
        with open(path / "adapter_config.json", "w") as f:
            json.dump({**base_cfg, key: value}, f)
        with pytest.raises(AdapterError, match=message):
            setup["llm"].add_lora(LoRARequest(key, 200, str(path)))


def test_remove_and_list(setup: dict) -> None:
    llm = setup["llm"]
    req = LoRARequest("kv2-again", 300, setup["dirs"]["kv2"])
    assert llm.add_lora(req)
    assert req in llm.list_loras()
    assert llm.remove_lora("kv2-again")
    assert req not in llm.list_loras()
    with pytest.raises(AdapterError, match="unknown LoRA adapter"):
        llm.remove_lora("kv2-again")
    engine = llm.engine
    engine.add_request("busy", PROMPTS[0], greedy(), lora_request=setup["reqs"]["kv2"])
    with pytest.raises(AdapterError, match="used by 1 unfinished request"):
        llm.remove_lora("kv2")
    while engine.has_unfinished_requests():
        engine.step()


def test_lora_off_and_bad_config(setup: dict) -> None:
    from jserve.engine.config import EngineConfig

    with pytest.raises(ConfigError, match="max_cpu_loras"):
        EngineConfig(enable_lora=True, max_loras=4, max_cpu_loras=2).validate()
    with pytest.raises(ConfigError, match="max_lora_rank"):
        EngineConfig(enable_lora=True, max_lora_rank=0).validate()


def test_lora_request_without_enable_lora(tmp_path) -> None:
    base = make_tiny_hf_model("llama", str(tmp_path / "b"))
    llm = LLM(base, dtype="float32", max_num_seqs=2, max_num_batched_tokens=8, warmup=False)
    with pytest.raises(AdapterError, match="enable_lora=True"):
        llm.generate([[1, 2]], greedy(), lora_request=LoRARequest("a", 1, str(tmp_path)))


TP_PROBE = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from jserve import LLM, LoRARequest, SamplingParams

    base, adapters = sys.argv[1], json.loads(sys.argv[2])
    prompts = json.loads(sys.argv[3])
    out = {}
    for tp in (4,):
        llm = LLM(base, dtype="float32", page_size=4, max_num_seqs=4, max_num_batched_tokens=16,
                  tensor_parallel_size=tp, warmup=False, enable_lora=True, max_loras=2,
                  max_lora_rank=16, compilation_cache_dir=None)
        loras = [None] + [LoRARequest(n, i + 1, p) for i, (n, p) in enumerate(adapters)]
        res = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0,
                           ignore_eos=True), lora_request=loras, use_tqdm=False)
        layer = llm.engine.runner.lora["layers"][0]
        out[tp] = {
            "tokens": [r.outputs[0].token_ids for r in res],
            "b_spec": str(layer["wqkv"]["b"].sharding.spec),
            "a_spec": str(layer["wo"]["a"].sharding.spec),
        }
    print("RESULT" + json.dumps(out))
    """
)


def test_tensor_parallel_gives_one_device_tokens(setup: dict) -> None:
    """TP 4 (over 2 KV heads: each replicated twice) shards the adapter slots like their
    base weights and gives transformers' merged tokens."""
    names = ["all4", "mlp16"]
    prompts = PROMPTS[:3]
    adapters = [(n, setup["dirs"][n]) for n in names]
    res = run_probe(TP_PROBE, setup["base"], json.dumps(adapters), json.dumps(prompts))
    want = [reference(setup, n, p) for n, p in zip([None, *names], prompts, strict=True)]
    for tp in ("4",):
        assert res[tp]["tokens"] == want, tp
        assert "model" in res[tp]["b_spec"] and "model" in res[tp]["a_spec"], res[tp]


def test_composes_with_ngram_speculation_and_moe(tmp_path, setup: dict) -> None:
    """n-gram speculation verifies with the adapter (tokens stay exact); a mixture-of-experts
    model serves attention adapters and refuses one for its routed experts' MLP."""
    from tests.models.moe_models import make_tiny_moe

    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[5, 17, 99, 3, 42, 7, 5, 17, 99], [1, 2, 3, 1, 2, 3, 1, 2]]
    small = dict(dtype="float32", max_num_seqs=4, max_num_batched_tokens=16, warmup=False)
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    llm = LLM(setup["base"], enable_lora=True, speculative_config=ngram, **small)
    qv8 = setup["reqs"]["qv8"]
    outs = llm.generate(prompts, sp, lora_request=[qv8, None], use_tqdm=False)
    for name, prompt, out in zip(["qv8", None], prompts, outs, strict=True):
        assert out.outputs[0].token_ids == merged_greedy(
            setup["base"], None if name is None else setup["dirs"][name], prompt, 8
        )
    assert llm.get_metrics()["jserve_spec_decode_num_drafts"] > 0

    moe = make_tiny_moe("mixtral", str(tmp_path / "moe"))
    attn = make_peft_adapter(moe, str(tmp_path / "attn"), r=4, target_modules=["q_proj", "o_proj"])
    from jserve.config import load_config
    from jserve.lora.synthetic import write_random_adapter

    mlp = write_random_adapter(load_config(moe), str(tmp_path / "mlp"), 4, modules=("gate_proj",))
    llm = LLM(moe, enable_lora=True, max_lora_rank=8, **small)
    outs = llm.generate(
        prompts, sp, lora_request=[LoRARequest("attn", 1, attn), None], use_tqdm=False
    )
    for adapter, prompt, out in zip([attn, None], prompts, outs, strict=True):
        assert out.outputs[0].token_ids == merged_greedy(moe, adapter, prompt, 8)
    with pytest.raises(AdapterError, match="no dense gate_proj"):
        llm.add_lora(LoRARequest("mlp", 2, mlp))


def test_generate_cli_runs_an_adapter(setup: dict, capsys) -> None:
    from jserve.cli.main import main

    base = ["generate", "--model", setup["base"], "--dtype", "float32", "--max-tokens", "4"]
    lora = ["--lora-modules", f"qv8={setup['dirs']['qv8']}", "--max-lora-rank", "16"]
    assert main([*base, *lora, "--lora-name", "nope", "--temperature", "0", "x"]) != 0
    assert "unknown LoRA adapter 'nope'; this engine serves ['qv8']" in capsys.readouterr().err
