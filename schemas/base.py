"""Strict frozen config dataclasses: unknown keys and bad values fail at load time.

Every stage config derives from :class:`StrictConfig`. ``from_mapping`` checks that the
mapping has no unknown keys, coerces each value to the annotated type (tuples from YAML
lists, floats from YAML ints), and then runs the class's ``check`` method, so a malformed
``params.yaml`` fails before any compute with the field, the value and the rule.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Self


class ConfigError(ValueError):
    """A params value is missing, unknown or breaks a rule."""


def fail(section: str, field: str, value: Any, rule: str) -> ConfigError:
    """Build the one error message format used for every config rule."""
    return ConfigError(f"params '{section}.{field}' = {value!r}: {rule}")


def _coerce(section: str, name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(section, name, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise fail(section, name, value, f"expected {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise fail(section, name, value, f"expected one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail(section, name, value, "expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(section, name, v, args[0]) for v in value)
        if len(args) != len(value):
            raise fail(section, name, value, f"expected a list of {len(args)} values")
        return tuple(_coerce(section, name, v, a) for v, a in zip(value, args))
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            raise fail(section, name, value, "expected a mapping")
        return types.MappingProxyType(dict(value))
    if isinstance(hint, type) and issubclass(hint, StrictConfig):
        if not isinstance(value, Mapping):
            raise fail(section, name, value, "expected a mapping")
        return hint.from_mapping(value, section=f"{section}.{name}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(section, name, value, "expected a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(section, name, value, "expected an integer")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise fail(section, name, value, "expected true or false")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise fail(section, name, value, "expected a string")
        return value
    if hint is Any:
        return value
    raise TypeError(f"unsupported config annotation {hint!r} for {section}.{name}")


@dataclasses.dataclass(frozen=True)
class StrictConfig:
    """Base for frozen stage configs; subclasses add fields and override ``check``."""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, *, section: str) -> Self:
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"params '{section}' has unknown key '{key}'{hint}; "
                f"known keys: {', '.join(sorted(fields))}"
            )
        kwargs = {}
        for name, field in fields.items():
            if name in data:
                kwargs[name] = _coerce(section, name, data[name], hints[name])
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"params '{section}.{name}' is required and missing")
        config = cls(**kwargs)
        config.check(section)
        return config

    def check(self, section: str) -> None:
        """Raise :class:`ConfigError` when a value breaks a rule. Override per config."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists, mappings become dicts)."""

        def plain(value: Any) -> Any:
            if isinstance(value, StrictConfig):
                return value.to_dict()
            if isinstance(value, (tuple, list)):
                return [plain(v) for v in value]
            if isinstance(value, Mapping):
                return {k: plain(v) for k, v in value.items()}
            return value

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def require(condition: bool, section: str, field: str, value: Any, rule: str) -> None:
    """Raise a :class:`ConfigError` unless ``condition`` holds."""
    if not condition:
        raise fail(section, field, value, rule)
