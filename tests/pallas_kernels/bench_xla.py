"""Per-layer timings of the plain-XLA attention path on this machine.

Not a test (pytest collects only test_*.py): run it by hand, e.g.
  python -m tests.pallas_kernels.bench_xla --repeats 5
  python -m tests.pallas_kernels.bench_xla --case decode16 --block-kv 32

Shapes default to the 27M demo Llama (8 q heads, 4 KV heads, head_dim 64,
page 16, f32). Each case is one ragged batch built by batches.make_batch
(shuffled pages, NaN in every unused slot); the attention runs --iters times
in one jitted lax.fori_loop whose carry feeds the output back as the next
query, and the median of --repeats such loops, divided by --iters, is the
per-call (per-layer) time. The "dense" column is jax.nn.dot_product_attention
(implementation "xla") over the same shapes in a contiguous cache, timed the
same way: a floor for what gathering pages costs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import pallas_kernels
from tests.pallas_kernels.batches import make_batch

# name: (seqs as (q_len, kv_len), padding tokens, padding sequence slots)
CASES = {
    "decode1_pad16": ([(1, 150)], 15, 15),
    "decode16": ([(1, 150)] * 16, 0, 0),
    "prefill8x64": ([(64, 64)] * 8, 0, 8),
    "prefill1x512": ([(512, 512)], 0, 15),
    "mixed12+116": ([(1, 150)] * 12 + [(116, 116)], 0, 3),
}


def _time(fn, q, consts, iters: int, repeats: int) -> float:
    @jax.jit
    def loop(q, consts):
        return jax.lax.fori_loop(0, iters, lambda _, x: fn(x, consts), q)

    jax.block_until_ready(loop(q, consts))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(q, consts))
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def _dense(seqs, q_heads: int, kv_heads: int, d: int, dtype):
    b, (q_len, kv_len) = len(seqs), seqs[0]
    key = jax.random.PRNGKey(0)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, q_len, q_heads, d), dtype)
    k = jax.random.normal(kk, (b, kv_len, kv_heads, d), dtype)
    v = jax.random.normal(kv, (b, kv_len, kv_heads, d), dtype)

    def fn(x, c):
        k, v = c
        return jax.nn.dot_product_attention(
            x, k, v, is_causal=q_len > 1, scale=d**-0.5, implementation="xla"
        )

    return fn, q, (k, v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--case", choices=("all", *CASES), default="all")
    p.add_argument("--block-kv", type=int, default=None, help="keys per step (default: tuned)")
    p.add_argument("--num-q-heads", type=int, default=8)
    p.add_argument("--num-kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-dense", action="store_true")
    args = p.parse_args()
    dtype = jnp.dtype(args.dtype)
    hq, hkv, d = args.num_q_heads, args.num_kv_heads, args.head_dim
    print(
        f"jax {jax.__version__} {jax.default_backend()}, {hq}q/{hkv}kv heads, d {d}, "
        f"page {args.page_size}, {args.dtype}, block_kv {args.block_kv or 'default'}"
    )
    print(f"{'case':<15} {'tokens':>6} {'xla ms':>8} {'dense ms':>9}")
    for name, (seqs, pad_tokens, pad_seqs) in CASES.items():
        if args.case not in ("all", name):
            continue
        b = make_batch(
            seqs,
            num_q_heads=hq,
            num_kv_heads=hkv,
            head_dim=d,
            page_size=args.page_size,
            dtype=dtype,
            extra_tokens=pad_tokens,
            extra_seqs=pad_seqs,
            extra_pages=0,
        )

        def fn(x, c):
            return pallas_kernels.ragged_paged_attention(
                x, *c, sm_scale=d**-0.5, backend="xla", block_kv=args.block_kv
            )

        ms = 1e3 * _time(fn, b.q, b.args()[1:], args.iters, args.repeats)
        dense = float("nan")
        if not args.no_dense and len(set(seqs)) == 1:
            dfn, dq, dc = _dense(seqs, hq, hkv, d, dtype)
            dense = 1e3 * _time(dfn, dq, dc, args.iters, args.repeats)
        print(f"{name:<15} {b.q.shape[0]:>6} {ms:>8.3f} {dense:>9.3f}", flush=True)


if __name__ == "__main__":
    main()
