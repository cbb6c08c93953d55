"""The HTTP API's share of the server's TLS, token, queue limit and graceful shutdown,
on a real ``jserve serve`` process."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time

import httpx
import openai
import pytest

from jserve.server.client import Client, generate_request
from jserve.server.proto import generation_pb2 as pb
from tests.server.helpers import metric
from tests.server.openai_process import ENGINE_ARGS, ServeProcess
from tests.server.test_security import _self_signed_cert

pytestmark = pytest.mark.timeout(300)
TOKEN = "s3cret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tuple[str, str, ssl.SSLContext, ssl.SSLContext]:
    """(certificate, key, a context trusting it, a context trusting another certificate)"""
    d = tmp_path_factory.mktemp("tls")
    cert, key = _self_signed_cert(d)
    (d / "other").mkdir()
    other, _ = _self_signed_cert(d / "other")
    return (
        cert,
        key,
        ssl.create_default_context(cafile=cert),
        ssl.create_default_context(cafile=other),
    )


@pytest.fixture(scope="module")
def server(tok_model_dir: str, certs, tmp_path_factory):
    cert, key, trusting, _ = certs
    d = tmp_path_factory.mktemp("openai-tls")
    (d / "token").write_text(TOKEN + "\n")
    args = ["--model", tok_model_dir, *ENGINE_ARGS, "--max-waiting", "1", "--grace-period", "60"]
    args += ["--tls-cert", cert, "--tls-key", key, "--auth-token-file", str(d / "token")]
    proc = ServeProcess(str(d / "server.log"), args, verify=trusting).start()
    assert proc.url.startswith("https://")
    yield proc
    proc.stop()


def test_token_is_required_except_for_health(server: ServeProcess, certs) -> None:
    cert = certs[2]
    with httpx.Client(base_url=server.url, verify=cert, timeout=60) as http:
        before = metric(http.get("/metrics", headers=AUTH).text, "jserve_auth_failures_total")
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
            for method, path in [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                 ("GET", "/v1/models"), ("GET", "/metrics"),
                                 ("POST", "/tokenize")]:  # fmt: skip
                r = http.request(method, path, json={"prompt": "x"}, headers=headers)
                assert r.status_code == 401, (path, headers)
                err = r.json()["error"]
                assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"] == "Bearer"
        assert http.get("/health").status_code == 200
        after = metric(http.get("/metrics", headers=AUTH).text, "jserve_auth_failures_total")
        assert after - before == 15  # shared with the gRPC server's counter
    # The official client sends its api_key as the bearer token.
    with httpx.Client(verify=cert) as hc:
        client = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key=TOKEN, http_client=hc, max_retries=0
        )
        model = client.models.list().data[0].id
        r = client.completions.create(model=model, prompt="All:", max_tokens=3)
        assert r.usage.completion_tokens == 3
        wrong = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key="nope", http_client=hc, max_retries=0
        )
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()


def test_tls(server: ServeProcess, certs) -> None:
    other = certs[3]
    with pytest.raises(httpx.ConnectError):  # a client that trusts another certificate
        httpx.get(f"{server.url}/health", verify=other)
    plain = server.url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):  # plaintext to the TLS port
        httpx.get(f"{plain}/health", timeout=5)


def test_full_queue_answers_429(server: ServeProcess, certs) -> None:
    async def main():
        async with httpx.AsyncClient(
            base_url=server.url, verify=certs[2], headers=AUTH, timeout=120
        ) as c:
            body = {"prompt": "All:", "max_tokens": 40, "ignore_eos": True}
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(12)))

    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert 429 in codes and set(codes) <= {200, 429}, codes
    err = next(r for r in responses if r.status_code == 429).json()["error"]
    assert (err["type"], err["code"]) == ("rate_limit_error", "queue_full")
    assert "queue is full" in err["message"]


def test_sigterm_lets_http_and_grpc_streams_finish(server: ServeProcess, certs) -> None:
    """Runs last: it stops the module's server."""
    pem, cert = certs[0], certs[2]
    tokens = 200
    body = {"prompt": "All:", "max_tokens": tokens, "ignore_eos": True, "stream": True}
    got: dict[str, object] = {}
    first = threading.Event()
    grpc_first = threading.Event()  # both streams run before the signal

    def http_stream() -> None:
        events = []
        with (
            httpx.Client(base_url=server.url, verify=cert, headers=AUTH, timeout=120) as c,
            c.stream("POST", "/v1/completions", json=body) as r,
        ):
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first.set()
        got["http"] = events

    def grpc_stream() -> None:
        async def main():
            with open(pem, "rb") as f:
                root = f.read()
            async with Client(f"localhost:{server.grpc_port}", auth_token=TOKEN,
                              root_certificates=root) as g:  # fmt: skip
                req = generate_request("All:", max_tokens=tokens, ignore_eos=True)
                ids, reasons = [], []
                async for msg in g.generation.Generate(req, metadata=g.metadata):
                    grpc_first.set()
                    ids.extend(msg.token_ids)
                    if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                        reasons.append(msg.finish_reason)
                return ids, reasons

        got["grpc"] = asyncio.run(main())

    threads = [threading.Thread(target=http_stream), threading.Thread(target=grpc_stream)]
    for t in threads:
        t.start()
    assert first.wait(60) and grpc_first.wait(60)
    server.signal()
    # New connections are refused soon after, while the running streams go on.
    deadline = time.monotonic() + 10
    while True:
        try:
            httpx.get(f"{server.url}/health", verify=cert, timeout=2)
        except httpx.ConnectError:
            break
        assert time.monotonic() < deadline, "the HTTP port still accepts connections"
        time.sleep(0.05)
    for t in threads:
        t.join(120)
    events = got["http"]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    grpc_ids, grpc_reasons = got["grpc"]
    assert grpc_reasons == [pb.FINISH_REASON_LENGTH] and len(grpc_ids) == tokens
    assert server.proc.wait(timeout=60) == 0
    server.wait_for(r"SIGTERM: draining 2 running request", 1)
