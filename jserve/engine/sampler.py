"""Sampling on the device: one batch of rows, each with its own parameters.

Order of operations per row (as vLLM applies them): penalties on the raw
logits, the request's ``logit_bias`` added, stop tokens banned while below
``min_tokens``, tokens outside a structured-output grammar's ``bitmask``
removed (a grammar that only allows banned stop ids lets them through), temperature, then the
top-k, top-p and min-p filters, then a draw. Greedy rows (temperature 0)
take the argmax of the penalized logits. A row verifying a speculative
proposal (``draft_ids``) keeps or replaces it by rejection sampling from the
same processed distribution (``jserve.spec.rejection``). Each row's randomness comes from
its own key, folded from (request seed, sample index, output position), so
a seeded request gives the same tokens whatever else is in the batch.
Logprobs are those of the raw model distribution: of the sampled token, or
on a row that scores a prompt position, of its ``score_ids`` target.

Every choice that depends on the batch (any row random, any top-k/top-p, any
penalties, any logprobs) is a runtime flag taken by ``lax.cond``, so one
compiled step serves every mix of parameters, and the passes nobody asked
for do not run. Penalties read each row's token history from the device
(``history``: the tokens the model was fed, per page-table row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jserve.engine.shapes import Flag
from jserve.spec import rejection


@struct.dataclass
class SamplerOutput:
    tokens: jax.Array  # i32[N] (N = rows padded to the engine's max_num_seqs)
    logprobs: jax.Array  # f32[N]: logprob of the sampled token (or of score_ids)
    ranks: jax.Array  # i32[N]: its rank, 1 = the most likely token
    top_ids: jax.Array  # i32[N, K]
    top_logprobs: jax.Array  # f32[N, K]


def _token_counts(ids: jax.Array, vocab: int) -> jax.Array:
    """[R, L] ids (-1 padded) -> [R, V] occurrence counts."""
    rows = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)
    cols = jnp.where(ids < 0, vocab, ids)  # padding goes out of range and is dropped
    return jnp.zeros((ids.shape[0], vocab), jnp.int32).at[rows, cols].add(1, mode="drop")


def apply_penalties(
    logits: jax.Array,  # f32[R, V]
    f: dict[str, jax.Array],
    history: jax.Array,  # i32[rows, L]: fed tokens by position
) -> jax.Array:
    """Repetition penalty on every token seen (prompt or output); presence and
    frequency penalties on the output tokens."""
    vocab = logits.shape[-1]
    hist = history[f["history_rows"]]  # [R, L]
    pos = jnp.arange(hist.shape[1])[None]
    known = pos < f["history_lens"][:, None]
    is_output = known & (pos >= f["num_prompt"][:, None])
    out_counts = _token_counts(jnp.where(is_output, hist, -1), vocab)
    seen = _token_counts(jnp.where(known, hist, -1), vocab) > 0  # [R, V]
    rep = f["repetition_penalty"][:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - f["frequency_penalty"][:, None] * out_counts
    return logits - f["presence_penalty"][:, None] * (out_counts > 0)


def _filter_sorted(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Applies top-k and top-p to temperature-scaled logits [R, V]."""
    vocab = scaled.shape[-1]
    desc = jnp.sort(scaled, axis=-1, descending=True)  # [R, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    # top-p: keep the smallest prefix of sorted tokens whose mass reaches p
    # (the token that crosses p is kept).
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p[:, None]) & (jnp.arange(vocab)[None] < k[:, None])
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled < cutoff, -jnp.inf, scaled)


def row_keys(f: dict[str, jax.Array]) -> jax.Array:
    """Each row's key, from (request seed, sample index, output position)."""

    def row_key(seed: jax.Array, index: jax.Array, position: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(seed), index)
        return jax.random.fold_in(key, position)

    return jax.vmap(row_key)(f["seeds"], f["sample_index"], f["out_position"])


def draw(scaled: jax.Array, keys: jax.Array) -> jax.Array:
    """Gumbel-max draw, each row from its own key."""
    vocab = scaled.shape[-1]
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(keys)
    return jnp.argmax(scaled + gumbel, axis=-1).astype(jnp.int32)


def add_logit_bias(logits: jax.Array, f: dict[str, jax.Array]) -> jax.Array:
    """Scatter-adds each row's (token, bias) list; padding (-1) falls outside and is
    dropped."""
    rows, vocab = logits.shape
    ids = f["bias_ids"]  # [R, BIAS_WIDTH]
    bias_rows = jnp.broadcast_to(jnp.arange(rows)[:, None], ids.shape)
    cols = jnp.where(ids < 0, vocab, ids)
    return logits.at[bias_rows, cols].add(f["bias_values"], mode="drop")


def apply_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """-inf where bit v of a row's packed mask (i32[R, ceil(V / 32)]) is clear.
    E.g. a row of words [5] allows tokens 0 and 2 of the first 32."""
    vocab = logits.shape[-1]
    v = jnp.arange(vocab)
    words = jax.lax.bitcast_convert_type(bitmask, jnp.uint32)[:, v // 32]  # [R, V]
    allowed = (words >> (v % 32).astype(jnp.uint32)) & 1
    return jnp.where(allowed > 0, logits, -jnp.inf)


def biased_logits(
    logits: jax.Array,  # f32[R, V]
    f: dict[str, jax.Array],
    history: jax.Array,  # i32[rows, L]
) -> jax.Array:
    """Penalties, then the logit bias."""
    logits = jax.lax.cond(
        f["flags"][Flag.PENALTIES] > 0,
        lambda x: apply_penalties(x, f, history),
        lambda x: x,
        logits,
    )
    return jax.lax.cond(
        f["flags"][Flag.BIAS] > 0, lambda x: add_logit_bias(x, f), lambda x: x, logits
    )


def ban_stop_ids(logits: jax.Array, f: dict[str, jax.Array]) -> jax.Array:
    """-inf on each row's ``banned`` ids (its stop ids, while below min_tokens)."""
    rows, vocab = logits.shape
    ban_rows = jnp.broadcast_to(jnp.arange(rows)[:, None], f["banned"].shape)
    ban_cols = jnp.where(f["banned"] < 0, vocab, f["banned"])
    return logits.at[ban_rows, ban_cols].set(-jnp.inf, mode="drop")


def penalized_logits(
    logits: jax.Array,  # f32[R, V]
    f: dict[str, jax.Array],
    history: jax.Array,  # i32[rows, L]
) -> jax.Array:
    """Penalties, the logit bias, then the stop ids banned while below min_tokens:
    what greedy rows take the argmax of (and what random rows, speculative
    verification and a draft model's proposals process further)."""
    return ban_stop_ids(biased_logits(logits, f, history), f)


def constrain(logits: jax.Array, unbanned: jax.Array, bitmask: jax.Array) -> jax.Array:
    """The grammar's bitmask over penalized logits. A row whose grammar allows only ids
    min_tokens bans (the grammar is complete: EOS alone may follow) keeps them: it ends
    there rather than sampling a token the grammar refuses."""
    masked = apply_bitmask(logits, bitmask)
    stuck = jnp.all(jnp.isneginf(masked), axis=-1, keepdims=True)
    return jnp.where(stuck, apply_bitmask(unbanned, bitmask), masked)


def scaled_logits(logits: jax.Array, f: dict[str, jax.Array]) -> jax.Array:
    """Penalized logits -> what random rows draw from: temperature, top-k, top-p, min-p
    (-inf where filtered out)."""
    temperature = f["temperature"]
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = jax.lax.cond(
        f["flags"][Flag.SORT] > 0,
        lambda x: _filter_sorted(x, f["top_k"], f["top_p"]),
        lambda x: x,
        scaled,
    )
    # min-p: drop tokens whose probability is below min_p times the top token's.
    top_logit = jnp.max(scaled, axis=-1, keepdims=True)
    min_p = f["min_p"][:, None]
    below = scaled < top_logit + jnp.log(jnp.maximum(min_p, 1e-30))
    return jnp.where((min_p > 0) & below, -jnp.inf, scaled)


def sample(
    logits: jax.Array,  # f32[R, V]
    f: dict[str, jax.Array],  # the step's sampling fields (see shapes.StepShapes.layout)
    history: jax.Array,  # i32[rows, L]
    *,
    num_out: int,
    num_logprobs: int,
    draft_probs: jax.Array | None = None,  # f32[R, V]: a draft model's proposal distributions
    bitmask: jax.Array | None = None,  # i32[R, ceil(V / 32)]: tokens a grammar allows
) -> SamplerOutput:
    rows = logits.shape[0]
    flags = f["flags"]
    raw_logits = logits  # logprobs are those of the model, before any processing
    unbanned = biased_logits(logits, f, history)
    logits = ban_stop_ids(unbanned, f)
    if bitmask is not None:
        logits = jax.lax.cond(
            flags[Flag.BITMASK] > 0,
            lambda x: constrain(x, unbanned, bitmask),
            lambda x: x,
            logits,
        )
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def random_tokens(logits: jax.Array) -> jax.Array:
        temperature = f["temperature"]
        scaled = scaled_logits(logits, f)
        keys = row_keys(f)

        def verify(x: jax.Array) -> jax.Array:
            if draft_probs is None:  # proposals without a distribution (n-gram)
                return rejection.verify_point_mass(x, f["draft_ids"], keys, draw)
            return rejection.verify(x, draft_probs, f["draft_ids"], keys, draw)

        drawn = jax.lax.cond(  # rows verifying a proposed token (speculative decoding)
            jnp.any(f["draft_ids"] >= 0), verify, lambda x: draw(x, keys), scaled
        )
        return jnp.where(temperature > 0, drawn, greedy_tokens)

    tokens = jax.lax.cond(flags[Flag.RANDOM] > 0, random_tokens, lambda _: greedy_tokens, logits)

    def with_logprobs(raw: jax.Array) -> tuple[jax.Array, ...]:
        raw_logp = jax.nn.log_softmax(raw, axis=-1)
        score_ids = f["score_ids"]
        scored = jnp.where(score_ids >= 0, score_ids, tokens)  # [R]
        chosen = jnp.take_along_axis(raw_logp, scored[:, None], axis=-1)  # [R, 1]
        ranks = 1 + jnp.sum(raw_logp > chosen, axis=-1).astype(jnp.int32)
        top_logprobs, top_ids = jax.lax.top_k(raw_logp, num_logprobs)
        return chosen[:, 0], ranks, top_ids.astype(jnp.int32), top_logprobs

    def without(raw: jax.Array) -> tuple[jax.Array, ...]:
        return (
            jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows,), jnp.int32),
            jnp.zeros((rows, num_logprobs), jnp.int32),
            jnp.zeros((rows, num_logprobs), jnp.float32),
        )

    lps, ranks, top_ids, top_lps = jax.lax.cond(
        flags[Flag.LOGPROBS] > 0, with_logprobs, without, raw_logits
    )

    def pad(x: jax.Array) -> jax.Array:
        return jnp.pad(x, [(0, num_out - rows)] + [(0, 0)] * (x.ndim - 1))

    return SamplerOutput(pad(tokens), pad(lps), pad(ranks), pad(top_ids), pad(top_lps))
