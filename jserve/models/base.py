"""The interface every model family implements, and the attention callable it takes.

A family's implementation is any object with these functions (the Llama
family's is the ``jserve.models.llama`` module itself); ``jserve.models.get_model``
picks it by ``cfg.family``. Every function is pure: params and config in,
arrays out, with the config a static (hashable) jit argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import jax

from jserve.config import ModelConfig
from jserve.models.attention import AttentionMetadata

State = TypeVar("State")

# attend(q [..., Hq, D], k [..., Hkv, D], v [..., Hkv, D], state) -> (out [..., Hq, D], state).
# The state is whatever the attention keeps between steps: one layer's KV pages
# for the paged path, None for dense attention, a contiguous KV cache for a
# benchmark. The callable closes over the rest (metadata, scale, sliding window).
Attend = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


class Model(Protocol):
    """One model family's functions. Shapes: T flat tokens, B batch, L length,
    E hidden size, V vocabulary."""

    def param_specs(self, cfg: ModelConfig) -> dict[str, Any]:
        """The weight declarations tree (a ``ParamSpec`` per weight)."""
        ...

    def embed(self, params: dict[str, Any], cfg: ModelConfig, ids: jax.Array) -> jax.Array:
        """Token ids [...] -> hidden states [..., E]."""
        ...

    def decoder_layer(
        self,
        lp: dict[str, jax.Array],
        cfg: ModelConfig,
        x: jax.Array,
        positions: jax.Array,
        attend: Attend,
        state: State,
        md: AttentionMetadata | None = None,
    ) -> tuple[jax.Array, State]:
        """One block: x [..., E] at positions [...] -> (x [..., E], attend's new state).
        ``md`` is the step's metadata when attending over pages (a mixture-of-experts
        layer reads which tokens are padding and the mesh from it), None otherwise."""
        ...

    def final_norm(self, params: dict[str, Any], cfg: ModelConfig, x: jax.Array) -> jax.Array:
        """The norm after the last layer, [..., E] -> [..., E]."""
        ...

    def compute_logits(
        self, params: dict[str, Any], cfg: ModelConfig, hidden: jax.Array
    ) -> jax.Array:
        """Final hidden states [N, E] -> float32 logits [N, V]."""
        ...

    def paged_attend(
        self, cfg: ModelConfig, md: AttentionMetadata, sliding_window: int | None
    ) -> Attend:
        """Attention over a flat ragged batch; its state is one layer's KV pages
        [P, S, 2*Hkv, D], into which it first writes this step's K/V."""
        ...

    def dense_attend(self, cfg: ModelConfig, sliding_window: int | None) -> Attend:
        """Causal attention within a padded batch [B, L, H, D]; its state is None."""
        ...

    def forward(
        self,
        params: dict[str, Any],
        cfg: ModelConfig,
        input_ids: jax.Array,
        kv_pages: list[jax.Array],
        md: AttentionMetadata,
    ) -> tuple[jax.Array, list[jax.Array], dict[str, jax.Array]]:
        """One step over a flat ragged batch: ids i32[T], per-layer pages ->
        (final hidden states [T, E], new pages, statistics). The statistics are small
        arrays the step hands back to the host for metrics, e.g. ``expert_tokens``
        i32[layers, experts] for a mixture-of-experts model; {} for a dense one."""
        ...

    def forward_dense(
        self, params: dict[str, Any], cfg: ModelConfig, tokens: jax.Array
    ) -> jax.Array:
        """Causal forward over a padded batch i32[B, L] -> float32 logits [B, L, V], no cache."""
        ...
