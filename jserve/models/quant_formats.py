"""Quantized checkpoint formats, read from ``quantization_config`` in config.json.

compressed-tensors (what llm-compressor writes and vLLM loads), weight-only:
  pack-quantized   int4 or int8 ``weight_packed`` (int32 words, values + 2^(bits-1) in
                   consecutive bit fields along the input dim), ``weight_scale``
                   [out, 1] (channel) or [out, in / group] (group), ``weight_shape``
  int-quantized    int8 ``weight`` with ``weight_scale``
  float-quantized  float8_e4m3fn ``weight`` with ``weight_scale`` [out, 1] (channel) or
                   one value (tensor)
Symmetric weights only; activation schemes are ignored (jserve computes weight-only).
Modules the config's ``ignore`` names (usually lm_head) and the embedding stay float.

AWQ (``quant_method`` "awq", GEMM packing, 4-bit): ``qweight`` int32 [in, out/8] and
``qzeros`` int32 [in/G, out/8] with nibble i of a word holding column (0,2,4,6,1,3,5,7)[i]
of its 8, ``scales`` [in/G, out]; w = (q - z) * s. GPTQ (``quant_method`` "gptq", 4-bit,
v1 ``checkpoint_format``, ``desc_act`` false): ``qweight`` int32 [in/8, out] packed along
the inputs, ``qzeros`` [in/G, out/8] holding z - 1, ``scales`` [in/G, out]. Both are held
as int4 values q - 8 with zero points z - 8 (``QuantArray.zeros``); lm_head stays float.

Each quantized tensor is turned into jserve's layout by the same ``HFSource.build``
as the float weight: the integer values go through it as they are, the scales after
being repeated over their groups to the weight's shape (then one entry per group is
kept), so the fused QKV and gate/up layouts need no second description.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from checkpoints.errors import CheckpointError
from checkpoints.source import HFSource
from jserve.models.params import ParamSpec
from jserve.models.quant import QuantConfig, _pack4, scale_shape

CT = "compressed-tensors"
AWQ = "awq"
GPTQ = "gptq"
# AWQ's GEMM packing: nibble i of each int32 holds output column _AWQ_ORDER[i] of its 8.
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_CT_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")


def from_hf_config(raw: dict[str, Any]) -> QuantConfig | None:
    """The QuantConfig a config.json's ``quantization_config`` describes (None without one);
    CheckpointError naming the field for a format or scheme jserve does not read."""
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError("config.json: quantization_config must be an object")
    method = qc.get("quant_method")
    if method == CT:
        return _compressed_tensors(qc)
    if method == AWQ:
        return _awq(qc)
    if method == GPTQ:
        return _gptq(qc)
    raise CheckpointError(
        f"config.json: quantization_config.quant_method {method!r} is not supported; jserve "
        f"reads {CT!r} checkpoints (int8/int4 pack-quantized, fp8 float-quantized) and "
        "'awq' (GEMM) and 'gptq' (4-bit, desc_act false), or quantize a float checkpoint with quantization='int8' | 'fp8' | 'int4'"
    )


def _gptq(qc: dict[str, Any]) -> QuantConfig:
    where = "config.json: quantization_config"
    bits, group = qc.get("bits"), qc.get("group_size")
    if bits != 4:
        raise CheckpointError(f"{where}.bits {bits!r}: jserve reads 4-bit GPTQ checkpoints only")
    if qc.get("desc_act"):
        raise CheckpointError(
            f"{where}.desc_act true (activation-order groups) is not supported; use a "
            "checkpoint quantized with desc_act false"
        )
    if not isinstance(group, int) or group <= 0:
        raise CheckpointError(
            f"{where}.group_size {group!r}: jserve reads GPTQ with a positive group size"
        )
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt != "gptq":
        raise CheckpointError(f"{where}.checkpoint_format {fmt!r}: jserve reads 'gptq' (v1)")
    if not qc.get("sym", True):
        raise CheckpointError(f"{where}.sym false is not supported; jserve reads sym GPTQ")
    return QuantConfig(
        "int4", group, source=GPTQ, asymmetric=True, packing="gptq", ignore=("lm_head",)
    )


def _awq(qc: dict[str, Any]) -> QuantConfig:
    where = "config.json: quantization_config"
    bits, group = qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size"))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4:
        raise CheckpointError(f"{where}.bits {bits!r}: jserve reads 4-bit AWQ checkpoints only")
    if version != "gemm":
        raise CheckpointError(f"{where}.version {version!r}: jserve reads AWQ's GEMM packing only")
    if not isinstance(group, int) or group <= 0:
        raise CheckpointError(f"{where}.group_size must be a positive integer, got {group!r}")
    if not qc.get("zero_point", True):
        raise CheckpointError(f"{where}.zero_point false is not supported")
    ignore = tuple(str(x) for x in qc.get("modules_to_not_convert") or ())
    return QuantConfig(
        "int4", group, source=AWQ, asymmetric=True, packing="gemm", ignore=("lm_head", *ignore)
    )


def _compressed_tensors(qc: dict[str, Any]) -> QuantConfig:
    where = "config.json: quantization_config"
    fmt = qc.get("format")
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or len(groups) != 1:
        raise CheckpointError(
            f"{where}.config_groups has {len(groups)} groups; jserve reads checkpoints with "
            "one weight scheme for every Linear layer"
        )
    ((gname, group),) = groups.items()
    fmt = group.get("format") or fmt
    if fmt not in _CT_FORMATS:
        raise CheckpointError(
            f"{where}.format {fmt!r} is not supported; jserve reads {list(_CT_FORMATS)}"
        )
    w = group.get("weights") or {}
    bits, kind = w.get("num_bits"), w.get("type")
    strategy, gsize = w.get("strategy"), w.get("group_size") or 0
    field = f"{where}.config_groups.{gname}.weights"
    if not w.get("symmetric", True):
        raise CheckpointError(f"{field}.symmetric is false; jserve reads symmetric weights only")
    if (kind, bits) == ("int", 4):
        weights = "int4"
    elif (kind, bits) == ("int", 8):
        weights = "int8"
    elif (kind, bits) == ("float", 8):
        weights = "fp8"
    else:
        raise CheckpointError(
            f"{field}: {kind} with {bits} bits is not supported; jserve reads int4, int8 "
            "and float8 (e4m3) weights"
        )
    if strategy not in ("channel", "group", "tensor"):
        raise CheckpointError(
            f"{field}.strategy {strategy!r} is not supported; use channel, group or tensor"
        )
    if strategy == "group" and (not isinstance(gsize, int) or gsize <= 0):
        raise CheckpointError(f"{field}.group_size must be a positive integer, got {gsize!r}")
    if strategy == "tensor" and weights != "fp8":
        raise CheckpointError(f"{field}: per-tensor scales are read for float8 weights only")
    holds = {"float-quantized": "fp8", "int-quantized": "int8"}.get(fmt, weights)
    if holds != weights:
        raise CheckpointError(f"{where}.format {fmt!r} does not hold {weights} weights")
    ignore = tuple(str(x) for x in qc.get("ignore") or ())
    return QuantConfig(
        weights,
        gsize if strategy == "group" else 0,
        source=CT,
        packing=fmt,
        ignore=ignore,
    )


def _ignored(module: str, ignore: tuple[str, ...]) -> bool:
    for pat in ignore:
        if pat.startswith("re:"):
            if re.fullmatch(pat[3:], module):
                return True
        elif module == pat or module.endswith("." + pat) or pat == module.split(".")[-1]:
            return True
    return False


def choose(q: QuantConfig) -> Any:
    """Which weights the checkpoint holds quantized: Linear weights (not the embedding)
    whose modules the config does not ignore; returns the (format, group) chooser."""

    def pick(spec: ParamSpec) -> tuple[str, int] | None:
        names = spec.source.names
        # The embedding is never quantized; lm_head only when not ignored.
        linear = all(n.endswith(".weight") for n in names) and "vocab" not in spec.axes
        if not linear and names != ("lm_head.weight",):
            return None
        if any(_ignored(n[: -len(".weight")], q.ignore) for n in names):
            return None
        return q.weights, q.group_size

    return pick


def _unpack_int32(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """[rows, words] int32 -> [rows, cols] int8, fields of ``bits`` from the low end,
    minus the 2^(bits-1) offset."""
    words = packed.astype(np.uint32)
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    fields = (words[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)
    vals = fields.reshape(packed.shape[0], -1)[:, :cols].astype(np.int16) - (1 << (bits - 1))
    return vals.astype(np.int8)


def _subsample(full: np.ndarray, sshape: tuple[int, ...]) -> np.ndarray:
    """One entry per group of a tensor whose groups were repeated to the full shape."""
    return np.ascontiguousarray(
        full[tuple(slice(0, n, n // s) for n, s in zip(full.shape, sshape, strict=True))]
    )


def _unpack_awq(packed: np.ndarray) -> np.ndarray:
    """AWQ GEMM int32 [rows, cols/8] -> uint4 values [rows, cols] as int16 (0..15)."""
    words = packed.astype(np.uint32)
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
    nib = ((words[:, :, None] >> shifts) & np.uint32(15)).astype(np.int16)  # [r, c/8, 8]
    out = np.empty_like(nib)
    out[:, :, list(_AWQ_ORDER)] = nib
    return out.reshape(packed.shape[0], -1)


def _expand_groups(t: np.ndarray, inputs: int) -> np.ndarray:
    """[out, in / group] -> [out, in], each group's entry repeated."""
    return np.repeat(t, inputs // t.shape[1], axis=1)


def _unpack_seq(packed: np.ndarray, axis: int) -> np.ndarray:
    """int32 words holding 8 nibbles, the lowest first, along ``axis`` -> 0..15 (int16)."""
    words = np.moveaxis(packed.astype(np.uint32), axis, -1)
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
    nib = ((words[..., None] >> shifts) & np.uint32(15)).astype(np.int16)
    return np.moveaxis(nib.reshape(*words.shape[:-1], -1), -1, axis)


def _zero_point_int4_source(unpack_values: Any, unpack_zeros: Any, packed_shape: Any) -> Any:
    """The source hook of a 4-bit format with zero points (AWQ, GPTQ): ``qweight``,
    ``qzeros`` and ``scales`` per module, w = (q - z) * s, held as int4 q - 8 with zeros
    z - 8. ``unpack_values(qweight)`` and ``unpack_zeros(qzeros)`` give [in, out] (resp.
    [in / G, out]) integers 0..15 (the zeros as stored plus the format's offset);
    ``packed_shape(out, in)`` is qweight's shape."""

    def fn(spec: ParamSpec, fmt: str, group: int, part: str) -> HFSource:
        src = spec.source
        modules = [n[: -len(".weight")] for n in src.names]
        shapes = src.shapes  # [out, in] per tensor
        sshape = scale_shape(spec.shape, spec.contract, group)
        suffix = {"values": "qweight", "zeros": "qzeros", "scales": "scales"}[part]
        names = tuple(f"{m}.{suffix}" for m in modules)

        def build(*tensors: np.ndarray) -> np.ndarray:
            if part == "values":
                ints = [(unpack_values(t).T - 8).astype(np.int8) for t in tensors]
                return _pack4(src.build(*ints), spec.contract[-1], np)
            if part == "zeros":
                per = [(unpack_zeros(t).T - 8).astype(np.float32) for t in tensors]
            else:
                per = [np.asarray(t, np.float32).T for t in tensors]
            full = [_expand_groups(t, i) for t, (_, i) in zip(per, shapes, strict=True)]
            return _subsample(src.build(*full), sshape)

        pshapes = tuple(packed_shape(o, i) for o, i in shapes) if part == "values" else ()
        return HFSource(names, build, None, pshapes)

    return fn


# AWQ GEMM: qweight int32 [in, out/8] and qzeros int32 [in/G, out/8], both packed along
# the outputs in AWQ's nibble order; scales [in/G, out].
_awq_source = _zero_point_int4_source(_unpack_awq, _unpack_awq, lambda o, i: (i, o // 8))
# GPTQ (v1, desc_act false): qweight int32 [in/8, out] packed along the inputs, qzeros int32
# [in/G, out/8] packed along the outputs holding z - 1; scales [in/G, out].
_gptq_source = _zero_point_int4_source(
    lambda t: _unpack_seq(t, 0), lambda t: _unpack_seq(t, 1) + 1, lambda o, i: (i // 8, o)
)


def source_fn(q: QuantConfig, cfg: Any) -> Any:
    """``quantize_specs``' source hook for a quantized checkpoint's format."""
    if q.source == AWQ:
        return _awq_source
    if q.source == GPTQ:
        return _gptq_source
    bits = q.bits

    def fn(spec: ParamSpec, fmt: str, group: int, part: str) -> HFSource:
        src = spec.source
        modules = [n[: -len(".weight")] for n in src.names]
        shapes = src.shapes  # [out, in] per tensor
        sshape = scale_shape(spec.shape, spec.contract, group)
        if part == "values":
            if q.packing == "pack-quantized":
                names = tuple(f"{m}.weight_packed" for m in modules)
                per = 32 // bits
                pshapes = tuple((o, -(-i // per)) for o, i in shapes)

                def build(*packed: np.ndarray) -> np.ndarray:
                    ints = [
                        _unpack_int32(p, bits, s[1]) for p, s in zip(packed, shapes, strict=True)
                    ]
                    v = src.build(*ints)
                    return _pack4(v, spec.contract[-1], np) if fmt == "int4" else v

                return HFSource(names, build, None, pshapes)
            names = tuple(f"{m}.weight" for m in modules)
            return HFSource(names, lambda *w: src.build(*w), None, shapes)

        names = tuple(f"{m}.weight_scale" for m in modules)

        def build_scales(*scales: np.ndarray) -> np.ndarray:
            full = []
            for s, (o, i) in zip(scales, shapes, strict=True):
                s = (
                    np.asarray(s, np.float32).reshape(-1, 1)
                    if s.ndim < 2
                    else np.asarray(s, np.float32)
                )
                if s.shape[0] == 1:  # per tensor
                    s = np.broadcast_to(s, (o, s.shape[1]))
                full.append(np.repeat(s, i // s.shape[1], axis=1))
            return _subsample(src.build(*full), sshape)

        return HFSource(names, build_scales, None, ())

    return fn


__all__ = ["AWQ", "CT", "GPTQ", "choose", "from_hf_config", "source_fn"]
