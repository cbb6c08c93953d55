"""bin/bench-loop --smoke: the engine, the pure-JAX loop and their agreement, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(420)
def test_smoke_json_and_tokens_match(tmp_path) -> None:
    out = tmp_path / "loop.json"
    cmd = [sys.executable, os.path.join(ROOT, "bin", "bench-loop"), "--smoke", "--no-transformers"]
    proc = subprocess.run(
        [*cmd, "--json", str(out)], capture_output=True, text=True, timeout=360, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["transformers"] is None
    assert r["model"]["num_params"] > 0 and r["model"]["dtype"] == "float32"
    assert [row["batch_size"] for row in r["results"]] == [1, 2]
    for row in r["results"]:
        assert row["output_tokens"] == row["batch_size"] * r["output_len"]
        for name in ("engine", "loop"):
            s = row[name]
            assert len(s["runs"]) == r["repeats"]
            assert 0 < s["min"] <= s["median"] <= s["max"]
        assert row["engine_vs_loop"] == pytest.approx(
            row["engine"]["median"] / row["loop"]["median"]
        )
        assert "engine_vs_transformers" not in row
        m = row["loop_tokens_match_engine"]
        assert m["match"], m
        assert m["sequences_equal"] == m["sequences"] == row["batch_size"] * r["repeats"]
    assert "engine/loop" in proc.stdout
