"""Two processes on one machine serve requests together and agree on every token."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(300)

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    from jserve.engine.multihost import MultiHostConfig, initialize
    model_dir, port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mh = MultiHostConfig(f"127.0.0.1:{port}", 2, pid)
    initialize(mh)
    from jserve.engine.config import EngineConfig
    from jserve.engine.multihost import start_engine
    from jserve.model_loader import load_model
    from jserve.sampling_params import SamplingParams
    from sharding import ParallelConfig

    # Tensor parallel over both processes' devices: each holds half of every layer.
    model = load_model(model_dir, "float32", ParallelConfig(tensor_parallel_size=2))
    local = sum(s.data.size for x in [model.params["layers"][0]["wqkv"]]
                for s in x.addressable_shards)
    ecfg = EngineConfig(page_size=4, max_num_seqs=4, max_num_batched_tokens=32)
    steps = []
    engine = start_engine(model, ecfg, mh, warmup=False, record=steps)
    if mh.is_leader:
        fetch = engine.runner.fetch
        def recording_fetch(handle):
            res = fetch(handle)
            steps.append(res.tokens)
            return res
        engine.runner.fetch = recording_fetch
        prompts = [[5, 17, 200, 3, 9], [42], list(range(1, 30))]
        sp = SamplingParams(max_tokens=10, temperature=0.7, seed=3, ignore_eos=True)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, sp)
        outs = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                outs.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
        engine.runner.close()
        print("RESULT" + json.dumps({"steps": steps, "outputs": outs, "local": local}))
    else:
        print("RESULT" + json.dumps({"steps": steps, "local": local}))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_on_every_token(llama_dir: str) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, llama_dir, str(port), str(pid)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for pid in (0, 1)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        line = next(x for x in out.splitlines() if x.startswith("RESULT"))
        results.append(json.loads(line[len("RESULT") :]))
    leader, follower = results
    assert len(leader["steps"]) > 5
    assert leader["steps"] == follower["steps"]
    assert sorted(leader["outputs"]) == ["0", "1", "2"]
    assert all(len(v) == 10 for v in leader["outputs"].values())
    # Each process holds only its half of the fused QKV weight (64 x 2 x 4 x 16 in all).
    assert leader["local"] == follower["local"] == 64 * 2 * 4 * 16 // 2
