"""Invalid arguments raise a clear ValueError on every backend, before any kernel runs."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import pallas_kernels
from tests.pallas_kernels.batches import make_batch

SEQS = [(3, 10), (1, 20)]


def _args(**overrides):
    b = make_batch(SEQS, num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=4)
    args = b._asdict()
    args.update(overrides)
    return args


def _bad_cases():
    b = make_batch(SEQS, num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=4)
    short_kv = b.kv_lens.at[0].set(2)  # sequence 0 has q_len 3 > kv_len 2
    return {
        "head_dim": (dict(q=jnp.zeros((b.q.shape[0], 4, 8))), {}, "head_dim mismatch"),
        "kv_lens_dtype": (dict(kv_lens=b.kv_lens.astype(jnp.int16)), {}, "int32"),
        "page_indices_dtype": (
            dict(page_indices=b.page_indices.astype(jnp.float32)),
            {},
            "int32",
        ),
        "cu_q_lens_dtype": (dict(cu_q_lens=b.cu_q_lens.astype(jnp.uint32)), {}, "int32"),
        "q_len_gt_kv_len": (dict(kv_lens=short_kv), {}, r"q_len \(3\) > kv_len \(2\)"),
        "too_few_pages": (dict(page_indices=b.page_indices[:, :2]), {}, "needs 3 pages"),
        "heads_not_multiple": (dict(q=jnp.zeros((b.q.shape[0], 3, 16))), {}, "multiple"),
        "sliding_window_zero": ({}, dict(sliding_window=0), "sliding_window"),
        "sliding_window_negative": ({}, dict(sliding_window=-4), "sliding_window"),
        "soft_cap_zero": ({}, dict(soft_cap=0.0), "soft_cap"),
        "block_q_zero": ({}, dict(block_q=0), "block_q"),
        "unknown_tuning": ({}, dict(tuning={"warps": 4}), "tuning knob"),
    }


@pytest.mark.parametrize("backend", pallas_kernels.BACKENDS)
@pytest.mark.parametrize("case", list(_bad_cases()))
def test_invalid_arguments_raise(case: str, backend: str) -> None:
    overrides, kwargs, message = _bad_cases()[case]
    if case == "unknown_tuning" and backend in ("xla", "auto"):
        kwargs = dict(tuning={"num_warps": 4})  # a GPU knob is wrong for xla too
    with pytest.raises(ValueError, match=message):
        pallas_kernels.ragged_paged_attention(**_args(**overrides), backend=backend, **kwargs)


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown attention backend"):
        pallas_kernels.ragged_paged_attention(**_args(), backend="cuda")


def test_auto_is_xla_on_cpu() -> None:
    assert pallas_kernels.resolve_backend("auto") == "xla"
    assert set(pallas_kernels.BACKENDS) >= {
        "auto",
        "xla",
        "pallas_gpu",
        "pallas_gpu_interpret",
        "pallas_tpu",
        "pallas_tpu_interpret",
    }
