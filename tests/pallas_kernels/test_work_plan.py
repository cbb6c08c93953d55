"""The split-KV work plan: every q-block's key range is covered exactly once."""

from __future__ import annotations

import functools
import itertools

import jax
import numpy as np
import pytest

from pallas_kernels import work_plan as wp
from tests.pallas_kernels.batches import make_batch

BLOCK_KV = 16


def _plan_and_check(
    seqs: list[tuple[int, int]], *, block_q: int, window: int | None, target: int
) -> dict[int, list[tuple[int, int]]]:
    """Builds a plan, checks its invariants, returns {q-block row0: key ranges}."""
    b = make_batch(seqs, num_q_heads=1, num_kv_heads=1, head_dim=16, extra_tokens=5)
    make = jax.jit(
        functools.partial(
            wp.make_work_plan,
            num_tokens=b.q.shape[0],
            block_q=block_q,
            block_kv=BLOCK_KV,
            sliding_window=window,
            target_items=target,
            min_chunk=32,
        )
    )
    plan = make(b.kv_lens, b.cu_q_lens, b.num_seqs)
    items = np.asarray(plan.items)
    valid = items[items[:, wp.ITEM_VALID] == 1]
    covered: dict[int, list[tuple[int, int]]] = {}
    rows: dict[int, int] = {}
    for row in valid:
        r0 = int(row[wp.ITEM_ROW0])
        covered.setdefault(r0, []).append((int(row[wp.ITEM_KV_LO]), int(row[wp.ITEM_KV_HI])))
        rows[r0] = int(row[wp.ITEM_ROWS])
        assert row[wp.ITEM_KV_LO] % BLOCK_KV == 0
        assert (row[wp.ITEM_SLOT] >= 0) == (len([r for r in valid if r[wp.ITEM_ROW0] == r0]) > 1)

    # Q-blocks partition the token axis, padding tail included.
    seen = np.zeros(b.q.shape[0], int)
    for r0, n in rows.items():
        seen[r0 : r0 + n] += 1
    assert np.all(seen == 1), "each token row must belong to exactly one q-block"

    # The splits of each q-block tile exactly the keys its rows can see.
    cu = np.asarray(b.cu_q_lens)
    for i, (q_len, kv_len) in enumerate(seqs):
        for r0 in range(int(cu[i]), int(cu[i + 1]), block_q):
            ranges = sorted(covered[r0])
            first_pos = kv_len - q_len + r0 - int(cu[i])
            last_pos = first_pos + rows[r0] - 1
            lo = 0 if window is None else max(first_pos - window + 1, 0) // BLOCK_KV * BLOCK_KV
            assert ranges[0][0] == lo and ranges[-1][1] == last_pos + 1
            for (_, a_hi), (b_lo, _) in itertools.pairwise(ranges):
                assert a_hi == b_lo, "splits must not leave gaps or overlap"
            if target == 0:
                assert len(ranges) == 1

    # Merges list exactly the split q-blocks, each with its own slots.
    merges = np.asarray(plan.merges)
    merged = {int(m[wp.MERGE_ROW0]): m for m in merges if m[wp.MERGE_VALID]}
    assert set(merged) == {r0 for r0, rs in covered.items() if len(rs) > 1}
    slots = [
        s
        for m in merged.values()
        for s in range(m[wp.MERGE_SLOT0], m[wp.MERGE_SLOT0] + m[wp.MERGE_COUNT])
    ]
    assert len(set(slots)) == len(slots) and all(s < plan.sizes.num_slots for s in slots)
    return covered


@pytest.mark.parametrize(
    ("seqs", "block_q", "window", "target"),
    [
        ([(1, 2048)] * 8, 4, None, 64),
        ([(300, 1300), (1, 50), (17, 17)], 16, None, 8),
        ([(40, 90), (1, 1), (5, 700)], 8, 64, 16),
        ([(64, 64)] * 4, 16, None, 0),
    ],
    ids=["decode", "mixed", "window", "no_split"],
)
def test_plan_covers_every_key_range_once(seqs, block_q, window, target) -> None:
    covered = _plan_and_check(seqs, block_q=block_q, window=window, target=target)
    if seqs[0] == (1, 2048):
        assert all(len(covered[r0]) > 1 for r0 in range(8)), "long decodes must be split"


def test_static_bounds_hold_for_random_batches() -> None:
    """A truncated plan would leave gaps, which the checks above catch."""
    rng = np.random.default_rng(1)
    seqs = [(int(q), int(q + rng.integers(0, 400))) for q in rng.integers(1, 40, size=12)]
    for target in (1, 7, 50):
        _plan_and_check(seqs, block_q=8, window=None, target=target)
