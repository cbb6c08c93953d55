"""Entry point of the ``jserve`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from jserve.cli.interrupt import exit_on_sigint
from jserve.errors import JserveError


def build_parser() -> argparse.ArgumentParser:
    from jserve.bench import cli as bench_cli
    from jserve.cli import convert, generate, serve

    parser = argparse.ArgumentParser(
        prog="jserve", description="Serve and benchmark LLMs on JAX/XLA."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_arguments(sub.add_parser("generate", help="generate text from prompts"))
    serve.add_arguments(sub.add_parser("serve", help="serve a model over gRPC"))
    convert.add_arguments(sub.add_parser("convert", help="convert a HF directory to Orbax"))
    bench_cli.add_arguments(
        sub.add_parser("bench", help="serving, throughput and latency benchmarks")
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The commands' imports take a while; the guard is on since jserve's own import.
    with exit_on_sigint("start-up"):
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except JserveError as e:
        print(f"jserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
