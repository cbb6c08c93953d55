"""Model configuration read from a Hugging Face ``config.json``.

The config is a frozen, hashable dataclass so it can be a static argument of
jitted functions. Only the fields the forward pass needs are kept; everything
is validated here so that a bad checkpoint fails with a readable message
instead of a shape error deep inside JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from jserve.errors import ConfigError

# Architectures jserve implements, mapped to the family that decides the
# small differences between them (qkv bias, q/k norm, sliding window).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope_scaling: RopeScaling | None = None
    # One entry per layer: the sliding window in tokens, or None for full attention.
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    # Copies of each checkpoint KV head held in num_kv_heads: above 1 when tensor
    # parallelism splits more ways than the model has KV heads.
    kv_repeat: int = 1

    @property
    def source_kv_heads(self) -> int:
        """KV heads as the checkpoint stores them."""
        return self.num_kv_heads // self.kv_repeat

    def with_kv_heads_for(self, tensor_parallel_size: int) -> ModelConfig:
        """Replicates KV heads so each of ``tensor_parallel_size`` devices holds whole heads.

        E.g. 8 KV heads on 16 devices: each head is held twice (kv_repeat 2), and
        query heads 2j and 2j+1 of each original group share one copy.
        """
        src = self.source_kv_heads
        if tensor_parallel_size <= src:
            return self
        return self.replace(
            num_kv_heads=tensor_parallel_size, kv_repeat=tensor_parallel_size // src
        )

    @property
    def q_per_kv(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = e * (self.num_q_heads + 2 * self.source_kv_heads) * d + self.num_q_heads * d * e
        mlp = 3 * e * f
        per_layer = attn + mlp + 2 * e
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + self.num_layers * per_layer + e + head

    def validate(self) -> ModelConfig:
        positive = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_q_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
        }
        for key, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config.json: {key} must be a positive integer, got {value!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_q_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if len(self.sliding_windows) != self.num_layers:
            raise ConfigError(
                f"config.json: {len(self.sliding_windows)} layer types for {self.num_layers} layers"
            )
        for w in self.sliding_windows:
            if w is not None and w <= 0:
                raise ConfigError(f"config.json: sliding_window must be positive, got {w}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"config.json: rope_theta must be positive, got {self.rope_theta}")
        for t in self.eos_token_ids:
            if not 0 <= t < self.vocab_size:
                raise ConfigError(
                    f"eos_token_id {t} is outside the vocabulary (size {self.vocab_size})"
                )
        return self


def _rope_fields(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes `rope_parameters`; older files have `rope_theta`
    # and `rope_scaling` at the top level. Accept both.
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or params
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = (scaling or {}).get("rope_type", scaling.get("type") if scaling else None)
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise ConfigError(
            f"config.json: rope type {rope_type!r} is not supported; jserve implements "
            "'default' and 'llama3' RoPE"
        )
    try:
        return float(theta), RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"config.json: llama3 rope scaling is missing {e.args[0]!r}") from None


def _sliding_windows(raw: dict[str, Any], family: str, num_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise ConfigError(
                f"config.json: layer_types has {len(layer_types)} entries for {num_layers} layers"
            )
        out = []
        for t in layer_types:
            if t == "sliding_attention":
                if not window:
                    raise ConfigError("config.json: sliding_attention layer but no sliding_window")
                out.append(int(window))
            elif t == "full_attention":
                out.append(None)
            else:
                raise ConfigError(f"config.json: unknown layer type {t!r}")
        return tuple(out)
    if family == "mistral":
        return (int(window) if window else None,) * num_layers
    if family in ("qwen2", "qwen3") and raw.get("use_sliding_window") and window:
        first = int(raw.get("max_window_layers", num_layers))
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    return (None,) * num_layers


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def config_from_dict(raw: dict[str, Any], name: str = "") -> ModelConfig:
    """Builds a ModelConfig from the parsed contents of a Hugging Face config.json."""
    archs = raw.get("architectures") or []
    if not archs:
        raise ConfigError(
            "config.json has no 'architectures' entry; jserve needs one of "
            f"{sorted(SUPPORTED_ARCHITECTURES)}"
        )
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"architecture {arch!r} is not supported; jserve supports "
            f"{sorted(SUPPORTED_ARCHITECTURES)}"
        )
    family = SUPPORTED_ARCHITECTURES[arch]
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        num_layers = int(raw["num_hidden_layers"])
        vocab = int(raw["vocab_size"])
        inter = int(raw["intermediate_size"])
    except KeyError as e:
        raise ConfigError(f"config.json is missing the required field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.json has a malformed field: {e}") from None
    head_dim = raw.get("head_dim") or (hidden // heads if heads else 0)
    theta, scaling = _rope_fields(raw)
    attention_bias = bool(raw.get("attention_bias", False))
    # The generation config's eos ids take precedence; this is the fallback.
    return ModelConfig(
        architecture=arch,
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=num_layers,
        num_q_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; Mistral never has any; Llama and Qwen3
        # put `attention_bias` on all four projections.
        qkv_bias=family == "qwen2" or (attention_bias and family in ("llama", "qwen3")),
        o_bias=attention_bias and family in ("llama", "qwen3"),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=family == "qwen3",
        rope_scaling=scaling,
        sliding_windows=_sliding_windows(raw, family, num_layers),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_as_ids(raw.get("eos_token_id")),
        name=name,
    ).validate()


def load_config(model_dir: str | os.PathLike[str]) -> ModelConfig:
    """Reads ``config.json`` (and ``generation_config.json`` eos ids) from a model directory."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(
            f"{path} not found: a model directory needs a Hugging Face config.json "
            "(pass the directory that save_pretrained wrote)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    cfg = config_from_dict(raw, name=os.path.basename(os.path.normpath(model_dir)))
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path, encoding="utf-8") as f:
            gen = json.load(f)
        eos = _as_ids(gen.get("eos_token_id"))
        if eos:
            cfg = cfg.replace(eos_token_ids=eos).validate()
    return cfg
