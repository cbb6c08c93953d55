"""Prometheus metrics of one server, in its own registry, served on a separate HTTP port.

Request metrics (``jserve_requests_total{api,outcome}``, latency histograms)
are recorded by the servicers as requests go. Engine metrics (queue, running
requests, KV pages, prefix cache, preemptions, generated tokens) are read from
``AsyncLLMEngine.get_stats()`` at scrape time, so they are always current and
cost nothing between scrapes.

Outcomes: ``stopped`` (EOS, stop token or stop string), ``length`` (max_tokens
or the model's length), ``aborted`` (stopped by the server, e.g. shutdown),
``cancelled`` (the client cancelled or its deadline expired), ``invalid`` (bad
input, or a request too large to ever fit in the KV pool), ``rejected`` (queue
full, server not ready or shutting down), ``error`` (engine failure or a bug).
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jserve.outputs import RequestOutput

logger = logging.getLogger(__name__)

APIS = ("generation", "jetstream")
OUTCOMES = ("stopped", "length", "aborted", "cancelled", "invalid", "rejected", "error")
COMPLETED = frozenset({"stopped", "length", "aborted"})

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
_TPOT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip


class EngineCollector(Collector):
    """Engine counters and gauges, read at scrape time."""

    def __init__(self, aengine: Any) -> None:
        self.aengine = aengine

    def collect(self) -> Iterator[Any]:
        s = self.aengine.get_stats()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"jserve_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"jserve_{name}", doc, value=value)

        yield gauge(
            "engine_up", "1 while the engine's step loop is alive", 0 if self.aengine.dead else 1
        )
        yield gauge("num_requests_running", "Requests being computed", s.num_running)
        yield gauge("num_requests_waiting", "Requests queued, not yet running", s.num_waiting)
        yield gauge("kv_pages_used", "KV cache pages held by requests", s.pages_used)
        yield gauge("kv_pages_cached", "Free KV pages that hold reusable prefixes", s.pages_cached)
        yield gauge("kv_pages_total", "KV cache pages in the pool", s.num_pages)
        yield gauge(
            "kv_cache_usage_ratio",
            "Fraction of KV pages held by requests",
            s.pages_used / s.num_pages if s.num_pages else 0.0,
        )
        yield gauge(
            "prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache / prompt tokens looked up, since start",
            s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0,
        )
        yield counter(
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            s.prefix_cache_queries,
        )
        yield counter(
            "prefix_cache_hits", "Prompt tokens found in the prefix cache", s.prefix_cache_hits
        )
        yield counter("preemptions", "Sequences preempted to free KV pages", s.preemptions)
        yield counter("generation_tokens", "Tokens generated", s.generation_tokens)
        yield counter("engine_steps", "Engine steps run", s.num_steps)
        yield counter(
            "scheduled_tokens", "Tokens computed (prompt chunks and decodes)", s.scheduled_tokens
        )
        yield gauge("engine_step_seconds", "Host time of the last engine step", s.step_time)
        yield counter(
            "spec_decode_num_drafts",
            "Speculative decoding: sequence-steps that verified proposed tokens",
            s.spec_decode_num_drafts,
        )
        yield counter(
            "spec_decode_num_draft_tokens",
            "Speculative decoding: tokens proposed",
            s.spec_decode_num_draft_tokens,
        )
        yield counter(
            "spec_decode_num_accepted_tokens",
            "Speculative decoding: proposed tokens the target accepted",
            s.spec_decode_num_accepted_tokens,
        )
        yield gauge(
            "spec_decode_mean_accepted_length",
            "Speculative decoding: tokens per speculating sequence-step, 1 + accepted / drafts",
            s.spec_decode_mean_accepted_length,
        )
        if s.lora_running_requests is not None:  # serving LoRA adapters (jserve.lora)
            yield gauge("lora_adapters_host", "LoRA adapters in host memory", s.lora_adapters_host)
            yield gauge(
                "lora_adapters_device", "LoRA adapters in device slots", s.lora_adapters_device
            )
            yield counter("lora_loads", "LoRA adapters written into a device slot", s.lora_loads)
            yield counter(
                "lora_evictions",
                "LoRA adapters that replaced another in a device slot",
                s.lora_evictions,
            )
            running = GaugeMetricFamily(
                "jserve_lora_running_requests",
                "Running requests per LoRA adapter",
                labels=["adapter"],
            )
            for name, n in sorted(s.lora_running_requests.items()):
                running.add_metric([name], n)
            yield running
        if s.expert_tokens is not None:  # mixture-of-experts models
            experts = CounterMetricFamily(
                "jserve_expert_tokens",
                "Tokens routed to each expert, summed over the expert layers",
                labels=["expert"],
            )
            for x, n in enumerate(s.expert_tokens.sum(axis=0).tolist()):
                experts.add_metric([str(x)], n)
            yield experts
            yield gauge(
                "expert_load_imbalance",
                "Busiest expert's tokens / mean tokens per expert, worst layer, since start",
                s.expert_load_imbalance(),
            )


class ServerMetrics:
    def __init__(self, aengine: Any, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "jserve_requests",
            "Generation requests by API and outcome",
            ["api", "outcome"],
            registry=r,
        )
        for api in APIS:
            for outcome in OUTCOMES:
                self.requests.labels(api, outcome)
        self.ttft = Histogram(
            "jserve_time_to_first_token_seconds",
            "From request arrival to its first token",
            ["api"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "jserve_time_per_output_token_seconds",
            "Mean time between a request's tokens after the first",
            ["api"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "jserve_e2e_request_latency_seconds",
            "From arrival to the last token of completed requests",
            ["api"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "jserve_prompt_tokens", "Prompt tokens of admitted requests", registry=r
        )
        self.in_flight = Gauge(
            "jserve_requests_in_flight", "Generation RPCs currently open", registry=r
        )
        self.auth_failures = Counter(
            "jserve_auth_failures", "Calls refused for a missing or wrong token", registry=r
        )
        r.register(EngineCollector(aengine))

    def recorder(self, api: str) -> RequestRecorder:
        return RequestRecorder(self, api)


class RequestRecorder:
    """Timing and outcome of one generation RPC."""

    def __init__(self, metrics: ServerMetrics, api: str) -> None:
        self.m = metrics
        self.api = api
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens: collections.Counter[int] = collections.Counter()
        self.admitted = False
        self.done = False
        metrics.in_flight.inc()

    def observe(self, out: RequestOutput) -> None:
        if not self.admitted:
            self.admitted = True
            self.m.prompt_tokens.inc(len(out.prompt_token_ids))
        new = 0
        for c in out.outputs:
            self.tokens[c.index] += len(c.token_ids)
            new += len(c.token_ids)
        if new:
            now = time.perf_counter()
            if self.first is None:
                self.first = now
                self.m.ttft.labels(self.api).observe(now - self.t0)
            self.last = now

    def finish(self, outcome: str) -> None:
        if self.done:
            return
        self.done = True
        self.m.in_flight.dec()
        self.m.requests.labels(self.api, outcome).inc()
        if outcome not in COMPLETED or self.first is None or self.last is None:
            return
        self.m.e2e.labels(self.api).observe(self.last - self.t0)
        steps = max(self.tokens.values())
        if steps > 1:
            self.m.tpot.labels(self.api).observe((self.last - self.first) / (steps - 1))


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsHTTPServer:
    """Serves a registry's metrics at any path over plain HTTP on its own thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        server_cls = _ThreadingServer
        if ":" in host:  # an IPv6 literal

            class _V6(_ThreadingServer):
                address_family = socket.AF_INET6

            server_cls = _V6
        self.httpd = make_server(
            host, port, make_wsgi_app(registry), server_cls, handler_class=_QuietHandler
        )
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="jserve-metrics", daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
