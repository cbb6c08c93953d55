"""The packages depend one way: jserve imports sharding and checkpoints, never the reverse."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import jserve
from checkpoints.errors import CheckpointError
from sharding.errors import ConfigError, JserveError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("package", ["sharding", "checkpoints"])
def test_lower_package_imports_alone_without_jserve(package: str) -> None:
    """In a fresh interpreter the package imports (no cycle) and loads no jserve module."""
    code = (
        "import sys\n"
        f"import {package}\n"
        "loaded = sorted(m for m in sys.modules if m == 'jserve' or m.startswith('jserve.'))\n"
        "print(','.join(loaded))\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"{package} imported {proc.stdout.strip()}"


def test_lower_errors_are_jserve_errors() -> None:
    assert jserve.ConfigError is ConfigError
    assert jserve.CheckpointError is CheckpointError
    assert jserve.JserveError is JserveError
    assert issubclass(CheckpointError, jserve.JserveError)
    assert issubclass(ConfigError, ValueError) and issubclass(CheckpointError, ValueError)
