"""Offline generation API in the style of vLLM's ``LLM``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from jserve.compile_cache import DEFAULT_CACHE_DIR, CacheDirArg, enable_compilation_cache
from jserve.config import ModelConfig
from jserve.engine.config import EngineConfig
from jserve.engine.llm_engine import LLMEngine
from jserve.errors import EngineStepError, InvalidRequestError
from jserve.lora import LoRARequest
from jserve.model_loader import LoadedModel, default_model_path, load_model
from jserve.outputs import RequestOutput, merge_delta
from jserve.prompts import PromptType, normalize_prompts
from jserve.sampling_params import SamplingParams
from jserve.tokenizer import Tokenizer
from sharding import ParallelConfig


class LLM:
    """Loads a model once and generates for batches of prompts with continuous batching.

    >>> llm = LLM()  # the embedded Shakespeare model
    >>> out = llm.generate("ROMEO:", SamplingParams(max_tokens=32, temperature=0))

    ``compilation_cache_dir``: where JAX's persistent compilation cache keeps
    compiled step programs, so a second start-up skips compiling them (see
    jserve.compile_cache). The default is ``$JSERVE_COMPILATION_CACHE_DIR`` if
    set, else ``~/.cache/jserve/jax-cache``; None or "" leaves the cache off.

    ``min_token_bucket``: the smallest token count a step is compiled for (steps are padded
    to buckets from it up to ``max_num_batched_tokens``); None: 1 on CPU, 16 on
    accelerators. Raising it compiles fewer step programs at the price of padding.

    ``speculative_config``: speculative decoding in vLLM's convention, e.g.
    ``{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
    "prompt_lookup_max": 5}`` (see jserve.spec); checked before the model loads.

    ``quantization``: "int8", "fp8" or "int4" (groups of 64; "int4-g32" for 32) quantizes
    a float checkpoint's matmul weights as they load (weight-only: dequantized inside each
    matmul); a checkpoint whose config.json declares ``quantization_config`` loads in its
    own format without it (see jserve.models.quant).

    ``fp8_activations``: with fp8 weights (one scale per output channel), quantize each
    matmul's activations to fp8 per token and multiply fp8 x fp8: True, False (weight-only)
    or "auto" (on for a GPU of compute capability 8.9 or newer, off on CPU and TPU).

    ``kv_cache_dtype``: "auto" (the model's dtype), "fp8" or "int8": KV pages in one byte
    per value with per-layer K/V scales, so the pool holds correspondingly more pages
    (see jserve.models.kv_quant).

    ``check_weights``: refuse weights holding NaN or infinite values; None (the
    default) checks models of up to 10B parameters (see jserve.model_loader).

    ``enable_lora``: serve PEFT LoRA adapters over the model, per request
    (``generate(..., lora_request=LoRARequest(name, int_id, path))``): ``max_loras``
    adapters on the device at once, each of rank up to ``max_lora_rank``, and
    ``max_cpu_loras`` (default ``max_loras``) kept in host memory (see jserve.lora).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        dtype: str = "auto",
        *,
        page_size: int = 16,
        num_pages: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        min_token_bucket: int | None = None,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        max_logprobs: int = 20,
        attention_backend: str = "auto",
        async_scheduling: bool = True,
        memory_utilization: float = 0.9,
        seed: int = 0,
        warmup: bool = True,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        num_microbatches: int = 0,
        enable_expert_parallel: bool = False,
        compilation_cache_dir: CacheDirArg = DEFAULT_CACHE_DIR,
        speculative_config: Mapping[str, Any] | None = None,
        check_weights: bool | None = None,
        quantization: str | None = None,
        kv_cache_dtype: str = "auto",
        fp8_activations: bool | str = "auto",
        enable_lora: bool = False,
        max_loras: int = 1,
        max_lora_rank: int = 16,
        max_cpu_loras: int | None = None,
    ) -> None:
        ecfg = EngineConfig(
            page_size=page_size,
            num_pages=num_pages,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            min_token_bucket=min_token_bucket,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            max_logprobs=max_logprobs,
            max_waiting=1 << 30,  # offline: every prompt is queued at once
            memory_utilization=memory_utilization,
            attention_backend=attention_backend,
            async_scheduling=async_scheduling,
            seed=seed,
            speculative_config=speculative_config,
            enable_lora=enable_lora,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            max_cpu_loras=max_cpu_loras,
        ).validate()
        enable_compilation_cache(compilation_cache_dir)  # before loading compiles anything
        parallel = ParallelConfig(
            tensor_parallel_size, pipeline_parallel_size, num_microbatches, enable_expert_parallel
        )
        self.model: LoadedModel = load_model(
            model or default_model_path(),
            dtype,
            parallel,
            check_weights,
            quantization,
            kv_cache_dtype,
            fp8_activations,
        )
        self.engine = LLMEngine(self.model, ecfg, warmup=warmup)
        self._counter = 0

    @property
    def cfg(self) -> ModelConfig:
        """The model's configuration (as read from config.json)."""
        return self.engine.cfg

    def get_tokenizer(self) -> Tokenizer | None:
        return self.model.tokenizer

    def get_metrics(self) -> dict[str, float]:
        """The engine's counters and gauges by name (``jserve_`` names, as the Prometheus
        exporter gives them), e.g. ``jserve_spec_decode_mean_accepted_length``."""
        return self.engine.get_metrics()

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Loads and checks an adapter ahead of its first request (AdapterError if it
        cannot be served)."""
        self.engine.add_lora(lora_request)
        return True

    def remove_lora(self, name: str) -> bool:
        """Forgets an adapter that no unfinished request uses."""
        self.engine.remove_lora(name)
        return True

    def list_loras(self) -> list[LoRARequest]:
        return self.engine.list_loras()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt; returns outputs in prompt order.

        ``lora_request``: one adapter for every prompt, or a list with one per prompt
        (None for the base model); needs ``LLM(enable_lora=True)``.

        Every prompt is validated before any is queued, so one bad prompt
        raises without side effects. With ``SamplingParams(prompt_logprobs=K)``
        each output's ``prompt_logprobs`` scores its prompt (vLLM's shape), and
        ``max_tokens=0`` scores the prompt without generating.
        """
        prompt_list = normalize_prompts(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompt_list)
        elif isinstance(sampling_params, list | tuple):
            params = list(sampling_params)
            if len(params) != len(prompt_list):
                raise InvalidRequestError(
                    f"{len(params)} sampling params for {len(prompt_list)} prompts"
                )
        else:
            raise InvalidRequestError(
                "sampling_params must be a SamplingParams or a list of them, got "
                f"{type(sampling_params).__name__}"
            )
        if priority is not None and not isinstance(priority, list | tuple):
            raise InvalidRequestError(
                f"priority must be a list of integers, got {type(priority).__name__}"
            )
        prio = list(priority) if priority is not None else [0] * len(prompt_list)
        if len(prio) != len(prompt_list):
            raise InvalidRequestError(f"{len(prio)} priorities for {len(prompt_list)} prompts")
        if isinstance(lora_request, list | tuple):
            loras = list(lora_request)
            if len(loras) != len(prompt_list):
                raise InvalidRequestError(
                    f"{len(loras)} lora requests for {len(prompt_list)} prompts",
                    field="lora_request",
                )
        else:
            loras = [lora_request] * len(prompt_list)
        ids = [str(self._counter + i) for i in range(len(prompt_list))]
        checked = []
        known = {r.lora_name for r in self.engine.list_loras()}
        for i, (rid, p, sp, pr, lr) in enumerate(
            zip(ids, prompt_list, params, prio, loras, strict=True)
        ):
            try:
                checked.append(self.engine.validate_request(rid, p, sp, pr, lr))
            except InvalidRequestError as e:
                # Nothing stays changed: adapters the earlier prompts registered go again.
                for r in self.engine.list_loras():
                    if r.lora_name not in known:
                        self.engine.remove_lora(r.lora_name)
                if len(prompt_list) == 1:
                    raise
                raise type(e)(f"prompts[{i}]: {e}") from None
        self._counter += len(prompt_list)
        for rid, (text, tokens), sp, pr, lr in zip(ids, checked, params, prio, loras, strict=True):
            self.engine.enqueue(rid, text, tokens, sp, pr, lora_request=lr)

        results: dict[str, RequestOutput] = {}
        errors: dict[str, EngineStepError] = {}
        bar = tqdm(total=len(ids), desc="generating", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for delta in self.engine.step():
                results[delta.request_id] = merge_delta(results.get(delta.request_id), delta)
                if delta.finished:
                    bar.update(1)
            errors.update(self.engine.step_errors)
        bar.close()
        failed = [rid for rid in ids if rid in errors]
        if failed:  # the others ran to the end; the engine serves on
            raise EngineStepError(
                f"{len(failed)} of {len(ids)} prompts failed: {errors[failed[0]]}"
            ) from errors[failed[0]].__cause__
        return [results[rid] for rid in ids]
