"""fp8 x fp8 matmul (``qeinsum`` with ``fp8_activations``) compiled for an H100 with no GPU.

XLA compiles the deviceless program with its untuned defaults (no autotuning): the
dot runs as a Triton GEMM fusion whose operands are the fp8 (f8e4m3fn) activations
and weight values themselves, accumulating in f32, where weight-only fp8 multiplies
bf16 operands. Run by ``bin/test-aot`` (the CUDA plugin, ptxas)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("jax_cuda12_plugin")

from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jserve.models.quant import QuantArray, qeinsum
from pallas_kernels.targets import h100_mesh

TOKENS, IN, OUT = 512, 4096, 1024


def _dot_operand_types(hlo: str) -> list[tuple[str, ...]]:
    """The element types of every dot's operands, from the instructions that define them
    (parameters of the fused computations included)."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    types.update(re.findall(r"([\w.\-]+): (\w+)\[", hlo))  # computation parameters
    dots = re.findall(r"= \w+\[[^\]]*\][^ ]* dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
    return [tuple(types[name] for name in pair) for pair in dots]


def _compile(fp8_activations: bool) -> str:
    mesh = h100_mesh()
    rep = NamedSharding(mesh, P())
    x = jax.ShapeDtypeStruct((TOKENS, IN), jnp.bfloat16, sharding=rep)
    values = jax.ShapeDtypeStruct((IN, OUT), jnp.float8_e4m3fn, sharding=rep)
    scales = jax.ShapeDtypeStruct((1, OUT), jnp.bfloat16, sharding=rep)
    w = QuantArray(values, scales, None, 8, 0, fp8_activations)
    with jax.set_mesh(mesh):
        return jax.jit(lambda x, w: qeinsum("ne,ef->nf", x, w)).lower(x, w).compile().as_text()


def test_fp8_activations_compile_to_an_fp8_gemm_on_h100() -> None:
    hlo = _compile(True)
    dots = _dot_operand_types(hlo)
    assert dots and all(t == ("f8e4m3fn", "f8e4m3fn") for t in dots), dots
    assert "__cublas$lt$matmul$f8" in hlo or "gemm_fusion" in hlo
    # The activations are quantized on the device: an f8e4m3fn array made from bf16 x.
    assert re.search(r"= f8e4m3fn\[512,4096\]\S* fusion\(", hlo), "x was not cast to fp8"


def test_weight_only_fp8_upcasts_the_weight_on_h100() -> None:
    """The check above can fail: weight-only fp8 multiplies bf16 operands."""
    dots = _dot_operand_types(_compile(False))
    assert dots and all("f8e4m3fn" not in t for t in dots), dots
