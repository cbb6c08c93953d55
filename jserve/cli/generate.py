"""``jserve generate``: text from a prompt, streamed to the terminal."""

from __future__ import annotations

import argparse
import sys

from jserve.cli.engine_args import add_engine_arguments, add_model_arguments, build_engine
from jserve.cli.interrupt import exit_on_sigint
from jserve.sampling_params import SamplingParams

DEFAULT_PROMPT = "ROMEO:\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="*", help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument(
        "--lora-name",
        default=None,
        help="generate through this adapter of --lora-modules (default: the base model)",
    )
    add_model_arguments(parser)
    add_engine_arguments(parser)
    # One short run: compiling every step shape up front would cost more than it saves.
    parser.set_defaults(max_num_seqs=8, max_num_batched_tokens=256, warmup=False, func=run)


def run(args: argparse.Namespace) -> int:
    with exit_on_sigint("start-up"):  # Ctrl-C while compiling: one line, status 130
        engine = build_engine(args)
    params = SamplingParams(
        n=args.n,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop,
        seed=args.sample_seed,
    )
    prompts = args.prompts or [DEFAULT_PROMPT]
    lora = None if args.lora_name is None else engine.lora_by_name(args.lora_name)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params, lora_request=lora)
    # One prompt and one sample: stream as tokens arrive; otherwise print each when done.
    stream = len(prompts) == 1 and args.n == 1
    texts: dict[tuple[int, int], str] = {}
    if stream:
        sys.stdout.write(prompts[0])
    while engine.has_unfinished_requests():
        for out in engine.step():
            for comp in out.outputs:
                key = (int(out.request_id), comp.index)
                texts[key] = texts.get(key, "") + comp.text
                if stream:
                    sys.stdout.write(comp.text)
                    sys.stdout.flush()
    if stream:
        sys.stdout.write("\n")
        return 0
    for (i, j), text in sorted(texts.items()):
        header = f"--- prompt {i}" + (f", sample {j}" if args.n > 1 else "")
        print(f"{header} ---\n{prompts[i]}{text}\n")
    return 0
