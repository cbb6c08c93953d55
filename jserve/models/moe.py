"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE) as pure functions.

This module is the MoE families' implementation of ``jserve.models.base.Model``.
Attention, embeddings and the head are the Llama family's (``llama``); the MLP
of each layer that ``MoeOptions.moe_layers`` marks is replaced by routed
experts (dense layers of Qwen2-MoE's ``decoder_sparse_step`` keep Llama's MLP).

Routing follows transformers exactly: router logits [T, X], softmax over all
X experts in float32, the top k, renormalised to sum 1 when
``norm_topk_prob`` (always for Mixtral). Qwen2-MoE adds a shared MLP whose
output is scaled by sigmoid(x . w_gate) and added to the experts'.

Compute: the T*k (token, expert) pairs are sorted by expert and both expert
matmuls run as one grouped matmul each (``jax.lax.ragged_dot``) over the
sorted rows, so no [T, X, E] array exists and no pair is ever dropped
(there is no capacity). Padding tokens of the step's bucket (slot -1) are
sorted past every group: they take no expert compute and are not counted.

Parallel layout, over the mesh's tensor-parallel axis (``model``), inside one
``shard_map`` per MoE block:
  tensor parallel  every device holds every expert's slice of hidden units
                   (the ``mlp`` axis), like the dense MLP;
  expert parallel  (``MoeOptions.expert_parallel``) every device holds X/tp
                   whole experts (the ``expert`` axis).
Either way the block's input is already on every device (attention under
tensor parallelism ends in an all-reduce), each device computes its partial
output from the pairs routed to what it holds, and one all-reduce (psum) sums
them: the same one collective per layer as the dense MLP. An all-to-all
exchange would only pay off with tokens split over devices (data-parallel
attention), which jserve does not do: with replicated tokens it would move
k times the block's activations twice (and capacity-sized buffers) instead
of one all-reduce of [T, E].

Axis letters: t token, e embed, x expert, c gate/up, f expert hidden, k top-k.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from checkpoints.source import HFSource
from jserve.config import ModelConfig, MoeOptions
from jserve.errors import ConfigError
from jserve.models import llama
from jserve.models.attention import AttentionMetadata
from jserve.models.base import Attend
from jserve.models.params import ParamSpec
from jserve.models.quant import declare
from sharding.rules import logical_to_spec

# The Llama family's pieces this family shares unchanged.
embed = llama.embed
final_norm = llama.final_norm
compute_logits = llama.compute_logits
dense_attend = llama.dense_attend
paged_attend = llama.paged_attend


def moe_options(cfg: ModelConfig) -> MoeOptions:
    if not isinstance(cfg.options, MoeOptions):
        raise ConfigError(
            f"family {cfg.family!r} needs MoeOptions in ModelConfig.options, got {cfg.options!r}"
        )
    return cfg.options


# ---------------------------------------------------------------------------
# Weight declarations and their Hugging Face sources.


def _names(cfg: ModelConfig, i: int) -> dict[str, Any]:
    """Checkpoint names of layer i's MoE block: Mixtral's w1/w3/w2 under
    ``block_sparse_moe``, Qwen's gate/up/down_proj under ``mlp``."""
    x = moe_options(cfg).num_experts
    if cfg.family == "mixtral":
        p = f"model.layers.{i}.block_sparse_moe"
        parts = ("w1", "w3", "w2")
    else:
        p = f"model.layers.{i}.mlp"
        parts = ("gate_proj", "up_proj", "down_proj")
    gate, up, down = (tuple(f"{p}.experts.{j}.{w}.weight" for j in range(x)) for w in parts)
    return {"router": f"{p}.gate.weight", "gate": gate, "up": up, "down": down, "prefix": p}


def _experts_gate_up(gates: tuple[str, ...], ups: tuple[str, ...], e: int, f: int) -> HFSource:
    """[X, E, 2, F] from each expert's gate and up [F, E]; a slice reads only its experts'
    tensors, and of those only its rows."""
    x = len(gates)

    def build(*ws: np.ndarray) -> np.ndarray:
        g, u = np.stack(ws[:x]), np.stack(ws[x:])  # [X, F, E] each
        return np.ascontiguousarray(np.stack([g, u], axis=-1).transpose(0, 2, 3, 1))

    def read_slice(read: Any, idx: tuple[slice, ...]) -> np.ndarray:
        xs, es, cs, fs = idx
        if not llama._whole(cs, 2):
            raise NotImplementedError("gate and up are split only along the hidden units")
        x0, x1 = llama._range(xs)
        g = np.stack([read(gates[j], (fs, es)) for j in range(x0, x1)])  # [X', F', E']
        u = np.stack([read(ups[j], (fs, es)) for j in range(x0, x1)])
        return np.ascontiguousarray(np.stack([g, u], axis=-1).transpose(0, 2, 3, 1))

    def export(w: np.ndarray) -> tuple[np.ndarray, ...]:  # [X, E, 2, F]
        g = [np.ascontiguousarray(w[j, :, 0].T) for j in range(x)]
        u = [np.ascontiguousarray(w[j, :, 1].T) for j in range(x)]
        return (*g, *u)

    return HFSource(
        (*gates, *ups), build, export, shapes=((f, e),) * (2 * x), read_slice=read_slice
    )


def _experts_down(downs: tuple[str, ...], e: int, f: int) -> HFSource:
    """[X, F, E] from each expert's down [E, F]."""

    def build(*ws: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.stack(ws).transpose(0, 2, 1))

    def read_slice(read: Any, idx: tuple[slice, ...]) -> np.ndarray:
        xs, fs, es = idx
        x0, x1 = llama._range(xs)
        return build(*(read(downs[j], (es, fs)) for j in range(x0, x1)))

    def export(w: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(np.ascontiguousarray(w[j].T) for j in range(len(downs)))

    return HFSource(downs, build, export, shapes=((e, f),) * len(downs), read_slice=read_slice)


def expert_axes(cfg: ModelConfig) -> tuple[tuple, tuple]:
    """Logical axes of the experts' gate/up [X, E, 2, F] and down [X, F, E] weights:
    split by expert under expert parallelism, by hidden unit otherwise."""
    if moe_options(cfg).expert_parallel:
        return ("expert", "embed", None, None), ("expert", None, "embed")
    return (None, "embed", None, "mlp"), (None, "mlp", "embed")


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    """Llama's declarations with each MoE layer's MLP replaced by router and experts."""
    o = moe_options(cfg)
    e, f, x, fs = cfg.hidden_size, o.moe_intermediate_size, o.num_experts, o.shared_expert_size
    gu_axes, down_axes = expert_axes(cfg)
    specs = llama.float_param_specs(cfg)
    for i, layer in enumerate(specs["layers"]):
        if not o.moe_layers[i]:
            continue
        n = _names(cfg, i)
        del layer["w_gate_up"], layer["w_down"]
        layer["router"] = ParamSpec(
            (e, x), ("embed", None), "normal", llama._linear(n["router"], (e, x))
        )
        layer["experts_gate_up"] = ParamSpec(
            (x, e, 2, f), gu_axes, "normal", _experts_gate_up(n["gate"], n["up"], e, f)
        )
        layer["experts_down"] = ParamSpec(
            (x, f, e), down_axes, "normal", _experts_down(n["down"], e, f)
        )
        if fs:
            p = n["prefix"]
            layer["shared_gate_up"] = ParamSpec(
                (e, 2, fs),
                ("embed", None, "mlp"),
                "normal",
                llama._gate_up(f"{p}.shared_expert", "weight", e, fs),
            )
            layer["shared_down"] = ParamSpec(
                (fs, e),
                ("mlp", "embed"),
                "normal",
                llama._linear(f"{p}.shared_expert.down_proj.weight", (fs, e)),
            )
            layer["shared_gate"] = ParamSpec(
                (e, 1),
                ("embed", None),
                "normal",
                llama._linear(f"{p}.shared_expert_gate.weight", (e, 1)),
            )
    # Routed and shared experts stay float under quantization (no ``contract``).
    return declare(specs, cfg)


# ---------------------------------------------------------------------------
# Routing and the grouped expert matmuls.


def route(h: jax.Array, router: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """[T, E] -> (f32 weights [T, K], expert ids i32[T, K]): softmax, top-k, renormalise."""
    o = moe_options(cfg)
    logits = jnp.einsum("te,ex->tx", h, router)  # [T, X], in the model's dtype as transformers
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_w, top_i = jax.lax.top_k(probs, o.top_k)  # [T, K]
    if o.norm_topk_prob:
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    return top_w, top_i.astype(jnp.int32)


def expert_counts(top_i: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
    """Tokens routed to each expert, i32[X], real tokens only. E.g. top_i [[0, 2], [2, 1]],
    valid [True, False] -> [1, 0, 1] for 3 experts."""
    ids = jnp.where(valid[:, None], top_i, num_experts).reshape(-1)  # padding -> out of range
    return jnp.zeros(num_experts, jnp.int32).at[ids].add(1, mode="drop")


def grouped_experts(
    h: jax.Array,  # [T, E]
    top_w: jax.Array,  # f32[T, K]
    top_i: jax.Array,  # i32[T, K], global expert ids
    valid: jax.Array,  # bool[T]
    w_gate_up: jax.Array,  # [Xl, E, 2, F]: the experts this device holds
    w_down: jax.Array,  # [Xl, F, E]
    first: jax.Array | int,  # global id of this device's first expert
) -> jax.Array:
    """The routed experts' output for every token [T, E], from the experts held here.

    The T*K (token, expert) pairs are sorted by local expert; pairs whose expert
    is elsewhere (or whose token is padding) get id Xl and sort past every group,
    so ``ragged_dot`` leaves their rows out. E.g. K 2, Xl 2, first 0, top_i
    [[1, 0], [0, 3]]: local ids [1, 0, 0, 2] -> order [1, 2, 0, 3], group sizes [2, 1];
    row 3 (expert 3, held elsewhere) is in no group.
    """
    t, k = top_i.shape
    xl, e, _, f = w_gate_up.shape
    local = top_i - first
    here = (local >= 0) & (local < xl) & valid[:, None]  # [T, K]
    local = jnp.where(here, local, xl).reshape(-1)  # [T*K]
    order = jnp.argsort(local, stable=True)  # [T*K]
    sizes = jnp.zeros(xl, jnp.int32).at[local].add(1, mode="drop")  # [Xl]
    rows = h[order // k]  # [T*K, E]
    gu = jax.lax.ragged_dot(rows, w_gate_up.reshape(xl, e, 2 * f), sizes).reshape(-1, 2, f)
    act = jax.nn.silu(gu[:, 0]) * gu[:, 1]  # [T*K, F]
    out = jax.lax.ragged_dot(act, w_down, sizes)  # [T*K, E]
    w = top_w.reshape(-1)[order]
    out = jnp.where(here.reshape(-1)[order][:, None], out * w[:, None], 0).astype(h.dtype)
    # Back to (token, k) order, then each token's K contributions summed.
    unsorted = jnp.zeros_like(out).at[order].set(out)
    return unsorted.reshape(t, k, e).sum(axis=1)


def shared_expert(
    h: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, w_gate: jax.Array
) -> jax.Array:
    """Qwen2-MoE's shared MLP scaled by its sigmoid gate, [T, E] -> [T, E]."""
    gu = jnp.einsum("te,ecf->tcf", h, w_gate_up)  # [T, 2, F]
    out = jnp.einsum("tf,fe->te", jax.nn.silu(gu[:, 0]) * gu[:, 1], w_down)
    return jax.nn.sigmoid(jnp.einsum("te,eo->to", h, w_gate)) * out


_MODEL_AXIS = logical_to_spec(("expert",))[0]


def _split_mesh(mesh: Mesh | None) -> Mesh | None:
    """The mesh to split the experts over (None: one device, or a model axis of size 1).
    Inside the pipeline's shard_map the context mesh (with ``stage`` manual) is used."""
    if mesh is None or mesh.shape.get(_MODEL_AXIS, 1) == 1:
        return None
    ctx = jax.sharding.get_abstract_mesh()
    return mesh if ctx.empty else ctx


def moe_block(
    lp: dict[str, jax.Array],
    cfg: ModelConfig,
    x: jax.Array,  # [T, E]
    valid: jax.Array,  # bool[T]: real tokens (not bucket padding)
    mesh: Mesh | None,
) -> tuple[jax.Array, jax.Array]:
    """Norm, routed (and shared) experts, residual; returns (x [T, E], counts i32[X])."""
    o = moe_options(cfg)
    h = llama.rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    top_w, top_i = route(h, lp["router"], cfg)
    counts = expert_counts(top_i, valid, o.num_experts)
    shared = ("shared_gate_up", "shared_down", "shared_gate")
    weights = [lp["experts_gate_up"], lp["experts_down"]]
    if o.shared_expert_size:
        weights += [lp[n] for n in shared]
    split = _split_mesh(mesh)

    def local(h, top_w, top_i, valid, w_gu, w_down, *sh):
        first = 0
        if split is not None and o.expert_parallel:
            first = jax.lax.axis_index(_MODEL_AXIS) * w_gu.shape[0]
        out = grouped_experts(h, top_w, top_i, valid, w_gu, w_down, first)
        if sh:
            out = out + shared_expert(h, *sh)
        # Each device holds some experts (or a slice of every expert's hidden
        # units): its output is a partial sum, completed by one all-reduce.
        return out if split is None else jax.lax.psum(out, _MODEL_AXIS)

    if split is None:
        out = local(h, top_w, top_i, valid, *weights)
    else:
        gu_axes, down_axes = expert_axes(cfg)
        axes = [gu_axes, down_axes, ("embed", None, "mlp"), ("mlp", "embed"), ("embed", None)]
        rep = PartitionSpec()
        out = jax.shard_map(
            local,
            mesh=split,
            in_specs=(rep, rep, rep, rep, *(logical_to_spec(a) for a in axes[: len(weights)])),
            out_specs=rep,
            axis_names={_MODEL_AXIS},
            check_vma=False,
        )(h, top_w, top_i, valid, *weights)
    return x + out, counts


# ---------------------------------------------------------------------------
# Layers and the forward passes.


def layer(
    lp: dict[str, jax.Array],
    cfg: ModelConfig,
    x: jax.Array,  # [..., E]
    positions: jax.Array,  # i32[...]
    attend: Attend,
    state: Any,
    md: AttentionMetadata | None = None,
) -> tuple[jax.Array, Any, jax.Array | None]:
    """One block (``llama.LayerFn``); returns (x, attention state, expert counts i32[X] or
    None for a dense layer). With ``md`` (the paged path), tokens with slot -1 are
    padding and the experts split over ``md.mesh``."""
    x, state = llama.attention_block(lp, cfg, x, positions, attend, state)
    if "router" not in lp:
        with jax.named_scope("mlp"):
            return llama.mlp_block(lp, cfg, x), state, None
    flat = x.reshape(-1, x.shape[-1])  # [T, E]
    valid = jnp.ones(flat.shape[0], bool) if md is None else md.slot_mapping.reshape(-1) >= 0
    with jax.named_scope("moe"):
        out, counts = moe_block(lp, cfg, flat, valid, None if md is None else md.mesh)
    return out.reshape(x.shape), state, counts


decoder_layer = llama.without_stats(layer)


def forward(
    params: dict[str, Any],
    cfg: ModelConfig,
    input_ids: jax.Array,  # i32[T]
    kv_pages: list[jax.Array],  # per layer [P, S, 2*Hkv, D]
    md: AttentionMetadata,
) -> tuple[jax.Array, list[jax.Array], dict[str, jax.Array]]:
    """One step; returns final hidden states [T, E], new pages and
    {"expert_tokens": i32[MoE layers, X]}, the real tokens each expert took."""
    hidden, new_pages, counts = llama.run_paged(params, cfg, input_ids, kv_pages, md, layer)
    counts = [c for c in counts if c is not None]
    return hidden, new_pages, {"expert_tokens": jnp.stack(counts)}


def forward_dense(params: dict[str, Any], cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Causal forward over a padded batch [B, L] -> logits [B, L, V], no cache."""
    return llama.run_dense(params, cfg, tokens, layer)


# ---------------------------------------------------------------------------
# Parallel layout.


def with_expert_parallel(cfg: ModelConfig, enabled: bool, tensor_parallel_size: int) -> ModelConfig:
    """The config with experts split over the tensor-parallel devices when ``enabled``."""
    if not enabled:
        return cfg
    if not isinstance(cfg.options, MoeOptions):
        raise ConfigError(
            f"enable_expert_parallel needs a mixture-of-experts model; {cfg.architecture} has "
            "no experts (leave expert parallelism off)"
        )
    x = cfg.options.num_experts
    if x % tensor_parallel_size:
        raise ConfigError(
            f"expert parallelism splits the {x} experts over tensor_parallel_size "
            f"{tensor_parallel_size} devices, which does not divide them; choose a "
            "tensor_parallel_size that divides the number of experts"
        )
    return cfg.replace(options=dataclasses.replace(cfg.options, expert_parallel=True))


def check_pipeline(cfg: ModelConfig, pp: int) -> None:
    """Every pipeline stage's layer slot j must be the same kind (dense or MoE)."""
    if not isinstance(cfg.options, MoeOptions):
        return
    layers = cfg.options.moe_layers
    lps = len(layers) // pp
    for j in range(lps):
        kinds = {layers[s * lps + j] for s in range(pp)}
        if len(kinds) > 1:
            raise ConfigError(
                f"pipeline parallelism needs every stage to have the same layer layout; layer "
                f"slot {j} is an expert layer in some stages and dense in others "
                "(decoder_sparse_step / mlp_only_layers); choose another pipeline_parallel_size"
            )


def expert_placement(cfg: ModelConfig, mesh: Mesh | None) -> str:
    """Which experts (or which slice of them) each device holds, for the start-up report
    ("" for a dense model).

    E.g. 8 experts, expert parallel over 4 devices: "experts: expert parallel over
    model=4: device 0 holds experts 0-1, device 1 holds 2-3, ...".
    """
    if not isinstance(cfg.options, MoeOptions):
        return ""
    o = cfg.options
    x, f = o.num_experts, o.moe_intermediate_size
    layers = sum(o.moe_layers)
    head = f"experts: {x} per layer in {layers} layers, top-{o.top_k}"
    if o.shared_expert_size:
        head += " + a shared expert"
    n = 1 if mesh is None else mesh.shape[_MODEL_AXIS]
    if n == 1:
        return f"{head}; all on each device"
    if o.expert_parallel:
        per = x // n
        held = [f"{d * per}-{(d + 1) * per - 1}" if per > 1 else f"{d}" for d in range(n)]
        kind = "experts" if per > 1 else "expert"
        where = ", ".join(f"device {d} holds {kind} {h}" for d, h in enumerate(held))
        return f"{head}; expert parallel over {_MODEL_AXIS}={n}: {where}"
    return (
        f"{head}; tensor parallel over {_MODEL_AXIS}={n}: every device holds all {x} experts, "
        f"{f // n} of their {f} hidden units each"
    )
