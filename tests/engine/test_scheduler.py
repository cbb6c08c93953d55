"""The scheduler on hand-built requests: exact budgets, victims, copies, siblings and diffs."""

from __future__ import annotations

from jserve.engine.config import EngineConfig
from jserve.engine.kv_pool import PagePool
from jserve.engine.request import Request, Status
from jserve.engine.scheduler import Scheduler, SchedulerOutput
from jserve.sampling_params import SamplingParams

EOS = 2


def make(num_pages: int = 32, page_size: int = 4, **kw: int) -> Scheduler:
    cfg = EngineConfig(page_size=page_size, max_num_seqs=4, max_num_batched_tokens=16)
    cfg = EngineConfig(**{**cfg.__dict__, **kw})
    return Scheduler(cfg, PagePool(num_pages, page_size), eos_token_ids=(EOS,))


_ARRIVALS = iter(range(1 << 30))


def request(
    rid: str, prompt: list[int], max_out: int = 8, priority: int = 0, **sp: object
) -> Request:
    """Requests arrive in the order they are made."""
    params = SamplingParams(max_tokens=max_out, **sp)
    return Request(
        rid, None, prompt, params, 1, max_out, priority, arrival_time=float(next(_ARRIVALS))
    )


def plan(so: SchedulerOutput) -> list[tuple[int, int, int, int]]:
    """(seq_id, start, num_new, num_rows) per entry."""
    return [(e.seq_id, e.start, e.num_new, e.num_rows) for e in so.entries]


def test_budget_decodes_first_then_chunks_then_admits() -> None:
    s = make(max_num_batched_tokens=10)
    a = s.add_request(request("a", list(range(10, 16))))  # 6 tokens
    so = s.schedule()
    assert plan(so) == [(a.seq_id, 0, 6, 1)]
    assert so.num_tokens == 6 and so.num_rows == 1
    assert so.entries[0].token_ids == list(range(10, 16)) and so.entries[0].src_row == -1
    assert so.entries[0].new_pages == [0, 1] and so.entries[0].page_offset == 0
    assert [n.seq_id for n in so.new_seqs] == [a.seq_id]
    b = s.add_request(request("b", list(range(20, 32))))  # 12 tokens
    so = s.schedule()  # a decodes its pending token (from row 0), b gets the other 9
    assert plan(so) == [(a.seq_id, 6, 1, 1), (b.seq_id, 0, 9, 0)]
    assert so.entries[0].token_ids == [] and so.entries[0].src_row == 0
    assert so.entries[1].num_scored == 0 and so.entries[1].targets == []


def test_update_appends_tokens_and_applies_token_stops() -> None:
    s = make()
    a = s.add_request(request("a", [5, 6, 7], max_out=3))
    b = s.add_request(request("b", [5, 6, 8], max_out=5))
    c = s.add_request(request("c", [5, 6, 9], max_out=5, stop_token_ids=[40], min_tokens=2))
    so = s.schedule()
    upd = s.update(so, [11, EOS, 40])
    assert [(u.seq.seq_id, u.tokens, u.rows) for u in upd] == [
        (a.seq_id, [11], [0]),
        (b.seq_id, [EOS], [1]),
        (c.seq_id, [40], [2]),
    ]
    assert b.finish_reason == "stop" and b.stop_reason is None and not b.pages
    assert not c.finished  # below min_tokens, a stop id does not stop
    so = s.schedule()
    s.update(so, [12, 40])
    assert a.token_ids == [5, 6, 7, 11, 12] and c.finish_reason == "stop" and c.stop_reason == 40
    so = s.schedule()
    s.update(so, [13])
    assert a.finish_reason == "length" and len(a.token_ids) - 3 == 3
    assert not s.running and s.pool.num_used == 0
    # A finished sequence's table row is released with the next step.
    assert s.pending_releases == [a.seq_id]


def test_pending_token_is_fed_from_the_previous_row() -> None:
    s = make()
    a = s.add_request(request("a", [1, 2, 3]))
    b = s.add_request(request("b", [4, 5]))
    first = s.schedule()
    second = s.schedule()  # planned before the first step's tokens are known
    assert [(e.seq_id, e.src_row, e.token_ids) for e in second.entries] == [
        (a.seq_id, 0, []),
        (b.seq_id, 1, []),
    ]
    assert a.num_pending == 2
    s.update(first, [7, 8])
    assert a.num_pending == 1 and a.token_ids == [1, 2, 3, 7]
    s.update(second, [9, 10])
    assert a.token_ids == [1, 2, 3, 7, 9] and b.token_ids == [4, 5, 8, 10]


def test_preemption_takes_the_newest_lowest_priority_and_frees_its_pages() -> None:
    # 4 pages of 4 tokens: a and b hold 2 pages each after their prompts.
    s = make(num_pages=4, max_num_batched_tokens=16)
    a = s.add_request(request("a", list(range(1, 9)), priority=0))  # 8 tokens: 2 full pages
    b = s.add_request(request("b", list(range(11, 19)), priority=1))
    s.update(s.schedule(), [20, 21])
    assert s.pool.num_free == 0
    so = s.schedule()  # a needs a third page: b is the victim
    assert plan(so) == [(a.seq_id, 8, 1, 1)]
    assert b.status is Status.WAITING and b.num_computed == 0 and b.pages == []
    assert s.num_preemptions == 1 and b.seq_id in so.released
    assert so.entries[0].page_offset == 2 and len(so.entries[0].new_pages) == 1


def test_siblings_fork_when_the_prompt_completes_and_copy_on_write() -> None:
    s = make(page_size=4)
    req = request("a", [1, 2, 3, 4, 5, 6], n=3, temperature=1.0)  # last page half full
    a = s.add_request(req)
    so = s.schedule()
    assert [e.targets for e in so.entries] == [[0, 1, 2]] and so.num_rows == 3
    assert [n.seq_id for n in so.new_seqs] == [0, 1, 2]
    assert [n.index for n in so.new_seqs] == [0, 1, 2]
    kids = req.seqs[1:]
    assert all(k.pages == a.pages for k in kids) and s.pool.ref_count[a.pages[1]] == 3
    s.update(so, [30, 31, 32])
    so = s.schedule()
    # Each sequence writes position 6 into the shared page 1: the first two copy it,
    # the last holds it alone by then and writes in place.
    assert [(src, dst) for src, dst in so.copies] == [(1, 2), (1, 3)]
    assert [(e.seq_id, e.page_offset, e.new_pages) for e in so.entries] == [
        (0, 1, [2]),
        (1, 0, [0, 3]),
        (2, 0, [0, 1]),
    ]
    assert [e.token_ids for e in so.entries] == [[30], [31], [32]]


def test_n_samples_reserve_their_slots_so_admission_never_livelocks() -> None:
    # 4 slots. Two n=2 requests fill them; a third waits instead of starving them.
    s = make(max_num_batched_tokens=64)
    reqs = [request(f"r{i}", [i + 1] * 5, max_out=2, n=2) for i in range(3)]
    for r in reqs:
        s.add_request(r)
    so = s.schedule()
    assert [e.seq_id for e in so.entries] == [0, 1] and so.num_rows == 4
    s.update(so, [9] * so.num_rows)
    for _ in range(10):
        if not s.has_work:
            break
        so = s.schedule()
        s.update(so, [9] * so.num_rows)
    assert all(r.finished for r in reqs) and s.pool.num_used == 0


def test_prefix_cache_hit_starts_after_the_cached_pages() -> None:
    s = make()
    a = s.add_request(request("a", list(range(1, 11)), max_out=1))  # 10 tokens: 2 full pages
    s.update(s.schedule(), [50])
    assert a.finished
    b = s.add_request(request("b", [*range(1, 10), 99]))
    so = s.schedule()
    assert plan(so) == [(b.seq_id, 8, 2, 1)]
    # Its two full pages came from the cache; the partly filled third was freed first,
    # so it is handed out again first.
    assert so.entries[0].new_pages == [0, 1, 2] and so.entries[0].page_offset == 0
    assert b.request.num_cached_tokens == 8 and a.pages == []


def _scored(so: SchedulerOutput, seq_id: int) -> list[int]:
    """The prompt positions an entry of ``seq_id`` scores this step."""
    return [
        e.prompt_first + i
        for e in so.entries
        if e.seq_id == seq_id
        for i in range(len(e.prompt_targets))
    ]


def test_prompt_logprob_chunks_fit_the_row_budget() -> None:
    # 4 rows a step. Mid-prompt, the prompt-logprobs request a samples nothing, so
    # its chunk may take all 4; a request b admitted beside it gets a chunk one short
    # of its end (no sample row) while the rows are taken.
    s = make(max_num_batched_tokens=16)
    prompt = list(range(20, 32))  # 12 tokens: positions 0..10 are scored
    a = s.add_request(request("a", prompt, max_out=2, prompt_logprobs=2))
    so = s.schedule()
    assert plan(so) == [(a.seq_id, 0, 4, 4)] and so.num_rows == 4
    e = so.entries[0]
    assert (e.prompt_first, e.prompt_targets, e.prompt_row) == (0, prompt[1:5], 0)
    assert e.num_scored == 0 and e.targets == []
    b = s.add_request(request("b", [1, 2, 3]))
    s.update(so, [0] * so.num_rows)
    so = s.schedule()
    assert plan(so) == [(a.seq_id, 4, 4, 4), (b.seq_id, 0, 2, 0)]
    scored = [0, 1, 2, 3, *_scored(so, a.seq_id)]
    s.update(so, [0] * so.num_rows)
    # b samples (1 row), so a scores 8..10 (3 rows) and leaves its last token,
    # whose sample would need a fifth row, for the next step.
    so = s.schedule()
    assert plan(so) == [(b.seq_id, 2, 1, 1), (a.seq_id, 8, 3, 3)] and so.num_rows == 4
    assert (so.entries[0].first_row, so.entries[1].prompt_row) == (0, 1)
    scored += _scored(so, a.seq_id)
    assert scored == list(range(11))
    s.update(so, [0] * so.num_rows)
    so = s.schedule()
    assert plan(so) == [(a.seq_id, 11, 1, 1), (b.seq_id, 3, 1, 1)]
    assert so.entries[0].prompt_targets == [] and so.entries[0].targets == [a.seq_id]


def test_one_row_steps_still_score_a_prompt() -> None:
    s = make(max_num_seqs=1, max_num_batched_tokens=16)
    a = s.add_request(request("a", [4, 5, 6], max_out=1, prompt_logprobs=0))
    steps = []
    while s.has_work:
        so = s.schedule()
        steps.append((*plan(so)[0][1:], so.entries[0].prompt_targets))
        s.update(so, [0] * so.num_rows)
    assert steps == [(0, 1, 1, [5]), (1, 1, 1, [6]), (2, 1, 1, [])]
    assert a.finish_reason == "length"


def test_prompt_logprobs_are_scored_once_across_preemption_and_cache_hits() -> None:
    # 3 pages of 4 tokens: the decoding request d needs its second page while the
    # prompt-logprobs request a is mid-prompt, so a (lower priority) is preempted,
    # then recomputed from the page it completed, which is in the prefix cache.
    s = make(num_pages=3, max_num_batched_tokens=16)
    d = s.add_request(request("d", [1, 2, 3], max_out=5))
    prompt = list(range(40, 50))  # positions 0..8 are scored
    a = s.add_request(request("a", prompt, max_out=1, priority=1, prompt_logprobs=0))
    scored: list[int] = []
    starts = []
    for _ in range(40):
        if not s.has_work:
            break
        so = s.schedule()
        scored += _scored(so, a.seq_id)
        starts += [e.start for e in so.entries if e.seq_id == a.seq_id]
        s.update(so, [9] * so.num_rows)
    assert not s.has_work and s.num_preemptions >= 1
    assert sorted(scored) == scored == list(range(9))
    assert a.request.num_prompt_scored == 9
    # After the preemption a restarts from its cached first page, not from 0.
    assert 0 not in starts[1:] and a.finish_reason == "length" and d.finished


def test_a_fresh_prompt_logprobs_request_skips_the_prefix_cache() -> None:
    s = make(max_num_batched_tokens=16)
    prompt = [7, 8, 9, 10, 11, 12, 13, 14, 15]
    s.add_request(request("a", prompt, max_out=1))
    while s.has_work:
        so = s.schedule()
        s.update(so, [3] * so.num_rows)
    b = s.add_request(request("b", prompt, max_out=1, prompt_logprobs=1))
    so = s.schedule()
    assert so.entries[0].start == 0 and b.request.num_cached_tokens == 0
    while s.has_work:
        s.update(so, [3] * so.num_rows)
        so = s.schedule()
    assert b.request.num_prompt_scored == 8
    c = s.add_request(request("c", prompt, max_out=1))
    so = s.schedule()  # the pages stay cached for requests that do not score
    assert plan(so) == [(c.seq_id, 8, 1, 1)]


def test_max_tokens_zero_ends_after_the_prompt_with_no_tokens() -> None:
    s = make(max_num_batched_tokens=16)
    req = request("a", [5, 6, 7], max_out=0, prompt_logprobs=0, n=2, temperature=1.0)
    a = s.add_request(req)
    so = s.schedule()
    # Both samples fork as usual, but their tokens are dropped.
    assert plan(so) == [(a.seq_id, 0, 3, 4)] and so.entries[0].prompt_targets == [6, 7]
    upd = s.update(so, [1, 1, 30, 31])
    assert [(u.tokens, u.rows) for u in upd] == [([], []), ([], [])]
    assert req.finished and all(q.finish_reason == "length" for q in req.seqs)
    assert all(q.token_ids == [5, 6, 7] for q in req.seqs)
    assert not s.has_work and s.pool.num_used == 0
