"""One validation layer for user-supplied settings (training YAML and ``--set``, a model's ``config.json``).

A setting is a dataclass field: its annotation gives the type (``int``, ``float``, ``str``, ``bool``, ``dict``,
``dict[str, float]``, ``list[T]``, ``tuple[T, ...]`` of fixed length, ``X | None``), and ``field(metadata=rule(...))``
gives its range. :func:`build` turns a mapping into the dataclass, checking both, and every failure is one
:class:`~regproxy_cli.errors.RegproxyError` line naming the dotted key (``optim.lr``, ``palette[3][0]``).
No schema library: the core dependencies stay as they are, and the rules read as a table next to the defaults.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from regproxy_cli.errors import RegproxyError


@dataclass(frozen=True)
class Rule:
    """What a value (or each item of a list) must satisfy beyond its type. NaN fails every bound."""

    low: float | None = None  # value >= low
    above: float | None = None  # value > low, strictly
    high: float | None = None  # value <= high
    below: float | None = None  # value < high, strictly
    length: int | None = None  # a list's / tuple's exact length
    max_length: int | None = None
    choices: tuple | None = None
    each: Rule | None = None  # applied to every item of a list / tuple

    def check(self, key: str, value: Any, fail: Callable[[str, str], RegproxyError]) -> None:
        if value is None:
            return
        if isinstance(value, (list, tuple)):
            if self.length is not None and len(value) != self.length:
                raise fail(key, f"expected {self.length} values, got {len(value)}")
            if self.max_length is not None and len(value) > self.max_length:
                raise fail(key, f"at most {self.max_length} values, got {len(value)}")
            if self.each is not None:
                for index, item in enumerate(value):
                    self.each.check(f"{key}[{index}]", item, fail)
            return
        if self.choices is not None and value not in self.choices:
            raise fail(key, f"{value!r} is not one of {', '.join(str(c) for c in self.choices)}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # written as `not (a <= b)` so that NaN fails
            if isinstance(value, float) and not math.isfinite(value):
                raise fail(key, f"must be a finite number, got {value!r}")
            if self.low is not None and not value >= self.low:
                raise fail(key, f"must be >= {self.low:g}, got {value!r}")
            if self.above is not None and not value > self.above:
                raise fail(key, f"must be > {self.above:g}, got {value!r}")
            if self.high is not None and not value <= self.high:
                raise fail(key, f"must be <= {self.high:g}, got {value!r}")
            if self.below is not None and not value < self.below:
                raise fail(key, f"must be < {self.below:g}, got {value!r}")


def rule(**bounds: Any) -> dict[str, Rule]:
    """Field metadata for a range: ``field(default=..., metadata=rule(above=0))``."""
    return {"rule": Rule(**bounds)}


POSITIVE = rule(above=0)
AT_LEAST_1 = rule(low=1)
NON_NEGATIVE = rule(low=0)


def _message(prefix: str) -> Callable[[str, str], RegproxyError]:
    return lambda key, text: RegproxyError(f"{prefix} {key}: {text}")


def check_value(key: str, value: Any, annotation: Any, fail: Callable[[str, str], RegproxyError],
                namespace: dict | None = None) -> Any:
    """``value`` converted to the annotated type (int -> float, list -> tuple), or ``fail(key, why)`` raised."""
    if isinstance(annotation, str):  # postponed annotations (from __future__ import annotations)
        annotation = eval(annotation, vars(typing) | {"list": list, "dict": dict, "tuple": tuple} | (namespace or {}))
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:  # the first type the value fits (str | list[float]: "auto" or [1, 2])
            try:
                return check_value(key, value, option, fail, namespace)
            except RegproxyError:
                pass
        return check_value(key, value, options[-1], fail, namespace)
    if annotation is dict or origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise fail(key, f"expected a mapping of names to values, got {_short(value)}")
        if origin is dict:
            return {k: check_value(f"{key}.{k}", v, args[1], fail, namespace) for k, v in value.items()}
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail(key, f"expected a list, got {_short(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise fail(key, f"expected {len(args)} values, got {len(value)}")
            return tuple(check_value(f"{key}[{i}]", v, a, fail, namespace) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [check_value(f"{key}[{i}]", v, item, fail, namespace) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads 6e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation in (int, float, str, bool) and type(value) is not annotation:
        raise fail(key, f"expected {annotation.__name__}, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def build(cls: type, data: Any, *, prefix: str = "", where: str = "", what: str = "config key",
          sections: dict[str, type] | None = None, namespace: dict | None = None) -> Any:
    """``cls(**data)`` after checking every key: known, of its field's type, inside its field's ``rule``.

    ``sections`` maps a field name to the dataclass its value (a mapping) is built into, recursively. Errors read
    ``<where><what> <dotted key>: <why>`` (``where`` names the file, e.g. ``"model/config.json: "``).
    """
    fail = _message(f"{where}{what}")
    if not isinstance(data, dict):
        raise RegproxyError(f"{where}{what.split()[0]} section {prefix or 'top level'}: expected a mapping, got "
                            f"{_short(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        dotted = f"{prefix}." if prefix else ""
        raise RegproxyError(f"{where}unknown {what} {dotted}{unknown[0]}; known: {', '.join(sorted(fields))}")
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if sections and name in sections:
            values[name] = build(sections[name], value, prefix=key, where=where, what=what, namespace=namespace)
            continue
        checked = check_value(key, value, fields[name].type, fail, namespace)
        field_rule = fields[name].metadata.get("rule")
        if field_rule is not None:
            field_rule.check(key, checked, fail)
        values[name] = checked
    return cls(**values)
