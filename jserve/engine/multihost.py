"""Serving one model from several processes (hosts), each driving its own devices.

Every process runs the same jitted step over one global mesh (SPMD). Only
process 0 (the leader) runs the scheduler, the engine loop and the server;
before each device call it sends the step's host inputs to the other
processes (followers) over a TCP channel, and each follower issues the same
call with the same inputs. Each process loads only the weight slices of its
own devices.

The channel carries numpy arrays in a small self-describing framing (a JSON
header, then raw buffers): nothing is unpickled, so a message can never run
code.

A lost process is found within seconds, not when JAX's own heartbeat gives up
(about 100 s, then an abort): each follower sends a heartbeat byte up the
channel every ``heartbeat_timeout / 4`` seconds, and the leader's watcher
thread counts a follower lost when its channel closes (the process died) or
stays silent for ``heartbeat_timeout`` seconds (its host is gone), and so does
a follower whose leader's channel closes without a stop. The group cannot go
on without it: the leader calls ``on_peer_lost`` (the server fails its running
requests with UNAVAILABLE and turns NOT_SERVING) and every process then exits
with ``EXIT_PEER_LOST`` and a message, so an orchestrator restarts the group.
JAX's own heartbeat timeout is set well past this one so that it never wins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jserve.engine.inputs import RowWrites, StepPlan
from jserve.engine.llm_engine import LLMEngine
from jserve.engine.runner import ModelRunner, StepHandle
from jserve.errors import ConfigError, EngineUnavailableError

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_TIMEOUT = 10.0  # seconds a follower may stay silent on the channel
EXIT_PEER_LOST = 3  # the exit status of every process of a group that lost one
HEARTBEAT = b"h"  # a follower's heartbeat on the step channel (the leader only counts them)


class PeerLostError(EngineUnavailableError):
    """A process of the multi-host group is gone; the group cannot serve any more."""


def exit_peer_lost(error: BaseException) -> None:
    """Ends this process at once with EXIT_PEER_LOST and one line: its device calls may
    wait forever on the lost peer, and JAX's own shutdown would wait for it too."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    with contextlib.suppress(OSError):
        os.write(2, f"jserve: {error}; exiting so the group can be restarted\n".encode())
    os._exit(EXIT_PEER_LOST)


@dataclasses.dataclass(frozen=True)
class MultiHostConfig:
    coordinator_address: str  # "host:port" of process 0, for jax.distributed
    num_processes: int
    process_id: int
    channel_port: int | None = None  # default: the coordinator's port + 1
    # Seconds of silence on the step channel after which a peer counts as lost.
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    @property
    def channel_address(self) -> tuple[str, int]:
        host, _, port = self.coordinator_address.rpartition(":")
        return host, self.channel_port or int(port) + 1

    @classmethod
    def from_env(cls) -> MultiHostConfig | None:
        """Reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID if all are set."""
        env = os.environ
        keys = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
        if not all(k in env for k in keys):
            return None
        return cls(env[keys[0]], int(env[keys[1]]), int(env[keys[2]]))

    def validate(self) -> MultiHostConfig:
        if ":" not in self.coordinator_address:
            raise ConfigError(
                f"coordinator address must be host:port, got {self.coordinator_address!r}"
            )
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise ConfigError(f"process id {self.process_id} must be in [0, {self.num_processes})")
        if not 0.5 <= self.heartbeat_timeout <= 3600:
            raise ConfigError(
                f"--heartbeat-timeout must be 0.5-3600 seconds, got {self.heartbeat_timeout}"
            )
        return self


def initialize(mh: MultiHostConfig) -> None:
    """Joins the JAX distributed runtime (before any other JAX call)."""
    mh.validate()
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        # Cross-process collectives on CPU go through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=mh.coordinator_address,
        num_processes=mh.num_processes,
        process_id=mh.process_id,
        # Past the step channel's own timeout, so a lost peer is ours to report.
        heartbeat_timeout_seconds=int(2 * mh.heartbeat_timeout + 10),
    )


# -- framing ------------------------------------------------------------------


def _send(sock: socket.socket, kind: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    fields = {k: [str(v.dtype), list(v.shape)] for k, v in arrays.items()}
    header = json.dumps({"kind": kind, "fields": fields, "meta": meta}).encode()
    body = b"".join(np.ascontiguousarray(v).tobytes() for v in arrays.values())
    sock.sendall(struct.pack("!II", len(header), len(body)) + header + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("the leader closed the step channel")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> tuple[str, dict[str, np.ndarray], dict]:
    hlen, blen = struct.unpack("!II", _recv_exact(sock, 8))
    header = json.loads(_recv_exact(sock, hlen))
    body = memoryview(_recv_exact(sock, blen))
    arrays, offset = {}, 0
    for name, (dtype, shape) in header["fields"].items():
        dt = np.dtype(dtype)
        size = int(np.prod(shape)) * dt.itemsize
        arrays[name] = np.frombuffer(body[offset : offset + size], dt).reshape(shape).copy()
        offset += size
    return header["kind"], arrays, header["meta"]


def _encode_plan(plan: StepPlan) -> tuple[dict[str, np.ndarray], dict]:
    arrays = {"packed": plan.packed}
    if plan.copies is not None:
        arrays["copies"] = plan.copies
    if plan.bitmask is not None:
        arrays["bitmask"] = plan.bitmask
    if plan.logit_bias is not None:
        arrays["logit_bias"] = plan.logit_bias
    for name in ("table_writes", "history_writes"):
        w = getattr(plan, name)
        if w is not None:
            arrays[f"{name}.rows"], arrays[f"{name}.values"] = w.rows, w.values
    meta = dict(shape=list(plan.shape), num_rows=plan.num_rows, want_logprobs=plan.want_logprobs)
    return arrays, meta


def _decode_plan(arrays: dict[str, np.ndarray], meta: dict) -> StepPlan:
    def writes(name: str) -> RowWrites | None:
        if f"{name}.rows" not in arrays:
            return None
        return RowWrites(arrays[f"{name}.rows"], arrays[f"{name}.values"])

    return StepPlan(
        shape=tuple(meta["shape"]),
        packed=arrays["packed"],
        num_rows=meta["num_rows"],
        want_logprobs=meta["want_logprobs"],
        copies=arrays.get("copies"),
        bitmask=arrays.get("bitmask"),
        logit_bias=arrays.get("logit_bias"),
        table_writes=writes("table_writes"),
        history_writes=writes("history_writes"),
    )


# -- leader -------------------------------------------------------------------


class BroadcastingRunner(ModelRunner):
    """The leader's runner: every plan is first sent to the followers, which replay it.

    A watcher thread reads the followers' heartbeats; when one is lost it calls
    ``on_peer_lost`` (set by whoever serves; by default the process exits), and
    every later device call raises PeerLostError.
    """

    can_reset = False  # the followers' device state cannot be reset with it

    def __init__(
        self, *args: Any, num_pages: int, mh: MultiHostConfig, timeout: float = 300.0, **kw: Any
    ) -> None:
        # Followers build their runners only after the hello, and creating the
        # device arrays takes every process: connect first.
        self._server = socket.create_server(mh.channel_address, reuse_port=False)
        self._server.settimeout(timeout)
        self._peers = []
        for _ in range(mh.num_processes - 1):
            conn, _ = self._server.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(mh.heartbeat_timeout)  # a send to a gone host fails in time
            self._peers.append(conn)
        self.heartbeat_timeout = mh.heartbeat_timeout
        self.lost: PeerLostError | None = None
        self._lost = threading.Event()
        self.on_peer_lost: Callable[[PeerLostError], None] = exit_peer_lost
        self._closing = threading.Event()
        self._broadcast("hello", {}, {"num_pages": num_pages})
        self._watcher = threading.Thread(target=self._watch, name="jserve-peers", daemon=True)
        self._watcher.start()
        super().__init__(*args, num_pages=num_pages, **kw)

    def _watch(self) -> None:
        last = {peer: time.monotonic() for peer in self._peers}
        while not self._closing.is_set() and self.lost is None:
            ready, _, _ = select.select(list(last), [], [], self.heartbeat_timeout / 4)
            now = time.monotonic()
            for peer in ready:
                try:
                    data = peer.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    return self._lose(peer, "closed the step channel (the process ended)")
                last[peer] = now
            for peer, seen in last.items():
                if now - seen > self.heartbeat_timeout:
                    return self._lose(
                        peer, f"sent no heartbeat for {self.heartbeat_timeout:g} seconds"
                    )
        return None

    def _lose(self, peer: socket.socket, why: str) -> None:
        if self._closing.is_set():
            return
        pid = self._peers.index(peer) + 1
        self.lost = PeerLostError(f"lost multi-host process {pid}: it {why}")
        self._lost.set()
        logger.error("%s", self.lost)
        self.on_peer_lost(self.lost)

    def _blame(self, error: Exception) -> Exception:
        """A failed device call's error, or PeerLostError if a peer is found lost within a
        second (a collective with a dead process fails about when its channel closes)."""
        if self._lost.wait(1.0) and self.lost is not None:
            return self.lost
        return error

    def _broadcast(self, kind: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        if self.lost is not None:
            raise self.lost
        for i, peer in enumerate(self._peers):
            try:
                _send(peer, kind, arrays, meta)
            except OSError as e:
                raise PeerLostError(f"lost multi-host process {i + 1}: {e}") from e

    def dispatch(self, plan: StepPlan) -> StepHandle:
        self._broadcast("step", *_encode_plan(plan))
        try:
            return super().dispatch(plan)
        except Exception as e:
            raise self._blame(e) from e

    def fetch(self, handle: StepHandle) -> Any:
        try:
            return super().fetch(handle)
        except Exception as e:
            raise self._blame(e) from e

    def warmup(self, progress: bool = True) -> int:
        self._broadcast("warmup", {}, {})
        return super().warmup(progress)

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._broadcast("stop", {}, {})
        for peer in self._peers:
            peer.close()
        self._server.close()


# -- follower -----------------------------------------------------------------


def connect(mh: MultiHostConfig, timeout: float = 300.0) -> tuple[socket.socket, int]:
    """Connects to the leader's channel; returns (socket, the leader's num_pages)."""
    deadline = time.monotonic() + timeout
    while True:  # the leader opens its channel only once its engine exists
        try:
            sock = socket.create_connection(mh.channel_address, timeout=timeout)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    kind, _, meta = _recv(sock)
    if kind != "hello":
        raise ConnectionError(f"expected hello from the leader, got {kind!r}")
    return sock, int(meta["num_pages"])


def _send_heartbeats(sock: socket.socket, interval: float, stopped: threading.Event) -> None:
    while not stopped.wait(interval):
        try:
            sock.sendall(HEARTBEAT)
        except OSError as e:  # the leader is gone, even if its device calls hang us
            if not stopped.is_set():
                exit_peer_lost(PeerLostError(f"lost the multi-host leader: {e}"))
            return


def start_heartbeats(sock: socket.socket, heartbeat_timeout: float) -> threading.Event:
    """Sends the leader a heartbeat every ``heartbeat_timeout / 4`` seconds from a
    thread of its own, until the returned event is set."""
    stopped = threading.Event()
    threading.Thread(
        target=_send_heartbeats,
        args=(sock, heartbeat_timeout / 4, stopped),
        name="jserve-heartbeat",
        daemon=True,
    ).start()
    return stopped


def follow(runner: ModelRunner, sock: socket.socket, record: list | None = None) -> None:
    """Repeats the leader's device calls until it says stop; raises PeerLostError if
    the leader goes away without.

    With ``record``, each step's sampled tokens are appended to it (for checks).
    """
    while True:
        try:
            kind, arrays, meta = _recv(sock)
        except (ConnectionError, OSError) as e:
            raise PeerLostError(f"lost the multi-host leader: {e}") from e
        if kind == "stop":
            return
        if kind == "warmup":
            runner.warmup(progress=False)
        elif kind == "step":
            handle = runner.dispatch(_decode_plan(arrays, meta))
            if record is not None:
                record.append(runner.fetch(handle).tokens)
        else:
            raise ConnectionError(f"unknown message {kind!r} on the step channel")


def start_engine(
    model: Any, ecfg: Any, mh: MultiHostConfig, warmup: bool = True, record: list | None = None
) -> Any:
    """On the leader: an LLMEngine whose device calls reach every process. On a
    follower: repeats the leader's calls until it stops, then returns None
    (``record`` collects each step's sampled tokens there, see ``follow``)."""
    if ecfg.enable_lora:
        raise ConfigError(
            "enable_lora does not run across several hosts yet (adapter slots are written "
            "by the leader alone); serve LoRA adapters from one host"
        )
    if mh.is_leader:
        runner_cls = functools.partial(BroadcastingRunner, mh=mh)
        return LLMEngine(model, ecfg, warmup=warmup, runner_cls=runner_cls)
    sock, num_pages = connect(mh)
    stopped = start_heartbeats(sock, mh.heartbeat_timeout)  # building the engine takes a while
    try:
        engine = LLMEngine(model, dataclasses.replace(ecfg, num_pages=num_pages), warmup=False)
        follow(engine.runner, sock, record)
    finally:
        stopped.set()
    return None
