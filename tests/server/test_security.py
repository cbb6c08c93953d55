"""Token authentication, TLS and reflection."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jserve.engine.async_engine import AsyncLLMEngine
from jserve.server.auth import bearer_metadata
from jserve.server.client import Client
from tests.server.helpers import metric, scrape, serving

pytestmark = pytest.mark.timeout(60)
TOKEN = "s3cret-token"


async def list_services(channel: grpc.aio.Channel, metadata=()) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(metadata=metadata)
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    resp = await call.read()
    await call.done_writing()
    return {s.name for s in resp.list_services_response.service}


def test_token_auth(aengine: AsyncLLMEngine) -> None:
    async def main():
        async with serving(aengine, auth_token=TOKEN, metrics_port=0) as (h, anon):
            target = f"127.0.0.1:{h.port}"
            wrong = Client(target, auth_token="wrong")
            for client in (anon, wrong):
                for call in (
                    lambda c=client: c.generate("All:", max_tokens=2),
                    lambda c=client: c.decode("All:", max_tokens=2),
                    lambda c=client: c.model_info(),
                    lambda c=client: c.tokenize("All:"),
                    lambda c=client: list_services(c.channel, c.metadata),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await call()
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert "token" in e.value.details() or "credentials" in e.value.details()
            await wrong.close()
            # Health checks need no token.
            assert await anon.health() == "SERVING"
            assert await anon.jetstream_is_live()
            async with Client(target, auth_token=TOKEN) as ok:
                r = await ok.generate("All:", max_tokens=2, ignore_eos=True)
                assert len(r.token_ids[0]) == 2
                assert await ok.jetstream_is_live()
                assert "jserve.v1.Generation" in await list_services(ok.channel, ok.metadata)
            assert metric(scrape(h.metrics_port), "jserve_auth_failures_total") == 10

    asyncio.run(main())


def test_reflection_lists_every_service(aengine: AsyncLLMEngine) -> None:
    async def main():
        async with serving(aengine) as (_, c):
            assert await list_services(c.channel) == {
                "jserve.v1.Generation",
                "jetstream_proto.Orchestrator",
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            }

    asyncio.run(main())


def _self_signed_cert(tmp_path) -> tuple[str, str]:
    """A certificate for localhost/127.0.0.1 made now, with `cryptography` or openssl."""
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is available")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
        return cert, key
    pkey = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    crt = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pkey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(pkey, hashes.SHA256())
    )
    with open(cert, "wb") as f:
        f.write(crt.public_bytes(serialization.Encoding.PEM))
    with open(key, "wb") as f:
        f.write(
            pkey.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert, key


def test_tls(aengine: AsyncLLMEngine, tmp_path) -> None:
    cert, key = _self_signed_cert(tmp_path)
    with open(cert, "rb") as f:
        root = f.read()
    (tmp_path / "other").mkdir()
    other_cert, _ = _self_signed_cert(tmp_path / "other")
    with open(other_cert, "rb") as f:
        other_root = f.read()
    assert other_root != root

    async def main():
        async with serving(
            aengine,
            tls_cert=cert,
            tls_key=key,
            auth_token=TOKEN,
            client_kw=dict(root_certificates=root, auth_token=TOKEN),
        ) as (h, c):
            r = await c.generate("All:", max_tokens=3, ignore_eos=True)
            assert len(r.token_ids[0]) == 3
            assert await c.health() == "SERVING"
            # A plaintext client cannot talk to the TLS port.
            async with Client(f"127.0.0.1:{h.port}", auth_token=TOKEN) as plain:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await plain.model_info()
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            async with Client(f"localhost:{h.port}", root_certificates=root) as by_name:
                assert await by_name.health() == "SERVING"
            # A client that trusts another certificate refuses the server's.
            async with Client(f"127.0.0.1:{h.port}", root_certificates=other_root) as wary:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await wary.health()
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


def test_metadata_helper() -> None:
    assert bearer_metadata("t") == (("authorization", "Bearer t"),)
