"""The XLA path's own knobs: q-block size, wave width and KV step.

test_attention.py runs the XLA path with its tuned sizes; here every batch
also runs with small and odd sizes so that sequences span several q-blocks,
waves mix blocks of different sequences (and idle lanes), and KV steps are
one page. The sizes are passed straight to xla_ragged_paged_attention (the
public entry point forwards only the KV step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.xla import xla_ragged_paged_attention
from tests.pallas_kernels.test_attention import CASES, LARGE, _batch, _check, _reference

# (block_q, wave, pages_per_block); None: the tuned value.
SIZES = [(1, 1, 1), (1, 5, 2), (3, 2, 1), (8, 3, 2), (None, 2, 3)]


def _xla(case, b, **kw):
    return xla_ragged_paged_attention(
        *b.args(),
        sm_scale=case.head_dim**-0.5,
        sliding_window=case.sliding_window,
        soft_cap=case.soft_cap,
        **kw,
    )


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("name", [*CASES, "large"])
def test_sizes_match_reference(name: str, sizes: tuple) -> None:
    case = LARGE if name == "large" else CASES[name]
    block_q, wave, pages_per_block = sizes
    b = _batch(case)
    out = jax.jit(
        lambda *a: _xla(
            case, b._make(a), block_q=block_q, wave=wave, pages_per_block=pages_per_block
        )
    )(*b.args())
    _check(out, b, _reference(name), case.dtype)


def test_default_sizes_under_jit_with_traced_metadata() -> None:
    """Mixed batch (two passes) with every metadata array traced."""
    case = CASES["mixed_gqa8_window"]
    b = _batch(case)
    out = jax.jit(lambda *a: _xla(case, b._make(a)))(*b.args())
    _check(out, b, _reference("mixed_gqa8_window"), case.dtype)


def test_empty_batch_is_zero() -> None:
    case = CASES["mixed_mqa_softcap"]
    b = _batch(case)._replace(num_seqs=jnp.zeros((1,), jnp.int32))
    for block_q in (None, 1):
        out = _xla(case, b, block_q=block_q)
        assert np.all(np.asarray(out) == 0)
