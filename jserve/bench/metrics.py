"""Serving metrics, defined as vLLM's ``bench serve`` defines them.

- TTFT: time from sending a request to receiving its first token.
- TPOT: (end-to-end latency - TTFT) / (output tokens - 1): the mean time per
  output token after the first, per request (requests with one token are
  left out).
- ITL: the time between consecutive streamed chunks of one request, pooled
  over all requests.
- E2EL: time from sending a request to receiving its last token.
- Goodput: completed requests per second that met every given SLO.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jserve.errors import ConfigError

SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclasses.dataclass
class RequestRecord:
    prompt_len: int
    start: float  # seconds, when the request was sent
    chunk_times: list[float] = dataclasses.field(default_factory=list)  # arrival of each chunk
    chunk_tokens: list[int] = dataclasses.field(default_factory=list)  # tokens in each chunk
    success: bool = False
    error: str = ""

    @property
    def output_len(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2el(self) -> float:
        return self.chunk_times[-1] - self.start

    @property
    def tpot(self) -> float | None:
        n = self.output_len
        return (self.e2el - self.ttft) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        return list(np.diff(self.chunk_times)) if len(self.chunk_times) > 1 else []


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 0.5, "tpot": 0.05} (seconds).

    Raises ConfigError for anything else.
    """
    usage = f"--goodput takes KEY:MILLISECONDS with KEY in {', '.join(SLO_KEYS)}"
    slos: dict[str, float] = {}
    for item in items or []:
        key, _, value = item.partition(":")
        if key not in SLO_KEYS:
            raise ConfigError(f"{usage}, got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ConfigError(f"{usage}, got {item!r}") from None
        if not (math.isfinite(ms) and ms > 0):
            raise ConfigError(f"--goodput {key} must be a positive number of ms, got {value!r}")
        slos[key] = ms / 1000.0
    return slos


def _stats(name: str, values_s: list[float], percentiles: tuple[float, ...]) -> dict[str, float]:
    v = np.asarray(values_s, np.float64) * 1000.0 if values_s else np.zeros(1)
    out = {
        f"mean_{name}_ms": float(v.mean()),
        f"median_{name}_ms": float(np.median(v)),
        f"std_{name}_ms": float(v.std()),
    }
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(v, p))
    return out


def summarize(
    records: list[RequestRecord],
    duration: float,
    percentiles: tuple[float, ...] = (50, 90, 99),
    slos: dict[str, float] | None = None,
) -> dict:
    ok = [r for r in records if r.success and r.chunk_times]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_len for r in ok)
    result: dict = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    if slos:
        good = 0
        for r in ok:
            tpot = r.tpot if r.tpot is not None else 0.0
            values = {"ttft": r.ttft, "tpot": tpot, "e2el": r.e2el}
            good += all(values[k] <= limit for k, limit in slos.items())
        result["request_goodput"] = good / duration
        result["goodput_slos_ms"] = {k: v * 1000 for k, v in slos.items()}
    result.update(_stats("ttft", [r.ttft for r in ok], percentiles))
    result.update(_stats("tpot", [r.tpot for r in ok if r.tpot is not None], percentiles))
    result.update(_stats("itl", [x for r in ok for x in r.itls], percentiles))
    result.update(_stats("e2el", [r.e2el for r in ok], percentiles))
    result["input_lens"] = [r.prompt_len for r in records]
    result["output_lens"] = [r.output_len for r in records]
    result["ttfts"] = [r.ttft if r.chunk_times else None for r in records]
    result["itls"] = [r.itls for r in records]
    result["errors"] = [r.error for r in records]
    return result


def print_serving_summary(result: dict, percentiles: tuple[float, ...]) -> None:
    line = "=" * 50
    print(line)
    print(f"{' Serving Benchmark Result ':=^50}")

    def row(label: str, value: object, fmt: str = "") -> None:
        print(f"{label:<40}{value:>10{fmt}}")

    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    row("Benchmark duration (s):", result["duration"], ".2f")
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"], ".2f")
    if "request_goodput" in result:
        row("Request goodput (req/s):", result["request_goodput"], ".2f")
    row("Output token throughput (tok/s):", result["output_throughput"], ".2f")
    row("Total token throughput (tok/s):", result["total_token_throughput"], ".2f")
    for name, title in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st token)"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        print(f"{' ' + title + ' ':-^50}")
        row(f"Mean {name.upper()} (ms):", result[f"mean_{name}_ms"], ".2f")
        row(f"Median {name.upper()} (ms):", result[f"median_{name}_ms"], ".2f")
        for p in percentiles:
            if p != 50:  # the median is printed above
                row(f"P{p:g} {name.upper()} (ms):", result[f"p{p:g}_{name}_ms"], ".2f")
    print(line)
