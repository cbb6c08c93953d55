"""Soak: thousands of mixed requests with random cancels and hostile calls mixed in
(client ids that collide or look like the server's, Tokenize floods, clients that
disconnect), ended by a shutdown whose second signal aborts the open streams;
nothing leaks.

Run on purpose: pytest tests/server/test_soak.py -m slow -s
(JSERVE_SOAK_REQUESTS / JSERVE_SOAK_SECONDS change its size.)
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import random
import time

import grpc
import jax
import pytest

from jserve.engine.async_engine import AsyncLLMEngine
from jserve.server.client import Client, decode_request, generate_request
from jserve.server.proto import generation_pb2 as pb
from jserve.server.servicers import SHUTDOWN_ABORT_MESSAGE
from tests.engine.helpers import make_engine
from tests.server.helpers import metric, scrape, serving, wait_until_free

REQUESTS = int(os.environ.get("JSERVE_SOAK_REQUESTS", "8000"))
SECONDS = float(os.environ.get("JSERVE_SOAK_SECONDS", "420"))
WORKERS = 48
ROUNDS = 8
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
COMPILE_MIB = 4  # generous RSS per compiled step executable of the tiny model (~3 measured)
# Per-request objects of the server, the engine and gRPC that must not pile up.
WATCHED_TYPES = (
    "RequestRecorder", "Job", "Request", "Sequence", "RequestOutput",
    "_Stream", "Task", "UnaryStreamCall", "AioRpcError",
)  # fmt: skip
WORDS = [
    "First",
    "Citizen",
    "All",
    "Speak",
    "resolved",
    "famish",
    "hear",
    "me",
    "before",
    "we",
    "proceed",
    "any",
    "further",
]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# Client ids that several workers use at once (only one runs at a time; the rest are
# refused), and ids of the server's own form (which must never trouble its requests).
SHARED_IDS = ["shared-0", "shared-1", "shared-2"]
SERVER_LIKE_IDS = [f"gen-{i:032x}" for i in range(4)] + [f"js-{i:032x}" for i in range(4)]


def random_request(rng: random.Random, vocab: int) -> tuple[str, object, str]:
    """(api, request, what the client will do: run / cancel / deadline / invalid /
    collide / disconnect / tokenize)."""
    action = rng.choices(
        ["run", "cancel", "deadline", "invalid", "collide", "disconnect", "tokenize"],
        [60, 13, 6, 7, 6, 4, 4],
    )[0]
    if action == "tokenize":  # a flood of large Tokenize calls, some past the cap
        size = rng.choice([1_000, 8_000, 16_000, 20_000])
        return "tokenize", pb.TokenizeRequest(text=("All: " * size)[:size]), action
    if rng.random() < 0.5:
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(1, 40)))
    else:
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 60))]
    long = action in ("cancel", "deadline", "disconnect")
    max_tokens = rng.randint(100, 300) if long else rng.randint(1, 48)
    if rng.random() < 0.3 and action != "collide":
        req = decode_request(prompt, max_tokens=max_tokens, num_samples=rng.choice([0, 1, 2]))
        if action == "invalid":
            req.max_tokens = -rng.randint(1, 5)
        return "jetstream", req, action
    n = rng.choice([1, 1, 2] if long else [1, 1, 1, 2, 3])
    kw = dict(max_tokens=max_tokens, ignore_eos=rng.random() < 0.7, n=n)
    if rng.random() < 0.5:
        kw.update(temperature=rng.choice([0.0, 0.7, 1.0]), top_p=rng.choice([1.0, 0.9]))
        kw.update(top_k=rng.choice([-1, 5, 50]), seed=rng.randrange(2**32))
    if rng.random() < 0.2:
        kw["logprobs"] = rng.randint(0, 5)
    if rng.random() < 0.2:
        kw["repetition_penalty"] = 1.2
    if rng.random() < 0.1 and isinstance(prompt, str):
        kw["stop"] = [rng.choice(WORDS)[:3]]
    if action == "invalid":
        kw.update(rng.choice([dict(top_p=2.0), dict(temperature=-1.0), dict(n=0), dict(top_k=0)]))
    if action == "collide":
        kw["request_id"] = rng.choice(SHARED_IDS + SERVER_LIKE_IDS)
    elif rng.random() < 0.1:  # an id of the server's form, unique to this call
        kw["request_id"] = f"gen-{rng.getrandbits(128):032x}"
    return "generation", generate_request(prompt, **kw), action


async def _shutdown_with_second_signal(h, c) -> None:
    """Open streams, a drain (first signal), then a forced stop (second signal): every
    stream ends at once with FINISH_REASON_ABORT and usage, then jserve's UNAVAILABLE."""
    calls = [
        c.generation.Generate(generate_request("All:", max_tokens=400, ignore_eos=True))
        for _ in range(6)
    ]
    for call in calls:
        await call.read()  # running
    drain = asyncio.create_task(h.stop(grace=60))
    await asyncio.sleep(0.2)
    assert not drain.done()
    await h.force_stop()
    for call in calls:
        msgs = []
        with pytest.raises(grpc.aio.AioRpcError) as e:
            while (msg := await call.read()) is not grpc.aio.EOF:
                msgs.append(msg)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert e.value.details() == SHUTDOWN_ABORT_MESSAGE
        assert msgs and msgs[-1].finish_reason == pb.FINISH_REASON_ABORT
        assert msgs[-1].HasField("usage")
    await drain


@pytest.mark.slow
@pytest.mark.timeout(int(SECONDS) + 300)
def test_soak(tok_model_dir: str) -> None:
    engine = make_engine(
        # A pool small enough that full batches preempt each other.
        tok_model_dir,
        page_size=4,
        num_pages=256,
        max_num_seqs=16,
        max_num_batched_tokens=128,
    )
    aeng = AsyncLLMEngine(engine)
    vocab = engine.cfg.vocab_size
    counts: collections.Counter[str] = collections.Counter()
    unexpected: list[str] = []

    async def one(c, rng: random.Random, target: str) -> None:
        api, req, action = random_request(rng, vocab)
        if api == "tokenize":
            try:
                await c.generation.Tokenize(req, timeout=60)
                code = None
            except grpc.aio.AioRpcError as e:
                code = e.code()
            expected = {None, grpc.StatusCode.INVALID_ARGUMENT}  # past the cap: refused
            counts[f"{api}:{action}:{code.name if code else 'OK'}"] += 1
            if code not in expected:
                unexpected.append(f"{api} {action}: {code}")
            return
        own = Client(target) if action == "disconnect" else None  # a client that goes away
        stub_of = own or c
        stub = stub_of.generation.Generate if api == "generation" else stub_of.jetstream.Decode
        timeout = rng.uniform(0.05, 0.5) if action == "deadline" else 60
        call = stub(req, timeout=timeout)
        stop_after = rng.randint(0, 8)
        n = 0
        try:
            async for msg in call:
                n += 1
                if action == "cancel" and n > stop_after:
                    call.cancel()
                    break
                if action == "disconnect" and n > stop_after:
                    assert own is not None
                    await own.channel.close()  # the connection drops mid-stream
                    own = None
                if api == "generation" and msg.HasField("usage"):
                    assert msg.usage.completion_tokens > 0
            code = grpc.StatusCode.CANCELLED if action == "cancel" and n > stop_after else None
        except grpc.aio.AioRpcError as e:
            code = e.code()
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
        finally:
            if own is not None:
                await own.close()
        expected = {
            "run": {None},
            "cancel": {None, grpc.StatusCode.CANCELLED},
            "deadline": {None, grpc.StatusCode.DEADLINE_EXCEEDED},
            "invalid": {grpc.StatusCode.INVALID_ARGUMENT},
            # Another call under the same client id is running: refused, never anything else.
            "collide": {None, grpc.StatusCode.INVALID_ARGUMENT},
            "disconnect": {None, grpc.StatusCode.CANCELLED},
        }[action]
        counts[f"{api}:{action}:{code.name if code else 'OK'}"] += 1
        if code not in expected:
            unexpected.append(f"{api} {action}: {code}")

    compiles = 0

    def on_event(event: str, duration: float, **kw: object) -> None:
        nonlocal compiles
        if event == COMPILE_EVENT:
            compiles += 1

    checkpoints: list[dict[str, float]] = []

    def checkpoint(done: int) -> None:
        gc.collect()
        live = collections.Counter(type(o).__name__ for o in gc.get_objects())
        checkpoints.append(
            dict(done=done, rss=rss_mib(), compiles=compiles)
            | {name: live[name] for name in WATCHED_TYPES}
        )

    async def main():
        async with serving(aeng, metrics_port=0) as (h, c):
            t0 = time.monotonic()
            done = 0
            for r in range(ROUNDS):  # rounds end idle, so memory is compared like for like
                target = REQUESTS * (r + 1) // ROUNDS

                async def worker(seed: int, target: int = target) -> None:
                    nonlocal done
                    rng = random.Random(seed)
                    while done < target and time.monotonic() - t0 < SECONDS:
                        done += 1
                        await one(c, rng, f"127.0.0.1:{h.port}")

                await asyncio.gather(*(worker(r * WORKERS + i) for i in range(WORKERS)))
                await wait_until_free(aeng, timeout=10)
                # Collected gRPC calls finish their cleanup on the loop: let them, so the
                # client's leftovers do not blur the counts.
                gc.collect()
                await asyncio.sleep(0.1)
                assert not h.core.active and not aeng._streams
                assert h.core._tokenizer_pool._work_queue.empty()  # no tokenizer jobs left
                checkpoint(done)
            elapsed = time.monotonic() - t0
            text = scrape(h.metrics_port)
            await _shutdown_with_second_signal(h, c)
        return done, elapsed, text

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        done, elapsed, text = asyncio.run(main())
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
        aeng.shutdown()
    stats = engine.get_stats()
    total_metric = sum(
        metric(text, "jserve_requests_total", api=api, outcome=o)
        for api in ("generation", "jetstream")
        for o in ("stopped", "length", "aborted", "cancelled", "invalid", "rejected", "error")
    )
    # Memory from the second checkpoint on: new step shapes still get compiled
    # now and then (each compiled executable stays cached), so growth is
    # judged net of COMPILE_MIB per compile.
    first, last = checkpoints[1], checkpoints[-1]
    new_compiles = last["compiles"] - first["compiles"]
    growth = last["rss"] - first["rss"]
    unexplained = growth - COMPILE_MIB * new_compiles
    print(
        f"\nsoak: {done} requests in {elapsed:.0f}s ({done / elapsed:.1f}/s), "
        f"{stats.generation_tokens} tokens generated, {stats.preemptions} preemptions, "
        f"{stats.num_aborted} aborted in the engine\n"
        f"outcomes: {dict(sorted(counts.items()))}\nunexpected: {unexpected[:20]}\n"
        f"checkpoints: {checkpoints}\n"
        f"RSS {first['rss']:.0f} -> {last['rss']:.0f} MiB (+{growth:.0f}) with {new_compiles} "
        f"new compiles; unexplained {unexplained:.0f} MiB"
    )
    assert not unexpected
    assert engine.pool.num_used == 0 and not engine.requests
    assert metric(text, "jserve_requests_total", api="generation", outcome="error") == 0
    assert metric(text, "jserve_requests_total", api="jetstream", outcome="error") == 0
    # Every RPC that reached the servicer is counted once; a cancel or deadline
    # can end an RPC before it does.
    answered = sum(v for k, v in counts.items() if k.endswith((":OK", ":INVALID_ARGUMENT")))
    assert answered <= total_metric <= done
    for name in WATCHED_TYPES:  # nothing per-request survives the request
        assert last[name] <= first[name] + 8, (name, first[name], last[name])
    assert unexplained < 48, f"RSS grew {unexplained:.0f} MiB beyond new compiles"
