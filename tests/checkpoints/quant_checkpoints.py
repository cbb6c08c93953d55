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


def _save(src_dir: str, out_dir: str, tensors: dict[str, np.ndarray]) -> None:
    """A copy of src_dir with ``tensors`` as its weights (contiguous: safetensors' numpy
    writer ignores strides)."""
    shutil.copytree(src_dir, out_dir)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def _set_quantization_config(model_dir: str, qc: dict) -> None:
    """Writes ``qc`` as the ``quantization_config`` of model_dir's config.json."""
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["quantization_config"] = qc
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


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
    _save(src_dir, out_dir, out)
    _save(src_dir, ref_dir, ref)
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
    _set_quantization_config(out_dir, qc)


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_ORDER[i] of its 8


def _pack_awq(u4: np.ndarray) -> np.ndarray:
    """uint4 values [rows, cols] (0..15) -> AWQ GEMM int32 [rows, cols/8]."""
    rows, cols = u4.shape
    groups = u4.reshape(rows, cols // 8, 8).astype(np.uint32)
    words = np.zeros((rows, cols // 8), np.uint32)
    for i, col in enumerate(AWQ_ORDER):
        words |= groups[:, :, col] << np.uint32(4 * i)
    return words.view(np.int32)


def write_awq(src_dir: str, out_dir: str, ref_dir: str, group: int = 32) -> None:
    """AutoAWQ's GEMM layout, written from its documented format: per Linear ``qweight``
    int32 [in, out/8], ``qzeros`` int32 [in/group, out/8], ``scales`` float16
    [in/group, out]; w = (q - z) * s with q, z in 0..15."""
    tensors = load_file(os.path.join(src_dir, "model.safetensors"))
    out, ref = {}, {}
    for name, w in tensors.items():
        module = name[: -len(".weight")]
        if not (name.endswith(".weight") and module.split(".")[-1] in LINEARS):
            out[name] = ref[name] = w
            continue
        wt = w.astype(np.float32).T  # [in, out]
        n, o = wt.shape
        blocks = wt.reshape(n // group, group, o)
        lo, hi = blocks.min(axis=1), blocks.max(axis=1)  # [in/G, out]
        scale = np.maximum(hi - lo, 1e-8) / 15
        scale = scale.astype(np.float16).astype(np.float32)
        zero = np.clip(np.round(-lo / scale), 0, 15)
        q = np.clip(np.round(blocks / scale[:, None]) + zero[:, None], 0, 15)  # [in/G, G, out]
        ref[name] = np.ascontiguousarray(((q - zero[:, None]) * scale[:, None]).reshape(n, o).T)
        out[f"{module}.qweight"] = _pack_awq(q.reshape(n, o).astype(np.uint8))
        out[f"{module}.qzeros"] = _pack_awq(zero.astype(np.uint8))
        out[f"{module}.scales"] = scale.astype(np.float16)
    _save(src_dir, out_dir, out)
    _save(src_dir, ref_dir, ref)
    _set_quantization_config(
        out_dir,
        {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": None,
        },
    )


def _pack_seq(u4: np.ndarray, axis: int) -> np.ndarray:
    """0..15 values -> int32 words of 8 nibbles along ``axis``, the lowest first."""
    u = np.moveaxis(u4.astype(np.uint32), axis, -1)
    groups = u.reshape(*u.shape[:-1], u.shape[-1] // 8, 8)
    words = np.zeros(groups.shape[:-1], np.uint32)
    for i in range(8):
        words |= groups[..., i] << np.uint32(4 * i)
    return np.ascontiguousarray(np.moveaxis(words, -1, axis)).view(np.int32)


def write_gptq(src_dir: str, out_dir: str, ref_dir: str, group: int = 32) -> None:
    """AutoGPTQ's v1 layout (desc_act false, sym), from its documented format: per Linear
    ``qweight`` int32 [in/8, out] packed along the inputs, ``qzeros`` int32 [in/G, out/8]
    holding z - 1, ``scales`` float16 [in/G, out], ``g_idx`` [in]; w = (q - z) * s."""
    tensors = load_file(os.path.join(src_dir, "model.safetensors"))
    out, ref = {}, {}
    for name, w in tensors.items():
        module = name[: -len(".weight")]
        if not (name.endswith(".weight") and module.split(".")[-1] in LINEARS):
            out[name] = ref[name] = w
            continue
        wt = np.ascontiguousarray(w.astype(np.float32).T)  # [in, out]
        n, o = wt.shape
        blocks = wt.reshape(n // group, group, o)
        amax = np.abs(blocks).max(axis=1)
        scale = (np.maximum(amax, 1e-8) / 7.5).astype(np.float16).astype(np.float32)
        zero = np.full_like(scale, 8)
        q = np.clip(np.round(blocks / scale[:, None]) + 8, 0, 15)
        ref[name] = ((q - zero[:, None]) * scale[:, None]).reshape(n, o).T
        out[f"{module}.qweight"] = _pack_seq(q.reshape(n, o), 0)
        out[f"{module}.qzeros"] = _pack_seq(zero - 1, 1)
        out[f"{module}.scales"] = scale.astype(np.float16)
        out[f"{module}.g_idx"] = (np.arange(n) // group).astype(np.int32)
    _save(src_dir, out_dir, out)
    _save(src_dir, ref_dir, ref)
    _set_quantization_config(
        out_dir,
        {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group,
            "desc_act": False,
            "sym": True,
            "checkpoint_format": "gptq",
        },
    )
