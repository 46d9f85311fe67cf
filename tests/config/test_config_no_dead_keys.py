"""No dead configuration: every field of the schema is read somewhere in k15_megatron/ outside
config/ (the package that defines and validates the keys, which therefore does not count).

A field counts as read when its name appears as an attribute (``.name``) or a string key
(``"name"``) in a module outside config/. The allow-list below holds the fields that are read
generically (through a function in config/ that turns them into another object, which the
rest of the package uses); each entry says where.
"""

from __future__ import annotations

import dataclasses
import os
import re

from tooling import REPO_ROOT

from k15_megatron.config.schema import ExperimentConfig

PACKAGE = os.path.join(REPO_ROOT, "k15_megatron")

# model.* architecture fields: config/model_arch.py:resolve_model_arch copies every one of them
# (by dataclasses.fields) into ModelArch, which models/, checkpoint/ and train/ read.
MODEL_ARCH_FIELDS = {
    "model." + name for name in (
        "family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
        "num_query_groups", "kv_channels", "vocab_size", "max_position_embeddings", "rope_theta",
        "rope_scaling", "norm_epsilon", "tie_word_embeddings", "add_qkv_bias", "qk_layernorm")
}
ALLOW_GENERIC = MODEL_ARCH_FIELDS | {
    # config/env.py:resolve_world_size reads it; parallel/initialize.py and jobs/launch.py use
    # the resolved size.
    "parallel.world_size",
    # Read through the interpolation of the run_dir default, runs/${name}.
    "name",
}


def _leaves(cls, prefix=""):
    """(dotted key, section class) of every leaf field."""
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _leaves(type(default), key + ".")
        else:
            yield key, cls


def _modules_outside_config():
    texts = []
    for root, _, files in os.walk(PACKAGE):
        if os.path.relpath(root, PACKAGE).split(os.sep)[0] == "config":
            continue
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    texts.append(f.read())
    return texts


def _ambiguous_names():
    """Field names that a bare ``.name`` cannot attribute to one key: names of several schema
    fields (``num_workers``, ``enabled``), and attributes of objects the package uses everywhere
    (``torch.load``, ``json.load``, ``os.path.dirname``...)."""
    import collections
    import json

    import torch

    counts = collections.Counter(key.rsplit(".", 1)[-1] for key, _ in _leaves(ExperimentConfig))
    common = set(dir(torch)) | set(dir(torch.Tensor)) | set(dir(os)) | set(dir(os.path)) | set(dir(json))
    common |= set(dir(str)) | set(dir(dict)) | set(dir(list)) | {"name", "dir", "path", "output"}
    return {n for n, c in counts.items() if c > 1} | common


def _is_read(key: str, section: type, modules, ambiguous) -> bool:
    """A unique name is read when some module has ``.name`` or ``"name"``. An ambiguous one
    must be qualified by its section (``cfg.checkpoint.load``, ``logging_cfg.dir``), or appear
    as ``.name`` in a module that names the section's class (``RolloutConfig``)."""
    parts = key.split(".")
    name = parts[-1]
    if name not in ambiguous:
        return any(re.search(rf"\.{name}\b|[\"']{name}[\"']", text) for text in modules)
    parent = parts[-2] if len(parts) > 1 else "cfg"
    qualified = rf"\b{parent}(_cfg)?\.{name}\b"
    for text in modules:
        if re.search(qualified, text):
            return True
        if section.__name__ in text and re.search(rf"\.{name}\b", text):
            return True
    return False


def test_every_schema_field_is_read_outside_config():
    modules = _modules_outside_config()
    ambiguous = _ambiguous_names()
    dead = [key for key, section in _leaves(ExperimentConfig)
            if key not in ALLOW_GENERIC and not _is_read(key, section, modules, ambiguous)]
    assert not dead, f"config keys nothing outside config/ reads: {dead}"


def test_the_allow_list_is_not_stale():
    keys = {key for key, _ in _leaves(ExperimentConfig)}
    assert ALLOW_GENERIC <= keys, sorted(ALLOW_GENERIC - keys)
