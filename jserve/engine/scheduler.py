"""Iteration-level scheduling with chunked prefill, prefix reuse and preemption.

The scheduler owns every sequence's state: its tokens, pages and status.
Each step it plans a ``SchedulerOutput`` (plain data, the one contract with
the runner), and after the step ``update`` takes the sampled tokens back:
it appends them, applies the token-level stops (EOS, stop token ids,
length), registers newly full pages in the prefix cache and frees what
finished. Requests with ``n > 1`` fork into their siblings here, when their
prompt completes.

Each step gets a token budget (``max_num_batched_tokens``) and a sequence
limit (``max_num_seqs``). Running sequences that decode go first (one token
each), then running sequences still in their prompt (a chunk each), then
waiting sequences in (priority, arrival) order, starting from whatever
prefix of their prompt is already in the prefix cache. A request with
``n > 1`` takes n sequence slots from its admission, so its siblings always
have room when its prompt completes.

A request with prompt logprobs also scores its prompt positions, one row
each (see ``logprobs``): its chunks are capped so a step's rows (these, plus
one per sampling sequence) never exceed max_num_seqs, and its prefix-cache
hits never skip positions still to score.

With speculative decoding (``jserve.spec``), a decoding sequence also takes
up to k proposed tokens as inputs, scored in k + 1 rows; they count in the
token, row and page budgets, and under page pressure a step sheds proposals
before it preempts anyone. After the step ``update`` keeps the accepted
prefix and rolls the rest back (their KV slots are written over later; pages
that only held them are freed).

When a running sequence needs a page and none is free, the lowest-priority
newest running sequence is preempted: its pages are freed and it goes back
to waiting to be recomputed later (its cached full pages often survive in
the prefix cache, so recomputation is cheap).

Planning only counts tokens; it never needs their values, so step N+1 can
be planned while step N's sampled tokens are still on the device (they are
*pending* and are fed to step N+1 straight from the device).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

from jserve.engine import logprobs
from jserve.engine.config import EngineConfig
from jserve.engine.kv_pool import PagePool, page_hash
from jserve.engine.request import Request, Sequence, Status
from jserve.lora.adapter import AdapterError
from jserve.sampling_params import SamplingParams
from jserve.spec.speculator import Speculator

if TYPE_CHECKING:
    from jserve.lora.manager import LoRAManager


@dataclasses.dataclass(slots=True)
class NewSeq:
    """A sequence the runner has not seen since it last entered the running set."""

    seq_id: int
    params: SamplingParams
    seed: int
    index: int  # which of the request's n samples
    num_prompt_tokens: int
    # Every known token, given only when the runner needs the history (penalties).
    token_ids: list[int] | None
    lora_slot: int = -1  # its LoRA adapter's device slot, -1 for the base model


@dataclasses.dataclass(slots=True)
class ScheduledEntry:
    """One sequence's work in a step.

    It computes positions [start, start + num_new). ``token_ids`` are the
    inputs known on the host; when it is one shorter than ``num_new`` the
    last input is the previous step's sample in row ``src_row``, still on
    the device. The last ``num_scored`` positions are scored (0 mid-prompt,
    1 for a decode or a completed prompt; k + 1 with speculation), each
    giving one sample to every sequence in ``targets`` (the sequence itself,
    plus its new siblings when an n > 1 prompt completes). Their rows are
    ``first_row`` onwards, target-major.

    With prompt logprobs, positions [prompt_first, prompt_first + len(prompt_targets))
    are also scored against the prompt's next tokens ``prompt_targets``, in rows
    ``prompt_row`` onwards (just before ``first_row``); nothing is sampled from them.
    """

    seq_id: int
    start: int
    num_new: int
    token_ids: list[int]
    src_row: int
    # Page-table update: pages[page_offset:] of this sequence are new or changed.
    page_offset: int
    new_pages: list[int]
    num_scored: int
    targets: list[int]
    first_row: int
    out_pos: int  # output index of the first token these samples draw
    prompt_first: int = 0
    prompt_targets: list[int] = dataclasses.field(default_factory=list)
    prompt_row: int = 0
    # Speculative proposals: the last len(draft_ids) inputs, verified by the first
    # len(draft_ids) scored rows (num_scored = len(draft_ids) + 1).
    draft_ids: list[int] = dataclasses.field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return self.num_scored * len(self.targets) + len(self.prompt_targets)


@dataclasses.dataclass
class SchedulerOutput:
    """What changed this step: the one contract between scheduler and runner."""

    new_seqs: list[NewSeq]
    entries: list[ScheduledEntry]
    num_tokens: int
    num_rows: int
    # Pages to copy on the device before the step (copy-on-write): (src, dst).
    copies: list[tuple[int, int]]
    # Sequences (by seq_id) that left the running set: their page-table rows are free.
    released: list[int]
    # LoRA adapters to write into device slots before the step: (slot, weights).
    lora_loads: list[tuple[int, object]] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.entries


@dataclasses.dataclass(slots=True)
class SeqUpdate:
    """Tokens a sequence received in ``Scheduler.update``, from rows ``rows``."""

    seq: Sequence
    tokens: list[int]
    rows: list[int]


class Scheduler:
    def __init__(
        self,
        cfg: EngineConfig,
        pool: PagePool,
        eos_token_ids: Seq[int] = (),
        speculator: Speculator | None = None,
        adapters: LoRAManager | None = None,
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.speculator = speculator
        # LoRA (jserve.lora): a sequence runs only while its adapter holds a device slot.
        self.adapters = adapters
        # Requests whose adapter could not be read again, by id (take_adapter_errors).
        self.adapter_errors: dict[str, tuple[Request, Exception]] = {}
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._step_id = 0
        self._next_seq_id = 0
        # Sequence slots taken: one per running sequence, plus the slots reserved
        # for the siblings of admitted n > 1 requests that have not forked yet.
        self._slots_used = 0
        self._released: list[int] = []
        self._new: list[NewSeq] = []
        self._live: dict[int, Sequence] = {}  # every unfinished sequence, by id

    # -- queue management ---------------------------------------------------

    def add_request(self, req: Request) -> Sequence:
        """Queues a request's first sequence (its siblings come when its prompt completes)."""
        seq = self._new_sequence(req, 0, list(req.prompt_token_ids))
        self._enqueue(seq)
        return seq

    def _new_sequence(self, req: Request, index: int, token_ids: list[int]) -> Sequence:
        seq = Sequence(self._next_seq_id, req, index, token_ids)
        self._next_seq_id += 1
        req.seqs.append(seq)
        self._live[seq.seq_id] = seq
        return seq

    def _enqueue(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def abort_request(self, req: Request) -> None:
        req.aborted = True
        for seq in req.seqs:
            self.finish(seq, "abort")

    def finish(
        self,
        seq: Sequence,
        reason: str,
        stop_reason: int | str | None = None,
        num_tokens: int | None = None,
    ) -> None:
        """Ends a sequence and frees its pages at once.

        A stop string (found by the engine after ``update``) may end a sequence
        that its length limit ended at the same token: the stop string wins, as
        it would have been found first. ``num_tokens`` drops the tokens after
        the stop (when several arrived in one step).
        """
        if num_tokens is not None:
            del seq.token_ids[num_tokens:]
        if seq.finished:
            if reason == "stop" and seq.finish_reason == "length":
                seq.finish_reason, seq.stop_reason = reason, stop_reason
            return
        if seq.status is Status.RUNNING:
            self._release(seq)
        else:
            self.waiting.remove(seq)  # a waiting sequence holds no pages
        del self._live[seq.seq_id]
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

    def _slots_of(self, seq: Sequence) -> int:
        """Slots a running sequence holds: n for an n > 1 request not yet forked."""
        req = seq.request
        return req.params.n if len(req.seqs) < req.params.n else 1

    def _release(self, seq: Sequence) -> None:
        """Takes a sequence out of the running set and frees its pages and table row."""
        self._slots_used -= self._slots_of(seq)
        self.running.remove(seq)
        if self.adapters is not None:
            self.adapters.release(seq.request.lora_id)
            seq.lora_slot = -1
        self._released.append(seq.seq_id)
        self.pool.free(seq.pages)
        seq.pages = []
        seq.page_hashes = []
        seq.synced_pages = 0

    def _preempt(self, seq: Sequence) -> None:
        seq.drafts = []
        self._release(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq)

    def _cache_full_pages(self, seq: Sequence) -> None:
        """Registers each newly full page whose tokens are known and computed (salted by
        its adapter, see ``kv_pool.page_hash``)."""
        s = self.pool.page_size
        full = min(seq.num_computed, len(seq.token_ids)) // s
        if full <= len(seq.page_hashes) or not self.pool.enable_prefix_caching:
            return
        if seq.status is not Status.RUNNING:
            return
        salt = seq.request.lora_salt
        for i in range(len(seq.page_hashes), full):
            tokens = seq.token_ids[i * s : (i + 1) * s]
            key = page_hash(seq.page_hashes[-1] if seq.page_hashes else None, tokens, salt)
            self.pool.register(seq.pages[i], key, tokens, salt)
            seq.page_hashes.append(key)

    # -- the step plan ------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        self._step_id += 1
        budget = self.cfg.max_num_batched_tokens
        chosen: list[tuple[Sequence, int]] = []
        copies: list[tuple[Sequence, int, int]] = []
        preempted: list[Sequence] = []
        # A step has max_num_seqs rows. Each sequence slot keeps a row for its
        # sample, except the slots of sequences chosen with a chunk short of their
        # last token (they sample nothing this step); prompt-logprob positions take
        # what is left. `spare` is those freed rows minus the prompt rows (and
        # proposals) taken. While it is >= 0 every sequence's own rows fit, so only
        # one that scores its prompt needs ``_fit_rows``.
        spare = 0

        def rows_free() -> int:
            return self.cfg.max_num_seqs - self._slots_used + spare

        def take(seq: Sequence, num_new: int, sign: int = 1) -> None:
            nonlocal spare
            rows = self._prompt_rows(seq, num_new) + len(seq.drafts)
            if seq.num_computed + num_new < seq.num_tokens:
                rows -= self._slots_of(seq)
            spare -= sign * rows

        def shed_drafts() -> bool:
            """Frees the pages of the proposals chosen so far; False if there were none."""
            nonlocal budget, spare
            shed = False
            for i, (s, n) in enumerate(chosen):
                if s.drafts:
                    budget += len(s.drafts)
                    spare += len(s.drafts)
                    chosen[i] = (s, n - len(s.drafts))
                    s.drafts = []
                    self._trim_pages(s, s.num_computed + 1)
                    shed = True
            return shed

        def drop(victim: Sequence) -> None:
            nonlocal budget
            for i, (s, n) in enumerate(chosen):
                if s is victim:
                    budget += n
                    take(s, n, sign=-1)
                    del chosen[i]
                    break
            self._preempt(victim)
            preempted.append(victim)

        decoding, prefilling = [], []
        for s in self.running:
            (decoding if s.num_tokens - s.num_computed == 1 else prefilling).append(s)
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted as a victim this step
                continue
            if seq.num_output_tokens >= (seq.request.max_output_tokens or 1):
                continue  # its last token is in flight; it ends when that arrives
            left = seq.num_tokens - seq.num_computed
            num_new = min(left, budget)
            scores = seq.request.prompt_logprobs is not None
            if scores or spare < 0:  # else its rows fit (see `spare`)
                num_new = self._fit_rows(seq, num_new, rows_free() + self._slots_of(seq))
                if num_new == 0:
                    continue  # no rows left for its prompt positions this step
            if self.speculator is not None:
                seq.drafts = self._propose(seq, num_new, budget, rows_free())
            while not self._reserve(seq, num_new + len(seq.drafts), copies):
                if seq.drafts:  # page pressure: fewer proposals before any preemption
                    seq.drafts.pop()
                    continue
                if shed_drafts():
                    continue
                victim = self.running[-1]
                drop(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            short = num_new < left
            num_new += len(seq.drafts)
            chosen.append((seq, num_new))
            budget -= num_new
            if scores or short or seq.drafts:
                take(seq, num_new)  # (a no-op for any other chosen sequence)

        while self.waiting and budget > 0:
            seq = self._next_waiting(preempted)
            if seq is None or self._slots_used + self._slots_of(seq) > self.cfg.max_num_seqs:
                break
            # Waiting sequences hold no pages. Reuse cached ones, but always compute
            # at least one token and never write into a cached page.
            max_pages = (seq.num_tokens - 1) // self.pool.page_size
            cap = logprobs.max_cached_pages(seq.request, self.pool.page_size)
            max_pages = max_pages if cap is None else min(max_pages, cap)
            seq.pages, seq.page_hashes = self.pool.lookup(
                seq.token_ids, max_pages, seq.request.lora_salt
            )
            hit = len(seq.pages) * self.pool.page_size
            seq.num_computed = hit
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            if seq.request.prompt_logprobs is not None or spare < 0:
                num_new = self._fit_rows(seq, num_new, rows_free())
            if num_new == 0 or not self._reserve(seq, num_new, copies):
                self.pool.free(seq.pages)
                seq.pages, seq.page_hashes, seq.num_computed = [], [], 0
                break
            self.pool.record_query(seq.num_tokens, hit)
            if seq.num_output_tokens == 0 and seq.num_preemptions == 0:
                seq.request.num_cached_tokens = hit
            self.waiting.remove(seq)
            self._start_running(seq)
            chosen.append((seq, num_new))
            budget -= num_new
            take(seq, num_new)

        return self._finalize(chosen, copies)

    def _propose(self, seq: Sequence, num_new: int, budget: int, rows: int) -> list[int]:
        """Speculative proposals for a sequence that decodes, within the step's budgets and
        its max_tokens (the accepted run plus its bonus token never exceeds it)."""
        spec = self.speculator
        assert spec is not None
        req = seq.request
        if (
            num_new != 1
            or seq.num_pending
            or seq.num_computed != seq.num_tokens - 1
            or seq.num_tokens <= seq.num_prompt_tokens  # its prompt's last token (n > 1 forks)
            or len(req.seqs) < req.params.n
        ):
            return []
        room = req.max_output_tokens - seq.num_output_tokens - 1
        return spec.propose(seq.token_ids, min(budget - 1, rows, room))

    def _trim_pages(self, seq: Sequence, num_tokens: int) -> None:
        """Frees the pages past those positions [0, num_tokens) need."""
        keep = -(-num_tokens // self.pool.page_size)
        if len(seq.pages) > keep:
            self.pool.free(seq.pages[keep:])
            del seq.pages[keep:]
            seq.synced_pages = min(seq.synced_pages, keep)

    def _fit_rows(self, seq: Sequence, num_new: int, rows: int) -> int:
        """The longest chunk from num_computed (at most ``num_new`` tokens) whose rows
        fit in ``rows``: its prompt-logprob positions, plus its samples if it reaches
        its last token. Without prompt logprobs that is num_new, or num_new - 1 when
        the samples do not fit (then nothing is sampled this step)."""
        start = seq.num_computed
        n = num_new
        if seq.request.prompt_logprobs is not None:
            n = logprobs.cap_chunk(seq.request, start, num_new, rows)
        samples = n > 0 and start + n == seq.num_tokens
        if samples and self._prompt_rows(seq, n) + self._slots_of(seq) > rows:
            n -= 1  # stop one short: nothing sampled, and its positions still fit
        return n

    @staticmethod
    def _prompt_rows(seq: Sequence, num_new: int) -> int:
        if seq.request.prompt_logprobs is None:  # the common case, on every step
            return 0
        return logprobs.owed(seq.request, seq.num_computed, seq.num_computed + num_new)[1]

    def _next_waiting(self, preempted: list[Sequence]) -> Sequence | None:
        """The first waiting sequence that can start now. A sequence preempted this step,
        or whose last token is still on the device, waits for a later step. So does one
        whose LoRA adapter finds no device slot free of running sequences, and after it
        every later one with an adapter (starting those would keep the slots busy past
        it); base-model sequences still start."""
        blocked = False
        for s in self.waiting:
            if s.num_pending or s in preempted:
                continue
            if self.adapters is None or not s.request.lora_id:
                return s
            if not blocked and self._adapter_fits(s):
                return s
            blocked = True
        return None

    def _adapter_fits(self, seq: Sequence) -> bool:
        req = seq.request
        if req.request_id in self.adapter_errors:
            return False
        try:
            return self.adapters.can_acquire(req.lora_id)
        except AdapterError as e:  # its adapter can no longer be read: it fails alone
            self.adapter_errors[req.request_id] = (req, e)
            return False

    def take_adapter_errors(self) -> list[tuple[Request, Exception]]:
        """Requests whose adapter could not be read again for a device slot, with the
        error; they are aborted here (their final output says "abort")."""
        errors = list(self.adapter_errors.values())
        self.adapter_errors = {}
        for req, _ in errors:
            self.abort_request(req)
        return errors

    def _start_running(self, seq: Sequence, take_slots: bool = True) -> None:
        if self.adapters is not None:
            seq.lora_slot = self.adapters.acquire(seq.request.lora_id)
        seq.status = Status.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.sort_key)
        if take_slots:
            self._slots_used += self._slots_of(seq)
        p = seq.request.params
        self._new.append(
            NewSeq(
                seq.seq_id,
                p,
                seq.request.seed,
                seq.index,
                seq.num_prompt_tokens,
                list(seq.token_ids) if p.uses_penalties else None,
                seq.lora_slot,
            )
        )

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """Creates the siblings of an n > 1 request whose prompt just completed.

        They share the prompt's pages (a partly filled last page is copied when
        a sibling first writes to it) and fill the slots reserved at admission.
        """
        req = seq.request
        children = [
            self._new_sequence(req, index, list(seq.token_ids))
            for index in range(len(req.seqs), req.params.n)
        ]
        for child in children:
            child.pages = list(seq.pages)
            self.pool.share(child.pages)
            child.page_hashes = list(seq.page_hashes)
            child.num_computed = seq.num_computed
            self._start_running(child, take_slots=False)
        return children

    def _finalize(
        self, chosen: list[tuple[Sequence, int]], copies: list[tuple[Sequence, int, int]]
    ) -> SchedulerOutput:
        entries = []
        rows = 0
        num_tokens = 0
        step_id = self._step_id
        for seq, num_new in chosen:
            start = seq.num_computed
            end = start + num_new
            drafts, seq.drafts = seq.drafts, []
            last = end - len(drafts)  # past the last known (or pending) input
            token_ids = seq.token_ids
            known = len(token_ids)
            src_row = -1
            if known < last:  # the last input is still on the device
                step, src_row = seq.pending_row
                assert step == step_id - 1, (seq, step, step_id)
            else:
                known = last
            offset = seq.synced_pages
            pages = seq.pages
            new_pages = pages[offset:] if offset < len(pages) else []
            seq.synced_pages = len(pages)
            seq.num_computed = end
            num_tokens += num_new
            req = seq.request
            prompt_row = rows
            prompt_first, prompt_targets = start, []
            if req.prompt_logprobs is not None:
                prompt_first, num_prompt = logprobs.owed(req, start, end)
                # Positions are planned in order: none may be skipped.
                assert num_prompt == 0 or prompt_first == req.num_prompt_scored, (seq, start)
                req.num_prompt_scored += num_prompt
                rows += num_prompt
                prompt_targets = req.prompt_token_ids[
                    prompt_first + 1 : prompt_first + 1 + num_prompt
                ]
            total = len(token_ids) + seq.num_pending
            scored = 1 + len(drafts)
            ids = []
            if last == total:  # the last known position (and any proposals): scored
                targets = [seq] if len(req.seqs) >= req.params.n else [seq, *self._fork(seq)]
                for target in targets:
                    target.num_pending += scored
                    target.pending_row = (step_id, rows + (len(ids) + 1) * scored - 1)
                    ids.append(target.seq_id)
            entry = ScheduledEntry(
                seq.seq_id,
                start,
                num_new,
                token_ids[start:known] + drafts if drafts else token_ids[start:known],
                src_row,
                offset,
                new_pages,
                scored if ids else 0,
                ids,
                rows,
                total - seq.num_prompt_tokens,
                prompt_first,
                prompt_targets,
                prompt_row,
                drafts,
            )
            rows += len(ids) * scored
            entries.append(entry)
        live = {id(seq) for seq, _ in chosen}
        new, self._new = self._new, []
        released: list[int] = []
        loads: list[tuple[int, object]] = []
        if entries:  # an empty step never reaches the runner: keep these for the next one
            released, self._released = self._released, []
            if self.adapters is not None:
                loads = self.adapters.take_loads()
        return SchedulerOutput(
            new_seqs=new,
            entries=entries,
            num_tokens=num_tokens,
            num_rows=rows,
            copies=[(src, dst) for seq, src, dst in copies if id(seq) in live],
            released=released,
            lora_loads=loads,
        )

    # -- after the step -----------------------------------------------------

    def update(
        self, so: SchedulerOutput, tokens: Seq[int], drafts: Seq[int] | None = None
    ) -> list[SeqUpdate]:
        """Takes a step's sampled tokens (one per row); returns what each sequence got.
        ``drafts``: per row, the draft model's proposal it verified (proposals made on
        the device are -1 in the plan).

        Sequences that finished or were aborted while the step was in flight
        get nothing. A sequence stops at its first stopping token; later rows
        of the same entry are dropped.
        """
        live = self._live
        updates = []
        for entry in so.entries:
            seq = live.get(entry.seq_id)
            if seq is not None:  # before a stop frees them
                self._cache_full_pages(seq)
            row = entry.first_row
            k = entry.num_scored
            for seq_id in entry.targets:
                seq = live.get(seq_id)
                rows = range(row, row + k)
                row += k
                if seq is None:
                    continue  # finished or aborted while the step was in flight
                seq.num_pending -= k
                if seq.request.max_output_tokens == 0:  # it only scored its prompt
                    self.finish(seq, "length")
                    updates.append(SeqUpdate(seq, [], []))
                    continue
                if entry.draft_ids:
                    got = self._take_verified(seq, entry, rows, tokens, drafts)
                else:  # one row: its sample
                    token = int(tokens[rows[0]])
                    seq.token_ids.append(token)
                    self._check_stop(seq, token)
                    got = [token]
                updates.append(SeqUpdate(seq, got, list(rows[: len(got)])))
        return updates

    def _take_verified(
        self,
        seq: Sequence,
        entry: ScheduledEntry,
        rows: range,
        tokens: Seq[int],
        drafts: Seq[int] | None,
    ) -> list[int]:
        """The tokens a speculating sequence keeps from its rows: up to its first stop or
        rejected proposal (later rows assumed it)."""
        if entry.draft_ids[0] < 0:
            assert drafts is not None, "a step with device proposals returns them"
            entry.draft_ids = list(drafts[rows[0] : rows[-1]])
        proposed = entry.draft_ids
        got = []
        for j, r in enumerate(rows):
            token = int(tokens[r])
            seq.token_ids.append(token)
            got.append(token)
            if self._check_stop(seq, token):
                break
            if j < len(proposed) and token != proposed[j]:
                break  # proposal j was rejected
        self._after_verification(seq, entry, [int(tokens[r]) for r in rows])
        return got

    def _after_verification(self, seq: Sequence, entry: ScheduledEntry, tokens: list[int]) -> None:
        """Counts what was accepted, and rolls back the positions computed for rejected
        proposals: the next step writes over their KV slots, and pages that only held
        them go back to the pool. Pages with unverified tokens were never registered
        in the prefix cache (only known tokens are)."""
        assert self.speculator is not None
        self.speculator.stats.record(
            len(entry.draft_ids), self.speculator.num_accepted(entry.draft_ids, tokens)
        )
        if seq.status is Status.RUNNING:
            seq.num_computed = len(seq.token_ids) - 1
            self._trim_pages(seq, seq.num_computed)

    def _check_stop(self, seq: Sequence, token: int) -> bool:
        p = seq.request.params
        n_out = len(seq.token_ids) - seq.num_prompt_tokens  # known outputs, none pending
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                self.finish(seq, "stop")
                return True
            if token in p.stop_token_ids:
                self.finish(seq, "stop", token)
                return True
        if n_out >= seq.request.max_output_tokens:
            self.finish(seq, "length")
            return True
        return False

    def sequence(self, seq_id: int) -> Sequence | None:
        """An unfinished sequence by id (None once it finished or was aborted)."""
        return self._live.get(seq_id)

    @property
    def pending_releases(self) -> list[int]:
        """Sequences that left since the last step (their table rows free at the next one)."""
        return list(self._released)
