"""Turns a SchedulerOutput into the padded numpy arrays of one step. No JAX here.

This runs on the host while the device computes the previous step, once per
step for every running sequence, so it works on plain lists and converts to
numpy once per array. Page tables persist across steps (one row per running
sequence); a step only writes the pages that changed.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from jserve.engine.request import Sequence
from jserve.engine.scheduler import SchedulerOutput

# Token-history lengths for penalties grow by 4x, so few shapes ever compile.
PENALTY_MIN_BUCKET = 64
BAN_WIDTHS = (8, 64, 512)  # buckets for the ids banned while below min_tokens


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n. E.g. bucket_for(5, (4, 8, 16)) == 8."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def _history_bucket(n: int) -> int:
    """E.g. 10 -> 64, 65 -> 256, 300 -> 1024."""
    b = PENALTY_MIN_BUCKET
    while b < n:
        b *= 4
    return b


def _padded(values: list, size: int, fill: int | float, dtype: type) -> np.ndarray:
    return np.array(values + [fill] * (size - len(values)), dtype)


@dataclasses.dataclass
class StepInputs:
    """Host arrays for one step. T = token bucket, S = sequence bucket, R = S rows."""

    ids: np.ndarray  # i32[T]
    src_rows: np.ndarray  # i32[T]: row of the previous step's samples to read, or -1
    positions: np.ndarray  # i32[T]
    slot_mapping: np.ndarray  # i32[T]; -1 for padding
    kv_lens: np.ndarray  # i32[S]
    page_indices: np.ndarray  # i32[S, pages_per_seq]
    cu_q_lens: np.ndarray  # i32[S + 1]
    num_seqs: np.ndarray  # i32[1]
    logits_indices: np.ndarray  # i32[R]
    num_rows: int
    sampling: dict[str, np.ndarray]
    sort: bool  # some row uses top-k or top-p
    penalties: bool
    num_logprobs: int


class InputBuilder:
    def __init__(
        self,
        token_buckets: tuple[int, ...],
        seq_buckets: tuple[int, ...],
        max_num_seqs: int,
        pages_per_seq: int,
        page_size: int,
        max_logprobs: int,
        eos_ids: tuple[int, ...],
    ) -> None:
        self.token_buckets = token_buckets
        self.seq_buckets = seq_buckets
        self.page_size = page_size
        self.max_logprobs = max_logprobs
        self.eos_ids = eos_ids
        # One row per running sequence, plus a last all-zero row for padding.
        self.table = np.zeros((max_num_seqs + 1, pages_per_seq), np.int32)
        self.pad_row = max_num_seqs
        self.rows: dict[int, int] = {}  # seq_id -> row
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))

    def _row_of(self, seq: Sequence) -> int:
        row = self.rows.get(seq.seq_id)
        if row is None:
            row = self.free_rows.pop()
            self.rows[seq.seq_id] = row
        return row

    def build(self, so: SchedulerOutput) -> StepInputs:
        for seq_id in so.released:
            row = self.rows.pop(seq_id, None)
            if row is not None:
                self.free_rows.append(row)
        num_tokens = bucket_for(so.num_tokens, self.token_buckets)
        num_seqs = bucket_for(max(len(so.scheduled), so.num_rows), self.seq_buckets)
        s = self.page_size
        ids: list[int] = []
        src: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        kv_lens: list[int] = []
        rows: list[int] = []
        cu = [0]
        logits_indices = [0] * num_seqs
        targets: list[tuple[int, Sequence, bool]] = []  # (row, seq, input read on device)
        for entry in so.scheduled:
            seq, start, n = entry.seq, entry.start, entry.num_new
            row = self._row_of(seq)
            if entry.new_pages:
                off = entry.page_offset
                self.table[row, off : off + len(entry.new_pages)] = entry.new_pages
            rows.append(row)
            pages = seq.pages
            end = start + n
            from_device = entry.src_row >= 0
            if n == 1:
                positions.append(start)
                slots.append(pages[start // s] * s + start % s)
                ids.append(0 if from_device else seq.token_ids[start])
                src.append(entry.src_row)
            else:
                span = range(start, end)
                positions.extend(span)
                slots.extend([pages[p // s] * s + p % s for p in span])
                known = seq.token_ids[start : end - 1 if from_device else end]
                ids.extend(known)
                src.extend([-1] * len(known))
                if from_device:
                    ids.append(0)
                    src.append(entry.src_row)
            kv_lens.append(end)
            cu.append(cu[-1] + n)
            for sample_row, target in entry.samples:
                logits_indices[sample_row] = cu[-1] - 1
                targets.append((sample_row, target, from_device))
        cu += [cu[-1]] * (num_seqs + 1 - len(cu))
        rows += [self.pad_row] * (num_seqs - len(rows))
        sampling, sort, penalties, num_logprobs = _sampling_arrays(
            targets, num_seqs, self.max_logprobs, self.eos_ids
        )
        return StepInputs(
            ids=_padded(ids, num_tokens, 0, np.int32),
            src_rows=_padded(src, num_tokens, -1, np.int32),
            positions=_padded(positions, num_tokens, 0, np.int32),
            slot_mapping=_padded(slots, num_tokens, -1, np.int32),
            kv_lens=_padded(kv_lens, num_seqs, 0, np.int32),
            page_indices=self.table[rows],
            cu_q_lens=np.array(cu, np.int32),
            num_seqs=np.array([len(so.scheduled)], np.int32),
            logits_indices=np.array(logits_indices, np.int32),
            num_rows=so.num_rows,
            sampling=sampling,
            sort=sort,
            penalties=penalties,
            num_logprobs=num_logprobs,
        )


def empty_inputs(num_tokens: int, num_seqs: int, pages_per_seq: int) -> StepInputs:
    """A step of all padding (no sequences): writes no page, samples nothing useful."""
    sampling, _, _, _ = _sampling_arrays([], num_seqs, 0, ())
    return StepInputs(
        ids=np.zeros(num_tokens, np.int32),
        src_rows=np.full(num_tokens, -1, np.int32),
        positions=np.zeros(num_tokens, np.int32),
        slot_mapping=np.full(num_tokens, -1, np.int32),
        kv_lens=np.zeros(num_seqs, np.int32),
        page_indices=np.zeros((num_seqs, pages_per_seq), np.int32),
        cu_q_lens=np.zeros(num_seqs + 1, np.int32),
        num_seqs=np.zeros(1, np.int32),
        logits_indices=np.zeros(num_seqs, np.int32),
        num_rows=0,
        sampling=sampling,
        sort=False,
        penalties=False,
        num_logprobs=0,
    )


def _uses_penalties(seq: Sequence) -> bool:
    sp = seq.request.params
    return sp.repetition_penalty != 1.0 or sp.presence_penalty != 0 or sp.frequency_penalty != 0


def _sampling_arrays(
    targets: list[tuple[int, Sequence, bool]],
    rows: int,
    max_logprobs: int,
    eos_ids: tuple[int, ...],
) -> tuple[dict[str, np.ndarray], bool, bool, int]:
    """Per-row sampling parameters; rows without a target keep neutral values."""
    # The scheduler numbers rows 0..k-1 in order, so row i is the i-th target.
    temperature, top_k, top_p, min_p, seeds, index, position = [], [], [], [], [], [], []
    bans: list[tuple[int, list[int]]] = []
    sort = penalties = want_logprobs = False
    for row, seq, _ in targets:
        sp = seq.request.params
        temperature.append(sp.temperature)
        top_k.append(max(sp.top_k, 0))
        top_p.append(sp.top_p)
        min_p.append(sp.min_p)
        seeds.append(seq.request.seed)
        index.append(seq.index)
        out_pos = seq.num_output_tokens - 1  # the pending token being drawn
        position.append(out_pos)
        sort |= sp.top_k > 0 or sp.top_p < 1.0
        penalties |= _uses_penalties(seq)
        want_logprobs |= sp.logprobs is not None
        if out_pos < sp.min_tokens:
            banned = list(sp.stop_token_ids) + ([] if sp.ignore_eos else list(eos_ids))
            if banned:
                bans.append((row, banned))

    width = bucket_for(max((len(b) for _, b in bans), default=1), BAN_WIDTHS)
    banned = np.full((rows, width), -1, np.int32)
    for row, ids in bans:
        banned[row, : len(ids)] = ids

    rep = np.ones(rows, np.float32)
    presence = np.zeros(rows, np.float32)
    frequency = np.zeros(rows, np.float32)
    input_is_output = np.zeros(rows, bool)
    history = np.full((rows, 1), -1, np.int32)
    is_output = np.zeros((rows, 1), bool)
    if penalties:
        users = [(row, seq, dev) for row, seq, dev in targets if _uses_penalties(seq)]
        width = _history_bucket(max(len(seq.token_ids) for _, seq, _ in users))
        history = np.full((rows, width), -1, np.int32)
        is_output = np.zeros((rows, width), bool)
        for row, seq, from_device in users:
            sp = seq.request.params
            rep[row] = sp.repetition_penalty
            presence[row] = sp.presence_penalty
            frequency[row] = sp.frequency_penalty
            # The row's input token is the newest output when it comes from the device.
            input_is_output[row] = from_device
            n = len(seq.token_ids)
            history[row, :n] = seq.token_ids
            is_output[row, seq.num_prompt_tokens : n] = True

    sampling = dict(
        temperature=_padded(temperature, rows, 0.0, np.float32),
        top_k=_padded(top_k, rows, 0, np.int32),
        top_p=_padded(top_p, rows, 1.0, np.float32),
        min_p=_padded(min_p, rows, 0.0, np.float32),
        seeds=_padded(seeds, rows, 0, np.uint32),
        sample_index=_padded(index, rows, 0, np.int32),
        position=_padded(position, rows, 0, np.int32),
        banned=banned,
        repetition_penalty=rep,
        presence_penalty=presence,
        frequency_penalty=frequency,
        history=history,
        history_is_output=is_output,
        input_is_output=input_is_output,
    )
    return sampling, sort, penalties, (max_logprobs if want_logprobs else 0)


def split_microbatches(inp: StepInputs, num_mb: int) -> dict[str, np.ndarray]:
    """Attention metadata of each of ``num_mb`` equal token chunks, stacked on a leading axis.

    A sequence cut by a chunk boundary appears in both chunks; in each, its
    queries are the tokens inside the chunk and its kv_len ends at the
    chunk's last token. E.g. one sequence of 6 new tokens (kv_len 10) cut
    into chunks of 4: chunk 0 has q_len 4, kv_len 8; chunk 1 q_len 2, kv_len 10.
    """
    num_tokens = len(inp.ids)
    tm = num_tokens // num_mb
    num_seqs = len(inp.kv_lens)
    n = int(inp.num_seqs[0])
    cu, kv = inp.cu_q_lens, inp.kv_lens
    kv_lens = np.zeros((num_mb, num_seqs), np.int32)
    pages = np.zeros((num_mb, num_seqs, inp.page_indices.shape[1]), np.int32)
    cu_m = np.zeros((num_mb, num_seqs + 1), np.int32)
    count = np.zeros((num_mb, 1), np.int32)
    for m in range(num_mb):
        a, b = m * tm, (m + 1) * tm
        k = 0
        for i in range(n):
            lo, hi = max(int(cu[i]), a), min(int(cu[i + 1]), b)
            if lo >= hi:
                continue
            kv_lens[m, k] = kv[i] - (cu[i + 1] - hi)
            pages[m, k] = inp.page_indices[i]
            cu_m[m, k + 1] = hi - a
            k += 1
        cu_m[m, k + 1 :] = cu_m[m, k]
        count[m, 0] = k
    return dict(
        positions=inp.positions.reshape(num_mb, tm),
        slot_mapping=inp.slot_mapping.reshape(num_mb, tm),
        kv_lens=kv_lens,
        page_indices=pages,
        cu_q_lens=cu_m,
        num_seqs=count,
    )
