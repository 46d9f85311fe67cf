"""Loading: schema defaults <- YAML (with `defaults` includes) <- dotted overrides,
interpolation, unknown-key and type errors, the resolved-config round trip, new sections."""

from __future__ import annotations

import dataclasses
import os
import pickle
import textwrap
from dataclasses import dataclass, field
from typing import List

import pytest
import yaml

from k15_megatron.config import (ConfigError, ExperimentConfig, ModelConfig, load_config,
                                 save_resolved_config, to_yaml)
from k15_megatron.config.schema import at_least, one_of

# An architecture given inline (hf_path null) so configs validate without a model folder.
TINY_MODEL = {
    "family": "llama", "num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 128,
    "num_attention_heads": 4, "num_query_groups": 2, "vocab_size": 256,
    "max_position_embeddings": 512, "norm_epsilon": 1e-5,
}
TINY_OVERRIDES = [f"model.{k}={v}" for k, v in TINY_MODEL.items()] + [
    "data.seq_length=128", "parallel.world_size=1"]


def write_yaml(path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_defaults_resolve_interpolations_and_are_typed():
    cfg = load_config(None, check=False)
    assert isinstance(cfg, ExperimentConfig) and isinstance(cfg.model, ModelConfig)
    assert cfg.run_dir == "runs/k15"
    assert cfg.checkpoint.save_dir == "runs/k15/checkpoints"
    assert cfg.logging.dir == "runs/k15"
    # Everything else equals the dataclass defaults (one source of truth).
    plain = ExperimentConfig()
    assert cfg.parallel == plain.parallel and cfg.optim == plain.optim and cfg.data == plain.data


def test_yaml_then_overrides_precedence_and_types(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", """
        name: exp
        parallel: {tensor: 2, pipeline: 2, world_size: 8}
        optim: {lr: 3e-5}
        model: {rope_scaling: {rope_type: llama3, factor: 8.0}}
    """)
    cfg = load_config(path, ["parallel.tensor=4", "model.rope_scaling.low_freq_factor=1",
                             "optim.lr_decay_iters=null", "name=exp2"], check=False)
    assert cfg.parallel.tensor == 4 and cfg.parallel.pipeline == 2  # override wins, YAML kept
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == pytest.approx(3e-5)
    # Overriding one key of a mapping field merges into it.
    assert cfg.model.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1}
    assert cfg.optim.lr_decay_iters is None
    assert cfg.run_dir == "runs/exp2" and cfg.checkpoint.save_dir == "runs/exp2/checkpoints"


def test_interpolation_between_sections_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("K15_TEST_ROOT", "/scratch/me")
    path = write_yaml(tmp_path / "r.yaml", """
        name: tp${parallel.tensor}
        run_dir: ${oc.env:K15_TEST_ROOT}/${name}
        optim: {train_iters: 50, lr_decay_iters: "${optim.train_iters}"}
    """)
    cfg = load_config(path, ["parallel.tensor=2"], check=False)
    assert cfg.name == "tp2" and cfg.run_dir == "/scratch/me/tp2"
    assert cfg.optim.lr_decay_iters == 50 and isinstance(cfg.optim.lr_decay_iters, int)


def test_unknown_keys_name_full_key_file_and_suggestion(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", """
        model: {num_layer: 4}
        paralel: {tensor: 2}
        num_layers: 3
        data: {seq_len: 10}
    """)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["optim.learning_rate=1", "parallel.tp=2"])
    errors = info.value.errors
    assert len(errors) == 6  # every problem reported in one go
    text = str(info.value)
    assert "'model.num_layer'" in text and "did you mean 'model.num_layers'" in text
    assert "'paralel'" in text and "did you mean 'parallel'" in text
    assert "unknown config key 'num_layers'" in text and "'model.num_layers'?" in text
    assert "'data.seq_len'" in text and "'data.seq_length'" in text
    assert path in errors[0]
    assert "'optim.learning_rate'" in text and "override 'optim.learning_rate=1'" in text
    # No close match: the message lists the valid keys of that section instead.
    tp_err = next(e for e in errors if "parallel.tp" in e)
    assert "valid keys in parallel: tensor, pipeline" in tp_err
    # The error survives pickling (multi-process launchers send exceptions between ranks).
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.errors == errors and str(copy) == text


def test_type_errors_name_key_and_expected_type(tmp_path):
    path = write_yaml(tmp_path / "t.yaml", """
        parallel: {tensor: two, sequence_parallel: maybe}
        model: {rope_scaling: 3, hf_path: {a: 1}}
        data: 5
    """)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["optim.train_iters=1.5"])
    text = str(info.value)
    assert "'parallel.tensor'" in text and "expected int, got 'two'" in text
    assert "'parallel.sequence_parallel'" in text and "expected bool" in text
    assert "'model.rope_scaling'" in text and "expected mapping or null" in text
    assert "'model.hf_path'" in text and "expected str or null" in text
    assert "'data'" in text and "is a section" in text
    assert "'optim.train_iters'" in text and "expected int, got 1.5" in text


def test_required_values_left_as_missing_are_named_with_how_to_set_them(tmp_path):
    path = write_yaml(tmp_path / "own.yaml", """
        model:
          hf_path: ???
        data:
          train_path: ???
    """)
    with pytest.raises(ConfigError) as info:
        load_config(path, [])
    assert [line.split(":")[0] for line in info.value.errors] == ["data.train_path", "model.hf_path"]
    assert "set it in the YAML or as model.hf_path=VALUE" in str(info.value)
    cfg = load_config(path, TINY_OVERRIDES + ["model.hf_path=null", "data.train_path=t.jsonl"], check=False)
    assert cfg.data.train_path == "t.jsonl"


def test_malformed_override_and_bad_interpolation():
    with pytest.raises(ConfigError, match="must look like dotted.key=value"):
        load_config(None, ["model.num_layers"], check=False)
    with pytest.raises(ConfigError, match=r"'run_dir'.*nope"):
        load_config(None, ["run_dir=${nope}/x"], check=False)
    with pytest.raises(ConfigError, match=r"'parallel.tensor'.*could not be converted"):
        load_config(None, ["parallel.tensor=${name}"], check=False)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*absent.yaml"):
        load_config(str(tmp_path / "absent.yaml"))
    bad = write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    broken = write_yaml(tmp_path / "broken.yaml", "model: {num_layers: 4\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_defaults_includes_apply_in_order_and_detect_cycles(tmp_path):
    (tmp_path / "sub").mkdir()
    write_yaml(tmp_path / "sub" / "base.yaml", "seed: 1\nparallel: {tensor: 2, pipeline: 2}\n")
    write_yaml(tmp_path / "mid.yaml", "defaults: [sub/base.yaml]\nseed: 2\n")
    top = write_yaml(tmp_path / "top.yaml", "defaults: [mid.yaml]\nparallel: {tensor: 4}\n")
    cfg = load_config(top, check=False)
    assert (cfg.seed, cfg.parallel.tensor, cfg.parallel.pipeline) == (2, 4, 2)
    # Unknown keys in an included file name that file.
    write_yaml(tmp_path / "sub" / "base.yaml", "seeed: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(top, check=False)
    assert os.path.join("sub", "base.yaml") in str(info.value) and "'seed'" in str(info.value)
    write_yaml(tmp_path / "a.yaml", "defaults: [b.yaml]\n")
    write_yaml(tmp_path / "b.yaml", "defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(str(tmp_path / "a.yaml"), check=False)


def test_load_validates_by_default():
    with pytest.raises(ConfigError, match="parallel.tensor=3"):
        load_config(None, TINY_OVERRIDES + ["parallel.tensor=3", "parallel.world_size=3"])
    cfg = load_config(None, TINY_OVERRIDES)
    assert cfg.model.num_layers == 4


def test_save_resolved_config_round_trip(tmp_path):
    cfg = load_config(None, TINY_OVERRIDES + [f"run_dir={tmp_path}/run",
                                              "model.rope_scaling={rope_type: default}"])
    path = save_resolved_config(cfg)
    assert path == os.path.join(str(tmp_path), "run", "config.yaml")
    text = open(path).read()
    assert "${" not in text and f"save_dir: {tmp_path}/run/checkpoints" in text
    assert load_config(path) == cfg
    assert sorted(os.listdir(tmp_path / "run")) == ["config.yaml"]  # no temp file left
    # A section alone serialises too (functions take the section they need).
    assert yaml.safe_load(to_yaml(cfg.parallel))["world_size"] == 1


# --- a section added later: one line in the root dataclass, no loader/validate change ---

@dataclass
class _ToySection:
    """Stands in for rl/rewards sections written by other modules."""

    kl: float = at_least(0.1, 0.0)
    """A coefficient that must be non-negative."""
    mode: str = one_of("a", ("a", "b"))
    """A choice."""
    steps: int = 1
    """Cross-checked against kl by the hook below."""

    def config_errors(self, prefix: str) -> List[str]:
        if self.steps > 1 and self.kl == 0:
            return [f"{prefix}.steps={self.steps} needs {prefix}.kl > 0"]
        return []


@dataclass
class _ExtendedConfig(ExperimentConfig):
    toy: _ToySection = field(default_factory=_ToySection)
    """The one added line."""


def test_new_section_is_loaded_and_validated_generically(tmp_path):
    cfg = load_config(None, TINY_OVERRIDES + ["toy.kl=0.5"], schema=_ExtendedConfig)
    assert isinstance(cfg.toy, _ToySection) and cfg.toy.kl == 0.5
    with pytest.raises(ConfigError) as info:
        load_config(None, TINY_OVERRIDES + ["toy.kll=1"], schema=_ExtendedConfig)
    assert "did you mean 'toy.kl'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, TINY_OVERRIDES + ["toy.kl=-1", "toy.mode=c"], schema=_ExtendedConfig)
    assert "toy.kl=-1.0 must be >= 0.0" in str(info.value)
    assert "toy.mode='c' is not a valid choice" in str(info.value)
    with pytest.raises(ConfigError, match=r"toy.steps=3 needs toy.kl > 0"):
        load_config(None, TINY_OVERRIDES + ["toy.kl=0", "toy.steps=3"], schema=_ExtendedConfig)
    assert [f.name for f in dataclasses.fields(_ExtendedConfig)][-1] == "toy"
