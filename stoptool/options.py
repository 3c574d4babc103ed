"""Options declared once: a dataclass field with its default, help, bounds and choices.

`option(...)` is what every configurable field of stoptool is declared with (the pretraining
config's sections, the mask settings, bench and probe). From that one declaration come:
- the value's type and range checks (`check_fields`), with errors that name the field;
- the parsing of YAML and `--set KEY=VALUE` values (`coerce`);
- the command line's flags and their help (`stoptool.cliopts`).

A field's *key* is its name unless the metadata says otherwise (the mask settings' `mode` is
`mask_mode` among the pretraining keys). Choices come from `Literal` annotations.
"""

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, Field, field, fields
from typing import Any, Literal

from stoptool.errors import UserError

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Attention = Literal["auto", "sdpa", "math"]
Interpolation = Literal["bilinear", "bicubic"]
Decode = Literal["cpu", "gpu"]
# The k-NN's features (stoptool/probe/knn.py); one default for `probe --method knn` and the online k-NN.
KnnFeatures = Literal["whitened", "raw"]
KNN_FEATURES = "whitened"
KNN_FEATURES_HELP = ("whitened: PCA-whitened by the training split, then cosine (tracks the logistic "
                     "probe) | raw: cosine on the features as they come, DINO's k-NN as published.")
PAIR = tuple[float, float]


def option(
    default: Any,
    help: str,
    *,
    default_text: str | None = None,
    key: str | None = None,
    flags: tuple[str, ...] | None = None,
    low: float | None = None,
    high: float | None = None,
    positive: bool = False,
    cli: bool = True,
    argument: bool = False,
    required: bool = False,
    metavar: str | None = None,
) -> Any:
    """A dataclass field carrying what the checks, the parsers and the CLI need.

    `default_text` replaces the default in help where it depends on other fields (None in the
    dataclass, filled in later); `low`/`high` are inclusive bounds, `positive` excludes 0;
    `flags` overrides the CLI spelling (e.g. ("--download",) for an on-only switch); `cli=False`
    keeps a field off the command line (it stays reachable from YAML and `--set`). `argument`
    makes it a positional argument (`required`: one the command cannot do without; a `list`
    field takes one or more); `metavar` names its value in help."""
    meta = {"help": help, "default_text": default_text, "key": key, "flags": flags, "low": low,
            "high": high, "positive": positive, "cli": cli, "argument": argument, "required": required,
            "metavar": metavar}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def like(source: type, name: str, default: Any = MISSING, **changes) -> Any:
    """The option `name` of dataclass `source`, with another default or metadata: one
    declaration shared by commands whose defaults differ (bench measures vit_s16, pretrain
    trains vit_t4)."""
    f = next(f for f in fields(source) if f.name == name)
    meta = {**f.metadata, **changes}
    value = f.default if default is MISSING else default
    return field(default=value, metadata=meta)


def declared(cls: type) -> list[Field]:
    """The fields of `cls` declared with `option` (with help), in order."""
    return [f for f in fields(cls) if "help" in f.metadata]


def key_of(f: Field) -> str:
    return f.metadata.get("key") or f.name


def base_type(f: Field) -> Any:
    """The field's type without `| None`."""
    kind = f.type
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if len(args) == 1 else kind
    return kind


def optional(f: Field) -> bool:
    kind = f.type
    union = isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union
    return union and type(None) in typing.get_args(kind)


def choices(f: Field) -> tuple[str, ...] | None:
    kind = base_type(f)
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else None


def is_pair(f: Field) -> bool:
    return base_type(f) == PAIR


def is_list(f: Field) -> bool:
    """A field of several values (`list[str]`): a repeatable option, or a positional argument
    taking one or more."""
    return typing.get_origin(base_type(f)) is list


def default_help(f: Field) -> str:
    """The default as help shows it."""
    if f.metadata.get("default_text"):
        return f.metadata["default_text"]
    value = f.default if f.default is not MISSING else None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def coerce(f: Field, value: Any) -> Any:
    """`value` (from YAML, a flag or `--set`) as the field's type, or a UserError naming the key.

    YAML reads `1e-3` as a string and `5` where 5.0 is meant; both are taken as numbers."""
    key = key_of(f)
    if value is None:
        if optional(f):
            return None
        raise UserError(f"{key} cannot be null", key=key)
    kind = base_type(f)
    if kind == PAIR:
        if isinstance(value, str):
            value = value.split(",")
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise UserError(f"{key} takes two numbers (MIN,MAX or [MIN, MAX]), got {value!r}", key=key)
        return (_number(key, value[0], float), _number(key, value[1], float))
    if kind in (int, float):
        return _number(key, value, kind)
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key} takes true or false, got {value!r}", key=key)
        return value
    if (kind is str or choices(f)) and not isinstance(value, str):
        raise UserError(f"{key} takes a string, got {value!r}", key=key)
    if kind is dict and not isinstance(value, dict):
        raise UserError(f"{key} takes a mapping, got {value!r}", key=key)
    if typing.get_origin(kind) is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [str(v) for v in items]
    return value


def _number(key: str, value: Any, number: type) -> int | float:
    try:
        if isinstance(value, bool):
            raise ValueError
        parsed = float(value)
        if number is int:
            if not parsed.is_integer():
                raise ValueError
            return int(parsed)
        return parsed
    except (TypeError, ValueError, OverflowError):
        what = "an integer" if number is int else "a number"
        raise UserError(f"{key} takes {what}, got {value!r}", key=key) from None


def check_fields(obj: Any) -> None:
    """The checks every declared field of `obj` states: finite numbers, one of its choices,
    within its bounds. Checks that relate fields to each other stay with their class."""
    for f in declared(type(obj)):
        value, key, meta = getattr(obj, f.name), key_of(f), f.metadata
        if value is None:
            continue
        values = value if isinstance(value, tuple) else (value,)
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if any(not math.isfinite(v) for v in numbers):
            raise UserError(f"{key} must be a finite number, got {_show(value)}", key=key)
        options = choices(f)
        if options and value not in options:
            raise UserError(f"{key} must be one of {', '.join(options)}, got '{value}'", key=key)
        for v in numbers:
            if meta.get("positive") and v <= 0:
                raise UserError(f"{key} must be positive, got {_show(value)}", key=key)
            low, high = meta.get("low"), meta.get("high")
            if low is not None and high is not None and not low <= v <= high:
                raise UserError(f"{key} must be between {_show(low)} and {_show(high)}, got {_show(value)}",
                                key=key)
            if low is not None and v < low:
                raise UserError(f"{key} must be >= {_show(low)}, got {_show(value)}", key=key)
            if high is not None and v > high:
                raise UserError(f"{key} must be <= {_show(high)}, got {_show(value)}", key=key)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ", ".join(_show(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def build(cls: type, values: dict[str, Any]) -> Any:
    """An instance of `cls` from values keyed by field key, each coerced to its field's type."""
    by_key = {key_of(f): f for f in declared(cls)}
    kwargs = {by_key[k].name: coerce(by_key[k], v) for k, v in values.items()}
    return cls(**kwargs)


def checked(cls: type, values: dict[str, Any]) -> Any:
    """`build`, then the checks every field states (`check_fields`): a command's options as its
    flags gave them, each within its bounds and choices."""
    obj = build(cls, values)
    check_fields(obj)
    return obj


def as_flat(obj: Any) -> dict[str, Any]:
    """The declared fields of `obj` by key, tuples as lists (as YAML and JSON write them)."""
    out = {}
    for f in declared(type(obj)):
        value = getattr(obj, f.name)
        out[key_of(f)] = list(value) if isinstance(value, tuple) else value
    return out


def replace_keys(obj: Any, values: dict[str, Any]) -> Any:
    """`obj` with the fields named by key in `values` replaced (values already typed)."""
    names = {key_of(f): f.name for f in declared(type(obj))}
    return dataclasses.replace(obj, **{names[k]: v for k, v in values.items()})
