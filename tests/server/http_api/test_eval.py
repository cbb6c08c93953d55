"""lm-evaluation-harness and echo with logprobs against the OpenAI API of a real
``jserve serve`` process: the prompt's own logprobs equal a full forward of the model
(transformers), as lm-eval's loglikelihood requests need."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from tests.server.http_api.common import (
    MODEL,
    PROMPT,
    error_of,
)
from tests.server.openai_process import ServeProcess

pytestmark = pytest.mark.timeout(300)


# -- lm-evaluation-harness --------------------------------------------------------

LM_EVAL_DATA = [
    {"q": "First Citizen:", "a": "Speak", "choices": ["Speak, speak.", "Resolved."], "label": 0},
    {"q": "All:", "a": "Resolved", "choices": ["Resolved.", "Before we proceed"], "label": 1},
]


def lm_eval_task(tmp_path, output_type: str) -> str:
    """A local lm-eval task over LM_EVAL_DATA (no download)."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in LM_EVAL_DATA))
    name = f"jserve_tiny_{output_type}"
    lines = [
        f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
        f"    test: {data}", "test_split: test", f"output_type: {output_type}",
        'doc_to_text: "{{q}}"',
    ]  # fmt: skip
    if output_type == "generate_until":
        lines += ['doc_to_target: "{{a}}"', "generation_kwargs:", '  until: ["\\n\\n"]',
                  "  max_gen_toks: 8", "metric_list:", "  - metric: exact_match"]  # fmt: skip
    else:
        lines += ['doc_to_choice: "{{choices}}"', 'doc_to_target: "{{label}}"', "metric_list:",
                  "  - metric: acc"]  # fmt: skip
    (tmp_path / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return name


def run_lm_eval(server: ServeProcess, tmp_path, monkeypatch, output_type: str) -> list:
    """lm-eval's ``local-completions`` model on a local task; each sample's responses."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional test dependency")
    pytest.importorskip("tenacity", reason="lm-eval's API models need tenacity")
    from lm_eval.tasks import TaskManager

    task = lm_eval_task(tmp_path, output_type)
    res = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{server.url}/v1/completions",
            "model": MODEL,
            "tokenizer_backend": "remote",
            "max_retries": 1,
        },
        tasks=[task],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    return [s["resps"] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.timeout(180)
def test_lm_eval_generates_through_the_api(
    server: ServeProcess, client: openai.OpenAI, tmp_path, monkeypatch
) -> None:
    resps = run_lm_eval(server, tmp_path, monkeypatch, "generate_until")
    for doc, resp in zip(LM_EVAL_DATA, resps, strict=True):
        want = client.completions.create(
            model=MODEL, prompt=doc["q"], max_tokens=8, temperature=0,
            stop=["\n\n", "<|endoftext|>"], seed=1234,
        )  # fmt: skip
        assert resp == [[want.choices[0].text]]


# -- echo with logprobs: the prompt's own logprobs ------------------------------


def hf_prompt_logprobs(model_dir: str, ids: list[int]):
    """[L-1] logprobs of prompt tokens 1.. and [L-1] most likely ids, from transformers."""
    import numpy as np

    from tests.hf_models import hf_logits

    logits = hf_logits(model_dir, ids).astype(np.float64)  # [L, V]
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    return [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))], logp[:-1].argmax(-1)


def test_echo_logprobs_equal_a_full_forward(
    client: openai.OpenAI, model_dir: str, tok: Tokenizer
) -> None:
    """lm-eval's loglikelihood request: echo, logprobs=1, max_tokens=0."""
    ids = tok.encode("First Citizen: Before we proceed any further, hear me speak.").ids
    want, top1 = hf_prompt_logprobs(model_dir, ids)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    (c,) = r.choices
    lp = c.logprobs
    assert c.text == tok.decode(ids, skip_special_tokens=False) and c.finish_reason == "length"
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for j, top in enumerate(lp.top_logprobs[1:]):
        assert tok.decode([int(top1[j])], skip_special_tokens=False) in top
        assert len(top) <= 2  # the prompt token and the most likely one
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 0)
    # With max_tokens=1 (what lm-eval sends) the generated token follows the prompt's.
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, echo=True, logprobs=1,
                                  temperature=0)  # fmt: skip
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-4)
    # Streamed: the prompt's logprobs open the first chunk.
    chunks = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=2, echo=True,
                                            logprobs=1, stream=True))  # fmt: skip
    streamed = [x for ch in chunks for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1 : len(ids)] == pytest.approx(want, abs=1e-4)
    assert len(streamed) == len(ids) + 2
    # Two prompts at once, echo without logprobs and max_tokens=0: the prompts back.
    r = client.completions.create(model=MODEL, prompt=["All:", PROMPT], max_tokens=0, echo=True)
    assert [ch.text for ch in r.choices] == ["All:", PROMPT] and r.usage.completion_tokens == 0


def test_max_tokens_0_without_echo_is_refused(http: httpx.Client) -> None:
    err = error_of(http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0}), 400)
    assert err["param"] == "max_tokens"


@pytest.mark.timeout(180)
def test_lm_eval_loglikelihood_equals_a_full_forward(
    server: ServeProcess, model_dir: str, tok: Tokenizer, tmp_path, monkeypatch
) -> None:
    resps = run_lm_eval(server, tmp_path, monkeypatch, "multiple_choice")
    for doc, resp in zip(LM_EVAL_DATA, resps, strict=True):
        context = tok.encode(doc["q"]).ids
        for choice, ((ll, _greedy),) in zip(doc["choices"], resp, strict=True):
            # lm-eval scores " " + choice after the context, tokenized on their own.
            cont = tok.encode(" " + choice).ids
            want, _ = hf_prompt_logprobs(model_dir, context + cont)
            assert ll == pytest.approx(sum(want[len(context) - 1 :]), abs=1e-3)
