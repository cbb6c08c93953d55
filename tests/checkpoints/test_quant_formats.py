"""compressed-tensors checkpoints (written with compressed-tensors' packing, see
quant_checkpoints): jserve's logits against the dequantized float model and against
transformers loading the same directory; typed errors for formats jserve does not read."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from jserve.errors import CheckpointError, ConfigError
from jserve.model_loader import load_model
from jserve.models import get_model
from jserve.models.quant import QuantArray
from tests.checkpoints.quant_checkpoints import write_compressed_tensors

pytest.importorskip("compressed_tensors")

TOKENS = [[1, 5, 7, 9, 100, 200, 30, 40], [3, 4, 5, 6, 7, 8, 9, 10]]
CASES = {
    "int4-group32": dict(kind="int4", group=32),
    "int8-channel": dict(kind="int8"),
    "int8-int-quantized": dict(kind="int8", fmt="int-quantized"),
    "fp8-channel": dict(kind="fp8"),
    "fp8-tensor": dict(kind="fp8", tensor_scale=True),
}


@pytest.fixture(scope="module")
def src_dir(tmp_path_factory) -> str:
    from tests.hf_models import make_tiny_hf_model

    return make_tiny_hf_model(
        "llama", str(tmp_path_factory.mktemp("ct") / "src"), tie_word_embeddings=False
    )


@pytest.fixture(scope="module")
def written(src_dir: str, tmp_path_factory) -> dict[str, tuple[str, str]]:
    root = tmp_path_factory.mktemp("ctout")
    out = {}
    for name, kw in CASES.items():
        q, ref = str(root / name), str(root / f"{name}-ref")
        write_compressed_tensors(src_dir, q, ref, **kw)
        out[name] = (q, ref)
    return out


def _logits(path: str) -> np.ndarray:
    m = load_model(path, "float32")
    return np.asarray(get_model(m.cfg).forward_dense(m.params, m.cfg, jnp.array(TOKENS)))


@pytest.mark.parametrize("name", list(CASES))
def test_matches_dequantized_reference_and_transformers(written, name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    q, ref = written[name]
    m = load_model(q, "float32")
    assert m.cfg.quant.source == "compressed-tensors"
    layer = m.params["layers"][0]
    assert isinstance(layer["wqkv"], QuantArray) and isinstance(layer["w_down"], QuantArray)
    assert not isinstance(m.params["lm_head"], QuantArray)  # "ignore": ["lm_head"]
    assert not isinstance(m.params["embed"], QuantArray)
    got = np.asarray(get_model(m.cfg).forward_dense(m.params, m.cfg, jnp.array(TOKENS)))
    np.testing.assert_allclose(got, _logits(ref), rtol=1e-5, atol=1e-5)
    hf = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32)
    with torch.no_grad():
        want = hf(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _with_qc(path: str, dst: str, edit) -> str:
    shutil.copytree(path, dst)
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as f:
        config = json.load(f)
    edit(config["quantization_config"])
    with open(cfg_path, "w") as f:
        json.dump(config, f)
    return dst


def _weights(qc: dict) -> dict:
    return qc["config_groups"]["group_0"]["weights"]


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda qc: qc.update(quant_method="bitsandbytes"), "quant_method 'bitsandbytes'"),
        (lambda qc: _weights(qc).update(num_bits=3), "int with 3 bits"),
        (lambda qc: _weights(qc).update(symmetric=False), "symmetric is false"),
        (lambda qc: _weights(qc).update(strategy="block"), "strategy 'block'"),
        (lambda qc: qc["config_groups"]["group_0"].update(format="marlin-24"), "marlin-24"),
    ],
)
def test_unsupported_format_is_a_checkpoint_error(written, tmp_path, edit, words: str) -> None:
    path = _with_qc(written["int4-group32"][0], str(tmp_path / "bad"), edit)
    with pytest.raises(CheckpointError, match=words):
        load_model(path, "float32")


def test_group_not_dividing_the_inputs_is_a_config_error(written, tmp_path) -> None:
    path = _with_qc(
        written["int4-group32"][0],
        str(tmp_path / "g48"),
        lambda qc: _weights(qc).update(group_size=48),
    )
    with pytest.raises(ConfigError, match="group size 48"):
        load_model(path, "float32")


def test_quantizing_a_quantized_checkpoint_is_refused(written) -> None:
    with pytest.raises(ConfigError, match="already quantized"):
        load_model(written["int8-channel"][0], "float32", quantization="int8")


@pytest.fixture(scope="module")
def awq_dirs(src_dir: str, tmp_path_factory) -> tuple[str, str]:
    from tests.checkpoints.quant_checkpoints import write_awq

    root = tmp_path_factory.mktemp("awq")
    q, ref = str(root / "awq"), str(root / "ref")
    write_awq(src_dir, q, ref, group=32)
    return q, ref


def test_awq_gemm_matches_dequantized_reference(awq_dirs) -> None:
    q, ref = awq_dirs
    m = load_model(q, "float32")
    assert (m.cfg.quant.source, m.cfg.quant.weights, m.cfg.quant.group_size) == ("awq", "int4", 32)
    w = m.params["layers"][0]["wqkv"]
    assert isinstance(w, QuantArray) and w.zeros is not None and w.bits == 4
    got = np.asarray(get_model(m.cfg).forward_dense(m.params, m.cfg, jnp.array(TOKENS)))
    np.testing.assert_allclose(got, _logits(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda qc: qc.update(bits=8), "4-bit AWQ"),
        (lambda qc: qc.update(version="gemv"), "GEMM packing"),
        (lambda qc: qc.update(zero_point=False), "zero_point"),
    ],
)
def test_unsupported_awq_is_a_checkpoint_error(awq_dirs, tmp_path, edit, words: str) -> None:
    with pytest.raises(CheckpointError, match=words):
        load_model(_with_qc(awq_dirs[0], str(tmp_path / "bad"), edit), "float32")


@pytest.fixture(scope="module")
def gptq_dirs(src_dir: str, tmp_path_factory) -> tuple[str, str]:
    from tests.checkpoints.quant_checkpoints import write_gptq

    root = tmp_path_factory.mktemp("gptq")
    q, ref = str(root / "gptq"), str(root / "ref")
    write_gptq(src_dir, q, ref, group=32)
    return q, ref


def test_gptq_matches_dequantized_reference(gptq_dirs) -> None:
    q, ref = gptq_dirs
    m = load_model(q, "float32")
    assert (m.cfg.quant.source, m.cfg.quant.group_size) == ("gptq", 32)
    assert m.params["layers"][1]["w_down"].zeros is not None
    got = np.asarray(get_model(m.cfg).forward_dense(m.params, m.cfg, jnp.array(TOKENS)))
    np.testing.assert_allclose(got, _logits(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda qc: qc.update(desc_act=True), "desc_act true"),
        (lambda qc: qc.update(bits=3), "4-bit GPTQ"),
        (lambda qc: qc.update(group_size=-1), "positive group size"),
        (lambda qc: qc.update(checkpoint_format="gptq_v2"), "gptq_v2"),
    ],
)
def test_unsupported_gptq_is_a_checkpoint_error(gptq_dirs, tmp_path, edit, words: str) -> None:
    with pytest.raises(CheckpointError, match=words):
        load_model(_with_qc(gptq_dirs[0], str(tmp_path / "bad"), edit), "float32")


READS_PROBE = """
import collections, json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
from checkpoints.safetensors_reader import SafetensorsReader
from jserve.model_loader import load_model
from sharding import ParallelConfig

counts = collections.Counter()
get = SafetensorsReader.get

def counting_get(self, name):
    counts[name] += 1
    return get(self, name)

SafetensorsReader.get = counting_get
m = load_model(sys.argv[1], "float32", ParallelConfig(2, 1, 0, False))
print("RESULT" + json.dumps({"most": max(counts.values()), "tensors": len(counts)}))
"""


def test_tensor_parallel_load_reads_each_quantized_tensor_once(awq_dirs) -> None:
    """A format without sliced reads builds each weight once for both devices' pieces."""
    from tests.sharding.probe import run_probe

    res = run_probe(READS_PROBE, awq_dirs[0])
    assert res["tensors"] > 0 and res["most"] == 1, res
