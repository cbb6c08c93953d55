"""The engine core: requests in, one scheduled step at a time, incremental outputs out."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
import traceback
from typing import Any

import jax

from jserve.config import ModelConfig
from jserve.engine import logprobs
from jserve.engine.config import EngineConfig
from jserve.engine.detokenizer import SequenceDetokenizer
from jserve.engine.inputs import StepPlan
from jserve.engine.kv_pool import PagePool
from jserve.engine.request import Request, Sequence
from jserve.engine.runner import ModelRunner, StepHandle, StepResult, kv_bytes_per_page
from jserve.engine.scheduler import ScheduledEntry, Scheduler, SchedulerOutput, SeqUpdate
from jserve.engine.shapes import BAN_WIDTH
from jserve.engine.stats import EngineStats
from jserve.errors import (
    CapacityError,
    ConfigError,
    EngineDeadError,
    EngineStepError,
    InvalidRequestError,
    RequestTooLargeError,
)
from jserve.lora.adapter import AdapterError, HostAdapter
from jserve.lora.manager import LoRAManager, LoRARequest
from jserve.model_loader import LoadedModel
from jserve.models.kv_quant import describe_kv
from jserve.models.moe import expert_placement
from jserve.models.quant import describe_format
from jserve.outputs import CompletionOutput, RequestOutput
from jserve.prompts import PromptType, tokenize_prompt
from jserve.sampling_params import SamplingParams
from jserve.spec.proposers import load_proposer
from jserve.spec.speculator import Speculator
from jserve.structured.manager import StructuredOutputs
from sharding import describe_mesh

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 1 << 30  # pool size on hosts that report no device memory
# Steps failing in a row, with none succeeding between, before the engine gives up
# (a device that fails every step is broken, not unlucky).
MAX_FAILED_STEPS = 3


def pages_that_fit(
    model: LoadedModel, ecfg: EngineConfig, max_model_len: int, proposer: Any = None
) -> int:
    """Sizes the KV pool from free device memory (or ``num_pages`` if set); a proposer's
    pool (speculative decoding, jserve.spec) has as many pages, so each page costs both."""
    if ecfg.num_pages is not None:
        return ecfg.num_pages
    per_page = _page_bytes_per_device(model, model.cfg, ecfg.page_size)
    if proposer is not None:
        per_page += _page_bytes_per_device(model, proposer.cfg, ecfg.page_size)
    devices = list(model.mesh.devices.flat) if model.mesh is not None else [jax.devices()[0]]
    budgets = []
    for device in devices:
        stats = device.memory_stats() if device.process_index == jax.process_index() else None
        if stats and "bytes_limit" in stats:
            limit = stats["bytes_limit"] * ecfg.memory_utilization
            budgets.append(limit - stats.get("bytes_in_use", 0))
    budget = min(budgets) if budgets else CPU_DEFAULT_KV_BYTES
    want = ecfg.max_num_seqs * math.ceil(max_model_len / ecfg.page_size)
    pages = min(want, int(budget // per_page))
    if pages < math.ceil(max_model_len / ecfg.page_size):
        raise ConfigError(
            f"only {pages} KV pages of {ecfg.page_size} tokens fit in device memory, fewer than "
            f"one sequence of max_model_len={max_model_len} needs; lower max_model_len or "
            "max_num_seqs, or raise memory_utilization"
        )
    return pages


def _lora_manager(model: LoadedModel, ecfg: EngineConfig) -> LoRAManager | None:
    """The engine's adapters under ``enable_lora``; ConfigError where LoRA cannot run."""
    if not ecfg.enable_lora:
        return None
    if model.mesh is not None and model.mesh.shape["stage"] > 1:
        raise ConfigError(
            "enable_lora does not run with pipeline parallelism yet; use tensor parallelism "
            "(tensor_parallel_size) or pipeline_parallel_size=1"
        )
    layer_keys = [set(lp) for lp in model.params["layers"]]
    return LoRAManager(
        model.cfg, layer_keys, ecfg.max_loras, ecfg.max_lora_rank, ecfg.cpu_loras, model.dtype
    )


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{num_bytes:.0f} B"
        num_bytes /= 1024
    return ""


def _page_bytes_per_device(model: LoadedModel, cfg: ModelConfig, page_size: int) -> float:
    """Bytes one KV page (all layers) of a model of ``cfg`` served beside ``model`` (itself,
    or its proposer) takes on each device: pages are split by KV head over the
    tensor-parallel axis and by layer over pipeline stages."""
    total = kv_bytes_per_page(cfg, page_size, model.dtype)
    if model.mesh is None:
        return total
    tp, pp = model.mesh.shape["model"], model.mesh.shape["stage"]
    return total / (min(tp, cfg.num_kv_heads) * pp)


class LLMEngine:
    """Owns the scheduler, the page pool and the runner; drives one step per call."""

    def __init__(
        self,
        model: LoadedModel,
        ecfg: EngineConfig,
        warmup: bool = True,
        progress: bool = True,
        runner_cls: type[ModelRunner] = ModelRunner,
    ) -> None:
        self.model = model
        self.cfg = model.cfg
        self.ecfg = ecfg.validate()
        self.tokenizer = model.tokenizer
        limit = self.cfg.max_position_embeddings
        self.max_model_len = min(ecfg.max_model_len or limit, limit)
        spec = self.ecfg.speculative_config
        self.speculator = None
        draft, draft_params = None, None
        if spec is not None:
            spec, draft, draft_params = load_proposer(spec, model, self.max_model_len)
            self.speculator = Speculator(spec, on_device=draft is not None)
        self._proposer = draft
        self.num_pages = pages_that_fit(model, ecfg, self.max_model_len, draft)
        self.pool = PagePool(self.num_pages, ecfg.page_size, ecfg.enable_prefix_caching)
        self.lora = _lora_manager(model, self.ecfg)
        self.scheduler = Scheduler(
            ecfg, self.pool, self.cfg.eos_token_ids, self.speculator, self.lora
        )
        # Proposals are made from the tokens of the previous step, so a speculating
        # engine collects each step before planning the next.
        self._async = ecfg.async_scheduling and self.speculator is None
        self.runner = runner_cls(
            model.params,
            self.cfg,
            ecfg,
            model.dtype,
            self.max_model_len,
            num_pages=self.num_pages,
            mesh=model.mesh,
            parallel=model.parallel,
            draft=draft,
            draft_params=draft_params,
            lora_specs=self.lora.specs() if self.lora is not None else None,
        )
        self.structured = StructuredOutputs(
            self.tokenizer, self.cfg.vocab_size, self.cfg.eos_token_ids
        )
        self.requests: dict[str, Request] = {}
        self._rng = random.Random(ecfg.seed)
        self._detoks: dict[int, SequenceDetokenizer] = {}  # by seq_id
        self._inflight: tuple[SchedulerOutput, StepHandle] | None = None
        self._touched: dict[str, Request] = {}
        self._idle_steps = 0
        self._failed_steps = 0
        # The requests the last step() failed (finished "abort") -> the error, for
        # callers to raise to whoever waits on them.
        self.step_errors: dict[str, EngineStepError] = {}
        self.stats = EngineStats(num_pages=self.num_pages)
        if warmup:
            self.runner.warmup(progress)

    # -- requests -----------------------------------------------------------

    def validate_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> tuple[str | None, list[int]]:
        """Checks everything about a request without changing any state (a new LoRA
        adapter it names is read, checked and registered)."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidRequestError(
                f"priority must be an integer, got {priority!r}", field="priority"
            )
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError(f"request id must be a non-empty string, got {request_id!r}")
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(
                f"sampling params must be a SamplingParams, got {type(params).__name__}"
            )
        params.validate(self.ecfg.max_logprobs)
        text, ids = tokenize_prompt(prompt, self.tokenizer, self.cfg.vocab_size)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens but the model's maximum length is "
                f"{self.max_model_len}; shorten the prompt",
                field="prompt",
                code="context_length_exceeded",
            )
        max_tokens = self._max_tokens(params, len(ids))
        if len(ids) + max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                f"maximum length of {self.max_model_len} tokens; shorten the prompt or lower "
                "max_tokens",
                field="max_tokens",
                code="context_length_exceeded",
            )
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError(
                "stop strings need a tokenizer; this model has none", field="stop"
            )
        if params.n > self.ecfg.max_num_seqs:
            raise InvalidRequestError(
                f"n ({params.n}) exceeds max_num_seqs ({self.ecfg.max_num_seqs})", field="n"
            )
        banned = len(params.stop_token_ids) + (
            0 if params.ignore_eos else len(self.cfg.eos_token_ids)
        )
        if params.min_tokens > 0 and banned > BAN_WIDTH:
            raise InvalidRequestError(
                f"with min_tokens, at most {BAN_WIDTH} stop_token_ids plus EOS ids can be "
                f"banned ({banned} given); pass fewer stop_token_ids or drop min_tokens",
                field="min_tokens",
            )
        bad = [t for t in params.stop_token_ids if t >= self.cfg.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"stop token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})",
                field="stop_token_ids",
            )
        if params.structured_outputs is not None:
            if self.speculator is not None:
                raise InvalidRequestError(
                    "invalid sampling parameters: structured_outputs cannot be combined with "
                    "speculative decoding on this engine (proposals are not checked against "
                    "the grammar); serve it without --speculative-config",
                    field="structured_outputs",
                )
            self.structured.compile(params.structured_outputs)  # cached when compiled before
        bad = [t for t in params.logit_bias or () if t >= self.cfg.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"invalid sampling parameters: logit_bias token id {bad[0]} is outside the "
                f"vocabulary [0, {self.cfg.vocab_size})",
                field="logit_bias",
            )
        s = self.ecfg.page_size
        total = len(ids) + max_tokens
        private = math.ceil(total / s) - len(ids) // s
        need = len(ids) // s + params.n * private
        if need > self.num_pages:
            raise RequestTooLargeError(
                f"request needs up to {need} KV pages but the pool has {self.num_pages}; it "
                "could never run: lower max_tokens, n or the prompt length",
                field="max_tokens",
                code="context_length_exceeded",
            )
        if len(self.scheduler.waiting) >= self.ecfg.max_waiting:
            raise CapacityError(
                f"the queue is full ({self.ecfg.max_waiting} waiting requests); retry later"
            )
        self._lora_id(lora_request)
        return text, ids

    # -- LoRA adapters (jserve.lora) ---------------------------------------------

    def _lora_id(self, lora_request: LoRARequest | None, adapter: HostAdapter | None = None) -> int:
        """The engine's id of a request's adapter (0: none), registering a new one (read
        before as ``adapter``, see ``LoRAManager.read``, or read here)."""
        if lora_request is None:
            return 0
        if self.lora is None:
            raise AdapterError(
                f"LoRA adapter {getattr(lora_request, 'lora_name', lora_request)!r} was asked "
                "for, but this engine serves no adapters; start it with enable_lora=True "
                "(--enable-lora)"
            )
        return self.lora.register(lora_request, adapter)

    def add_lora(
        self, lora_request: LoRARequest, adapter: HostAdapter | None = None
    ) -> LoRARequest:
        """Reads, checks and registers an adapter (vLLM's ``add_lora``); AdapterError, with
        nothing registered, if it cannot be served. ``adapter``: its contents, already read
        by ``LoRAManager.read`` (e.g. off the step thread)."""
        self._lora_id(lora_request, adapter)
        return lora_request

    def remove_lora(self, name: str) -> LoRARequest:
        """Forgets adapter ``name``; refused while a request uses it."""
        req = self.lora_by_name(name)
        busy = self.lora.in_use(req.lora_int_id)
        if busy:
            raise AdapterError(
                f"LoRA adapter {name!r} is used by {busy} unfinished request(s); unload it "
                "once they finish"
            )
        return self.lora.remove(name)

    def lora_by_name(self, name: str) -> LoRARequest:
        """A registered adapter by name; AdapterError naming the known ones otherwise."""
        found = None if self.lora is None else self.lora.get(name)
        if found is None:
            known = [] if self.lora is None else sorted(r.lora_name for r in self.list_loras())
            raise AdapterError(
                f"unknown LoRA adapter {name!r}; "
                + (f"this engine serves {known}" if known else "this engine serves none")
                + (
                    ""
                    if self.lora is not None
                    else " (start it with enable_lora=True / --enable-lora)"
                )
            )
        return found

    def list_loras(self) -> list[LoRARequest]:
        """Registered adapters, by id."""
        return [] if self.lora is None else [self.lora.known[i] for i in sorted(self.lora.known)]

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
        prompt_text: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> Request:
        """Validates and queues a request. ``prompt_text`` records the text of a prompt
        that the caller already tokenized (passed as ids)."""
        text, ids = self.validate_request(request_id, prompt, params, priority, lora_request)
        return self.enqueue(
            request_id, text or prompt_text, ids, params, priority, arrival_time, lora_request
        )

    def enqueue(
        self,
        request_id: str,
        text: str | None,
        ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> Request:
        """Adds a request that ``validate_request`` already accepted."""
        seed = params.seed32 if params.seed is not None else self._rng.getrandbits(32)
        max_out = self._max_tokens(params, len(ids))
        lora_id = self._lora_id(lora_request)
        req = Request(request_id, text, ids, params, seed, max_out, priority, arrival_time, lora_id)
        if self.lora is not None:
            self.lora.hold(lora_id)
            req.lora_salt = self.lora.salt(lora_id)
        self.requests[request_id] = req
        self.scheduler.add_request(req)
        self.stats.num_requests += 1
        return req

    def _max_tokens(self, params: SamplingParams, prompt_len: int) -> int:
        """max_tokens (0: score the prompt only), or all the room the model leaves
        after the prompt."""
        if params.max_tokens is not None:
            return params.max_tokens
        return self.max_model_len - prompt_len

    def _detok(self, seq: Sequence) -> SequenceDetokenizer | None:
        if self.tokenizer is None:
            return None
        detok = self._detoks.get(seq.seq_id)
        if detok is None:
            p = seq.request.params
            detok = self._detoks[seq.seq_id] = SequenceDetokenizer(
                self.tokenizer,
                seq.request.prompt_token_ids,
                p.stop,
                p.include_stop_str_in_output,
                p.skip_special_tokens,
            )
        return detok

    def abort_request(self, request_id: str, only: Request | None = None) -> bool:
        """Stops a request now and frees its pages; its final output says 'abort'.

        With ``only``, aborts nothing unless the id still names that very request
        (a finished request's id may have been reused by a new one).
        """
        req = self.requests.get(request_id)
        if req is None or (only is not None and req is not only):
            return False
        self.scheduler.abort_request(req)
        self._touched[request_id] = req
        self.stats.num_aborted += 1
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self._inflight is not None

    # -- the step -----------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedules and dispatches one step, then collects the previous step's tokens.

        A step that raises fails only the requests it held (see ``_recover``): their
        final outputs say "abort" and ``step_errors`` holds the error for each.
        """
        self.step_errors = {}
        try:
            outputs = self._step()
        except Exception as e:
            return self._recover(e)
        self._failed_steps = 0
        return outputs

    def _step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        so = self.scheduler.schedule() if self.scheduler.has_work else None
        if self.lora is not None:
            self._fail_adapter_requests()
        handle = None
        progressed = self._inflight is not None
        if so is not None and not so.empty:
            plan = self.runner.prepare(so)
            if plan.constrained:
                # Their grammars' next masks need the tokens still in flight: collect that
                # step first (planning above still overlapped it), then fill the masks.
                self._collect_inflight()
                self._fill_bitmask(plan)
            handle = self.runner.dispatch(plan)
            self.stats.record_step(so.num_tokens)
        progressed = progressed or handle is not None
        self._collect_inflight()
        if handle is not None:
            if self._async:
                self._inflight = (so, handle)
            else:
                self._process(so, handle)
        # A step may legitimately plan nothing (e.g. right after a preemption),
        # but never several in a row: that would be a hang, so fail loudly.
        self._idle_steps = 0 if progressed or not self.scheduler.has_work else self._idle_steps + 1
        if self._idle_steps > 3:
            raise RuntimeError(
                f"scheduler made no progress with {len(self.scheduler.waiting)} waiting and "
                f"{len(self.scheduler.running)} running requests"
            )
        self.stats.preemptions = self.scheduler.num_preemptions
        self.stats.step_time = time.perf_counter() - t0
        return self._collect_outputs()

    def _recover(self, error: Exception) -> list[RequestOutput]:
        """After a step raised: fails the requests it held and starts the device afresh.

        Every running request shares the failed step's device state (the KV pages,
        the page table, the samples the next step reads), so each is aborted, as is
        every request the step had touched; waiting requests hold none and are kept
        (preempted ones recompute). The runner's device state and the page pool
        (whose cached prefixes pointed into the lost pages) are made new, so the
        next requests start clean. Raises EngineDeadError when the runner cannot be
        reset or steps keep failing.
        """
        self._failed_steps += 1
        if not self.runner.can_reset or self._failed_steps > MAX_FAILED_STEPS:
            raise EngineDeadError(
                f"engine step failed ({type(error).__name__}: {error}) and the engine "
                "cannot recover"
            ) from error
        logger.error("engine step failed; failing the requests in it", exc_info=error)
        # The traceback's frames hold the old device buffers: let them go first.
        traceback.clear_frames(error.__traceback__)
        self._inflight = None
        victims = dict(self._touched)
        for seq in self.scheduler.running:
            victims[seq.request.request_id] = seq.request
        if not victims:  # nothing ran: the waiting requests are what could not be planned
            for seq in self.scheduler.waiting:
                victims[seq.request.request_id] = seq.request
        for req in victims.values():
            self.scheduler.abort_request(req)  # frees its pages; a no-op once finished
        self._touched.clear()
        self.runner.reset()
        if self.lora is not None:
            self.lora.reset_device()
        self.pool = PagePool(self.num_pages, self.ecfg.page_size, self.ecfg.enable_prefix_caching)
        self.scheduler.pool = self.pool
        self._idle_steps = 0
        failed = EngineStepError(
            f"an engine step failed while serving this request ({type(error).__name__}: "
            f"{error}); the engine was reset and serves on, so retrying may succeed"
        )
        failed.__cause__ = error
        outputs = []
        for rid, req in victims.items():
            comps = []
            for seq in req.seqs:
                self._detoks.pop(seq.seq_id, None)
                self.structured.release(seq.seq_id)
                comps.append(CompletionOutput(seq.index, "", [], finish_reason="abort"))
            outputs.append(RequestOutput(rid, req.prompt, req.prompt_token_ids, comps, True))
            self.step_errors[rid] = failed
            if self.requests.get(rid) is req:
                self._forget(req)
            self.stats.num_aborted += 1
        self.stats.update_gauges(self.scheduler, self.pool)
        return outputs

    def _process(self, so: SchedulerOutput, handle: StepHandle) -> None:
        res = self.runner.fetch(handle)
        if "expert_tokens" in res.stats:
            self.stats.record_experts(res.stats["expert_tokens"])
        if res.logprobs is not None:  # (a step scoring prompt positions returns them)
            for e in so.entries:  # before update: a sample there may end the sequence
                if e.prompt_targets:
                    self._record_prompt_logprobs(e, res)
        for upd in self.scheduler.update(so, res.tokens, res.drafts):
            req = upd.seq.request
            kept = self._find_stop_string(upd)
            spec = req.params.structured_outputs
            if spec is not None and self.structured.advance(
                upd.seq.seq_id, spec, upd.tokens[:kept]
            ):
                self.scheduler.finish(upd.seq, "stop")  # the grammar is complete
            if req.params.logprobs is not None:
                self._record_logprobs(upd, res, kept)
            self.stats.generation_tokens += kept
            self._touched[req.request_id] = req

    def _collect_inflight(self) -> None:
        if self._inflight is not None:
            self._process(*self._inflight)
            self._inflight = None

    def _fill_bitmask(self, plan: StepPlan) -> None:
        """The bitmask of the plan's grammar-constrained rows, from their grammars' state
        after every token so far; rows of sequences that ended meanwhile (their samples are
        dropped) stay unconstrained."""
        live = [t for t in plan.constrained if self.scheduler.sequence(t[1]) is not None]
        plan.bitmask = self.structured.fill(plan.shape[1], live)

    def _find_stop_string(self, upd: SeqUpdate) -> int:
        """Feeds the new tokens to the detokenizer; a completed stop string ends the
        sequence, dropping any tokens after it. Returns how many new tokens stay."""
        seq = upd.seq
        detok = self._detok(seq)
        if detok is None:
            return len(upd.tokens)
        p = seq.request.params
        n_out = len(seq.token_ids) - len(upd.tokens) - seq.num_prompt_tokens
        for i, token in enumerate(upd.tokens):
            n_out += 1
            stop = detok.append(token, n_out >= p.min_tokens)
            if stop is not None:
                keep = len(seq.token_ids) - len(upd.tokens) + i + 1
                self.scheduler.finish(seq, "stop", stop, num_tokens=keep)
                return i + 1
        return len(upd.tokens)

    def _record_logprobs(self, upd: SeqUpdate, res: StepResult, kept: int) -> None:
        seq = upd.seq
        k = seq.request.params.logprobs or 0
        for row, token in zip(upd.rows[:kept], upd.tokens[:kept], strict=True):
            lp = float(res.logprobs[row])
            seq.logprobs.append(
                logprobs.logprob_entry(
                    token,
                    lp,
                    int(res.ranks[row]),
                    res.top_ids[row],
                    res.top_logprobs[row],
                    k,
                    self._decode_one,
                )
            )
            seq.cumulative_logprob += lp

    def _record_prompt_logprobs(self, e: ScheduledEntry, res: StepResult) -> None:
        seq = self.scheduler.sequence(e.seq_id)
        if seq is None:  # aborted while the step was in flight
            return
        req = seq.request
        logprobs.record_prompt(
            req,
            e.prompt_first,
            e.prompt_targets,
            e.prompt_row,
            res.logprobs,
            res.ranks,
            res.top_ids,
            res.top_logprobs,
            self._decode_one,
        )
        if len(req.prompt_logprobs or ()) == len(req.prompt_token_ids):
            self._touched[req.request_id] = req

    def _fail_adapter_requests(self) -> None:
        """Requests whose adapter could not be read again when they were to run: they end
        ("abort") with the error; the others go on."""
        for req, error in self.scheduler.take_adapter_errors():
            failed = EngineStepError(
                f"LoRA adapter of this request could not be loaded to run it: {error}"
            )
            failed.__cause__ = error
            self.step_errors[req.request_id] = failed
            self._touched[req.request_id] = req
            self.stats.num_aborted += 1

    def _forget(self, req: Request) -> None:
        """A finished request leaves the engine."""
        del self.requests[req.request_id]
        if self.lora is not None:
            self.lora.unhold(req.lora_id)

    def _decode_one(self, token: int) -> str | None:
        return self.tokenizer.decode([token], skip_special_tokens=False) if self.tokenizer else None

    # -- outputs --------------------------------------------------------------

    def _collect_outputs(self) -> list[RequestOutput]:
        outputs = []
        for rid, req in self._touched.items():
            comps = []
            for seq in req.seqs:
                new_ids = seq.token_ids[seq.num_prompt_tokens + seq.num_emitted_tokens :]
                first = seq.num_emitted_tokens
                seq.num_emitted_tokens += len(new_ids)
                detok = self._detok(seq)
                text = detok.take_delta(seq.finished) if detok is not None else ""
                if seq.finished:
                    self._detoks.pop(seq.seq_id, None)
                    self.structured.release(seq.seq_id)
                comps.append(
                    CompletionOutput(
                        index=seq.index,
                        text=text,
                        token_ids=new_ids,
                        cumulative_logprob=(
                            seq.cumulative_logprob if req.params.logprobs is not None else None
                        ),
                        logprobs=(
                            seq.logprobs[first:] if req.params.logprobs is not None else None
                        ),
                        finish_reason=seq.finish_reason,
                        stop_reason=seq.stop_reason,
                    )
                )
            finished = req.finished
            outputs.append(
                RequestOutput(
                    request_id=rid,
                    prompt=req.prompt,
                    prompt_token_ids=req.prompt_token_ids,
                    outputs=comps,
                    finished=finished,
                    num_cached_tokens=req.num_cached_tokens,
                    prompt_logprobs=logprobs.take_prompt_logprobs(req),
                )
            )
            if finished:
                self._forget(req)
                self.stats.num_finished += 1
        self._touched.clear()
        self.stats.update_gauges(self.scheduler, self.pool)
        return outputs

    def describe(self) -> str:
        """Start-up summary: placement, memory per device, and the KV pool."""
        first = jax.devices()[0] if self.model.mesh is None else self.model.mesh.devices.flat[0]
        param_dev = sum(
            shard.data.nbytes
            for x in jax.tree_util.tree_leaves(self.model.params)
            for shard in x.addressable_shards
            if shard.device == first
        )
        where = "1 device" if self.model.mesh is None else describe_mesh(self.model.mesh)
        tp = 1 if self.model.mesh is None else self.model.mesh.shape["model"]
        kv_dev = self.num_pages * _page_bytes_per_device(self.model, self.cfg, self.ecfg.page_size)
        if self._proposer is not None:  # its pool, with as many pages
            kv_dev += self.num_pages * _page_bytes_per_device(
                self.model, self._proposer.cfg, self.ecfg.page_size
            )
        experts = expert_placement(self.cfg, self.model.mesh)
        return (
            f"{self.cfg.name or self.model.path}: {self.cfg.num_params() / 1e6:.1f}M params on "
            f"{where}; parameters {_size(param_dev)} per device (tp={tp}, "
            f"{describe_format(self.cfg.quant, self.model.dtype)}), KV pool "
            f"{self.num_pages} pages x {self.ecfg.page_size} tokens = {_size(kv_dev)} per "
            f"device ({describe_kv(self.cfg, self.model.dtype)}), {self.max_model_len} max "
            "tokens/sequence" + (f"; {experts}" if experts else "")
        )

    def get_stats(self) -> EngineStats:
        return dataclasses.replace(self.stats)

    def get_metrics(self) -> dict[str, float]:
        """Every counter and gauge of ``get_stats`` by its ``jserve_`` name."""
        return self.stats.as_metrics()

    def is_idle(self) -> bool:
        """No requests, nothing in flight, and every page free."""
        return not self.requests and self._inflight is None and self.pool.num_used == 0
