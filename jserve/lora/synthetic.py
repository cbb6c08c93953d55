"""Random LoRA adapters in PEFT's format for a model, for benchmarks without adapters.

``jserve bench throughput --random-loras N`` writes N of these (every supported
module, rank ``--random-lora-rank``) and serves its requests through them; the
files are what PEFT writes (``adapter_config.json`` and
``adapter_model.safetensors``, tensors named as PEFT names them), so they load
through the same checks as any adapter.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from jserve.config import ModelConfig
from jserve.lora.adapter import TARGETS


def write_random_adapter(
    cfg: ModelConfig,
    out_dir: str,
    rank: int,
    seed: int = 0,
    modules: tuple[str, ...] = tuple(TARGETS),
    scale: float = 0.01,
) -> str:
    """A PEFT adapter with random A and B for ``cfg``'s decoder layers in ``out_dir``."""
    from jserve.models import llama

    rng = np.random.default_rng(seed)
    specs = llama.float_param_specs(cfg)["layers"]
    tensors = {}
    for i, layer in enumerate(specs):
        for module in modules:
            fused, part = TARGETS[module]
            out_dim, in_dim = layer[fused].source.shapes[part]
            where = "self_attn" if fused in ("wqkv", "wo") else "mlp"
            name = f"base_model.model.model.layers.{i}.{where}.{module}"
            tensors[f"{name}.lora_A.weight"] = (scale * rng.standard_normal((rank, in_dim))).astype(
                np.float32
            )
            tensors[f"{name}.lora_B.weight"] = (
                scale * rng.standard_normal((out_dim, rank))
            ).astype(np.float32)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(modules),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir
