"""Request bodies of the OpenAI-compatible API, as pydantic models.

Fields follow OpenAI's API and vLLM's extras that map onto ``SamplingParams``.
Unknown fields are refused with a 400 naming them, as OpenAI's own API does,
so a misspelt or unsupported option never passes silently. Values are checked
by ``SamplingParams.validate``, the same validation the engine runs, not
repeated here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

# A prompt: text, texts, token ids, or lists of token ids (one request each).
Prompt = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = None  # None: the served model
    temperature: float | None = None  # None: 1.0, as OpenAI
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras, each a SamplingParams field (priority: the scheduler's).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    # vLLM's structured output: one of json, regex, choice, grammar, json_object
    # (jserve.StructuredOutputsParams's fields).
    structured_outputs: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: int | None = 16
    logprobs: int | None = None  # top-N alternatives per token (the chosen one always)
    echo: bool = False


class FunctionDefinition(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A string, or parts such as {"type": "text", "text": ...} (text parts only).
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    # vLLM's extras for the chat template.
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class LoadLoRAAdapterRequest(_Body):
    """vLLM's ``POST /v1/load_lora_adapter``."""

    lora_name: StrictStr
    lora_path: StrictStr


class UnloadLoRAAdapterRequest(_Body):
    """vLLM's ``POST /v1/unload_lora_adapter``; ``lora_int_id``, if given, must match."""

    lora_name: StrictStr
    lora_int_id: StrictInt | None = None


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[StrictInt]
