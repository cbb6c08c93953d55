"""Step shapes, defined once: the buckets a step is padded to and the packed input layout.

A step is padded to a token bucket T (flat tokens) and R = min(T,
max_num_seqs) sampled rows: a step samples one row per sequence and has at
most T sequences (a rare step that forks an n > 1 prompt into more rows than
it has tokens pads its tokens up). The attention metadata always has
max_num_seqs sequence slots, because padded sequence slots cost the kernels
nothing. So there is one step program per token bucket. The input builder
and warm-up both read this module, so warm-up compiles exactly the programs
serving can reach: the step programs, the copy-on-write batch sizes and the
row-write batch sizes. No width depends on the data.

All of a step's host inputs travel in one int32 buffer (float fields are
stored bit for bit), so a step is one host-to-device transfer; ``Layout``
gives each field's place in it, as numpy views on the host and as sliced
arrays inside the jitted step.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jserve.engine.config import EngineConfig, geometric_buckets
from jserve.sampling_params import MAX_LOGIT_BIAS

# Ids banned while below min_tokens (stop_token_ids plus EOS ids) per row.
BAN_WIDTH = 32
# (token, bias) pairs of logit_bias per row (padding: token -1, bias 0). They travel in
# their own step input, i32[R, 2, BIAS_WIDTH] (tokens, then the biases' float bits), sent
# only by steps with a biased row (``no_logit_bias`` is the default kept on the device).
BIAS_WIDTH = MAX_LOGIT_BIAS


def bitmask_words(vocab_size: int) -> int:
    """Words of a row of the structured-output bitmask input: one bit per token."""
    return -(-vocab_size // 32)


def no_logit_bias(rows: int) -> np.ndarray:
    """The logit-bias input of a step without biased rows: every token -1, every bias 0."""
    out = np.zeros((rows, 2, BIAS_WIDTH), np.int32)
    out[:, 0] = -1
    return out


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n. E.g. bucket_for(5, (4, 8, 16)) == 8."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class Flag(enum.IntEnum):
    """The step's `flags` field: 1 where some row of the step needs that part of the
    sampler, so a step without it skips the work (each is a `lax.cond`)."""

    RANDOM = 0  # a row draws at random (temperature > 0)
    SORT = 1  # a row uses top-k or top-p
    PENALTIES = 2  # a row uses repetition, presence or frequency penalties
    LOGPROBS = 3  # a row wants logprobs
    BIAS = 4  # a row has a logit_bias
    BITMASK = 5  # a row is constrained by a grammar's bitmask (jserve.structured)


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    shape: tuple[int, ...]
    kind: str  # "i32", "u32" or "f32"
    fill: int | float
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class Layout:
    """Where each input of one (T, R) step lives in the packed int32 buffer."""

    def __init__(self, fields: list[tuple[str, tuple[int, ...], str, int | float]]) -> None:
        self.fields: dict[str, Field] = {}
        offset = 0
        for name, shape, kind, fill in fields:
            f = Field(name, shape, kind, fill, offset)
            self.fields[name] = f
            offset += f.size
        self.size = offset
        template = np.zeros(self.size, np.int32)
        for f, view in self._views(template).items():
            view[...] = self.fields[f].fill
        self._template = template

    def _views(self, buf: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for f in self.fields.values():
            flat = buf[f.offset : f.offset + f.size]
            if f.kind == "f32":
                flat = flat.view(np.float32)
            elif f.kind == "u32":
                flat = flat.view(np.uint32)
            out[f.name] = flat.reshape(f.shape)
        return out

    def new_buffer(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """A buffer holding every field's padding value, and writable views of its fields."""
        buf = self._template.copy()
        return buf, self._views(buf)

    def unpack(self, buf: jax.Array) -> dict[str, jax.Array]:
        """Inside the jitted step: the fields of the packed buffer, typed and shaped."""
        out = {}
        for f in self.fields.values():
            x = buf[f.offset : f.offset + f.size]
            if f.kind == "f32":
                x = jax.lax.bitcast_convert_type(x, jnp.float32)
            elif f.kind == "u32":
                x = jax.lax.bitcast_convert_type(x, jnp.uint32)
            out[f.name] = x.reshape(f.shape)
        return out


class StepShapes:
    """The buckets of one engine configuration."""

    def __init__(self, ecfg: EngineConfig, pages_per_seq: int, num_microbatches: int = 1) -> None:
        self.page_size = ecfg.page_size
        self.max_num_seqs = ecfg.max_num_seqs
        self.pages_per_seq = pages_per_seq
        self.max_model_len = pages_per_seq * ecfg.page_size
        self.num_microbatches = num_microbatches
        self.num_logprobs = max(1, ecfg.max_logprobs)
        # Under pipeline parallelism a step splits into equal micro-batches.
        self.token_buckets = tuple(t for t in ecfg.token_buckets() if t >= num_microbatches)
        # Copy-on-write pages and whole page-table or history rows written before
        # a step: at most one per running sequence.
        self.batch_sizes = geometric_buckets(1, ecfg.max_num_seqs, factor=4)
        self.key = (
            self.page_size,
            self.max_num_seqs,
            pages_per_seq,
            num_microbatches,
            self.num_logprobs,
            self.token_buckets,
        )
        if not self.token_buckets or any(t % num_microbatches for t in self.token_buckets):
            raise ValueError(
                f"token buckets {self.token_buckets} must be multiples of the "
                f"{num_microbatches} pipeline micro-batches"
            )

    def step_shape(self, num_tokens: int, num_rows: int) -> tuple[int, int]:
        # A step that forks into more rows than tokens (n > 1 from a short prompt)
        # pads its tokens up to the rows, instead of adding programs for it.
        t = bucket_for(max(num_tokens, num_rows), self.token_buckets)
        return t, min(t, self.max_num_seqs)

    def step_shapes(self) -> list[tuple[int, int]]:
        """Every (T, R) a step can have: one per token bucket."""
        return [(t, min(t, self.max_num_seqs)) for t in self.token_buckets]

    def batch_size(self, n: int) -> int:
        return bucket_for(n, self.batch_sizes)

    def diff_capacity(self, num_tokens: int) -> int:
        """Page-table entries a step can change in place: each sequence's new pages for
        its tokens, plus one copy-on-write page per sequence. Bigger changes (a long
        cached prefix) are written as whole rows before the step."""
        return num_tokens // self.page_size + 2 * min(num_tokens, self.max_num_seqs)

    @functools.cache  # noqa: B019 - one StepShapes per engine, a handful of layouts
    def layout(self, num_tokens: int, num_rows: int) -> Layout:
        t, r, s, m = num_tokens, num_rows, self.max_num_seqs, self.num_microbatches
        d = self.diff_capacity(t)
        pad = s  # the page table's all-zero padding row
        seq = (s,) if m == 1 else (m, s)
        cu = (s + 1,) if m == 1 else (m, s + 1)
        return Layout(
            [
                ("ids", (t,), "i32", 0),
                ("src_rows", (t,), "i32", -1),  # row of the previous step's samples, or -1
                ("positions", (t,), "i32", 0),
                ("slot_mapping", (t,), "i32", -1),
                ("token_rows", (t,), "i32", pad),  # table row of each token's sequence
                ("seq_rows", seq, "i32", pad),
                ("kv_lens", seq, "i32", 0),
                ("cu_q_lens", cu, "i32", 0),
                ("num_seqs", (*seq[:-1], 1), "i32", 0),
                ("diff_rows", (d,), "i32", pad + 1),  # past the table: dropped
                ("diff_cols", (d,), "i32", 0),
                ("diff_pages", (d,), "i32", 0),
                ("logits_indices", (r,), "i32", 0),
                ("temperature", (r,), "f32", 0.0),
                ("top_k", (r,), "i32", 0),
                ("top_p", (r,), "f32", 1.0),
                ("min_p", (r,), "f32", 0.0),
                ("seeds", (r,), "u32", 0),
                ("sample_index", (r,), "i32", 0),
                ("out_position", (r,), "i32", 0),
                ("banned", (r, BAN_WIDTH), "i32", -1),
                ("repetition_penalty", (r,), "f32", 1.0),
                ("presence_penalty", (r,), "f32", 0.0),
                ("frequency_penalty", (r,), "f32", 0.0),
                ("history_rows", (r,), "i32", pad),
                ("history_lens", (r,), "i32", 0),
                ("num_prompt", (r,), "i32", 0),
                # A row that scores a prompt position: the prompt token whose logprob
                # and rank it returns (its sample is ignored); -1 on sampling rows.
                ("score_ids", (r,), "i32", -1),
                # A row verifying a speculative proposal: the proposed token, else -1.
                ("draft_ids", (r,), "i32", -1),
                # Proposals of a draft model, made on the device at the start of the step
                # (jserve.spec.draft), one lane per speculating sequence: its table row,
                # the index in `ids` of its last known token, that token's position, its
                # first verifying row and its number of proposals.
                ("lane_rows", (s,), "i32", pad),
                ("lane_token", (s,), "i32", 0),
                ("lane_start", (s,), "i32", 0),
                ("lane_first_row", (s,), "i32", r),  # past the rows: dropped
                ("lane_k", (s,), "i32", 0),
                ("num_lanes", (1,), "i32", 0),
                # Whether a lane's (sequence's) last position was computed by an earlier
                # step of its current residency, so a proposer's state for its table row
                # is its own (jserve.spec.eagle's feature); 0 for a first chunk or fork.
                ("lane_feat_ok", (s,), "i32", 0),
                ("seq_feat_ok", seq, "i32", 0),
                # An input that is a draft model's proposal: the row verifying it, else -1.
                ("token_draft_row", (t,), "i32", -1),
                # Each token's LoRA adapter slot (jserve.lora), -1 for the base model.
                ("lora_slots", (t,), "i32", -1),
                # Whether any row needs each optional part of the sampler (see Flag).
                ("flags", (len(Flag),), "i32", 0),
            ]
        )
