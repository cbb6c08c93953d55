"""Sharded loading reads only each device's slice of every tensor."""

from __future__ import annotations

import numpy as np
import pytest

from checkpoints import SafetensorsReader
from checkpoints.hf import _piece
from checkpoints.source import named_leaves
from jserve.config import load_config
from jserve.models import get_model
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
        get, get_slice = reader.get, reader.get_slice
        whole_reads: list[str] = []
        read_elements = 0

        def counting_get(name: str) -> np.ndarray:
            whole_reads.append(name)
            return get(name)

        def counting_get_slice(name: str, index: tuple[slice, ...]) -> np.ndarray:
            nonlocal read_elements
            out = get_slice(name, index)
            read_elements += out.size
            return out

        for path, spec in named_leaves(get_model(cfg).param_specs(cfg)):
            whole = spec.source.build(*(get(n) for n in spec.source.names))
            axis = next((i for i, a in enumerate(logical_to_spec(spec.axes)) if a), None)
            if axis is None:
                continue  # replicated: every device reads it all anyway
            size = spec.shape[axis] // tp
            for part in range(tp):
                index = [slice(None)] * len(spec.shape)  # as make_array_from_callback passes
                index[axis] = slice(part * size, (part + 1) * size)
                reader.get, reader.get_slice = counting_get, counting_get_slice
                read_elements = 0
                got = _piece(reader, spec, tuple(index), np.float32)
                reader.get, reader.get_slice = get, get_slice
                np.testing.assert_array_equal(got, whole[tuple(index)], err_msg=path)
                # Only this device's share was read (KV heads may be read whole when
                # they are replicated over several devices).
                assert read_elements <= got.size, (path, read_elements, got.size)
        assert whole_reads == []  # never fell back to reading whole tensors
