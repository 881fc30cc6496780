"""Checking configuration values against the constructors they go to, before any work.

A YAML pipeline is a list of constructors and their keyword arguments. :func:`bind` binds the arguments to the
callable's signature (unknown or missing keys) and checks each value against the parameter's annotation (an int where
an int is expected: ``'256'`` is text, not a number). Errors are one line naming where the value came from, the
value, and what was expected; they are :class:`ConfigError`, which the CLI prints without a traceback.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from imgcurate.errors import ConfigError

__all__ = ["bind", "check_value", "unknown_key"]


def unknown_key(where: str, key: str, known: list[str]) -> ConfigError:
    """The error for a key that is not among ``known``, with the closest known one suggested."""
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def _hints(func: Callable) -> dict[str, Any]:
    """The parameters' annotations, resolved. A name imported for type checking only (not there at run time) stands
    for ``Any``, so the other parameters are still checked."""
    target = func.__init__ if isinstance(func, type) else func
    unknown: dict[str, Any] = {}
    for _ in range(32):
        try:
            return typing.get_type_hints(target, localns=unknown)
        except NameError as err:
            if not err.name or err.name in unknown:
                break
            unknown[err.name] = Any
        except Exception:  # noqa: BLE001 - an annotation we cannot resolve is not checked
            break
    return {}


def bind(func: Callable, kwargs: Mapping[str, Any], where: str, skip: int = 0) -> dict[str, Any]:
    """Checks that ``func(**kwargs)`` would bind and that every value fits its parameter's annotation.

    Args:
        func: a class (its constructor is checked) or a function.
        kwargs: the keyword arguments from the config.
        where: what to call the place in the config (``steps[2].SampleFilter``).
        skip: leading positional parameters that the caller fills in (a report's dataset).

    Returns:
        The keyword arguments.

    Raises:
        ConfigError: an unknown or missing key, or a value of the wrong type.
    """
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"{where}: expected 'key: value' arguments, got {kwargs!r}")
    signature = inspect.signature(func)
    params = list(signature.parameters.values())[skip:]
    named = {p.name: p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    for key in kwargs:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: keys are names, got {key!r}")
        if key not in named and not takes_any:
            raise unknown_key(where, key, list(named))
    missing = [n for n, p in named.items() if p.default is p.empty and p.kind is not p.VAR_POSITIONAL
               and n not in kwargs]  # fmt: skip
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(map(repr, missing))}")
    hints = _hints(func)
    for key, value in kwargs.items():
        if key in hints:
            problem = check_value(value, hints[key])
            if problem:
                raise ConfigError(f"{where}.{key}: {problem}, got {value!r} ({type(value).__name__})")
    return dict(kwargs)


def check_value(value: Any, annotation: Any) -> str | None:
    """None when ``value`` fits ``annotation``, else what was expected (for the error message)."""
    return None if _fits(value, annotation) else f"expected {_describe(annotation)}"


_NUMBERS = {int: (int,), float: (int, float)}


def _fits(value: Any, annotation: Any) -> bool:
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation in _NUMBERS:
        return isinstance(value, _NUMBERS[annotation]) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Iterable,
                  collections.abc.Collection):  # fmt: skip
        if not isinstance(value, list | tuple) or isinstance(value, str):
            return False
        item = args[0] if args and (origin is not tuple or len(args) == 2 and args[1] is Ellipsis) else Any
        return all(_fits(v, item) for v in value)
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            return False
        key_type, value_type = args if len(args) == 2 else (Any, Any)
        return all(_fits(k, key_type) and _fits(v, value_type) for k, v in value.items())
    if isinstance(annotation, type):
        if annotation in (list, tuple):
            return isinstance(value, list | tuple)
        if annotation is dict:
            return isinstance(value, Mapping)
        # a config can only hold plain values; a class like a classifier is built from a mapping elsewhere
        return isinstance(value, annotation) or isinstance(value, Mapping)
    return True  # an annotation we do not know: not checked


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if annotation is None or annotation is type(None):
        return "null"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if annotation in names:
        return names[annotation]
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Iterable,
                  collections.abc.Collection):  # fmt: skip
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    if origin is typing.Literal:
        return " or ".join(map(repr, args))
    if dataclasses.is_dataclass(annotation):  # built from a mapping of its fields (a filter's Rule)
        return f"a mapping with {', '.join(f.name for f in dataclasses.fields(annotation))}"
    return getattr(annotation, "__name__", str(annotation))
