"""The committed stubs match the .proto files, and the JetStream format is JetStream's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from google.protobuf.descriptor import FieldDescriptor as F

from jserve.server.proto import generation_pb2, jetstream_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(60)
def test_committed_stubs_are_up_to_date() -> None:
    pytest.importorskip("grpc_tools")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bin", "gen-protos"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _fields(message) -> dict[str, tuple]:
    out = {}
    for f in message.DESCRIPTOR.fields:
        oneof = f.containing_oneof.name if f.containing_oneof else None
        out[f.name] = (f.number, f.type, f.is_repeated, oneof)
    return out


def test_jetstream_messages_have_jetstream_field_numbers_and_types() -> None:
    js = jetstream_pb2
    assert js.DESCRIPTOR.package == "jetstream_proto"
    assert _fields(js.DecodeRequest) == {
        "max_tokens": (4, F.TYPE_INT32, False, None),
        "text_content": (5, F.TYPE_MESSAGE, False, "content"),
        "token_content": (6, F.TYPE_MESSAGE, False, "content"),
        "metadata": (7, F.TYPE_MESSAGE, False, "metadata_optional"),
        "num_samples": (8, F.TYPE_INT32, False, None),
        "has_bos": (9, F.TYPE_BOOL, False, None),
    }
    assert _fields(js.DecodeRequest.TextContent) == {"text": (1, F.TYPE_STRING, False, None)}
    assert _fields(js.DecodeRequest.TokenContent) == {"token_ids": (1, F.TYPE_INT32, True, None)}
    assert _fields(js.DecodeRequest.Metadata) == {"start_time": (1, F.TYPE_FLOAT, False, None)}
    assert _fields(js.DecodeResponse) == {
        "initial_content": (2, F.TYPE_MESSAGE, False, "content"),
        "stream_content": (3, F.TYPE_MESSAGE, False, "content"),
    }
    assert _fields(js.DecodeResponse.StreamContent) == {"samples": (1, F.TYPE_MESSAGE, True, None)}
    assert _fields(js.DecodeResponse.StreamContent.Sample) == {
        "text": (1, F.TYPE_STRING, False, None),
        "token_ids": (2, F.TYPE_INT32, True, None),
    }
    assert _fields(js.HealthCheckResponse) == {"is_live": (1, F.TYPE_BOOL, False, None)}
    assert _fields(js.HealthCheckRequest) == {}
    service = js.DESCRIPTOR.services_by_name["Orchestrator"]
    assert service.full_name == "jetstream_proto.Orchestrator"
    methods = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in service.methods}
    assert methods == {
        "Decode": ("jetstream_proto.DecodeRequest", "jetstream_proto.DecodeResponse"),
        "HealthCheck": (
            "jetstream_proto.HealthCheckRequest",
            "jetstream_proto.HealthCheckResponse",
        ),
    }
    assert service.methods_by_name["Decode"].server_streaming
    assert not service.methods_by_name["HealthCheck"].server_streaming


def test_jetstream_request_bytes() -> None:
    """A request encoded by hand from JetStream's field numbers parses as expected."""
    wire = bytes.fromhex(
        "2005"  # max_tokens (4, varint) = 5
        "3206" "0a04" "0102037f"  # token_content (6) { token_ids (1, packed) = [1, 2, 3, 127] }
        "4002"  # num_samples (8) = 2
        "4801"  # has_bos (9) = true
    )  # fmt: skip
    req = jetstream_pb2.DecodeRequest.FromString(wire)
    assert req.max_tokens == 5 and req.num_samples == 2 and req.has_bos
    assert list(req.token_content.token_ids) == [1, 2, 3, 127]
    assert req.SerializeToString() == wire


def test_generation_sampling_fields_track_unset() -> None:
    sp = generation_pb2.SamplingParameters(n=0, temperature=0.0)
    assert sp.HasField("n") and sp.HasField("temperature")
    assert not sp.HasField("top_p") and not sp.HasField("seed")
