"""Training and evaluating jserve's embedded demo models (tiny Llamas on Shakespeare).

Used by ``bin/train-demo-model`` and ``bin/eval-demo-model``. Everything here
is plain JAX on top of jserve's own model code (``param_specs``,
``init_params``, ``forward_dense``); the optimizer (AdamW with warmup, cosine
decay and global-norm clipping) is written out below so that jserve itself
never depends on a training library.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jserve.config import LlamaOptions, ModelConfig
from jserve.model_export import save_hf_checkpoint
from jserve.models import get_model
from jserve.models.params import init_params

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CORPUS = os.path.normpath(
    os.path.join(REPO_ROOT, "..", "shared", "data", "tinyshakespeare.txt")
)
DEFAULT_OUT_DIR = os.path.join(REPO_ROOT, "jserve", "assets")
TARGET_NAME = "shakespeare-llama"
EOS = "<|endoftext|>"
HELDOUT_FRACTION = 0.05


# ---------------------------------------------------------------------------
# Corpus and tokenizer.


def read_corpus(path: str | None) -> str:
    path = path or DEFAULT_CORPUS
    if not os.path.isfile(path):
        raise SystemExit(
            f"corpus {path} not found. Pass --corpus PATH to a plain-text file "
            "(the demo models were trained on Tiny Shakespeare, ~1.1 MB, public domain)."
        )
    with open(path, encoding="utf-8") as f:
        return f.read()


def split_corpus(text: str, heldout_fraction: float = HELDOUT_FRACTION) -> tuple[str, str]:
    """(train, held-out): the held-out part is the last ``heldout_fraction`` of the text,
    starting at the first line break after the cut so that it begins on a whole line."""
    cut = int(len(text) * (1.0 - heldout_fraction))
    nl = text.find("\n", cut)
    cut = cut if nl < 0 else nl + 1
    return text[:cut], text[cut:]


def train_tokenizer(text: str, vocab_size: int) -> tokenizers.Tokenizer:
    """Byte-level BPE: every string (newlines, runs of spaces, any Unicode) round-trips."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS],
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer, length=None)
    return tok


def save_tokenizer(tok: tokenizers.Tokenizer, out_dir: str, model_max_length: int) -> None:
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tcfg, f, indent=2, sort_keys=True)
        f.write("\n")


def encode(tok: tokenizers.Tokenizer, text: str) -> np.ndarray:
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, np.int32)


def turn_starts(tok: tokenizers.Tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of text, and the token offsets where a speaker's turn begins
    (the first token after a blank line)."""
    enc = tok.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, np.int32)
    starts = [
        i
        for i, (s, _) in enumerate(enc.offsets)
        if i > 0 and text.startswith("\n\n", max(s - 2, 0)) and s >= 2 and not text[s].isspace()
    ]
    return ids, np.asarray(starts, np.int64)


# ---------------------------------------------------------------------------
# Model configs.


@dataclasses.dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


def make_config(
    size: ModelSize, vocab_size: int, eos_id: int, name: str, max_positions: int = 2048
) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        family="llama",
        options=LlamaOptions(),
        vocab_size=vocab_size,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_layers=size.layers,
        num_q_heads=size.heads,
        num_kv_heads=size.kv_heads,
        head_dim=size.hidden // size.heads,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        sliding_windows=(None,) * size.layers,
        bos_token_id=eos_id,
        eos_token_ids=(eos_id,),
        name=name,
    ).validate()


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


# ---------------------------------------------------------------------------
# Loss, optimizer, data.


def token_nll(params: Any, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """[B, L+1] tokens -> [B, L] negative log-likelihood of each next token."""
    logits = get_model(cfg).forward_dense(params, cfg, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


@dataclasses.dataclass(frozen=True)
class OptConfig:
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    steps: int = 1000
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0


def learning_rate(step: jax.Array, oc: OptConfig) -> jax.Array:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    step = step.astype(jnp.float32)
    warm = oc.lr * (step + 1) / max(oc.warmup, 1)
    frac = jnp.clip((step - oc.warmup) / max(oc.steps - oc.warmup, 1), 0.0, 1.0)
    cosine = oc.lr * (oc.min_lr_ratio + (1 - oc.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * frac)))
    return jnp.where(step < oc.warmup, warm, cosine)


def init_opt_state(params: Any) -> dict[str, Any]:
    def zeros() -> Any:
        return jax.tree_util.tree_map(jnp.zeros_like, params)

    return {"step": jnp.zeros((), jnp.int32), "m": zeros(), "v": zeros()}


def adamw_update(
    params: Any, opt: dict[str, Any], grads: Any, oc: OptConfig
) -> tuple[Any, dict[str, Any], dict[str, jax.Array]]:
    """One AdamW update with global-norm clipping; returns (params, opt, stats)."""
    leaves = jax.tree_util.tree_leaves(grads)
    gnorm = jnp.sqrt(sum(jnp.sum(g * g) for g in leaves))
    scale = jnp.minimum(1.0, oc.clip_norm / (gnorm + 1e-6))
    grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
    step = opt["step"] + 1
    lr = learning_rate(opt["step"], oc)
    m = jax.tree_util.tree_map(lambda m, g: oc.b1 * m + (1 - oc.b1) * g, opt["m"], grads)
    v = jax.tree_util.tree_map(lambda v, g: oc.b2 * v + (1 - oc.b2) * g * g, opt["v"], grads)
    c1 = 1 - oc.b1 ** step.astype(jnp.float32)
    c2 = 1 - oc.b2 ** step.astype(jnp.float32)

    def update(p, m, v):
        # Decoupled weight decay on matrices only (not norms).
        decay = oc.weight_decay * p if p.ndim >= 2 else 0.0
        return p - lr * ((m / c1) / (jnp.sqrt(v / c2) + oc.eps) + decay)

    params = jax.tree_util.tree_map(update, params, m, v)
    return params, {"step": step, "m": m, "v": v}, {"grad_norm": gnorm, "lr": lr}


@functools.partial(jax.jit, static_argnames=("cfg", "oc"), donate_argnames=("params", "opt"))
def train_step(params, opt, tokens, *, cfg: ModelConfig, oc: OptConfig):
    """One AdamW step on the mean next-token loss of a [B, L+1] batch."""
    loss, grads = jax.value_and_grad(lambda p: token_nll(p, cfg, tokens).mean())(params)
    params, opt, stats = adamw_update(params, opt, grads, oc)
    return params, opt, {"loss": loss, **stats}


def sample_batch(
    rng: np.random.Generator,
    ids: np.ndarray,
    starts: np.ndarray,
    batch: int,
    context: int,
    bos_id: int,
    bos_fraction: float,
) -> np.ndarray:
    """[batch, context+1] windows of the training stream.

    Most rows start at a random token. A ``bos_fraction`` of them begin with
    the bos token followed by the start of a speaker's turn, so that prompts
    with or without a leading bos both look like something seen in training.
    """
    out = np.empty((batch, context + 1), np.int32)
    for r in range(batch):
        if len(starts) and rng.random() < bos_fraction:
            s = int(starts[rng.integers(len(starts))])
            s = min(s, len(ids) - context)
            out[r, 0] = bos_id
            out[r, 1:] = ids[s : s + context]
        else:
            s = int(rng.integers(len(ids) - context))
            out[r] = ids[s : s + context + 1]
    return out


@functools.partial(jax.jit, static_argnames=("cfg",))
def _window_nll(params, tokens, *, cfg: ModelConfig):
    return token_nll(params, cfg, tokens)


def heldout_nll(
    params: Any, cfg: ModelConfig, ids: np.ndarray, context: int, batch: int = 16
) -> tuple[float, int]:
    """Mean next-token NLL (nats) over consecutive non-overlapping windows of ``ids``.

    Every token after the first is predicted exactly once, from at most
    ``context`` tokens before it in its window. The last window is padded at
    the end (the model is causal, so padding changes nothing before it) and
    rows are padded to ``batch``, so everything runs at one shape.
    Returns (mean NLL, number of predicted tokens).
    """
    starts = range(0, len(ids) - 1, context)
    windows = np.zeros((len(starts), context + 1), np.int32)
    mask = np.zeros((len(starts), context), bool)
    for r, s in enumerate(starts):
        w = ids[s : s + context + 1]
        windows[r, : len(w)] = w
        mask[r, : len(w) - 1] = True
    total = 0.0
    for i in range(0, len(windows), batch):
        chunk = np.zeros((batch, context + 1), np.int32)
        part = windows[i : i + batch]
        chunk[: len(part)] = part
        nll = np.asarray(_window_nll(params, jnp.asarray(chunk), cfg=cfg), np.float64)
        total += float(nll[: len(part)][mask[i : i + batch]].sum())
    count = int(mask.sum())
    return total / count, count


def train_model(
    cfg: ModelConfig,
    ids: np.ndarray,
    starts: np.ndarray,
    oc: OptConfig,
    *,
    batch: int,
    context: int,
    seed: int,
    bos_fraction: float = 0.1,
    log_every: int = 50,
    eval_fn: Callable[[Any], float] | None = None,
    eval_every: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[Any, dict[str, Any]]:
    """Trains from init_params(seed); returns (float32 params, training summary)."""
    key = jax.random.key(seed)
    params = init_params(get_model(cfg).param_specs(cfg), key, jnp.float32, std=0.02)
    opt = init_opt_state(params)
    rng = np.random.default_rng(seed)
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else cfg.eos_token_ids[0]
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for step in range(oc.steps):
        tokens = sample_batch(rng, ids, starts, batch, context, bos, bos_fraction)
        params, opt, stats = train_step(params, opt, jnp.asarray(tokens), cfg=cfg, oc=oc)
        last = step + 1 == oc.steps
        do_eval = eval_fn is not None and eval_every > 0 and ((step + 1) % eval_every == 0 or last)
        if step % log_every == 0 or last or do_eval:
            loss = float(stats["loss"])
            elapsed = time.perf_counter() - t0
            line = (
                f"step {step + 1:5d}/{oc.steps}  loss {loss:.4f}  "
                f"grad_norm {float(stats['grad_norm']):.3f}  lr {float(stats['lr']):.2e}  "
                f"{elapsed:7.1f}s  {(step + 1) / elapsed:.2f} steps/s"
            )
            entry = {"step": step + 1, "loss": loss, "seconds": round(elapsed, 1)}
            if do_eval:
                entry["heldout_loss"] = eval_fn(params)
                line += f"  heldout {entry['heldout_loss']:.4f}"
            history.append(entry)
            log(line)
    seconds = time.perf_counter() - t0
    summary = {
        "steps": oc.steps,
        "train_seconds": round(seconds, 1),
        "final_train_loss": history[-1]["loss"],
        "history": history,
    }
    return params, summary


def perplexity(nll: float) -> float:
    return math.exp(nll)


# ---------------------------------------------------------------------------
# Writing model directories.


def round_to_dtype(params: Any, dtype: str) -> Any:
    """float32 params rounded to ``dtype`` (what is stored), kept as float32."""
    dt = jnp.bfloat16 if dtype in ("bfloat16", "bf16") else jnp.dtype(dtype)
    return jax.tree_util.tree_map(lambda x: x.astype(dt).astype(jnp.float32), params)


def write_model_dir(
    out_dir: str, params: Any, cfg: ModelConfig, tok: tokenizers.Tokenizer, dtype: str
) -> None:
    save_hf_checkpoint(params, cfg, out_dir, dtype=dtype)
    save_tokenizer(tok, out_dir, cfg.max_position_embeddings)


def dir_megabytes(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 1e6


# ---------------------------------------------------------------------------
# The EAGLE head (jserve.spec.eagle): one layer over the target's features.


def eagle_loss(
    hp: Any,
    target: Any,
    tokens: jax.Array,  # [B, L]
    key: jax.Array,
    *,
    hcfg: ModelConfig,
    tcfg: ModelConfig,
    noise: float,
    cls_weight: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """EAGLE-1's objective: the head's output at position i regresses the target's
    feature f_i (smooth L1) and its LM-head distribution matches the target's (soft
    cross-entropy), from inputs (embedding of x_i, f_{i-1} plus uniform noise)."""
    from jserve.spec import eagle

    model = get_model(tcfg)
    feat = jax.lax.stop_gradient(eagle.target_features(target, tcfg, tokens))
    prev = eagle.shifted(feat)
    prev = prev + noise * jax.random.uniform(key, prev.shape, minval=-1.0, maxval=1.0)
    emb = model.embed(target, tcfg, tokens)
    g = eagle.forward_dense(hp, hcfg, emb, prev)
    d = jnp.abs(g - feat)
    reg = jnp.where(d < 1.0, 0.5 * d * d, d - 0.5).mean()
    e = tcfg.hidden_size
    want = model.compute_logits(target, tcfg, feat.reshape(-1, e))
    got = model.compute_logits(target, tcfg, g.reshape(-1, e))
    cls = -(jax.nn.softmax(want) * jax.nn.log_softmax(got)).sum(-1).mean()
    top1 = (jnp.argmax(want, -1) == jnp.argmax(got, -1)).mean()
    return reg + cls_weight * cls, {"reg": reg, "cls": cls, "top1": top1}


@functools.partial(
    jax.jit,
    static_argnames=("hcfg", "tcfg", "oc", "noise", "cls_weight"),
    donate_argnames=("hp", "opt"),
)
def eagle_train_step(hp, opt, target, tokens, key, *, hcfg, tcfg, oc, noise, cls_weight):
    def loss_fn(p):
        return eagle_loss(
            p, target, tokens, key, hcfg=hcfg, tcfg=tcfg, noise=noise, cls_weight=cls_weight
        )

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(hp)
    hp, opt, stats = adamw_update(hp, opt, grads, oc)
    return hp, opt, {"loss": loss, **parts, **stats}


@functools.partial(jax.jit, static_argnames=("hcfg", "tcfg"))
def _eagle_eval(hp, target, tokens, *, hcfg, tcfg):
    _, parts = eagle_loss(
        hp, target, tokens, jax.random.key(0), hcfg=hcfg, tcfg=tcfg, noise=0.0, cls_weight=1.0
    )
    return parts


def eagle_heldout(
    hp: Any,
    target: Any,
    hcfg: ModelConfig,
    tcfg: ModelConfig,
    ids: np.ndarray,
    context: int,
    batch: int = 8,
) -> dict[str, float]:
    """Mean held-out (reg, cls, top1) over consecutive whole windows of ``ids``."""
    n = (len(ids) // context // batch) * batch
    windows = ids[: n * context].reshape(n, context)
    parts = [
        _eagle_eval(hp, target, jnp.asarray(windows[i : i + batch]), hcfg=hcfg, tcfg=tcfg)
        for i in range(0, n, batch)
    ]
    return {k: round(float(np.mean([p[k] for p in parts])), 4) for k in parts[0]}


def train_eagle(
    target: Any,
    tcfg: ModelConfig,
    ids: np.ndarray,
    oc: OptConfig,
    *,
    batch: int,
    context: int,
    seed: int,
    noise: float = 0.1,
    cls_weight: float = 0.1,
    log_every: int = 50,
    eval_fn: Callable[[Any], dict[str, float]] | None = None,
    eval_every: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[Any, ModelConfig, dict[str, Any]]:
    """Trains an EAGLE head for a frozen target; returns (float32 head, its config, summary)."""
    from jserve.spec import eagle

    hcfg, hp = eagle.random_head(tcfg, seed)
    opt = init_opt_state(hp)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for step in range(oc.steps):
        tokens = sample_batch(rng, ids, np.zeros(0, np.int64), batch, context - 1, 0, 0.0)
        key, sub = jax.random.split(key)
        hp, opt, stats = eagle_train_step(
            hp,
            opt,
            target,
            jnp.asarray(tokens),
            sub,
            hcfg=hcfg,
            tcfg=tcfg,
            oc=oc,
            noise=noise,
            cls_weight=cls_weight,
        )
        last = step + 1 == oc.steps
        do_eval = eval_fn is not None and eval_every > 0 and ((step + 1) % eval_every == 0 or last)
        if step % log_every == 0 or last or do_eval:
            elapsed = time.perf_counter() - t0
            entry = {k: round(float(stats[k]), 4) for k in ("loss", "reg", "cls", "top1")}
            entry |= {"step": step + 1, "seconds": round(elapsed, 1)}
            line = (
                f"step {step + 1:5d}/{oc.steps}  loss {entry['loss']:.4f}  reg {entry['reg']:.4f}"
                f"  cls {entry['cls']:.4f}  top1 {entry['top1']:.3f}  {elapsed:7.1f}s"
            )
            if do_eval:
                entry["heldout"] = eval_fn(hp)
                line += f"  heldout top1 {entry['heldout']['top1']:.3f}"
            history.append(entry)
            log(line)
    summary = {
        "steps": oc.steps,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "history": history,
    }
    return hp, hcfg, summary
