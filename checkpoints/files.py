"""Opening the files of a model directory: regular files only, JSON read within limits.

A model directory comes from wherever the user got it. A FIFO or a device in
place of a file blocks a read or never ends it; a symlink loop or a dangling
link surfaces as an OSError that names no file; a config.json nested
thousands deep exhausts the JSON parser's recursion. These helpers turn each
case into the caller's error class (``CheckpointError`` for weights,
``ConfigError`` for configs and tokenizers), naming the file and what it is.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import Any

from checkpoints.errors import CheckpointError

# A config, generation config or shard index is a few KiB to a few MiB; anything
# far larger is not one (and reading it whole would take the host's memory).
MAX_JSON_BYTES = 64 << 20

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """None if ``path`` is a regular file (after following symlinks), else what it is
    instead: "missing", "a symlink loop", "a FIFO (named pipe)", ..."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"a symlink to {os.readlink(path)!r}, which does not exist"
        return "missing"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        return f"unreadable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "not a regular file"


def check_file(
    path: str | os.PathLike[str],
    error: type[Exception] = CheckpointError,
    required: bool = True,
) -> bool:
    """True if ``path`` is a regular file. False if it does not exist and is not
    ``required``; raises ``error`` naming what it is otherwise."""
    problem = file_problem(path)
    if problem is None:
        return True
    if problem == "missing":
        if not required:
            return False
        raise error(f"{os.fspath(path)} not found")
    raise error(
        f"{os.fspath(path)} is {problem}, not a regular file; replace it with the file "
        "itself (a copy or a link to one)"
    )


def read_json(
    path: str | os.PathLike[str],
    error: type[Exception] = CheckpointError,
    expect: type = dict,
    max_bytes: int = MAX_JSON_BYTES,
    required: bool = True,
) -> Any:
    """The parsed contents of a JSON file that must hold an ``expect`` (an object by
    default); every way it can be wrong raises ``error`` naming the file. None if the
    file does not exist and is not ``required``."""
    path = os.fspath(path)
    if not check_file(path, error, required):
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror}") from None
    if len(data) > max_bytes:
        raise error(f"{path} is larger than {max_bytes >> 20} MiB; it is not a config file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(
            f"{path} is not UTF-8 text (byte {e.start} is {data[e.start : e.start + 1]!r}); "
            "it looks like a binary file, not JSON"
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{path} is nested too deeply to be a config file") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise error(f"{path} holds a value that cannot be read: {e}") from None
    if not isinstance(value, expect):
        want = {dict: "a JSON object", list: "a JSON array"}.get(expect, expect.__name__)
        raise error(f"{path} must hold {want}, but holds {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"
