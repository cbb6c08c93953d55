"""``jserve bench throughput`` and ``jserve bench latency``: the engine without a server."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jserve.bench.datasets import BenchRequest, random_requests, requests_from_args
from jserve.bench.results import (
    environment,
    percentiles_from_args,
    plot_cdfs,
    plot_throughput,
    save_result,
)
from jserve.cli.engine_args import build_engine, load_model_from_args
from jserve.engine.llm_engine import LLMEngine
from jserve.errors import ConfigError
from jserve.lora import LoRARequest
from jserve.lora.synthetic import write_random_adapter
from jserve.model_loader import LoadedModel
from jserve.sampling_params import SamplingParams
from jserve.structured import StructuredOutputsParams


def _load_model(args: argparse.Namespace) -> tuple[LoadedModel, float]:
    t0 = time.perf_counter()
    model = load_model_from_args(args)
    return model, time.perf_counter() - t0


def _start_engine(
    args: argparse.Namespace, model: LoadedModel, load_s: float, max_queued: int
) -> tuple[LLMEngine, dict[str, float]]:
    """The engine for a run that queues up to ``max_queued`` requests at once."""
    t0 = time.perf_counter()
    extra = {"enable_lora": True} if args.random_loras > 0 else {}
    engine = build_engine(
        args,
        model,
        progress=not args.disable_tqdm,
        max_waiting=max(args.max_waiting, max_queued),
        **extra,
    )
    _register_random_loras(args, engine)
    return engine, {"load_s": load_s, "engine_init_and_compile_s": time.perf_counter() - t0}


def _register_random_loras(args: argparse.Namespace, engine: LLMEngine) -> None:
    """``--random-loras N``: N random adapters written to a temporary directory (removed
    when the process exits) and registered."""
    if args.random_loras <= 0:
        return
    if not 0.0 <= args.lora_fraction <= 1.0:
        raise ConfigError(f"--lora-fraction must be in [0, 1], got {args.lora_fraction}")
    root = tempfile.mkdtemp(prefix="jserve-bench-loras-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    first = max((r.lora_int_id for r in engine.list_loras()), default=0) + 1
    for i in range(args.random_loras):
        path = write_random_adapter(
            engine.cfg, os.path.join(root, f"lora{i}"), args.random_lora_rank, seed=i
        )
        engine.add_lora(LoRARequest(f"random-lora-{i}", first + i, path))


def _lora_for(engine: LLMEngine, args: argparse.Namespace, i: int) -> LoRARequest | None:
    """Request ``i``'s adapter: ``--lora-fraction`` of the requests, spread evenly, take
    the registered adapters round-robin; None for the rest (and without adapters)."""
    loras = engine.list_loras()
    fraction = getattr(args, "lora_fraction", 1.0)
    if not loras or fraction <= 0:
        return None
    k = int((i + 1) * fraction) - int(i * fraction)  # 1 for every 1/fraction-th request
    return loras[int(i * fraction) % len(loras)] if k else None


def _params(req: BenchRequest, args: argparse.Namespace, constrained: bool) -> SamplingParams:
    return SamplingParams(
        max_tokens=req.output_len,
        temperature=args.temperature,
        top_p=args.top_p,
        ignore_eos=True,
        structured_outputs=StructuredOutputsParams(regex=args.structured_regex)
        if constrained
        else None,
    )


def _run_to_completion(
    engine: LLMEngine, reqs: list[BenchRequest], args: argparse.Namespace, tag: str
) -> tuple[float, list[float], dict[str, int]]:
    """Adds every request at once and steps until done; returns (seconds, token times, lens)."""
    # Every k-th request is constrained, spread through the batch.
    fraction = getattr(args, "structured_fraction", 0.0)
    every = round(1 / fraction) if fraction > 0 else 0
    for i, r in enumerate(reqs):
        constrained = every > 0 and i % every == 0
        lora = _lora_for(engine, args, i)
        engine.add_request(f"{tag}{i}", r.prompt, _params(r, args, constrained), lora_request=lora)
    out_lens: dict[str, int] = {}
    token_times: list[float] = []
    bar = tqdm(total=len(reqs), desc=tag or "requests", disable=args.disable_tqdm)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            n = sum(len(c.token_ids) for c in out.outputs)
            out_lens[out.request_id] = out_lens.get(out.request_id, 0) + n
            token_times.extend([time.perf_counter()] * n)
            if out.finished:
                bar.update(1)
    elapsed = time.perf_counter() - start
    bar.close()
    return elapsed, [t - start for t in token_times], out_lens


def _header(args: argparse.Namespace, engine: LLMEngine, mode: str) -> dict[str, Any]:
    return {
        "mode": mode,
        **environment(),
        "model": engine.model.path,
        "model_shape": engine.cfg.name,
        "dtype": str(np.dtype(engine.model.dtype)),
        "num_params": engine.cfg.num_params(),
        "engine": dataclasses.asdict(engine.ecfg) | {"num_pages": engine.num_pages},
        "seed": args.seed,
        # Start-up figures depend on it: a warm cache skips most of the compile time.
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
    }


def _lora_metrics(engine: LLMEngine, args: argparse.Namespace) -> dict[str, Any]:
    """LoRA figures of the run (empty without adapters); printed too."""
    if engine.lora is None or not engine.list_loras():
        return {}
    s = engine.stats
    out = {
        "num_loras": len(engine.list_loras()),
        "lora_fraction": args.lora_fraction,
        "max_loras": engine.ecfg.max_loras,
        "max_lora_rank": engine.ecfg.max_lora_rank,
        "lora_loads": s.lora_loads,
        "lora_evictions": s.lora_evictions,
    }
    print(
        f"LoRA: {out['num_loras']} adapters ({args.lora_fraction:.0%} of requests), "
        f"{engine.ecfg.max_loras} device slots of rank {engine.ecfg.max_lora_rank}, "
        f"{s.lora_loads} slot loads, {s.lora_evictions} evictions"
    )
    return out


def _spec_metrics(engine: LLMEngine) -> dict[str, Any]:
    """Speculative decoding counters of the run (empty without speculation); printed too."""
    if engine.ecfg.speculative_config is None:
        return {}
    out = {
        k.removeprefix("jserve_"): v
        for k, v in engine.stats.as_metrics().items()
        if k.startswith("jserve_spec_decode_")
    }
    print(
        f"Speculative decoding: {out['spec_decode_num_drafts']} drafts, "
        f"{out['spec_decode_num_draft_tokens']} draft tokens, "
        f"{out['spec_decode_num_accepted_tokens']} accepted, "
        f"mean accepted length {out['spec_decode_mean_accepted_length']:.2f}"
    )
    return out


def run_throughput(args: argparse.Namespace) -> int:
    model, load_s = _load_model(args)
    reqs = requests_from_args(args, model.cfg.vocab_size, model.tokenizer)
    engine, startup = _start_engine(args, model, load_s, len(reqs))
    elapsed, token_times, out_lens = _run_to_completion(engine, reqs, args, "")
    prompt_tokens = sum(r.prompt_len for r in reqs)
    output_tokens = sum(out_lens.values())
    result = {
        **_header(args, engine, "throughput"),
        **startup,
        "dataset": args.dataset_name,
        "num_requests": len(reqs),
        "elapsed_time": elapsed,
        "total_input_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "requests_per_second": len(reqs) / elapsed,
        "tokens_per_second": (prompt_tokens + output_tokens) / elapsed,
        "output_tokens_per_second": output_tokens / elapsed,
        "num_steps": engine.stats.num_steps,
        "preemptions": engine.stats.preemptions,
    }
    experts = engine.stats.expert_tokens
    if experts is not None:  # mixture-of-experts: tokens per expert, summed over layers
        result["expert_tokens"] = experts.sum(axis=0).tolist()
        result["expert_load_imbalance"] = engine.stats.expert_load_imbalance()
        print(
            f"Experts: load imbalance (busiest / mean, worst layer) "
            f"{result['expert_load_imbalance']:.2f}; tokens per expert {result['expert_tokens']}"
        )
    print(
        f"Throughput: {result['requests_per_second']:.2f} requests/s, "
        f"{result['tokens_per_second']:.2f} total tokens/s, "
        f"{result['output_tokens_per_second']:.2f} output tokens/s"
    )
    print(
        f"{len(reqs)} requests, {prompt_tokens} prompt + {output_tokens} output tokens in "
        f"{elapsed:.2f} s; start-up: load {startup['load_s']:.2f} s, "
        f"engine + compile {startup['engine_init_and_compile_s']:.2f} s"
    )
    result.update(_spec_metrics(engine))
    result.update(_lora_metrics(engine, args))
    s = engine.structured
    if s.mask_rows:
        result["structured_mask_us_per_row"] = 1e6 * s.mask_seconds / s.mask_rows
        result["structured_rows"] = s.mask_rows
        print(
            f"Structured output: {s.mask_rows} constrained rows, grammar mask "
            f"{result['structured_mask_us_per_row']:.1f} us per row on the host"
        )
    if args.plot_dir:
        plot_throughput(args.plot_dir, token_times, 0.0, "jserve bench throughput")
    save_result(args, "throughput", result)
    return 0


def run_latency(args: argparse.Namespace) -> int:
    percentiles = percentiles_from_args(args)  # a bad option fails before the model loads
    model, load_s = _load_model(args)
    engine, startup = _start_engine(args, model, load_s, args.batch_size)
    rng = np.random.default_rng(args.seed)

    def batch() -> list[BenchRequest]:
        return random_requests(
            rng, args.batch_size, engine.cfg.vocab_size, args.input_len, args.output_len
        )

    for i in range(args.num_iters_warmup):
        _run_to_completion(engine, batch(), args, f"warmup{i}-")
    latencies = []
    for i in tqdm(range(args.num_iters), desc="iterations", disable=args.disable_tqdm):
        elapsed, _, out_lens = _run_to_completion(engine, batch(), args, f"it{i}-")
        assert sum(out_lens.values()) == args.batch_size * args.output_len
        latencies.append(elapsed)
    lat = np.asarray(latencies)
    result = {
        **_header(args, engine, "latency"),
        **startup,
        "batch_size": args.batch_size,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "avg_latency": float(lat.mean()),
        "latencies": latencies,
        "percentiles": {f"{p:g}": float(np.percentile(lat, p)) for p in percentiles},
        "output_tokens_per_second": args.batch_size * args.output_len / float(lat.mean()),
    }
    print(f"Avg latency: {result['avg_latency']:.4f} s")
    for p, v in result["percentiles"].items():
        print(f"{p}% percentile latency: {v:.4f} s")
    print(f"Output tokens/s: {result['output_tokens_per_second']:.2f}")
    result.update(_spec_metrics(engine))
    result.update(_lora_metrics(engine, args))
    if args.plot_dir:
        plot_cdfs(args.plot_dir, {"iteration latency": latencies}, "jserve bench latency")
    save_result(args, "latency", result)
    return 0
