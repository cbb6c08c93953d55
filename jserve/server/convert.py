"""Wire messages <-> engine types. Pure functions and small stateful builders; no I/O."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jserve.errors import InvalidRequestError
from jserve.lora import LoRARequest
from jserve.outputs import CompletionOutput, Logprob, RequestOutput
from jserve.sampling_params import SamplingParams
from jserve.server.proto import generation_pb2 as pb
from jserve.server.proto import jetstream_pb2 as js
from jserve.structured import StructuredOutputsParams

# SamplingParameters fields that are copied only when set (unset keeps the
# SamplingParams default), and those that are always copied.
_OPTIONAL_FIELDS = (
    "n",
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "logprobs",
    "skip_special_tokens",
)

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


def sampling_params(msg: pb.SamplingParameters) -> SamplingParams:
    """The engine's SamplingParams for a request; the engine validates the values."""
    kw: dict = {name: getattr(msg, name) for name in _OPTIONAL_FIELDS if msg.HasField(name)}
    return SamplingParams(
        logit_bias=dict(msg.logit_bias) or None,
        structured_outputs=structured_outputs(msg),
        stop=list(msg.stop),
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        include_stop_str_in_output=msg.include_stop_str_in_output,
        **kw,
    )


def structured_outputs(msg: pb.SamplingParameters) -> StructuredOutputsParams | None:
    """The request's structured output, or None; the engine validates and compiles it."""
    if not msg.HasField("structured_outputs"):
        return None
    so = msg.structured_outputs
    kind = so.WhichOneof("kind")
    if kind is None:
        raise InvalidRequestError(
            "invalid sampling parameters: structured_outputs is set but empty; give one of "
            "json, regex, choice, grammar or json_object",
            field="structured_outputs",
        )
    ws = so.whitespace_pattern if so.HasField("whitespace_pattern") else None
    if kind == "choice":
        return StructuredOutputsParams(choice=list(so.choice.choices), whitespace_pattern=ws)
    return StructuredOutputsParams(**{kind: getattr(so, kind)}, whitespace_pattern=ws)


def lora_adapter(req: LoRARequest) -> pb.LoRAAdapter:
    return pb.LoRAAdapter(name=req.lora_name, id=req.lora_int_id, path=str(req.lora_path))


def generate_prompt(request: pb.GenerateRequest) -> str | list[int]:
    which = request.WhichOneof("prompt")
    if which == "text":
        return request.text
    if which == "token_ids":
        return list(request.token_ids.ids)
    raise InvalidRequestError("the request has no prompt: set text or token_ids")


@dataclasses.dataclass
class JetStreamPrompt:
    prompt: str | list[int]
    # Text only: prepend the model's BOS id to its tokens (token ids already have it).
    add_bos: bool
    text_mode: bool  # responses carry text (server-side tokenization)
    params: SamplingParams


def jetstream_request(
    request: js.DecodeRequest, bos_token_id: int | None, base: SamplingParams
) -> JetStreamPrompt:
    """Maps a JetStream DecodeRequest onto the engine's terms.

    JetStream semantics: text content is tokenized by the server and answered
    with text and ids; token content is the client's own tokenization and is
    answered with ids only. Text is tokenized without special tokens, and
    unless ``has_bos`` says the content already starts with BOS the model's BOS
    id is put in front, for text and token ids alike (JetStream's orchestrator
    does the same), so a prompt sent as text or as its ids runs the same. ``num_samples`` 0 means 1; ``max_tokens`` 0
    means up to the model's maximum length. Sampling is ``base`` (greedy by
    default): the request has no sampling fields.
    """
    if request.num_samples < 0:
        raise InvalidRequestError(
            f"num_samples must be >= 1 (0 means 1), got {request.num_samples}"
        )
    if request.max_tokens < 0:
        raise InvalidRequestError(
            f"max_tokens must be >= 1 (0 means up to the model's maximum length), got "
            f"{request.max_tokens}"
        )
    params = dataclasses.replace(
        base, n=request.num_samples or 1, max_tokens=request.max_tokens or None
    )
    which = request.WhichOneof("content")
    if which == "text_content":
        add_bos = not request.has_bos and bos_token_id is not None
        return JetStreamPrompt(request.text_content.text, add_bos, True, params)
    if which == "token_content":
        ids = list(request.token_content.token_ids)
        if not ids:
            raise InvalidRequestError("prompt is empty; give at least one token id")
        if not request.has_bos and bos_token_id is not None:
            ids.insert(0, bos_token_id)
        return JetStreamPrompt(ids, False, False, params)
    raise InvalidRequestError("the request has no content: set text_content or token_content")


def _token_logprob(token_id: int, lp: Logprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=token_id, logprob=lp.logprob, rank=lp.rank or 0, token=lp.decoded_token or ""
    )


def position_logprobs(token_id: int, entry: dict[int, Logprob], k: int) -> pb.PositionLogprobs:
    """The sampled token's logprob plus the k most likely tokens, by rank."""
    top = sorted(
        ((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k),
        key=lambda item: item[1].rank or 0,
    )
    return pb.PositionLogprobs(
        sampled=_token_logprob(token_id, entry[token_id]),
        top=[_token_logprob(t, lp) for t, lp in top],
    )


class GenerateResponder:
    """Turns a request's incremental outputs into GenerateResponse messages.

    One message per sample that has new tokens, new text or just finished;
    the request's last message also carries the usage counts.
    """

    def __init__(self, request_id: str, params: SamplingParams) -> None:
        self.request_id = request_id
        self.num_logprobs = params.logprobs
        self.reported_finish: set[int] = set()
        self.completion_tokens = 0

    def _message(self, c: CompletionOutput) -> pb.GenerateResponse | None:
        finishing = c.finish_reason is not None and c.index not in self.reported_finish
        if not (c.token_ids or c.text or finishing):
            return None
        msg = pb.GenerateResponse(
            request_id=self.request_id, index=c.index, token_ids=c.token_ids, text=c.text
        )
        if self.num_logprobs is not None and c.logprobs:
            msg.logprobs.extend(
                position_logprobs(t, entry, self.num_logprobs)
                for t, entry in zip(c.token_ids, c.logprobs, strict=True)
            )
        if finishing:
            self.reported_finish.add(c.index)
            msg.finish_reason = FINISH_REASONS[c.finish_reason]
            if isinstance(c.stop_reason, str):
                msg.stop_string = c.stop_reason
            elif isinstance(c.stop_reason, int):
                msg.stop_token_id = c.stop_reason
        return msg

    def __call__(self, out: RequestOutput) -> list[pb.GenerateResponse]:
        msgs = []
        for c in out.outputs:
            self.completion_tokens += len(c.token_ids)
            msg = self._message(c)
            if msg is not None:
                msgs.append(msg)
        if out.finished:
            if not msgs:
                msgs.append(pb.GenerateResponse(request_id=self.request_id))
            msgs[-1].usage.CopyFrom(
                pb.Usage(
                    prompt_tokens=len(out.prompt_token_ids),
                    completion_tokens=self.completion_tokens,
                    cached_tokens=out.num_cached_tokens,
                )
            )
        return msgs


class JetStreamResponder:
    """Turns outputs into JetStream DecodeResponses: one per step, every sample in order.

    Like JetStream, the EOS token that ends a sample is not returned, and a
    step that brings nothing new sends no message.
    """

    def __init__(self, num_samples: int, text_mode: bool, eos_token_ids: Sequence[int]) -> None:
        self.num_samples = num_samples
        self.text_mode = text_mode
        self.eos = frozenset(eos_token_ids)

    def __call__(self, out: RequestOutput) -> list[js.DecodeResponse]:
        samples = [js.DecodeResponse.StreamContent.Sample() for _ in range(self.num_samples)]
        any_content = False
        for c in out.outputs:
            ids = list(c.token_ids)
            if c.finish_reason == "stop" and c.stop_reason is None and ids and ids[-1] in self.eos:
                ids.pop()
            sample = samples[c.index]
            sample.token_ids.extend(ids)
            if self.text_mode:
                sample.text = c.text
            any_content = any_content or bool(ids) or bool(self.text_mode and c.text)
        if not any_content:
            return []
        return [js.DecodeResponse(stream_content=js.DecodeResponse.StreamContent(samples=samples))]


def outcome_of(out: RequestOutput) -> str:
    """The metrics outcome of a finished request from its samples' finish reasons."""
    reasons = {c.finish_reason for c in out.outputs}
    if "abort" in reasons:
        return "aborted"
    if "length" in reasons:
        return "length"
    return "stopped"
