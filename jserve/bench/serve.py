"""``jserve bench serve``: drive a running server at a request rate and measure it.

Requests are sent at a Poisson rate (``--request-rate``; ``--burstiness``
is the shape of the gamma distribution of gaps, 1 = Poisson) and/or with at
most ``--max-concurrency`` in flight, over the jserve API or JetStream's
``Orchestrator`` API.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jserve.bench.datasets import BenchRequest, add_dataset_arguments, requests_from_args
from jserve.bench.metrics import RequestRecord, parse_goodput, print_serving_summary, summarize
from jserve.bench.results import (
    add_result_arguments,
    environment,
    percentiles_from_args,
    plot_cdfs,
    plot_throughput,
    save_result,
)
from jserve.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=50051)
    g.add_argument(
        "--backend",
        default="jserve",
        choices=["jserve", "jetstream"],
        help="jserve.v1 Generation API, or JetStream's Orchestrator.Decode",
    )
    g.add_argument("--auth-token", default=os.environ.get("JSERVE_AUTH_TOKEN"))
    g.add_argument("--root-certificates", default=None, help="PEM file: connect with TLS")
    g.add_argument(
        "--tokenizer",
        default=None,
        help="model directory whose tokenizer counts text prompts (default: embedded model)",
    )
    g.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="for random prompts when the server cannot be asked (JetStream backend)",
    )
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s")
    g.add_argument("--burstiness", type=float, default=1.0)
    g.add_argument("--max-concurrency", type=int, default=None)
    g.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        help="SLOs as KEY:MS with KEY in ttft, tpot, e2el, e.g. --goodput ttft:500 tpot:50",
    )
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="generate exactly the dataset's output length",
    )
    g.add_argument("--request-timeout", type=float, default=600.0)
    g.add_argument("--seed", type=int, default=0)
    add_dataset_arguments(p)
    add_result_arguments(p)
    p.set_defaults(func=run_serve_bench)


def arrival_gaps(rng: np.random.Generator, n: int, rate: float, burstiness: float) -> np.ndarray:
    """Seconds to wait before each request: gamma(shape=burstiness, mean=1/rate)."""
    if rate == float("inf"):
        return np.zeros(n)
    if rate <= 0 or burstiness <= 0:
        raise ConfigError("--request-rate and --burstiness must be positive")
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


async def _send(client: Any, args: argparse.Namespace, req: BenchRequest) -> RequestRecord:
    import grpc

    record = RequestRecord(prompt_len=req.prompt_len, start=time.perf_counter())
    try:
        if args.backend == "jserve":
            res = await client.generate(
                req.prompt,
                timeout=args.request_timeout,
                max_tokens=req.output_len,
                temperature=args.temperature,
                ignore_eos=args.ignore_eos,
            )
        else:
            res = await client.decode(
                req.prompt, timeout=args.request_timeout, max_tokens=req.output_len
            )
        record.start = res.start
        for t, n in zip(res.message_times, res.message_tokens, strict=True):
            if n:
                record.chunk_times.append(t)
                record.chunk_tokens.append(n)
        record.success = bool(record.chunk_times)
        if not record.success:
            record.error = "no tokens received"
    except grpc.aio.AioRpcError as e:
        record.error = f"{e.code().name}: {e.details()}"
    return record


async def _benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from jserve.server.client import Client

    root = None
    if args.root_certificates:
        with open(args.root_certificates, "rb") as f:
            root = f.read()
    client = Client(f"{args.host}:{args.port}", auth_token=args.auth_token, root_certificates=root)
    try:
        vocab, model_name, tokenizer = await _model_facts(client, args)
        reqs = requests_from_args(args, vocab, tokenizer)
        rng = np.random.default_rng(args.seed + 1)
        gaps = arrival_gaps(rng, len(reqs), args.request_rate, args.burstiness)
        limit = asyncio.Semaphore(args.max_concurrency or len(reqs))
        bar = tqdm(total=len(reqs), desc="requests", disable=args.disable_tqdm)

        async def limited(req: BenchRequest) -> RequestRecord:
            async with limit:
                record = await _send(client, args, req)
            bar.update(1)
            return record

        start = time.perf_counter()
        tasks = []
        for req, gap in zip(reqs, gaps, strict=True):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(limited(req)))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    finally:
        await client.close()
    percentiles = percentiles_from_args(args)
    result = summarize(records, duration, percentiles, parse_goodput(args.goodput))
    result.update(
        mode="serve",
        **environment(),
        backend=args.backend,
        model=model_name,
        dataset=args.dataset_name,
        num_prompts=len(reqs),
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
    )
    print_serving_summary(result, percentiles)
    if args.plot_dir:
        ok = [r for r in records if r.success]
        plot_cdfs(
            args.plot_dir,
            {
                "TTFT": [r.ttft for r in ok],
                "TPOT": [r.tpot for r in ok if r.tpot is not None],
                "ITL": [x for r in ok for x in r.itls],
                "E2EL": [r.e2el for r in ok],
            },
            f"jserve bench serve ({args.backend})",
        )
        times = [
            t
            for r in ok
            for t, n in zip(r.chunk_times, r.chunk_tokens, strict=True)
            for _ in range(n)
        ]
        plot_throughput(args.plot_dir, times, start, "output tokens per second")
    return result


async def _model_facts(client: Any, args: argparse.Namespace) -> tuple[int, str, Any]:
    """(vocab size, model name, tokenizer) for building the dataset."""
    from jserve.model_loader import default_model_path
    from jserve.tokenizer import Tokenizer

    vocab, name = args.vocab_size, "unknown"
    if args.backend == "jserve":
        info = await client.model_info()
        vocab, name = vocab or info.vocab_size, info.model_name
    if args.dataset_name == "random" and not vocab:
        raise ConfigError("random prompts need --vocab-size with the jetstream backend")
    tokenizer = None
    if args.dataset_name != "random":
        tokenizer = Tokenizer.from_dir(args.tokenizer or default_model_path())
    return vocab or 0, name, tokenizer


def run_serve_bench(args: argparse.Namespace) -> int:
    result = asyncio.run(_benchmark(args))
    save_result(args, "serve", result)
    return 0 if result["completed"] else 1
