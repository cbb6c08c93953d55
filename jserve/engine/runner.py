"""The only place host state becomes device arrays: runs one step on the device.

A step is one compiled program per (token bucket, row bucket): the forward,
the logits and the sampling, with the KV pages, the page table and the
token history donated so they are updated in place. Its inputs arrive in
one packed int32 buffer (see ``shapes``). Sampled tokens stay on the
device: a sequence's next input is read from the previous step's samples
(``src_rows``), so step N+1 is dispatched before step N's tokens are copied
back.

``prepare`` (host only, plain numpy out) and ``dispatch`` (device calls)
are split so that a multi-host leader can send the plan to its followers
in between. Every program is compiled ahead of time by ``warmup``, or on
first use without it; ``compiles`` and ``dispatches`` count them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

import pallas_kernels
from jserve.config import ModelConfig
from jserve.engine.config import EngineConfig
from jserve.engine.inputs import InputBuilder, RowWrites, StepPlan
from jserve.engine.sampler import SamplerOutput, sample
from jserve.engine.scheduler import SchedulerOutput
from jserve.engine.shapes import StepShapes, bitmask_words, no_logit_bias
from jserve.lora import ops as lora_ops
from jserve.models import get_model
from jserve.models.attention import AttentionMetadata
from jserve.models.kv_quant import page_dtype
from jserve.models.pipeline import pipeline_forward
from jserve.spec.draft import DraftSpec
from sharding import STAGE, kv_pages_sharding, logical_to_spec, param_shardings
from sharding.pipeline import pipeline_kv_sharding

logger = logging.getLogger(__name__)

# Compiled programs shared by every runner in the process (engines serving the
# same model and configuration, as tests and benchmarks make many of). Bounded:
# each program holds machine code in memory mappings, and a process has a
# limited number of those (vm.max_map_count); a runner keeps its own programs
# alive however many others come and go.
_COMPILED: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
MAX_SHARED_PROGRAMS = 64


def _share(key: tuple, prog: Any) -> None:
    _COMPILED[key] = prog
    while len(_COMPILED) > MAX_SHARED_PROGRAMS:
        _COMPILED.popitem(last=False)


def _step(
    params: Any,
    kv_pages: list[jax.Array],
    table: jax.Array,  # i32[max_num_seqs + 1, pages_per_seq]
    history: jax.Array,  # i32[max_num_seqs + 1, max_model_len]
    prev_tokens: jax.Array,  # i32[max_num_seqs]: the previous step's samples
    packed: jax.Array,  # i32[layout size]
    bitmask: jax.Array,  # i32[R, ceil(vocab / 32)]: tokens each row may sample
    logit_bias: jax.Array,  # i32[R, 2, BIAS_WIDTH]: (token, bias bits) pairs per row
    draft_params: Any = None,  # a proposer's (speculative decoding: jserve.spec), or None
    draft_state: dict[str, Any] | None = None,  # its KV pool ("kv", the target's page ids)
    lora: Any = None,  # LoRA adapter slots (jserve.lora.ops), or None
    *,
    cfg: ModelConfig,
    shapes: StepShapes,
    shape: tuple[int, int],
    backend: str,
    mesh: Any,  # None on one device
    draft: DraftSpec | None = None,  # or an EagleSpec: the proposer on the device
) -> tuple[list[jax.Array], jax.Array, jax.Array, SamplerOutput, dict[str, jax.Array], dict, Any]:
    f = shapes.layout(*shape).unpack(packed)
    f["bias_ids"] = logit_bias[:, 0]
    f["bias_values"] = jax.lax.bitcast_convert_type(logit_bias[:, 1], jnp.float32)
    src = f["src_rows"]
    ids = jnp.where(src >= 0, prev_tokens[jnp.maximum(src, 0)], f["ids"])
    table = table.at[f["diff_rows"], f["diff_cols"]].set(f["diff_pages"], mode="drop")
    history = history.at[f["token_rows"], f["positions"]].set(ids, mode="drop")
    draft_probs = None
    if draft is not None:
        draft_state, history, ids, f, draft_probs = draft.propose_in_step(
            draft_params,
            draft_state,
            params,
            cfg,
            table,
            history,
            ids,
            f,
            shapes.page_size,
            backend,
            mesh,
        )
    md = AttentionMetadata(
        positions=f["positions"],
        slot_mapping=f["slot_mapping"],
        kv_lens=f["kv_lens"],
        page_indices=table[f["seq_rows"]],
        cu_q_lens=f["cu_q_lens"],
        num_seqs=f["num_seqs"],
        backend=backend,
        mesh=mesh,
    )
    model = get_model(cfg)
    if lora is not None:
        params = lora_ops.with_adapters(params, lora, f["lora_slots"])
    if mesh is None or mesh.shape[STAGE] == 1:
        hidden, kv_pages, stats = model.forward(params, cfg, ids, kv_pages, md)
    else:
        num_mb = shapes.num_microbatches
        md = md.replace(
            positions=md.positions.reshape(num_mb, -1),
            slot_mapping=md.slot_mapping.reshape(num_mb, -1),
        )
        hidden, kv_pages, stats = pipeline_forward(params, cfg, ids, kv_pages, md, mesh)
    logits = model.compute_logits(params, cfg, hidden[f["logits_indices"]])  # [R, V]
    if mesh is not None:
        # The vocabulary is split over the model axis: compute each device's
        # slice of the logits (never gathering the head's weights), then gather
        # the rows once, so sampling runs on whole rows with no collectives.
        split = NamedSharding(mesh, logical_to_spec((None, "vocab")))
        logits = jax.lax.with_sharding_constraint(logits, split)
        logits = jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, PartitionSpec()))
    out = sample(
        logits,
        f,
        history,
        num_out=shapes.max_num_seqs,
        num_logprobs=shapes.num_logprobs,
        draft_probs=draft_probs,
        bitmask=bitmask,
    )
    drafts = None  # the proposals each row verified, made here on the device
    if draft is not None:
        draft_state = draft.catch_up(
            draft_params, draft_state, params, cfg, ids, hidden, md, f, out.tokens
        )
        drafts = f["draft_ids"]
    return kv_pages, table, history, out, stats, draft_state or {}, drafts


@functools.cache
def _zeros(shape: tuple[int, ...], dtype: Any, sharding: Any) -> Callable[[], jax.Array]:
    """A program that creates zeros in place on every process (no host array to spread
    over hosts); one per shape, so each layer's pages reuse it."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def _copy_pages(kv_pages: list[jax.Array], copies: jax.Array) -> list[jax.Array]:
    """Copy-on-write: page dst <- page src in every layer (copies [2, C]; dst -1 = no-op).

    The page axis is the fourth from last ([..., P, S, 2*Hkv, D]), so stage-stacked
    pages of pipeline parallelism are copied the same way.
    """
    src, dst = copies[0], copies[1]
    out = []
    for pages in kv_pages:
        lead = (slice(None),) * (pages.ndim - 4)
        dst_ = jnp.where(dst < 0, pages.shape[-4], dst)
        value = pages[(*lead, jnp.maximum(src, 0))]
        out.append(pages.at[(*lead, dst_)].set(value, mode="drop"))
    return out


def _write_rows(table: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
    """table[rows[i]] = values[i]; rows past the table are dropped."""
    return table.at[rows].set(values, mode="drop")


@dataclasses.dataclass
class StepHandle:
    """A dispatched step: device arrays not yet copied to the host."""

    out: SamplerOutput
    num_rows: int
    with_logprobs: bool
    stats: dict[str, jax.Array] = dataclasses.field(default_factory=dict)  # the model's
    drafts: jax.Array | None = None  # i32[R]: each row's draft-model proposal, or -1


@dataclasses.dataclass
class StepResult:
    tokens: list[int]  # one per row
    logprobs: np.ndarray | None  # f32[rows]
    ranks: np.ndarray | None
    top_ids: np.ndarray | None  # i32[rows, K]
    top_logprobs: np.ndarray | None
    # The model's step statistics on the host (e.g. "expert_tokens" i32[layers, experts]).
    stats: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    drafts: list[int] | None = None  # per row: the draft model's proposal it verified, or -1


def kv_bytes_per_page(cfg: ModelConfig, page_size: int, dtype: Any) -> int:
    """Bytes of one page over all layers, in the pages' dtype (quantized or ``dtype``)."""
    itemsize = page_dtype(cfg, dtype).itemsize
    return cfg.num_layers * page_size * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize


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
        draft: DraftSpec | None = None,  # a proposer on the device (speculative decoding)
        draft_params: Any = None,  # its weights
        lora_specs: Any = None,  # declarations of LoRA adapter slots (jserve.lora), or None
    ) -> None:
        self.params = params
        self.cfg = cfg
        self.ecfg = ecfg
        self.num_pages = num_pages
        self.pages_per_seq = math.ceil(max_model_len / ecfg.page_size)
        self.backend = pallas_kernels.resolve_backend(ecfg.attention_backend)
        self.mesh = mesh
        self.pp = 1 if mesh is None else mesh.shape[STAGE]
        num_mb = parallel.microbatches if self.pp > 1 else 1
        self.shapes = StepShapes(ecfg, self.pages_per_seq, num_mb)
        shape = (num_pages, ecfg.page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
        self._replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
        self._kv_sharding = None
        layers = cfg.num_layers
        if mesh is not None and self.pp == 1:  # pages split by KV head like the K/V weights
            self._kv_sharding = kv_pages_sharding(mesh)
        elif mesh is not None:
            shape = (self.pp, *shape)
            self._kv_sharding = pipeline_kv_sharding(mesh)
            layers = cfg.num_layers // self.pp
        self._kv_shape, self._kv_layers, self._dtype = shape, layers, dtype
        self.kv_pages: list[jax.Array] = []
        # A proposer's own pool (with the target's page ids) and state: see jserve.spec.
        self.draft_params = draft_params
        self.draft_state: dict[str, Any] = {}
        self._draft = draft
        self._lora_specs = lora_specs
        self._lora_shardings = None
        if lora_specs is not None and mesh is not None:  # split like their base weights
            self._lora_shardings = param_shardings(lora_specs, mesh)
        self.lora: Any = None
        self.reset()
        self._programs: dict[tuple, Any] = {}
        self.compiles = 0
        self.dispatches = 0

    # Whether ``reset`` brings the runner back to a clean state (not so where other
    # processes replay its steps: they would keep theirs).
    can_reset = True

    def reset(self) -> None:
        """Fresh device state: zero KV pages, page table, token history and samples, and
        an input builder with no sequences. After a failed step, whose donated buffers
        may be gone; compiled programs are kept."""
        self.kv_pages = []  # the old pages go before the new ones take their memory
        # Defaults of the optional step inputs kept on the device, by (input, rows): the
        # all-ones bitmask and the empty logit bias.
        self._defaults: dict[tuple[str, int], Any] = {}
        self.inputs = InputBuilder(self.shapes, self.cfg.eos_token_ids)
        rows, rep = self.ecfg.max_num_seqs + 1, self._replicated
        zeros = self._device_zeros
        self.kv_pages = [
            zeros(self._kv_shape, page_dtype(self.cfg, self._dtype), self._kv_sharding)
            for _ in range(self._kv_layers)
        ]
        self.draft_state = {}
        if self._draft is not None:
            d = self._draft.cfg
            dshape = (self._kv_shape[0], self.ecfg.page_size, 2 * d.num_kv_heads, d.head_dim)
            self.draft_state["kv"] = [
                zeros(dshape, self._dtype, self._kv_sharding) for _ in range(d.num_layers)
            ]
            for name, (shape, act) in self._draft.extra_state(self.cfg).items():
                dtype = self._dtype if act else jnp.int32
                self.draft_state[name] = zeros((rows, *shape), dtype, rep)
        self.lora = None
        if self._lora_specs is not None:  # every slot empty (zero)
            self.lora = jax.tree_util.tree_map(
                lambda spec, sh: zeros(spec.shape, self._dtype, sh),
                self._lora_specs,
                self._lora_shardings or jax.tree_util.tree_map(lambda _: None, self._lora_specs),
            )
        self.table = zeros((rows, self.pages_per_seq), jnp.int32, rep)
        self.history = zeros((rows, self.shapes.max_model_len), jnp.int32, rep)
        self._prev_tokens = zeros((self.ecfg.max_num_seqs,), jnp.int32, rep)

    def _device_zeros(self, shape: tuple[int, ...], dtype: Any, sharding: Any) -> Any:
        """A device array of zeros (jserve.aot's runner makes only its shape)."""
        return _zeros(shape, dtype, sharding)()

    # -- programs -------------------------------------------------------------

    def _program_spec(self, key: tuple) -> tuple[Callable, tuple, dict]:
        """(function, example arguments, jit options) of one program."""
        kind, size = key[0], key[1:]
        rep = self._replicated
        if kind == "step":
            t, r = size
            fn = functools.partial(
                _step,
                cfg=self.cfg,
                shapes=self.shapes,
                shape=(t, r),
                backend=self.backend,
                mesh=self.mesh,
                draft=self._draft,
            )
            packed = np.zeros(self.shapes.layout(t, r).size, np.int32)
            args = (
                self.params,
                self.kv_pages,
                self.table,
                self.history,
                self._prev_tokens,
                packed,
                np.full((r, self.mask_words), -1, np.int32),
                no_logit_bias(r),
                self.draft_params,
                self.draft_state,
                self.lora,
            )
            opts: dict[str, Any] = dict(donate_argnums=(1, 2, 3, 9))
            if self.mesh is not None:
                kv = [self._kv_sharding] * len(self.kv_pages)
                dstate = {
                    name: [self._kv_sharding] * len(v) if name == "kv" else rep
                    for name, v in self.draft_state.items()
                }
                opts["out_shardings"] = (kv, rep, rep, rep, rep, dstate, rep)
            return fn, args, opts
        if kind == "lora":  # one adapter slot written in place
            slot_tree = jax.tree_util.tree_map(lambda x: np.zeros(x.shape[1:], x.dtype), self.lora)
            opts = dict(donate_argnums=(0,))
            if self.mesh is not None:
                opts["out_shardings"] = self._lora_shardings
            return lora_ops.write_slot, (self.lora, np.int32(0), slot_tree), opts
        (n,) = size
        if kind == "copy":  # both pools: the draft's pages mirror the target's
            pools = self.kv_pages + self._draft_pool
            args = (pools, np.full((2, n), -1, np.int32))
            opts = dict(donate_argnums=(0,))
            if self.mesh is not None:
                opts["out_shardings"] = [self._kv_sharding] * len(pools)
            return _copy_pages, args, opts
        target = self.table if kind == "table" else self.history
        args = (target, np.zeros(n, np.int32), np.zeros((n, target.shape[1]), np.int32))
        opts = dict(donate_argnums=(0,))
        if self.mesh is not None:
            opts["out_shardings"] = rep
        return _write_rows, args, opts

    def lower(self, key: tuple) -> Any:
        """The lowered (not yet compiled) program of a key from ``program_keys``."""
        fn, args, opts = self._program_spec(key)
        return jax.jit(fn, **opts).lower(*args)

    def _program(self, key: tuple) -> Any:
        prog = self._programs.get(key)
        if prog is None:
            fn, args, opts = self._program_spec(key)
            # What the program depends on: its key, the static configuration, and
            # the structure, shapes, dtypes and placements of its arguments.
            leaves, tree = jax.tree_util.tree_flatten(args)
            sig = tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)
            shared = (
                key,
                self.cfg,
                self.shapes.key,
                self.backend,
                self.mesh,
                self._draft,
                tree,
                sig,
            )
            prog = _COMPILED.get(shared)
            if prog is None:
                prog = jax.jit(fn, **opts).lower(*args).compile()
                self.compiles += 1
            else:
                _COMPILED.move_to_end(shared)
            _share(shared, prog)
            self._programs[key] = prog
        return prog

    def program_keys(self) -> list[tuple]:
        """Every program serving can call: the step shapes and the pre-step writes."""
        sizes = self.shapes.batch_sizes
        return (
            [("step", t, r) for t, r in self.shapes.step_shapes()]
            + [("copy", n) for n in sizes]
            + [("table", n) for n in sizes]
            + [("history", n) for n in sizes]
            + ([("lora",)] if self.lora is not None else [])
        )

    # -- one step ----------------------------------------------------------

    def prepare(self, so: SchedulerOutput) -> StepPlan:
        """Host work only: the step's inputs as numpy arrays."""
        return self.inputs.build(so)

    @property
    def mask_words(self) -> int:
        return bitmask_words(self.cfg.vocab_size)

    def _optional(self, value: np.ndarray | None, name: str, rows: int) -> Any:
        """A plan's optional input, or (most steps) its default kept on the device: the
        all-ones bitmask, the empty logit bias."""
        if value is not None:
            return value
        default = self._defaults.get((name, rows))
        if default is None:
            if name == "bitmask":
                default = np.full((rows, self.mask_words), -1, np.int32)
            else:
                default = no_logit_bias(rows)
            if self.mesh is None:  # kept on the device: no transfer a step
                default = jax.device_put(default)
            self._defaults[(name, rows)] = default
        return default

    def dispatch(self, plan: StepPlan) -> StepHandle:
        """Issues the plan's device calls; returns before they finish."""
        if plan.copies is not None:
            pools = self._call(
                ("copy", plan.copies.shape[1]), self.kv_pages + self._draft_pool, plan.copies
            )
            n = len(self.kv_pages)
            self.kv_pages = pools[:n]
            if self.draft_state:
                self.draft_state["kv"] = pools[n:]
        if plan.table_writes is not None:
            self.table = self._write(("table",), self.table, plan.table_writes)
        if plan.history_writes is not None:
            self.history = self._write(("history",), self.history, plan.history_writes)
        for slot, weights in plan.lora_loads:
            self.lora = self._call(("lora",), self.lora, np.int32(slot), weights)
        self.kv_pages, self.table, self.history, out, stats, self.draft_state, drafts = self._call(
            ("step", *plan.shape),
            self.params,
            self.kv_pages,
            self.table,
            self.history,
            self._prev_tokens,
            plan.packed,
            self._optional(plan.bitmask, "bitmask", plan.shape[1]),
            self._optional(plan.logit_bias, "logit_bias", plan.shape[1]),
            self.draft_params,
            self.draft_state,
            self.lora,
        )
        self._prev_tokens = out.tokens
        return StepHandle(out, plan.num_rows, plan.want_logprobs, stats, drafts)

    @property
    def _draft_pool(self) -> list[jax.Array]:
        """The proposer's KV pool, whose pages mirror the target's (copied with them)."""
        return self.draft_state.get("kv", [])

    def _write(self, kind: tuple, target: jax.Array, w: RowWrites) -> jax.Array:
        return self._call((*kind, len(w.rows)), target, w.rows, w.values)

    def _call(self, key: tuple, *args: Any) -> Any:
        self.dispatches += 1
        return self._program(key)(*args)

    def fetch(self, handle: StepHandle) -> StepResult:
        """Blocks until the step is done and copies its samples to the host."""
        n = handle.num_rows
        o = handle.out
        lp = (o.logprobs, o.ranks, o.top_ids, o.top_logprobs) if handle.with_logprobs else ()
        if not lp and handle.drafts is None and not handle.stats:  # most steps
            return StepResult(np.asarray(o.tokens)[:n].tolist(), None, None, None, None)
        # Everything else the host reads comes back in one transfer.
        tokens, drafts, stats, *lp = jax.device_get((o.tokens, handle.drafts, handle.stats, *lp))
        lps, ranks, top_ids, top_lps = [x[:n] for x in lp] or (None,) * 4
        drafts = None if drafts is None else drafts[:n].tolist()
        return StepResult(tokens[:n].tolist(), lps, ranks, top_ids, top_lps, stats, drafts)

    # -- start-up -----------------------------------------------------------

    def warmup(self, progress: bool = True) -> int:
        """Compiles every program serving can reach, so serving never compiles.

        One at a time: concurrent compiles from threads crashed the process
        (jax 0.10.2 on CPU, in XLA's backend compile). Programs another engine
        in this process compiled already are reused. Returns the number of programs.
        """
        keys = self.program_keys()
        for k in tqdm(keys, desc="compiling step programs", disable=not progress):
            self._program(k)
        return len(keys)
