"""Per-sequence streaming text with stop-string detection."""

from __future__ import annotations

from collections.abc import Sequence

from jserve.tokenizer import Tokenizer


class SequenceDetokenizer:
    """Accumulates a sequence's text and finds stop strings in it.

    Text that could still turn out to be the start of a stop string is held
    back from the stream (at most the longest stop string minus one
    character), so a stop string is never sent to the client and then
    retracted.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        stop: Sequence[str],
        include_stop_str_in_output: bool,
        skip_special_tokens: bool,
    ) -> None:
        self._stream = tokenizer.stream(prompt_ids, skip_special_tokens)
        self._stop = list(stop)
        self._include = include_stop_str_in_output
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self._emitted = 0

    def append(self, token_id: int, find_stop: bool = True) -> str | None:
        """Adds one token; returns the stop string it completed, if any.

        With ``find_stop`` false (below ``min_tokens``) stop strings are not
        looked for, so the text is never cut.
        """
        piece = self._stream.step(token_id)
        if not piece or not find_stop:
            self.text += piece
            return None
        search_from = max(0, len(self.text) - self._hold)
        self.text += piece
        best: tuple[int, str] | None = None
        for s in self._stop:
            i = self.text.find(s, search_from)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s)] if self._include else self.text[:i]
        return s

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out, minus what a stop string might still claim."""
        end = len(self.text) if finished or not self._stop else len(self.text) - self._hold
        if end <= self._emitted:
            return ""
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
