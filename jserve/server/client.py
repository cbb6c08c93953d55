"""Async client for a jserve server, for tests and benchmarks.

Each streaming call records when every message (and so every token) arrived:

    async with Client("127.0.0.1:50051") as client:
        r = await client.generate("ROMEO:", max_tokens=32, temperature=0)
        print(r.text[0], r.ttft, r.token_times[0])
        r = await client.decode("ROMEO:", max_tokens=32)  # JetStream's Decode
        await client.load_lora_adapter("sql", "/adapters/sql")
        r = await client.generate("SELECT", lora_name="sql", temperature=0)

Times are ``time.perf_counter()`` values; ``start`` is taken just before the
call is made.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jserve.server.auth import bearer_metadata
from jserve.server.proto import generation_pb2 as pb
from jserve.server.proto import generation_pb2_grpc as pb_grpc
from jserve.server.proto import jetstream_pb2 as js
from jserve.server.proto import jetstream_pb2_grpc as js_grpc

FINISH_REASON_NAMES = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


@dataclasses.dataclass
class StreamResult:
    """A finished stream, per sample: tokens, text, finish reason, token arrival times."""

    start: float
    end: float = 0.0
    request_id: str = ""
    token_ids: list[list[int]] = dataclasses.field(default_factory=list)
    text: list[str] = dataclasses.field(default_factory=list)
    token_times: list[list[float]] = dataclasses.field(default_factory=list)
    finish_reasons: list[str | None] = dataclasses.field(default_factory=list)
    stop_reasons: list[str | int | None] = dataclasses.field(default_factory=list)
    logprobs: list[list[pb.PositionLogprobs]] = dataclasses.field(default_factory=list)
    message_times: list[float] = dataclasses.field(default_factory=list)
    message_tokens: list[int] = dataclasses.field(default_factory=list)  # new tokens per message
    usage: pb.Usage | None = None

    def _sample(self, index: int) -> None:
        while len(self.token_ids) <= index:
            self.token_ids.append([])
            self.text.append("")
            self.token_times.append([])
            self.finish_reasons.append(None)
            self.stop_reasons.append(None)
            self.logprobs.append([])

    def add(self, index: int, token_ids: Sequence[int], text: str, now: float) -> None:
        self._sample(index)
        self.token_ids[index].extend(token_ids)
        self.text[index] += text
        self.token_times[index].extend([now] * len(token_ids))

    @property
    def ttft(self) -> float | None:
        """Seconds from the call to the first token of any sample."""
        firsts = [t[0] for t in self.token_times if t]
        return min(firsts) - self.start if firsts else None

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    def inter_token_latencies(self, index: int = 0) -> list[float]:
        t = self.token_times[index] if index < len(self.token_times) else []
        return [b - a for a, b in itertools.pairwise(t)]


def generate_request(
    prompt: str | Sequence[int],
    *,
    request_id: str = "",
    priority: int = 0,
    lora_name: str = "",
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    **sampling: Any,
) -> pb.GenerateRequest:
    """A GenerateRequest; keyword arguments are SamplingParameters fields."""
    req = pb.GenerateRequest(
        request_id=request_id,
        priority=priority,
        lora_name=lora_name,
        sampling=pb.SamplingParameters(
            stop=list(stop), stop_token_ids=list(stop_token_ids), **sampling
        ),
    )
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


def decode_request(
    prompt: str | Sequence[int], *, max_tokens: int = 0, num_samples: int = 0, has_bos: bool = False
) -> js.DecodeRequest:
    req = js.DecodeRequest(max_tokens=max_tokens, num_samples=num_samples, has_bos=has_bos)
    if isinstance(prompt, str):
        req.text_content.text = prompt
    else:
        req.token_content.token_ids.extend(prompt)
    return req


class Client:
    """One channel to a server with stubs for every service it offers."""

    def __init__(
        self,
        target: str,
        *,
        auth_token: str | None = None,
        root_certificates: bytes | None = None,
        tls: bool = False,
        server_name: str | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """``root_certificates`` (PEM) or ``tls=True`` (system roots) make a TLS channel;
        ``server_name`` overrides the name checked against the certificate."""
        opts = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *options,
        ]
        if root_certificates is not None or tls:
            if server_name is not None:
                opts.append(("grpc.ssl_target_name_override", server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.aio.secure_channel(target, creds, options=opts)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=opts)
        self.metadata = bearer_metadata(auth_token) if auth_token else ()
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.jetstream = js_grpc.OrchestratorStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def generate(
        self,
        prompt: str | Sequence[int] | pb.GenerateRequest,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> StreamResult:
        """Streams Generate to the end. kwargs: generate_request's (sampling fields etc.)."""
        req = (
            prompt if isinstance(prompt, pb.GenerateRequest) else generate_request(prompt, **kwargs)
        )
        result = StreamResult(start=time.perf_counter())
        call = self.generation.Generate(req, timeout=timeout, metadata=self.metadata)
        async for msg in call:
            now = time.perf_counter()
            result.message_times.append(now)
            result.message_tokens.append(len(msg.token_ids))
            result.request_id = msg.request_id
            result.add(msg.index, msg.token_ids, msg.text, now)
            result.logprobs[msg.index].extend(msg.logprobs)
            if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                result.finish_reasons[msg.index] = FINISH_REASON_NAMES[msg.finish_reason]
                which = msg.WhichOneof("stop_reason")
                result.stop_reasons[msg.index] = getattr(msg, which) if which else None
            if msg.HasField("usage"):
                result.usage = msg.usage
        result.end = time.perf_counter()
        return result

    async def decode(
        self,
        prompt: str | Sequence[int] | js.DecodeRequest,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> StreamResult:
        """Streams JetStream's Decode to the end. kwargs: decode_request's."""
        req = prompt if isinstance(prompt, js.DecodeRequest) else decode_request(prompt, **kwargs)
        result = StreamResult(start=time.perf_counter())
        call = self.jetstream.Decode(req, timeout=timeout, metadata=self.metadata)
        async for msg in call:
            now = time.perf_counter()
            result.message_times.append(now)
            result.message_tokens.append(sum(len(s.token_ids) for s in msg.stream_content.samples))
            for i, sample in enumerate(msg.stream_content.samples):
                result.add(i, sample.token_ids, sample.text, now)
        result.end = time.perf_counter()
        return result

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        resp = await self.generation.Tokenize(
            pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
            metadata=self.metadata,
        )
        return list(resp.token_ids)

    async def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        resp = await self.generation.Detokenize(
            pb.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens),
            metadata=self.metadata,
        )
        return resp.text

    async def model_info(self) -> pb.GetModelInfoResponse:
        return await self.generation.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata)

    async def load_lora_adapter(self, name: str, path: str) -> pb.LoRAAdapter:
        """Loads a PEFT adapter directory on the server's machine; the server's entry."""
        resp = await self.generation.LoadLoRAAdapter(
            pb.LoadLoRAAdapterRequest(lora_name=name, lora_path=path), metadata=self.metadata
        )
        return resp.adapter

    async def unload_lora_adapter(self, name: str) -> pb.LoRAAdapter:
        resp = await self.generation.UnloadLoRAAdapter(
            pb.UnloadLoRAAdapterRequest(lora_name=name), metadata=self.metadata
        )
        return resp.adapter

    async def health(self, service: str = "") -> str:
        """The standard health status name, e.g. "SERVING"."""
        resp = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def jetstream_is_live(self) -> bool:
        resp = await self.jetstream.HealthCheck(js.HealthCheckRequest(), metadata=self.metadata)
        return resp.is_live
