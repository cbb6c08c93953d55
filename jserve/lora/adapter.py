"""PEFT LoRA adapters read into jserve's fused weight layout, checked before any use.

A PEFT adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors``: for each adapted ``nn.Linear`` (torch weight
``W [out, in]``) a ``lora_A.weight [r, in]`` and a ``lora_B.weight [out, r]``,
whose update is ``W + s * B @ A`` with ``s = lora_alpha / r`` (``lora_alpha /
sqrt(r)`` under ``use_rslora``).

jserve multiplies ``x @ W`` with fused weights (``wqkv`` holds q, k and v;
``w_gate_up`` gate and up, see ``jserve.models.llama``), so an adapter is kept
per fused weight as ``a [*in, P*R]`` and ``b [P*R, *out]``: ``P`` is the number
of projections the weight fuses and ``R`` is ``max_lora_rank``; projection p
uses rank columns ``[p*R, p*R + r)`` and the rest are zero. ``b`` is placed
into the fused output layout by the weight's own checkpoint mapping (its
``HFSource.build``, the code that fuses the base weights), and ``s`` is folded
into it. An adapter is read whole and checked (format, target modules, ranks,
shapes against the base model, finite values) before anything keeps it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import re
from typing import Any

import numpy as np

from checkpoints import CheckpointError
from checkpoints.files import check_file, read_json
from checkpoints.safetensors_reader import PICKLE_PATTERNS, SafetensorsReader
from jserve.config import ModelConfig
from jserve.errors import InvalidRequestError

# PEFT module name -> (jserve's fused weight, its projection index there).
TARGETS: dict[str, tuple[str, int]] = {
    "q_proj": ("wqkv", 0),
    "k_proj": ("wqkv", 1),
    "v_proj": ("wqkv", 2),
    "o_proj": ("wo", 0),
    "gate_proj": ("w_gate_up", 0),
    "up_proj": ("w_gate_up", 1),
    "down_proj": ("w_down", 0),
}
# Projections fused in each weight.
PARTS = {"wqkv": 3, "wo": 1, "w_gate_up": 2, "w_down": 1}

_TENSOR = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\."
    r"(\w+)\.lora_([AB])\.weight$"
)


class AdapterError(InvalidRequestError):
    """A LoRA adapter cannot be served (missing, malformed, or not for this model);
    nothing of it was loaded."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="lora_request")


@dataclasses.dataclass(frozen=True)
class WeightSlot:
    """Where one fused weight's adapter lives: its input and output dims."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]
    parts: int
    source: Any  # the base weight's HFSource (builds the fused output layout)


def weight_slots(cfg: ModelConfig, layer_keys: list[set[str]]) -> list[dict[str, WeightSlot]]:
    """Per layer, the fused weights an adapter may change: those of ``PARTS`` the layer
    has (``layer_keys``: each layer's parameter names; a mixture-of-experts layer has no
    dense MLP)."""
    from jserve.models import llama

    specs = llama.float_param_specs(cfg)["layers"]
    out = []
    for i, layer in enumerate(specs):
        slots = {}
        for name, parts in PARTS.items():
            if name not in layer_keys[i]:
                continue
            spec = layer[name]
            n_in = len(spec.contract)
            assert spec.contract == tuple(range(n_in)), (name, spec.contract)
            slots[name] = WeightSlot(
                spec.shape[:n_in],
                spec.shape[n_in:],
                spec.axes[:n_in],
                spec.axes[n_in:],
                parts,
                spec.source,
            )
        out.append(slots)
    return out


@dataclasses.dataclass
class HostAdapter:
    """One adapter in host memory: per (layer, fused weight) its (a, b), padded."""

    name: str
    path: str
    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: the value of the first key that matches the
    module's full name (e.g. "model.layers.0.self_attn.q_proj") as PEFT matches it: the
    key, a regex, ends the name at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(path: str) -> dict[str, Any]:
    cfg_path = os.path.join(path, "adapter_config.json")
    try:
        raw = read_json(cfg_path, AdapterError)
    except AdapterError as e:
        if not os.path.exists(cfg_path):
            raise AdapterError(
                f"LoRA adapter {path}: adapter_config.json not found; a PEFT adapter "
                "directory holds adapter_config.json and adapter_model.safetensors"
            ) from None
        raise e
    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"LoRA adapter {path}: peft_type is {peft_type!r}; jserve serves LORA")
    for key, bad, what in (
        ("use_dora", True, "DoRA (use_dora)"),
        ("fan_in_fan_out", True, "fan_in_fan_out weights (Conv1D layers)"),
        ("lora_bias", True, "LoRA biases (lora_bias)"),
    ):
        if raw.get(key) is bad:
            raise AdapterError(f"LoRA adapter {path}: {what} is not supported")
    if raw.get("bias", "none") != "none":
        raise AdapterError(
            f"LoRA adapter {path}: bias={raw['bias']!r} trains the base biases, which jserve "
            "does not serve; train with bias='none'"
        )
    if raw.get("modules_to_save"):
        raise AdapterError(
            f"LoRA adapter {path}: modules_to_save {raw['modules_to_save']} replaces whole "
            "modules, which jserve does not serve per request; train without modules_to_save"
        )
    for key in ("r", "lora_alpha"):
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise AdapterError(f"LoRA adapter {path}: {key} must be a positive number")
    targets = raw.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted({str(t).split(".")[-1] for t in targets} - set(TARGETS))
        if unknown:
            raise AdapterError(
                f"LoRA adapter {path}: target module(s) {unknown} are not supported; jserve "
                f"serves LoRA on {sorted(TARGETS)}"
            )
    return raw


def _check_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise AdapterError(f"LoRA adapter directory {path} not found")
    if not os.path.exists(os.path.join(path, "adapter_model.safetensors")):
        files = os.listdir(path)
        pickles = sorted(f for f in files if any(fnmatch.fnmatch(f, p) for p in PICKLE_PATTERNS))
        if pickles:
            raise AdapterError(
                f"LoRA adapter {path} holds only pickle weights ({', '.join(pickles[:3])}), "
                "which jserve refuses to load because unpickling can execute arbitrary code; "
                "save it with safe_serialization=True (PEFT's default) to get "
                "adapter_model.safetensors"
            )
        raise AdapterError(f"LoRA adapter {path}: adapter_model.safetensors not found")
    check_file(os.path.join(path, "adapter_model.safetensors"), AdapterError)


def load_adapter(
    name: str,
    path: str | os.PathLike[str],
    cfg: ModelConfig,
    slots: list[dict[str, WeightSlot]],
    max_rank: int,
    dtype: Any,
) -> HostAdapter:
    """Reads and checks a PEFT adapter for this model; AdapterError names what is wrong."""
    path = os.fspath(path)
    _check_dir(path)
    raw = _read_config(path)
    alpha, rslora = float(raw["lora_alpha"]), bool(raw.get("use_rslora", False))
    alpha_pattern = raw.get("alpha_pattern") or {}
    pairs: dict[tuple[int, str, str], dict[str, np.ndarray]] = {}
    try:
        with SafetensorsReader(path, check_finite=True) as reader:
            for tensor in sorted(reader.names()):
                m = _TENSOR.match(tensor)
                if m is None:
                    raise AdapterError(
                        f"LoRA adapter {path}: tensor {tensor} is not a LoRA weight of a "
                        f"supported module; jserve serves LoRA on {sorted(TARGETS)} of the "
                        "decoder layers"
                    )
                layer, block, module, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
                if module not in TARGETS:
                    raise AdapterError(
                        f"LoRA adapter {path}: target module {module!r} ({tensor}) is not "
                        f"supported; jserve serves LoRA on {sorted(TARGETS)}"
                    )
                pairs.setdefault((layer, block, module), {})[ab] = reader.get(tensor)
    except CheckpointError as e:
        raise AdapterError(f"LoRA adapter {path}: {e}") from None
    if not pairs:
        raise AdapterError(f"LoRA adapter {path} holds no LoRA weights")

    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
    for (layer, block, module), ab in sorted(pairs.items()):
        where = f"LoRA adapter {path}: layer {layer} {module}"
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where} has lora_{''.join(ab)} without its pair")
        if layer >= cfg.num_layers:
            raise AdapterError(
                f"{where}: the base model has {cfg.num_layers} layers; the adapter was "
                "trained for another model"
            )
        fused, part = TARGETS[module]
        slot = slots[layer].get(fused)
        if slot is None:
            raise AdapterError(
                f"{where}: this model's layer {layer} has no dense {module} (a mixture-of-"
                "experts layer); jserve serves LoRA on its attention projections only"
            )
        a, b = ab["A"], ab["B"]
        out_dim, in_dim = slot.source.shapes[part]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise AdapterError(f"{where}: lora_A {a.shape} and lora_B {b.shape} do not pair")
        r = a.shape[0]
        if a.shape[1] != in_dim or b.shape[0] != out_dim:
            raise AdapterError(
                f"{where}: lora_A {a.shape} / lora_B {b.shape} do not fit this model's "
                f"{module} ({out_dim} outputs x {in_dim} inputs); the adapter was trained for "
                "another architecture or hidden size"
            )
        if r > max_rank:
            raise AdapterError(
                f"{where} has rank {r}, above max_lora_rank={max_rank}; raise max_lora_rank "
                f"(--max-lora-rank) to at least {r}"
            )
        module_name = f"model.layers.{layer}.{block}.{module}"
        a_alpha = float(_pattern_value(alpha_pattern, module_name, alpha))
        scale = a_alpha / (math.sqrt(r) if rslora else r)
        fa, fb = weights.get((layer, fused)) or _zeros(slot, max_rank, dtype)
        lo = part * max_rank
        # x @ A^T @ B^T: a [*in, r] from A [r, in]; b [r, *out] in the fused layout.
        fa[..., lo : lo + r] = a.T.reshape(*slot.in_shape, r).astype(dtype)
        fb[lo : lo + r] = _fused_out(slot, part, b.astype(np.float32) * scale).astype(dtype)
        weights[(layer, fused)] = (fa, fb)
    return HostAdapter(name, path, weights)


def _zeros(slot: WeightSlot, max_rank: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    width = slot.parts * max_rank
    return (
        np.zeros((*slot.in_shape, width), dtype),
        np.zeros((width, *slot.out_shape), dtype),
    )


def _fused_out(slot: WeightSlot, part: int, b: np.ndarray) -> np.ndarray:
    """lora_B [out_p, r] of projection ``part`` -> [r, *out] of the fused weight (zero for
    the other projections), placed as the base weight's mapping places its rows."""
    r = b.shape[1]
    if slot.parts == 1:
        return np.ascontiguousarray(b.T).reshape(r, *slot.out_shape)
    parts = [
        b if j == part else np.zeros((shape[0], r), b.dtype)
        for j, shape in enumerate(slot.source.shapes)
    ]
    return slot.source.build(*parts)
