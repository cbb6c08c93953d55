"""PEFT LoRA adapters made with peft itself on tiny random models, and their references."""

from __future__ import annotations

import os
from typing import Any

from tests.hf_models import model_greedy

# Three adapters of different ranks and target modules (the acceptance mix).
ADAPTERS: dict[str, dict[str, Any]] = {
    "qv8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all4": dict(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    ),
    "mlp16": dict(
        r=16,
        lora_alpha=24,
        target_modules=["o_proj", "gate_proj", "down_proj"],
        rank_pattern={"down_proj": 6},
        alpha_pattern={"layers.1.mlp.gate_proj": 5},  # PEFT's dotted-suffix match
    ),
}


def make_peft_adapter(
    base_dir: str, out_dir: str, seed: int = 0, scale: float = 0.2, **lora: Any
) -> str:
    """Saves a PEFT adapter with random (non-zero) A and B for ``base_dir``'s model."""
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora)
    pm = peft.get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    pm.save_pretrained(out_dir)
    assert os.path.exists(os.path.join(out_dir, "adapter_model.safetensors"))
    return out_dir


def merged_greedy(base_dir: str, adapter_dir: str | None, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of transformers with the adapter merged into the base weights."""
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()
    return model_greedy(model, prompt, n)
