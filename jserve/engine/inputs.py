"""Turns a SchedulerOutput into the host arrays of one step (a ``StepPlan``). No JAX here.

This runs on the host while the device computes the previous step, once per
step for every running sequence, so it works on plain lists and writes each
field of the packed buffer once. The builder keeps what the runner must know
about running sequences between steps: their page-table rows (a mirror of
the device's table, which a step only patches where pages changed) and
their sampling parameters, learned once from ``SchedulerOutput.new_seqs``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jserve.engine.scheduler import NewSeq, SchedulerOutput
from jserve.engine.shapes import BAN_WIDTH, StepShapes, no_logit_bias

# A sequence with more new pages than this in one step gets its whole
# page-table row written before the step (a long cached prefix).
MAX_INLINE_PAGES = 8


@dataclasses.dataclass
class RowWrites:
    """Whole rows written into a device table before a step: table[rows[i]] = values[i]."""

    rows: np.ndarray  # i32[A], padded with an out-of-range row (dropped)
    values: np.ndarray  # i32[A, W]


@dataclasses.dataclass
class StepPlan:
    """Everything one step sends to the device, as numpy arrays (plain data)."""

    shape: tuple[int, int]  # (token bucket, row bucket)
    packed: np.ndarray  # i32[layout size]
    num_rows: int
    want_logprobs: bool
    copies: np.ndarray | None = None  # i32[2, C]: copy page src -> dst (-1: no-op)
    table_writes: RowWrites | None = None
    history_writes: RowWrites | None = None
    # (row, seq_id, spec) of each row sampling a grammar-constrained sequence
    # (jserve.structured): the rows the runner's mask hook fills a bitmask for.
    constrained: list[tuple[int, int, Any]] = dataclasses.field(default_factory=list)
    # i32[R, ceil(vocab / 32)]: structured output's allowed tokens per row (None: all).
    bitmask: np.ndarray | None = None
    # i32[R, 2, BIAS_WIDTH]: logit_bias (token, float bits of the bias) per row (None: none).
    logit_bias: np.ndarray | None = None
    # LoRA adapters to write into device slots before the step: (slot, weights).
    lora_loads: list[tuple[int, Any]] = dataclasses.field(default_factory=list)


# The sampling fields of a row that only scores a prompt position: greedy, no filters.
_NEUTRAL = (0.0, 0, 1.0, 0.0, 0, 0)


@dataclasses.dataclass(slots=True)
class _SeqInfo:
    """What the builder keeps about a running sequence, computed once."""

    row: int
    new: NewSeq
    # (temperature, top_k, top_p, min_p, seed, sample index): one row's sampling fields.
    fields: tuple
    random: bool
    sort: bool
    logprobs: bool
    banned: list[int]  # ids banned while below min_tokens
    bias: tuple[list[int], list[float]] | None  # logit_bias as (ids, biases)
    # Whether an earlier step computed its positions (a proposer's state for its row is
    # its own: ``seq_feat_ok``).
    computed: bool = False


def _seq_info(row: int, new: NewSeq, eos_ids: list[int]) -> _SeqInfo:
    sp = new.params
    fields = (sp.temperature, max(sp.top_k, 0), sp.top_p, sp.min_p, new.seed, new.index)
    banned = list(sp.stop_token_ids) + ([] if sp.ignore_eos else eos_ids)
    bias = None
    if sp.logit_bias:
        bias = (list(sp.logit_bias), [float(b) for b in sp.logit_bias.values()])
    return _SeqInfo(
        row,
        new,
        fields,
        sp.temperature > 0,
        sp.top_k > 0 or sp.top_p < 1.0,
        sp.logprobs is not None,
        banned[:BAN_WIDTH],
        bias,
    )


class InputBuilder:
    def __init__(self, shapes: StepShapes, eos_ids: tuple[int, ...]) -> None:
        self.shapes = shapes
        self.eos_ids = list(eos_ids)
        n = shapes.max_num_seqs
        # One row per running sequence, plus a last all-zero row for padding.
        self.table = np.zeros((n + 1, shapes.pages_per_seq), np.int32)
        self.pad_row = n
        self.seqs: dict[int, _SeqInfo] = {}
        self.free_rows = list(range(n - 1, -1, -1))

    @property
    def rows(self) -> dict[int, int]:
        return {seq_id: info.row for seq_id, info in self.seqs.items()}

    def _row_writes(
        self, writes: list[tuple[int, list[int] | np.ndarray]], width: int
    ) -> RowWrites:
        size = self.shapes.batch_size(len(writes))
        rows = np.full(size, self.pad_row + 1, np.int32)
        values = np.zeros((size, width), np.int32)
        for i, (row, vals) in enumerate(writes):
            rows[i] = row
            values[i, : len(vals)] = vals
        return RowWrites(rows, values)

    def build(self, so: SchedulerOutput) -> StepPlan:
        for seq_id in so.released:
            info = self.seqs.pop(seq_id, None)
            if info is not None:
                self.free_rows.append(info.row)
        history = []
        for new in so.new_seqs:
            info = _seq_info(self.free_rows.pop(), new, self.eos_ids)
            self.seqs[new.seq_id] = info
            if new.token_ids is not None:
                history.append((info.row, new.token_ids))

        shapes = self.shapes
        t_bucket, r_bucket = shapes.step_shape(so.num_tokens, so.num_rows)
        packed, v = shapes.layout(t_bucket, r_bucket).new_buffer()
        s = shapes.page_size
        table = self.table
        capacity = len(v["diff_rows"])
        ids: list[int] = []
        src: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        token_rows: list[int] = []
        seq_rows: list[int] = []
        kv_lens: list[int] = []
        cu = [0]
        diff_rows: list[int] = []
        diff_cols: list[int] = []
        diff_pages: list[int] = []
        table_writes = []
        logits_indices: list[int] = []
        hist_rows: list[int] = []
        hist_lens: list[int] = []
        # (sequence, output position) per row; None on a row scoring a prompt position.
        targets: list[tuple[_SeqInfo | None, int]] = []
        # Only rows whose score_ids (the prompt token scored) or draft_ids (the
        # proposal verified) differ from the padding -1: their indices and values.
        score_rows: list[int] = []
        score_ids: list[int] = []
        draft_rows: list[int] = []
        draft_ids: list[int] = []
        # Draft-model lanes (proposed on the device): (table row, index of the last known
        # input, its position, first verifying row, proposals, whether computed before);
        # and (input index, row).
        lanes: list[tuple[int, int, int, int, int, int]] = []
        feat_ok: list[int] = []
        device_inputs: list[tuple[int, int]] = []
        lora_spans: list[tuple[int, int, int]] = []  # (first token, tokens, adapter slot)
        seqs = self.seqs
        for e in so.entries:
            info = seqs[e.seq_id]
            row = info.row
            if info.new.lora_slot >= 0:
                lora_spans.append((cu[-1], e.num_new, info.new.lora_slot))
            if e.new_pages:
                off, pages = e.page_offset, e.new_pages
                table[row, off : off + len(pages)] = pages
                if len(pages) > MAX_INLINE_PAGES or len(diff_rows) + len(pages) > capacity:
                    table_writes.append((row, table[row]))
                else:
                    diff_rows += [row] * len(pages)
                    diff_cols += range(off, off + len(pages))
                    diff_pages += pages
            start, n = e.start, e.num_new
            end = start + n
            if n == 1:
                positions.append(start)
                slots.append(int(table[row, start // s]) * s + start % s)
                ids.append(e.token_ids[0] if e.token_ids else 0)
                src.append(e.src_row)
                token_rows.append(row)
            else:
                span = np.arange(start, end)
                positions += span.tolist()
                slots += (table[row, span // s] * s + span % s).tolist()
                ids += e.token_ids
                src += [-1] * len(e.token_ids)
                if e.src_row >= 0:
                    ids.append(0)
                    src.append(e.src_row)
                token_rows += [row] * n
            if e.draft_ids and e.draft_ids[0] < 0:  # a draft model proposes them on the device
                k = len(e.draft_ids)
                at = cu[-1] + n - k - 1  # the last known input
                ids[at + 1 : at + 1 + k] = [0] * k
                lanes.append((row, at, end - k - 1, e.first_row, k, int(info.computed)))
                device_inputs += [(at + 1 + j, e.first_row + j) for j in range(k)]
            seq_rows.append(row)
            feat_ok.append(int(info.computed))
            info.computed = True
            kv_lens.append(end)
            cu.append(cu[-1] + n)
            if e.prompt_targets:
                k = len(e.prompt_targets)
                at = cu[-2] + e.prompt_first - start
                logits_indices += range(at, at + k)
                hist_rows += [self.pad_row] * k
                hist_lens += [0] * k
                score_rows += range(len(targets), len(targets) + k)
                score_ids += e.prompt_targets
                targets += [(None, 0)] * k
            if e.num_scored:
                first = end - e.num_scored
                for seq_id in e.targets:
                    target = seqs[seq_id]
                    # Row k of a speculating entry verifies proposal k (its next input);
                    # its last row has none (the bonus token). Proposals of a draft
                    # model (-1 here) are filled in on the device.
                    if e.draft_ids:
                        draft_rows += range(len(targets), len(targets) + len(e.draft_ids))
                        draft_ids += e.draft_ids
                    for k in range(e.num_scored):
                        logits_indices.append(cu[-2] + first - start + k)
                        hist_rows.append(row)  # siblings share the history when they fork
                        hist_lens.append(first + k + 1)
                        targets.append((target, e.out_pos + k))

        nt, ns = len(ids), len(seq_rows)
        v["ids"][:nt] = ids
        v["src_rows"][:nt] = src
        v["positions"][:nt] = positions
        v["slot_mapping"][:nt] = slots
        v["token_rows"][:nt] = token_rows
        if shapes.num_microbatches == 1:
            v["seq_rows"][:ns] = seq_rows
            v["kv_lens"][:ns] = kv_lens
            v["cu_q_lens"][: ns + 1] = cu
            v["cu_q_lens"][ns + 1 :] = cu[-1]
            v["num_seqs"][0] = ns
            v["seq_feat_ok"][:ns] = feat_ok
        else:
            _split_microbatches(v, t_bucket, seq_rows, kv_lens, cu)
        for first, n, slot in lora_spans:
            v["lora_slots"][first : first + n] = slot
        nd = len(diff_rows)
        v["diff_rows"][:nd] = diff_rows
        v["diff_cols"][:nd] = diff_cols
        v["diff_pages"][:nd] = diff_pages
        nr = len(targets)
        v["logits_indices"][:nr] = logits_indices
        v["history_rows"][:nr] = hist_rows
        v["history_lens"][:nr] = hist_lens
        if score_rows:
            v["score_ids"][score_rows] = score_ids
        if draft_rows:
            v["draft_ids"][draft_rows] = draft_ids
        if lanes:
            cols = list(zip(*lanes, strict=True))
            nl = len(lanes)
            for name, col in zip(
                (
                    "lane_rows",
                    "lane_token",
                    "lane_start",
                    "lane_first_row",
                    "lane_k",
                    "lane_feat_ok",
                ),
                cols,
                strict=True,
            ):
                v[name][:nl] = col
            v["num_lanes"][0] = nl
            at, rows = zip(*device_inputs, strict=True)
            v["token_draft_row"][list(at)] = rows
        constrained: list[tuple[int, int, Any]] = []
        biased: list[tuple[int, tuple[list[int], list[float]]]] = []
        want_logprobs = self._sampling(v, targets, constrained, biased)
        return StepPlan(
            shape=(t_bucket, r_bucket),
            packed=packed,
            num_rows=so.num_rows,
            want_logprobs=want_logprobs,
            copies=self._copies(so.copies),
            table_writes=self._row_writes(table_writes, shapes.pages_per_seq)
            if table_writes
            else None,
            history_writes=self._row_writes(history, shapes.max_model_len) if history else None,
            constrained=constrained,
            logit_bias=_logit_bias(r_bucket, biased) if biased else None,
            lora_loads=so.lora_loads,
        )

    def _copies(self, copies: list[tuple[int, int]]) -> np.ndarray | None:
        if not copies:
            return None
        out = np.full((2, self.shapes.batch_size(len(copies))), -1, np.int32)
        out[:, : len(copies)] = np.array(copies, np.int32).T
        return out

    def _sampling(
        self,
        v: dict[str, np.ndarray],
        targets: list[tuple[_SeqInfo | None, int]],
        constrained: list[tuple[int, int, Any]],
        biased: list[tuple[int, tuple[list[int], list[float]]]],
    ) -> bool:
        """Per-row sampling parameters; rows without a target, and rows scoring a
        prompt position, keep neutral (greedy) values. Appends the grammar-constrained
        rows to ``constrained`` and the rows with a logit_bias to ``biased``. Returns
        whether any row wants logprobs."""
        n = len(targets)
        if n == 0:
            return False
        cols = list(zip(*(info.fields if info else _NEUTRAL for info, _ in targets), strict=True))
        v["temperature"][:n] = cols[0]
        v["top_k"][:n] = cols[1]
        v["top_p"][:n] = cols[2]
        v["min_p"][:n] = cols[3]
        v["seeds"][:n] = cols[4]
        v["sample_index"][:n] = cols[5]
        v["out_position"][:n] = [pos for _, pos in targets]
        rand = sort = penalties = logprobs = False
        banned = v["banned"]
        for i, (info, out_pos) in enumerate(targets):
            if info is None:
                logprobs = True
                continue
            rand |= info.random
            sort |= info.sort
            logprobs |= info.logprobs
            sp = info.new.params
            if sp.structured_outputs is not None:
                constrained.append((i, info.new.seq_id, sp.structured_outputs))
            if info.new.token_ids is not None:  # penalties
                penalties = True
                v["repetition_penalty"][i] = sp.repetition_penalty
                v["presence_penalty"][i] = sp.presence_penalty
                v["frequency_penalty"][i] = sp.frequency_penalty
                v["num_prompt"][i] = info.new.num_prompt_tokens
            if out_pos < sp.min_tokens and info.banned:
                banned[i, : len(info.banned)] = info.banned
            if info.bias is not None:
                biased.append((i, info.bias))
        flags = (rand, sort, penalties, logprobs, bool(biased), bool(constrained))  # Flag order
        v["flags"][:] = flags
        return logprobs


def _logit_bias(rows: int, biased: list[tuple[int, tuple[list[int], list[float]]]]) -> np.ndarray:
    """The step's logit-bias input (see ``shapes.no_logit_bias``) for its biased rows."""
    out = no_logit_bias(rows)
    values = out[:, 1].view(np.float32)
    for row, (ids, biases) in biased:
        out[row, 0, : len(ids)] = ids
        values[row, : len(biases)] = biases
    return out


def _split_microbatches(
    v: dict[str, np.ndarray], num_tokens: int, rows: list[int], kv_lens: list[int], cu: list[int]
) -> None:
    """Attention metadata of each of M equal token chunks, on a leading axis.

    A sequence cut by a chunk boundary appears in both chunks; in each, its
    queries are the tokens inside the chunk and its kv_len ends at the
    chunk's last token. E.g. one sequence of 6 new tokens (kv_len 10) cut
    into chunks of 4: chunk 0 has q_len 4, kv_len 8; chunk 1 q_len 2, kv_len 10.
    """
    num_mb = v["kv_lens"].shape[0]
    tm = num_tokens // num_mb
    for m in range(num_mb):
        a, b = m * tm, (m + 1) * tm
        k = 0
        for i in range(len(rows)):
            lo, hi = max(cu[i], a), min(cu[i + 1], b)
            if lo >= hi:
                continue
            v["kv_lens"][m, k] = kv_lens[i] - (cu[i + 1] - hi)
            v["seq_rows"][m, k] = rows[i]
            v["cu_q_lens"][m, k + 1] = hi - a
            k += 1
        v["cu_q_lens"][m, k + 1 :] = v["cu_q_lens"][m, k]
        v["num_seqs"][m, 0] = k
