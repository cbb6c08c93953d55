"""Ctrl-C during start-up: leave at once with one line and exit status 130.

    with exit_on_sigint("start-up"):
        engine = build_engine(args)      # loading, compiling: minutes inside XLA

Start-up spends its time inside XLA calls, where Python's own SIGINT handling
waits until the call returns; a KeyboardInterrupt unwinding while XLA's
threads still compile crashed the interpreter on its way out (SIGSEGV, no
message), and one raised inside a callback of jax's import was swallowed
("Exception ignored") so that the server started anyway. So inside the block
SIGINT is answered at the C level: Python's signal handler writes the signal
number to a wakeup pipe at once, a watcher thread reads it, prints one line
and ends the process with ``os._exit(130)``, skipping the interpreter's
teardown (start-up holds nothing that needs it: no client has been answered
yet). The Python-level handler does the same, for a main thread that gets
there first. Outside the block SIGINT is as before.

The command line's own imports (jax, a second or more) are covered too:
``jserve/__init__`` imports this module first thing, and importing it turns
the guard on in a process started as the ``jserve`` command (only there);
its ``main`` turns it off once the options are parsed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

EXIT_STATUS = 130  # a shell's status for a command ended by SIGINT (128 + 2)
CLI_MODULES = frozenset({"jserve", "jserve.cli.main", "jserve.server.cli"})
_OPTIONS_WITH_VALUES = frozenset({"-W", "-X"})  # python's own, before the script or -m
_leaving = threading.Lock()
_guard: _Guard | None = None


def _leave(what: str) -> None:
    _leaving.acquire()  # one line only: whoever comes second waits for the exit
    with contextlib.suppress(OSError):
        os.write(2, f"\njserve: interrupted during {what}; exiting\n".encode())
    os._exit(EXIT_STATUS)


class _Guard:
    def __init__(self, what: str) -> None:
        self.what = what
        self.done = threading.Event()
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        self.previous_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self.watcher = threading.Thread(target=self._watch, name="jserve-sigint", daemon=True)
        self.watcher.start()

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if not self.done.is_set():
            _leave(self.what)

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self.read_fd, 64)
            except OSError:
                return
            if not data or self.done.is_set():
                return
            if signal.SIGINT in data:
                _leave(self.what)

    def release(self) -> None:
        self.done.set()
        signal.set_wakeup_fd(self.previous_fd)
        signal.signal(signal.SIGINT, self.previous)
        os.close(self.write_fd)  # the watcher reads end-of-file and returns
        self.watcher.join(5)
        os.close(self.read_fd)


def install(what: str = "start-up") -> bool:
    """Turns the guard on (in the main thread only); False if it was on already or
    this is not the main thread."""
    global _guard
    if _guard is not None or threading.current_thread() is not threading.main_thread():
        return False
    _guard = _Guard(what)
    return True


def release() -> None:
    """Turns the guard off: SIGINT is handled as it was before ``install``."""
    global _guard
    if _guard is not None:
        _guard.release()
        _guard = None


@contextlib.contextmanager
def exit_on_sigint(what: str = "start-up") -> Iterator[None]:
    """Inside the block, SIGINT ends the process at once (see the module's notes);
    the guard is off after the block, whoever turned it on."""
    if _guard is not None:
        _guard.what = what
    install(what)
    try:
        yield
    finally:
        release()


def started_as_cli(argv: list[str] | None = None) -> bool:
    """Whether this process is the ``jserve`` command (its script, or ``python -m`` of
    one of its modules), rather than a program that imports jserve."""
    if argv is None:
        argv = list(getattr(sys, "orig_argv", sys.argv))
    args = iter(argv[1:])
    for a in args:
        if a == "-m":
            return next(args, None) in CLI_MODULES
        if a == "-c":
            return False
        if a in _OPTIONS_WITH_VALUES:
            next(args, None)
        elif not a.startswith("-"):
            return os.path.basename(a) == "jserve"
    return False


def guard_cli_imports() -> None:
    """Turns the guard on for the command line's imports, in the ``jserve`` command only."""
    if started_as_cli():
        install("start-up")


guard_cli_imports()
