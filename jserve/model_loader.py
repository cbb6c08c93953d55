"""Resolves a model argument to a loaded (config, params, tokenizer)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from checkpoints import is_orbax_checkpoint, load_hf_params, load_orbax_params
from jserve.config import ModelConfig, load_config
from jserve.errors import ConfigError
from jserve.models import get_model, moe
from jserve.models.params import init_params
from jserve.models.presets import PRESETS, preset_config
from jserve.tokenizer import Tokenizer
from sharding import STAGE, make_mesh, param_shardings
from sharding.pipeline import pipeline_param_shardings, stack_stages, uniform_stage_windows

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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


def load_model(
    model: str | os.PathLike[str], dtype: str | Any = "auto", parallel: Any = None
) -> LoadedModel:
    """Loads a Hugging Face model directory (config, safetensors weights, tokenizer).

    With a ``sharding.ParallelConfig`` the weights are placed on a device
    mesh as they load, each device receiving only its slice.
    """

    path = os.fspath(model)
    if not os.path.isdir(path):
        raise ConfigError(
            f"model {path!r} is not a directory; pass a local Hugging Face model directory "
            "(models are never downloaded)"
        )
    cfg = load_config(path)
    dt = resolve_dtype(dtype)
    cfg, mesh, shardings = placement(cfg, parallel)
    params = load_params(path, cfg, dt, shardings)
    tokenizer = None
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        tokenizer = Tokenizer.from_dir(path, cfg.eos_token_ids)
        if tokenizer.eos_token_ids and not cfg.eos_token_ids:
            cfg = cfg.replace(eos_token_ids=tokenizer.eos_token_ids)
    params = _stage_layers(params, cfg, mesh)
    return LoadedModel(path, cfg, params, tokenizer, dt, mesh, parallel)


def load_params(
    path: str | os.PathLike[str],
    cfg: ModelConfig,
    dtype: Any,
    shardings: Any = None,
    progress: bool = False,
) -> Any:
    """The weights of an Orbax checkpoint or Hugging Face directory, as ``cfg``'s model
    declares them, placed by ``shardings`` (a tree matching the declarations) if given."""
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
    return load_hf_params(path, specs, dtype, shardings, progress=progress)


def default_model_path() -> str:
    """The small Shakespeare model shipped inside the package."""
    return os.path.join(os.path.dirname(__file__), "assets", "shakespeare-llama")


def random_model(
    shape: str, dtype: str | Any = "auto", seed: int = 0, parallel: Any = None
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
    dt = resolve_dtype(dtype)
    cfg, mesh, shardings = placement(cfg, parallel)
    specs = get_model(cfg).param_specs(cfg)
    params = init_params(specs, jax.random.key(seed), dt, shardings=shardings)
    tokenizer = None
    embedded = default_model_path()
    if os.path.isfile(os.path.join(embedded, "tokenizer.json")):
        tok = Tokenizer.from_dir(embedded)
        if tok.vocab_size <= cfg.vocab_size:
            tokenizer = tok
    params = _stage_layers(params, cfg, mesh)
    return LoadedModel(f"random:{shape}", cfg, params, tokenizer, dt, mesh, parallel)
