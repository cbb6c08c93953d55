"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) as pure functions.

This module is the family's implementation of ``jserve.models.base.Model``
(reach it through ``jserve.models.get_model``). Weights are declared once in
``param_specs``; the forward passes are plain functions of (params, config,
inputs), and both run the one ``layer``, which takes the attention as a
callable: paged attention over KV pages in ``forward`` (``run_paged``), dense
causal attention in ``forward_dense`` (``run_dense``); the mixture-of-experts
family runs the same loops with its own ``layer``. The family's switches (biases, q/k norm) are
``cfg.options``, a ``LlamaOptions``. Layers are unrolled in Python: each
layer's weights are separate arrays and each layer's KV pages a separate
buffer, so XLA updates the pages in place and never copies a stacked cache.

Fused layouts, chosen so tensor parallelism can split them on one axis:
  wqkv     [E, Hkv, G+2, D]  per KV head: its G query heads, then K, then V
  w_gate_up [E, 2, F]        gate and up side by side per hidden unit
Axis letters in einsums: t token, e embed, k kv head, g query-per-kv,
h query head, d head dim, c gate/up, f MLP hidden, v vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints.source import HFSource
from jserve.config import ModelConfig, llama_options
from jserve.lora.ops import lora_delta
from jserve.models.attention import AttentionMetadata, paged_attention
from jserve.models.base import Attend
from jserve.models.kv_quant import layer_scales
from jserve.models.params import ParamSpec
from jserve.models.quant import declare, qeinsum, qtake
from jserve.models.rope import apply_rope

# ---------------------------------------------------------------------------
# Weight declarations and their Hugging Face sources.


def _range(idx: slice) -> tuple[int, int]:
    return idx.start, idx.stop


def _whole(idx: slice, size: int) -> bool:
    return idx.start == 0 and idx.stop == size


def _copy(name: str, shape: tuple[int, ...]) -> HFSource:
    return HFSource(
        (name,),
        lambda w: w,
        lambda w: (w,),
        shapes=(shape,),
        read_slice=lambda read, idx: read(name, idx),
    )


def _flat_range(idx: tuple[slice, ...], dims: tuple[int, ...]) -> slice:
    """A slice of the flattened dims that covers exactly ``idx``, if one does.

    E.g. dims (4, 8) with idx (1:3, 0:8) -> 8:24.
    """
    inner = 1
    for i in range(len(dims) - 1, 0, -1):
        if not _whole(idx[i], dims[i]):
            raise NotImplementedError(f"slice {idx} of {dims} is not contiguous")
        inner *= dims[i]
    return slice(idx[0].start * inner, idx[0].stop * inner)


def _linear(name: str, shape: tuple[int, ...]) -> HFSource:
    # torch Linear stores [out, in]; jserve multiplies x @ W with W [in..., out].
    in_dims, out = shape[:-1], shape[-1]

    def read_slice(read: Any, idx: tuple[slice, ...]) -> np.ndarray:
        src = read(name, (idx[-1], _flat_range(idx[:-1], in_dims)))  # [out', in']
        lead = tuple(i.stop - i.start for i in idx[:-1])
        return np.ascontiguousarray(src.T).reshape(*lead, src.shape[0])

    return HFSource(
        (name,),
        lambda w: np.ascontiguousarray(w.T).reshape(shape),
        # Inverse: [*in, out] -> [out, prod(in)].
        lambda w: (np.ascontiguousarray(w.reshape(-1, shape[-1]).T),),
        shapes=((out, int(np.prod(in_dims))),),
        read_slice=read_slice,
    )


def _fused_qkv(prefix: str, cfg: ModelConfig, suffix: str) -> HFSource:
    k, g, d, r = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim, cfg.kv_repeat
    lead_shape = (cfg.hidden_size,) if suffix == "weight" else ()
    names = tuple(f"{prefix}.self_attn.{p}_proj.{suffix}" for p in "qkv")

    def assemble(q: np.ndarray, kk: np.ndarray, v: np.ndarray, k0: int, k1: int) -> np.ndarray:
        """Heads [k0, k1) from q rows of those heads and k/v rows of the checkpoint heads
        [k0 // r, ceil(k1 / r)), each of which is repeated r times."""
        lead = q.shape[1:]  # (E',) for weights, () for biases
        n, skip = k1 - k0, k0 - (k0 // r) * r

        def kv(w: np.ndarray) -> np.ndarray:
            return np.repeat(w.reshape(-1, 1, d, *lead), r, axis=0)[skip : skip + n]

        out = np.concatenate([q.reshape(n, g, d, *lead), kv(kk), kv(v)], axis=1)
        # [n, G+2, D, *lead] -> [*lead, n, G+2, D]
        return np.ascontiguousarray(np.moveaxis(out, (0, 1, 2), (-3, -2, -1)))

    def read_slice(read: Any, idx: tuple[slice, ...]) -> np.ndarray:
        lead_idx, (ks, js, ds) = idx[:-3], idx[-3:]
        if not (_whole(js, g + 2) and _whole(ds, d)):
            raise NotImplementedError("the fused QKV weight is split only by KV head")
        k0, k1 = _range(ks)
        s0, s1 = k0 // r, -(-k1 // r)
        q = read(names[0], (slice(k0 * g * d, k1 * g * d), *lead_idx))
        kv_rows = slice(s0 * d, s1 * d)
        return assemble(
            q, read(names[1], (kv_rows, *lead_idx)), read(names[2], (kv_rows, *lead_idx)), k0, k1
        )

    def export(w: np.ndarray) -> tuple[np.ndarray, ...]:
        lead = w.shape[:-3]

        # [*lead, Hkv, n, D] -> [Hkv*n*D, *lead]
        def flat(part: np.ndarray) -> np.ndarray:
            part = np.moveaxis(part, (-3, -2, -1), (0, 1, 2))
            return np.ascontiguousarray(part.reshape(-1, *lead))

        kv = w[..., ::r, :, :]  # one copy of each replicated K/V head
        return flat(w[..., :g, :]), flat(kv[..., g : g + 1, :]), flat(kv[..., g + 1 :, :])

    src_kv = (k // r * d, *lead_shape)
    return HFSource(
        names,
        lambda q, kk, v: assemble(q, kk, v, 0, k),
        export,
        shapes=((k * g * d, *lead_shape), src_kv, src_kv),
        read_slice=read_slice,
    )


def _gate_up(module: str, suffix: str, e: int, f: int) -> HFSource:
    """[E, 2, F] (or the bias [2, F]) from ``module``'s gate_proj and up_proj, e.g. module
    "model.layers.0.mlp" (a Qwen2-MoE shared expert's is "...mlp.shared_expert")."""
    names = (f"{module}.gate_proj.{suffix}", f"{module}.up_proj.{suffix}")
    if suffix == "weight":  # [F, E] each -> [E, 2, F]

        def build(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(np.stack([gate.T, up.T], axis=1))

        def read_slice(read: Any, idx: tuple[slice, ...]) -> np.ndarray:
            e_idx, c_idx, f_idx = idx
            if not _whole(c_idx, 2):
                raise NotImplementedError("gate and up are split only along the hidden units")
            return build(read(names[0], (f_idx, e_idx)), read(names[1], (f_idx, e_idx)))

        return HFSource(
            names,
            build,
            lambda w: (np.ascontiguousarray(w[:, 0].T), np.ascontiguousarray(w[:, 1].T)),
            shapes=((f, e), (f, e)),
            read_slice=read_slice,
        )

    def read_bias(read: Any, idx: tuple[slice, ...]) -> np.ndarray:  # [2, F]
        if not _whole(idx[0], 2):
            raise NotImplementedError("gate and up are split only along the hidden units")
        return np.stack([read(names[0], idx[1:]), read(names[1], idx[1:])])

    return HFSource(
        names,
        lambda gate, up: np.stack([gate, up]),
        lambda w: (w[0], w[1]),
        shapes=((f,), (f,)),
        read_slice=read_bias,
    )


def layer_specs(cfg: ModelConfig, p: str) -> dict[str, ParamSpec]:
    """One decoder layer's float declarations, read from the checkpoint's tensors named
    ``{p}.self_attn.q_proj.weight`` and so on."""
    e, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hq, hk, g = cfg.num_q_heads, cfg.num_kv_heads, cfg.q_per_kv
    opts = llama_options(cfg)

    def norm(name: str, size: int = e) -> ParamSpec:
        return ParamSpec((size,), (None,), "ones", _copy(name, (size,)))

    layer = {
        "attn_norm": norm(f"{p}.input_layernorm.weight"),
        "wqkv": ParamSpec(
            (e, hk, g + 2, d),
            ("embed", "kv_heads", None, "head_dim"),
            "normal",
            _fused_qkv(p, cfg, "weight"),
            contract=(0,),
        ),
        "wo": ParamSpec(
            (hq, d, e),
            ("q_heads", "head_dim", "embed"),
            "normal",
            _linear(f"{p}.self_attn.o_proj.weight", (hq, d, e)),
            contract=(0, 1),
        ),
        "mlp_norm": norm(f"{p}.post_attention_layernorm.weight"),
        "w_gate_up": ParamSpec(
            (e, 2, f),
            ("embed", None, "mlp"),
            "normal",
            _gate_up(f"{p}.mlp", "weight", e, f),
            contract=(0,),
        ),
        "w_down": ParamSpec(
            (f, e),
            ("mlp", "embed"),
            "normal",
            _linear(f"{p}.mlp.down_proj.weight", (f, e)),
            contract=(0,),
        ),
    }
    if opts.qkv_bias:
        layer["bqkv"] = ParamSpec(
            (hk, g + 2, d), ("kv_heads", None, "head_dim"), "zeros", _fused_qkv(p, cfg, "bias")
        )
    if opts.o_bias:
        layer["bo"] = ParamSpec((e,), (None,), "zeros", _copy(f"{p}.self_attn.o_proj.bias", (e,)))
    if opts.mlp_bias:
        layer["b_gate_up"] = ParamSpec(
            (2, f), (None, "mlp"), "zeros", _gate_up(f"{p}.mlp", "bias", e, f)
        )
        layer["b_down"] = ParamSpec((e,), (None,), "zeros", _copy(f"{p}.mlp.down_proj.bias", (e,)))
    if opts.qk_norm:
        layer["q_norm"] = norm(f"{p}.self_attn.q_norm.weight", d)
        layer["k_norm"] = norm(f"{p}.self_attn.k_norm.weight", d)
    return layer


def float_param_specs(cfg: ModelConfig) -> dict[str, Any]:
    """Every weight as a float declaration (shape, logical axes, init, HF source)."""
    e, v = cfg.hidden_size, cfg.vocab_size
    layers = [layer_specs(cfg, f"model.layers.{i}") for i in range(cfg.num_layers)]

    specs: dict[str, Any] = {
        "embed": ParamSpec(
            (v, e),
            ("vocab", "embed"),
            "normal",
            _copy("model.embed_tokens.weight", (v, e)),
            contract=(1,),
        ),
        "layers": layers,
        "final_norm": ParamSpec((e,), (None,), "ones", _copy("model.norm.weight", (e,))),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec(
            (e, v), ("embed", "vocab"), "normal", _linear("lm_head.weight", (e, v)), contract=(0,)
        )
    return specs


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    """Declares every weight of the model (shape, logical axes, init, HF source); under
    ``cfg.quant`` each matmul weight is a ``QuantArray`` of declarations."""
    return declare(float_param_specs(cfg), cfg)


# ---------------------------------------------------------------------------
# Forward pass.


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32 as transformers does."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def project(lp: dict[str, Any], name: str, subscripts: str, x: jax.Array) -> jax.Array:
    """``x`` times the layer's weight ``name`` (``qeinsum``), plus the LoRA update of each
    token's adapter where the step's layers carry adapters (jserve.lora.ops)."""
    y = qeinsum(subscripts, x, lp[name])
    lora = lp.get("lora")
    if lora is not None and name in lora:
        y = y + lora_delta(subscripts, x, lora[name], lora["one_hot"])
    return y


def _qkv(
    lp: dict[str, jax.Array], cfg: ModelConfig, h: jax.Array, positions: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Projects [..., E] to rotated q [..., Hq, D], k and v [..., Hkv, D]."""
    g = cfg.q_per_kv
    qkv = project(lp, "wqkv", "...e,ekgd->...kgd", h)  # [..., Hkv, G+2, D]
    if "bqkv" in lp:
        qkv = qkv + lp["bqkv"]
    q = qkv[..., :g, :].reshape(*qkv.shape[:-3], cfg.num_q_heads, cfg.head_dim)
    k = qkv[..., g, :]  # [..., Hkv, D]
    v = qkv[..., g + 1, :]
    if llama_options(cfg).qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q, positions, cfg), apply_rope(k, positions, cfg), v


def _attn_out(lp: dict[str, jax.Array], x: jax.Array, attn: jax.Array) -> jax.Array:
    out = project(lp, "wo", "...hd,hde->...e", attn)  # [..., E]
    if "bo" in lp:
        out = out + lp["bo"]
    return x + out


def mlp_block(lp: dict[str, jax.Array], cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """The gated MLP with its norm and residual, [..., E] -> [..., E]."""
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    gu = project(lp, "w_gate_up", "...e,ecf->...cf", h)  # [..., 2, F]
    if "b_gate_up" in lp:
        gu = gu + lp["b_gate_up"]
    act = jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :]  # [..., F]
    out = project(lp, "w_down", "...f,fe->...e", act)
    if "b_down" in lp:
        out = out + lp["b_down"]
    return x + out


def attention_block(
    lp: dict[str, jax.Array],
    cfg: ModelConfig,
    x: jax.Array,  # [..., E]
    positions: jax.Array,  # i32[...]
    attend: Attend,
    state: Any,
) -> tuple[jax.Array, Any]:
    """Norm, attention and residual; returns (x, the state ``attend`` hands back)."""
    with jax.named_scope("attention"):
        h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
        q, k, v = _qkv(lp, cfg, h, positions)
        attn, state = attend(q, k, v, state)
        return _attn_out(lp, x, attn), state


# A layer as the forward loops run it: (lp, cfg, x, positions, attend, state, md) ->
# (x, attend's state, the layer's statistics or None); md is the step's metadata on the
# paged path and None on the dense one. A family's ``layer`` (this module's, or
# ``moe.layer``) is all that differs between the families' forward passes.
LayerFn = Callable[..., tuple[jax.Array, Any, Any]]


def layer(
    lp: dict[str, jax.Array],
    cfg: ModelConfig,
    x: jax.Array,  # [..., E]
    positions: jax.Array,  # i32[...]
    attend: Attend,
    state: Any,
    md: AttentionMetadata | None = None,
) -> tuple[jax.Array, Any, None]:
    """One transformer block as the forward loops run it (``run_paged``, ``run_dense``):
    (x, the state ``attend`` hands back, the layer's statistics: none for a dense MLP)."""
    x, state = attention_block(lp, cfg, x, positions, attend, state)
    with jax.named_scope("mlp"):
        x = mlp_block(lp, cfg, x)
    return x, state, None


def without_stats(layer_fn: LayerFn) -> Callable[..., tuple[jax.Array, Any]]:
    """A family's ``decoder_layer`` from its ``layer``: the same block, returning
    (x, the state ``attend`` hands back) without the layer's statistics."""

    def decoder_layer(*args: Any) -> tuple[jax.Array, Any]:
        x, state, _ = layer_fn(*args)
        return x, state

    return decoder_layer


decoder_layer = without_stats(layer)


def paged_attend(
    cfg: ModelConfig,
    md: AttentionMetadata,
    sliding_window: int | None,
    kv_scales: tuple[float | None, float | None] = (None, None),
) -> Attend:
    """Attention over a flat ragged batch [T, H, D]; the state is one layer's KV pages
    [P, S, 2*Hkv, D], into which this step's K/V are written first. ``kv_scales`` are the
    layer's (k_scale, v_scale) for quantized pages (jserve.models.kv_quant)."""

    def attend(
        q: jax.Array, k: jax.Array, v: jax.Array, kv_pages: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        return paged_attention(
            q,
            k,
            v,
            kv_pages,
            md,
            sm_scale=cfg.head_dim**-0.5,
            sliding_window=sliding_window,
            k_scale=kv_scales[0],
            v_scale=kv_scales[1],
        )

    return attend


def dense_attend(cfg: ModelConfig, sliding_window: int | None) -> Attend:
    """Causal attention within a padded batch (q [B, L, Hq, D], k/v [B, L, Hkv, D]),
    keys limited to the last ``sliding_window`` positions when set; the state is None."""

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, state: None) -> tuple[jax.Array, None]:
        b, length = q.shape[:2]
        q_pos = jnp.arange(length)[:, None]
        k_pos = jnp.arange(length)[None, :]
        mask = k_pos <= q_pos  # [Lq, Lk]
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        q = q.reshape(b, length, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim)
        s = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
        s = jnp.where(mask, s * cfg.head_dim**-0.5, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", p, v).reshape(b, length, cfg.num_q_heads, -1)
        return out, state

    return attend


def embed(params: dict[str, Any], cfg: ModelConfig, ids: jax.Array) -> jax.Array:
    """Token ids [...] -> [..., E]."""
    return qtake(params["embed"], ids)


def final_norm(params: dict[str, Any], cfg: ModelConfig, x: jax.Array) -> jax.Array:
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps)


def run_paged(
    params: dict[str, Any],
    cfg: ModelConfig,
    input_ids: jax.Array,  # i32[T]
    kv_pages: list[jax.Array],  # per layer [P, S, 2*Hkv, D]
    md: AttentionMetadata,
    layer_fn: LayerFn = layer,
) -> tuple[jax.Array, list[jax.Array], list[Any]]:
    """One step over a flat ragged batch with ``layer_fn`` per layer; returns final hidden
    states [T, E], new pages and each layer's statistics."""
    x = embed(params, cfg, input_ids)  # [T, E]
    new_pages, stats = [], []
    for i, lp in enumerate(params["layers"]):
        with jax.named_scope(f"layer_{i}"):
            attend = paged_attend(cfg, md, cfg.sliding_windows[i], layer_scales(cfg, i))
            x, pages, s = layer_fn(lp, cfg, x, md.positions, attend, kv_pages[i], md)
        new_pages.append(pages)
        stats.append(s)
    return final_norm(params, cfg, x), new_pages, stats


def forward(
    params: dict[str, Any],
    cfg: ModelConfig,
    input_ids: jax.Array,  # i32[T]
    kv_pages: list[jax.Array],  # per layer [P, S, 2*Hkv, D]
    md: AttentionMetadata,
) -> tuple[jax.Array, list[jax.Array], dict[str, jax.Array]]:
    """One step over a flat ragged batch; returns final hidden states [T, E], new pages,
    and the step's statistics (none for a dense model)."""
    hidden, new_pages, _ = run_paged(params, cfg, input_ids, kv_pages, md)
    return hidden, new_pages, {}


def compute_logits(params: dict[str, Any], cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """[N, E] final hidden states -> [N, V] float32 logits."""
    if cfg.tie_word_embeddings:
        logits = qeinsum("ne,ve->nv", hidden, params["embed"])
    else:
        logits = qeinsum("ne,ev->nv", hidden, params["lm_head"])
    return logits.astype(jnp.float32)


def run_dense(
    params: dict[str, Any], cfg: ModelConfig, tokens: jax.Array, layer_fn: LayerFn = layer
) -> jax.Array:
    """Causal forward over a padded batch [B, L] -> logits [B, L, V], no cache, with
    ``layer_fn`` per layer."""
    b, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length), (b, length))
    x = embed(params, cfg, tokens)  # [B, L, E]
    for i, lp in enumerate(params["layers"]):
        with jax.named_scope(f"layer_{i}"):
            attend = dense_attend(cfg, cfg.sliding_windows[i])
            x, _, _ = layer_fn(lp, cfg, x, positions, attend, None, None)
    x = final_norm(params, cfg, x)
    return compute_logits(params, cfg, x.reshape(b * length, -1)).reshape(b, length, -1)


def forward_dense(params: dict[str, Any], cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Causal forward over a padded batch [B, L] -> logits [B, L, V], no cache.

    Used for training and for scoring; the same blocks as ``forward`` with
    dense attention in place of paged attention.
    """
    return run_dense(params, cfg, tokens)
