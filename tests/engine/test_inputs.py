"""The input builder on hand-built scheduler outputs: exact packed fields, diffs and writes."""

from __future__ import annotations

import numpy as np

from jserve.engine.config import EngineConfig
from jserve.engine.inputs import MAX_INLINE_PAGES, InputBuilder
from jserve.engine.scheduler import NewSeq, ScheduledEntry, SchedulerOutput
from jserve.engine.shapes import StepShapes
from jserve.sampling_params import SamplingParams

PAGE = 4
CFG = EngineConfig(page_size=PAGE, max_num_seqs=4, max_num_batched_tokens=16, max_logprobs=2)


def builder(num_microbatches: int = 1) -> InputBuilder:
    return InputBuilder(StepShapes(CFG, 16, num_microbatches), eos_ids=(2,))


def new(seq_id: int, tokens: list[int] | None = None, **sp: object) -> NewSeq:
    return NewSeq(seq_id, SamplingParams(**sp), 7 + seq_id, 0, 3, tokens)


def entry(
    seq_id: int, start: int, tokens: list[int], pages: list[int], **kw: object
) -> ScheduledEntry:
    fields: dict = dict(
        seq_id=seq_id,
        start=start,
        num_new=len(tokens),
        token_ids=tokens,
        src_row=-1,
        page_offset=0,
        new_pages=pages,
        num_scored=1,
        targets=[seq_id],
        first_row=0,
        out_pos=0,
    )
    fields.update(kw)
    return ScheduledEntry(**fields)


def output(entries: list[ScheduledEntry], new_seqs: list[NewSeq], **kw: object) -> SchedulerOutput:
    fields: dict = dict(
        new_seqs=new_seqs,
        entries=entries,
        num_tokens=sum(e.num_new for e in entries),
        num_rows=sum(e.num_rows for e in entries),
        copies=[],
        released=[],
    )
    fields.update(kw)
    return SchedulerOutput(**fields)


def fields(b: InputBuilder, plan) -> dict[str, np.ndarray]:
    layout = b.shapes.layout(*plan.shape)
    views = layout._views(plan.packed)
    return {k: np.array(v) for k, v in views.items()}


def test_prefill_and_decode_in_one_step() -> None:
    b = builder()
    # Sequence 0 prefills 3 tokens into page 5; sequence 1 decodes position 6 of
    # pages [8, 9], its input sampled in row 2 of the previous step.
    so = output(
        [
            entry(0, 0, [11, 12, 13], [5]),
            entry(1, 6, [], [8, 9], num_new=1, src_row=2, first_row=1, out_pos=3),
        ],
        [new(0), new(1, temperature=0.5, top_p=0.9, min_tokens=5, stop_token_ids=[7])],
    )
    plan = b.build(so)
    assert plan.shape == (4, 4) and plan.num_rows == 2 and not plan.want_logprobs
    f = fields(b, plan)
    r0, r1 = b.rows[0], b.rows[1]
    assert (r0, r1) == (0, 1)
    assert f["ids"][:4].tolist() == [11, 12, 13, 0]
    assert f["src_rows"].tolist() == [-1, -1, -1, 2]  # 4 tokens: no padding
    assert f["positions"][:4].tolist() == [0, 1, 2, 6]
    assert f["slot_mapping"].tolist() == [20, 21, 22, 9 * PAGE + 2]
    assert f["token_rows"].tolist() == [r0, r0, r0, r1]
    assert f["seq_rows"].tolist() == [r0, r1, 4, 4]
    assert f["kv_lens"].tolist() == [3, 7, 0, 0]
    assert f["cu_q_lens"].tolist() == [0, 3, 4, 4, 4]
    assert f["num_seqs"].tolist() == [2]
    # Both sequences' pages are patched into the device table in place.
    n = 3
    assert f["diff_rows"][:n].tolist() == [r0, r1, r1] and f["diff_rows"][n] == 5
    assert f["diff_cols"][:n].tolist() == [0, 0, 1]
    assert f["diff_pages"][:n].tolist() == [5, 8, 9]
    assert f["logits_indices"][:2].tolist() == [2, 3]
    assert f["temperature"][:2].tolist() == [1.0, 0.5] and f["top_p"][1] == np.float32(0.9)
    assert f["seeds"][:2].tolist() == [7, 8]
    assert f["out_position"][:2].tolist() == [0, 3]
    # Row 1 is below min_tokens: its stop id and EOS are banned.
    assert f["banned"][1, :3].tolist() == [7, 2, -1] and f["banned"][0, 0] == -1
    assert f["history_rows"][:2].tolist() == [r0, r1] and f["history_lens"][:2].tolist() == [3, 7]
    assert f["flags"].tolist() == [1, 1, 0, 0, 0, 0]
    assert b.table[r1, :2].tolist() == [8, 9]


def test_siblings_sample_the_parents_last_position() -> None:
    b = builder()
    so = output(
        [entry(0, 0, [1, 2, 3, 4, 5], [0, 1], targets=[0, 1, 2], first_row=0)],
        [new(0, n=3, temperature=1.0), new(1, n=3, temperature=1.0), new(2, n=3, temperature=1.0)],
    )
    so.new_seqs[1].index, so.new_seqs[2].index = 1, 2
    plan = b.build(so)
    f = fields(b, plan)
    assert plan.num_rows == 3
    assert f["logits_indices"][:3].tolist() == [4, 4, 4]
    assert f["sample_index"][:3].tolist() == [0, 1, 2]
    # Siblings draw from the parent's history row, which holds the prompt.
    assert f["history_rows"][:3].tolist() == [b.rows[0]] * 3


def test_long_cached_prefix_writes_the_whole_row_and_releases_free_rows() -> None:
    b = builder()
    pages = list(range(10, 11 + MAX_INLINE_PAGES))
    start = MAX_INLINE_PAGES * PAGE
    so = output(
        [entry(0, start, [1, 2], pages)],
        [new(0, [0] * start + [1, 2], presence_penalty=1.0)],
        copies=[(3, 4)],
    )
    plan = b.build(so)
    f = fields(b, plan)
    assert (f["diff_rows"] == 5).all()  # nothing patched in place
    w = plan.table_writes
    assert w.rows.tolist() == [b.rows[0]] and w.values[0, : len(pages)].tolist() == pages
    # A penalized new sequence gets its token history written once.
    h = plan.history_writes
    assert h.rows.tolist() == [b.rows[0]] and h.values[0, start : start + 2].tolist() == [1, 2]
    assert f["flags"].tolist() == [1, 0, 1, 0, 0, 0] and f["num_prompt"][0] == 3
    assert plan.copies.tolist() == [[3], [4]]
    row = b.rows[0]
    b.build(output([], [], released=[0]))
    assert 0 not in b.rows and b.free_rows[-1] == row


def test_pipeline_microbatches_split_the_metadata() -> None:
    b = builder(num_microbatches=2)
    so = output(
        [entry(0, 4, list(range(6)), [0, 1, 2]), entry(1, 0, [9, 9], [3])],
        [new(0), new(1)],
    )
    plan = b.build(so)  # 8 tokens -> bucket 8: chunks of 4
    f = fields(b, plan)
    assert plan.shape[0] == 8
    # Sequence 0 (positions 4-9) is cut after its first 4 tokens; chunk 1 holds
    # its last 2 and sequence 1's 2.
    assert f["kv_lens"].tolist() == [[8, 0, 0, 0], [10, 2, 0, 0]]
    assert f["seq_rows"][:, :2].tolist() == [[b.rows[0], 4], [b.rows[0], b.rows[1]]]
    assert f["cu_q_lens"].tolist() == [[0, 4, 4, 4, 4], [0, 2, 4, 4, 4]]
    assert f["num_seqs"].tolist() == [[1], [2]]


def test_prompt_positions_get_rows_scoring_the_next_prompt_token() -> None:
    b = builder()
    # Sequence 0 computes positions 4..7 and scores 5..7 (4 was scored before a
    # preemption) against prompt tokens 6..8 in rows 0-2; sequence 1 samples in row 3.
    so = output(
        [
            entry(
                0,
                4,
                [11, 12, 13, 14],
                [5],
                num_scored=0,
                targets=[],
                first_row=3,
                prompt_first=5,
                prompt_targets=[16, 17, 18],
            ),
            entry(1, 6, [21], [8, 9], first_row=3),
        ],
        [new(0, prompt_logprobs=1, temperature=0.7, top_k=3), new(1, temperature=0.5)],
    )
    assert so.num_rows == 4
    plan = b.build(so)
    f = fields(b, plan)
    assert plan.want_logprobs and f["flags"].tolist() == [1, 0, 0, 1, 0, 0]
    assert f["logits_indices"][:4].tolist() == [1, 2, 3, 4]
    assert f["score_ids"].tolist() == [16, 17, 18, -1]
    # Scoring rows are neutral: greedy, no filters, no history.
    assert f["temperature"].tolist() == [0.0, 0.0, 0.0, 0.5]
    assert f["top_k"][:3].tolist() == [0, 0, 0]
    assert f["history_lens"][:3].tolist() == [0, 0, 0]
