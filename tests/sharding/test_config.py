"""Invalid parallel layouts fail at start-up with a message that says what to change."""

from __future__ import annotations

import pytest

from jserve.config import config_from_dict
from jserve.errors import ConfigError
from sharding import LOGICAL_RULES, ParallelConfig, logical_to_spec

CFG = config_from_dict(
    dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=256,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
    )
)


@pytest.mark.parametrize(
    ("tp", "pp", "pattern"),
    [
        (16, 1, r"needs 16 devices but only 8 are visible"),
        (4, 1, r"num_attention_heads \(6\) is not divisible by tensor_parallel_size 4"),
        (1, 2, r"num_hidden_layers \(3\) is not divisible by pipeline_parallel_size 2"),
        (0, 1, r"tensor_parallel_size must be a positive integer"),
    ],
)
def test_invalid_layouts(tp: int, pp: int, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        ParallelConfig(tp, pp).validate(CFG, num_devices=8)


def test_valid_layout_and_kv_head_rule() -> None:
    ParallelConfig(2, 1).validate(CFG, num_devices=8)
    # 6 query heads split 3 ways, but 2 KV heads can neither be split nor replicated evenly.
    with pytest.raises(ConfigError, match="one must divide the other"):
        ParallelConfig(3, 1).validate(CFG.replace(intermediate_size=195), 8)


def test_rules_reject_two_axes_on_one_mesh_axis() -> None:
    assert tuple(logical_to_spec(("embed", "mlp"))) == (None, "model")
    with pytest.raises(ConfigError, match="same mesh axis"):
        logical_to_spec(("q_heads", "mlp"))
    with pytest.raises(ConfigError, match="no sharding rule"):
        logical_to_spec(("nonsense",))
    assert set(LOGICAL_RULES.values()) <= {None, "model"}
