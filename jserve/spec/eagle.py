"""An EAGLE-style draft head (EAGLE-1, Li et al. 2024): proposals from the target's features.

The head is one decoder layer over ``fc([embed(x_i), f_{i-1}])``, where ``f_{i-1}``
is the target's last hidden state (after its final norm) at the position before
token ``x_i``; its output ``g_i`` stands in for ``f_i``: the target's own LM head
turns it into the distribution of ``x_{i+1}``, and it is the feature of the next
proposal step. The head shares the target's embedding and LM head, so it costs
one small layer per proposal.

Checkpoints are EAGLE-1's layout for Llama, in safetensors: ``fc.weight``
[E, 2E] (embedding half first), ``fc.bias`` if any, ``layers.0.self_attn.{q,k,v,o}_proj``,
``layers.0.post_attention_layernorm``, ``layers.0.mlp.{gate,up,down}_proj``
(with or without a ``model.`` prefix), and a Llama ``config.json`` of one layer.
As in EAGLE-1 the layer has no input norm (its input is the fc's output), and
an ``embed_tokens.weight`` the checkpoint may carry is not read (the target's is
used). ``bin/train-demo-model --which eagle`` trains the embedded model's head.

In the step (the shape of ``DraftSpec``): the head keeps its own one-layer KV
pool with the target's page ids and, per page-table row, the target's feature at
the sequence's last kept position (state "feat"). Proposals start from that
feature and the lane's last token; after the target's forward the head runs over
the step's tokens with the target's new features (its catch-up), and each
sequence's feature moves to its last kept position: the last token of a prefill
chunk or decode, or for a verified run the row whose token was sampled (the first
rejection, or the bonus). A sequence with no feature of its own yet (its first
chunk, a sibling of ``n > 1`` just forked) starts from zeros, as training does at
position 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from checkpoints import SafetensorsReader, load_hf_params
from checkpoints.hf_export import export_tensors, write_hf_dir
from jserve.config import ModelConfig, config_from_dict, config_to_dict
from jserve.errors import ConfigError
from jserve.models import get_model, llama
from jserve.models.attention import AttentionMetadata
from jserve.models.base import Attend
from jserve.models.params import ParamSpec
from jserve.spec.draft import propose

ARCHITECTURE = "EagleLlamaForCausalLM"
DEFAULT_EAGLE = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "assets", "shakespeare-llama-eagle"
)


def head_config(raw: dict[str, Any], name: str = "") -> ModelConfig:
    """The head's layer as a one-layer Llama ``ModelConfig`` from its config.json."""
    layers = raw.get("num_hidden_layers", 1)
    if layers != 1:
        raise ConfigError(
            f"an EAGLE head {name!r} has num_hidden_layers {layers!r}; EAGLE-1 heads have one "
            "decoder layer (EAGLE-3 heads are not supported)"
        )
    raw = {**raw, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    return config_from_dict(raw, name)


def param_specs(cfg: ModelConfig, prefix: str = "", bias: bool = True) -> dict[str, Any]:
    """The head's weights: ``fc`` [2E, E] (with its bias unless ``bias`` is false: EAGLE-1's
    ``"bias": false`` heads) and one layer without its input norm."""
    e = cfg.hidden_size
    layer = llama.layer_specs(cfg, f"{prefix}layers.0")
    del layer["attn_norm"]
    specs = {
        "fc": ParamSpec(
            (2 * e, e),
            (None, "embed"),
            "normal",
            llama._linear(f"{prefix}fc.weight", (2 * e, e)),
            contract=(0,),
        ),
        "layer": layer,
    }
    if bias:
        specs["fc_bias"] = ParamSpec((e,), (None,), "zeros", llama._copy(f"{prefix}fc.bias", (e,)))
    return specs


def head_block(
    hp: dict[str, Any],
    cfg: ModelConfig,
    emb: jax.Array,  # [..., E]: embeddings of the tokens
    feat: jax.Array,  # [..., E]: the target's features of the positions before them
    positions: jax.Array,
    attend: Attend,
    state: Any,
) -> tuple[jax.Array, Any]:
    """The head's layer: [..., E] features of the tokens' positions, and attend's state."""
    x = jnp.concatenate([emb, feat.astype(emb.dtype)], axis=-1) @ hp["fc"]
    if "fc_bias" in hp:
        x = x + hp["fc_bias"]
    lp = hp["layer"]
    q, k, v = llama._qkv(lp, cfg, x, positions)  # no input norm (EAGLE-1)
    attn, state = attend(q, k, v, state)
    x = llama._attn_out(lp, x, attn)
    return llama.mlp_block(lp, cfg, x), state


def forward_dense(
    hp: dict[str, Any], cfg: ModelConfig, emb: jax.Array, feat: jax.Array
) -> jax.Array:
    """The head over padded sequences (training): emb, feat [B, L, E] -> [B, L, E]."""
    b, length = emb.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(length), (b, length))
    out, _ = head_block(hp, cfg, emb, feat, positions, llama.dense_attend(cfg, None), None)
    return out


def target_features(params: Any, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """The target's features (last hidden states after its final norm), [B, L] -> [B, L, E]."""
    b, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length), (b, length))
    model = get_model(cfg)
    x = model.embed(params, cfg, tokens)
    for i, lp in enumerate(params["layers"]):
        attend = model.dense_attend(cfg, cfg.sliding_windows[i])
        x, _ = model.decoder_layer(lp, cfg, x, positions, attend, None)
    return model.final_norm(params, cfg, x)


def shifted(feat: jax.Array) -> jax.Array:
    """[B, L, E] features -> those of the position before each (zeros at position 0)."""
    return jnp.concatenate([jnp.zeros_like(feat[:, :1]), feat[:, :-1]], axis=1)


@dataclasses.dataclass(frozen=True)
class EagleSpec:
    """The static side of an EAGLE head in the step program (see ``DraftSpec``)."""

    cfg: ModelConfig  # the head's layer
    num_speculative_tokens: int

    def extra_state(self, target_cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
        return {"feat": ((target_cfg.hidden_size,), True)}

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
        target = get_model(target_cfg)

        def forward_one(kv: list, tok: jax.Array, feat: jax.Array, md: AttentionMetadata) -> tuple:
            emb = target.embed(target_params, target_cfg, tok)
            attend = llama.paged_attend(self.cfg, md, None)
            g, pages = head_block(params, self.cfg, emb, feat, md.positions, attend, kv[0])
            return target.compute_logits(target_params, target_cfg, g), [pages], g

        own = f["lane_feat_ok"] > 0
        first = jnp.where(own[:, None], state["feat"][f["lane_rows"]], 0)
        return propose(
            forward_one,
            first,
            state,
            table,
            history,
            ids,
            f,
            vocab=target_cfg.vocab_size,
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
        ids: jax.Array,  # i32[T]
        hidden: jax.Array,  # [T, E]: the target's features of the step's tokens
        md: AttentionMetadata,
        f: dict[str, jax.Array],
        tokens: jax.Array,  # i32[>= R]: the step's sampled tokens, per row
    ) -> dict[str, Any]:
        feat_table = state["feat"]
        pad = feat_table.shape[0] - 1
        t = ids.shape[0]
        seqs = f["seq_rows"].shape[0]
        live = jnp.arange(seqs) < f["num_seqs"][0]
        starts = f["cu_q_lens"][:-1]
        # Each token's feature input: the target's at the token before it, which for a
        # sequence's first token in the step is the one kept from an earlier step.
        kept = jnp.where((live & (f["seq_feat_ok"] > 0))[:, None], feat_table[f["seq_rows"]], 0)
        prev = jnp.concatenate([jnp.zeros_like(hidden[:1]), hidden[:-1]])
        prev = prev.at[jnp.where(live, starts, t)].set(kept.astype(prev.dtype), mode="drop")
        emb = get_model(target_cfg).embed(target_params, target_cfg, ids)
        attend = llama.paged_attend(self.cfg, md, None)
        _, pages = head_block(params, self.cfg, emb, prev, md.positions, attend, state["kv"][0])
        # The feature each sequence keeps: its last token's, or for a verified run the
        # row whose token was sampled (leading accepted proposals, then one more).
        last = jnp.maximum(f["cu_q_lens"][1:] - 1, 0)
        feat_table = feat_table.at[jnp.where(live, f["seq_rows"], pad)].set(
            hidden[last].astype(feat_table.dtype)
        )
        lanes = f["lane_rows"].shape[0]
        lane_live = jnp.arange(lanes) < f["num_lanes"][0]
        j = jnp.arange(self.num_speculative_tokens)
        rows = f["lane_first_row"][:, None] + j  # [lanes, k]
        r_max = f["draft_ids"].shape[0] - 1
        ok = (j < f["lane_k"][:, None]) & (
            tokens[jnp.minimum(rows, r_max)] == f["draft_ids"][jnp.minimum(rows, r_max)]
        )
        accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
        final = jnp.minimum(f["lane_first_row"] + accepted, r_max)
        feat_table = feat_table.at[jnp.where(lane_live, f["lane_rows"], pad)].set(
            hidden[f["logits_indices"][final]].astype(feat_table.dtype)
        )
        return {**state, "kv": [pages], "feat": feat_table}


@dataclasses.dataclass
class LoadedHead:
    path: str
    cfg: ModelConfig
    params: Any


def _prefix(names: set[str], path: str) -> str:
    for prefix in ("", "model."):
        if f"{prefix}fc.weight" in names:
            return prefix
    raise ConfigError(
        f"{path} holds no EAGLE head: no fc.weight (EAGLE-1's layout: fc, layers.0.*) in its "
        "safetensors files"
    )


def load_head(path: str, target: Any) -> LoadedHead:
    """An EAGLE head directory for ``target`` (a LoadedModel), placed as its layers are."""
    from sharding import param_shardings

    with open(os.path.join(path, "config.json")) as fh:
        raw = json.load(fh)
    cfg = head_config(raw, os.path.basename(os.path.normpath(path)))
    tcfg = target.cfg
    if cfg.hidden_size != tcfg.hidden_size:
        raise ConfigError(
            f"the EAGLE head {path!r} has hidden_size {cfg.hidden_size} but the target has "
            f"{tcfg.hidden_size}; a head is trained for one target model"
        )
    if target.mesh is not None:
        cfg = cfg.with_kv_heads_for(target.parallel.tensor_parallel_size)
    with SafetensorsReader(path) as reader:
        names = set(reader.names())
    prefix = _prefix(names, path)
    specs = param_specs(cfg, prefix, bias=f"{prefix}fc.bias" in names)
    shardings = None if target.mesh is None else param_shardings(specs, target.mesh)
    params = load_hf_params(path, specs, target.dtype, shardings)
    return LoadedHead(path, cfg, params)


def save_head(hp: Any, cfg: ModelConfig, out_dir: str, dtype: str = "bfloat16") -> None:
    """Writes a head in EAGLE-1's layout (``load_head`` reads it back)."""
    tensors = export_tensors(hp, param_specs(cfg), dtype)
    config = config_to_dict(cfg, dtype)
    config.update(architectures=[ARCHITECTURE], num_hidden_layers=1, bias=True)
    write_hf_dir(tensors, config, {}, out_dir)


def config_for(target_cfg: ModelConfig) -> ModelConfig:
    """The config of a head of ``target_cfg``'s shape: one of its layers."""
    return target_cfg.replace(num_layers=1, sliding_windows=(None,), name="eagle-head")


def random_head(target_cfg: ModelConfig, seed: int, dtype: Any = jnp.float32) -> Any:
    """(head config, random head weights) shaped for ``target_cfg`` (tests, training)."""
    from jserve.models.params import init_params

    cfg = config_for(target_cfg)
    return cfg, init_params(param_specs(cfg), jax.random.key(seed), dtype)
