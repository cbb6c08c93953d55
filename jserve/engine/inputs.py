"""Turns a SchedulerOutput into the padded numpy arrays of one step. No JAX here."""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from jserve.engine.request import Sequence
from jserve.engine.scheduler import SchedulerOutput

PENALTY_MIN_BUCKET = 16


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def _pow2_at_least(n: int, low: int = PENALTY_MIN_BUCKET) -> int:
    b = low
    while b < n:
        b *= 2
    return b


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


def build_inputs(
    so: SchedulerOutput,
    token_buckets: tuple[int, ...],
    seq_buckets: tuple[int, ...],
    pages_per_seq: int,
    page_size: int,
    max_logprobs: int,
    eos_ids: tuple[int, ...],
) -> StepInputs:
    num_tokens = bucket_for(so.num_tokens, token_buckets)
    num_seqs = bucket_for(max(len(so.scheduled), so.num_rows), seq_buckets)
    inp = empty_inputs(num_tokens, num_seqs, pages_per_seq)
    ids, src, positions, slots = inp.ids, inp.src_rows, inp.positions, inp.slot_mapping
    kv_lens, page_indices, cu = inp.kv_lens, inp.page_indices, inp.cu_q_lens
    logits_indices = inp.logits_indices
    targets: list[tuple[int, Sequence, bool]] = []  # (row, seq, input token read on device)

    t = 0
    for i, entry in enumerate(so.scheduled):
        seq, start, n = entry.seq, entry.start, entry.num_new
        end = start + n
        known = len(seq.token_ids)
        from_device = end > known
        if n == 1:
            p = start
            positions[t] = p
            slots[t] = seq.pages[p // page_size] * page_size + p % page_size
            if from_device:
                src[t] = entry.src_row
            else:
                ids[t] = seq.token_ids[p]
        else:
            pos = np.arange(start, end, dtype=np.int32)
            positions[t : t + n] = pos
            pages = np.asarray(seq.pages, np.int32)
            slots[t : t + n] = pages[pos // page_size] * page_size + pos % page_size
            stop = min(end, known)
            ids[t : t + stop - start] = seq.token_ids[start:stop]
            if from_device:
                src[t + n - 1] = entry.src_row
        kv_lens[i] = end
        page_indices[i, : len(seq.pages)] = seq.pages
        t += n
        cu[i + 1] = t
        for row, target in entry.samples:
            logits_indices[row] = t - 1
            targets.append((row, target, from_device))
    cu[len(so.scheduled) + 1 :] = t
    inp.num_seqs[0] = len(so.scheduled)
    inp.num_rows = so.num_rows
    inp.sampling, inp.sort, inp.penalties, inp.num_logprobs = _sampling_arrays(
        targets, num_seqs, max_logprobs, eos_ids
    )
    return inp


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


BAN_WIDTHS = (8, 64, 512)


def _sampling_arrays(
    targets: list[tuple[int, Sequence, bool]],
    rows: int,
    max_logprobs: int,
    eos_ids: tuple[int, ...],
) -> tuple[dict[str, np.ndarray], bool, bool, int]:
    temperature = np.zeros(rows, np.float32)
    top_k = np.zeros(rows, np.int32)
    top_p = np.ones(rows, np.float32)
    min_p = np.zeros(rows, np.float32)
    seeds = np.zeros(rows, np.uint32)
    sample_index = np.zeros(rows, np.int32)
    position = np.zeros(rows, np.int32)
    rep = np.ones(rows, np.float32)
    presence = np.zeros(rows, np.float32)
    frequency = np.zeros(rows, np.float32)
    input_is_output = np.zeros(rows, bool)
    bans: list[tuple[int, list[int]]] = []
    sort = penalties = False
    want_logprobs = False
    for row, seq, from_device in targets:
        sp = seq.request.params
        temperature[row] = sp.temperature
        top_k[row] = max(sp.top_k, 0)
        top_p[row] = sp.top_p
        min_p[row] = sp.min_p
        seeds[row] = seq.request.seed
        sample_index[row] = seq.index
        out_pos = seq.num_output_tokens - 1  # the pending token being drawn
        position[row] = out_pos
        sort |= sp.top_k > 0 or sp.top_p < 1.0
        if sp.repetition_penalty != 1.0 or sp.presence_penalty or sp.frequency_penalty:
            penalties = True
            rep[row] = sp.repetition_penalty
            presence[row] = sp.presence_penalty
            frequency[row] = sp.frequency_penalty
            input_is_output[row] = from_device
        if out_pos < sp.min_tokens:
            banned = list(sp.stop_token_ids) + ([] if sp.ignore_eos else list(eos_ids))
            if banned:
                bans.append((row, banned))
        want_logprobs |= sp.logprobs is not None

    width = bucket_for(max((len(b) for _, b in bans), default=1), BAN_WIDTHS)
    banned = np.full((rows, width), -1, np.int32)
    for row, ids in bans:
        banned[row, : len(ids)] = ids

    if penalties:
        lp = _pow2_at_least(max(s.num_prompt_tokens for _, s, _ in targets))
        lo = _pow2_at_least(max(len(s.token_ids) - s.num_prompt_tokens for _, s, _ in targets))
        prompt_ids = np.full((rows, lp), -1, np.int32)
        output_ids = np.full((rows, lo), -1, np.int32)
        for row, seq, _ in targets:
            sp = seq.request.params
            if sp.repetition_penalty != 1.0 or sp.presence_penalty or sp.frequency_penalty:
                prompt_ids[row, : seq.num_prompt_tokens] = seq.token_ids[: seq.num_prompt_tokens]
                outs = seq.token_ids[seq.num_prompt_tokens :]
                output_ids[row, : len(outs)] = outs
    else:
        prompt_ids = np.full((rows, 1), -1, np.int32)
        output_ids = np.full((rows, 1), -1, np.int32)

    sampling = dict(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seeds=seeds,
        sample_index=sample_index,
        position=position,
        banned=banned,
        repetition_penalty=rep,
        presence_penalty=presence,
        frequency_penalty=frequency,
        prompt_ids=prompt_ids,
        output_ids=output_ids,
        input_is_output=input_is_output,
    )
    return sampling, sort, penalties, (max_logprobs if want_logprobs else 0)
