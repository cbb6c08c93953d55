"""``jserve serve``: the gRPC service (jserve.v1 and JetStream APIs) on a model, and with
``--http-port`` the OpenAI-compatible HTTP API beside it on the same engine.

With ``--num-processes N`` the model spans several hosts: every process runs
``jserve serve`` with the same options and its own ``--process-id``; process
0 serves, the others repeat its device steps. When one process is lost (see
``--heartbeat-timeout``), running requests fail with UNAVAILABLE, health turns
NOT_SERVING, and every process exits with status 3 so the group can be restarted.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import sys
import threading
from typing import Any

from jserve.cli.engine_args import (
    add_engine_arguments,
    add_model_arguments,
    build_engine,
    engine_config_from_args,
    load_model_from_args,
)
from jserve.cli.interrupt import exit_on_sigint

# Seconds between losing a process of the group and exiting: the server's answers
# to the failed requests, and its NOT_SERVING, get out first.
PEER_LOST_EXIT_DELAY = 1.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jserve.server.cli import add_serve_arguments

    add_model_arguments(parser)
    add_engine_arguments(parser)
    g = parser.add_argument_group("multi-host")
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=1)
    g.add_argument("--process-id", type=int, default=0)
    g.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="a process of the group that is silent this long counts as lost, and every "
        "process then exits (status 3) so the group can be restarted (default: 10)",
    )
    add_serve_arguments(parser)
    parser.set_defaults(func=run)


def check_serve_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the server's options (ports, TLS files, token...), or None."""
    from jserve.cli.engine_args import parse_lora_modules
    from jserve.errors import ConfigError
    from jserve.server.cli import config_from_args

    try:
        config_from_args(args).validate()
        # --lora-modules entries are checked for form here; the adapters when they load.
        for req in parse_lora_modules(args.lora_modules):
            if req.lora_name == args.served_model_name:
                raise ConfigError(
                    f"--lora-modules adapter {req.lora_name!r} has the --served-model-name; "
                    "requests naming it would reach the base model: rename the adapter"
                )
    except (ConfigError, ValueError, OSError) as e:
        return str(e)
    return None


def run(args: argparse.Namespace) -> int:
    from jserve.engine.async_engine import AsyncLLMEngine
    from jserve.server.cli import run_serve

    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("jax").setLevel(logging.WARNING)
    error = check_serve_arguments(args)  # before the model loads: minutes on a large one
    if error is not None:
        print(f"jserve: {error}", file=sys.stderr)
        return 2
    # Ctrl-C while loading or compiling: one line and status 130, at any moment.
    with exit_on_sigint("start-up"):
        engine = _start_engine(args)
    if engine is None:  # a follower: the leader has stopped
        return 0
    aengine = AsyncLLMEngine(engine)
    if hasattr(engine.runner, "on_peer_lost"):  # the leader of a multi-host group
        engine.runner.on_peer_lost = functools.partial(_peer_lost, aengine)
    try:
        return run_serve(args, aengine)
    finally:
        close = getattr(engine.runner, "close", None)
        if close is not None:
            close()


def _peer_lost(aengine: Any, error: Exception) -> None:
    """A process of the group is gone: fail the running requests (UNAVAILABLE), let
    the server answer them and turn NOT_SERVING, then exit for a restart."""
    from jserve.engine import multihost

    aengine.fail(error)
    threading.Timer(PEER_LOST_EXIT_DELAY, multihost.exit_peer_lost, (error,)).start()


def _start_engine(args: argparse.Namespace) -> Any:
    """The engine to serve (None in a multi-host follower, once the leader has stopped)."""
    from jserve.engine import multihost

    if args.num_processes > 1 or args.coordinator_address:
        mh = multihost.MultiHostConfig(
            args.coordinator_address or "", args.num_processes, args.process_id
        )
    else:
        mh = multihost.MultiHostConfig.from_env()
    if mh is None:
        return build_engine(args)
    if args.heartbeat_timeout is not None:
        mh = dataclasses.replace(mh, heartbeat_timeout=args.heartbeat_timeout)
    multihost.initialize(mh)
    model = load_model_from_args(args)
    try:
        engine = multihost.start_engine(model, engine_config_from_args(args), mh, args.warmup)
    except multihost.PeerLostError as e:  # a follower whose leader is gone
        multihost.exit_peer_lost(e)
    if engine is not None:
        print(f"jserve: {engine.describe()}", file=sys.stderr, flush=True)
    return engine
