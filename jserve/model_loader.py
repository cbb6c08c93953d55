"""Resolves a model argument to a loaded (config, params, tokenizer)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp

from jserve.config import ModelConfig, load_config
from jserve.errors import ConfigError
from jserve.tokenizer import Tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class LoadedModel:
    path: str
    cfg: ModelConfig
    params: Any
    tokenizer: Tokenizer | None
    dtype: Any


def resolve_dtype(dtype: str | Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


def load_model(model: str | os.PathLike[str], dtype: str | Any = "bfloat16") -> LoadedModel:
    """Loads a Hugging Face model directory (config, safetensors weights, tokenizer)."""
    from checkpoints import load_hf_params

    path = os.fspath(model)
    if not os.path.isdir(path):
        raise ConfigError(
            f"model {path!r} is not a directory; pass a local Hugging Face model directory "
            "(models are never downloaded)"
        )
    cfg = load_config(path)
    dt = resolve_dtype(dtype)
    params = load_hf_params(path, cfg, dt)
    tokenizer = None
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        tokenizer = Tokenizer.from_dir(path, cfg.eos_token_ids)
        if tokenizer.eos_token_ids and not cfg.eos_token_ids:
            cfg = cfg.replace(eos_token_ids=tokenizer.eos_token_ids)
    return LoadedModel(path, cfg, params, tokenizer, dt)
