"""Model and engine flags shared by every subcommand (names follow vLLM's)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TYPE_CHECKING

from jserve.compile_cache import DEFAULT_CACHE_DIR, ENV_VAR, enable_compilation_cache
from jserve.engine.config import EngineConfig
from jserve.errors import ConfigError, InvalidRequestError
from jserve.lora import LoRARequest
from jserve.model_loader import LoadedModel, default_model_path, load_model, random_model
from sharding import ParallelConfig

if TYPE_CHECKING:
    from jserve.engine.llm_engine import LLMEngine


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="Hugging Face model directory (default: the embedded Shakespeare model)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight and activation dtype; auto = float32 on CPU, bfloat16 on accelerators",
    )
    g.add_argument(
        "--random-weights",
        action="store_true",
        help="random weights created on the device, for benchmarking real shapes offline",
    )
    g.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="devices to split each layer over (attention heads, MLP, vocabulary)",
    )
    g.add_argument(
        "--pipeline-parallel-size",
        "-pp",
        type=int,
        default=1,
        help="pipeline stages, each holding a contiguous run of layers",
    )
    g.add_argument(
        "--num-microbatches",
        type=int,
        default=0,
        help="micro-batches per step under pipeline parallelism (default: one per stage)",
    )
    g.add_argument(
        "--enable-expert-parallel",
        action="store_true",
        help="mixture-of-experts models: split the experts over the tensor-parallel devices "
        "(whole experts per device) instead of every expert's hidden units",
    )
    g.add_argument(
        "--config",
        default=None,
        help="with --random-weights: a shape name (llama3-8b, llama3-3b, llama3-1b, "
        "mistral-7b, qwen2-7b, qwen3-8b, qwen3-0.6b, mixtral-8x7b, qwen3-30b-a3b) or a "
        "directory with config.json",
    )
    g.add_argument(
        "--quantization",
        default=None,
        help="quantize a float checkpoint's weights on load: int8, fp8 (per output channel) "
        "or int4 (groups of 64 inputs; int4-g32 for 32); a checkpoint with a "
        "quantization_config loads in its own format without it",
    )
    g.add_argument(
        "--fp8-activations",
        default="auto",
        choices=["auto", "true", "false"],
        help="with fp8 weights: quantize matmul activations to fp8 per token and multiply "
        "fp8 x fp8 (auto = on for GPUs of compute capability 8.9 or newer, e.g. H100)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8", "int8"],
        help="KV page storage: auto = the model's dtype; fp8 or int8 = one byte per value "
        "with per-layer scales (more pages fit)",
    )
    g.add_argument(
        "--check-weights",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refuse weights holding NaN or infinite values (default: on for models of up "
        "to 10B parameters)",
    )


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    g = parser.add_argument_group("engine")
    g.add_argument("--page-size", type=int, default=d.page_size, help="tokens per KV page")
    g.add_argument(
        "--num-pages", type=int, default=None, help="KV pages (default: sized from free memory)"
    )
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=d.enable_prefix_caching,
    )
    g.add_argument("--max-logprobs", type=int, default=d.max_logprobs)
    g.add_argument(
        "--memory-utilization",
        type=float,
        default=d.memory_utilization,
        help="fraction of free device memory the KV pool may use",
    )
    g.add_argument(
        "--attention-backend", default=d.attention_backend, help="auto, xla, or a Pallas backend"
    )
    g.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=d.async_scheduling,
        help="prepare step N+1 while the device runs step N",
    )
    g.add_argument("--max-waiting", type=int, default=d.max_waiting)
    g.add_argument(
        "--speculative-config",
        default=None,
        metavar="JSON",
        help='speculative decoding, as vLLM\'s dict, e.g. \'{"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}\'',
    )
    g.add_argument(
        "--enable-lora",
        action="store_true",
        help="serve PEFT LoRA adapters per request over the base model",
    )
    g.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="LoRA adapters to register at start-up, as name=path (or JSON "
        '\'{"name": ..., "path": ...}\'); requests name them as the model (implies --enable-lora)',
    )
    g.add_argument(
        "--max-loras", type=int, default=d.max_loras, help="LoRA adapters on the device at once"
    )
    g.add_argument(
        "--max-lora-rank", type=int, default=d.max_lora_rank, help="largest LoRA rank served"
    )
    g.add_argument(
        "--max-cpu-loras",
        type=int,
        default=None,
        help="LoRA adapters kept in host memory (default: --max-loras)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile every step shape at start-up; with --no-warmup each compiles on first use",
    )
    g.add_argument(
        "--compilation-cache-dir",
        default=None,
        metavar="DIR",
        help="JAX persistent compilation cache, so later start-ups skip compiling; '' = off "
        f"(default: ${ENV_VAR} if set, else $XDG_CACHE_HOME/jserve/jax-cache or "
        "~/.cache/jserve/jax-cache)",
    )


def engine_config_from_args(args: argparse.Namespace, **overrides: object) -> EngineConfig:
    cfg = EngineConfig(
        page_size=args.page_size,
        num_pages=args.num_pages,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=args.enable_prefix_caching,
        max_logprobs=args.max_logprobs,
        max_waiting=args.max_waiting,
        memory_utilization=args.memory_utilization,
        attention_backend=args.attention_backend,
        async_scheduling=args.async_scheduling,
        seed=args.seed,
        speculative_config=args.speculative_config,
        enable_lora=args.enable_lora or bool(args.lora_modules),
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras,
    )
    return dataclasses.replace(cfg, **overrides).validate()


def parse_lora_modules(values: list[str]) -> list[LoRARequest]:
    """``--lora-modules`` entries (name=path, or a JSON object with name and path) as
    LoRARequests with ids 1, 2, ... in order; ConfigError for a malformed one."""
    out = []
    for i, value in enumerate(values):
        if value.lstrip().startswith("{"):
            try:
                obj = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--lora-modules {value!r} is not valid JSON: {e}") from None
            obj = obj if isinstance(obj, dict) else {}
            name, path = obj.get("name"), obj.get("path")
        else:
            name, _, path = value.partition("=")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ConfigError(
                f"--lora-modules {value!r}: give each adapter as name=path, e.g. "
                "sql=/adapters/sql-lora"
            )
        if any(r.lora_name == name for r in out):
            raise ConfigError(f"--lora-modules names adapter {name!r} twice")
        out.append(LoRARequest(name, i + 1, path))
    return out


def register_lora_modules(engine: LLMEngine, values: list[str]) -> None:
    """Reads and checks every ``--lora-modules`` adapter before serving (ConfigError
    naming the first that cannot be served)."""
    for req in parse_lora_modules(values):
        try:
            engine.add_lora(req)
        except InvalidRequestError as e:
            raise ConfigError(f"--lora-modules {req.lora_name}={req.lora_path}: {e}") from None


def enable_compilation_cache_from_args(args: argparse.Namespace) -> None:
    """Turns on the cache ``--compilation-cache-dir`` names; before anything compiles."""
    d = args.compilation_cache_dir
    enable_compilation_cache(DEFAULT_CACHE_DIR if d is None else d)


def load_model_from_args(args: argparse.Namespace) -> LoadedModel:
    enable_compilation_cache_from_args(args)  # loading compiles (casts, random init)
    parallel = ParallelConfig(
        args.tensor_parallel_size,
        args.pipeline_parallel_size,
        args.num_microbatches,
        args.enable_expert_parallel,
    )
    if args.random_weights:
        return random_model(
            args.config or "llama3-1b",
            args.dtype,
            args.seed,
            parallel,
            args.quantization,
            args.kv_cache_dtype,
            args.fp8_activations,
        )
    return load_model(
        args.model or default_model_path(),
        args.dtype,
        parallel,
        args.check_weights,
        args.quantization,
        args.kv_cache_dtype,
        fp8_activations=args.fp8_activations,
    )


def build_engine(
    args: argparse.Namespace,
    model: LoadedModel | None = None,
    *,
    progress: bool = True,
    **overrides: object,
) -> LLMEngine:
    """The engine the model and engine flags describe; ``overrides`` replace EngineConfig
    fields. Loads the model unless one is given, and prints the engine's placement."""
    from jserve.engine.llm_engine import LLMEngine

    enable_compilation_cache_from_args(args)
    if model is None:
        model = load_model_from_args(args)
    ecfg = engine_config_from_args(args, **overrides)
    engine = LLMEngine(model, ecfg, warmup=args.warmup, progress=progress)
    register_lora_modules(engine, getattr(args, "lora_modules", []))
    print(f"jserve: {engine.describe()}", file=sys.stderr, flush=True)
    return engine
