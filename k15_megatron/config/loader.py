"""Build a typed :class:`ExperimentConfig` from schema defaults, YAML and CLI overrides.

``load_config`` = merge(schema defaults, YAML file, dotted overrides) -> resolve ``${...}``
interpolation -> :func:`~k15_megatron.config.validate.validate` -> dataclass instance.

Keys are checked against the schema by walking the dataclasses (not by catching OmegaConf
errors), so every unknown key in the file and in the overrides is reported at once with its
full dotted name, where it came from and a did-you-mean. Values are applied leaf by leaf so
that each type error, too, names its key and source. Nothing here knows the section names:
a section added to the schema is loaded with no change to this module.

A YAML file may start with ``defaults: [base.yaml, ...]``: those files (paths relative to
the including file) are applied first, in order, then the file itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from k15_megatron.config.errors import ConfigError
from k15_megatron.config.schema import ExperimentConfig
from k15_megatron.config.validate import validate

INCLUDE_KEY = "defaults"
RESOLVED_CONFIG_NAME = "config.yaml"


def load_config(
    path: Optional[str],
    overrides: Sequence[str] = (),
    *,
    check: bool = True,
    schema: Type[ExperimentConfig] = ExperimentConfig,
    te_available: Optional[Callable[[], bool]] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> ExperimentConfig:
    """The resolved, validated configuration.

    Args:
        path: YAML recipe, or ``None`` for schema defaults only.
        overrides: ``"dotted.key=value"`` strings applied last (values parsed as YAML,
            ``null`` for None, ``${...}`` allowed).
        check: run :func:`validate` (cross-field rules); ``False`` only loads and types.
        schema: the root dataclass; a subclass of ExperimentConfig with extra sections
            loads the same way (used to test that new sections need no loader change).
        te_available / environ: passed to :func:`validate` (probe and world-size source).

    Raises:
        ConfigError (a ValueError) listing every problem found.
    """
    cfg = OmegaConf.structured(schema)
    errors: List[str] = []
    if path is not None:
        for source, data in _read_yaml_chain(path, ()):
            errors += _apply(cfg, data, source, schema)
    for item in overrides:
        errors += _apply_override(cfg, item, schema)
    if errors:
        raise ConfigError(errors)
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:  # a recipe's `???`: a value the user must give
            raise ConfigError([f"{key}: required, no value given (the recipe leaves it as ???); set it in the "
                               f"YAML or as {key}=VALUE" for key in missing])
        result = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError([f"config key '{e.full_key}': {e.msg}"]) from None
    assert isinstance(result, schema)
    if check:
        validate(result, te_available=te_available, environ=environ)
    return result


def to_yaml(cfg: Any) -> str:
    """YAML text of a config dataclass (root or any section), in schema field order."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_resolved_config(cfg: ExperimentConfig, run_dir: Optional[str] = None) -> str:
    """Write ``<run_dir>/config.yaml`` (``run_dir`` defaults to ``cfg.run_dir``) atomically;
    returns its path. Call it on one rank only. Loading that file reproduces ``cfg``."""
    run_dir = cfg.run_dir if run_dir is None else run_dir
    os.makedirs(run_dir, exist_ok=True)
    target = os.path.join(run_dir, RESOLVED_CONFIG_NAME)
    tmp = os.path.join(run_dir, f".config.{os.getpid()}.yaml")  # open(): the user's umask, unlike mkstemp's 0600
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(to_yaml(cfg))
    os.replace(tmp, target)
    return target


def _read_yaml_chain(path: str, stack: Tuple[str, ...]) -> List[Tuple[str, Dict[str, Any]]]:
    """[(file, mapping)] for ``path`` and its ``defaults`` includes, includes first."""
    real = os.path.realpath(path)
    if real in stack:
        cycle = " -> ".join(stack + (real,))
        raise ConfigError([f"{path}: '{INCLUDE_KEY}' include cycle ({cycle})"])
    if not os.path.isfile(path):
        raise ConfigError([f"config file not found: {path}"])
    try:
        node = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError([f"{path}: not valid YAML ({e})"]) from None
    if not isinstance(node, DictConfig):
        raise ConfigError([f"{path}: the top level must be a mapping of config keys"])
    data = OmegaConf.to_container(node, resolve=False)
    assert isinstance(data, dict)
    includes = data.pop(INCLUDE_KEY, None) or []
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError([f"{path}: '{INCLUDE_KEY}' must be a list of YAML file paths"])
    chain: List[Tuple[str, Dict[str, Any]]] = []
    for inc in includes:
        inc_path = inc if os.path.isabs(inc) else os.path.join(os.path.dirname(path), inc)
        chain += _read_yaml_chain(inc_path, stack + (real,))
    chain.append((path, data))
    return chain


def _apply_override(cfg: DictConfig, item: str, schema: type) -> List[str]:
    key, sep, _ = item.partition("=")
    if not sep or not key.strip():
        return [f"override {item!r} must look like dotted.key=value (e.g. model.num_layers=4)"]
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        return [f"override {item!r} could not be parsed ({e})"]
    assert isinstance(parsed, dict)
    return _apply(cfg, parsed, f"override {item!r}", schema)


def _apply(cfg: DictConfig, data: Mapping[str, Any], source: str, schema: type) -> List[str]:
    """Set every leaf of ``data`` on ``cfg``; return one message per unknown key or bad type."""
    errors: List[str] = []
    leaves: List[Tuple[str, Any, Any]] = []
    _flatten(data, schema, "", source, errors, leaves, schema)
    for key, value, hint in leaves:
        try:
            OmegaConf.update(cfg, key, value, merge=isinstance(value, dict))
        except OmegaConfBaseException:
            errors.append(f"config key '{key}' ({source}): expected {_type_name(hint)}, "
                          f"got {value!r} ({type(value).__name__})")
    return errors


def _flatten(data: Mapping[str, Any], cls: type, prefix: str, source: str,
             errors: List[str], out: List[Tuple[str, Any, Any]], root: type) -> None:
    """Walk ``data`` along the schema ``cls``: leaves go to ``out`` as (key, value, type)."""
    hints = _field_types(cls)
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            errors.append(_unknown_key_message(key, str(name), prefix, hints, source, root))
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if isinstance(value, Mapping):
                _flatten(value, hint, f"{key}.", source, errors, out, root)
            else:
                errors.append(f"config key '{key}' ({source}): is a section; expected a mapping "
                              f"of its keys, got {value!r}")
        else:
            out.append((key, value, hint))


def _field_types(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_leaf_keys(cls: type, prefix: str = "") -> List[str]:
    keys: List[str] = []
    for name, hint in _field_types(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += _all_leaf_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key_message(key: str, name: str, prefix: str, hints: Mapping[str, Any],
                         source: str, root: type) -> str:
    """'unknown config key ...; did you mean ...?' trying siblings first, then any key."""
    close = difflib.get_close_matches(name, list(hints), n=1, cutoff=0.6)
    if close:
        suggestion = f"{prefix}{close[0]}"
    else:
        every = _all_leaf_keys(root)
        by_last = {k.rsplit(".", 1)[-1]: k for k in every}
        close = difflib.get_close_matches(name, list(by_last), n=1, cutoff=0.75)
        suggestion = by_last[close[0]] if close else None
    msg = f"unknown config key '{key}' ({source})"
    if suggestion:
        return f"{msg}; did you mean '{suggestion}'?"
    section = prefix.rstrip(".") or "the top level"
    return f"{msg}; valid keys in {section}: {', '.join(hints)}"


def _type_name(hint: Any) -> str:
    """'int', 'int or null', 'mapping or null' ... for error messages."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    origin = typing.get_origin(hint)
    if origin in (dict, Dict):
        return "mapping"
    if origin in (list, List):
        return "list"
    return getattr(hint, "__name__", str(hint))
