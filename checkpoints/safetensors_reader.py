"""Tensor-by-tensor access to the safetensors files of a Hugging Face model directory."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from checkpoints.errors import CheckpointError
from checkpoints.files import check_file, read_json

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")

_FLOAT8 = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


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


def _shard_path(model_dir: str, index_path: str, name: Any, fname: Any) -> str:
    """The path of a shard the index names, which must be a plain relative
    ``*.safetensors`` name inside the model directory (no "..", no absolute path)."""
    if not isinstance(name, str) or not isinstance(fname, str) or not fname:
        raise CheckpointError(
            f"{index_path}: weight_map must map tensor names to shard file names, got "
            f"{name!r}: {fname!r}"
        )
    parts = fname.replace("\\", "/").split("/")
    if os.path.isabs(fname) or ".." in parts or not fname.endswith(".safetensors"):
        raise CheckpointError(
            f"{index_path} names shard {fname!r} for tensor {name}; shards must be "
            "*.safetensors files inside the model directory (no absolute paths or '..')"
        )
    # Links the directory itself holds are followed (the Hugging Face cache keeps each
    # snapshot's files as links to its blobs); names that leave it are refused above.
    return os.path.join(model_dir, fname)


def _non_finite(x: np.ndarray) -> int:
    """How many NaN or infinite values ``x`` holds (0 for integer tensors)."""
    if x.dtype == ml_dtypes.bfloat16:  # numpy's isfinite is slow on bfloat16: test the bits
        return int(np.count_nonzero((x.view(np.uint16) & 0x7F80) == 0x7F80))
    if not np.issubdtype(x.dtype, np.floating):
        return 0
    return int(x.size - np.count_nonzero(np.isfinite(x)))


class SafetensorsReader:
    """Maps tensor names to files and reads one tensor (or slice) at a time.

    Handles a single ``model.safetensors``, several shards with a
    ``model.safetensors.index.json``, or several shards without an index.
    A broken file raises CheckpointError naming it. With ``check_finite``,
    every tensor read is checked for NaN and infinite values (one pass over
    memory the read has just filled).
    """

    def __init__(self, model_dir: str | os.PathLike[str], check_finite: bool = False) -> None:
        self.model_dir = os.fspath(model_dir)
        self.check_finite = check_finite
        index_path = os.path.join(self.model_dir, "model.safetensors.index.json")
        self._where: dict[str, str] = {}
        self._stack = contextlib.ExitStack()
        self._open: dict[str, Any] = {}
        self._keys: dict[str, set[str]] = {}
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}  # for float8 reads
        index = read_json(index_path, required=False)
        if index is not None:
            weight_map = index.get("weight_map", {})
            if not isinstance(weight_map, dict):
                raise CheckpointError(
                    f"{index_path}: weight_map must be an object of tensor name -> shard file"
                )
            # shard path -> (the first tensor the index puts there, the name it gives)
            first: dict[str, tuple[str, str]] = {}
            for name, fname in weight_map.items():
                path = _shard_path(self.model_dir, index_path, name, fname)
                self._where[name] = path
                first.setdefault(path, (name, fname))
            for path, (name, fname) in first.items():  # each shard once, not per tensor
                if not check_file(path, required=False):
                    raise CheckpointError(
                        f"{index_path} names shard {fname} for tensor {name}, but the file "
                        "is missing; copy the complete checkpoint directory"
                    )
        else:
            files = sorted(glob.glob(os.path.join(self.model_dir, "*.safetensors")))
            if not files:
                _refuse_pickles(self.model_dir)
            for path in files:
                for name in self._names_in(path):
                    self._where[name] = path

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._open.clear()
        self._headers.clear()

    def names(self) -> set[str]:
        return set(self._where)

    def _handle(self, path: str) -> Any:
        """The open file at ``path`` (opened once); a file that is not safetensors raises."""
        if path not in self._open:
            check_file(path)
            if os.path.getsize(path) == 0:
                raise CheckpointError(
                    f"{path} is empty (0 bytes); the download or copy did not finish"
                )
            try:
                handle = self._stack.enter_context(safe_open(path, framework="numpy"))
                keys = set(handle.keys())
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"{path} is not a readable safetensors file ({e}); it may be truncated or "
                    "corrupt: copy or download it again"
                ) from None
            self._open[path], self._keys[path] = handle, keys
        return self._open[path]

    def _names_in(self, path: str) -> set[str]:
        self._handle(path)
        return self._keys[path]

    def _file(self, name: str) -> Any:
        try:
            path = self._where[name]
        except KeyError:
            raise CheckpointError(
                f"tensor {name!r} is missing from the checkpoint in {self.model_dir}"
            ) from None
        handle = self._handle(path)
        if name not in self._keys[path]:
            raise CheckpointError(
                f"model.safetensors.index.json in {self.model_dir} places tensor {name} in "
                f"{os.path.basename(path)}, which does not hold it; the index and the shards "
                "do not belong together"
            )
        return handle

    def _read(self, name: str, read: Any) -> Any:
        """``read(file handle)``, with the file's errors turned into CheckpointError."""
        handle = self._file(name)
        try:
            return read(handle)
        except (SafetensorError, OSError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"cannot read tensor {name} from {self._where[name]}: {e}; the file may be "
                "corrupt or hold a dtype jserve cannot load"
            ) from None

    def _checked(self, name: str, x: np.ndarray) -> np.ndarray:
        if self.check_finite:
            bad = _non_finite(x)
            if bad:
                raise CheckpointError(
                    f"tensor {name} in {self._where[name]} holds {bad} NaN or infinite "
                    f"value{'s' if bad > 1 else ''}; the checkpoint is corrupt (or was saved "
                    "from a diverged run). Copy it again, or skip this check with "
                    "check_weights=False (--no-check-weights)"
                )
        return x

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._read(name, lambda f: f.get_slice(name).get_shape()))

    def get(self, name: str) -> np.ndarray:
        return self._checked(name, self._read(name, lambda f: self._tensor(f, name)))

    def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Reads only ``index`` of the tensor (each device's shard, for sharded loads)."""
        return self._checked(name, self._read(name, lambda f: self._slice(f, name, index)))

    def _tensor(self, handle: Any, name: str) -> np.ndarray:
        if self._float8(handle, name) is None:
            return handle.get_tensor(name)
        return self._float8_tensor(name)

    def _slice(self, handle: Any, name: str, index: tuple[slice, ...]) -> np.ndarray:
        if self._float8(handle, name) is None:
            return handle.get_slice(name)[index]
        return self._float8_tensor(name)[index]

    @staticmethod
    def _float8(handle: Any, name: str) -> Any:
        """The ml_dtypes type of a float8 tensor (safetensors' numpy reader has none)."""
        return _FLOAT8.get(str(handle.get_slice(name).get_dtype()))

    def _header(self, path: str) -> tuple[int, dict[str, Any]]:
        """(header length, header) of a safetensors file, parsed once per file."""
        if path not in self._headers:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                self._headers[path] = (size, json.loads(f.read(size)))
        return self._headers[path]

    def _float8_tensor(self, name: str) -> np.ndarray:
        """A float8 tensor read from the file's header offsets (e.g. compressed-tensors'
        fp8 weights)."""
        path = self._where[name]
        size, header = self._header(path)
        info = header[name]
        start, end = info["data_offsets"]
        dtype = _FLOAT8[info["dtype"]]
        data = np.fromfile(path, np.uint8, count=end - start, offset=8 + size + start)
        return data.view(dtype).reshape(info["shape"])
