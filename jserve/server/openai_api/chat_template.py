"""Chat templates: where a model keeps its template, and rendering it safely.

Hugging Face models keep a Jinja template either as ``chat_template`` in
``tokenizer_config.json`` (a string, or a list of named templates of which
``default`` is used) or in a ``chat_template.jinja`` file beside it;
``--chat-template FILE`` overrides both. Templates come with model downloads,
so they are rendered in Jinja's immutable sandbox (no attribute access to
Python internals, no mutation of the values passed in), with the variables and
helpers Hugging Face's ``apply_chat_template`` provides: ``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token``, ``tools``,
``raise_exception``, ``strftime_now`` and a ``tojson`` filter.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jserve.errors import ConfigError, InvalidRequestError

TEMPLATE_FILE = "chat_template.jinja"


class TemplateError(InvalidRequestError):
    """The template refused the conversation (its raise_exception) or failed on it."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older configs
        value = value.get("content")
    return value if isinstance(value, str) else None


def _tokenizer_config(model_dir: str) -> dict[str, Any]:
    path = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    return cfg if isinstance(cfg, dict) else {}


def _read(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {path!r}: {e}") from None


def special_tokens(model_dir: str | None) -> tuple[str | None, str | None]:
    """(bos, eos) token texts from the model's tokenizer_config.json, where it names them."""
    return _special(_model_config(model_dir))


def _model_config(model_dir: str | None) -> dict[str, Any]:
    return _tokenizer_config(model_dir) if model_dir and os.path.isdir(model_dir) else {}


def _special(cfg: dict[str, Any]) -> tuple[str | None, str | None]:
    return _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None):
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"the chat template does not parse: {e} (line {e.lineno})") from None

    @classmethod
    def load(cls, model_dir: str | None, override: str | None = None) -> ChatTemplate | None:
        """The model's template (or ``override``, a file); None when it has none."""
        cfg = _model_config(model_dir)
        bos, eos = _special(cfg)
        if override is not None:
            return cls(_read(override, "chat template file (--chat-template)"), bos, eos)
        source = cfg.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if isinstance(source, str) and source:
            return cls(source, bos, eos)
        path = os.path.join(model_dir, TEMPLATE_FILE) if model_dir else None
        if path is not None and os.path.isfile(path):
            return cls(_read(path, "chat template"), bos, eos)
        return None

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for a conversation; TemplateError if the template refuses it."""
        variables = {
            **extra,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "tools": tools,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        try:
            return self._template.render(**variables)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template failed on these messages: {e}") from None


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the chat template refused the messages: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which templates do not expect.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
