"""The serving step compiled for an accelerator that is not attached.

The same fused step program the engine runs (forward, logits, sampling, KV
pages donated), lowered with abstract weights and pages on a mesh of
described devices (``pallas_kernels.targets``) and compiled by the target's
own compiler: libtpu for TPU slices, XLA + Triton + ptxas for an H100. What
comes back is what the compiler says about it: memory (arguments, aliased
bytes, temporaries), its cost model's estimate, and the collectives and
copies in the optimised HLO.

    report = compile_step("llama3-8b", "v6e-4", tp=4, shape=(512, 64))
    report.collectives   # {"all-reduce": 65, ...}

Needs libtpu or the CUDA plugin (``pip install -e '.[aot]'``) and
``JAX_PLATFORMS=cpu``; nothing runs on a device.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jserve.config import ModelConfig
from jserve.engine.config import EngineConfig
from jserve.engine.runner import ModelRunner
from jserve.models import get_model
from jserve.models.params import is_spec, spec_dtype
from jserve.models.presets import preset_config
from pallas_kernels import targets
from sharding.mesh import ParallelConfig, make_mesh
from sharding.rules import param_shardings

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


class AbstractRunner(ModelRunner):
    """A runner whose weights and device state are shapes with placements only.

    ``target_mesh`` is the mesh to compile under: the runner's own mesh, or
    for one device a 1 x 1 mesh of the target's first device (the engine
    uses no mesh on one device; ``device_sharding`` then places everything).
    """

    def __init__(self, *args: Any, target_mesh: Any, device_sharding: Any = None, **kw: Any):
        self.target_mesh = target_mesh
        self._device_sharding = device_sharding
        super().__init__(*args, **kw)

    def _device_zeros(self, shape: tuple[int, ...], dtype: Any, sharding: Any) -> Any:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding or self._device_sharding)

    def lower(self, key: tuple) -> Any:
        fn, args, opts = self._program_spec(key)
        host = self._replicated or self._device_sharding

        def abstract(x: Any) -> Any:
            if isinstance(x, np.ndarray):  # host inputs of the step
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host)
            return x

        return jax.jit(fn, **opts).lower(*jax.tree_util.tree_map(abstract, args))


@dataclasses.dataclass
class StepReport:
    target: str
    shape: tuple[int, int]  # (tokens, rows)
    compile_seconds: float
    argument_bytes: int  # per device
    alias_bytes: int  # donated arguments the outputs reuse in place
    temp_bytes: int
    kv_pool_bytes: int  # this device's pages, all layers
    flops: float | None  # the cost model's, per device (None where it has none: GPU)
    bytes_accessed: float | None
    optimal_seconds: float | None
    collectives: dict[str, int]
    gathered: list[str]  # result types of the all-gathers (e.g. the logits' rows)
    pool_copies: int  # copies of a whole layer's page pool in the HLO (relayouts)

    @property
    def pages_aliased(self) -> bool:
        return self.alias_bytes >= self.kv_pool_bytes


def target_devices(target: str) -> list:
    if target in targets.TPU_TARGETS:
        return targets.tpu_devices(target)
    m = re.fullmatch(r"h100(?:-(\d+))?", target)
    if m:
        return targets.h100_devices(int(m[1] or 1))
    known = [*targets.TPU_TARGETS, "h100", "h100-2", "h100-8"]
    raise ValueError(f"unknown target {target!r}; known: {', '.join(known)}")


def abstract_params(cfg: ModelConfig, mesh: Any, dtype: Any) -> Any:
    """The model's weights as shapes placed by the sharding rules."""
    specs = get_model(cfg).param_specs(cfg)
    shardings = param_shardings(specs, mesh)
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, spec_dtype(s, dtype), sharding=sh),
        specs,
        shardings,
        is_leaf=is_spec,
    )


def build_runner(
    config: str | ModelConfig,
    target: str,
    *,
    tp: int = 1,
    dtype: Any = jnp.bfloat16,
    max_num_seqs: int = 64,
    max_model_len: int = 2048,
    max_num_batched_tokens: int = 2048,
    num_pages: int | None = None,
) -> AbstractRunner:
    """A runner for the target with the engine's own shapes, mesh and shardings."""
    cfg = preset_config(config) if isinstance(config, str) else config
    devices = target_devices(target)
    backend = "pallas_gpu" if target.startswith("h100") else "pallas_tpu"
    parallel = ParallelConfig(tensor_parallel_size=tp)
    parallel.validate(cfg, len(devices))
    cfg = cfg.with_kv_heads_for(tp)
    mesh = make_mesh(parallel, devices) if tp > 1 else None
    pages_per_seq = -(-max_model_len // 16)
    ecfg = EngineConfig(
        page_size=16,
        num_pages=num_pages or max_num_seqs * pages_per_seq,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        attention_backend=backend,
        min_token_bucket=16,
    )
    # One device: the engine runs with no mesh, so everything is placed on the
    # target's first device through a 1 x 1 mesh to compile under.
    one = jax.sharding.Mesh(np.asarray(devices[:1]).reshape(1, 1), ("stage", "model"))
    return AbstractRunner(
        abstract_params(cfg, mesh or one, dtype),
        cfg,
        ecfg,
        dtype,
        max_model_len,
        ecfg.num_pages,
        mesh=mesh,
        parallel=parallel if mesh is not None else None,
        target_mesh=mesh or one,
        device_sharding=None if mesh is not None else NamedSharding(one, PartitionSpec()),
    )


def device_bytes(x: jax.ShapeDtypeStruct) -> int:
    """Bytes of one device's shard of an abstract array."""
    return int(np.prod(x.sharding.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize


def _count_collectives(hlo: str) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for op in COLLECTIVES:
        # "all-reduce(" and the async "all-reduce-start(" each count once.
        counts[op] = len(re.findall(rf"= [^=\n]* {op}(?:-start)?\(", hlo))
    return {k: v for k, v in counts.items() if v}


def _gathered(hlo: str) -> list[str]:
    return re.findall(r"= (\S+?) all-gather(?:-start)?\(", hlo)


def _pool_copies(hlo: str, page_shape: tuple[int, ...], dtype: Any) -> int:
    """HLO copies (layout changes) whose result is a whole layer's page pool."""
    name = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}[jnp.dtype(dtype).name]
    shape = f"{name}[{','.join(map(str, page_shape))}]"
    return len(re.findall(rf"= {re.escape(shape)}\{{[^}}]*\}} copy\(", hlo))


def compile_step(
    config: str | ModelConfig,
    target: str,
    *,
    shape: tuple[int, int],
    tp: int = 1,
    runner: AbstractRunner | None = None,
    **runner_kwargs: Any,
) -> StepReport:
    """Compiles the step of one (tokens, rows) bucket for the target."""
    runner = runner or build_runner(config, target, tp=tp, **runner_kwargs)
    key = ("step", *shape)
    if shape not in runner.shapes.step_shapes():
        raise ValueError(
            f"{shape} is not a step shape; the buckets are {runner.shapes.step_shapes()}"
        )
    with jax.set_mesh(runner.target_mesh):
        t0 = time.perf_counter()
        compiled = runner.lower(key).compile()
        seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    hlo = compiled.as_text()
    pool = runner.kv_pages[0]
    local_pool = pool.sharding.shard_shape(pool.shape)
    return StepReport(
        target=target,
        shape=shape,
        compile_seconds=seconds,
        argument_bytes=mem.argument_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes,
        kv_pool_bytes=device_bytes(pool) * len(runner.kv_pages),
        flops=cost.get("flops") if cost else None,
        bytes_accessed=cost.get("bytes accessed") if cost else None,
        optimal_seconds=cost.get("optimal_seconds") if cost else None,
        collectives=_count_collectives(hlo),
        gathered=_gathered(hlo),
        pool_copies=_pool_copies(hlo, tuple(local_pool), pool.dtype),
    )
