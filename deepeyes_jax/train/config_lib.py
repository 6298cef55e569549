"""ml-collections config sections <-> the frozen dataclasses they configure, one to one.

    c.rollout = section(RolloutConfig(max_total_len=28672, crop=CropSpec(...)))   # in a config file
    rollout = build(RolloutConfig, cfg.rollout)                                    # in the launcher

`section` writes every field of a dataclass instance (nested dataclasses become nested sections; an
optional field left at None becomes a typed placeholder, so `--config.x=5` parses), so the dataclass'
defaults are the one source of truth and every field is overridable from the command line. `build`
is the inverse: it rejects keys the dataclass does not have (a typo in a config file is an error, as
an unknown `--config.x` flag already is under `lock_config`), turns lists into tuples and recurses
into nested dataclass fields.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping

import ml_collections
import numpy as np
from ml_collections import config_dict


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _optional_type(hint):
    """T for `T | None` / `Optional[T]` (None otherwise)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and type(None) in typing.get_args(hint):
            return typing.get_origin(args[0]) or args[0]
    return None


def _plain(value):
    """A value as a config holds it: tuples for sequences, names for dtypes."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return np.dtype(value).name
    if type(value).__name__ == "_ScalarMeta":  # jnp.float32 and friends
        return np.dtype(value.dtype).name
    if isinstance(value, Mapping):
        return ml_collections.ConfigDict({k: _plain(v) for k, v in value.items()})
    return value


def section(obj) -> ml_collections.ConfigDict:
    """A dataclass instance -> a ConfigDict with one key per field (nested dataclasses recurse)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"section() takes a dataclass instance, got {obj!r}")
    out = ml_collections.ConfigDict()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = section(value)
        elif value is None:
            kind = _optional_type(_hints(type(obj))[f.name])
            out[f.name] = config_dict.placeholder(kind) if kind in (int, float, str, bool) else None
        else:
            out[f.name] = _plain(value)
    return out


def _value(hint, value, where: str):
    if value is None:
        return None
    hint_cls = typing.get_origin(hint) or hint
    if isinstance(hint_cls, type) and dataclasses.is_dataclass(hint_cls):
        return build(hint_cls, value, where=where)
    optional = _optional_type(hint)
    if optional is not None and dataclasses.is_dataclass(optional):
        return build(optional, value, where=where)
    if isinstance(value, (ml_collections.ConfigDict, Mapping)) and hint_cls in (dict, Mapping):
        return {k: _plain_py(v) for k, v in dict(value).items()}
    return _plain_py(value)


def _plain_py(value):
    if isinstance(value, (list, tuple)):
        return tuple(_plain_py(v) for v in value)
    if isinstance(value, ml_collections.ConfigDict):
        return {k: _plain_py(v) for k, v in value.items()}
    return value


def build(cls, values, *, where: str | None = None, **overrides):
    """`cls(**values)` for a ConfigDict / dict section; unknown keys raise ValueError naming them."""
    where = where or cls.__name__
    if isinstance(values, ml_collections.ConfigDict):
        values = values.to_dict()
    values = dict(values or {}, **overrides)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"config section {where}: unknown key(s) {unknown}; {cls.__name__} has {sorted(fields)}")
    hints = _hints(cls)
    return cls(**{k: _value(hints[k], v, f"{where}.{k}") for k, v in values.items()})
