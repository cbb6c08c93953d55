"""bin/bench-attention runs end to end on CPU with tiny shapes (--smoke)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_attention_smoke(tmp_path) -> None:
    out_json = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bin", "bench-attention"), "--smoke",
         "--json", str(out_json)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("mode"))
    assert "KV TB/s" in header and "TFLOP/s" in header
    for mode in ("decode", "prefill", "mixed"):
        assert any(line.startswith(mode) and "ragged_paged_attention" in line for line in lines), (
            proc.stdout
        )
    results = json.loads(out_json.read_text())["results"]
    ours = [r for r in results if r["impl"].startswith("ragged_paged_attention")]
    assert len(ours) == 3 and all("seconds" in r for r in ours)
    assert all(r["max_abs_err"] < 1e-4 for r in ours), "kernel disagrees with the xla baseline"
