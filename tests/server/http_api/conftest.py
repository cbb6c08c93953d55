"""One ``jserve serve`` process for every test of this package (the tiny random Llama
with a real tokenizer; its chat template sits in tokenizer_config.json)."""

from __future__ import annotations

import json
import os
import shutil

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from tests.server.http_api.common import MODEL, TEMPLATE
from tests.server.openai_process import ENGINE_ARGS, ServeProcess


@pytest.fixture(scope="package")
def model_dir(tok_model_dir: str, tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("openai") / "model")
    shutil.copytree(tok_model_dir, d)
    path = os.path.join(d, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = TEMPLATE
    with open(path, "w") as f:
        json.dump(cfg, f)
    return d


@pytest.fixture(scope="package")
def tok(model_dir: str) -> Tokenizer:
    return Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))


@pytest.fixture(scope="package")
def server(model_dir: str, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("openai-log") / "server.log")
    args = ["--model", model_dir, "--served-model-name", MODEL, *ENGINE_ARGS]
    proc = ServeProcess(log, [*args, "--max-request-bytes", "65536"]).start()
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="package")
def client(server: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def http(server: ServeProcess):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
