"""Resolving and loading the proposer a ``speculative_config`` names, before serving starts."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from jserve.errors import ConfigError
from jserve.spec.config import SpeculativeConfig


def _with_default_model(spec: SpeculativeConfig, target: Any) -> SpeculativeConfig:
    """The embedded model's shipped draft or head when ``model`` is not given."""
    from jserve.model_loader import default_model_path
    from jserve.spec.draft import DEFAULT_DRAFT
    from jserve.spec.eagle import DEFAULT_EAGLE

    if spec.model is not None:
        return spec
    embedded = default_model_path()
    if not os.path.exists(target.path) or not os.path.samefile(target.path, embedded):
        what = "draft's" if spec.method == "draft_model" else "EAGLE head's"
        raise ConfigError(
            f'speculative_config method "{spec.method}" needs "model": the {what} '
            "directory (only the embedded model has a default)"
        )
    default = DEFAULT_DRAFT if spec.method == "draft_model" else DEFAULT_EAGLE
    return dataclasses.replace(spec, model=default).validate()


def load_proposer(
    spec: SpeculativeConfig, target: Any, max_model_len: int
) -> tuple[SpeculativeConfig, Any, Any]:
    """(the config with its model resolved, the proposer on the device or None for
    n-gram lookup, its weights) for a target LoadedModel; ConfigError for a proposer the
    target cannot use."""
    if spec.method == "ngram":
        return spec, None, None
    spec = _with_default_model(spec, target)
    spec.check_draft_vocab(target.cfg.vocab_size)
    if target.mesh is not None and target.mesh.shape["stage"] > 1:
        raise ConfigError(
            f"speculative_config method {spec.method!r} does not run under pipeline "
            "parallelism; use tensor parallelism only"
        )
    k = spec.num_speculative_tokens
    if spec.method == "draft_model":
        from jserve.spec.draft import DraftSpec, load_draft

        draft = load_draft(spec, target, max_model_len)
        return spec, DraftSpec(draft.cfg, k), draft.params
    from jserve.spec.eagle import EagleSpec, load_head

    head = load_head(spec.model, target)
    return spec, EagleSpec(head.cfg, k), head.params
