"""Offline generation API in the style of vLLM's ``LLM``."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jserve.errors import InvalidRequestError
from jserve.model_loader import LoadedModel, load_model
from jserve.models import llama
from jserve.models.attention import AttentionMetadata
from jserve.outputs import CompletionOutput, Logprob, RequestOutput
from jserve.sampling_params import SamplingParams
from jserve.tokenizer import Tokenizer

PromptType = str | Sequence[int]


def normalize_prompts(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """A single prompt (text or token ids) or a list of them -> a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int | np.integer) for p in prompts):
        return [prompts]
    return prompts


def tokenize_prompt(
    prompt: PromptType, tokenizer: Tokenizer | None, vocab_size: int
) -> tuple[str | None, list[int]]:
    """Returns (text or None, token ids), raising InvalidRequestError on bad input."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt is empty; give at least one character or token")
        if tokenizer is None:
            raise InvalidRequestError(
                "this model has no tokenizer.json, so prompts must be lists of token ids"
            )
        ids = tokenizer.encode(prompt)
        if not ids:
            raise InvalidRequestError(f"prompt {prompt[:40]!r} tokenized to nothing")
        return prompt, ids
    try:
        ids = [int(t) for t in prompt]
    except (TypeError, ValueError):
        raise InvalidRequestError(
            f"prompt must be a string or a list of token ids, got {type(prompt).__name__}"
        ) from None
    if not ids:
        raise InvalidRequestError("prompt is empty; give at least one token id")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"token id {bad[0]} is outside the vocabulary [0, {vocab_size}) of this model"
        )
    return None, ids


def check_length(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    if num_prompt_tokens + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the "
            f"model's maximum length of {max_model_len} tokens; shorten the prompt or "
            "lower max_tokens"
        )


def default_model_path() -> str:
    return os.path.join(os.path.dirname(__file__), "assets", "shakespeare-llama")


@functools.partial(jax.jit, static_argnames=("cfg", "num_logprobs"), donate_argnames=("pages",))
def _step(params, pages, ids, md, logits_indices, *, cfg, num_logprobs):
    hidden, pages = llama.forward(params, cfg, ids, pages, md)
    logits = llama.compute_logits(params, cfg, hidden[logits_indices])  # [S, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp, max(num_logprobs, 1))
    return pages, tokens, chosen, top_lp, top_ids


class LLM:
    """Loads a model once and generates for batches of prompts.

    >>> llm = LLM()  # the embedded Shakespeare model
    >>> out = llm.generate("ROMEO:", SamplingParams(max_tokens=32, temperature=0))
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        dtype: str = "bfloat16",
        page_size: int = 16,
        max_model_len: int | None = None,
        max_logprobs: int = 20,
    ) -> None:
        self.model: LoadedModel = load_model(model or default_model_path(), dtype)
        self.cfg = self.model.cfg
        self.page_size = page_size
        self.max_model_len = min(
            max_model_len or self.cfg.max_position_embeddings, self.cfg.max_position_embeddings
        )
        self.max_logprobs = max_logprobs

    def get_tokenizer(self) -> Tokenizer | None:
        return self.model.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        del use_tqdm
        sp = sampling_params or SamplingParams()
        sp.validate(self.max_logprobs)
        if not sp.greedy:
            raise InvalidRequestError("only greedy sampling (temperature=0) is available")
        max_tokens = sp.max_tokens or self.max_model_len
        reqs = []
        for prompt in normalize_prompts(prompts):
            text, ids = tokenize_prompt(prompt, self.model.tokenizer, self.cfg.vocab_size)
            check_length(len(ids), 0 if sp.max_tokens is None else max_tokens, self.max_model_len)
            reqs.append((text, ids))
        results = self._run_greedy([ids for _, ids in reqs], sp, max_tokens)
        outputs = []
        for i, ((text, ids), (toks, lps, reason)) in enumerate(zip(reqs, results, strict=True)):
            tok = self.model.tokenizer
            out_text = tok.decode(toks, sp.skip_special_tokens) if tok else ""
            comp = CompletionOutput(0, out_text, toks, finish_reason=reason)
            if sp.logprobs is not None:
                comp.logprobs = lps
                comp.cumulative_logprob = float(
                    sum(d[t].logprob for d, t in zip(lps, toks, strict=True))
                )
            outputs.append(RequestOutput(str(i), text, ids, [comp], finished=True))
        return outputs

    def _run_greedy(
        self, prompts: list[list[int]], sp: SamplingParams, max_tokens: int
    ) -> list[tuple[list[int], list[dict[int, Logprob]], str]]:
        cfg, s = self.cfg, self.page_size
        n = len(prompts)
        lens = [len(p) for p in prompts]
        pps = -(-min(max(lens) + max_tokens, self.max_model_len) // s)
        pages = [
            jnp.zeros((n * pps, s, 2 * cfg.num_kv_heads, cfg.head_dim), self.model.dtype)
            for _ in range(cfg.num_layers)
        ]
        page_indices = np.arange(n * pps, dtype=np.int32).reshape(n, pps)
        eos = set() if sp.ignore_eos else set(cfg.eos_token_ids)
        stop_ids = set(sp.stop_token_ids)
        k = sp.logprobs or 0
        seqs = [list(p) for p in prompts]
        gen: list[list[int]] = [[] for _ in prompts]
        lps: list[list[dict[int, Logprob]]] = [[] for _ in prompts]
        reasons: list[str | None] = [None] * n
        todo = [(i, seqs[i]) for i in range(n)]  # (seq, tokens to feed this step)
        while todo:
            ids, pos, slots, cu, kv_lens, rows = [], [], [], [0], [], []
            for i, feed in todo:
                start = len(seqs[i]) - len(feed)
                for j, t in enumerate(feed):
                    p = start + j
                    ids.append(t)
                    pos.append(p)
                    slots.append(int(page_indices[i, p // s]) * s + p % s)
                cu.append(len(ids))
                kv_lens.append(len(seqs[i]))
                rows.append(i)
            t_pad = -(-len(ids) // 16) * 16
            pad = t_pad - len(ids)
            md = AttentionMetadata(
                positions=jnp.asarray(pos + [0] * pad, jnp.int32),
                slot_mapping=jnp.asarray(slots + [-1] * pad, jnp.int32),
                kv_lens=jnp.asarray(kv_lens, jnp.int32),
                page_indices=jnp.asarray(page_indices[rows]),
                cu_q_lens=jnp.asarray(cu, jnp.int32),
                num_seqs=jnp.asarray([len(rows)], jnp.int32),
            )
            last = jnp.asarray(cu[1:], jnp.int32) - 1
            pages, toks, chosen, top_lp, top_ids = _step(
                self.model.params,
                pages,
                jnp.asarray(ids + [0] * pad, jnp.int32),
                md,
                last,
                cfg=cfg,
                num_logprobs=k,
            )
            toks, chosen = np.asarray(toks), np.asarray(chosen)
            top_lp, top_ids = np.asarray(top_lp), np.asarray(top_ids)
            todo = []
            for r, i in enumerate(rows):
                t = int(toks[r])
                gen[i].append(t)
                seqs[i].append(t)
                if sp.logprobs is not None:
                    d = {t: Logprob(float(chosen[r]))}
                    for rank in range(k):
                        d.setdefault(
                            int(top_ids[r, rank]), Logprob(float(top_lp[r, rank]), rank + 1)
                        )
                    lps[i].append(d)
                if (t in eos or t in stop_ids) and len(gen[i]) >= sp.min_tokens:
                    reasons[i] = "stop"
                elif len(gen[i]) >= max_tokens or len(seqs[i]) >= self.max_model_len:
                    reasons[i] = "length"
                else:
                    todo.append((i, [t]))
        return [(gen[i], lps[i], reasons[i] or "length") for i in range(n)]
