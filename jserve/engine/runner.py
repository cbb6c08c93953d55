"""The only place host state becomes device arrays: runs one step on the device.

The forward is jitted once per (token bucket, sequence bucket) with the KV
pages donated, so the pool is updated in place. Sampled tokens stay on the
device: a sequence's next input is read from the previous step's samples
(``src_rows``), so step N+1 can be dispatched before step N's tokens are
copied back.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import pallas_kernels
from jserve.config import ModelConfig
from jserve.engine.config import EngineConfig
from jserve.engine.inputs import InputBuilder, StepInputs, empty_inputs, split_microbatches
from jserve.engine.sampler import SamplerOutput, SamplingMetadata, sample
from jserve.engine.scheduler import SchedulerOutput
from jserve.models import llama
from jserve.models.attention import AttentionMetadata
from jserve.models.pipeline import pipeline_forward
from sharding import STAGE, kv_pages_sharding
from sharding.pipeline import pipeline_kv_sharding

logger = logging.getLogger(__name__)


def _forward_step(
    params: Any,
    kv_pages: list[jax.Array],
    prev_tokens: jax.Array,  # i32[N] samples of the previous step
    ids: jax.Array,  # i32[T]
    src_rows: jax.Array,  # i32[T]
    md: AttentionMetadata,  # under pipeline parallelism, arrays lead with [micro-batch]
    logits_indices: jax.Array,  # i32[R]
    *,
    cfg: ModelConfig,
    mesh: Any = None,  # given only for pipeline parallelism
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    ids = jnp.where(src_rows >= 0, prev_tokens[jnp.maximum(src_rows, 0)], ids)
    if mesh is None:
        hidden, kv_pages = llama.forward(params, cfg, ids, kv_pages, md)
    else:
        hidden, kv_pages = pipeline_forward(params, cfg, ids, kv_pages, md, mesh)
    logits = llama.compute_logits(params, cfg, hidden[logits_indices])  # [R, V]
    return kv_pages, logits, ids[logits_indices]


# Jitted at module level with the (hashable) model config static, so engines
# serving the same architecture in one process share compiled programs.
_forward_jit = jax.jit(
    _forward_step, static_argnames=("cfg", "mesh"), donate_argnames=("kv_pages",)
)


@functools.partial(jax.jit, donate_argnames=("kv_pages",))
def _copy_pages(kv_pages: list[jax.Array], src: jax.Array, dst: jax.Array) -> list[jax.Array]:
    """Copy-on-write: page dst <- page src in every layer (dst -1 = no-op).

    The page axis is the fourth from last ([..., P, S, 2*Hkv, D]), so stage-stacked
    pages of pipeline parallelism are copied the same way.
    """
    out = []
    for pages in kv_pages:
        lead = (slice(None),) * (pages.ndim - 4)
        dst_ = jnp.where(dst < 0, pages.shape[-4], dst)
        value = pages[(*lead, jnp.maximum(src, 0))]
        out.append(pages.at[(*lead, dst_)].set(value, mode="drop"))
    return out


@dataclasses.dataclass
class StepHandle:
    """A dispatched step: device arrays not yet copied to the host."""

    out: SamplerOutput
    num_rows: int
    with_logprobs: bool


@dataclasses.dataclass
class StepResult:
    tokens: np.ndarray  # i32[rows]
    logprobs: np.ndarray | None  # f32[rows]
    ranks: np.ndarray | None
    top_ids: np.ndarray | None  # i32[rows, K]
    top_logprobs: np.ndarray | None


def kv_bytes_per_page(cfg: ModelConfig, page_size: int, dtype: Any) -> int:
    return (
        cfg.num_layers * page_size * 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    )


class ModelRunner:
    def __init__(
        self,
        params: Any,
        cfg: ModelConfig,
        ecfg: EngineConfig,
        dtype: Any,
        max_model_len: int,
        num_pages: int,
        mesh: Any = None,
        parallel: Any = None,
    ) -> None:
        self.params = params
        self.cfg = cfg
        self.ecfg = ecfg
        self.num_pages = num_pages
        self.pages_per_seq = math.ceil(max_model_len / ecfg.page_size)
        self.token_buckets = ecfg.token_buckets()
        self.seq_buckets = ecfg.seq_buckets()
        self.backend = pallas_kernels.resolve_backend(ecfg.attention_backend)
        shape = (num_pages, ecfg.page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
        self.mesh = mesh
        self.pp = 1 if mesh is None else mesh.shape[STAGE]
        self.num_microbatches = parallel.microbatches if self.pp > 1 else 1
        if any(t % self.num_microbatches for t in self.token_buckets):
            raise ValueError(
                f"token buckets {self.token_buckets} must be multiples of the "
                f"{self.num_microbatches} pipeline micro-batches"
            )
        if mesh is None:
            self.kv_pages = [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)]
        elif self.pp == 1:
            # Pages split by KV head like the K/V projections, created in place.
            zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=kv_pages_sharding(mesh))
            self.kv_pages = [zeros() for _ in range(cfg.num_layers)]
        else:
            stacked = (self.pp, *shape)
            zeros = jax.jit(
                lambda: jnp.zeros(stacked, dtype), out_shardings=pipeline_kv_sharding(mesh)
            )
            self.kv_pages = [zeros() for _ in range(cfg.num_layers // self.pp)]
        self._prev_tokens = jnp.zeros(ecfg.max_num_seqs, jnp.int32)
        self.inputs = InputBuilder(
            self.token_buckets,
            self.seq_buckets,
            ecfg.max_num_seqs,
            self.pages_per_seq,
            ecfg.page_size,
            ecfg.max_logprobs,
            cfg.eos_token_ids,
        )

    # -- one step ----------------------------------------------------------

    def execute(self, so: SchedulerOutput) -> StepHandle:
        if so.copies:
            self._apply_copies(so.copies)
        return self.dispatch(self.inputs.build(so))

    def dispatch(self, inp: StepInputs) -> StepHandle:
        if self.pp == 1:
            md = AttentionMetadata(
                positions=inp.positions,
                slot_mapping=inp.slot_mapping,
                kv_lens=inp.kv_lens,
                page_indices=inp.page_indices,
                cu_q_lens=inp.cu_q_lens,
                num_seqs=inp.num_seqs,
                backend=self.backend,
                mesh=self.mesh,
            )
            stage_mesh = None
        else:
            chunks = split_microbatches(inp, self.num_microbatches)
            md = AttentionMetadata(**chunks, backend=self.backend, mesh=self.mesh)
            stage_mesh = self.mesh
        self.kv_pages, logits, last_ids = _forward_jit(
            self.params,
            self.kv_pages,
            self._prev_tokens,
            inp.ids,
            inp.src_rows,
            md,
            inp.logits_indices,
            cfg=self.cfg,
            mesh=stage_mesh,
        )
        out = sample(
            logits,
            SamplingMetadata(**inp.sampling),
            last_ids,
            num_out=self.ecfg.max_num_seqs,
            sort=inp.sort,
            penalties=inp.penalties,
            num_logprobs=inp.num_logprobs,
        )
        self._prev_tokens = out.tokens
        return StepHandle(out, inp.num_rows, inp.num_logprobs > 0)

    def fetch(self, handle: StepHandle) -> StepResult:
        """Blocks until the step is done and copies its samples to the host."""
        n = handle.num_rows
        o = handle.out
        if not handle.with_logprobs:
            return StepResult(np.asarray(o.tokens)[:n], None, None, None, None)
        tokens, lps, ranks, top_ids, top_lps = jax.device_get(
            (o.tokens, o.logprobs, o.ranks, o.top_ids, o.top_logprobs)
        )
        return StepResult(tokens[:n], lps[:n], ranks[:n], top_ids[:n], top_lps[:n])

    def _apply_copies(self, copies: list[tuple[int, int]]) -> None:
        size = 1 << max(0, (len(copies) - 1).bit_length())
        src = np.full(size, -1, np.int32)
        dst = np.full(size, -1, np.int32)
        src[: len(copies)], dst[: len(copies)] = zip(*copies, strict=True)
        self.kv_pages = _copy_pages(self.kv_pages, src, dst)

    # -- start-up -----------------------------------------------------------

    def shapes_to_compile(self) -> list[tuple[int, int]]:
        return [(t, s) for t in self.token_buckets for s in self.seq_buckets if s <= t]

    def warmup(self, progress: bool = True) -> int:
        """Compiles every step shape now, so serving never compiles. Returns the count."""
        shapes = self.shapes_to_compile()
        sampler_variants = [
            (sort, lp) for sort in (False, True) for lp in (0, self.ecfg.max_logprobs)
        ]
        # Up to max_num_seqs copies per step, padded to a power of two (see _apply_copies).
        copy_sizes = [1 << i for i in range((self.ecfg.max_num_seqs - 1).bit_length() + 1)]
        total = len(shapes) + len(self.seq_buckets) * len(sampler_variants) + len(copy_sizes)
        bar = tqdm(total=total, desc="compiling step shapes", disable=not progress)
        for t, s in shapes:
            self.dispatch(empty_inputs(t, s, self.pages_per_seq))
            bar.update(1)
        for s in self.seq_buckets:
            logits = jnp.zeros((s, self.cfg.vocab_size), jnp.float32)
            sm = SamplingMetadata(**empty_inputs(s, s, self.pages_per_seq).sampling)
            for sort, lp in sampler_variants:
                sample(
                    logits,
                    sm,
                    jnp.zeros(s, jnp.int32),
                    num_out=self.ecfg.max_num_seqs,
                    sort=sort,
                    penalties=False,
                    num_logprobs=lp,
                )
                bar.update(1)
        for size in copy_sizes:  # copy-on-write batches; -1 = no-op
            none = np.full(size, -1, np.int32)
            self.kv_pages = _copy_pages(self.kv_pages, none, none)
            bar.update(1)
        jax.block_until_ready(self.kv_pages)
        bar.close()
        return total
