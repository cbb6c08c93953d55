"""Results returned to users, shaped like vLLM's."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely token
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the sampled token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token: None for the first (nothing precedes it), then the
# prompt token itself (with its rank) plus the top-k of the position before it.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that matched


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    # With SamplingParams.prompt_logprobs: complete, in the one output (or streamed
    # delta) that follows the prompt's last chunk; None in every other delta.
    prompt_logprobs: PromptLogprobs | None = None


def merge_delta(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Folds an incremental output into the running total for its request.

    Prompt logprobs arrive whole in one delta; the total keeps them from then on.
    """
    if acc is None:
        acc = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids, [])
    if delta.prompt_logprobs is not None:
        acc.prompt_logprobs = delta.prompt_logprobs
    by_index = {c.index: c for c in acc.outputs}
    for d in delta.outputs:
        c = by_index.get(d.index)
        if c is None:
            c = CompletionOutput(d.index, "", [], logprobs=[] if d.logprobs is not None else None)
            by_index[d.index] = c
            acc.outputs.append(c)
        c.text += d.text
        c.token_ids.extend(d.token_ids)
        if d.logprobs is not None:
            c.logprobs = (c.logprobs or []) + d.logprobs
        c.cumulative_logprob = d.cumulative_logprob
        c.finish_reason = d.finish_reason
        c.stop_reason = d.stop_reason
    acc.outputs.sort(key=lambda c: c.index)
    acc.finished = delta.finished
    acc.num_cached_tokens = delta.num_cached_tokens
    return acc
