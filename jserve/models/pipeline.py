"""The decoder's layers run as a pipeline over the mesh's ``stage`` axis.

Inside one jitted step, the flat token batch is cut into M micro-batches of
equal length. Each stage holds a contiguous run of layers (stacked on a
leading stage axis) and their KV pages. At tick t, stage s works on
micro-batch t - s and hands its activations to stage s + 1 with a
collective permute, so after M + pp - 1 ticks every micro-batch has passed
every layer (GPipe-style; stages idle during the fill and drain ticks).
A sequence cut by a micro-batch boundary is fine: at each stage the earlier
micro-batch writes its K/V before the later one reads them.

Tensor parallelism composes: the shard_map is manual over ``stage`` only,
and XLA partitions each stage's layers over ``model`` as usual.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jserve.config import ModelConfig
from jserve.models import get_model
from jserve.models.attention import AttentionMetadata
from sharding.mesh import STAGE
from sharding.pipeline import uniform_stage_windows


def pipeline_forward(
    params: dict[str, Any],
    cfg: ModelConfig,
    input_ids: jax.Array,  # i32[T]
    kv_pages: list[jax.Array],  # per layer slot [pp, P, S, 2*Hkv, D]
    md: AttentionMetadata,  # every array with a leading [M] micro-batch axis
    mesh: Mesh,
) -> tuple[jax.Array, list[jax.Array], dict[str, jax.Array]]:
    """Returns final hidden states [T, E], the new pages, and no statistics (a
    mixture-of-experts model's expert counts are not collected across stages)."""
    model = get_model(cfg)
    pp = mesh.shape[STAGE]
    num_mb, tm = md.positions.shape  # [M, T/M]
    windows = uniform_stage_windows(cfg.sliding_windows, pp)
    x = model.embed(params, cfg, input_ids).reshape(num_mb, tm, -1)  # [M, Tm, E]

    def stages(stage_params: list[dict], pages: list[jax.Array], x: jax.Array, md: Any):
        s = jax.lax.axis_index(STAGE)
        local = [jax.tree_util.tree_map(lambda a: a[0], p) for p in stage_params]
        pages = [p[0] for p in pages]  # [P, S, 2*Hkv, D] each

        def run(operands: tuple, mb: jax.Array) -> tuple:
            h, pgs = operands
            md_mb = jax.tree_util.tree_map(lambda a: a[mb], md)
            out = []
            for j, lp in enumerate(local):
                with jax.named_scope(f"stage_layer_{j}"):
                    attend = model.paged_attend(cfg, md_mb, windows[j])
                    h, pg = model.decoder_layer(lp, cfg, h, md_mb.positions, attend, pgs[j], md_mb)
                out.append(pg)
            return h, out

        held = jnp.zeros_like(x[0])  # activations received from the previous stage
        outputs = jnp.zeros_like(x)
        for tick in range(num_mb + pp - 1):
            mb = tick - s
            active = (mb >= 0) & (mb < num_mb)
            mb = jnp.clip(mb, 0, num_mb - 1)
            h = jnp.where(s == 0, x[mb], held)
            h, pages = jax.lax.cond(active, lambda o, mb=mb: run(o, mb), lambda o: o, (h, pages))
            outputs = jnp.where((s == pp - 1) & active, outputs.at[mb].set(h), outputs)
            held = jax.lax.ppermute(h, STAGE, [(i, i + 1) for i in range(pp - 1)])
        # Only the last stage holds the results; share them with every stage.
        outputs = jax.lax.psum(jnp.where(s == pp - 1, outputs, 0), STAGE)
        return outputs, [p[None] for p in pages]

    staged = PartitionSpec(STAGE)
    fn = jax.shard_map(
        stages,
        mesh=mesh,
        in_specs=(staged, staged, PartitionSpec(), PartitionSpec()),
        out_specs=(PartitionSpec(), staged),
        axis_names={STAGE},
        check_vma=False,
    )
    out, kv_pages = fn(params["stages"], kv_pages, x, md)
    hidden = out.reshape(num_mb * tm, -1)
    return model.final_norm(params, cfg, hidden), kv_pages, {}
