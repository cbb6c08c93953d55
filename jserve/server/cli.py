"""Command-line glue for the gRPC server.

``add_serve_arguments(parser)`` adds the server's options to any argparse
parser and ``run_serve(args, aengine)`` serves until SIGTERM/SIGINT, then
drains running requests (``--grace-period``), shuts the engine down and
returns the exit status (0 after a clean stop). ``jserve serve`` uses both.

``python -m jserve.server.cli [options]`` is the same as ``jserve serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from jserve.engine.async_engine import AsyncLLMEngine
from jserve.errors import ConfigError
from jserve.server.app import ServerConfig, ServerHandle, _hostport, serve

AUTH_TOKEN_ENV = "JSERVE_AUTH_TOKEN"


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = ServerConfig()
    g = parser.add_argument_group("server")
    g.add_argument(
        "--host",
        default=d.host,
        help="address to listen on (default: %(default)s, this machine only; e.g. 0.0.0.0 for "
        "all interfaces, which should come with --tls-cert/--tls-key and a token)",
    )
    g.add_argument(
        "--port",
        type=int,
        default=d.port,
        help="gRPC port (default: %(default)s; 0: any free port)",
    )
    g.add_argument(
        "--http-port",
        type=int,
        default=d.http_port,
        help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "...) on this port, with the same host, TLS and token (default: off; 0: any free port)",
    )
    g.add_argument(
        "--chat-template",
        default=d.chat_template,
        metavar="FILE",
        help="Jinja chat template for /v1/chat/completions, instead of the model's own "
        "(tokenizer_config.json's chat_template or chat_template.jinja)",
    )
    g.add_argument(
        "--metrics-port",
        type=int,
        default=d.metrics_port,
        help="serve Prometheus metrics over HTTP on this port (default: off; 0: any free port)",
    )
    g.add_argument(
        "--metrics-host",
        default=d.metrics_host,
        help="address the metrics endpoint listens on, apart from --host since it has no "
        "token check (default: %(default)s, this machine only)",
    )
    g.add_argument("--tls-cert", default=d.tls_cert, help="server certificate chain (PEM) for TLS")
    g.add_argument("--tls-key", default=d.tls_key, help="server private key (PEM) for TLS")
    g.add_argument(
        "--auth-token-file",
        default=None,
        help="require 'authorization: Bearer <token>' metadata on every call, with the token "
        f"read from this file (or set {AUTH_TOKEN_ENV}); health checks are exempt",
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=d.max_request_bytes,
        help="largest request message accepted (default: %(default)s)",
    )
    g.add_argument(
        "--grace-period",
        type=float,
        default=d.grace_period,
        help="seconds running requests get to finish after SIGTERM/SIGINT (default: %(default)s)",
    )
    g.add_argument(
        "--served-model-name",
        default=d.model_name,
        help="model name reported to clients (default: the model directory's name)",
    )
    g.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help="with --enable-lora: let clients load and unload adapters at run time "
        "(LoadLoRAAdapter, /v1/load_lora_adapter); a load reads the directory the client names",
    )
    g.add_argument(
        "--no-server-warmup",
        action="store_true",
        help="report SERVING without first sending a warm-up request through the engine",
    )
    return parser


def _auth_token(args: argparse.Namespace) -> str | None:
    if args.auth_token_file:
        with open(args.auth_token_file, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise ConfigError(f"{args.auth_token_file} holds no token")
        return token
    return os.environ.get(AUTH_TOKEN_ENV) or None


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig the options describe (checked when the server starts)."""
    return ServerConfig(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        http_port=args.http_port,
        chat_template=args.chat_template,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        auth_token=_auth_token(args),
        max_request_bytes=args.max_request_bytes,
        grace_period=args.grace_period,
        model_name=args.served_model_name,
        warmup=not args.no_server_warmup,
        allow_runtime_lora_updating=args.allow_runtime_lora_updating,
    )


def _announce(handle: ServerHandle) -> None:
    cfg = handle.config
    scheme = "tls" if cfg.tls_cert else "plaintext"
    auth = ", token required" if cfg.auth_token else ""
    line = f"jserve: gRPC on {handle.address} ({scheme}{auth})"
    if handle.http_url is not None:
        line += f", HTTP on {handle.http_url}"
    if handle.metrics_port is not None:
        line += f", metrics on http://{_hostport(cfg.metrics_host, handle.metrics_port)}/metrics"
    print(line, file=sys.stderr, flush=True)
    if handle.core.lora_enabled:
        loras = ", ".join(f"{r.lora_name} (id {r.lora_int_id})" for r in handle.core.loras)
        print(f"jserve: LoRA adapters: {loras or 'none loaded yet'}", file=sys.stderr, flush=True)


def run_serve(args: argparse.Namespace, aengine: AsyncLLMEngine) -> int:
    """Serves ``aengine`` until SIGTERM/SIGINT; returns the process exit status.

    Health turns SERVING after a warm-up request; on the first signal the
    server stops taking RPCs and running ones get ``--grace-period`` seconds
    (a second signal cancels them). The engine is shut down before returning.
    """
    try:
        try:
            config = config_from_args(args)  # reads the token file
        except (ValueError, OSError) as e:
            print(f"jserve: {e}", file=sys.stderr)
            return 2
        try:
            asyncio.run(serve(aengine, config, on_started=_announce))
        except ConfigError as e:
            print(f"jserve: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"jserve: cannot serve: {e}", file=sys.stderr)
            return 1
    finally:
        aengine.shutdown()
    if aengine.dead is not None:
        print(f"jserve: stopped; the engine had failed: {aengine.dead}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jserve.server.cli ...`` is ``jserve serve ...``."""
    from jserve.cli.main import main as jserve_main

    return jserve_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
