"""`jserve bench throughput` and `jserve bench latency` end to end on a tiny model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jserve.bench.datasets import random_requests
from jserve.bench.metrics import RequestRecord, parse_goodput, summarize
from jserve.cli.main import main
from jserve.errors import ConfigError
from jserve.model_loader import default_model_path

ENGINE = ["--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--disable-tqdm"]


def test_throughput_json_is_consistent(tmp_path) -> None:
    # The embedded Shakespeare model (no --model). More prompts than --max-waiting:
    # the benchmark queues them all at once, so it raises the limit for its engine.
    out = tmp_path / "t.json"
    args = ["bench", "throughput", "--num-prompts", "12", "--max-waiting", "4"]
    args += ["--random-input-len", "24", "--random-output-len", "10", "--random-range-ratio", "0.5"]
    assert main([*args, *ENGINE, "--result-filename", str(out), "--seed", "3"]) == 0
    r = json.loads(out.read_text())
    assert r["mode"] == "throughput" and r["num_requests"] == 12
    assert r["engine"]["max_waiting"] == 12
    # Every request generated exactly its drawn output length (ignore_eos), and the
    # lengths vary (range ratio 0.5), so the sum checks each one was counted once.
    with open(os.path.join(default_model_path(), "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    want = random_requests(np.random.default_rng(3), 12, vocab, 24, 10, range_ratio=0.5)
    assert len({q.output_len for q in want}) > 1
    assert r["total_output_tokens"] == sum(q.output_len for q in want)
    assert r["total_input_tokens"] == sum(q.prompt_len for q in want)
    # The same seed draws the same requests.
    again = tmp_path / "t2.json"
    assert main([*args, *ENGINE, "--result-filename", str(again), "--seed", "3"]) == 0
    r2 = json.loads(again.read_text())
    assert (r2["total_input_tokens"], r2["total_output_tokens"]) == (
        r["total_input_tokens"],
        r["total_output_tokens"],
    )


def test_latency_json_is_consistent(tmp_path) -> None:
    out = tmp_path / "l.json"
    args = ["bench", "latency", "--batch-size", "3", "--plot-dir", str(tmp_path / "plots")]
    args += ["--input-len", "8", "--output-len", "6", "--num-iters", "4", "--num-iters-warmup", "1"]
    args += ["--max-waiting", "2", "--metric-percentiles", "25,75"]
    assert main([*args, *ENGINE, "--result-filename", str(out)]) == 0
    r = json.loads(out.read_text())
    assert len(r["latencies"]) == 4  # the warm-up iteration is not among them
    assert all(t > 0 for t in r["latencies"])
    assert set(r["percentiles"]) == {"25", "75"}  # the percentiles asked for
    assert r["engine"]["max_waiting"] == 3  # raised to hold a whole batch
    png = (tmp_path / "plots" / "latency_cdf.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_random_dataset_lengths_and_prefix() -> None:
    rng = np.random.default_rng(0)
    reqs = random_requests(rng, 50, 1000, 100, 20, range_ratio=0.2, prefix_len=7)
    assert all(87 <= r.prompt_len <= 127 for r in reqs)
    assert all(16 <= r.output_len <= 24 for r in reqs)
    assert len({tuple(r.prompt[:7]) for r in reqs}) == 1
    assert all(len(r.prompt) == r.prompt_len for r in reqs)


def test_metric_definitions() -> None:
    a = RequestRecord(prompt_len=5, start=0.0, success=True)
    a.chunk_times, a.chunk_tokens = [0.5, 0.6, 0.8], [1, 1, 2]
    b = RequestRecord(prompt_len=3, start=1.0, success=True)
    b.chunk_times, b.chunk_tokens = [1.2], [1]
    c = RequestRecord(prompt_len=3, start=1.0, success=False, error="boom")
    r = summarize([a, b, c], duration=2.0, slos=parse_goodput(["ttft:300"]))
    assert (r["completed"], r["failed"]) == (2, 1)
    assert r["total_output_tokens"] == 5 and r["total_input_tokens"] == 8
    assert r["mean_ttft_ms"] == pytest.approx(350.0)
    # TPOT excludes the first token: (0.8 - 0.5) / 3; b has one token and is left out.
    assert r["mean_tpot_ms"] == pytest.approx(100.0)
    assert r["mean_itl_ms"] == pytest.approx(150.0)
    assert r["request_goodput"] == pytest.approx(0.5)  # only b meets TTFT <= 300 ms
    assert r["p50_e2el_ms"] == pytest.approx(500.0)  # the median of a's 800 ms and b's 200 ms
    for bad in (["speed:3"], ["ttft"], ["ttft:fast"], ["ttft:0"], ["ttft:nan"]):
        with pytest.raises(ConfigError, match="goodput"):
            parse_goodput(bad)


def test_arrival_gaps_follow_the_rate() -> None:
    from jserve.bench.serve import arrival_gaps

    rng = np.random.default_rng(0)
    poisson = arrival_gaps(rng, 20000, rate=4.0, burstiness=1.0)
    assert poisson.mean() == pytest.approx(0.25, rel=0.03)
    assert poisson.std() == pytest.approx(0.25, rel=0.05)  # exponential: std = mean
    bursty = arrival_gaps(rng, 20000, rate=4.0, burstiness=0.25)
    assert bursty.mean() == pytest.approx(0.25, rel=0.05)
    assert bursty.std() > 1.5 * poisson.std()
    assert not arrival_gaps(rng, 5, rate=float("inf"), burstiness=1.0).any()


def test_shakespeare_dataset_with_the_embedded_model(tmp_path) -> None:
    out = tmp_path / "s.json"
    args = ["bench", "throughput", "--dataset-name", "shakespeare", "--num-prompts", "6"]
    args += [
        "--shakespeare-input-len",
        "20",
        "--shakespeare-output-len",
        "8",
        "--temperature",
        "0.8",
    ]
    assert main([*args, *ENGINE, "--result-filename", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["dataset"] == "shakespeare" and r["total_output_tokens"] == 6 * 8
    assert r["total_input_tokens"] >= 6 * 20
    assert r["model"].endswith("shakespeare-llama")
