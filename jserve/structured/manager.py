"""Grammars with llguidance: compiled off the step thread, one matcher per constrained sequence.

Why llguidance, measured by ``python -m tools.grammar_engines`` on the embedded model's
byte-level BPE tokenizer (2048 tokens; ``docs/benchmarks.md``): llguidance 1.9.1 and
xgrammar 0.2.9 both gave only valid output, and xgrammar's mask is the cheaper one (about
2 us a token against llguidance's 28-49 us on the shared 2-core host). But xgrammar 0.2.9
requires torch, triton and transformers (about 1.8 GB installed) and imports torch when it
loads; llguidance has no dependencies (7.6 MB), fills numpy bitmasks natively, builds its
parsers lazily (under 1 ms for that schema) and its JSON options bound whitespace. Its mask
is tens of microseconds per constrained row on the host, computed while the device runs the
previous step. The engine reaches it only through this module, so swapping it is local.

The tokenizer's vocabulary is handed to llguidance once per model, on first use. A
spec compiles once (``compile``, cached by ``StructuredOutputsParams.key``); each
sequence then takes a copy of that compiled matcher, advanced with every token it
keeps. The bitmask of a step is [rows, ceil(vocab / 32)] int32, bit v of row r set
where token v is allowed (all ones on unconstrained rows).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Sequence

import llguidance
import llguidance.numpy as llnp
import numpy as np

from jserve.engine.shapes import bitmask_words
from jserve.errors import InvalidRequestError
from jserve.structured.params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# JSON separators when no whitespace_pattern is given: one space after commas and
# colons, no other whitespace.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_CACHED = 256  # compiled specs kept
# From this many constrained rows a step's masks are filled by llguidance's thread pool;
# below, one after the other (8 rows of a regex on the embedded model: 2.4 us a row in
# turn against 7.6 us through the pool, whose hand-off costs more than it saves).
PARALLEL_ROWS = 16


def _grammar(kind: str, text: str, whitespace: str | None) -> str:
    """The llguidance grammar of a spec (raises ValueError on some bad input)."""
    json_opts = COMPACT_JSON if whitespace is None else {"whitespace_pattern": whitespace}
    M = llguidance.LLMatcher
    if kind == "json":
        return M.grammar_from_json_schema(text, defaults=json_opts)
    if kind == "json_object":
        return M.grammar_from_json_schema('{"type": "object"}', defaults=json_opts)
    if kind == "regex":
        return M.grammar_from_regex(text)
    if kind == "choice":
        alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(text))
        return M.grammar_from_lark(f"start: {alts}")
    return llguidance.grammar_from("grammar", text)  # GBNF, converted to Lark, or Lark


class StructuredOutputs:
    """Compiled specs, the live matchers, and the step's bitmask."""

    def __init__(self, tokenizer: object | None, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.words = bitmask_words(vocab_size)
        self._eos = list(eos_ids)
        self._lltok: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._compiled: collections.OrderedDict[tuple, llguidance.LLMatcher] = (
            collections.OrderedDict()
        )
        self._matchers: dict[int, llguidance.LLMatcher] = {}  # by seq_id
        self._executor: llguidance.LLExecutor | None = None
        # Host time filling masks, and the constrained rows filled (for benchmarks).
        self.mask_seconds = 0.0
        self.mask_rows = 0

    @property
    def num_active(self) -> int:
        """Sequences holding grammar state."""
        return len(self._matchers)

    def _llt(self) -> llguidance.LLTokenizer:
        if self._lltok is None:
            if self._tokenizer is None:
                raise InvalidRequestError(
                    "structured output needs the model's tokenizer; this model has none"
                )
            # The Hugging Face tokenizer.json, handed over once per model.
            text = self._tokenizer.to_json()
            self._lltok = llguidance.LLTokenizer(
                text, n_vocab=self.vocab_size, eos_token=self._eos or None
            )
        return self._lltok

    def compile(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The compiled matcher of a spec (cached); InvalidRequestError if it is invalid.
        Thread-safe: callers run it off the step thread before queueing a request."""
        if not isinstance(spec, StructuredOutputsParams):
            raise InvalidRequestError(
                "invalid sampling parameters: structured_outputs must be a "
                f"StructuredOutputsParams, got {type(spec).__name__}",
                field="structured_outputs",
            )
        key = spec.key()
        with self._lock:
            proto = self._compiled.get(key)
            if proto is not None:
                self._compiled.move_to_end(key)
                return proto
            llt = self._llt()
        kind, text, ws = key
        try:
            grammar = _grammar(kind, text, ws)
        except Exception as e:  # the library raises ValueError or a bare Exception
            raise self._invalid(kind, str(e)) from None
        proto = llguidance.LLMatcher(llt, grammar, log_level=0)
        if proto.is_error():
            raise self._invalid(kind, proto.get_error())
        with self._lock:
            self._compiled[key] = proto
            while len(self._compiled) > MAX_CACHED:
                self._compiled.popitem(last=False)
        return proto

    @staticmethod
    def _invalid(kind: str, error: str) -> InvalidRequestError:
        what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar"}.get(kind, kind)
        return InvalidRequestError(
            f"invalid sampling parameters: structured_outputs has an invalid {what}: "
            f"{error.strip()[:300]}",
            field="structured_outputs",
        )

    def _matcher(self, seq_id: int, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        m = self._matchers.get(seq_id)
        if m is None:
            m = self._matchers[seq_id] = self.compile(spec).deep_copy()
        return m

    def fill(
        self,
        rows: int,
        targets: list[tuple[int, int, StructuredOutputsParams]],  # (row, seq_id, spec)
    ) -> np.ndarray | None:
        """The step's bitmask i32[rows, words] (all ones but on constrained rows), or
        None when no row is constrained."""
        if not targets:
            return None
        t0 = time.perf_counter()
        mask = np.full((rows, self.words), -1, np.int32)
        pairs = [(self._matcher(seq_id, spec), row) for row, seq_id, spec in targets]
        if len(pairs) < PARALLEL_ROWS:
            for m, row in pairs:
                llnp.fill_next_token_bitmask(m, mask, row)
        else:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            llnp.fill_next_token_bitmask_par(self._executor, pairs, mask)
        self.mask_seconds += time.perf_counter() - t0
        self.mask_rows += len(pairs)
        return mask

    def advance(self, seq_id: int, spec: StructuredOutputsParams, tokens: list[int]) -> bool:
        """Feeds a sequence's new tokens to its matcher; True once the grammar is complete
        (nothing more may follow)."""
        m = self._matcher(seq_id, spec)
        for t in tokens:
            if not m.consume_token(t):
                # Only a token outside the mask gets here: end the sequence rather than
                # let it run on unconstrained.
                logger.warning(
                    "sequence %d: token %d refused by its grammar: %s", seq_id, t, m.get_error()
                )
                return True
        return m.is_stopped()

    def release(self, seq_id: int) -> None:
        self._matchers.pop(seq_id, None)
