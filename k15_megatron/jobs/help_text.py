"""The ``--help`` text of the commands, generated from what the code already says.

:func:`description` and :func:`details` turn a command module's docstring into its ``--help``
description (the first paragraph, whole) and epilog (the rest). :func:`config_keys_epilog` lists a job's main config keys with their
schema defaults and the first sentence of each field's docstring, read from the dataclasses in
:mod:`k15_megatron.config` (the attribute docstrings under each field), so the help cannot
drift from the schema.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
from typing import Dict, List, Sequence

COMMON_KEYS = ("run_dir", "model.hf_path", "model.init_from", "precision.dtype", "data.chat_template", "data.too_long",
               "parallel", "seed", "deterministic")
"""Keys every config-driven job lists (a section name lists the section's own fields)."""


def _paragraphs(doc: str) -> List[str]:
    return [textwrap.fill(re.sub(r":\w+:`", "`", " ".join(p.split()).replace("``", "`")), width=96)
            for p in doc.strip().split("\n\n") if p.strip()]


def description(doc: str) -> str:
    """The first paragraph of a module docstring as plain text, wrapped (use with
    ``argparse.RawDescriptionHelpFormatter``)."""
    return _paragraphs(doc)[0]


def details(doc: str) -> str:
    """The docstring's other paragraphs, wrapped, for a ``--help`` epilog."""
    return "\n\n".join(_paragraphs(doc)[1:])


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> Dict[str, str]:
    """{field name: its attribute docstring} of the dataclass ``cls`` (from its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = after.value.value
    return docs


def _first_sentence(text: str) -> str:
    text = re.sub(r":\w+:`", "`", " ".join(text.split()).replace("``", "`"))  # drop Sphinx roles
    match = re.search(r"(?<=[a-z0-9)`'\"])(?<! al)(?<! eq)(?<! e\.g)(?<! i\.e)\. ", text)  # not "et al. ", "eq. 7"
    return text[:match.start() + 1] if match else text


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _resolve(root_cls, dotted: str):
    """(dataclass field, owning class) of ``dotted`` under ``root_cls``."""
    cls, field = root_cls, None
    for part in dotted.split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert part in fields, f"{dotted}: no such config key"
        field, owner = fields[part], cls
        default = _default(field)
        cls = type(default) if dataclasses.is_dataclass(default) else None
    return field, owner


def expand_keys(root_cls, keys: Sequence[str]) -> List[str]:
    """Keys with each section name replaced by the section's own (non-section) fields."""
    out = []
    for key in keys:
        field, _ = _resolve(root_cls, key)
        default = _default(field)
        if dataclasses.is_dataclass(default):
            out += [f"{key}.{f.name}" for f in dataclasses.fields(default)
                    if not dataclasses.is_dataclass(_default(f))]
        else:
            out.append(key)
    return out


def config_keys_epilog(keys: Sequence[str], *, root_cls=None) -> str:
    """The ``--help`` epilog listing ``COMMON_KEYS`` + ``keys``: ``key (default: value)`` and,
    indented below, the first sentence of the field's docstring."""
    if root_cls is None:
        from k15_megatron.config.schema import ExperimentConfig as root_cls
    lines = ["main config keys (give them in the YAML recipe or as KEY=VALUE; "
             "`k15 config show CONFIG` prints every key):"]
    seen = set()
    for key in expand_keys(root_cls, [*COMMON_KEYS, *keys]):
        if key in seen:
            continue
        seen.add(key)
        field, owner = _resolve(root_cls, key)
        doc = _first_sentence(field_docs(owner).get(field.name, ""))
        lines.append(f"  {key} (default: {_default(field)!r})")
        if doc:
            lines += textwrap.wrap(doc, width=96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)
