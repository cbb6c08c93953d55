"""Tiny random mixture-of-experts models written by transformers' own classes."""

from __future__ import annotations

from typing import Any

from tests.hf_models import COMMON

# name -> (transformers config class, model class, config overrides). Together they
# cover top-k 1, 2 and 8, renormalised and raw top-k weights, a shared expert with
# a dense layer beside the expert layers, and more experts than a step has tokens.
TINY_MOE: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4)),
    "mixtral-top1": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=32),
    ),
    "qwen3_moe-top8": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_experts=16, num_experts_per_tok=8, moe_intermediate_size=32, norm_topk_prob=True,
            head_dim=32,
        ),
    ),
    "qwen3_moe-64": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=64, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=False),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32,
            shared_expert_intermediate_size=96, norm_topk_prob=False, num_hidden_layers=3,
            mlp_only_layers=[1],
        ),
    ),
}  # fmt: skip


def make_tiny_moe(name: str, out_dir: str, seed: int = 0, **overrides: Any) -> str:
    """Saves a random float32 model; norms perturbed around 1, the rest N(0, 0.15)."""
    import torch
    import transformers

    config_name, model_name, extra = TINY_MOE[name]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in pname else 0.15 * noise)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
