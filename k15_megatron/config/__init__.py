"""Experiment configuration: typed schema, YAML/CLI loading, validation, model architecture.

Import-light on purpose (stdlib, omegaconf, pyyaml; no torch or Megatron) so that
``k15 config show`` and validation run before anything heavy is imported.

Public API::

    cfg = load_config("examples/tiny.yaml", ["parallel.tensor=2"])   # validated dataclasses
    arch = resolve_model_arch(cfg.model)                              # concrete ModelArch
    save_resolved_config(cfg)                                         # <run_dir>/config.yaml
"""

from k15_megatron.config.env import (have_transformer_engine, resolve_world_size,
                                     world_size_from_env)
from k15_megatron.config.errors import ConfigError
from k15_megatron.config.loader import load_config, save_resolved_config, to_yaml
from k15_megatron.config.model_arch import ModelArch, read_hf_config, resolve_model_arch
from k15_megatron.config.schema import (CheckpointConfig, DataConfig, ExperimentConfig,
                                        LoggingConfig, ModelConfig, OptimConfig, ParallelConfig,
                                        PrecisionConfig)
from k15_megatron.config.validate import validate

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "ExperimentConfig", "LoggingConfig",
    "ModelArch", "ModelConfig", "OptimConfig", "ParallelConfig", "PrecisionConfig",
    "have_transformer_engine", "load_config", "read_hf_config", "resolve_model_arch",
    "resolve_world_size", "save_resolved_config", "to_yaml", "validate", "world_size_from_env",
]
