"""One rule for a configuration value against a type annotation (issue 23).

Every value a user writes — a head's hyper-parameter, a dataset option or head value in a grid, a
recipe key, a ``[run]`` option — passes :func:`coerce` before anything is built:

- ``int``: an int (never a bool), within ``±max_int``;
- ``float``: an int or a float (never a bool), finite, within ``±max_float``; returned as a float;
- ``bool``: ``True`` or ``False`` only;
- ``str`` and any other class: an instance of it;
- ``Literal[a, b]``: equal to one of the values AND of its type (``1`` is not ``True``);
- ``X | Y``: the first option that accepts it (``int | float`` keeps ``2`` an int);
- ``list[X]`` / ``tuple[X, ...]`` (or bare ``list``): a list or tuple, each item coerced, returned as
  the annotation's container;
- ``None`` / ``type(None)``: ``None`` only; ``Any``: anything.

A value of the wrong type raises :class:`CoerceError`; a number of the right type out of range
raises :class:`OutOfRange` (a subclass), so a caller can say which it was. Callers turn either into
a :class:`bench.core.errors.UsageError` that names the file and the key.
"""

from __future__ import annotations

import inspect
import math
import types
from typing import Any, Literal, Union, get_args, get_origin

from bench.core.errors import choices

#: the largest integer numpy and torch hold (int64), the default bound of an int setting
MAX_INT64 = 2**63 - 1


class CoerceError(TypeError):
    """A value that the annotation does not accept; the message says what was expected."""


class OutOfRange(CoerceError):
    """A number of the right type outside the range the caller allows."""


def is_union(annotation: Any) -> bool:
    """``X | Y`` or ``Optional[X]`` / ``Union[X, Y]``."""
    return get_origin(annotation) in (Union, types.UnionType)


def type_name(annotation: Any) -> str:
    """The annotation in words: ``int or None``, ``one of 'a', 'b'``, ``float``."""
    if annotation is type(None) or annotation is None:
        return "None"
    if is_union(annotation):
        return " or ".join(type_name(a) for a in get_args(annotation))
    if get_origin(annotation) is Literal:
        return f"one of {choices(get_args(annotation))}"
    return getattr(annotation, "__name__", str(annotation))


#: what a setting whose default is None accepts: any TOML scalar or array (not a table)
ANY_SETTING = bool | int | float | str | list


def annotation_of(default: Any) -> Any:
    """The annotation of a setting declared only by its default: the default's type (a tuple
    default takes a list, as TOML writes one; ``None``: :data:`ANY_SETTING`)."""
    if default is None:
        return ANY_SETTING
    return list if isinstance(default, (list, tuple)) else type(default)


def coerce(annotation: Any, value: Any, *, max_int: int = MAX_INT64, max_float: float = math.inf) -> Any:
    """``value`` as ``annotation`` wants it (module docstring), or :class:`CoerceError`.

    Args:
        annotation: a resolved type annotation (``int``, ``float | None``, ``Literal["a", "b"]``...).
        value: the value as parsed (TOML / JSON types).
        max_int: the largest magnitude of an int (default int64's).
        max_float: the largest magnitude of a float (default: any finite number).
    """
    if annotation is Any or annotation is inspect.Parameter.empty:
        return value
    if annotation is None or annotation is type(None):
        if value is None:
            return None
        raise CoerceError("expected None")
    origin = get_origin(annotation)
    if origin is Literal:
        for allowed in get_args(annotation):
            if value == allowed and type(value) is type(allowed):
                return value
        raise CoerceError(f"expected one of {choices(get_args(annotation))}")
    if is_union(annotation):
        out_of_range = None
        for option in get_args(annotation):
            try:
                return coerce(option, value, max_int=max_int, max_float=max_float)
            except OutOfRange as exc:
                out_of_range = out_of_range or exc
            except CoerceError:
                continue
        if out_of_range is not None:
            raise out_of_range
        raise CoerceError(f"expected {type_name(annotation)}")
    if origin in (list, tuple) or annotation in (list, tuple):
        container = origin or annotation
        if not isinstance(value, (list, tuple)):
            raise CoerceError(f"expected a {container.__name__}")
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        item = args[0] if args else Any
        return container(coerce(item, v, max_int=max_int, max_float=max_float) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise CoerceError("expected a bool (true or false)")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > max_int:
                raise OutOfRange(f"expected an int within +-{max_int}")
            return value
        raise CoerceError("expected an int")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            bound = "a finite number" + (f" within +-{max_float:g}" if math.isfinite(max_float) else "")
            if isinstance(value, int) and abs(value) > MAX_INT64:  # float() of a huge int overflows
                raise OutOfRange(f"expected {bound}")
            number = float(value)
            if not math.isfinite(number) or abs(number) > max_float:
                raise OutOfRange(f"expected {bound}")
            return number
        raise CoerceError("expected a number")
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise CoerceError(f"expected {annotation.__name__}")
    return value
