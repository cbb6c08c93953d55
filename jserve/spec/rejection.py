"""Acceptance of proposed tokens on the device, inside the fused step (Leviathan et al.).

A row that verifies a proposed token d (``draft_ids`` >= 0 in the step layout)
keeps d with probability min(1, p(d) / q(d)), where p is the target's
distribution exactly as the sampler would draw from it (penalties, banned
stop ids, temperature, top-k, top-p and min-p applied), and q the proposer's.
Otherwise it draws from the residual max(0, p - q), renormalised. The token
that comes out is then distributed as p whatever the proposal, and it equals
d only when d was accepted (the residual gives d no mass), which is how the
host tells acceptance from rejection.

N-gram proposals are a point mass (q(d) = 1): acceptance is p(d), and the
residual is p with d removed. Greedy rows need nothing here: the target's
argmax is accepted exactly when it equals d.

Each row's draws come from its own key (request seed, sample index, output
position), the acceptance draw from a key folded once more, so they are
independent of the residual's Gumbel noise.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

_ACCEPT_STREAM = 0x5E  # folded into a row's key for its acceptance draw


def verify_point_mass(
    scaled: jax.Array,  # f32[R, V]: processed logits (-inf where filtered out)
    draft_ids: jax.Array,  # i32[R]: the proposed token, or -1 (draw normally)
    keys: jax.Array,  # key[R]: each row's key
    draw: Callable[[jax.Array, jax.Array], jax.Array],  # (logits, keys) -> i32[R]
) -> jax.Array:
    """The token of each row: its proposal if accepted, else a draw from the residual."""
    rows, vocab = scaled.shape
    has = draft_ids >= 0
    d = jnp.maximum(draft_ids, 0)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    p_draft = jnp.exp(jnp.take_along_axis(logp, d[:, None], axis=-1)[:, 0])  # [R]
    accept_keys = jax.vmap(lambda k: jax.random.fold_in(k, _ACCEPT_STREAM))(keys)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(accept_keys)
    cols = jnp.where(has, draft_ids, vocab)  # rows without a proposal mask nothing
    residual = scaled.at[jnp.arange(rows), cols].set(-jnp.inf, mode="drop")
    return jnp.where(has & (u < p_draft), draft_ids, draw(residual, keys))


def verify(
    scaled: jax.Array,  # f32[R, V]: processed target logits
    draft_probs: jax.Array,  # f32[R, V]: the distribution each proposal was drawn from
    draft_ids: jax.Array,  # i32[R]: the proposed token, or -1 (draw normally)
    keys: jax.Array,  # key[R]
    draw: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
    """As ``verify_point_mass`` for proposals drawn from ``draft_probs``: keep d with
    probability min(1, p(d) / q(d)), else draw from max(0, p - q) renormalised (from p
    itself in the measure-zero case where that is all zero)."""
    rows = scaled.shape[0]
    has = draft_ids >= 0
    d = jnp.maximum(draft_ids, 0)[:, None]
    p = jax.nn.softmax(scaled, axis=-1)
    p_d = jnp.take_along_axis(p, d, axis=-1)[:, 0]
    q_d = jnp.take_along_axis(draft_probs, d, axis=-1)[:, 0]
    accept_keys = jax.vmap(lambda k: jax.random.fold_in(k, _ACCEPT_STREAM))(keys)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(accept_keys)
    accept = has & (u * q_d < p_d)
    residual = jnp.maximum(p - draft_probs, 0.0)
    # The residual gives d no mass: it is only drawn from when p(d) < q(d).
    residual = residual.at[jnp.arange(rows), jnp.where(has, d[:, 0], p.shape[1])].set(
        0.0, mode="drop"
    )
    empty = jnp.sum(residual, axis=-1, keepdims=True) <= 0
    logits = jnp.where(has[:, None] & ~empty, jnp.log(residual), scaled)
    return jnp.where(accept, draft_ids, draw(logits, keys))
