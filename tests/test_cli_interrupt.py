"""Ctrl-C (SIGINT) at any moment of `jserve serve`'s start-up: one line, exit status 130."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from jserve.cli.interrupt import EXIT_STATUS, started_as_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The embedded model with few buckets, so start-up compiles only a handful of programs.
SMALL = [
    "--max-num-seqs", "2", "--max-num-batched-tokens", "16", "--max-model-len", "64",
    "--page-size", "16", "--port", "0",
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "cli"),
    [
        (["python", "-m", "jserve.server.cli", "--port", "0"], True),
        (["python", "-X", "importtime", "-m", "jserve.server.cli"], True),
        (["python", "/venv/bin/jserve", "serve"], True),
        (["python", "-m", "pytest", "tests"], False),
        (["python", "-c", "import jserve"], False),
        (["python", "my_app.py", "jserve"], False),
        (["python"], False),
    ],
)
def test_only_the_jserve_command_guards_its_imports(argv, cli) -> None:
    assert started_as_cli(argv) is cli


def _serve_and_interrupt(tmp_path, moment: str) -> tuple[int, str, float]:
    """Starts `jserve serve`, sends SIGINT once `moment` (a regex) shows in its output;
    returns the exit status, the output and the seconds from the signal to the exit."""
    log = tmp_path / "serve.log"
    # A fresh compilation cache, so start-up really compiles.
    cmd = [
        sys.executable, "-X", "importtime", "-m", "jserve.server.cli", *SMALL,
        "--compilation-cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not re.search(moment, log.read_text(errors="replace")):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        rc = proc.wait(timeout=30)
        return rc, log.read_text(errors="replace"), time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "moment",
    [
        r"\| +jax\._src\.\w+\n",  # importing jax
        r"compiling step programs",  # the first program is compiling
        r"compiling step programs: +\d+%\|\S* *\| [12]/",  # a program done, the next compiling
    ],
    ids=["imports", "first-compile", "later-compile"],
)
def test_sigint_during_start_up_exits_130_with_one_line(tmp_path, moment: str) -> None:
    rc, out, seconds = _serve_and_interrupt(tmp_path, moment)
    assert rc == EXIT_STATUS, out[-3000:]
    assert out.rstrip().endswith("jserve: interrupted during start-up; exiting"), out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert seconds < 5  # at once, not when the compile in progress returns
