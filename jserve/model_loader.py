"""Resolves a model argument to a loaded (config, params, tokenizer)."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp

from checkpoints import is_orbax_checkpoint, load_hf_params, load_orbax_params
from checkpoints.files import check_file
from jserve.config import ModelConfig, load_config
from jserve.errors import ConfigError
from jserve.models import get_model, moe
from jserve.models.kv_quant import check_kv_cache_dtype, with_kv_cache
from jserve.models.params import init_params
from jserve.models.presets import PRESETS, preset_config
from jserve.models.quant import (
    QuantConfig,
    parse_quantization,
    quantize_params,
    with_fp8_activations,
)
from jserve.tokenizer import Tokenizer
from sharding import STAGE, make_mesh, param_shardings
from sharding.pipeline import pipeline_param_shardings, stack_stages, uniform_stage_windows

logger = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Up to this many parameters, loading checks every weight for NaN and infinite
# values by default (check_weights=None): one pass over host memory, measured at
# about 0.25 ns per float32 and 0.35 ns per bfloat16 parameter on a 2-core CPU VM,
# so at most ~3.5 s here. Larger models opt in with check_weights=True.
CHECK_WEIGHTS_MAX_PARAMS = 10_000_000_000


@dataclasses.dataclass
class LoadedModel:
    path: str
    cfg: ModelConfig
    params: Any
    tokenizer: Tokenizer | None
    dtype: Any
    mesh: Any = None  # jax.sharding.Mesh when the model spans several devices
    parallel: Any = None  # sharding.ParallelConfig


def _stage_layers(params: Any, cfg: ModelConfig, mesh: Any) -> Any:
    """Under pipeline parallelism, stacks each stage's layers (see sharding.pipeline)."""
    if mesh is None or mesh.shape[STAGE] == 1:
        return params
    return stack_stages(params, get_model(cfg).param_specs(cfg), mesh)


def with_quantization(
    cfg: ModelConfig, quantization: str | None, fp8_activations: Any = False
) -> ModelConfig:
    """``cfg`` with the weight format ``quantization`` names ("int8", "fp8", "int4"), which a
    checkpoint that is already quantized (``cfg.quant`` from its config.json) refuses;
    ``fp8_activations`` (True, False, "auto") as ``quant.with_fp8_activations`` takes it."""
    q = parse_quantization(quantization)
    if q is None:
        return cfg.replace(quant=with_fp8_activations(cfg.quant, fp8_activations))
    if cfg.quant is not None and cfg.quant.source != "quantize":
        raise ConfigError(
            f"quantization={quantization!r} asks to quantize a checkpoint that is already "
            f"quantized ({cfg.quant.source}, {cfg.quant.weights}); leave quantization unset"
        )
    return cfg.replace(quant=with_fp8_activations(q, fp8_activations))


def kv_cache_config(
    cfg: ModelConfig,
    params: Any,
    parallel: Any,
    kv_cache_dtype: str | None,
    model_dir: str | None = None,
) -> ModelConfig:
    """``cfg`` with quantized KV pages when ``kv_cache_dtype`` asks (before pipeline stages
    stack the layers)."""
    name = check_kv_cache_option(kv_cache_dtype, parallel)
    return with_kv_cache(get_model(cfg), params, cfg, name, model_dir)


def check_kv_cache_option(kv_cache_dtype: str | None, parallel: Any) -> str:
    """The KV page format ``kv_cache_dtype`` names, checked against the parallel layout
    (ConfigError); called before any weight is read, and again where it is applied."""
    name = check_kv_cache_dtype(kv_cache_dtype)
    if name != "auto" and parallel is not None and parallel.pipeline_parallel_size > 1:
        raise ConfigError(
            f"kv_cache_dtype {name!r} is not supported with pipeline_parallel_size > 1 yet; "
            "use kv_cache_dtype='auto' or tensor parallelism"
        )
    return name


def placement(cfg: ModelConfig, parallel: Any) -> tuple[ModelConfig, Any, Any]:
    """(config, mesh, per-weight shardings) for a parallel config; no mesh for one device.

    The config may come back with KV heads replicated (see ModelConfig.with_kv_heads_for).
    """
    if parallel is None:
        return cfg, None, None
    cfg = moe.with_expert_parallel(
        cfg, parallel.enable_expert_parallel, parallel.tensor_parallel_size
    )
    if parallel.world_size == 1:
        return cfg, None, None
    parallel.validate(cfg, jax.device_count())
    cfg = cfg.with_kv_heads_for(parallel.tensor_parallel_size)
    mesh = make_mesh(parallel)
    specs = get_model(cfg).param_specs(cfg)
    if parallel.pipeline_parallel_size == 1:
        return cfg, mesh, param_shardings(specs, mesh)
    if cfg.quant is not None:
        raise ConfigError(
            "quantized weights are not supported with pipeline_parallel_size > 1 yet; use "
            "tensor_parallel_size, or leave quantization unset"
        )
    uniform_stage_windows(cfg.sliding_windows, parallel.pipeline_parallel_size)
    moe.check_pipeline(cfg, parallel.pipeline_parallel_size)
    return cfg, mesh, pipeline_param_shardings(specs, mesh)


def resolve_dtype(dtype: str | Any) -> Any:
    """ "auto" is float32 on CPU (bfloat16 matmuls are slow there) and bfloat16 elsewhere."""
    if dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB"


def check_fits_in_memory(cfg: ModelConfig, dtype: Any, parallel: Any = None) -> None:
    """Refuses a config whose parameters cannot fit in device memory, before any weight
    is declared, read or created (a corrupt config can imply terabytes)."""
    world = 1 if parallel is None else parallel.world_size
    bits = 8 * jnp.dtype(dtype).itemsize
    q: QuantConfig | None = cfg.quant
    if q is not None:  # scales and the unquantized norms are a few percent more
        bits = min(bits, q.bits * 1.1)
    need = cfg.num_params() * bits / 8
    per_device = need / world
    limits = []
    for device in jax.local_devices():
        stats = device.memory_stats()
        if stats and "bytes_limit" in stats:
            limits.append(stats["bytes_limit"])
    if limits:
        have, need_here, where = min(limits), per_device, "a device here holds"
    else:  # CPU devices share the host's memory
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        need_here = per_device * min(world, jax.local_device_count())
        where = "this host's memory"
    if need_here > have:
        spread = f", {_gib(per_device)} on each of {world} devices" if world > 1 else ""
        raise ConfigError(
            f"config.json describes {cfg.num_params() / 1e9:.2f}B parameters: "
            f"{_gib(need)} in {jnp.dtype(dtype).name}{spread}, more than {where} "
            f"({_gib(have)}). Check hidden_size, intermediate_size, num_hidden_layers and "
            "vocab_size, or use a smaller dtype or more devices (tensor_parallel_size)"
        )


def check_tokenizer_fits(tokenizer: Tokenizer, cfg: ModelConfig, where: str) -> None:
    """Refuses a tokenizer that makes ids past the embedding; warns when the sizes differ
    by more than padding (models often round the embedding up, e.g. Qwen2's 151,936 rows
    for 151,646 tokens)."""
    top = tokenizer.max_token_id
    if top >= cfg.vocab_size:
        raise ConfigError(
            f"{where}/tokenizer.json makes token ids up to {top}, but the model's embedding has "
            f"{cfg.vocab_size} rows (vocab_size in config.json); the tokenizer belongs to "
            "another model"
        )
    if abs(tokenizer.vocab_size - cfg.vocab_size) > 0.01 * cfg.vocab_size:
        logger.warning(
            "%s/tokenizer.json has %d tokens but the model's embedding has %d rows; check that "
            "the tokenizer belongs to this model",
            where,
            tokenizer.vocab_size,
            cfg.vocab_size,
        )


def load_model(
    model: str | os.PathLike[str],
    dtype: str | Any = "auto",
    parallel: Any = None,
    check_weights: bool | None = None,
    quantization: str | None = None,
    kv_cache_dtype: str | None = "auto",
    fp8_activations: Any = False,
) -> LoadedModel:
    """Loads a Hugging Face model directory (config, safetensors weights, tokenizer).

    ``quantization`` ("int8", "fp8", "int4", "int4-g32") quantizes a float checkpoint's
    matmul weights as they load (see jserve.models.quant); a checkpoint whose config.json
    declares ``quantization_config`` loads in its own format without it.
    ``fp8_activations`` (True, False, "auto") multiplies fp8 x fp8 for fp8 weights (see
    ``jserve.models.quant.with_fp8_activations``).
    ``kv_cache_dtype`` "fp8" or "int8" stores the KV pages quantized, with per-layer
    scales calibrated here (see jserve.models.kv_quant); "auto" keeps the model's dtype.

    With a ``sharding.ParallelConfig`` the weights are placed on a device
    mesh as they load, each device receiving only its slice. ``check_weights``
    refuses weights holding NaN or infinite values; None checks models of up
    to ``CHECK_WEIGHTS_MAX_PARAMS`` parameters.
    """

    path = os.fspath(model)
    if not os.path.isdir(path):
        raise ConfigError(
            f"model {path!r} is not a directory; pass a local Hugging Face model directory "
            "(models are never downloaded)"
        )
    cfg = with_quantization(load_config(path), quantization, fp8_activations)
    check_kv_cache_option(kv_cache_dtype, parallel)  # before minutes of reading weights
    dt = resolve_dtype(dtype)
    check_fits_in_memory(cfg, dt, parallel)
    tokenizer = None
    if check_file(os.path.join(path, "tokenizer.json"), ConfigError, required=False):
        tokenizer = Tokenizer.from_dir(path, cfg.eos_token_ids)
        check_tokenizer_fits(tokenizer, cfg, path)
    if check_weights is None:
        check_weights = cfg.num_params() <= CHECK_WEIGHTS_MAX_PARAMS
    cfg, mesh, shardings = placement(cfg, parallel)
    params = load_params(path, cfg, dt, shardings, check_finite=check_weights)
    cfg = kv_cache_config(cfg, params, parallel, kv_cache_dtype, path)
    if tokenizer is not None and tokenizer.eos_token_ids and not cfg.eos_token_ids:
        cfg = cfg.replace(eos_token_ids=tokenizer.eos_token_ids)
    params = _stage_layers(params, cfg, mesh)
    return LoadedModel(path, cfg, params, tokenizer, dt, mesh, parallel)


def load_params(
    path: str | os.PathLike[str],
    cfg: ModelConfig,
    dtype: Any,
    shardings: Any = None,
    progress: bool = False,
    check_finite: bool = False,
) -> Any:
    """The weights of an Orbax checkpoint or Hugging Face directory, as ``cfg``'s model
    declares them, placed by ``shardings`` (a tree matching the declarations) if given.
    ``check_finite`` refuses Hugging Face weights holding NaN or infinite values (Orbax
    checkpoints were checked when ``jserve convert`` loaded their source)."""
    specs = get_model(cfg).param_specs(cfg)
    if is_orbax_checkpoint(path):
        if cfg.kv_repeat > 1:
            # num_kv_heads was raised to the tensor-parallel size (with_kv_heads_for).
            raise ConfigError(
                f"tensor_parallel_size {cfg.num_kv_heads} needs the model's "
                f"{cfg.source_kv_heads} KV heads replicated, which an Orbax checkpoint cannot "
                "be restored into; serve the Hugging Face directory instead, or use a "
                f"tensor_parallel_size of at most {cfg.source_kv_heads}"
            )
        return load_orbax_params(os.fspath(path), specs, dtype, shardings)
    return load_hf_params(
        path, specs, dtype, shardings, progress=progress, check_finite=check_finite
    )


def random_params(cfg: ModelConfig, seed: int, dtype: Any, mesh: Any, shardings: Any) -> Any:
    """Random weights for ``cfg``: float ones from the declarations, then quantized one
    weight at a time when ``cfg.quant`` asks for it."""
    if cfg.quant is None:
        specs = get_model(cfg).param_specs(cfg)
        return init_params(specs, jax.random.key(seed), dtype, shardings=shardings)
    float_cfg = cfg.replace(quant=None)
    fspecs = get_model(float_cfg).param_specs(float_cfg)
    fshard = None if mesh is None else param_shardings(fspecs, mesh)
    params = init_params(fspecs, jax.random.key(seed), dtype, shardings=fshard)
    return quantize_params(params, get_model(cfg).param_specs(cfg), fspecs, shardings)


def default_model_path() -> str:
    """The small Shakespeare model shipped inside the package."""
    return os.path.join(os.path.dirname(__file__), "assets", "shakespeare-llama")


def random_model(
    shape: str,
    dtype: str | Any = "auto",
    seed: int = 0,
    parallel: Any = None,
    quantization: str | None = None,
    kv_cache_dtype: str | None = "auto",
    fp8_activations: Any = False,
) -> LoadedModel:
    """A model with random weights created directly on the device.

    ``shape`` is a preset name (see ``jserve.models.presets``) or a directory
    holding a ``config.json``. Text prompts use the embedded model's
    tokenizer when its ids fit the vocabulary (the weights are random, so
    only the token counts matter).
    """
    if shape in PRESETS:
        cfg = preset_config(shape)
    elif os.path.isdir(shape):
        cfg = load_config(shape)
    else:
        raise ConfigError(
            f"--config {shape!r} is neither a known shape ({sorted(PRESETS)}) nor a directory "
            "with a config.json"
        )
    cfg = with_quantization(cfg, quantization, fp8_activations)
    check_kv_cache_option(kv_cache_dtype, parallel)
    dt = resolve_dtype(dtype)
    check_fits_in_memory(cfg, dt, parallel)
    cfg, mesh, shardings = placement(cfg, parallel)
    params = random_params(cfg, seed, dt, mesh, shardings)
    cfg = kv_cache_config(cfg, params, parallel, kv_cache_dtype)
    tokenizer = None
    embedded = default_model_path()
    if os.path.isfile(os.path.join(embedded, "tokenizer.json")):
        tok = Tokenizer.from_dir(embedded)
        if tok.vocab_size <= cfg.vocab_size:
            tokenizer = tok
    params = _stage_layers(params, cfg, mesh)
    return LoadedModel(f"random:{shape}", cfg, params, tokenizer, dt, mesh, parallel)
