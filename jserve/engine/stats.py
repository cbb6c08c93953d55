"""Engine counters and gauges, read by the server's metrics exporter."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class EngineStats:
    num_pages: int = 0
    # Gauges (current values).
    num_running: int = 0
    num_waiting: int = 0
    pages_used: int = 0
    pages_free: int = 0
    pages_cached: int = 0
    step_time: float = 0.0  # seconds the last step() call took on the host
    tokens_last_step: int = 0
    # Counters (only grow).
    num_requests: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    num_steps: int = 0
    preemptions: int = 0
    scheduled_tokens: int = 0  # tokens computed (prompt chunks + decodes)
    generation_tokens: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # of which found in the cache
    # Mixture-of-experts models: real tokens each expert took, per expert layer,
    # i64[layers, experts], summed over steps; None for a dense model.
    expert_tokens: np.ndarray | None = None
    # Speculative decoding (jserve.spec.stats): sequence-steps with proposals, tokens
    # proposed, and of those accepted.
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    # Multi-LoRA (jserve.lora): adapters in host memory and in device slots (gauges),
    # adapters written into a slot and of those the ones that replaced another
    # (counters), and running requests per adapter name (None without LoRA).
    lora_adapters_host: int = 0
    lora_adapters_device: int = 0
    lora_loads: int = 0
    lora_evictions: int = 0
    lora_running_requests: dict[str, int] | None = None

    @property
    def spec_decode_mean_accepted_length(self) -> float:
        """Tokens per speculating sequence-step: 1 + accepted / drafts (0 before any)."""
        n = self.spec_decode_num_drafts
        return 1.0 + self.spec_decode_num_accepted_tokens / n if n else 0.0

    def as_metrics(self) -> dict[str, float]:
        """Every field by its ``jserve_`` name, with the derived speculation figure."""
        out: dict[str, float] = {
            f"jserve_{k}": v
            for k, v in dataclasses.asdict(self).items()
            if isinstance(v, int | float)  # not the per-expert array
        }
        out["jserve_spec_decode_mean_accepted_length"] = self.spec_decode_mean_accepted_length
        for name, n in (self.lora_running_requests or {}).items():
            label = name.replace("\\", "\\\\").replace('"', '\\"')
            out[f'jserve_lora_running_requests{{adapter="{label}"}}'] = n
        return out

    def record_step(self, num_tokens: int) -> None:
        self.num_steps += 1
        self.tokens_last_step = num_tokens
        self.scheduled_tokens += num_tokens

    def record_experts(self, counts: np.ndarray) -> None:
        """Adds one step's tokens per expert (i32[layers, experts])."""
        # A new array each time: copies handed out by get_stats stay as they were.
        prev = self.expert_tokens if self.expert_tokens is not None else 0
        self.expert_tokens = prev + counts.astype(np.int64)

    def expert_load_imbalance(self) -> float:
        """The busiest expert's tokens over the mean, worst layer, since start (1.0 is
        perfectly even; 0.0 before any tokens)."""
        t = self.expert_tokens
        if t is None or not t.any():
            return 0.0
        mean = t.mean(axis=1)
        return float(np.max(t.max(axis=1) / np.where(mean > 0, mean, 1)))

    def update_gauges(self, scheduler: Any, pool: Any) -> None:
        self.num_running = len(scheduler.running)
        self.num_waiting = len(scheduler.waiting)
        self.pages_used = pool.num_used
        self.pages_free = pool.num_free
        self.pages_cached = pool.num_cached
        self.prefix_cache_queries = pool.query_tokens
        self.prefix_cache_hits = pool.hit_tokens
        lora = getattr(scheduler, "adapters", None)
        if lora is not None:
            self.lora_adapters_host = len(lora.host)
            self.lora_adapters_device = len(lora.slot_of)
            self.lora_loads = lora.num_loads
            self.lora_evictions = lora.num_evictions
            running = dict.fromkeys((r.lora_name for r in lora.known.values()), 0)
            names = {rid: r.lora_name for rid, r in lora.known.items()}
            for req in {id(s.request): s.request for s in scheduler.running}.values():
                if req.lora_id:
                    running[names[req.lora_id]] += 1
            self.lora_running_requests = running
        spec = getattr(scheduler, "speculator", None)
        if spec is not None:
            self.spec_decode_num_drafts = spec.stats.num_drafts
            self.spec_decode_num_draft_tokens = spec.stats.num_draft_tokens
            self.spec_decode_num_accepted_tokens = spec.stats.num_accepted_tokens
