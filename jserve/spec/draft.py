"""Draft-model proposals on the device, at the start of the fused step.

The draft keeps its own paged KV pool with the target's page ids: page p of
the draft pool holds the draft's K/V for the same tokens as page p of the
target's, so one page table, one allocator and one prefix cache serve both,
and a page freed or copied for the target is freed or copied for the draft
(the copy-on-write program copies both pools).

Each step the draft first proposes: one lane per speculating sequence, k
single-token forwards in a loop, lane l feeding its last known token at
position start_l, then its proposals. Each proposal is drawn from the draft's
distribution processed exactly as the target row that verifies it will be
(penalties over the same history, banned ids, temperature, top-k, top-p,
min-p), and that distribution goes to the verification (``rejection.verify``).
After the target's forward the draft runs over the step's tokens too (its
catch-up), so its pool holds every token the target computed, prompts and
accepted proposals included; positions of rejected proposals are written
over later, as in the target's pool.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jserve.config import ModelConfig
from jserve.engine import sampler
from jserve.models import get_model
from jserve.models.attention import AttentionMetadata

# Per-row sampling fields, gathered for the row that verifies each proposal.
ROW_FIELDS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seeds",
    "sample_index",
    "out_position",
    "banned",
    "bias_ids",
    "bias_values",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "history_rows",
    "history_lens",
    "num_prompt",
)
_DRAFT_STREAM = 0xD7  # folded into a row's key for the draft's own draw


# One proposal step of a proposer: (its pool, the lanes' tokens i32[lanes], the state it
# carries from step to step, the lanes' metadata) -> (f32[lanes, V] logits, pool, state).
ForwardOne = Callable[
    [list[jax.Array], jax.Array, Any, AttentionMetadata], tuple[jax.Array, list[jax.Array], Any]
]


def propose(
    forward_one: ForwardOne,
    carried: Any,  # the first proposal step's state (None for a draft model)
    state: dict[str, Any],  # the proposer's state: its pool ("kv", per layer [P, S, 2*Hkv, D])
    table: jax.Array,  # i32[max_num_seqs + 1, pages_per_seq]
    history: jax.Array,  # i32[max_num_seqs + 1, max_model_len]
    ids: jax.Array,  # i32[T]: the step's inputs
    f: dict[str, jax.Array],
    *,
    vocab: int,
    num_speculative_tokens: int,
    page_size: int,
    backend: str,
    mesh: Any,
) -> tuple[dict[str, Any], jax.Array, jax.Array, dict[str, jax.Array], jax.Array]:
    """Every lane's proposals, placed as the step's inputs and as the rows' drafts:
    (state with the new pool, history, ids, the fields with ``draft_ids``, f32[R, V] the
    distribution each row's proposal was drawn from)."""
    lanes = f["lane_rows"].shape[0]
    rows = f["temperature"].shape[0]
    n = f["num_lanes"]
    lane_rows, start, lane_k = f["lane_rows"], f["lane_start"], f["lane_k"]
    active = jnp.arange(lanes) < n[0]
    pages = table[lane_rows]  # [lanes, pages_per_seq]
    cu = jnp.minimum(jnp.arange(lanes + 1), n[0]).astype(jnp.int32)
    pad_row = history.shape[0]

    def body(j: int, carry: tuple) -> tuple:
        kv, state, hist, tok, row_drafts, row_probs = carry
        pos = start + j
        live = active & (j < lane_k)
        col = jnp.minimum(pos // page_size, pages.shape[1] - 1)
        slot = jnp.take_along_axis(pages, col[:, None], axis=1)[:, 0] * page_size
        md = AttentionMetadata(
            positions=pos,
            slot_mapping=jnp.where(live, slot + pos % page_size, -1),
            kv_lens=jnp.where(active, pos + 1, 0),
            page_indices=pages,
            cu_q_lens=cu,
            num_seqs=n,
            backend=backend,
            mesh=mesh,
        )
        logits, kv, state = forward_one(kv, tok, state, md)  # [lanes, V]
        if mesh is not None:
            logits = jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, PartitionSpec()))
        row = jnp.where(live, f["lane_first_row"] + j, rows)  # the row verifying it
        g = {name: f[name][jnp.minimum(row, rows - 1)] for name in ROW_FIELDS}
        g["flags"] = f["flags"]
        logits = sampler.penalized_logits(logits, g, hist)
        scaled = sampler.scaled_logits(logits, g)
        keys = jax.vmap(lambda k: jax.random.fold_in(k, _DRAFT_STREAM))(sampler.row_keys(g))
        drawn = sampler.draw(scaled, keys)
        nxt = jnp.where(g["temperature"] > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)
        hist = hist.at[jnp.where(live, lane_rows, pad_row), pos + 1].set(nxt, mode="drop")
        row_drafts = row_drafts.at[row].set(nxt, mode="drop")
        row_probs = row_probs.at[row].set(jax.nn.softmax(scaled, axis=-1), mode="drop")
        return kv, state, hist, nxt, row_drafts, row_probs

    init = (
        state["kv"],
        carried,
        history,
        ids[f["lane_token"]],
        jnp.full((rows,), -1, jnp.int32),
        jnp.zeros((rows, vocab), jnp.float32),
    )
    kv_pages, _, history, _, row_drafts, row_probs = jax.lax.fori_loop(
        0, num_speculative_tokens, body, init
    )
    history, ids, f, probs = _place(row_drafts, row_probs, history, ids, f)
    return {**state, "kv": kv_pages}, history, ids, f, probs


def _place(
    row_drafts: jax.Array, row_probs: jax.Array, history: jax.Array, ids: jax.Array, f: dict
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], jax.Array]:
    """The proposals as the step's inputs and the rows' drafts, with the distributions the
    verification needs."""
    tdr = f["token_draft_row"]
    ids = jnp.where(tdr >= 0, row_drafts[jnp.maximum(tdr, 0)], ids)
    history = history.at[f["token_rows"], f["positions"]].set(ids, mode="drop")
    from_model = row_drafts >= 0
    draft_ids = jnp.where(from_model, row_drafts, f["draft_ids"])
    # N-gram rows (none when proposals are made on the device) would be point masses.
    probs = jnp.where(from_model[:, None], row_probs, jax.nn.one_hot(draft_ids, row_probs.shape[1]))
    return history, ids, {**f, "draft_ids": draft_ids}, probs


@dataclasses.dataclass(frozen=True)
class DraftSpec:
    """The static side of a draft model (speculative decoding) in the step program.

    A proposer on the device keeps a state between steps (``init_state``; here its KV
    pool, under "kv"), proposes at the start of the step (``propose_in_step``) and
    catches up after the target's forward (``catch_up``); ``jserve.spec.eagle`` is the
    other proposer of this shape."""

    cfg: ModelConfig
    num_speculative_tokens: int

    def extra_state(self, target_cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
        """State beside the pool: name -> (shape per table row, whether it is the
        activations' dtype); none for a draft model."""
        return {}

    def propose_in_step(
        self,
        params: Any,
        state: dict[str, Any],
        target_params: Any,
        target_cfg: ModelConfig,
        table: jax.Array,
        history: jax.Array,
        ids: jax.Array,
        f: dict[str, jax.Array],
        page_size: int,
        backend: str,
        mesh: Any,
    ) -> tuple[dict[str, Any], jax.Array, jax.Array, dict[str, jax.Array], jax.Array]:
        """(state, history, ids, fields, f32[R, V] the proposals' distributions)."""
        model = get_model(self.cfg)

        def forward_one(kv: list, tok: jax.Array, carried: Any, md: AttentionMetadata) -> tuple:
            hidden, kv, _ = model.forward(params, self.cfg, tok, kv, md)  # (stats: the target's)
            return model.compute_logits(params, self.cfg, hidden), kv, carried

        return propose(
            forward_one,
            None,
            state,
            table,
            history,
            ids,
            f,
            vocab=self.cfg.vocab_size,
            num_speculative_tokens=self.num_speculative_tokens,
            page_size=page_size,
            backend=backend,
            mesh=mesh,
        )

    def catch_up(
        self,
        params: Any,
        state: dict[str, Any],
        target_params: Any,
        target_cfg: ModelConfig,
        ids: jax.Array,
        hidden: jax.Array,
        md: AttentionMetadata,
        f: dict[str, jax.Array],
        tokens: jax.Array,
    ) -> dict[str, Any]:
        """The draft's forward over the step's tokens, for its K/V only."""
        _, kv, _ = get_model(self.cfg).forward(params, self.cfg, ids, state["kv"], md)
        return {**state, "kv": kv}


def load_draft(spec: Any, target: Any, max_model_len: int) -> Any:
    """The draft model of ``draft_model`` (a LoadedModel); ConfigError for a draft the
    target cannot use."""
    from jserve.errors import ConfigError
    from jserve.model_loader import load_model

    draft = load_model(spec.model, target.dtype, target.parallel)
    if draft.cfg.max_position_embeddings < max_model_len:
        raise ConfigError(
            f"the draft {spec.model!r} handles {draft.cfg.max_position_embeddings} positions, "
            f"fewer than max_model_len {max_model_len}; lower max_model_len"
        )
    return draft


DEFAULT_DRAFT = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "assets", "shakespeare-llama-draft"
)
