"""Tiny quantized checkpoints in the compressed-tensors layout, from a float model directory.

The values are packed with compressed-tensors' own ``pack_to_int32``; the tensor names
(``weight_packed``, ``weight_scale``, ``weight_shape``) and the ``quantization_config``
follow the layout llm-compressor writes. Each writer also saves the dequantized float
model, the reference jserve's logits must match.
"""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantize(w: np.ndarray, kind: str, group: int) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] float -> (values, scales [out, in/group or 1]); symmetric."""
    out, n = w.shape
    g = group or n
    blocks = w.reshape(out, n // g, g)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    if kind == "fp8":
        scale = amax / 448.0
        vals = (blocks / scale).astype(ml_dtypes.float8_e4m3fn)
    else:
        qmax = 7 if kind == "int4" else 127
        scale = amax / qmax
        vals = np.clip(np.round(blocks / scale), -qmax - 1, qmax).astype(np.int8)
    return vals.reshape(out, n), scale.reshape(out, n // g).astype(np.float32)


def write_compressed_tensors(
    src_dir: str,
    out_dir: str,
    ref_dir: str,
    kind: str,
    group: int = 0,
    fmt: str | None = None,
    tensor_scale: bool = False,
) -> None:
    """``kind`` int4 | int8 | fp8; ``group`` 0 for one scale per output channel."""
    import torch
    from compressed_tensors.compressors import pack_to_int32

    fmt = fmt or ("float-quantized" if kind == "fp8" else "pack-quantized")
    tensors = load_file(os.path.join(src_dir, "model.safetensors"))
    out, ref = {}, {}
    for name, w in tensors.items():
        module = name[: -len(".weight")]
        if not (name.endswith(".weight") and module.split(".")[-1] in LINEARS):
            out[name] = ref[name] = w
            continue
        vals, scale = _quantize(w.astype(np.float32), kind, group)
        if tensor_scale:  # one scale for the whole tensor
            s = float(np.abs(w).max() / 448.0)
            vals, scale = (w / s).astype(ml_dtypes.float8_e4m3fn), np.array([s], np.float32)
        deq = vals.astype(np.float32).reshape(
            w.shape[0], scale.shape[-1] if scale.ndim > 1 else 1, -1
        )
        deq = (
            deq * (scale.reshape(-1, scale.shape[-1], 1) if scale.ndim > 1 else scale[0])
        ).reshape(w.shape)
        ref[name] = deq.astype(np.float32)
        if fmt == "pack-quantized":
            bits = 4 if kind == "int4" else 8
            out[f"{module}.weight_packed"] = pack_to_int32(torch.from_numpy(vals), bits).numpy()
            out[f"{module}.weight_shape"] = np.array(w.shape, np.int64)
        else:
            out[f"{module}.weight"] = vals
        out[f"{module}.weight_scale"] = scale
    for d, t in ((out_dir, out), (ref_dir, ref)):
        shutil.copytree(src_dir, d)
        save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    strategy = "tensor" if tensor_scale else ("group" if group else "channel")
    qc = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "format": fmt,
                "input_activations": None,
                "output_activations": None,
                "weights": {
                    "num_bits": 4 if kind == "int4" else 8,
                    "type": "float" if kind == "fp8" else "int",
                    "symmetric": True,
                    "strategy": strategy,
                    "group_size": group or None,
                    "dynamic": False,
                    "actorder": None,
                    "observer": "minmax",
                    "block_structure": None,
                },
            }
        },
    }
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["quantization_config"] = qc
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
