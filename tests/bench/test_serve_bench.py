"""`jserve bench serve` against a real server on loopback, over both APIs."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from jserve.cli.main import main
from jserve.engine.async_engine import AsyncLLMEngine
from jserve.server.app import start_server
from tests.engine.helpers import make_engine

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server_port(tok_model_dir: str):
    aengine = AsyncLLMEngine(make_engine(tok_model_dir, max_num_seqs=8, max_num_batched_tokens=64))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    handle = asyncio.run_coroutine_threadsafe(start_server(aengine, port=0), loop).result(120)
    yield handle.port
    asyncio.run_coroutine_threadsafe(handle.stop(grace=5), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    aengine.shutdown()


@pytest.mark.parametrize("backend", ["jserve", "jetstream"])
def test_bench_serve_json_is_consistent(server_port: int, backend: str, tmp_path) -> None:
    out = tmp_path / "serve.json"
    args = ["bench", "serve", "--port", str(server_port), "--backend", backend]
    args += ["--num-prompts", "10", "--random-input-len", "12", "--random-output-len", "8"]
    args += ["--request-rate", "50", "--max-concurrency", "4", "--seed", "1", "--vocab-size", "300"]
    args += ["--goodput", "ttft:60000", "tpot:60000", "--disable-tqdm"]
    plots = tmp_path / "plots"
    assert main([*args, "--result-filename", str(out), "--plot-dir", str(plots)]) == 0
    assert {p.name for p in plots.iterdir()} == {"latency_cdf.png", "throughput.png"}
    r = json.loads(out.read_text())
    assert r["completed"] == 10 and r["failed"] == 0
    assert sum(r["input_lens"]) == r["total_input_tokens"]
    assert sum(r["output_lens"]) == r["total_output_tokens"]
    if backend == "jserve":  # ignore_eos: exactly the asked-for lengths
        assert r["total_output_tokens"] == 80
    for name in ("ttft", "tpot", "itl", "e2el"):
        ps = [r[f"p{p}_{name}_ms"] for p in (50, 90, 99)]
        assert ps == sorted(ps), name
        assert r[f"mean_{name}_ms"] > 0
    assert r["mean_e2el_ms"] >= r["mean_ttft_ms"]
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])
    assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration"])
