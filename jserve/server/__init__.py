"""jserve's gRPC server: jserve.v1 Generation, JetStream's Orchestrator, health, reflection.

Entry points: ``start_server``/``serve`` (jserve.server.app), the CLI glue
``add_serve_arguments``/``run_serve`` (jserve.server.cli) and the async
``Client`` (jserve.server.client).
"""

from jserve.server.app import ServerConfig, ServerHandle, serve, start_server

__all__ = ["ServerConfig", "ServerHandle", "serve", "start_server"]
