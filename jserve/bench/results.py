"""Writing benchmark results (JSON) and optional plots (PNG)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from typing import Any

import jax
import numpy as np

from jserve.errors import ConfigError


def add_result_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("results")
    g.add_argument("--save-result", action="store_true", help="write the result as JSON")
    g.add_argument("--result-dir", default=".", help="where --save-result writes")
    g.add_argument("--result-filename", default=None, help="JSON file name (implies --save-result)")
    g.add_argument("--plot-dir", default=None, help="write PNG plots here (needs matplotlib)")
    g.add_argument(
        "--metric-percentiles", default="50,90,99", help="comma-separated percentiles to report"
    )
    g.add_argument("--disable-tqdm", action="store_true")


def percentiles_from_args(args: argparse.Namespace) -> tuple[float, ...]:
    try:
        ps = tuple(float(p) for p in args.metric_percentiles.split(",") if p.strip())
    except ValueError:
        raise ConfigError(
            f"--metric-percentiles must be numbers, got {args.metric_percentiles!r}"
        ) from None
    if not ps or any(not 0 < p < 100 for p in ps):
        raise ConfigError("--metric-percentiles must be numbers in (0, 100)")
    return ps


def environment() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": getattr(dev, "device_kind", str(dev)),
        "num_devices": jax.device_count(),
        "platform": jax.default_backend(),
        "jax_version": jax.__version__,
        "python": sys.version.split()[0],
        "host": platform.machine(),
    }


def save_result(args: argparse.Namespace, mode: str, result: dict[str, Any]) -> str | None:
    if not (args.save_result or args.result_filename):
        return None
    name = args.result_filename or (
        f"bench-{mode}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    )
    path = name if os.path.isabs(name) else os.path.join(args.result_dir, name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=float)
    print(f"result written to {path}")
    return path


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot-dir needs matplotlib: pip install 'jserve[plot]'") from None
    return plt


def plot_cdfs(plot_dir: str, series: dict[str, list[float]], title: str) -> str:
    """One panel per latency (values in seconds), as empirical CDFs in milliseconds."""
    plt = _pyplot()
    os.makedirs(plot_dir, exist_ok=True)
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], series.items(), strict=True):
        v = np.sort(np.asarray(values, np.float64) * 1000.0)
        if len(v):
            ax.plot(v, np.arange(1, len(v) + 1) / len(v))
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(plot_dir, "latency_cdf.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput(plot_dir: str, token_times: list[float], start: float, title: str) -> str:
    """Output tokens per second over the run, in one-second bins."""
    plt = _pyplot()
    os.makedirs(plot_dir, exist_ok=True)
    t = np.asarray(token_times, np.float64) - start
    bins = np.arange(0, max(1.0, float(t.max()) if len(t) else 1.0) + 1.0, 1.0)
    counts, edges = np.histogram(t, bins=bins)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.step(edges[:-1], counts, where="post")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("output tokens / s")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(plot_dir, "throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
