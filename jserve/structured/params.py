"""What a request asks its output to be: a JSON schema, a regex, a choice or a grammar."""

from __future__ import annotations

import dataclasses
import json as jsonlib
from typing import Any

from jserve.errors import InvalidRequestError

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclasses.dataclass
class StructuredOutputsParams:
    """Constrains a request's output, in vLLM's convention: exactly one of

    - ``json``: a JSON schema (a dict, or its JSON text) the output must validate against;
    - ``regex``: a regular expression the whole output must match;
    - ``choice``: a list of strings, the output being exactly one of them;
    - ``grammar``: a context-free grammar in EBNF (GBNF, as llama.cpp and vLLM's xgrammar
      backend write it; llguidance's Lark syntax is accepted too);
    - ``json_object=True``: any JSON object.

    JSON output (``json``, ``json_object``) has bounded whitespace: by default the only
    whitespace is the single space of the ``", "`` and ``": "`` separators, so a model
    cannot fill max_tokens with newlines inside a valid object. ``whitespace_pattern``
    (a regex, e.g. ``r"[ \\n]{0,2}"``) allows that much whitespace between JSON tokens
    instead.
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None

    def kind(self) -> str:
        """The one kind given; raises InvalidRequestError unless exactly one is."""
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequestError(
                "invalid sampling parameters: structured_outputs needs exactly one of "
                f"{', '.join(KINDS)}; got {', '.join(given) or 'none'}",
                field="structured_outputs",
            )
        return given[0]

    def key(self) -> tuple[str, str, str | None]:
        """(kind, spec as canonical text, whitespace): what a compiled grammar depends on.
        Validates the shape of the fields (their content is checked when compiled)."""

        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(
                f"invalid sampling parameters: structured_outputs {msg}", field="structured_outputs"
            )

        kind = self.kind()
        value = getattr(self, kind)
        if kind == "json":
            if isinstance(value, str):
                try:
                    value = jsonlib.loads(value)
                except ValueError as e:
                    raise bad(f"json is not valid JSON ({e})") from None
            if not isinstance(value, dict | bool):
                raise bad(f"json must be a JSON schema (an object), got {value!r:.40}")
            text = jsonlib.dumps(value)  # property order is generation order: kept
        elif kind == "choice":
            if not isinstance(value, list | tuple) or not value:
                raise bad(f"choice must be a non-empty list of strings, got {value!r:.40}")
            if not all(isinstance(c, str) and c for c in value):
                raise bad(f"choice must hold non-empty strings, got {value!r:.60}")
            text = jsonlib.dumps(list(value))
        elif kind == "json_object":
            if value is not True:
                raise bad(f"json_object must be true, got {value!r:.40}")
            text = ""
        else:
            if not isinstance(value, str) or not value:
                raise bad(f"{kind} must be a non-empty string, got {value!r:.40}")
            text = value
        ws = self.whitespace_pattern
        if ws is not None and not isinstance(ws, str):
            raise bad(f"whitespace_pattern must be a string, got {ws!r:.40}")
        return kind, text, ws
