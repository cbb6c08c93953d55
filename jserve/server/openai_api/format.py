"""Engine outputs -> OpenAI's response shapes: logprobs, usage, SSE framing."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from jserve.outputs import Logprob

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _text(lp: Logprob, token_id: int, decode: Any) -> str:
    return lp.decoded_token if lp.decoded_token is not None else decode(token_id)


class LegacyLogprobs:
    """Completions' logprobs: tokens, token_logprobs, top_logprobs, text_offset.

    ``top_logprobs[i]`` maps token text to logprob for the ``logprobs`` most
    likely tokens plus the chosen one (so up to logprobs + 1 entries), as
    OpenAI's legacy API does; text offsets count characters from the start of
    the choice's text (the prompt's, with echo).
    """

    def __init__(self, decode: Any, offset: int = 0) -> None:
        self.decode = decode  # token id -> text, for tokens the engine left undecoded
        self.offset = offset

    def add_prompt(
        self, token_ids: Sequence[int], prompt_logprobs: Sequence[dict[int, Logprob] | None]
    ) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = _empty()
        for tid, entry in zip(token_ids, prompt_logprobs, strict=True):
            if entry is None:  # the first prompt token: nothing before it to predict it
                self._append(out, self.decode(tid), None, None)
            else:
                self._entry(out, tid, entry)
        return out

    def add(
        self, token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]]
    ) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = _empty()
        for tid, entry in zip(token_ids, logprobs, strict=True):
            self._entry(out, tid, entry)
        return out

    def _entry(self, out: dict[str, list[Any]], tid: int, entry: dict[int, Logprob]) -> None:
        chosen = entry[tid]
        top: dict[str, float] = {}
        for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank or 0):
            top.setdefault(_text(lp, t, self.decode), lp.logprob)
        self._append(out, _text(chosen, tid, self.decode), chosen.logprob, top)

    def _append(
        self, out: dict[str, list[Any]], text: str, lp: float | None, top: dict[str, float] | None
    ) -> None:
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(top)
        out["text_offset"].append(self.offset)
        self.offset += len(text)


def _empty() -> dict[str, list[Any]]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def merge_legacy(a: dict[str, list[Any]] | None, b: dict[str, list[Any]]) -> dict[str, list[Any]]:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}


def chat_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]], top_n: int, decode: Any
) -> list[dict[str, Any]]:
    """Chat's ``logprobs.content``: each token with its ``top_n`` most likely alternatives."""

    def item(t: int, lp: Logprob) -> dict[str, Any]:
        text = _text(lp, t, decode)
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for tid, entry in zip(token_ids, logprobs, strict=True):
        top = sorted(
            ((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top_n),
            key=lambda kv: kv[1].rank or 0,
        )
        content.append({**item(tid, entry[tid]), "top_logprobs": [item(t, lp) for t, lp in top]})
    return content
