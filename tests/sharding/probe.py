"""Runs a probe script in a fresh interpreter and reads back its result.

Multi-device tests run their cases in a subprocess because the virtual device
count (``--xla_force_host_platform_device_count``) is fixed when JAX starts. A
probe prints one line ``RESULT<json>``; this returns the parsed JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def run_probe(
    script: str, *args: str, timeout: float = 500, env: dict[str, str] | None = None
) -> Any:
    """``python -c script *args`` with this tree on the path (and ``env`` added); fails
    the test with the probe's stderr if it exits non-zero."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})},
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])
