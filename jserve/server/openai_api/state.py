"""What the HTTP handlers share: the serving core, the model's name and chat template."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from jserve.lora import LoRARequest
from jserve.sampling_params import SamplingParams
from jserve.server.openai_api.chat_template import ChatTemplate
from jserve.server.openai_api.errors import APIError, bad_request
from jserve.server.servicers import ServingCore


@dataclasses.dataclass
class APIState:
    core: ServingCore
    chat_template: ChatTemplate | None
    auth_token: str | None = None
    max_request_bytes: int = 4 * 1024 * 1024
    bos_token: str | None = None  # texts of the special tokens, for /tokenizer_info
    eos_token: str | None = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.core.model_name

    @property
    def tokenizer(self) -> Any:
        return self.core.tokenizer

    def check_model(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter a request's ``model`` names (vLLM's convention), or None for
        the base model (also when ``model`` is not given); 404 for any other name."""
        if model is None or model == self.model_name:
            return None
        lora = self.core.lora(model)
        if lora is not None:
            return lora
        served = [self.model_name, *(r.lora_name for r in self.core.loras)]
        raise APIError(
            404,
            f"the model {model!r} does not exist here; this server serves "
            + ", ".join(repr(m) for m in served)
            + " (GET /v1/models)",
            "model",
            "model_not_found",
        )

    def check_prompt_size(self, prompt: str | Sequence[int], field: str) -> None:
        """Refuses text or token ids longer than a sequence of this model can be."""
        error = self.core.size_error(prompt, field)
        if error is not None:
            raise bad_request(error, field, "context_length_exceeded")

    def need_tokenizer(self, field: str) -> Any:
        tok = self.tokenizer
        if tok is None:
            raise bad_request(
                "this model has no tokenizer (tokenizer.json), so text needs one: send "
                "token ids instead",
                field,
            )
        return tok

    def decode_token(self, token_id: int) -> str:
        tok = self.tokenizer
        return tok.decode([token_id], skip_special_tokens=False) if tok is not None else ""

    def decode_text(self, token_ids: list[int]) -> str:
        tok = self.tokenizer
        return tok.decode(token_ids, skip_special_tokens=False) if tok is not None else ""

    def with_prompt_logprobs(self, params: SamplingParams, k: int) -> SamplingParams:
        """``params`` that also score the prompt's own tokens (echo with logprobs)."""
        return dataclasses.replace(params, prompt_logprobs=k)
