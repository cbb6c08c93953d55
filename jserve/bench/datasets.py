"""Benchmark request sets: random tokens, ShareGPT files, Shakespeare excerpts.

Everything is drawn from one ``numpy.random.Generator`` seeded by ``--seed``,
so a run is reproducible.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np

from jserve.errors import ConfigError
from jserve.tokenizer import Tokenizer

SHAKESPEARE_PATH = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "assets", "tinyshakespeare-heldout.txt"
)


@dataclasses.dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dataset")
    g.add_argument(
        "--dataset-name", default="random", choices=["random", "sharegpt", "shakespeare"]
    )
    g.add_argument("--dataset-path", default=None, help="ShareGPT JSON file, or a text corpus")
    g.add_argument("--num-prompts", type=int, default=100)
    g.add_argument("--random-input-len", type=int, default=128)
    g.add_argument("--random-output-len", type=int, default=64)
    g.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths are uniform in [len * (1 - r), len * (1 + r)]",
    )
    g.add_argument(
        "--random-prefix-len", type=int, default=0, help="random tokens shared by every prompt"
    )
    g.add_argument(
        "--sharegpt-output-len",
        type=int,
        default=None,
        help="override the output length taken from each ShareGPT reply",
    )
    g.add_argument(
        "--shakespeare-input-len", type=int, default=64, help="tokens per Shakespeare prompt"
    )
    g.add_argument("--shakespeare-output-len", type=int, default=64)


def _lengths(rng: np.random.Generator, n: int, length: int, ratio: float) -> np.ndarray:
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"--random-range-ratio must be in [0, 1), got {ratio}")
    low = max(1, int(length * (1 - ratio)))
    high = max(low, int(length * (1 + ratio)))
    return rng.integers(low, high + 1, size=n)


def random_requests(
    rng: np.random.Generator,
    n: int,
    vocab_size: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
) -> list[BenchRequest]:
    """Prompts of random token ids (a shared random prefix, then per-request tokens)."""
    prefix = rng.integers(0, vocab_size, size=prefix_len).tolist()
    in_lens = _lengths(rng, n, input_len, range_ratio)
    out_lens = _lengths(rng, n, output_len, range_ratio)
    out = []
    for i in range(n):
        body = rng.integers(0, vocab_size, size=int(in_lens[i])).tolist()
        out.append(BenchRequest(prefix + body, prefix_len + int(in_lens[i]), int(out_lens[i])))
    return out


def sharegpt_requests(
    rng: np.random.Generator,
    path: str,
    n: int,
    tokenizer: Tokenizer,
    output_len: int | None = None,
    max_prompt_len: int = 1024,
    max_total_len: int = 2048,
) -> list[BenchRequest]:
    """First human turn as the prompt, the reply's token count as the output length."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read ShareGPT file {path}: {e}") from None
    convs = [
        d["conversations"]
        for d in data
        if isinstance(d, dict) and len(d.get("conversations", [])) >= 2
    ]
    order = rng.permutation(len(convs))
    out: list[BenchRequest] = []
    for i in order:
        prompt, reply = convs[i][0].get("value", ""), convs[i][1].get("value", "")
        p_len = len(tokenizer.encode(prompt))
        o_len = output_len if output_len is not None else len(tokenizer.encode(reply))
        # Skip the degenerate and the too long, as vLLM's ShareGPT sampler does.
        if p_len < 4 or o_len < 4 or p_len > max_prompt_len or p_len + o_len > max_total_len:
            continue
        out.append(BenchRequest(prompt, p_len, o_len))
        if len(out) == n:
            return out
    raise ConfigError(f"{path} holds only {len(out)} usable conversations; {n} were asked for")


def shakespeare_requests(
    rng: np.random.Generator,
    n: int,
    tokenizer: Tokenizer,
    input_len: int,
    output_len: int,
    path: str | None = None,
) -> list[BenchRequest]:
    """Prompts cut from Shakespeare's text at line starts, about input_len tokens each."""
    path = path or SHAKESPEARE_PATH
    if not os.path.isfile(path):
        raise ConfigError(f"Shakespeare corpus {path} not found; pass --dataset-path")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    out = []
    for _ in range(n):
        start = int(rng.integers(0, max(1, len(lines) - 1)))
        text, ids = "", []
        for line in lines[start:]:
            text += line
            ids = tokenizer.encode(text)
            if len(ids) >= input_len:
                break
        out.append(BenchRequest(text, len(ids), output_len))
    return out


def requests_from_args(
    args: argparse.Namespace, vocab_size: int, tokenizer: Tokenizer | None
) -> list[BenchRequest]:
    rng = np.random.default_rng(args.seed)
    if args.dataset_name == "random":
        return random_requests(
            rng,
            args.num_prompts,
            vocab_size,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            args.random_prefix_len,
        )
    if tokenizer is None:
        raise ConfigError(f"the {args.dataset_name} dataset needs a model with a tokenizer")
    if args.dataset_name == "sharegpt":
        if not args.dataset_path:
            raise ConfigError("--dataset-name sharegpt needs --dataset-path FILE.json")
        return sharegpt_requests(
            rng, args.dataset_path, args.num_prompts, tokenizer, args.sharegpt_output_len
        )
    return shakespeare_requests(
        rng,
        args.num_prompts,
        tokenizer,
        args.shakespeare_input_len,
        args.shakespeare_output_len,
        args.dataset_path,
    )
