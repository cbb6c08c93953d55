"""Loading Hugging Face directories: sharded files, dtypes, and clear errors."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from checkpoints import load_hf_params, named_leaves
from jserve import LLM, CheckpointError, ConfigError, InvalidRequestError, SamplingParams
from jserve.config import load_config
from jserve.models import get_model
from tests.hf_models import make_tiny_hf_model


def _copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def _edit_config(model_dir: str, **changes: object) -> None:
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        raw = json.load(f)
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    with open(path, "w") as f:
        json.dump(raw, f)


def test_sharded_checkpoint_with_index_loads_identically(llama_dir: str, tmp_path) -> None:
    sharded = make_tiny_hf_model("llama", str(tmp_path / "sharded"))
    # Re-save the same tensors across three shards with an index.
    tensors = load_file(os.path.join(sharded, "model.safetensors"))
    os.remove(os.path.join(sharded, "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i in range(3):
        part = names[i::3]
        fname = f"model-0000{i + 1}-of-00003.safetensors"
        save_file({n: tensors[n] for n in part}, os.path.join(sharded, fname))
        weight_map.update(dict.fromkeys(part, fname))
    with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    cfg = load_config(llama_dir)
    specs = get_model(cfg).param_specs(cfg)
    a = dict(named_leaves(load_hf_params(llama_dir, specs, jnp.float32)))
    b = dict(named_leaves(load_hf_params(sharded, specs, jnp.float32)))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_bfloat16_conversion(llama_dir: str) -> None:
    cfg = load_config(llama_dir)
    params = load_hf_params(llama_dir, get_model(cfg).param_specs(cfg), jnp.bfloat16)
    assert {x.dtype for _, x in named_leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_pickle_checkpoint_is_refused(tmp_path, llama_dir: str) -> None:
    d = str(tmp_path / "pickled")
    os.makedirs(d)
    shutil.copy(os.path.join(llama_dir, "config.json"), d)
    with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
        f.write(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pickle.*arbitrary code"):
        LLM(model=d, dtype="float32")


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"architectures": None}, "no 'architectures'"),
        ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel.*not supported"),
        ({"hidden_size": None}, "missing the required field 'hidden_size'"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, llama_dir: str, changes, pattern) -> None:
    d = _copy(llama_dir, str(tmp_path / "m"))
    _edit_config(d, **changes)
    with pytest.raises(ConfigError, match=pattern):
        LLM(model=d, dtype="float32")


def test_missing_tensor_is_named(tmp_path, llama_dir: str) -> None:
    d = _copy(llama_dir, str(tmp_path / "m"))
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"missing tensors.*layers\.1\.mlp\.up_proj"):
        LLM(model=d, dtype="float32")


def test_shape_mismatch_is_named(tmp_path, llama_dir: str) -> None:
    d = _copy(llama_dir, str(tmp_path / "m"))
    _edit_config(d, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*gate_proj"):
        LLM(model=d, dtype="float32")


def test_missing_directory(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        LLM(model=str(tmp_path / "nope"))


@pytest.fixture(scope="module")
def llm(llama_dir: str) -> LLM:
    return LLM(model=llama_dir, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32)


def test_empty_prompt_rejected(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]], SamplingParams(temperature=0))


def test_token_outside_vocabulary_rejected(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match=r"token id 256 is outside the vocabulary"):
        llm.generate([[1, 256]], SamplingParams(temperature=0))


def test_prompt_longer_than_model_rejected(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="maximum length of 512"):
        llm.generate([[1] * 510], SamplingParams(max_tokens=8, temperature=0))


def test_text_prompt_without_tokenizer_rejected(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match=r"tokenizer\.json"):
        llm.generate("hello", SamplingParams(temperature=0))
