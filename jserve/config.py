"""Model configuration read from a Hugging Face ``config.json``.

The config is a frozen, hashable dataclass so it can be a static argument of
jitted functions. Only the fields the forward pass needs are kept; everything
is validated here so that a bad checkpoint fails with a readable message
instead of a shape error deep inside JAX.

``ModelConfig`` holds what every family has (sizes, heads, RoPE, sliding
windows, token ids); a family's own switches live in ``cfg.options``, a frozen
``FamilyOptions`` subclass (``LlamaOptions`` for the Llama family). A new
family plugs in at three places: its architecture in
``SUPPORTED_ARCHITECTURES``, a parser of its fields in ``FAMILY_OPTIONS``
(and, to be exported, a case in ``config_to_dict``), and its implementation
in the ``jserve.models`` registry (``get_model``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

from checkpoints.files import read_json
from checkpoints.hf_export import dtype_name
from jserve.errors import ConfigError

# Sizes go into int32 device arrays and shapes; the deepest published models have
# under 200 layers, and declaring a million of them would take minutes.
MAX_INT32 = 2**31 - 1
MAX_LAYERS = 1024

# Architectures jserve implements, mapped to the family that decides the
# small differences between them (qkv bias, q/k norm, sliding window).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}

# Mixture-of-experts families: attention exactly as the dense family named here,
# the MLP replaced by routed experts (see jserve.models.moe).
MOE_ATTENTION_FAMILY: dict[str, str] = {
    "mixtral": "mistral",
    "qwen2_moe": "qwen2",
    "qwen3_moe": "qwen3",
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class FamilyOptions:
    """Base of the fields only some families have; each family subclasses it."""


@dataclasses.dataclass(frozen=True)
class LlamaOptions(FamilyOptions):
    """The Llama family's switches (Llama, Mistral, Qwen2 and Qwen3 differ only in these)."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


@dataclasses.dataclass(frozen=True)
class MoeOptions(LlamaOptions):
    """A mixture-of-experts family's fields (Mixtral, Qwen2-MoE, Qwen3-MoE): Llama attention,
    and in the layers ``moe_layers`` marks, ``num_experts`` routed MLPs of which each token
    uses ``top_k`` (softmax over all experts, then top-k, renormalised when
    ``norm_topk_prob``), plus a shared MLP behind a sigmoid gate when
    ``shared_expert_size`` > 0 (Qwen2-MoE)."""

    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_size: int = 0
    moe_layers: tuple[bool, ...] = ()
    # Experts split over the tensor-parallel devices (each holds whole experts)
    # instead of every expert's hidden units; set by the parallel layout.
    expert_parallel: bool = False


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
    rope_scaling: RopeScaling | None = None
    # One entry per layer: the sliding window in tokens, or None for full attention.
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    # Copies of each checkpoint KV head held in num_kv_heads: above 1 when tensor
    # parallelism splits more ways than the model has KV heads.
    kv_repeat: int = 1
    # The family's own fields (see FAMILY_OPTIONS).
    options: FamilyOptions = FamilyOptions()
    # How the weights are stored (a jserve.models.quant.QuantConfig), None for float.
    quant: Any = None
    # Quantized KV pages (a jserve.models.kv_quant.KVCacheConfig), None for the model dtype.
    kv_cache: Any = None

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
        mlp = 3 * e * f * self.num_layers
        if isinstance(self.options, MoeOptions):  # routed experts, router, shared expert
            o = self.options
            moe = o.num_experts * (3 * e * o.moe_intermediate_size + e)
            moe += 3 * e * o.shared_expert_size + (e if o.shared_expert_size else 0)
            mlp = sum(moe if m else 3 * e * f for m in o.moe_layers)
        per_layer = attn + 2 * e
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + self.num_layers * per_layer + mlp + e + head

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
            if _positive(value, key) > MAX_INT32:
                raise ConfigError(f"config.json: {key} {value} does not fit in 32 bits")
        if self.num_layers > MAX_LAYERS:
            raise ConfigError(
                f"config.json: num_hidden_layers {self.num_layers} is more than jserve "
                f"supports ({MAX_LAYERS}); is the config corrupt?"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim must be even for RoPE, got {self.head_dim}")
        if not (math.isfinite(self.rms_norm_eps) and 0 < self.rms_norm_eps < 1):
            raise ConfigError(
                f"config.json: rms_norm_eps must be in (0, 1), got {self.rms_norm_eps}"
            )
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
        s = self.rope_scaling
        if s is not None:
            if not all(
                math.isfinite(v) and v > 0
                for v in (s.factor, s.low_freq_factor, s.high_freq_factor)
            ) or not (s.high_freq_factor > s.low_freq_factor):
                raise ConfigError(
                    "config.json: llama3 rope scaling needs positive factor and "
                    f"low_freq_factor < high_freq_factor, got {s}"
                )
            if s.original_max_position_embeddings <= 0:
                raise ConfigError(
                    "config.json: rope scaling original_max_position_embeddings must be "
                    f"positive, got {s.original_max_position_embeddings}"
                )
        for t in self.eos_token_ids:
            if not 0 <= t < self.vocab_size:
                raise ConfigError(
                    f"eos_token_id {t} is outside the vocabulary (size {self.vocab_size})"
                )
        if self.bos_token_id is not None and not (
            isinstance(self.bos_token_id, int) and 0 <= self.bos_token_id < self.vocab_size
        ):
            raise ConfigError(
                f"config.json: bos_token_id {self.bos_token_id!r} is not a token id of the "
                f"vocabulary (size {self.vocab_size})"
            )
        return self


def _int(value: Any, key: str) -> int:
    """A config integer: an int, or a float with an integral value (never a bool)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config.json: {key} must be an integer, got {value!r}")
    return value


def _positive(value: Any, key: str) -> int:
    """``value`` if it is a positive int (never a bool); parse config text with ``_int``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


def _float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"config.json: {key} must be a number, got {value!r}")
    return float(value)


def _object(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"config.json: {key} must be an object, got {value!r}")
    return value


def _rope_fields(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes `rope_parameters`; older files have `rope_theta`
    # and `rope_scaling` at the top level. Accept both.
    params = _object(raw, "rope_parameters")
    scaling = _object(raw, "rope_scaling") or params
    theta = _float(params.get("rope_theta", raw.get("rope_theta", 10000.0)), "rope_theta")
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
            factor=_float(scaling["factor"], "rope_scaling.factor"),
            low_freq_factor=_float(scaling["low_freq_factor"], "rope_scaling.low_freq_factor"),
            high_freq_factor=_float(scaling["high_freq_factor"], "rope_scaling.high_freq_factor"),
            original_max_position_embeddings=_int(
                scaling["original_max_position_embeddings"],
                "rope_scaling.original_max_position_embeddings",
            ),
        )
    except KeyError as e:
        raise ConfigError(f"config.json: llama3 rope scaling is missing {e.args[0]!r}") from None


def _sliding_windows(raw: dict[str, Any], family: str, num_layers: int) -> tuple[int | None, ...]:
    family = MOE_ATTENTION_FAMILY.get(family, family)
    window = raw.get("sliding_window")
    if window is not None:
        window = _int(window, "sliding_window")
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list):
            raise ConfigError(f"config.json: layer_types must be a list, got {layer_types!r}")
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
        first = _int(raw.get("max_window_layers", num_layers), "max_window_layers")
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    return (None,) * num_layers


def _as_ids(value: Any, key: str = "config.json: eos_token_id") -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ConfigError(f"{key} must be a token id or a list of them, got {value!r}")
    return tuple(value)


def _llama_options(raw: dict[str, Any], family: str) -> LlamaOptions:
    attention_bias = bool(raw.get("attention_bias", False))
    return LlamaOptions(
        # Qwen2 always has q/k/v biases; Mistral never has any; Llama and Qwen3
        # put `attention_bias` on all four projections.
        qkv_bias=family == "qwen2" or (attention_bias and family in ("llama", "qwen3")),
        o_bias=attention_bias and family in ("llama", "qwen3"),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=family == "qwen3",
    )


def _moe_options(raw: dict[str, Any], family: str) -> MoeOptions:
    base = MOE_ATTENTION_FAMILY[family]
    attn = _llama_options(raw, base)
    if family == "qwen2_moe":  # Qwen2-MoE's q/k/v biases are a config switch
        attn = dataclasses.replace(attn, qkv_bias=bool(raw.get("qkv_bias", True)))

    def count(key: str, value: Any) -> int:
        return _positive(value if value is None else _int(value, key), key)

    num_layers = _int(raw["num_hidden_layers"], "num_hidden_layers")
    if family == "mixtral":
        experts, inter, norm = raw.get("num_local_experts", 8), raw["intermediate_size"], True
        sparse = [True] * num_layers
    else:
        experts = raw.get("num_experts", raw.get("num_local_experts"))
        inter, norm = raw.get("moe_intermediate_size"), bool(raw.get("norm_topk_prob", False))
        step = count("decoder_sparse_step", raw.get("decoder_sparse_step") or 1)
        dense = raw.get("mlp_only_layers") or []
        if not isinstance(dense, list):
            raise ConfigError(f"config.json: mlp_only_layers must be a list, got {dense!r}")
        dense = {_int(i, "mlp_only_layers") for i in dense}
        sparse = [i not in dense and (i + 1) % step == 0 for i in range(num_layers)]
    top_k = raw.get("num_experts_per_tok", 2)
    shared = 0
    if family == "qwen2_moe":
        key = "shared_expert_intermediate_size"
        shared = _int(raw.get(key) or 0, key)
    experts, top_k = count("num_experts", experts), count("num_experts_per_tok", top_k)
    inter = count("moe_intermediate_size", inter)
    if top_k > experts:
        raise ConfigError(
            f"config.json: num_experts_per_tok ({top_k}) exceeds the {experts} experts"
        )
    if not any(sparse):
        raise ConfigError(
            f"config.json: {family} config has no expert layers (decoder_sparse_step / "
            "mlp_only_layers leave every layer dense); serve it as the dense family"
        )
    return MoeOptions(
        **dataclasses.asdict(attn),
        num_experts=experts,
        top_k=top_k,
        moe_intermediate_size=inter,
        norm_topk_prob=norm,
        shared_expert_size=shared,
        moe_layers=tuple(sparse),
    )


def llama_options(cfg: ModelConfig) -> LlamaOptions:
    """``cfg.options`` of a Llama-family config."""
    if not isinstance(cfg.options, LlamaOptions):
        raise ConfigError(
            f"family {cfg.family!r} needs LlamaOptions in ModelConfig.options, got "
            f"{cfg.options!r}; build the config with config_from_dict or pass options="
        )
    return cfg.options


# Family -> parser of its own fields from the raw config.json (into cfg.options).
FAMILY_OPTIONS: dict[str, Callable[[dict[str, Any], str], FamilyOptions]] = {
    "llama": _llama_options,
    "mistral": _llama_options,
    "qwen2": _llama_options,
    "qwen3": _llama_options,
    "mixtral": _moe_options,
    "qwen2_moe": _moe_options,
    "qwen3_moe": _moe_options,
}


def _quant_config(raw: dict[str, Any]) -> Any:
    """The checkpoint's weight format from ``quantization_config`` (None for float)."""
    from jserve.models.quant_formats import from_hf_config

    return from_hf_config(raw)


def config_from_dict(raw: dict[str, Any], name: str = "") -> ModelConfig:
    """Builds a ModelConfig from the parsed contents of a Hugging Face config.json."""
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"config.json: architectures must be a list of names, got {archs!r}")
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
        hidden = _int(raw["hidden_size"], "hidden_size")
        heads = _int(raw["num_attention_heads"], "num_attention_heads")
        num_layers = _int(raw["num_hidden_layers"], "num_hidden_layers")
        vocab = _int(raw["vocab_size"], "vocab_size")
        inter = _int(raw["intermediate_size"], "intermediate_size")
    except KeyError as e:
        raise ConfigError(f"config.json is missing the required field {e.args[0]!r}") from None
    if not 0 < num_layers <= MAX_LAYERS:  # before anything is built per layer
        raise ConfigError(
            f"config.json: num_hidden_layers must be in [1, {MAX_LAYERS}], got {num_layers}"
        )
    head_dim = _int(raw.get("head_dim") or (hidden // heads if heads > 0 else 0), "head_dim")
    bos = raw.get("bos_token_id")
    if bos is not None:
        bos = _int(bos, "bos_token_id")
    theta, scaling = _rope_fields(raw)
    # The generation config's eos ids take precedence; this is the fallback.
    return ModelConfig(
        architecture=arch,
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=num_layers,
        num_q_heads=heads,
        num_kv_heads=_int(raw.get("num_key_value_heads") or heads, "num_key_value_heads"),
        head_dim=head_dim,
        rms_norm_eps=_float(raw.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        rope_theta=theta,
        max_position_embeddings=_int(
            raw.get("max_position_embeddings", 2048), "max_position_embeddings"
        ),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope_scaling=scaling,
        sliding_windows=_sliding_windows(raw, family, num_layers),
        bos_token_id=bos,
        eos_token_ids=_as_ids(raw.get("eos_token_id")),
        name=name,
        options=FAMILY_OPTIONS[family](raw, family),
        quant=_quant_config(raw),
    ).validate()


def load_config(model_dir: str | os.PathLike[str]) -> ModelConfig:
    """Reads ``config.json`` (and ``generation_config.json`` eos ids) from a model directory."""
    path = os.path.join(model_dir, "config.json")
    raw = read_json(path, ConfigError, required=False)
    if raw is None:
        raise ConfigError(
            f"{path} not found: a model directory needs a Hugging Face config.json "
            "(pass the directory that save_pretrained wrote)"
        )
    cfg = config_from_dict(raw, name=os.path.basename(os.path.normpath(model_dir)))
    gen_path = os.path.join(model_dir, "generation_config.json")
    gen = read_json(gen_path, ConfigError, required=False)
    if gen is not None:
        eos = _as_ids(gen.get("eos_token_id"), f"{gen_path}: eos_token_id")
        if eos:
            cfg = cfg.replace(eos_token_ids=eos).validate()
    return cfg


def _check_expressible(cfg: ModelConfig) -> None:
    """Raises ConfigError when Hugging Face's class for the family cannot hold cfg."""
    fam = MOE_ATTENTION_FAMILY.get(cfg.family, cfg.family)
    if cfg.architecture not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"unknown architecture {cfg.architecture!r}")
    opts = llama_options(cfg)
    problems = []
    if fam == "qwen2":
        # Qwen2 always has q/k/v biases; Qwen2-MoE has a switch for them.
        if (not opts.qkv_bias and cfg.family == "qwen2") or opts.o_bias:
            problems.append("Qwen2 always has q/k/v biases and never an o_proj bias")
    elif fam == "mistral":
        if opts.qkv_bias or opts.o_bias:
            problems.append("Mistral has no attention biases")
    elif opts.qkv_bias != opts.o_bias:
        problems.append("attention_bias covers q/k/v and o_proj together")
    if opts.mlp_bias and fam != "llama":
        problems.append("only Llama has mlp_bias")
    if opts.qk_norm != (fam == "qwen3"):
        problems.append("q/k norm exists exactly in Qwen3")
    windows = {w for w in cfg.sliding_windows if w is not None}
    if windows and fam == "llama":
        problems.append("Llama has no sliding-window attention")
    if len(windows) > 1:
        problems.append(f"one sliding window size for all layers, got {sorted(windows)}")
    if fam == "mistral" and windows and None in cfg.sliding_windows:
        problems.append("Mistral slides the window in every layer or none")
    if problems:
        raise ConfigError(f"{cfg.architecture} cannot express this config: {'; '.join(problems)}")


def ids_or_list(ids: tuple[int, ...]) -> int | list[int] | None:
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else list(ids)


def config_to_dict(cfg: ModelConfig, dtype: Any = "float32") -> dict[str, Any]:
    """The Hugging Face ``config.json`` contents for cfg (inverse of ``config_from_dict``)."""
    _check_expressible(cfg)
    fam = MOE_ATTENTION_FAMILY.get(cfg.family, cfg.family)
    opts = llama_options(cfg)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    saved_dtype = dtype_name(dtype)
    out: dict[str, Any] = {
        "architectures": [cfg.architecture],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_q_heads,
        "num_key_value_heads": cfg.source_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        # transformers >= 5 reads rope_parameters; older versions the top-level keys.
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": ids_or_list(cfg.eos_token_ids),
        "pad_token_id": None,
        "dtype": saved_dtype,
        "torch_dtype": saved_dtype,
    }
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = dict(rope)
    if fam in ("llama", "qwen3"):
        out["attention_bias"] = opts.qkv_bias
    if fam == "llama":
        out["mlp_bias"] = opts.mlp_bias
    window = next((w for w in cfg.sliding_windows if w is not None), None)
    if fam == "mistral":
        out["sliding_window"] = window
    elif fam in ("qwen2", "qwen3"):
        out["use_sliding_window"] = window is not None
        out["sliding_window"] = window
        first = next((i for i, w in enumerate(cfg.sliding_windows) if w is not None), None)
        out["max_window_layers"] = cfg.num_layers if first is None else first
        out["layer_types"] = [
            "full_attention" if w is None else "sliding_attention" for w in cfg.sliding_windows
        ]
    if isinstance(cfg.options, MoeOptions):
        out.update(_moe_fields(cfg, cfg.options))
    return out


def _moe_fields(cfg: ModelConfig, o: MoeOptions) -> dict[str, Any]:
    """The config.json keys of a mixture-of-experts family (inverse of ``_moe_options``)."""
    out: dict[str, Any] = {"num_experts_per_tok": o.top_k, "output_router_logits": False}
    if cfg.family == "mixtral":
        if o.moe_intermediate_size != cfg.intermediate_size or not o.norm_topk_prob:
            raise ConfigError(
                "MixtralForCausalLM cannot express this config: its experts are "
                "intermediate_size wide and their top-k weights are always renormalised"
            )
        return {**out, "num_local_experts": o.num_experts, "router_jitter_noise": 0.0}
    dense = [i for i, m in enumerate(o.moe_layers) if not m]
    out.update(
        num_experts=o.num_experts,
        moe_intermediate_size=o.moe_intermediate_size,
        norm_topk_prob=o.norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=dense,
    )
    if cfg.family == "qwen2_moe":
        if not o.shared_expert_size:
            raise ConfigError("Qwen2MoeForCausalLM cannot express a config without a shared expert")
        out.update(shared_expert_intermediate_size=o.shared_expert_size, qkv_bias=o.qkv_bias)
    elif o.shared_expert_size:
        raise ConfigError(f"{cfg.architecture} has no shared expert")
    return out
