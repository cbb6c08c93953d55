"""``jserve convert HF_DIR OUT_DIR``: a Hugging Face directory to an Orbax checkpoint."""

from __future__ import annotations

import argparse

from jserve.model_loader import resolve_dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="Hugging Face model directory (safetensors)")
    parser.add_argument("out_dir", help="new directory for the Orbax checkpoint")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jserve.model_export import convert_hf_to_orbax

    cfg = convert_hf_to_orbax(args.hf_dir, args.out_dir, resolve_dtype(args.dtype))
    print(
        f"wrote {args.out_dir}: {cfg.architecture}, {cfg.num_params() / 1e6:.1f}M params "
        f"as {args.dtype}; serve it with --model {args.out_dir}"
    )
    return 0
