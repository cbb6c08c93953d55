"""Logprob bookkeeping on the host: the result dicts, and which prompt positions to score.

Prompt logprobs (``SamplingParams.prompt_logprobs``) reuse the step's scored
rows: a prompt chunk of such a request scores each of its positions p whose
next token p + 1 is still in the prompt, in a row of its own whose target
(``score_ids`` in the step layout) is that prompt token. The device returns
the target's logprob and rank and the top-k of the row, as for a sampled
token; the token it samples in that row is ignored. So prompt scoring adds
no program: it only takes rows, and the scheduler caps such chunks so the
step's rows (prompt rows plus one per sampling sequence) stay within
max_num_seqs, the row budget every step shape has.

Each position is scored once per request: ``Request.num_prompt_scored``
counts the positions planned, so a prompt recomputed after preemption
scores only what was never planned, and its prefix-cache hit is capped at
the scored positions (a cached page has no logits to give).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jserve.engine.request import Request
from jserve.outputs import Logprob, PromptLogprobs


def owed(req: Request, start: int, end: int) -> tuple[int, int]:
    """(first position, count) of the prompt positions in [start, end) still to score.

    E.g. a 6-token prompt, nothing scored yet, chunk [0, 4): (0, 4); then
    chunk [4, 6): (4, 1), as the last position's next token is not in the prompt.
    """
    if req.prompt_logprobs is None:
        return start, 0
    first = max(start, req.num_prompt_scored)
    return first, max(0, min(end, len(req.prompt_token_ids) - 1) - first)


def cap_chunk(req: Request, start: int, num_new: int, rows_free: int) -> int:
    """The longest chunk from ``start`` (at most ``num_new``) whose owed positions fit
    in ``rows_free`` rows."""
    first, count = owed(req, start, start + num_new)
    if count <= rows_free:
        return num_new
    return first + rows_free - start


def max_cached_pages(req: Request, page_size: int) -> int | None:
    """A cap on the prefix-cache hit, or None: cached positions are never scored."""
    if req.prompt_logprobs is None or req.num_prompt_scored >= len(req.prompt_token_ids) - 1:
        return None
    return req.num_prompt_scored // page_size


def logprob_entry(
    token: int,
    logprob: float,
    rank: int,
    top_ids: np.ndarray,  # i32[K']: the row's most likely tokens, best first
    top_logprobs: np.ndarray,  # f32[K']
    k: int,
    decode: Callable[[int], str | None],
) -> dict[int, Logprob]:
    """One position's dict: the token itself (with its rank), then the top k others."""
    entry = {token: Logprob(logprob, rank, decode(token))}
    for j in range(k):
        tid = int(top_ids[j])
        if tid not in entry:
            entry[tid] = Logprob(float(top_logprobs[j]), j + 1, decode(tid))
    return entry


def record_prompt(
    req: Request,
    first: int,
    targets: list[int],
    row: int,
    logprobs: np.ndarray,  # f32[rows]
    ranks: np.ndarray,  # i32[rows]
    top_ids: np.ndarray,  # i32[rows, K']
    top_logprobs: np.ndarray,  # f32[rows, K']
    decode: Callable[[int], str | None],
) -> None:
    """Appends the results of prompt positions [first, first + len(targets)), rows ``row``
    onwards. Positions arrive in order, as they were planned."""
    plp = req.prompt_logprobs
    assert plp is not None and len(plp) == first + 1, (len(plp or ()), first)
    k = req.params.prompt_logprobs or 0
    for i, token in enumerate(targets):
        r = row + i
        plp.append(
            logprob_entry(
                token, float(logprobs[r]), int(ranks[r]), top_ids[r], top_logprobs[r], k, decode
            )
        )


def take_prompt_logprobs(req: Request) -> PromptLogprobs | None:
    """The request's prompt logprobs the first time they are complete, else None."""
    plp = req.prompt_logprobs
    if plp is None or req.prompt_logprobs_sent or len(plp) < len(req.prompt_token_ids):
        return None
    req.prompt_logprobs_sent = True
    return plp
