"""Configs as files: dataclass configs built from YAML data (every key and type checked, each error
naming its place), ``--set a.b=v`` overrides, and YAML that refuses a key written twice.

A run config (one with a ``backend`` and a ``rewrite``: the loop's, the comparison's) generates
every stage on its one ``backend``; the rewrite's own ``hinted.backend`` field is no setting of a
run (``config.run_rewrite_config`` hands the rewrite the run's), so a file may not set it and a saved
run config leaves it out.

``config.load_config`` reads a config file with these; it lives beside the ``LoopConfig`` it
defaults to, which this module's functions build but do not import.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from onpolicy_sft.rundir import write_text

# The field of a run config that the run's `backend` decides (module docstring).
RUN_BACKEND_FIELD = ("rewrite", "hinted", "backend")


class ConfigError(ValueError):
    """A value in a config file or a ``--set`` override is wrong; the message names where
    (``path``: the dotted field, when one is to blame)."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path


def from_dict(cls, values: dict[str, Any], where: str = "config"):
    """Build dataclass ``cls`` from a nested dict; ``where`` names the file (or the override) in errors.

    Unknown keys are refused with the valid ones, values are checked against the annotations, and a
    section's own checks (``__post_init__``) run; each error says ``where: section.key: what``.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(values).__name__}")
    *parents, last = RUN_BACKEND_FIELD
    node = _section(values, parents)
    if _is_run_config(cls) and isinstance(node, dict) and last in node:
        name = ".".join(RUN_BACKEND_FIELD)
        raise ConfigError(f"{where}: {name}: the generation backend is set once for the whole run, with "
                          f"`backend:` (now {values.get('backend', 'the default')!r}); remove {name}")
    try:
        return _build(cls, values, [])
    except _Located as err:
        raise ConfigError(f"{where}: {err.path}: {err.reason}", err.path) from None


class _Located(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _build(cls, values, keys: list[str]):
    path = ".".join(keys) or cls.__name__
    if not isinstance(values, dict):
        raise _Located(path, f"expected a mapping ({cls.__name__}), got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in values:
        if key not in names:
            raise _Located(".".join(keys + [str(key)]), f"unknown key; valid keys here: {sorted(names)}")
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, {} if value is None else value, keys + [key])
        else:
            try:
                kwargs[key] = coerce(value, hint, "")
            except ValueError as err:
                raise _Located(".".join(keys + [key]), str(err).removeprefix(": ")) from None
    try:
        return cls(**kwargs)
    except _Located:
        raise
    except (ValueError, TypeError) as err:
        reason = str(err)
        # A section's own check may name the field itself ("hparams.eta: ..."): keep it in the path.
        head, sep, rest = reason.partition(": ")
        if sep and (head in names or head.split(".")[0] in names) and " " not in head:
            raise _Located(".".join(keys + [head]), rest) from None
        raise _Located(path, reason) from None


def coerce(value, hint, where: str):
    """Check a YAML value against a field's annotation; ints are accepted where floats are, and
    numbers written as strings where a float is expected (YAML 1.1 reads "1e-5" as a string)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [coerce(v, item, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {coerce(k, key_hint, where): coerce(v, value_hint, f"{where}.{k}" if where else str(k))
                for k, v in value.items()}
    if hint is Any or not isinstance(hint, type):
        return value  # annotations we cannot check (Literal, Callable, ...) are left to the dataclass
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint in (int, float) and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _is_run_config(cls) -> bool:
    return {"backend", RUN_BACKEND_FIELD[0]} <= {f.name for f in dataclasses.fields(cls)}


def _section(values, keys):
    """The mapping at ``keys`` inside nested mappings ``values``; None where there is none."""
    for key in keys:
        values = values.get(key) if isinstance(values, dict) else None
    return values


def to_dict(config) -> dict[str, Any]:
    """The config as plain data; a run config's without the rewrite's backend (module docstring)."""
    values = dataclasses.asdict(config)
    *parents, last = RUN_BACKEND_FIELD
    node = _section(values, parents)
    if _is_run_config(config) and isinstance(node, dict):
        node.pop(last, None)
    return values


def apply_overrides(config, overrides: list[str]):
    """A copy of ``config`` with ``section.key=value`` overrides; values are parsed as YAML."""
    values = to_dict(config)
    keys_of = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: must look like section.key=value (e.g. train.lr=1e-5)")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        keys_of[item] = path.strip()
        node = values
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(node.get(key), dict):
                raise ConfigError(f"--set {item}: {'.'.join(keys[: depth + 1])} is not a section")
            node = node[key]
        try:
            node[keys[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({err})") from None
    try:
        return from_dict(type(config), values, where="--set")
    except ConfigError as err:
        # Name the override to blame: the last one that set the failing field or a section around it.
        blamed = [item for item, key in keys_of.items()
                  if err.path and (err.path == key or err.path.startswith(key + ".") or key.startswith(err.path + "."))]
        where = f"--set {blamed[-1]}" if blamed else "--set " + " --set ".join(overrides)
        raise ConfigError(str(err).replace("--set", where, 1), err.path) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key written twice in one mapping: a plain load keeps the last value,
    so a forgotten earlier line would silently decide the run."""


def _unique_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise _DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, again: int):
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


def read_yaml(path: Path):
    """The YAML file ``path`` as plain data; invalid YAML or a duplicate key is a ``ConfigError``
    naming the file and line."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except _DuplicateKey as dup:
        raise ConfigError(f"{path}: line {dup.again}: key {dup.key!r} written twice in one mapping (first on line "
                          f"{dup.first}); keep one") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def save_config(config, path: str | Path) -> Path:
    return write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
