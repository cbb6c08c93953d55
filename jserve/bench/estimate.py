"""``jserve bench estimate``: what the real compiler says a step costs on a
TPU slice (or an H100) that is not attached.

For each step bucket the engine compiles (tokens, rows), the step is
compiled for the target (jserve.aot) and reported beside a roofline:

  * the compiler's cost model: flops and bytes accessed (every operation's
    operands and results, so more than the weights and KV alone), the time
    those counts take at the chip's peak rates, and its own
    ``optimal_seconds`` where it gives a positive one (libtpu 0.0.42 gives a
    negative value for the whole step, i.e. none);
  * the roofline: per device, the weights plus the KV cache the batch reads
    (every row's sequence at ``--context`` tokens) over the chip's HBM
    bandwidth, against 2 flops per weight per token over its peak bf16
    flop rate; the step takes at least the larger of the two;
  * the decode upper bound implied: rows / step time tokens per second.

These are compile-time estimates, not measurements.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import jax
import numpy as np

from jserve.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a preset name (e.g. llama3-8b)")
    p.add_argument("--target", required=True, help="v5e-8, v6e-4, v6e-8, v5p-8, tpu7x-8, h100, ...")
    p.add_argument(
        "--tp", type=int, default=None, help="tensor-parallel size (default: all devices)"
    )
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="tokens each row's sequence holds (default: max-model-len)",
    )
    p.add_argument(
        "--buckets",
        default=None,
        help="comma-separated TOKENSxROWS, e.g. 64x64,512x64 (default: all)",
    )
    p.add_argument("--json", default=None, help="write the table as JSON here")
    p.set_defaults(func=run)


def roofline(runner: Any, shape: tuple[int, int], context: int, hbm: float, peak: float) -> dict:
    from jserve.aot import device_bytes

    tokens, rows = shape
    weights = jax.tree_util.tree_leaves(runner.params)
    weight_bytes = sum(device_bytes(x) for x in weights)
    num_params = sum(int(np.prod(x.shape)) for x in weights)
    page_bytes = device_bytes(runner.kv_pages[0]) * len(runner.kv_pages) // runner.num_pages
    pages_read = min(runner.num_pages, rows * math.ceil(context / runner.ecfg.page_size))
    kv_bytes = pages_read * page_bytes
    devices = runner.target_mesh.devices.size
    flops = 2 * num_params * tokens / devices
    t_mem = (weight_bytes + kv_bytes) / hbm
    t_flops = flops / peak
    step = max(t_mem, t_flops)
    return {
        "weight_bytes_per_device": weight_bytes,
        "kv_bytes_read_per_device": kv_bytes,
        "roofline_seconds": step,
        "bound": "memory" if t_mem >= t_flops else "compute",
        "decode_tokens_per_second_bound": rows / step,
    }


def _chip(target: str) -> tuple[float, float]:
    """(HBM bytes/s, peak bf16 flop/s) of one device: the published figures."""
    from pallas_kernels import targets

    if target in targets.TPU_TARGETS:
        t = targets.TPU_TARGETS[target]
        return t.hbm_bandwidth, t.peak_bf16_flops
    return targets.H100_HBM_BANDWIDTH, targets.H100_PEAK_BF16_FLOPS


def run(args: argparse.Namespace) -> int:
    from jserve.aot import build_runner, compile_step, target_devices

    try:
        n = len(target_devices(args.target))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except ImportError as e:
        raise ConfigError(
            f"compiling for {args.target} needs its compiler: pip install -e '.[aot]' ({e})"
        ) from None
    tp = args.tp or n
    runner = build_runner(
        args.config,
        args.target,
        tp=tp,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    shapes = runner.shapes.step_shapes()
    if args.buckets:
        try:
            wanted = [tuple(int(v) for v in b.split("x")) for b in args.buckets.split(",")]
        except ValueError:
            raise ConfigError(f"--buckets takes TOKENSxROWS,..., got {args.buckets!r}") from None
        bad = [b for b in wanted if b not in shapes]
        if bad:
            raise ConfigError(f"buckets {bad} are not step shapes; the shapes are {shapes}")
        shapes = wanted
    hbm, peak = _chip(args.target)
    context = args.context or args.max_model_len
    rows_out = []
    print(f"{args.config} on {args.target}, tp {tp}: compile-time estimates, not measurements")
    print(
        f"{'bucket':>10} {'compile s':>9} {'XLA GFLOP':>9} {'XLA GB':>8} {'XLA ms':>8} "
        f"{'XLA opt ms':>10} {'roofline ms':>11} {'bound':>7} {'decode tok/s <=':>15}"
    )
    for shape in shapes:
        rep = compile_step(args.config, args.target, shape=shape, runner=runner)
        line = {
            "bucket": f"{shape[0]}x{shape[1]}",
            "compile_seconds": rep.compile_seconds,
            "xla_flops": rep.flops,
            "xla_bytes_accessed": rep.bytes_accessed,
            "xla_optimal_seconds": rep.optimal_seconds,
            "temp_bytes": rep.temp_bytes,
            "collectives": rep.collectives,
            **roofline(runner, shape, context, hbm, peak),
        }
        counts = max((rep.bytes_accessed or 0) / hbm, (rep.flops or 0) / peak)
        line["xla_counts_seconds"] = counts if rep.flops else None
        rows_out.append(line)
        est = rep.optimal_seconds
        est_s = f"{est * 1e3:10.3f}" if est is not None and est > 0 else f"{'n/a':>10}"
        flops = f"{rep.flops / 1e9:9.1f}" if rep.flops else f"{'n/a':>9}"
        read = f"{rep.bytes_accessed / 1e9:8.2f}" if rep.bytes_accessed else f"{'n/a':>8}"
        at_peak = f"{counts * 1e3:8.3f}" if rep.flops else f"{'n/a':>8}"
        print(
            f"{line['bucket']:>10} {rep.compile_seconds:9.1f} {flops} {read} {at_peak} {est_s} "
            f"{line['roofline_seconds'] * 1e3:11.3f} {line['bound']:>7} "
            f"{line['decode_tokens_per_second_bound']:15.0f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"config": args.config, "target": args.target, "tp": tp, "rows": rows_out},
                f,
                indent=1,
            )
    return 0
