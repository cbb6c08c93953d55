"""Tensor-by-tensor access to the safetensors files of a Hugging Face model directory."""

from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
from safetensors import safe_open

from checkpoints.errors import CheckpointError

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _refuse_pickles(model_dir: str) -> None:
    pickles = sorted(
        os.path.basename(p)
        for pattern in PICKLE_PATTERNS
        for p in glob.glob(os.path.join(model_dir, pattern))
    )
    hint = (
        f" It holds pickle checkpoints ({', '.join(pickles[:3])}), which jserve refuses to "
        "load because unpickling can execute arbitrary code. Convert them once, in a "
        "trusted environment, with transformers: "
        "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, "
        "safe_serialization=True)."
        if pickles
        else ""
    )
    raise CheckpointError(f"no *.safetensors weights found in {model_dir}.{hint}")


class SafetensorsReader:
    """Maps tensor names to files and reads one tensor (or slice) at a time.

    Handles a single ``model.safetensors``, several shards with a
    ``model.safetensors.index.json``, or several shards without an index.
    """

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        self.model_dir = os.fspath(model_dir)
        index_path = os.path.join(self.model_dir, "model.safetensors.index.json")
        self._where: dict[str, str] = {}
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map", {})
            for name, fname in weight_map.items():
                path = os.path.join(self.model_dir, fname)
                if not os.path.isfile(path):
                    raise CheckpointError(
                        f"{index_path} names shard {fname} for tensor {name}, but the file is "
                        "missing; copy the complete checkpoint directory"
                    )
                self._where[name] = path
        else:
            files = sorted(glob.glob(os.path.join(self.model_dir, "*.safetensors")))
            if not files:
                _refuse_pickles(self.model_dir)
            for path in files:
                with safe_open(path, framework="numpy") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                        self._where[name] = path
        self._stack = contextlib.ExitStack()
        self._open: dict[str, Any] = {}

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def names(self) -> set[str]:
        return set(self._where)

    def _file(self, name: str) -> Any:
        try:
            path = self._where[name]
        except KeyError:
            raise CheckpointError(
                f"tensor {name!r} is missing from the checkpoint in {self.model_dir}"
            ) from None
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(path, framework="numpy"))
        return self._open[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get_tensor(name)

    def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Reads only ``index`` of the tensor (each device's shard, for sharded loads)."""
        return self._file(name).get_slice(name)[index]
