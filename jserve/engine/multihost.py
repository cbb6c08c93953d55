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
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import socket
import struct
import time
from typing import Any

import jax
import numpy as np

from jserve.engine.inputs import RowWrites, StepPlan
from jserve.engine.llm_engine import LLMEngine
from jserve.engine.runner import ModelRunner, StepHandle
from jserve.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MultiHostConfig:
    coordinator_address: str  # "host:port" of process 0, for jax.distributed
    num_processes: int
    process_id: int
    channel_port: int | None = None  # default: the coordinator's port + 1

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
        table_writes=writes("table_writes"),
        history_writes=writes("history_writes"),
    )


# -- leader -------------------------------------------------------------------


class BroadcastingRunner(ModelRunner):
    """The leader's runner: every plan is first sent to the followers, which replay it."""

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
            self._peers.append(conn)
        self._broadcast("hello", {}, {"num_pages": num_pages})
        super().__init__(*args, num_pages=num_pages, **kw)

    def _broadcast(self, kind: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        for peer in self._peers:
            _send(peer, kind, arrays, meta)

    def dispatch(self, plan: StepPlan) -> StepHandle:
        self._broadcast("step", *_encode_plan(plan))
        return super().dispatch(plan)

    def warmup(self, progress: bool = True) -> int:
        self._broadcast("warmup", {}, {})
        return super().warmup(progress)

    def close(self) -> None:
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


def follow(runner: ModelRunner, sock: socket.socket, record: list | None = None) -> None:
    """Repeats the leader's device calls until it says stop (or disconnects).

    With ``record``, each step's sampled tokens are appended to it (for checks).
    """
    while True:
        try:
            kind, arrays, meta = _recv(sock)
        except ConnectionError:
            logger.warning("the leader went away; follower stopping")
            return
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
    if mh.is_leader:
        runner_cls = functools.partial(BroadcastingRunner, mh=mh)
        return LLMEngine(model, ecfg, warmup=warmup, runner_cls=runner_cls)
    sock, num_pages = connect(mh)
    engine = LLMEngine(model, dataclasses.replace(ecfg, num_pages=num_pages), warmup=False)
    follow(engine.runner, sock, record)
    return None
