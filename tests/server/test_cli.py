"""The CLI glue: options to ServerConfig, and errors that end run_serve early."""

from __future__ import annotations

import argparse
import socket

import pytest

from jserve.engine.async_engine import AsyncLLMEngine
from jserve.server.cli import AUTH_TOKEN_ENV, add_serve_arguments, config_from_args, run_serve
from tests.engine.helpers import make_engine
from tests.server.conftest import ENGINE


def parse(*argv: str) -> argparse.Namespace:
    return add_serve_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_defaults_listen_on_loopback_only(monkeypatch) -> None:
    monkeypatch.delenv(AUTH_TOKEN_ENV, raising=False)
    cfg = config_from_args(parse())
    assert (cfg.host, cfg.port, cfg.metrics_port, cfg.auth_token, cfg.tls_cert) == (
        "127.0.0.1",
        50051,
        None,
        None,
        None,
    )
    assert cfg.warmup and cfg.grace_period == 30.0


def test_options(tmp_path, monkeypatch) -> None:
    token = tmp_path / "token"
    token.write_text("abc\n")
    cfg = config_from_args(
        parse(
            "--host", "0.0.0.0", "--port", "6000", "--metrics-port", "0",
            "--auth-token-file", str(token), "--max-request-bytes", "65536",
            "--grace-period", "3", "--served-model-name", "m", "--no-server-warmup",
        )
    )  # fmt: skip
    assert (cfg.host, cfg.port, cfg.metrics_port, cfg.auth_token) == ("0.0.0.0", 6000, 0, "abc")
    assert (cfg.max_request_bytes, cfg.grace_period, cfg.model_name) == (65536, 3.0, "m")
    assert not cfg.warmup
    monkeypatch.setenv(AUTH_TOKEN_ENV, "from-env")
    assert config_from_args(parse()).auth_token == "from-env"


@pytest.mark.timeout(60)
def test_run_serve_refuses_bad_setups(tok_model_dir: str, tmp_path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    aeng = AsyncLLMEngine(make_engine(tok_model_dir, **ENGINE))
    assert run_serve(parse("--tls-cert", str(cert)), aeng) == 2  # a key is missing too
    assert not aeng._thread.is_alive()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        aeng = AsyncLLMEngine(make_engine(tok_model_dir, **ENGINE))
        assert run_serve(parse("--port", str(port)), aeng) == 1
    assert not aeng._thread.is_alive()  # run_serve shut the engine down


def _serve_errors(monkeypatch, capsys, *argv: str) -> str:
    """Runs ``jserve serve ARGV`` with model loading forbidden; returns its error line."""
    from jserve.cli import serve
    from jserve.cli.main import main

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(serve, "build_engine", no_model)
    monkeypatch.setattr(serve, "load_model_from_args", no_model)
    assert main(["serve", *argv]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--port", "70000"), "--port 70000 is not a TCP port"),
        (("--http-port", "65536"), "--http-port 65536 is not a TCP port"),
        (("--metrics-port", "-1"), "--metrics-port -1 is not a TCP port"),
    ],
)
def test_ports_out_of_range_are_refused_before_loading(monkeypatch, capsys, argv, message):
    assert message in _serve_errors(monkeypatch, capsys, *argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--lora-modules", "sql"), "give each adapter as name=path"),
        (("--lora-modules", "a=/x", "a=/y"), "names adapter 'a' twice"),
        (
            ("--served-model-name", "m", "--lora-modules", "m=/x"),
            "adapter 'm' has the --served-model-name",
        ),
    ],
)
def test_bad_lora_modules_are_refused_before_loading(monkeypatch, capsys, argv, message):
    assert message in _serve_errors(monkeypatch, capsys, *argv)


def test_bad_tls_files_are_refused_before_loading(monkeypatch, capsys, tmp_path) -> None:
    from tests.server.test_security import _self_signed_cert

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cert, key = _self_signed_cert(tmp_path / "a")
    _, other_key = _self_signed_cert(tmp_path / "b")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    err = _serve_errors(monkeypatch, capsys, "--tls-cert", cert, "--tls-key", other_key)
    assert "does not match the certificate" in err, err
    err = _serve_errors(monkeypatch, capsys, "--tls-cert", str(junk), "--tls-key", key)
    assert f"--tls-cert {str(junk)!r} holds no usable PEM certificate" in err, err
    err = _serve_errors(monkeypatch, capsys, "--tls-cert", cert, "--tls-key", str(junk))
    assert f"--tls-key {str(junk)!r} holds no usable" in err, err


def test_metrics_stay_on_loopback_when_the_apis_go_public(tok_model_dir: str) -> None:
    """--host 0.0.0.0 publishes the APIs (token-protected), not the token-less metrics."""
    import asyncio

    from jserve.server.app import start_server

    assert config_from_args(parse("--host", "0.0.0.0")).metrics_host == "127.0.0.1"
    assert config_from_args(parse("--metrics-host", "::1")).metrics_host == "::1"
    aeng = AsyncLLMEngine(make_engine(tok_model_dir, **ENGINE))

    async def main():
        h = await start_server(
            aeng, host="0.0.0.0", port=0, metrics_port=0, auth_token="t", warmup=False
        )
        try:
            assert h._metrics_http.httpd.server_address[0] == "127.0.0.1"
        finally:
            await h.stop(0)

    try:
        asyncio.run(main())
    finally:
        aeng.shutdown()
