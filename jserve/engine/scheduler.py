"""Iteration-level scheduling with chunked prefill, prefix reuse and preemption.

Each step gets a token budget (``max_num_batched_tokens``) and a sequence
limit (``max_num_seqs``). Running sequences that decode go first (one token
each), then running sequences still in their prompt (a chunk each), then
waiting sequences in (priority, arrival) order, starting from whatever
prefix of their prompt is already in the prefix cache.

When a running sequence needs a page and none is free, the lowest-priority
newest running sequence is preempted: its pages are freed and it goes back
to waiting to be recomputed later (its cached full pages often survive in
the prefix cache, so recomputation is cheap).

The scheduler only counts tokens; it never needs their values, so it can
plan step N+1 while step N's sampled tokens are still on the device.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable

from jserve.engine.config import EngineConfig
from jserve.engine.kv_pool import PagePool, page_hash
from jserve.engine.request import Sequence, Status


@dataclasses.dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # position of the first token computed this step
    num_new: int  # tokens computed this step
    # Row of the previous step's samples holding this entry's last input
    # token, when that token is still on the device; -1 otherwise.
    src_row: int = -1
    # Page-table update for the runner: pages[page_offset:] are new or changed.
    page_offset: int = 0
    new_pages: list[int] = dataclasses.field(default_factory=list)
    # Sequences that receive a sampled token from this entry's last position,
    # with their output rows: none mid-prompt, the sequence itself usually,
    # the sequence and its new siblings when an n > 1 prompt completes.
    samples: list[tuple[int, Sequence]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SchedulerOutput:
    """What changed this step: the one contract between scheduler and runner."""

    step_id: int
    scheduled: list[ScheduledSeq]
    num_tokens: int
    num_rows: int
    # Pages to copy on the device before the step (copy-on-write): (src, dst).
    copies: list[tuple[int, int]]
    preempted: list[Sequence]
    # Sequences (by seq_id) that left the running set: their page-table rows are free.
    released: list[int] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        cfg: EngineConfig,
        pool: PagePool,
        fork: Callable[[Sequence, int], Sequence],
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self._fork = fork  # makes sample `index` of a sequence's request
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.step_id = 0
        self.num_preemptions = 0
        self._released: list[int] = []

    # -- queue management ---------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Ends a sequence and frees its pages at once."""
        if seq.finished:
            return
        if seq.status is Status.RUNNING:
            self._release(seq)
        else:
            self.waiting.remove(seq)  # a waiting sequence holds no pages
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- page bookkeeping ---------------------------------------------------

    def _reserve(
        self, seq: Sequence, num_new: int, copies: list[tuple[Sequence, int, int]]
    ) -> bool:
        """Allocates the pages positions [num_computed, num_computed + num_new) need.

        A partly filled last page shared with a sibling is copied first
        (copy-on-write). Returns False, changing nothing, if pages run short.
        """
        s = self.pool.page_size
        start = seq.num_computed
        grow = -(-(start + num_new) // s) - len(seq.pages)
        cow = start % s != 0 and self.pool.ref_count[seq.pages[start // s]] > 1
        if grow + cow > self.pool.num_free:
            return False
        if cow:
            old = seq.pages[start // s]
            (new,) = self.pool.allocate(1)
            copies.append((seq, old, new))
            self.pool.free([old])
            seq.pages[start // s] = new
            seq.synced_pages = min(seq.synced_pages, start // s)
        if grow > 0:
            seq.pages += self.pool.allocate(grow)
        return True

    def _release(self, seq: Sequence) -> None:
        """Takes a sequence out of the running set and frees its pages and table row."""
        self.running.remove(seq)
        self._released.append(seq.seq_id)
        self.pool.free(seq.pages)
        seq.pages = []
        seq.page_hashes = []
        seq.synced_pages = 0

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def cache_full_pages(self, seq: Sequence) -> None:
        """Registers each newly full page whose tokens are known and computed."""
        if not self.pool.enable_prefix_caching or seq.status is not Status.RUNNING:
            return
        s = self.pool.page_size
        full = min(seq.num_computed, len(seq.token_ids)) // s
        for i in range(len(seq.page_hashes), full):
            tokens = seq.token_ids[i * s : (i + 1) * s]
            key = page_hash(seq.page_hashes[-1] if seq.page_hashes else None, tokens)
            self.pool.register(seq.pages[i], key, tokens)
            seq.page_hashes.append(key)

    # -- the step plan ------------------------------------------------------

    def _forks_needed(self, seq: Sequence, num_new: int) -> int:
        """Siblings to create if this chunk completes an n > 1 prompt."""
        req = seq.request
        if req.params.n == 1:
            return 0
        completes = seq.num_computed + num_new == seq.num_tokens
        return req.params.n - len(req.seqs) if completes else 0

    def schedule(self) -> SchedulerOutput:
        self.step_id += 1
        budget = self.cfg.max_num_batched_tokens
        chosen: list[tuple[Sequence, int]] = []
        copies: list[tuple[Sequence, int, int]] = []
        preempted: list[Sequence] = []
        slots = self.cfg.max_num_seqs - len(self.running)  # free sequence slots

        def drop(victim: Sequence) -> None:
            nonlocal budget, slots
            for i, (s, n) in enumerate(chosen):
                if s is victim:
                    budget += n
                    slots += self._forks_needed(s, n)
                    del chosen[i]
                    break
            self._preempt(victim)
            slots += 1
            preempted.append(victim)

        decoding, prefilling = [], []
        for s in self.running:
            (decoding if s.num_tokens - s.num_computed == 1 else prefilling).append(s)
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted as a victim this step
                continue
            num_tokens = len(seq.token_ids) + seq.num_pending
            if num_tokens - seq.num_prompt_tokens >= seq.request.max_output_tokens:
                continue  # its last token is in flight; it ends when that arrives
            num_new = min(num_tokens - seq.num_computed, budget)
            forks = self._forks_needed(seq, num_new)
            if forks > slots:
                # Not enough sequence slots for the siblings yet: hold the last token back.
                num_new -= 1
                forks = 0
                if num_new == 0:
                    continue
            while not self._reserve(seq, num_new, copies):
                victim = self.running[-1]
                drop(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            chosen.append((seq, num_new))
            budget -= num_new
            slots -= forks

        while self.waiting and budget > 0 and slots > 0:
            # A sequence preempted this step, or whose last token is still on
            # the device, waits for a later step.
            seq = next((s for s in self.waiting if s.num_pending == 0 and s not in preempted), None)
            if seq is None:
                break
            # Waiting sequences hold no pages. Reuse cached ones, but always compute
            # at least one token and never write into a cached page.
            max_pages = (seq.num_tokens - 1) // self.pool.page_size
            seq.pages, seq.page_hashes = self.pool.lookup(seq.token_ids, max_pages)
            hit = len(seq.pages) * self.pool.page_size
            seq.num_computed = hit
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            forks = self._forks_needed(seq, num_new)
            if 1 + forks > slots:
                num_new -= 1
                forks = 0
            if num_new == 0 or not self._reserve(seq, num_new, copies):
                self.pool.free(seq.pages)
                seq.pages, seq.page_hashes, seq.num_computed = [], [], 0
                break
            self.pool.record_query(seq.num_tokens, hit)
            if seq.num_output_tokens == 0 and seq.num_preemptions == 0:
                seq.request.num_cached_tokens = hit
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.sort_key)
            chosen.append((seq, num_new))
            budget -= num_new
            slots -= 1 + forks

        return self._finalize(chosen, copies, preempted)

    def _finalize(
        self,
        chosen: list[tuple[Sequence, int]],
        copies: list[tuple[Sequence, int, int]],
        preempted: list[Sequence],
    ) -> SchedulerOutput:
        scheduled = []
        rows = 0
        num_tokens = 0
        for seq, num_new in chosen:
            entry = ScheduledSeq(seq, seq.num_computed, num_new)
            entry.page_offset = seq.synced_pages
            entry.new_pages = seq.pages[seq.synced_pages :]
            seq.synced_pages = len(seq.pages)
            if seq.num_computed + num_new > len(seq.token_ids):
                step, entry.src_row = seq.pending_row
                assert step == self.step_id - 1, (seq, step, self.step_id)
            forks = self._forks_needed(seq, num_new)
            seq.num_computed += num_new
            num_tokens += num_new
            if seq.num_computed == len(seq.token_ids) + seq.num_pending:
                targets = [seq]
                for _ in range(forks):
                    child = self._fork(seq, len(seq.request.seqs))
                    child.pages = list(seq.pages)
                    self.pool.share(child.pages)
                    child.page_hashes = list(seq.page_hashes)
                    child.num_computed = seq.num_computed
                    child.status = Status.RUNNING
                    bisect.insort(self.running, child, key=lambda s: s.sort_key)
                    targets.append(child)
                for target in targets:
                    target.num_pending += 1
                    target.pending_row = (self.step_id, rows)
                    entry.samples.append((rows, target))
                    rows += 1
            scheduled.append(entry)
        live = {id(seq) for seq, _ in chosen}
        return SchedulerOutput(
            step_id=self.step_id,
            scheduled=scheduled,
            num_tokens=num_tokens,
            num_rows=rows,
            copies=[(src, dst) for seq, src, dst in copies if id(seq) in live],
            preempted=preempted,
            # An empty step never reaches the runner: keep releases for the next one.
            released=self._take_released() if scheduled else [],
        )

    @property
    def pending_releases(self) -> list[int]:
        """Sequences that left since the last step (their table rows free at the next one)."""
        return list(self._released)

    def _take_released(self) -> list[int]:
        released, self._released = self._released, []
        return released
