"""Model families, looked up by ``cfg.family``.

``get_model(cfg)`` returns the family's implementation of ``base.Model``.
A new family adds its module here (and its config fields in ``jserve.config``).
"""

from __future__ import annotations

from jserve.config import ModelConfig
from jserve.errors import ConfigError
from jserve.models import llama, moe
from jserve.models.base import Attend, Model

# Family -> implementation. Mistral, Qwen2 and Qwen3 are Llama with switches
# (biases, q/k norm, sliding windows) set in cfg.options.
MODELS: dict[str, Model] = {
    "llama": llama,
    "mistral": llama,
    "qwen2": llama,
    "qwen3": llama,
    # Mixture-of-experts families: Llama attention, routed experts (jserve.models.moe).
    "mixtral": moe,
    "qwen2_moe": moe,
    "qwen3_moe": moe,
}


def get_model(cfg: ModelConfig) -> Model:
    """The implementation of ``cfg.family``; ConfigError for a family jserve lacks."""
    try:
        return MODELS[cfg.family]
    except KeyError:
        raise ConfigError(
            f"model family {cfg.family!r} has no implementation; jserve implements {sorted(MODELS)}"
        ) from None


__all__ = ["MODELS", "Attend", "Model", "get_model"]
