"""bin/train-demo-model --tiny and bin/eval-demo-model end to end, so the tools never rot."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers

from jserve import LLM, SamplingParams
from jserve.config import load_config
from jserve.spec import eagle
from tools import demo_training as dt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "bin", "train-demo-model")
EVAL = os.path.join(ROOT, "bin", "eval-demo-model")


def _corpus(path: str) -> str:
    """~30k characters of play-shaped text (speaker, colon, newline, lines, blank line)."""
    rng = np.random.default_rng(0)
    names = ["ROMEO", "JULIET", "First Citizen", "NURSE", "KING HENRY VI"]
    words = ["the", "and", "of", "my", "thou", "thee", "love", "sweet", "fair", "lord", "what"]
    turns = []
    while sum(map(len, turns)) < 30_000:
        lines = [
            " ".join(rng.choice(words, rng.integers(3, 9))).capitalize() + rng.choice([",", "."])
            for _ in range(rng.integers(1, 5))
        ]
        turns.append(f"{rng.choice(names)}:\n" + "\n".join(lines) + "\n\n")
    text = "".join(turns)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return text


def _run(*args: str) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, str, str]:
    d = tmp_path_factory.mktemp("demo")
    corpus = str(d / "corpus.txt")
    text = _corpus(corpus)
    log = _run(TRAIN, "--tiny", "--corpus", corpus, "--out-dir", str(d / "out"), "--seed", "1")
    assert "held-out loss" in log
    return text, corpus, str(d / "out")


def test_split_is_the_last_five_percent() -> None:
    text = "".join(f"line {i}\n" for i in range(1000))
    train, heldout = dt.split_corpus(text)
    assert train + heldout == text
    assert 0.04 < len(heldout) / len(text) <= 0.05
    assert heldout.startswith("line ") and train.endswith("\n")


def test_learning_rate_schedule() -> None:
    oc = dt.OptConfig(lr=1.0, min_lr_ratio=0.1, warmup=10, steps=110)
    lr = [float(dt.learning_rate(jnp.asarray(s), oc)) for s in range(110)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert lr[10] == pytest.approx(1.0) and lr[60] == pytest.approx(0.55, abs=1e-6)
    assert lr[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lr[10:]))


def test_train_step_lowers_the_loss_on_a_fixed_batch() -> None:
    cfg = dt.make_config(dt.ModelSize(32, 1, 2, 1, 64), 64, 0, "t", 64)
    ids = np.asarray(np.random.default_rng(0).integers(1, 64, (2, 17)), np.int32)
    params = dt.init_params(dt.get_model(cfg).param_specs(cfg), jax.random.key(0))
    opt = dt.init_opt_state(params)
    oc = dt.OptConfig(lr=1e-2, warmup=1, steps=20, weight_decay=0.0)
    losses = []
    for _ in range(20):
        params, opt, stats = dt.train_step(params, opt, jnp.asarray(ids), cfg=cfg, oc=oc)
        losses.append(float(stats["loss"]))
    assert losses[-1] < losses[0] - 1.0, losses


def test_tiny_training_writes_loadable_dirs(trained: tuple[str, str, str]) -> None:
    text, _, out = trained
    for name in ("shakespeare-llama", "shakespeare-llama-draft"):
        d = os.path.join(out, name)
        assert sorted(os.listdir(d)) == [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "training.json",
        ]
        cfg = load_config(d)
        tok = tokenizers.Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        eos = tok.token_to_id(dt.EOS)
        assert cfg.architecture == "LlamaForCausalLM"
        assert cfg.vocab_size == tok.get_vocab_size() == 300
        assert cfg.eos_token_ids == (eos,) and cfg.max_position_embeddings == 256
        assert cfg.num_kv_heads < cfg.num_q_heads
        excerpt = text[:2000] + "  odd   spacing\n\n\n\ttabs é"
        assert tok.decode(tok.encode(excerpt).ids) == excerpt
        with open(os.path.join(d, "training.json")) as f:
            info = json.load(f)
        assert info["steps"] == 3 and math.isfinite(info["heldout_loss"])
        llm = LLM(model=d, dtype="float32", warmup=False)
        assert llm.cfg.eos_token_ids == (eos,)
        out_ = llm.generate(
            "ROMEO:", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        )
        assert len(out_[0].outputs[0].token_ids) == 8


def test_training_is_deterministic(trained: tuple[str, str, str], tmp_path) -> None:
    """The same --seed in another process gives byte-identical weights; another seed does not."""
    _, corpus, out = trained
    spec = importlib.util.spec_from_loader(
        "train_demo_model", importlib.machinery.SourceFileLoader("train_demo_model", TRAIN)
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--tiny", "--corpus", corpus, "--which", "target"]
    module.main([*args, "--out-dir", str(tmp_path / "same"), "--seed", "1"])
    module.main([*args, "--out-dir", str(tmp_path / "other"), "--seed", "2"])

    def weights(root: str) -> bytes:
        with open(os.path.join(root, "shakespeare-llama", "model.safetensors"), "rb") as f:
            return f.read()

    assert weights(str(tmp_path / "same")) == weights(out)
    assert weights(str(tmp_path / "other")) != weights(out)


def test_eval_reports_loss_against_uniform(trained: tuple[str, str, str]) -> None:
    _, corpus, out = trained
    d = os.path.join(out, "shakespeare-llama")
    log = _run(EVAL, d, "--corpus", corpus, "--max-tokens", "8", "--context", "32")
    loss = float(log.split("loss")[1].split()[0])
    uniform = float(log.split("uniform")[1].split()[0])
    assert uniform == pytest.approx(math.log(300), abs=1e-4)
    assert 0 < loss < uniform + 0.5
    sample = log.split("greedy sample")[1].split("\n", 2)[2]
    assert sample.startswith("ROMEO:") and len(sample.strip()) > len("ROMEO:")
    with open(os.path.join(d, "training.json")) as f:
        # Same split, tokenizer, windows and stored weights as the training run.
        assert loss == pytest.approx(json.load(f)["heldout_loss"], abs=1e-3)


def test_eagle_train_step_lowers_the_loss_on_a_fixed_batch() -> None:
    cfg = dt.make_config(dt.ModelSize(32, 1, 2, 1, 64), 64, 0, "t", 64)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 16)), np.int32)
    target = dt.init_params(dt.get_model(cfg).param_specs(cfg), jax.random.key(0))
    hcfg, hp = eagle.random_head(cfg, 1)
    opt = dt.init_opt_state(hp)
    oc = dt.OptConfig(lr=1e-2, warmup=1, steps=20, weight_decay=0.0)
    losses = []
    for i in range(20):
        hp, opt, stats = dt.eagle_train_step(
            hp, opt, target, ids, jax.random.key(i), hcfg=hcfg, tcfg=cfg, oc=oc, noise=0.0,
            cls_weight=0.1,
        )  # fmt: skip
        losses.append(float(stats["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses


def test_tiny_eagle_head_trains_and_speculates(trained: tuple[str, str, str]) -> None:
    _, corpus, out = trained
    log = _run(TRAIN, "--tiny", "--which", "eagle", "--corpus", corpus, "--out-dir", out)
    assert "held out" in log
    head = os.path.join(out, "shakespeare-llama-eagle")
    with open(os.path.join(head, "training.json")) as f:
        info = json.load(f)
    assert info["steps"] == 3 and 0.0 <= info["heldout"]["top1"] <= 1.0
    spec = {"method": "eagle", "model": head, "num_speculative_tokens": 2}
    target = os.path.join(out, "shakespeare-llama")
    llm = LLM(model=target, dtype="float32", warmup=False, speculative_config=spec)
    out_ = llm.generate(["ROMEO:\n"], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    assert len(out_[0].outputs[0].token_ids) == 8
    assert llm.get_metrics()["jserve_spec_decode_num_drafts"] > 0
