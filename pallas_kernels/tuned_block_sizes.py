"""Block sizes for the Pallas kernels, one table per kernel.

NOT YET TUNED ON HARDWARE: every entry below is a starting point chosen from
the H100's shape (132 SMs, 228 KiB shared memory per SM, 64K registers per SM)
and has not been measured. Run ``bin/bench-attention --sweep`` on a GPU host
and replace the entries with the winners.

A GPU entry is keyed by (mode, rows per KV head group, head_dim, dtype bytes):
  mode      "decode" when the batch holds at most 2 query tokens per sequence
            slot (num_tokens <= 2 * max_num_seqs): q-blocks are then one or two
            tokens long, so a small block_q keeps the MMA from computing
            mostly empty rows; "mixed" otherwise (prefill and chunked prefill).
  rows      q heads per KV head rounded up to a power of two (the kernel pads
            the group to a power of two, Triton tiles must be powers of two).
"""

from __future__ import annotations

from typing import NamedTuple


class GpuBlockSizes(NamedTuple):
    block_q: int  # query tokens per q-block; the MMA has block_q * group rows
    block_kv: int  # keys per inner-loop step
    num_warps: int
    num_stages: int


# The MMA needs at least 16 rows; "decode" aims for exactly that, "mixed" for
# 128 rows (a flash-attention sized tile) and a 64-key step so K and V tiles of
# two stages fit in shared memory at head_dim 128 in bf16 (2 * 2 * 64 * 128 * 2
# bytes = 64 KiB).
_GPU_TABLE: dict[tuple[str, int, int, int], GpuBlockSizes] = {
    # (mode, group rows, head_dim, dtype bytes): sizes
    ("decode", 1, 128, 2): GpuBlockSizes(16, 64, 4, 3),
    ("decode", 2, 128, 2): GpuBlockSizes(8, 64, 4, 3),
    ("decode", 4, 128, 2): GpuBlockSizes(4, 64, 4, 3),
    ("decode", 8, 128, 2): GpuBlockSizes(2, 64, 4, 3),
    ("decode", 16, 128, 2): GpuBlockSizes(1, 64, 4, 3),
    ("mixed", 1, 128, 2): GpuBlockSizes(128, 64, 8, 3),
    ("mixed", 2, 128, 2): GpuBlockSizes(64, 64, 8, 3),
    ("mixed", 4, 128, 2): GpuBlockSizes(32, 64, 8, 3),
    ("mixed", 8, 128, 2): GpuBlockSizes(16, 64, 8, 3),
    ("mixed", 16, 128, 2): GpuBlockSizes(8, 64, 8, 3),
}

# Work items the split-KV planner aims for, per SM, counted over all KV heads:
# enough waves that the tail of the last one is short.
GPU_PROGRAMS_PER_SM = 4
# A split shorter than this costs more in partial writes and the merge than it
# gains in parallelism.
GPU_MIN_CHUNK = 512
# SM count assumed when no GPU is visible (interpret mode, lowering checks).
GPU_DEFAULT_NUM_SMS = 132


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def gpu_block_sizes(
    *,
    num_tokens: int,
    max_num_seqs: int,
    group: int,
    head_dim: int,
    dtype_bytes: int,
) -> GpuBlockSizes:
    """Table entry for the shape, or a derived default with the same rules."""
    mode = "decode" if num_tokens <= 2 * max_num_seqs else "mixed"
    rows = next_pow2(group)
    hit = _GPU_TABLE.get((mode, rows, head_dim, dtype_bytes))
    if hit is not None:
        return hit
    target_rows = 16 if mode == "decode" else (128 if head_dim <= 128 else 64)
    block_q = max(1, target_rows // rows)
    # f32 (or a wide head) doubles the tile bytes: halve the key step.
    block_kv = 64 if dtype_bytes * next_pow2(head_dim) <= 256 else 32
    num_warps = 4 if mode == "decode" else 8
    return GpuBlockSizes(block_q, block_kv, num_warps, 2 if dtype_bytes > 2 else 3)


class TpuBlockSizes(NamedTuple):
    block_q: int  # query tokens per q-block
    pages_per_block: int  # KV pages fetched per DMA step (double-buffered)
    vmem_limit_bytes: int | None = None  # scoped VMEM for the kernel (None: the chip's default)


# Keys fetched per DMA step and query tokens per q-block, per TPU generation
# (``pltpu.get_tpu_info().chip_version``) and mode. NOT YET TUNED ON HARDWARE:
# every generation starts from the same ~128-keys-per-step entries, which
# compile within each chip's default scoped VMEM (16 MiB on v5e / v5p, 32 MiB
# on v6e / v7x) at the Llama-3-8B shape; tests/aot compiles every entry with
# the real TPU compiler and fails when one breaks a limit. Keyed by generation
# so that measured winners can differ per chip.
TPU_KEYS_PER_STEP = 128
_TPU_TABLE: dict[tuple[str, str], tuple[int, int, int | None]] = {
    # (generation, mode): (block_q, keys per step, vmem_limit_bytes)
    ("v5e", "decode"): (16, TPU_KEYS_PER_STEP, None),
    ("v5e", "mixed"): (64, TPU_KEYS_PER_STEP, None),
    ("v5p", "decode"): (16, TPU_KEYS_PER_STEP, None),
    ("v5p", "mixed"): (64, TPU_KEYS_PER_STEP, None),
    ("v6e", "decode"): (16, TPU_KEYS_PER_STEP, None),
    ("v6e", "mixed"): (64, TPU_KEYS_PER_STEP, None),
    ("7x", "decode"): (16, TPU_KEYS_PER_STEP, None),
    ("7x", "mixed"): (64, TPU_KEYS_PER_STEP, None),
}
TPU_GENERATIONS = ("v5e", "v5p", "v6e", "7x")


def tpu_block_sizes(
    *, num_tokens: int, max_num_seqs: int, page_size: int, generation: str | None = None
) -> TpuBlockSizes:
    """The table's entry for the generation (unknown ones, and interpret mode
    on a CPU, take v5e's: the smallest scoped VMEM)."""
    mode = "decode" if num_tokens <= 2 * max_num_seqs else "mixed"
    key = (generation if generation in TPU_GENERATIONS else "v5e", mode)
    block_q, keys, vmem = _TPU_TABLE[key]
    return TpuBlockSizes(block_q, max(1, keys // page_size), vmem)


class XlaBlockSizes(NamedTuple):
    block_q: int  # query tokens per q-block
    wave: int  # q-blocks computed together (one batched op) per outer loop step
    pages_per_block: int  # KV pages gathered per inner loop step


def xla_block_sizes(*, num_tokens: int, max_num_seqs: int, page_size: int) -> XlaBlockSizes:
    """Defaults for the plain-XLA path (xla.py), measured on a 2-core x86 CPU.

    At the 27M demo shape (8 q / 4 KV heads, head_dim 64, page 16, f32):
    decode q-blocks are single tokens batched 16 at a time over 32-key steps
    (xla.py runs the last few blocks in waves a quarter as wide, so a small
    batch does not pay for 16 lanes; 8-wide waves, or 64-key or 160-key
    steps, were no faster at batch 16); prefill q-blocks are 64 tokens, one
    at a time, over 64-key steps (32 or 128 keys, 32 or 128 tokens, and two
    blocks at a time were slower or no faster). Only the CPU was measured; a
    GPU or TPU runs the Pallas kernels instead.
    """
    mode = "decode" if num_tokens <= 2 * max_num_seqs else "mixed"
    if mode == "decode":
        return XlaBlockSizes(1, 16, max(1, 32 // page_size))
    return XlaBlockSizes(64, 1, max(1, 64 // page_size))
