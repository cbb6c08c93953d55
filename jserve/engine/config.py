"""Engine settings, validated before anything is allocated."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

import pallas_kernels
from jserve.errors import ConfigError
from jserve.spec.config import SpeculativeConfig


def geometric_buckets(low: int, high: int, factor: int = 2) -> tuple[int, ...]:
    """``low`` times powers of ``factor`` below ``high``, with ``high`` itself last.

    E.g. (8, 48) -> (8, 16, 32, 48); (4, 64, factor=4) -> (4, 16, 64).
    """
    out = []
    b = low
    while b < high:
        out.append(b)
        b *= factor
    out.append(high)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int | None = None  # None: size the pool from free device memory
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    max_logprobs: int = 20
    max_waiting: int = 4096  # requests queued beyond this are refused (backpressure)
    memory_utilization: float = 0.9  # fraction of free device memory the KV pool may take
    attention_backend: str = "auto"
    async_scheduling: bool = True  # prepare step N+1 while the device runs step N
    seed: int = 0
    min_token_bucket: int | None = None  # None: 1 on CPU, 16 on accelerators
    # Speculative decoding (jserve.spec), as vLLM's dict or a SpeculativeConfig; None: off.
    speculative_config: SpeculativeConfig | Mapping[str, Any] | str | None = None
    # Multi-LoRA serving (jserve.lora): adapter slots on the device, their rank, and
    # adapters kept in host memory (None: max_loras).
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        spec = self.speculative_config
        if spec is not None and not isinstance(spec, SpeculativeConfig):
            # Frozen: the one normalisation, done before anything reads the field.
            object.__setattr__(self, "speculative_config", SpeculativeConfig.from_dict(spec))

    def validate(self) -> EngineConfig:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

        for name in ("page_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            positive(name)
        if self.num_pages is not None:
            positive("num_pages")
        if self.max_model_len is not None:
            positive("max_model_len")
        if self.min_token_bucket is not None:
            positive("min_token_bucket")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs}) so every running sequence can decode"
            )
        if not 0.0 < self.memory_utilization <= 1.0:
            raise ConfigError(
                f"memory_utilization must be in (0, 1], got {self.memory_utilization}"
            )
        if self.attention_backend not in pallas_kernels.BACKENDS:
            raise ConfigError(
                f"attention_backend {self.attention_backend!r} is unknown; choose one of "
                f"{pallas_kernels.BACKENDS}"
            )
        if self.max_logprobs < 0:
            raise ConfigError(f"max_logprobs must be >= 0, got {self.max_logprobs}")
        if isinstance(self.speculative_config, SpeculativeConfig):
            self.speculative_config.validate()
        if self.enable_lora:
            for name in ("max_loras", "max_lora_rank"):
                positive(name)
            if self.max_cpu_loras is not None:
                positive("max_cpu_loras")
                if self.max_cpu_loras < self.max_loras:
                    raise ConfigError(
                        f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras "
                        f"({self.max_loras}), so host memory can hold as many adapters as the "
                        "device slots"
                    )
        return self

    @property
    def cpu_loras(self) -> int:
        """Adapters kept in host memory."""
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras

    def token_buckets(self) -> tuple[int, ...]:
        low = self.min_token_bucket
        if low is None:
            # On a CPU every padded token row costs compute; an accelerator reads
            # the weights once whatever the row count, so fewer programs win.
            low = 1 if jax.default_backend() == "cpu" else 16
        return geometric_buckets(min(low, self.max_num_batched_tokens), self.max_num_batched_tokens)
