"""LoRA on the device: adapter slots stacked per weight and the batched gather matmul.

Model code multiplies by a weight that may carry adapters through one hook
(``jserve.models.llama.project``): the base matmul plus ``lora_delta`` where the
layer's parameters carry a ``"lora"`` entry (``with_adapters``).

Each fused weight an adapter may change has, per layer, ``a [S, *in, P*R]``
and ``b [S, P*R, *out]`` for the ``S = max_loras`` slots (see
``jserve.lora.adapter`` for the layout). A step carries one slot index per
token (-1: the base model alone). A weight's update for a mixed batch is two
matmuls that do not depend on the mix, so one program serves any mix of
adapters and base-only tokens:

    h     = x @ a        over every slot      [T, S, P*R]
    h    *= one_hot(slot of each token)       (zero for base tokens)
    delta = h @ b        contracting S and R  [T, *out]

The work is ``T * S * P*R * (in + out)`` multiply-adds per weight, so it grows
with ``max_loras * max_lora_rank``; for a handful of slots of rank <= 64 it is
small beside the base matmul. Slot contents change by an in-place update
(``write_slot``, donated), never a recompile.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

_SLOT, _RANK = "S", "R"  # einsum letters no weight's subscripts use


def lora_delta(
    subscripts: str, x: jax.Array, ab: dict[str, jax.Array], one_hot: jax.Array
) -> jax.Array:
    """The update of a weight used as ``einsum(subscripts, x, w)`` (e.g. "...e,ekgd->...kgd"),
    for tokens whose adapter slot ``one_hot`` [..., S] marks."""
    inputs, out = subscripts.split("->")
    x_sub, w_sub = inputs.split(",")
    contract = "".join(c for c in w_sub if c in x_sub)
    kept = "".join(c for c in w_sub if c not in x_sub)
    assert x_sub.endswith(contract), subscripts
    batch = x_sub[: len(x_sub) - len(contract)]
    s, r = _SLOT, _RANK
    h = jnp.einsum(f"{x_sub},{s}{contract}{r}->{batch}{s}{r}", x, ab["a"])
    h = h * one_hot[..., :, None].astype(h.dtype)
    return jnp.einsum(f"{batch}{s}{r},{s}{r}{kept}->{out}", h, ab["b"])


def with_adapters(params: dict[str, Any], lora: dict[str, Any], slots: jax.Array) -> dict:
    """``params`` whose layers carry their adapter slots and the tokens' one-hot slot
    selection (``slots`` i32[T], -1 for base-only tokens), for ``project``."""
    num_slots = jax.tree_util.tree_leaves(lora)[0].shape[0]
    dtype = jax.tree_util.tree_leaves(lora)[0].dtype
    one_hot = (slots[:, None] == jnp.arange(num_slots)[None, :]).astype(dtype)  # [T, S]
    layers = [
        {**lp, "lora": {**ll, "one_hot": one_hot}} if ll else lp
        for lp, ll in zip(params["layers"], lora["layers"], strict=True)
    ]
    return {**params, "layers": layers}


def write_slot(lora: dict[str, Any], slot: jax.Array, weights: dict[str, Any]) -> dict:
    """``lora`` with slot ``slot`` holding ``weights`` (the same tree without the slot
    axis); jitted with ``lora`` donated, so the slot is written in place."""
    return jax.tree_util.tree_map(
        lambda stacked, w: jax.lax.dynamic_update_index_in_dim(
            stacked, w.astype(stacked.dtype), slot, 0
        ),
        lora,
        weights,
    )
