"""Argument parsing for ``jserve bench {serve,throughput,latency,estimate}``."""

from __future__ import annotations

import argparse

from jserve.bench.datasets import add_dataset_arguments
from jserve.bench.results import add_result_arguments
from jserve.cli.engine_args import add_engine_arguments, add_model_arguments


def _add_offline_common(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_engine_arguments(p)
    add_result_arguments(p)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--random-loras",
        type=int,
        default=0,
        metavar="N",
        help="write N random LoRA adapters for the model (every supported module) and serve "
        "the requests through them, round-robin (implies --enable-lora)",
    )
    p.add_argument(
        "--random-lora-rank", type=int, default=16, help="rank of the --random-loras adapters"
    )
    p.add_argument(
        "--lora-fraction",
        type=float,
        default=1.0,
        help="with adapters (--random-loras or --lora-modules): the fraction of requests that "
        "use one (the rest use the base model)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jserve.bench import estimate, offline, serve

    sub = parser.add_subparsers(dest="bench_mode", required=True)
    serve.add_arguments(
        sub.add_parser("serve", help="drive a running server at a request rate: TTFT, TPOT, ITL")
    )
    p = sub.add_parser(
        "throughput", help="offline engine, all requests at once: requests/s and tokens/s"
    )
    _add_offline_common(p)
    add_dataset_arguments(p)
    p.add_argument(
        "--structured-fraction",
        type=float,
        default=0.0,
        help="constrain this fraction of the requests with --structured-regex (structured output)",
    )
    p.add_argument("--structured-regex", default=r"[a-z ]+", help="their regex")
    p.set_defaults(func=offline.run_throughput)

    p = sub.add_parser("latency", help="a fixed batch end to end: per-iteration latency")
    _add_offline_common(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters-warmup", type=int, default=2)
    p.add_argument("--num-iters", type=int, default=10)
    p.set_defaults(func=offline.run_latency)

    estimate.add_arguments(
        sub.add_parser(
            "estimate",
            help="compile the step for a TPU slice or an H100 that is not attached: "
            "the compiler's cost estimate beside a roofline",
        )
    )
