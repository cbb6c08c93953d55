"""LoRA adapters through the serving APIs: gRPC Generate's lora_name, GetModelInfo, the
runtime Load/Unload RPCs, and the OpenAI API's vLLM conventions (model = adapter name,
/v1/models, /v1/load_lora_adapter, /v1/unload_lora_adapter), checked against
transformers with each adapter merged into the base weights."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest

from jserve import LoRARequest, SamplingParams
from jserve.engine.async_engine import AsyncLLMEngine
from jserve.server.client import Client, generate_request
from tests.engine.helpers import make_engine
from tests.lora.adapters import ADAPTERS, make_peft_adapter, merged_greedy
from tests.server.helpers import serving, wait_until_free
from tests.server.openai_process import ENGINE_ARGS, ServeProcess

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny"
PROMPT = "First Citizen:"
N = 8  # greedy tokens compared per request
# Small steps: two adapter slots, few sequences, a small token budget.
ENGINE = dict(page_size=4, num_pages=128, max_num_seqs=4, max_num_batched_tokens=32)
GREEDY = dict(max_tokens=N, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tok_model_dir: str, tmp_path_factory):
    """One engine with adapter qv8 registered at start-up (as --lora-modules does) and all4
    on disk for loading at run time; the merged-transformers greedy tokens of each."""
    d = tmp_path_factory.mktemp("lora-serving")
    paths = {
        name: make_peft_adapter(tok_model_dir, str(d / name), seed=i + 1, **ADAPTERS[name])
        for i, name in enumerate(("qv8", "all4"))
    }
    engine = make_engine(tok_model_dir, **ENGINE, enable_lora=True, max_loras=2, max_lora_rank=8)
    engine.add_lora(LoRARequest("qv8", 1, paths["qv8"]))
    ids = engine.tokenizer.encode(PROMPT)
    refs = {
        name: _greedy(tok_model_dir, paths.get(name) if name else None, ids)
        for name in (None, "qv8", "all4")
    }
    assert len({tuple(r) for r in refs.values()}) == 3, refs  # the adapters change the output
    aengine = AsyncLLMEngine(engine)
    yield aengine, paths, ids, refs
    aengine.shutdown()


def _greedy(base: str, adapter: str | None, ids: list[int]) -> list[int]:
    out = merged_greedy(base, adapter, ids, N)
    assert len(out) == N, "transformers stopped at EOS; pick another prompt or seed"
    return out


def _code(e: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    return e.code(), e.details() or ""


async def _rpc_error(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return _code(info.value)


def _names(info) -> list[tuple[str, int, str]]:
    return [(a.name, a.id, a.path) for a in info.lora_adapters]


@contextlib.asynccontextmanager
async def serving_both(
    aengine: AsyncLLMEngine, allow_runtime_lora_updating: bool = True
) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """A server with both APIs (runtime LoRA updates on unless asked otherwise): its gRPC
    client and an HTTP client."""
    async with (
        serving(
            aengine,
            model_name=MODEL,
            allow_runtime_lora_updating=allow_runtime_lora_updating,
            http_port=0,
        ) as (h, c),
        httpx.AsyncClient(base_url=h.http_url, timeout=60) as http,
    ):
        yield c, http


def test_grpc_generate_runs_each_adapter_and_the_base_in_one_server(setup) -> None:
    aengine, paths, ids, refs = setup

    async def main():
        async with serving(aengine, model_name=MODEL, allow_runtime_lora_updating=True) as (_, c):
            info = await c.model_info()
            assert info.lora_enabled and _names(info) == [("qv8", 1, paths["qv8"])]
            base, lora, base_again = await asyncio.gather(
                c.generate(ids, **GREEDY),
                c.generate(ids, lora_name="qv8", **GREEDY),
                c.generate(ids, lora_name="", **GREEDY),  # empty: the base model
            )
            assert base.token_ids == [refs[None]] == base_again.token_ids
            assert lora.token_ids == [refs["qv8"]]

            before = aengine.engine.stats.num_requests
            code, details = await _rpc_error(c.generate(ids, lora_name="nope", **GREEDY))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "unknown LoRA adapter 'nope'" in details and "qv8" in details
            assert aengine.engine.stats.num_requests == before  # nothing was queued

    asyncio.run(main())


def test_grpc_load_generate_unload_at_run_time(setup) -> None:
    aengine, paths, ids, refs = setup

    async def main():
        async with serving(aengine, model_name=MODEL, allow_runtime_lora_updating=True) as (_, c):
            missing = os.path.join(os.path.dirname(paths["all4"]), "missing")
            code, details = await _rpc_error(c.load_lora_adapter("bad", missing))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and missing in details
            code, _ = await _rpc_error(c.load_lora_adapter(MODEL, paths["all4"]))
            assert code == grpc.StatusCode.INVALID_ARGUMENT  # the base model's name
            assert [r.lora_name for r in aengine.loras] == ["qv8"]  # nothing registered

            added = await c.load_lora_adapter("all4", paths["all4"])
            assert (added.name, added.id, added.path) == ("all4", 2, paths["all4"])
            code, details = await _rpc_error(c.load_lora_adapter("all4", paths["all4"]))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "already loaded" in details
            assert [a.name for a in (await c.model_info()).lora_adapters] == ["qv8", "all4"]
            r = await c.generate(ids, lora_name="all4", **GREEDY)
            assert r.token_ids == [refs["all4"]]

            removed = await c.unload_lora_adapter("all4")
            assert (removed.name, removed.id) == ("all4", 2)
            assert _names(await c.model_info()) == [("qv8", 1, paths["qv8"])]
            code, _ = await _rpc_error(c.generate(ids, lora_name="all4", **GREEDY))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            code, details = await _rpc_error(c.unload_lora_adapter("all4"))
            assert code == grpc.StatusCode.NOT_FOUND and "unknown LoRA adapter" in details

            again = await c.load_lora_adapter("all4", paths["all4"])
            assert again.id == 3  # ids are never reused
            r = await c.generate(ids, lora_name="all4", **GREEDY)
            assert r.token_ids == [refs["all4"]]
            await c.unload_lora_adapter("all4")

    asyncio.run(main())


def test_unloading_an_adapter_in_use_is_refused(setup) -> None:
    aengine, _, ids, _ = setup

    async def main():
        async with serving_both(aengine) as (c, http):
            req = generate_request(ids, lora_name="qv8", max_tokens=200, ignore_eos=True)
            call = c.generation.Generate(req)
            await call.read()  # running now
            code, details = await _rpc_error(c.unload_lora_adapter("qv8"))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "unfinished" in details
            r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "qv8"})
            assert r.status_code == 409, r.text
            assert r.json()["error"]["code"] == "lora_adapter_in_use"
            call.cancel()
            await wait_until_free(aengine)
            assert [x.lora_name for x in aengine.loras] == ["qv8"]

    asyncio.run(main())


def test_openai_model_names_an_adapter(setup, tmp_path) -> None:
    aengine, paths, ids, refs = setup
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")

    async def main():
        server = serving(
            aengine,
            model_name=MODEL,
            allow_runtime_lora_updating=True,
            http_port=0,
            chat_template=str(template),
        )
        async with (
            server as (h, c),
            httpx.AsyncClient(base_url=h.http_url, timeout=60) as http,
        ):
            models = (await http.get("/v1/models")).json()["data"]
            assert [(m["id"], m["parent"]) for m in models] == [(MODEL, None), ("qv8", MODEL)]
            assert models[1]["root"] == paths["qv8"]
            assert (await http.get("/v1/models/qv8")).json()["id"] == "qv8"

            # The text of the tokens checked against transformers (gRPC gives both).
            body = dict(prompt=ids, max_tokens=N, temperature=0, ignore_eos=True)
            for model, lora in ((MODEL, None), ("qv8", "qv8"), (None, None)):
                want = await c.generate(ids, lora_name=lora or "", **GREEDY)
                assert want.token_ids == [refs[lora]]
                r = await http.post("/v1/completions", json={**body, "model": model})
                assert r.status_code == 200, r.text
                assert r.json()["model"] == (model or MODEL)
                assert r.json()["choices"][0]["text"] == want.text[0]

            # Chat: the same adapter, on the rendered conversation (/tokenize renders it).
            messages = [{"role": "user", "content": PROMPT}]
            r = await http.post("/tokenize", json={"model": "qv8", "messages": messages})
            rendered = r.json()["tokens"]
            chat = dict(messages=messages, max_tokens=N, temperature=0, ignore_eos=True)
            r = await http.post("/v1/chat/completions", json={**chat, "model": "qv8"})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "qv8"
            want = await c.generate(rendered, lora_name="qv8", **GREEDY)
            assert r.json()["choices"][0]["message"]["content"] == want.text[0]

            r = await http.post("/v1/completions", json={**body, "model": "nope"})
            err = r.json()["error"]
            assert r.status_code == 404 and (err["code"], err["param"]) == (
                "model_not_found",
                "model",
            )
            assert "'qv8'" in err["message"] and f"'{MODEL}'" in err["message"]

    asyncio.run(main())


def test_openai_load_and_unload_lora_adapter(setup) -> None:
    aengine, paths, ids, refs = setup

    async def main():
        async with serving_both(aengine) as (c, http):
            missing = os.path.join(os.path.dirname(paths["all4"]), "missing")
            r = await http.post(
                "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": missing}
            )
            assert r.status_code == 400, r.text
            assert missing in r.json()["error"]["message"]
            assert r.json()["error"]["param"] == "lora_path"
            ids_now = [m["id"] for m in (await http.get("/v1/models")).json()["data"]]
            assert ids_now == [MODEL, "qv8"] and [x.lora_name for x in aengine.loras] == ["qv8"]
            r = await http.post("/v1/load_lora_adapter", json={"lora_name": "bad"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"

            r = await http.post(
                "/v1/load_lora_adapter", json={"lora_name": "all4", "lora_path": paths["all4"]}
            )
            assert r.status_code == 200, r.text
            body = dict(prompt=ids, max_tokens=N, temperature=0, ignore_eos=True, model="all4")
            r = await http.post("/v1/completions", json=body)
            want = await c.generate(ids, lora_name="all4", **GREEDY)
            assert want.token_ids == [refs["all4"]]
            assert r.json()["choices"][0]["text"] == want.text[0]
            models = (await http.get("/v1/models")).json()["data"]
            assert [m["id"] for m in models] == [MODEL, "qv8", "all4"]

            r = await http.post(
                "/v1/unload_lora_adapter", json={"lora_name": "all4", "lora_int_id": 999}
            )
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora_int_id"
            r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "all4"})
            assert r.status_code == 200, r.text
            r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "all4"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "lora_adapter_not_found"
            r = await http.post("/v1/completions", json=body)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

    asyncio.run(main())


def test_a_server_without_lora_says_so(tok_model_dir: str, tmp_path) -> None:
    """No LoRA (no --enable-lora): the APIs refuse adapters with a message that says how."""
    aengine = AsyncLLMEngine(make_engine(tok_model_dir, **ENGINE))

    async def main():
        async with (
            serving(
                aengine,
                model_name=MODEL,
                allow_runtime_lora_updating=True,
                http_port=0,
                warmup=False,
            ) as (h, c),
            httpx.AsyncClient(base_url=h.http_url, timeout=60) as http,
        ):
            info = await c.model_info()
            assert not info.lora_enabled and not info.lora_adapters
            code, details = await _rpc_error(c.load_lora_adapter("a", str(tmp_path)))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "--enable-lora" in details
            code, _ = await _rpc_error(c.unload_lora_adapter("a"))
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            r = await http.post(
                "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(tmp_path)}
            )
            assert r.status_code == 400 and "--enable-lora" in r.json()["error"]["message"]

    try:
        asyncio.run(main())
    finally:
        aengine.shutdown()


def test_loading_adapters_needs_the_token(setup) -> None:
    """Loading reads a directory on the server's machine: with a token set, only callers
    holding it may (the token check covers every RPC and route but health)."""
    aengine, paths, _, _ = setup

    async def main():
        async with (
            serving(
                aengine,
                model_name=MODEL,
                allow_runtime_lora_updating=True,
                http_port=0,
                auth_token="s3cret",
            ) as (h, c),
            httpx.AsyncClient(base_url=h.http_url, timeout=60) as http,
        ):
            code, _ = await _rpc_error(c.load_lora_adapter("all4", paths["all4"]))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            body = {"lora_name": "all4", "lora_path": paths["all4"]}
            assert (await http.post("/v1/load_lora_adapter", json=body)).status_code == 401
            assert (await http.post("/v1/unload_lora_adapter", json=body)).status_code == 401
            assert [x.lora_name for x in aengine.loras] == ["qv8"]

    asyncio.run(main())


def test_runtime_loading_is_off_unless_allowed(setup) -> None:
    """Without allow_runtime_lora_updating (--allow-runtime-lora-updating), loads and
    unloads are refused over both APIs and nothing changes."""
    aengine, paths, _, _ = setup

    async def main():
        async with serving_both(aengine, allow_runtime_lora_updating=False) as (c, http):
            code, details = await _rpc_error(c.load_lora_adapter("all4", paths["all4"]))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert "--allow-runtime-lora-updating" in details
            code, _ = await _rpc_error(c.unload_lora_adapter("qv8"))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            body = {"lora_name": "all4", "lora_path": paths["all4"]}
            r = await http.post("/v1/load_lora_adapter", json=body)
            assert r.status_code == 403 and r.json()["error"]["code"] == "lora_runtime_updates_off"
            r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "qv8"})
            assert r.status_code == 403
            assert [x.lora_name for x in aengine.loras] == ["qv8"]
            info = await c.model_info()
            assert [a.name for a in info.lora_adapters] == ["qv8"]

    asyncio.run(main())


def test_async_engine_takes_vllm_lora_requests(setup) -> None:
    """AsyncLLMEngine.generate(lora_request=LoRARequest(...)) registers a new adapter as
    the engine's add_request does; the snapshot and the server's next id follow it."""
    aengine, paths, ids, refs = setup

    async def main():
        params = SamplingParams(**GREEDY)
        req = LoRARequest("direct", 10, paths["all4"])
        tokens: list[int] = []
        async for out in aengine.generate(ids, params, lora_request=req):
            tokens += out.outputs[0].token_ids
        assert tokens == refs["all4"]
        assert [r.lora_name for r in aengine.loras] == ["qv8", "direct"]
        await wait_until_free(aengine)
        assert (await aengine.remove_lora("direct")) == req
        added = await aengine.add_lora("again", paths["all4"])
        assert added.lora_int_id == 11
        await aengine.remove_lora("again")
        assert [r.lora_name for r in aengine.loras] == ["qv8"]

    asyncio.run(main())


def test_loading_past_max_cpu_loras_while_adapters_run(setup) -> None:
    """max_cpu_loras (here 2) adapters in host memory, each used by a running request:
    another load succeeds (the least recently used leaves host memory; the running ones
    keep their device slots) and the running requests complete."""
    aengine, paths, ids, _ = setup

    async def main():
        async with serving(
            aengine, model_name=MODEL, allow_runtime_lora_updating=True, http_port=0
        ) as (_, c):
            await c.load_lora_adapter("all4", paths["all4"])
            calls = [
                c.generation.Generate(
                    generate_request(ids, lora_name=name, max_tokens=24, ignore_eos=True)
                )
                for name in ("qv8", "all4")
            ]
            for call in calls:
                await call.read()  # both running
            await c.load_lora_adapter("more", paths["all4"])
            assert [x.lora_name for x in aengine.loras] == ["qv8", "all4", "more"]
            assert len(aengine.engine.lora.host) <= 2
            for call in calls:
                while await call.read() is not grpc.aio.EOF:  # each runs to its end
                    pass
                assert await call.code() == grpc.StatusCode.OK
            await wait_until_free(aengine)
            await c.unload_lora_adapter("more")
            await c.unload_lora_adapter("all4")

    asyncio.run(main())


def test_serve_lora_modules_are_served_from_start_up(setup, tok_model_dir: str, tmp_path) -> None:
    """``jserve serve --lora-modules name=path``: the adapters are listed from the start
    (no request is run here: neither warm-up compiles anything)."""
    _, paths, _, _ = setup
    args = [
        "--model", tok_model_dir, "--served-model-name", MODEL, *ENGINE_ARGS,
        "--no-server-warmup", "--max-lora-rank", "8", "--max-loras", "2",
        "--lora-modules", f"qv8={paths['qv8']}", f"all4={paths['all4']}",
    ]  # fmt: skip
    proc = ServeProcess(str(tmp_path / "serve.log"), args).start()
    try:
        proc.wait_for(r"LoRA adapters: qv8 \(id 1\), all4 \(id 2\)", 10)
        models = httpx.get(f"{proc.url}/v1/models", timeout=30).json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [
            (MODEL, None),
            ("qv8", MODEL),
            ("all4", MODEL),
        ]

        async def info():
            async with Client(f"127.0.0.1:{proc.grpc_port}") as c:
                return await c.model_info()

        got = asyncio.run(info())
        assert _names(got) == [("qv8", 1, paths["qv8"]), ("all4", 2, paths["all4"])]
    finally:
        assert proc.stop() == 0, proc.log()
