"""Broken model directories: every way a file can be wrong is a typed error naming it.

Each case starts from a good tiny model directory and breaks one file the way a
failed download, a careless copy or a hostile directory would.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jserve import CheckpointError, ConfigError
from jserve.model_loader import load_model, random_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _copy(src: str, tmp_path, name: str = "m") -> str:
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _write(rel: str, data: bytes | str) -> Callable[[str], None]:
    def mutate(d: str) -> None:
        path = os.path.join(d, rel)
        if os.path.lexists(path):
            os.remove(path)
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)

    return mutate


def _replace_with(rel: str, make: Callable[[str], None]) -> Callable[[str], None]:
    def mutate(d: str) -> None:
        path = os.path.join(d, rel)
        os.remove(path)
        make(path)

    return mutate


def _truncate(d: str) -> None:
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _loop(path: str) -> None:
    os.symlink(os.path.basename(path), path)


def _index(weight_map: object) -> Callable[[str], None]:
    return _write("model.safetensors.index.json", json.dumps({"weight_map": weight_map}))


def _misplaced_in_index(d: str) -> None:
    """Two shards and an index that puts model.norm.weight in the wrong one."""
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    os.remove(path)
    norm = {"model.norm.weight": tensors.pop("model.norm.weight")}
    save_file(tensors, os.path.join(d, "a.safetensors"))
    save_file(norm, os.path.join(d, "b.safetensors"))
    _index({**dict.fromkeys(tensors, "a.safetensors"), **dict.fromkeys(norm, "a.safetensors")})(d)


DEEP = "[" * 100_000 + "]" * 100_000

# (name, mutation of a copy of tok_model_dir, error class, pattern the message matches)
BROKEN: list[tuple[str, Callable[[str], None], type[Exception], str]] = [
    ("truncated", _truncate, CheckpointError, r"model\.safetensors is not a readable.*truncated"),
    ("empty", _write("model.safetensors", b""), CheckpointError, r"model\.safetensors is empty"),
    (
        "bad header",
        _write("model.safetensors", b"\x10\0\0\0\0\0\0\0{not json}xxxxxx" + b"\0" * 64),
        CheckpointError,
        r"model\.safetensors is not a readable safetensors file \(.*header",
    ),
    ("tokenizer not json", _write("tokenizer.json", "{nope"), ConfigError, r"tokenizer\.json is not"),
    ("tokenizer a list", _write("tokenizer.json", "[1, 2]"), ConfigError, r"tokenizer\.json is not"),
    ("config a list", _write("config.json", "[1, 2]"), ConfigError, r"config\.json must hold a JSON object"),
    ("config binary", _write("config.json", b"\0\xff\xfe\x80"), ConfigError, r"config\.json is not UTF-8"),
    ("config too deep", _write("config.json", DEEP), ConfigError, r"config\.json is nested too deep"),
    (
        "generation config bad",
        _write("generation_config.json", "{bad"),
        ConfigError,
        r"generation_config\.json is not valid JSON",
    ),
    (
        "tokenizer config a list",
        _write("tokenizer_config.json", "[1]"),
        ConfigError,
        r"tokenizer_config\.json must hold a JSON object",
    ),
    ("index not json", _write("model.safetensors.index.json", "{bad"), CheckpointError, r"index\.json is not valid JSON"),
    ("index a list", _write("model.safetensors.index.json", "[1]"), CheckpointError, r"index\.json must hold"),
    ("weight_map a list", _index([1]), CheckpointError, r"weight_map must be an object"),
    ("weight_map values", _index({"model.norm.weight": 5}), CheckpointError, r"weight_map must map"),
    (
        "index names a tensor its shard lacks",
        _misplaced_in_index,
        CheckpointError,
        r"places tensor model\.norm\.weight in a\.safetensors, which does not hold it",
    ),
    ("symlink loop (weights)", _replace_with("model.safetensors", _loop), CheckpointError, r"model\.safetensors is a symlink loop"),
    ("symlink loop (config)", _replace_with("config.json", _loop), ConfigError, r"config\.json is a symlink loop"),
    ("symlink loop (tokenizer)", _replace_with("tokenizer.json", _loop), ConfigError, r"tokenizer\.json is a symlink loop"),
    ("dangling symlink", _replace_with("tokenizer.json", lambda p: os.symlink("gone.json", p)), ConfigError, r"tokenizer\.json is a symlink to 'gone\.json'"),
    ("FIFO config", _replace_with("config.json", os.mkfifo), ConfigError, r"config\.json is a FIFO"),
    ("FIFO tokenizer", _replace_with("tokenizer.json", os.mkfifo), ConfigError, r"tokenizer\.json is a FIFO"),
    ("FIFO weights", _replace_with("model.safetensors", os.mkfifo), CheckpointError, r"model\.safetensors is a FIFO"),
    ("/dev/zero tokenizer", _replace_with("tokenizer.json", lambda p: os.symlink("/dev/zero", p)), ConfigError, r"tokenizer\.json is a character device"),
    ("/dev/zero tokenizer config", _replace_with("tokenizer_config.json", lambda p: os.symlink("/dev/zero", p)), ConfigError, r"tokenizer_config\.json is a character device"),
    ("directory config", _replace_with("config.json", os.mkdir), ConfigError, r"config\.json is a directory"),
]  # fmt: skip


# A FIFO opened for reading blocks in C, where no signal interrupts it: a regression
# must end the run rather than hang it.
@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize(
    ("mutate", "error", "pattern"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN]
)
def test_broken_file_is_a_typed_error_naming_it(
    tok_model_dir: str, tmp_path, mutate, error, pattern
) -> None:  # fmt: skip
    d = _copy(tok_model_dir, tmp_path)
    mutate(d)
    with pytest.raises(error, match=pattern) as info:
        load_model(d, "float32")
    assert d in str(info.value)  # the full path, so the user knows which directory


@pytest.mark.parametrize(
    "shard", ["../outside/model.safetensors", "/etc/passwd", "sub/../../x.safetensors", "model.bin"]
)
def test_shard_index_must_stay_inside_the_model_directory(
    tok_model_dir: str, tmp_path, shard: str
) -> None:
    d = _copy(tok_model_dir, tmp_path)
    # A valid shard outside the directory: it must not be loaded.
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(os.path.join(d, "model.safetensors"), outside / "model.safetensors")
    names = load_file(os.path.join(d, "model.safetensors"))
    os.remove(os.path.join(d, "model.safetensors"))
    _index(dict.fromkeys(names, shard))(d)
    with pytest.raises(CheckpointError, match=r"inside the model directory"):
        load_model(d, "float32")


def test_shard_links_inside_the_directory_are_followed(tok_model_dir: str, tmp_path) -> None:
    """The Hugging Face cache keeps a snapshot's files as links to blobs elsewhere."""
    d = _copy(tok_model_dir, tmp_path)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    os.rename(os.path.join(d, "model.safetensors"), blobs / "abc123")
    os.symlink(blobs / "abc123", os.path.join(d, "model-00001-of-00001.safetensors"))
    names = load_file(str(blobs / "abc123"))
    _index(dict.fromkeys(names, "model-00001-of-00001.safetensors"))(d)
    assert load_model(d, "float32").params


@pytest.mark.timeout(60)
def test_a_million_layers_is_refused_before_anything_is_built(tok_model_dir: str, tmp_path) -> None:
    d = _copy(tok_model_dir, tmp_path)
    path = os.path.join(d, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw["num_hidden_layers"] = 1_000_000
    with open(path, "w") as f:
        json.dump(raw, f)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"num_hidden_layers must be in \[1, 1024\]"):
        load_model(d, "float32")
    assert time.monotonic() - t0 < 5


def test_parameters_beyond_device_memory_are_refused(tok_model_dir: str, tmp_path) -> None:
    d = _copy(tok_model_dir, tmp_path)
    path = os.path.join(d, "config.json")
    with open(path) as f:
        raw = json.load(f)
    # About 4.4e12 parameters: tens of terabytes.
    raw.update(hidden_size=65536, intermediate_size=262144, num_hidden_layers=64)
    raw.update(num_attention_heads=512, num_key_value_heads=512, head_dim=128)
    with open(path, "w") as f:
        json.dump(raw, f)
    with pytest.raises(ConfigError, match=r"describes 4\d{3}\.\d\dB parameters.*more than"):
        load_model(d, "float32")
    # The same check guards random weights (which would otherwise be allocated).
    with pytest.raises(ConfigError, match=r"more than"):
        random_model(d, "float32")


def test_memory_check_counts_the_devices(tok_model_dir: str, monkeypatch) -> None:
    """On devices that report their memory, each must hold its share of the weights."""
    import jax

    from jserve.config import load_config
    from jserve.model_loader import check_fits_in_memory
    from sharding import ParallelConfig

    cfg = load_config(tok_model_dir)
    need = cfg.num_params() * 4

    class Device:
        def memory_stats(self) -> dict[str, int]:
            return {"bytes_limit": int(0.75 * need)}

    monkeypatch.setattr(jax, "local_devices", lambda: [Device(), Device()])
    check_fits_in_memory(cfg, np.float32, ParallelConfig(2, 1, 0))  # half each: fits
    with pytest.raises(ConfigError, match=r"more than a device here holds"):
        check_fits_in_memory(cfg, np.float32)


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"rms_norm_eps": -1}, r"rms_norm_eps must be in \(0, 1\), got -1"),
        ({"rms_norm_eps": 0}, r"rms_norm_eps must be in \(0, 1\)"),
        ({"rms_norm_eps": "1e-6"}, r"rms_norm_eps must be a number"),
        ({"hidden_size": 64.5}, r"hidden_size must be an integer, got 64\.5"),
        ({"num_key_value_heads": "2"}, r"num_key_value_heads must be an integer"),
        ({"max_position_embeddings": [512]}, r"max_position_embeddings must be an integer"),
        ({"vocab_size": 2**40}, r"vocab_size 1099511627776 does not fit in 32 bits"),
        ({"head_dim": 15}, r"head_dim must be even"),
        ({"bos_token_id": 100000}, r"bos_token_id 100000 is not a token id"),
        ({"bos_token_id": "<s>"}, r"bos_token_id must be an integer"),
        ({"eos_token_id": "</s>"}, r"eos_token_id must be a token id or a list"),
        ({"architectures": "LlamaForCausalLM"}, r"architectures must be a list"),
        ({"rope_scaling": [1]}, r"rope_scaling must be an object"),
        ({"rope_parameters": None, "rope_theta": -5.0}, r"rope_theta must be positive"),
        (
            {
                "rope_parameters": None,
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 4.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            },
            r"low_freq_factor < high_freq_factor",
        ),
        ({"layer_types": 5}, r"layer_types must be a list"),
        ({"sliding_window": "8"}, r"sliding_window must be an integer"),
    ],
)
def test_config_values_are_range_and_type_checked(
    tok_model_dir: str, tmp_path, changes: dict, pattern: str
) -> None:
    d = _copy(tok_model_dir, tmp_path)
    path = os.path.join(d, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw.update(changes)
    with open(path, "w") as f:
        json.dump(raw, f)
    with pytest.raises(ConfigError, match=pattern):
        load_model(d, "float32")


def _poison(d: str, name: str, value: float) -> None:
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    tensors[name] = tensors[name].copy()
    tensors[name].flat[3] = value
    save_file(tensors, path)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_are_refused_by_default(tok_model_dir: str, tmp_path, value) -> None:
    d = _copy(tok_model_dir, tmp_path)
    _poison(d, "model.layers.1.mlp.down_proj.weight", value)
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight in .* 1 NaN"
    ):
        load_model(d, "float32")
    # Asked not to check (as for models past CHECK_WEIGHTS_MAX_PARAMS), it loads.
    assert load_model(d, "float32", check_weights=False).params


def test_non_finite_bfloat16_weights_are_refused(tok_model_dir: str, tmp_path) -> None:
    import ml_dtypes

    d = _copy(tok_model_dir, tmp_path)
    path = os.path.join(d, "model.safetensors")
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(path).items()}
    tensors["model.norm.weight"][0] = np.nan
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        load_model(d, "bfloat16")


def test_non_finite_slices_are_refused(tok_model_dir: str, tmp_path) -> None:
    """Sharded loads read each device's slice (get_slice): the check covers those too."""
    from checkpoints import SafetensorsReader

    d = _copy(tok_model_dir, tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    _poison(d, name, np.nan)  # flat index 3: row 0
    with SafetensorsReader(d, check_finite=True) as reader:
        assert reader.get_slice(name, (slice(1, 4), slice(None))).shape[0] == 3
        with pytest.raises(CheckpointError, match=r"q_proj\.weight in .* 1 NaN"):
            reader.get_slice(name, (slice(0, 2), slice(None)))


def test_tokenizer_ids_past_the_embedding_are_refused(tok_model_dir: str, tmp_path) -> None:
    from jserve.model_loader import default_model_path

    d = _copy(tok_model_dir, tmp_path)  # 320 embedding rows
    shutil.copy(os.path.join(default_model_path(), "tokenizer.json"), d)  # 2048 tokens
    with pytest.raises(ConfigError, match=r"tokenizer\.json makes token ids up to 2047.*320 rows"):
        load_model(d, "float32")


def test_tokenizer_much_smaller_than_the_embedding_is_warned(
    tok_model_dir: str, tmp_path, caplog
) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tests.hf_models import CORPUS

    with caplog.at_level(logging.WARNING, logger="jserve.model_loader"):
        load_model(tok_model_dir, "float32")  # its own tokenizer: no warning
    assert not [r for r in caplog.records if "tokenizer" in r.getMessage()]
    d = _copy(tok_model_dir, tmp_path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=100, show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    tok.save(os.path.join(d, "tokenizer.json"))
    os.remove(os.path.join(d, "tokenizer_config.json"))
    with caplog.at_level(logging.WARNING, logger="jserve.model_loader"):
        load_model(d, "float32")
    n = tok.get_vocab_size()
    assert any(
        f"has {n} tokens but the model's embedding has 320 rows" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["generate", "serve"])
def test_cli_prints_one_line_for_a_broken_model(tok_model_dir: str, tmp_path, command) -> None:
    d = _copy(tok_model_dir, tmp_path)
    _truncate(d)
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "jserve.cli.main", command, "--model", d],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=100,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    errors = [line for line in lines if line.startswith("jserve: error:")]
    assert len(errors) == 1 and "model.safetensors is not a readable safetensors file" in errors[0]


def test_cli_checks_weights_unless_told_not_to(tok_model_dir: str, tmp_path) -> None:
    from jserve.cli.main import build_parser

    assert build_parser().parse_args(["generate"]).check_weights is None
    assert build_parser().parse_args(["serve", "--no-check-weights"]).check_weights is False
    d = _copy(tok_model_dir, tmp_path)
    _poison(d, "model.norm.weight", np.nan)
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    base = [sys.executable, "-m", "jserve.cli.main", "generate", "--model", d, "--max-tokens", "2"]
    proc = subprocess.run(base, capture_output=True, text=True, env=env, cwd=ROOT, timeout=100)
    assert proc.returncode == 2 and "model.norm.weight" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [*base, "--no-check-weights"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
