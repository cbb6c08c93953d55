"""Quantized weights: the ``QuantArray`` pytree, its declaration, and the one matmul.

A quantized weight is a small pytree, ``QuantArray(values, scales, zeros)``,
made from the weight's one ``ParamSpec``: ``quantize_specs`` replaces every
declaration that names its matmul input dimensions (``ParamSpec.contract``)
with a ``QuantArray`` of two declarations, the values and the scales. Init,
shardings (the scales carry the weight's logical axes, so they split with it),
loading and Orbax save/restore all walk that tree like any other, and model
code calls ``qeinsum`` / ``qtake``, which dequantize inside the jitted step
(XLA fuses the convert and multiply into the matmul's operand) and never ask
which format a weight is in. fp8 weights declared with ``fp8_activations`` (set from
``LLM(fp8_activations=...)``, see ``with_fp8_activations``) multiply fp8 x fp8 instead:
``qeinsum`` quantizes the activations per token (``fp8_einsum``).

Formats (``QuantConfig.weights``):
  int8  int8 values, symmetric, one scale per output channel (or per group)
  fp8   float8_e4m3fn values, one scale per output channel (or per group)
  int4  4-bit values packed two to an int8 along the last input dimension,
        one scale per group of ``group_size`` inputs (default 64)
The embedding and the LM head (weights with a ``vocab`` axis) stay at 8 bits
under int4. Scales have the weight's shape with each input dimension reduced
to 1 (per channel) or to its number of groups, so ``values * scales`` is a
broadcast after repeating each group's scale over the group.

A group spans ``group_size`` consecutive inputs in the checkpoint's flattened
input order (e.g. ``wo`` [Hq, D, E] with D 32 and groups of 64 has scales
[Hq/2, 1, E]).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from checkpoints.source import HFSource
from jserve.errors import ConfigError
from jserve.models.params import ParamSpec, is_spec
from pallas_kernels.kv_cache import FP8_MAX

FORMATS = ("int8", "fp8", "int4")
DEFAULT_INT4_GROUP = 64
_QMAX = {8: 127, 4: 7}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How the weights are stored. ``group_size`` 0 is one scale per output channel.
    ``source`` is "quantize" (quantized on load from a float checkpoint) or the
    checkpoint's format (see ``jserve.models.quant_formats``)."""

    weights: str
    group_size: int = 0
    source: str = "quantize"
    # Checkpoint formats: the values are unsigned with zero points (AWQ, GPTQ).
    asymmetric: bool = False
    # Checkpoint formats: how the values are stored (e.g. "pack-quantized") and the
    # modules left float (compressed-tensors' ``ignore``).
    packing: str = ""
    ignore: tuple[str, ...] = ()
    # fp8 weights: quantize each matmul's activations to fp8 per token and multiply two
    # fp8 operands (fp8 matrix units, compute capability >= 8.9); see ``with_fp8_activations``.
    fp8_activations: bool = False

    @property
    def bits(self) -> int:
        return 4 if self.weights == "int4" else 8


def parse_quantization(name: str | None, field: str = "quantization") -> QuantConfig | None:
    """``LLM(quantization=...)`` / ``--quantization``: None, "int8", "fp8", "int4" or
    "int4-g32" (int4 with groups of 32 inputs)."""
    if name is None or name in ("", "none"):
        return None
    if not isinstance(name, str):
        raise ConfigError(f"{field} must be a string such as 'int8', got {type(name).__name__}")
    base, _, group = name.partition("-g")
    if base not in FORMATS or (group and not group.isdigit()):
        raise ConfigError(
            f"{field} {name!r} is not a weight format jserve quantizes to; choose one of "
            f"{list(FORMATS)} (int4 takes a group size as 'int4-g32'), or leave it unset for a "
            "checkpoint that declares quantization_config"
        )
    size = int(group) if group else (DEFAULT_INT4_GROUP if base == "int4" else 0)
    if base == "int4" and size <= 0:
        raise ConfigError(f"{field} {name!r}: int4 needs a positive group size, e.g. 'int4-g64'")
    return QuantConfig(base, size)


FP8_ACTIVATION_MODES = (True, False, "auto")
FP8_MATMUL_CAPABILITY = (8, 9)  # Ada / Hopper and newer have fp8 matrix units


def gpu_compute_capability() -> tuple[int, int] | None:
    """The first device's CUDA compute capability, None off GPU (or where unknown)."""
    if jax.default_backend() != "gpu":
        return None
    cap = getattr(jax.devices()[0], "compute_capability", None)
    return None if cap is None else tuple(int(p) for p in str(cap).split("."))[:2]


def with_fp8_activations(
    q: QuantConfig | None, mode: Any, capability: Any = "detect", field: str = "fp8_activations"
) -> QuantConfig | None:
    """``q`` with ``fp8_activations`` set from ``LLM(fp8_activations=...)`` /
    ``--fp8-activations``: True, False or "auto" (on for fp8 per-channel weights on a GPU
    of compute capability >= 8.9, off elsewhere). ``capability`` is the GPU's, None for
    CPU/TPU (default: detected). ConfigError for True without fp8 per-channel weights or
    on a GPU without fp8 matrix units."""
    if isinstance(mode, str) and mode.lower() in ("true", "false", "auto"):
        mode = {"true": True, "false": False, "auto": "auto"}[mode.lower()]
    if mode is None:
        mode = False
    if mode not in FP8_ACTIVATION_MODES or (mode != "auto" and not isinstance(mode, bool)):
        raise ConfigError(f"{field} must be True, False or 'auto', got {mode!r}")
    if mode is False:
        return q
    cap = gpu_compute_capability() if capability == "detect" else capability
    fits = q is not None and q.weights == "fp8" and q.group_size == 0
    if mode == "auto":
        on = fits and cap is not None and tuple(cap) >= FP8_MATMUL_CAPABILITY
        return dataclasses.replace(q, fp8_activations=True) if on else q
    if not fits:
        have = "no quantization" if q is None else f"{q.weights} weights"
        if q is not None and q.weights == "fp8":
            have = f"fp8 weights in groups of {q.group_size}"
        raise ConfigError(
            f"{field}=True multiplies fp8 activations by fp8 weights with one scale per "
            f"output channel, but the model has {have}; use quantization='fp8' (or an fp8 "
            f"checkpoint), or {field}=False"
        )
    if cap is not None and tuple(cap) < FP8_MATMUL_CAPABILITY:
        raise ConfigError(
            f"{field}=True needs a GPU with fp8 matrix units (compute capability 8.9 or "
            f"newer, e.g. L4, H100); this one has {'.'.join(map(str, cap))}: use "
            f"{field}=False (weight-only fp8)"
        )
    return dataclasses.replace(q, fp8_activations=True)


# ---------------------------------------------------------------------------
# The pytree.


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantArray:
    """A quantized weight: ``values`` (int8, float8 or int4 packed in int8), ``scales`` (the
    compute dtype) and ``zeros`` (zero points in value units, or None for symmetric).
    ``bits`` 4 means ``values`` holds two 4-bit numbers per byte along ``packed_axis``."""

    values: Any
    scales: Any
    zeros: Any = None
    bits: int = dataclasses.field(default=8, metadata={"static": True})
    packed_axis: int = dataclasses.field(default=-1, metadata={"static": True})
    # fp8 values with per-channel scales: ``qeinsum`` multiplies fp8 x fp8.
    fp8_activations: bool = dataclasses.field(default=False, metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.values.shape)
        if self.bits == 4:
            shape[self.packed_axis] *= 2
        return tuple(shape)

    @property
    def dtype(self) -> Any:
        return self.scales.dtype


def is_quant(x: Any) -> bool:
    return isinstance(x, QuantArray)


def _pack4(v: Any, axis: int, xp: Any) -> Any:
    """int8 values in [-8, 7] -> int8 pairs along ``axis`` (the even element low)."""
    v = xp.moveaxis(v, axis, -1)
    lo, hi = v[..., 0::2], v[..., 1::2]
    packed = (lo & 0x0F) | (hi << 4)
    return xp.moveaxis(packed.astype(xp.int8), -1, axis)


def _unpack4(p: Any, axis: int, xp: Any) -> Any:
    p = xp.moveaxis(p, axis, -1)
    lo = (p << 4) >> 4  # arithmetic shifts sign-extend the low nibble
    hi = p >> 4
    v = xp.stack([lo, hi], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
    return xp.moveaxis(v, -1, axis)


def _expand(s: Any, shape: tuple[int, ...], xp: Any) -> Any:
    """Scales (or zeros) -> broadcastable to ``shape``: each group's entry repeated."""
    for i, (n, k) in enumerate(zip(shape, s.shape, strict=True)):
        if 1 < k < n:
            s = xp.repeat(s, n // k, axis=i)
    return s


def dequantize(w: Any, dtype: Any = None) -> Any:
    """A QuantArray as a dense array of ``dtype`` (default the scales' dtype); any other
    array as it is. Inside a jitted step XLA fuses this into the consuming matmul."""
    if not isinstance(w, QuantArray):
        return w
    dtype = dtype or w.scales.dtype
    v = w.values
    if w.bits == 4:
        v = _unpack4(v, w.packed_axis, jnp)
    v = v.astype(jnp.float32)
    if w.zeros is not None:
        v = v - _expand(w.zeros.astype(jnp.float32), v.shape, jnp)
    return (v * _expand(w.scales.astype(jnp.float32), v.shape, jnp)).astype(dtype)


def qeinsum(subscripts: str, x: jax.Array, w: Any) -> jax.Array:
    """``jnp.einsum(subscripts, x, w)`` for a float or quantized weight ``w``. Weight-only
    quantization dequantizes the weight to x's dtype inside the matmul; an fp8 weight
    declared with ``fp8_activations`` multiplies fp8 x fp8 instead (``fp8_einsum``)."""
    if isinstance(w, QuantArray) and w.fp8_activations:
        return fp8_einsum(subscripts, x, w)
    return jnp.einsum(subscripts, x, dequantize(w, x.dtype))


def _explicit(subscripts: str, ndim: int) -> tuple[str, str, str]:
    """(x's, w's, the output's letters) of a two-operand einsum, "..." spelled out for an
    ``x`` of ``ndim`` dims (the weight has none)."""
    ins, out = subscripts.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in subscripts]
    dots = "".join(free[: ndim - len(xs.replace("...", ""))])
    return xs.replace("...", dots), ws, out.replace("...", dots)


def _broadcast_to_out(a: jax.Array, letters: str, out: str) -> jax.Array:
    """``a`` (dims named by ``letters``, all in ``out``) transposed and expanded to
    broadcast against an array with dims ``out``."""
    keep = sorted(letters, key=out.index)
    a = jnp.transpose(a, [letters.index(c) for c in keep])
    return a.reshape([a.shape[keep.index(c)] if c in keep else 1 for c in out])


def quantize_activations(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(fp8 values, float32 scales): one dynamic scale per token, max |x| over ``axes``
    (the contracted dims, kept as 1) / 448, and 1 for an all-zero token."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    return (xf / scale).astype(jnp.float8_e4m3fn), scale


def fp8_einsum(subscripts: str, x: jax.Array, w: QuantArray) -> jax.Array:
    """fp8 x fp8 ``einsum``: x quantized per token (``quantize_activations``), the fp8
    values of ``w`` as they are, accumulated in float32, then the token scales and the
    weight's per-output-channel scales multiplied in; the result in x's dtype. On GPUs
    with fp8 matrix units XLA lowers the dot to cuBLASLt's fp8 GEMM."""
    xs, ws, out = _explicit(subscripts, x.ndim)
    contracted = tuple(i for i, c in enumerate(xs) if c not in out)
    wc = tuple(i for i, c in enumerate(ws) if c not in out)
    if w.values.dtype != jnp.float8_e4m3fn or any(w.scales.shape[i] != 1 for i in wc):
        raise ConfigError(
            "fp8_activations needs fp8 weights with one scale per output channel, got "
            f"{w.values.dtype} values with scales {w.scales.shape} for {subscripts!r}"
        )
    xq, sx = quantize_activations(x, contracted)
    acc = jnp.einsum(f"{xs},{ws}->{out}", xq, w.values, preferred_element_type=jnp.float32)
    xkeep = "".join(c for c in xs if c in out)
    wkeep = "".join(c for c in ws if c in out)
    sx = _broadcast_to_out(jnp.squeeze(sx, contracted), xkeep, out)
    sw = _broadcast_to_out(jnp.squeeze(w.scales.astype(jnp.float32), wc), wkeep, out)
    return (acc * sx * sw).astype(x.dtype)


def qtake(w: Any, ids: jax.Array) -> jax.Array:
    """Rows ``ids`` of a float or quantized table (the embedding), dequantized."""
    if not isinstance(w, QuantArray):
        return w[ids]
    assert w.bits == 8 and w.scales.shape[0] == w.values.shape[0], "per-row scales"
    zeros = None if w.zeros is None else w.zeros[ids]
    return dequantize(QuantArray(w.values[ids], w.scales[ids], zeros))


# ---------------------------------------------------------------------------
# Quantizing arrays (numpy on the host while loading, jnp on the device).


def scale_shape(
    shape: tuple[int, ...], contract: tuple[int, ...], group: int, name: str = "weight"
) -> tuple[int, ...]:
    """The scales' shape: input dims reduced to 1 (per channel) or to their group count,
    groups running over the inputs in flattened order, last input dim fastest."""
    out = list(shape)
    if group == 0:
        for i in contract:
            out[i] = 1
        return tuple(out)
    left = group
    for i in reversed(contract):
        n = shape[i]
        if left == 1:
            continue  # the group ended inside a later dim: every index here is its own group
        if left >= n:
            if left % n:
                raise ConfigError(
                    f"quantization group size {group} does not fit weight {name} of shape "
                    f"{shape}: groups of {left} do not cover whole rows of {n} inputs; choose "
                    "a group size that divides the input dimensions"
                )
            out[i], left = 1, left // n
        else:
            if n % left:
                raise ConfigError(
                    f"quantization group size {group} does not divide dimension {i} (size {n}) "
                    f"of weight {name} {shape}; choose a group size that divides it"
                )
            out[i], left = n // left, 1
    if left > 1:
        total = int(np.prod([shape[i] for i in contract]))
        raise ConfigError(
            f"quantization group size {group} is larger than the {total} inputs of weight "
            f"{name} {shape}; choose a smaller group size"
        )
    return tuple(out)


def _blocks(x: Any, sshape: tuple[int, ...]) -> Any:
    """[..n_i..] -> [..s_i, n_i/s_i..], interleaving each dim's groups and members."""
    split = [d for n, s in zip(x.shape, sshape, strict=True) for d in (s, n // s)]
    return x.reshape(split)


def quantize_array(
    w: Any, contract: tuple[int, ...], fmt: str, group: int, xp: Any = np, scale_dtype: Any = None
) -> tuple[Any, Any]:
    """Symmetric quantization of ``w`` (numpy or jnp, with ``xp`` its module) -> (values,
    scales) as ``QuantArray`` holds them (int4 packed along the last input dim)."""
    sshape = scale_shape(tuple(w.shape), contract, group)
    wf = _blocks(w.astype(xp.float32), sshape)
    inner = tuple(range(1, wf.ndim, 2))
    amax = xp.max(xp.abs(wf), axis=inner, keepdims=True)
    qmax = FP8_MAX if fmt == "fp8" else _QMAX[4 if fmt == "int4" else 8]
    scale = xp.where(amax > 0, amax / qmax, 1.0).astype(xp.float32)
    q = wf / scale
    if fmt == "fp8":
        values = q.astype(ml_dtypes.float8_e4m3fn if xp is np else jnp.float8_e4m3fn)
    else:
        values = xp.clip(xp.round(q), -qmax - 1, qmax).astype(xp.int8)
    values = values.reshape(w.shape)
    if fmt == "int4":
        values = _pack4(values, contract[-1], xp)
    scales = scale.reshape(sshape)
    if scale_dtype is not None:
        scales = scales.astype(scale_dtype)
    return values, scales


# ---------------------------------------------------------------------------
# Declarations.


def weight_format(spec: ParamSpec, q: QuantConfig) -> tuple[str, int]:
    """(format, group size) for one weight: the vocabulary tables stay 8-bit per row."""
    if "vocab" in spec.axes and q.bits == 4:
        return "int8", 0
    if "vocab" in spec.axes:
        return q.weights, 0
    return q.weights, q.group_size


def _values_dtype(fmt: str) -> Any:
    return jnp.float8_e4m3fn if fmt == "fp8" else jnp.int8


def quantize_specs(
    specs: Any, q: QuantConfig | None, source_fn: Any = None, choose: Any = None
) -> Any:
    """The declarations with every matmul weight (``ParamSpec.contract`` set) replaced by a
    ``QuantArray`` of the values' and scales' declarations. ``source_fn(spec, fmt, group,
    part)`` gives their checkpoint sources (default: quantize a float checkpoint on load);
    ``choose(spec)`` the (format, group size) of a weight, or None to keep it float."""
    if q is None:
        return specs
    source_fn = source_fn or quantize_on_load_source
    choose = choose or (lambda spec: weight_format(spec, q))

    def one(path: jax.tree_util.KeyPath, spec: ParamSpec) -> Any:
        if not spec.contract:
            return spec
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        picked = choose(spec)
        if picked is None:
            return spec
        fmt, group = picked
        sshape = scale_shape(spec.shape, spec.contract, group, name)
        saxes = tuple(
            a if i not in spec.contract or sshape[i] > 1 else None for i, a in enumerate(spec.axes)
        )
        vshape = list(spec.shape)
        axis = spec.contract[-1]
        if fmt == "int4":
            if vshape[axis] % 2:
                raise ConfigError(
                    f"int4 packs two values per byte along dimension {axis} of weight {name} "
                    f"{spec.shape}, which is odd; use int8"
                )
            vshape[axis] //= 2
        values = dataclasses.replace(
            spec,
            shape=tuple(vshape),
            dtype=_values_dtype(fmt),
            source=source_fn(spec, fmt, group, "values"),
            contract=(),
        )
        scales = ParamSpec(
            sshape, saxes, "ones", source_fn(spec, fmt, group, "scales"), contract=()
        )
        zeros = None
        if q.asymmetric and fmt == "int4":
            zeros = ParamSpec(
                sshape, saxes, "zeros", source_fn(spec, fmt, group, "zeros"), contract=()
            )
        act = q.fp8_activations and fmt == "fp8" and group == 0
        return QuantArray(values, scales, zeros, 4 if fmt == "int4" else 8, axis, act)

    return jax.tree_util.tree_map_with_path(one, specs, is_leaf=is_spec)


def declare(specs: Any, cfg: Any) -> Any:
    """A family's float declarations as ``cfg.quant`` stores them (unchanged without it)."""
    q = getattr(cfg, "quant", None)
    if q is None:
        return specs
    if q.source != "quantize":
        from jserve.models import quant_formats

        return quantize_specs(specs, q, quant_formats.source_fn(q, cfg), quant_formats.choose(q))
    return quantize_specs(specs, q)


def quantize_on_load_source(spec: ParamSpec, fmt: str, group: int, part: str) -> HFSource:
    """The source of a quantized weight's values or scales from a float checkpoint: the
    float weight is built (or its slice read, whole along the inputs) and quantized; the
    values and scales of one weight share one build."""
    src = spec.source
    memo: dict[Any, tuple[np.ndarray, np.ndarray]] = {}

    def quantized(key: Any, make: Any) -> tuple[np.ndarray, np.ndarray]:
        if key not in memo:
            memo.clear()
            memo[key] = quantize_array(make(), spec.contract, fmt, group)
        return memo[key]

    def pick(pair: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return pair[0] if part == "values" else pair[1]

    def build(*tensors: np.ndarray) -> np.ndarray:
        return pick(quantized("whole", lambda: src.build(*tensors)))

    def read_slice(read: Any, idx: tuple[slice, ...]) -> np.ndarray:
        if src.read_slice is None:
            raise NotImplementedError
        # Whole along the inputs (a channel's scale reduces over all of them).
        widx = tuple(
            slice(0, n) if i in spec.contract else s
            for i, (s, n) in enumerate(zip(idx, spec.shape, strict=True))
        )
        key = tuple((s.start, s.stop) for s in widx)
        out = pick(quantized(key, lambda: src.read_slice(read, widx)))
        return out[tuple(s if i in spec.contract else slice(None) for i, s in enumerate(idx))]

    return HFSource(src.names, build, None, src.shapes, read_slice)


def quantize_params(params: Any, specs: Any, float_specs: Any, shardings: Any = None) -> Any:
    """Float params (as ``float_specs`` declares them) -> the quantized tree ``specs``
    declares, one weight at a time on the device (used for random weights)."""

    def one(p: Any, fspec: ParamSpec, qspec: Any, sharding: Any = None) -> Any:
        if not isinstance(qspec, QuantArray):
            return p
        fmt = "fp8" if qspec.values.dtype == jnp.float8_e4m3fn else "int8"
        if qspec.bits == 4:
            fmt = "int4"
        group = _group_of(fspec.shape, fspec.contract, qspec.scales.shape)
        out = None if sharding is None else (sharding.values, sharding.scales)
        layout = (qspec.bits, qspec.packed_axis, qspec.fp8_activations)
        return _quantizer(tuple(fspec.contract), fmt, group, layout, out)(p)

    if shardings is None:
        return jax.tree_util.tree_map(one, params, float_specs, specs)
    return jax.tree_util.tree_map(one, params, float_specs, specs, shardings)


def _group_of(shape: tuple[int, ...], contract: tuple[int, ...], sshape: tuple[int, ...]) -> int:
    n_in = int(np.prod([shape[i] for i in contract]))
    n_scales = int(np.prod([sshape[i] for i in contract]))
    return 0 if n_scales == 1 else n_in // n_scales


@functools.cache
def _quantizer(
    contract: tuple[int, ...], fmt: str, group: int, layout: tuple, shardings: tuple | None
) -> Any:
    """One jitted quantizer per kind of weight (layers of one shape share its programs)."""
    bits, packed_axis, fp8_activations = layout

    def q(w: jax.Array) -> QuantArray:
        values, scales = quantize_array(w, contract, fmt, group, jnp, w.dtype)
        return QuantArray(values, scales, None, bits, packed_axis, fp8_activations)

    out = None if shardings is None else QuantArray(*shardings, None, *layout)
    return jax.jit(q, out_shardings=out)


def dequantize_params(params: Any) -> Any:
    """Every QuantArray of a parameter tree as its dense float array."""
    return jax.tree_util.tree_map(dequantize, params, is_leaf=is_quant)


def param_bytes(params: Any, device: Any = None) -> int:
    """Bytes of the parameters (on ``device`` only, if given)."""
    total = 0
    for x in jax.tree_util.tree_leaves(params):
        for shard in x.addressable_shards:
            if device is None or shard.device == device:
                total += shard.data.nbytes
    return total


def describe_format(q: QuantConfig | None, dtype: Any) -> str:
    """E.g. "int4 weights (groups of 64), float32 scales" or "float32 weights"."""
    if q is None:
        return f"{jnp.dtype(dtype).name} weights"
    group = f" (groups of {q.group_size})" if q.group_size else " (per channel)"
    src = "" if q.source == "quantize" else f" from {q.source}"
    return f"{q.weights} weights{group}{src}, {jnp.dtype(dtype).name} scales"
