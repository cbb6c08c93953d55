"""Builds tiny random-weight models with transformers' own classes and save_pretrained."""

from __future__ import annotations

from typing import Any

import numpy as np

COMMON: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

# Each architecture exercises its own features: Llama-3 RoPE scaling, tied
# embeddings and biases; Mistral's sliding window (shorter than the prompts);
# Qwen2's qkv bias; Qwen3's q/k norm with a head_dim that is not hidden/heads.
TINY_ARCHS: dict[str, dict[str, Any]] = {
    "llama": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        rope_theta=500000.0,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
    ),
    "mistral": dict(sliding_window=8, num_key_value_heads=1),
    "qwen2": dict(num_key_value_heads=4),
    "qwen3": dict(head_dim=32),
}


def hf_classes(arch: str) -> tuple[type, type]:
    import transformers

    names = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    }[arch]
    return getattr(transformers, names[0]), getattr(transformers, names[1])


def make_tiny_hf_model(
    arch: str, out_dir: str, seed: int = 0, scale: float = 0.15, **overrides: Any
) -> str:
    """Saves a random float32 model; weights are perturbed so biases and norms matter."""
    import torch

    config_cls, model_cls = hf_classes(arch)
    config = config_cls(**{**COMMON, **TINY_ARCHS[arch], **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(scale * noise)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def hf_logits(model_dir: str, prompt: list[int]) -> np.ndarray:
    """[L, V] float32 logits from transformers for one unpadded prompt."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        out = model(torch.tensor([prompt]))
    return out.logits[0].numpy()


def hf_greedy(model_dir: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return model_greedy(model, prompt, max_new_tokens)


def model_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens of a loaded transformers model after ``prompt``."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, len(prompt) :].tolist()


CORPUS = (
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
    "First Citizen: You are all resolved rather to die than to famish? All: Resolved. "
    "Ünïcödé — 日本語 ✓ 🙂 numbers 0123456789 and punctuation !?;:()[]{}\n"
)


def make_tiny_model_with_tokenizer(out_dir: str, vocab_size: int = 320, **overrides: Any) -> str:
    """A tiny random Llama plus a byte-level BPE tokenizer whose eos is <|endoftext|> (id 0)."""
    import json
    import os

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 10, trainer)
    assert tok.get_vocab_size() <= vocab_size
    make_tiny_hf_model("llama", out_dir, vocab_size=vocab_size, eos_token_id=0, **overrides)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>"}, f)
    return out_dir
