"""Sampling on the device: one batch of rows, each with its own parameters.

Order of operations per row (as vLLM applies them): penalties on the raw
logits, stop tokens banned while below ``min_tokens``, temperature, then the
top-k, top-p and min-p filters, then a draw. Greedy rows (temperature 0)
take the argmax of the penalized logits. Each row's randomness comes from
its own key, folded from (request seed, sample index, output position), so
a seeded request gives the same tokens whatever else is in the batch.
Logprobs are those of the raw model distribution.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SamplingMetadata:
    temperature: jax.Array  # f32[R]; 0 = greedy
    top_k: jax.Array  # i32[R]; 0 = disabled
    top_p: jax.Array  # f32[R]; 1 = disabled
    min_p: jax.Array  # f32[R]; 0 = disabled
    seeds: jax.Array  # u32[R]
    sample_index: jax.Array  # i32[R]: which of the request's n samples
    position: jax.Array  # i32[R]: output position of the token being drawn
    banned: jax.Array  # i32[R, B]: ids that may not be drawn now (-1 = none)
    # Only read when the step's `penalties` flag is on:
    repetition_penalty: jax.Array  # f32[R]
    presence_penalty: jax.Array  # f32[R]
    frequency_penalty: jax.Array  # f32[R]
    history: jax.Array  # i32[R, L]: prompt then known output ids, -1 padded
    history_is_output: jax.Array  # bool[R, L]
    input_is_output: jax.Array  # bool[R]: the row's input token is an output not in history


@struct.dataclass
class SamplerOutput:
    tokens: jax.Array  # i32[N] (N = rows padded to the engine's max_num_seqs)
    logprobs: jax.Array  # f32[N]: logprob of the sampled token
    ranks: jax.Array  # i32[N]: 1 = the most likely token
    top_ids: jax.Array  # i32[N, K]
    top_logprobs: jax.Array  # f32[N, K]


def _token_counts(ids: jax.Array, vocab: int) -> jax.Array:
    """[R, L] ids (-1 padded) -> [R, V] occurrence counts."""
    rows = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)
    cols = jnp.where(ids < 0, vocab, ids)  # padding goes out of range and is dropped
    return jnp.zeros((ids.shape[0], vocab), jnp.int32).at[rows, cols].add(1, mode="drop")


def apply_penalties(logits: jax.Array, sm: SamplingMetadata, last_ids: jax.Array) -> jax.Array:
    vocab = logits.shape[-1]
    outputs = jnp.where(sm.history_is_output, sm.history, -1)
    extra = jnp.where(sm.input_is_output, last_ids, -1)
    out_counts = _token_counts(jnp.concatenate([outputs, extra[:, None]], axis=1), vocab)
    seen = (out_counts > 0) | (_token_counts(sm.history, vocab) > 0)  # [R, V]
    rep = sm.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - sm.frequency_penalty[:, None] * out_counts
    return logits - sm.presence_penalty[:, None] * (out_counts > 0)


def _filter_sorted(scaled: jax.Array, sm: SamplingMetadata) -> jax.Array:
    """Applies top-k and top-p to temperature-scaled logits [R, V]."""
    vocab = scaled.shape[-1]
    desc = jnp.sort(scaled, axis=-1, descending=True)  # [R, V]
    k = jnp.where(sm.top_k > 0, jnp.minimum(sm.top_k, vocab), vocab)
    # top-p: keep the smallest prefix of sorted tokens whose mass reaches p
    # (the token that crosses p is kept).
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < sm.top_p[:, None]) & (jnp.arange(vocab)[None] < k[:, None])
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled < cutoff, -jnp.inf, scaled)


@functools.partial(jax.jit, static_argnames=("num_out", "sort", "penalties", "num_logprobs"))
def sample(
    logits: jax.Array,  # f32[R, V]
    sm: SamplingMetadata,
    last_ids: jax.Array,  # i32[R]: each row's input token this step
    *,
    num_out: int,
    sort: bool,
    penalties: bool,
    num_logprobs: int,
) -> SamplerOutput:
    rows, vocab = logits.shape
    raw_logits = logits  # logprobs are those of the model, before any processing
    if penalties:
        logits = apply_penalties(logits, sm, last_ids)
    ban_rows = jnp.broadcast_to(jnp.arange(rows)[:, None], sm.banned.shape)
    ban_cols = jnp.where(sm.banned < 0, vocab, sm.banned)
    logits = logits.at[ban_rows, ban_cols].set(-jnp.inf, mode="drop")
    greedy_tokens = jnp.argmax(logits, axis=-1)

    temp = jnp.where(sm.temperature > 0, sm.temperature, 1.0)[:, None]
    scaled = logits / temp
    if sort:
        scaled = _filter_sorted(scaled, sm)
    top_logit = jnp.max(scaled, axis=-1, keepdims=True)
    # min-p: drop tokens whose probability is below min_p times the top token's.
    min_p = sm.min_p[:, None]
    below = scaled < top_logit + jnp.log(jnp.maximum(min_p, 1e-30))
    scaled = jnp.where((min_p > 0) & below, -jnp.inf, scaled)

    def row_key(seed: jax.Array, index: jax.Array, position: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(seed), index)
        return jax.random.fold_in(key, position)

    keys = jax.vmap(row_key)(sm.seeds, sm.sample_index, sm.position)
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(keys)
    drawn = jnp.argmax(scaled + gumbel, axis=-1)
    tokens = jnp.where(sm.temperature > 0, drawn, greedy_tokens).astype(jnp.int32)

    def pad(x: jax.Array) -> jax.Array:
        return jnp.pad(x, [(0, num_out - rows)] + [(0, 0)] * (x.ndim - 1))

    if num_logprobs == 0:  # nobody asked: skip the passes over the vocabulary
        zeros = jnp.zeros((num_out,), jnp.float32)
        none = jnp.zeros((num_out, 1), jnp.int32)
        return SamplerOutput(pad(tokens), zeros, none[:, 0], none, none.astype(jnp.float32))
    raw_logp = jax.nn.log_softmax(raw_logits, axis=-1)
    chosen = jnp.take_along_axis(raw_logp, tokens[:, None], axis=-1)  # [R, 1]
    ranks = 1 + jnp.sum(raw_logp > chosen, axis=-1).astype(jnp.int32)
    top_logprobs, top_ids = jax.lax.top_k(raw_logp, num_logprobs)
    return SamplerOutput(
        tokens=pad(tokens),
        logprobs=pad(chosen[:, 0]),
        ranks=pad(ranks),
        top_ids=pad(top_ids.astype(jnp.int32)),
        top_logprobs=pad(top_logprobs),
    )
