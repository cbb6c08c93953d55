"""Sharded loading reads only each device's slice of every tensor."""

from __future__ import annotations

import numpy as np
import pytest

from checkpoints import SafetensorsReader
from jserve.config import load_config
from jserve.models import llama
from jserve.models.params import iter_specs
from sharding import logical_to_spec
from tests.hf_models import TINY_ARCHS


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
@pytest.mark.parametrize("tp", [2, 4])
def test_every_shard_read_equals_the_slice_of_the_whole(
    arch: str, tp: int, tiny_model_dirs: dict[str, str]
) -> None:
    model_dir = tiny_model_dirs[arch]
    cfg = load_config(model_dir).with_kv_heads_for(tp)
    with SafetensorsReader(model_dir) as reader:
        whole_reads: list[str] = []
        get = reader.get

        def counting_get(name: str) -> np.ndarray:
            whole_reads.append(name)
            return get(name)

        for path, spec in iter_specs(llama.param_specs(cfg)):
            whole = spec.source.build(*(get(n) for n in spec.source.names))
            axis = next((i for i, a in enumerate(logical_to_spec(spec.axes)) if a), None)
            if axis is None:
                continue  # replicated: every device reads it all anyway
            size = spec.shape[axis] // tp
            for part in range(tp):
                index = [slice(0, n) for n in spec.shape]
                index[axis] = slice(part * size, (part + 1) * size)
                reader.get = counting_get
                got = spec.source.read_slice(reader.get_slice, tuple(index))
                reader.get = get
                np.testing.assert_array_equal(got, whole[tuple(index)], err_msg=path)
        assert whole_reads == []
