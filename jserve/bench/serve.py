"""``jserve bench serve``: drive a running server at a request rate and measure it.

Requests are sent at a Poisson rate (``--request-rate``; ``--burstiness``
is the shape of the gamma distribution of gaps, 1 = Poisson) and/or with at
most ``--max-concurrency`` in flight, over the jserve API, JetStream's
``Orchestrator`` API, or any OpenAI-compatible HTTP server (``--backend openai
--base-url URL``: jserve's ``--http-port``, vLLM, SGLang, ...), so the same
benchmark compares engines side by side.

With ``--backend openai`` requests are streamed completions
(``stream_options.include_usage``): TTFT and ITL come from the arrival of the
server-sent chunks that carry text, the output length from the final usage
chunk. ``--ignore-eos`` is sent as vLLM's ``ignore_eos`` extra field, which
vLLM, SGLang and jserve accept.

JetStream's ``Decode`` carries no sampling fields, so with ``--backend
jetstream`` the server's own sampling applies (``jserve serve``: greedy,
stopping at EOS) and ``--temperature``/``--ignore-eos`` are refused. Token-id
prompts are sent with ``has_bos`` set: the dataset's ids are the whole
prompt, as over the jserve API, so the server adds no BOS to them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
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
from jserve.server.cli import AUTH_TOKEN_ENV

# Sampling sent over the jserve API unless given (JetStream's Decode has no such fields).
DEFAULT_TEMPERATURE = 0.0
DEFAULT_IGNORE_EOS = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=50051)
    g.add_argument(
        "--backend",
        default="jserve",
        choices=["jserve", "jetstream", "openai"],
        help="jserve.v1 Generation API, JetStream's Orchestrator.Decode, or an "
        "OpenAI-compatible HTTP server's /v1/completions (with --base-url)",
    )
    g.add_argument(
        "--base-url",
        default=None,
        help="with --backend openai: the server's URL, e.g. http://127.0.0.1:8000 (or .../v1)",
    )
    g.add_argument(
        "--model",
        default=None,
        help="with --backend openai: the model name to send (default: the server's first "
        "in /v1/models)",
    )
    g.add_argument(
        "--auth-token",
        default=os.environ.get(AUTH_TOKEN_ENV),
        help=f"bearer token for a server that requires one (default: ${AUTH_TOKEN_ENV})",
    )
    g.add_argument(
        "--root-certificates", default=None, help="PEM file: connect with TLS, trusting it"
    )
    g.add_argument(
        "--tokenizer",
        default=None,
        help="model directory whose tokenizer counts text prompts (default: embedded model)",
    )
    g.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="for random prompts when the server cannot be asked (JetStream and OpenAI "
        "backends; default for OpenAI: the --tokenizer's vocabulary)",
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
    g.add_argument(
        "--temperature",
        type=float,
        default=None,
        help=f"sampling temperature (default: {DEFAULT_TEMPERATURE:g}; jserve and openai backends)",
    )
    g.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="generate exactly the dataset's output length (default: on; jserve and openai backends)",
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
                req.prompt,
                timeout=args.request_timeout,
                max_tokens=req.output_len,
                has_bos=not isinstance(req.prompt, str),
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


class OpenAIBackend:
    """Streams completions from an OpenAI-compatible server."""

    def __init__(self, args: argparse.Namespace) -> None:
        import httpx

        base = args.base_url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        headers = {"authorization": f"Bearer {args.auth_token}"} if args.auth_token else {}
        verify: ssl.SSLContext | bool = True
        if args.root_certificates:
            verify = ssl.create_default_context(cafile=args.root_certificates)
        self.http = httpx.AsyncClient(
            base_url=base,
            headers=headers,
            verify=verify,
            timeout=args.request_timeout,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )
        self.model = args.model

    async def model_name(self) -> str:
        if self.model is None:
            r = await self.http.get("/models")
            r.raise_for_status()
            self.model = r.json()["data"][0]["id"]
        return self.model

    async def send(self, args: argparse.Namespace, req: BenchRequest) -> RequestRecord:
        import httpx

        body: dict[str, Any] = {
            "model": self.model,
            "prompt": req.prompt,
            "max_tokens": req.output_len,
            "temperature": args.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if args.ignore_eos:
            body["ignore_eos"] = True
        record = RequestRecord(prompt_len=req.prompt_len, start=time.perf_counter())
        completion_tokens = None
        try:
            async with self.http.stream("POST", "/completions", json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    record.error = f"HTTP {r.status_code}: {text[:300]}"
                    return record
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        record.error = str(chunk["error"].get("message", chunk["error"]))
                        break
                    if chunk.get("usage"):
                        completion_tokens = chunk["usage"].get("completion_tokens")
                    if any(c.get("text") for c in chunk.get("choices") or ()):
                        record.chunk_times.append(time.perf_counter())
                        record.chunk_tokens.append(1)
        except (httpx.HTTPError, ValueError) as e:
            record.error = f"{type(e).__name__}: {e}"
            return record
        # A chunk may carry more than one token: the usage chunk has the true total.
        if completion_tokens is not None and record.chunk_tokens:
            record.chunk_tokens[-1] += max(0, completion_tokens - len(record.chunk_tokens))
        record.success = bool(record.chunk_times) and not record.error
        if not record.success and not record.error:
            record.error = "no tokens received"
        return record

    async def close(self) -> None:
        await self.http.aclose()


def check_sampling_args(args: argparse.Namespace) -> None:
    """Fills in the sampling defaults, or refuses them where the backend cannot send them."""
    given = [
        flag
        for flag, value in (("--temperature", args.temperature), ("--ignore-eos", args.ignore_eos))
        if value is not None
    ]
    if args.backend == "openai" and not args.base_url:
        raise ConfigError("--backend openai needs --base-url, e.g. http://127.0.0.1:8000")
    if args.backend != "openai" and (args.base_url or args.model):
        raise ConfigError("--base-url and --model are for --backend openai")
    if args.backend == "jetstream":
        if given:
            raise ConfigError(
                f"{' and '.join(given)} cannot be sent with --backend jetstream: JetStream's "
                "Decode has no sampling fields, so the server's own sampling applies"
            )
        return
    if args.temperature is None:
        args.temperature = DEFAULT_TEMPERATURE
    if args.ignore_eos is None:
        args.ignore_eos = DEFAULT_IGNORE_EOS


async def _benchmark(
    args: argparse.Namespace, percentiles: tuple[float, ...], slos: dict[str, float]
) -> dict[str, Any]:
    from jserve.server.client import Client

    client: Any
    if args.backend == "openai":
        client = OpenAIBackend(args)
    else:
        root = None
        if args.root_certificates:
            with open(args.root_certificates, "rb") as f:
                root = f.read()
        client = Client(
            f"{args.host}:{args.port}", auth_token=args.auth_token, root_certificates=root
        )
    try:
        vocab, model_name, tokenizer = await _model_facts(client, args)
        reqs = requests_from_args(args, vocab, tokenizer)
        rng = np.random.default_rng(args.seed + 1)
        gaps = arrival_gaps(rng, len(reqs), args.request_rate, args.burstiness)
        limit = asyncio.Semaphore(args.max_concurrency or len(reqs))
        bar = tqdm(total=len(reqs), desc="requests", disable=args.disable_tqdm)

        async def limited(req: BenchRequest) -> RequestRecord:
            async with limit:
                if args.backend == "openai":
                    record = await client.send(args, req)
                else:
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
    result = summarize(records, duration, percentiles, slos)
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
    elif args.backend == "openai":
        name = await client.model_name()
    tokenizer = None
    if args.dataset_name != "random":
        tokenizer = Tokenizer.from_dir(args.tokenizer or default_model_path())
    elif not vocab and args.backend == "openai":
        vocab = Tokenizer.from_dir(args.tokenizer or default_model_path()).vocab_size
    if args.dataset_name == "random" and not vocab:
        raise ConfigError("random prompts need --vocab-size with the jetstream backend")
    return vocab or 0, name, tokenizer


def run_serve_bench(args: argparse.Namespace) -> int:
    # Options are checked before any request is sent.
    percentiles = percentiles_from_args(args)
    slos = parse_goodput(args.goodput)
    check_sampling_args(args)
    result = asyncio.run(_benchmark(args, percentiles, slos))
    save_result(args, "serve", result)
    return 0 if result["completed"] else 1
