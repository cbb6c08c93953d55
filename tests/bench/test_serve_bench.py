"""`jserve bench serve` against a real server on loopback, over both APIs."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading

import grpc
import pytest

from jserve.cli.main import main
from jserve.engine.async_engine import AsyncLLMEngine
from jserve.server.app import start_server
from tests.engine.helpers import make_engine

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tok_model_dir: str):
    aengine = AsyncLLMEngine(make_engine(tok_model_dir, max_num_seqs=8, max_num_batched_tokens=64))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    handle = asyncio.run_coroutine_threadsafe(
        start_server(aengine, port=0, http_port=0), loop
    ).result(120)
    yield handle
    asyncio.run_coroutine_threadsafe(handle.stop(grace=5), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    aengine.shutdown()


@pytest.mark.parametrize("backend", ["jserve", "jetstream", "openai"])
def test_bench_serve_json_is_consistent(server, backend: str, tmp_path) -> None:
    out = tmp_path / "serve.json"
    args = ["bench", "serve", "--port", str(server.port), "--backend", backend]
    if backend == "openai":
        args += ["--base-url", server.http_url]
    args += ["--num-prompts", "10", "--random-input-len", "12", "--random-output-len", "8"]
    args += ["--request-rate", "50", "--max-concurrency", "4", "--seed", "1", "--vocab-size", "300"]
    args += ["--goodput", "ttft:60000", "tpot:60000", "--disable-tqdm"]
    plots = tmp_path / "plots"
    assert main([*args, "--result-filename", str(out), "--plot-dir", str(plots)]) == 0
    assert {p.name for p in plots.iterdir()} == {"latency_cdf.png", "throughput.png"}
    r = json.loads(out.read_text())
    assert r["completed"] == 10 and r["failed"] == 0
    assert r["total_input_tokens"] == 10 * 12  # the random prompts, sent as they are
    assert sum(r["output_lens"]) == r["total_output_tokens"]
    if backend != "jetstream":  # ignore_eos: exactly the asked-for lengths
        assert r["output_lens"] == [8] * 10
    else:  # the server's greedy sampling stops at EOS, and not later than asked
        assert all(1 <= n <= 8 for n in r["output_lens"])
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert r[f"mean_{name}_ms"] > 0
    # Each request's first token comes no later than its last.
    assert r["mean_ttft_ms"] <= r["mean_e2el_ms"]
    for p in (50, 90, 99):
        assert r[f"p{p}_ttft_ms"] <= r[f"p{p}_e2el_ms"]
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])  # loose SLOs


def test_options_are_checked_before_any_request(monkeypatch, capsys) -> None:
    from jserve.server import client

    def no_connection(*args, **kwargs):
        raise AssertionError("the benchmark connected before checking its options")

    monkeypatch.setattr(client, "Client", no_connection)
    base = ["bench", "serve", "--port", "1", "--disable-tqdm"]
    for argv, message in [
        (["--goodput", "ttft:soon"], "--goodput"),
        (["--metric-percentiles", "50,100"], "--metric-percentiles"),
        (["--backend", "jetstream", "--temperature", "0.7"], "--temperature"),
        (["--backend", "jetstream", "--no-ignore-eos"], "--ignore-eos"),
        (["--backend", "openai"], "--base-url"),
        (["--base-url", "http://x"], "--backend openai"),
    ]:
        assert main([*base, *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_jetstream_token_prompts_carry_their_own_bos() -> None:
    """Token-id prompts are the whole prompt: has_bos keeps the server from adding one."""
    from jserve.bench.datasets import BenchRequest
    from jserve.bench.serve import _send

    class Recorder:
        def __init__(self) -> None:
            self.has_bos: list[bool] = []

        async def decode(self, prompt, *, has_bos, **kwargs):
            self.has_bos.append(has_bos)
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None)

    client = Recorder()
    args = argparse.Namespace(backend="jetstream", request_timeout=1.0)
    for prompt in ([5, 6, 7], "All:"):
        record = asyncio.run(_send(client, args, BenchRequest(prompt, 3, 4)))
        assert not record.success
    assert client.has_bos == [True, False]  # text: the server tokenizes, adding BOS
