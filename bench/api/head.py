"""The head contract, in code.

A head is an ``nn.Module`` class registered with ``@register_head("name")``::

    class MyHead(Head):
        sweep = ({"scale": [0.5, 1.0, 2.0]},)          # what the full grids run (optional)

        def __init__(self, in_channels: int, num_classes: int, context: HeadContext | None = None,
                     *, scale: float = 1.0, mode: Literal["a", "b"] = "a") -> None: ...
        def forward(self, x):                          # x [B, d, h, w], any h, w >= 1 -> logits [B, C]

The constructor takes exactly ``(in_channels, num_classes, context)`` positionally; everything
after them is a keyword-only HYPER-PARAMETER with a type annotation and a default. Annotations are
the type check (``int``, ``float`` — an int is accepted and converted —, ``bool``, ``str``,
``Literal[...]`` for a closed set of values, ``X | None``, ``list[...]``/``tuple[...]``); a
parameter without a default or an annotation is an error at registration that names the file and
the parameter. Values a grid gives are checked against the annotation before anything is built.

Declarative metadata (class attributes of :class:`Head`; a plain ``nn.Module`` may set them too).
The harness reads ONLY these, never a head's name:

- ``describe_hparams(hparams) -> str``: the hyper-parameters in words (default: ``k=v`` of those
  that differ from the defaults);
- ``sweep``: the configurations the full grids run, a tuple of dicts whose list values are swept
  as a product (CSRA: ``({"num_heads": [1, 2, 4, 6, 8], "lam": [...]}, {"num_heads": 1,
  "t1_inf": True, "lam": [...]})``); empty: the full grids run the head once with its defaults;
- ``reference``: hyper-parameters that make this head THE reference every other head is
  compared with (the average-pooling baseline: ``{"pool": "avg"}``); None for every other head;
- ``heatmap``: a :class:`Heatmap` over two hyper-parameters (drawn when a section has the data);
- ``derived_from``: ``(head, hparams)`` of the trained run this head reuses without training
  (it then has an ``adopt(trained_head)`` method), e.g. CSRA without training;
- ``reads_label_states``: True for a head whose forward is ``forward(x, label_state=None)`` and
  reads some of the image's labels (C-Tran's label mask training). ``label_state`` is an int
  tensor [B, C]: -1 unknown, 0 known negative, 1 known positive (:mod:`bench.api.label_states`).
  In training the harness passes the draw of ``bench.api.draw_label_states(targets, generator)``
  from the run's own random stream; in evaluation it passes nothing (None: every label unknown).
  Every other head (False, the default) is called as ``forward(x)`` and never sees a label.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args, get_origin

import torch
from torch import nn

from bench.core.coerce import CoerceError, OutOfRange, coerce, is_union, type_name
from bench.core.errors import UsageError, choices
from bench.core.paths import source_file

FIXED_ARGS = ("self", "in_channels", "num_classes", "context")


@dataclass(frozen=True)
class Heatmap:
    """Mean mAP over two hyper-parameters of one head (y rows, x columns), the others held fixed
    (``where``: values the rows must have; the rest at the head's defaults where rows have them)."""

    y: str
    x: str
    title: str
    y_label: str = ""
    x_label: str = ""
    where: dict[str, Any] = field(default_factory=dict)
    slug: str = ""  # the plot's file name part (default: "<head>_<y>_x_<x>")


@dataclass(frozen=True)
class HParam:
    """One hyper-parameter: its name, annotation (resolved), default and allowed values."""

    name: str
    annotation: Any
    default: Any

    @property
    def allowed(self) -> tuple[Any, ...] | None:
        """The closed set of values of a ``Literal[...]`` annotation (None otherwise)."""
        values = _literal_values(self.annotation)
        return tuple(values) if values else None

    def describe(self) -> str:
        allowed = self.allowed
        if allowed is not None:
            return f"one of {choices(allowed)}"
        return type_name(self.annotation)


class Head(nn.Module):
    """Base class of head plugins: the metadata the harness reads, with neutral defaults."""

    sweep: ClassVar[tuple[dict[str, Any], ...]] = ()
    reference: ClassVar[dict[str, Any] | None] = None
    heatmap: ClassVar[Heatmap | None] = None
    derived_from: ClassVar[tuple[str, dict[str, Any]] | None] = None
    reads_label_states: ClassVar[bool] = False

    def __init__(self, in_channels: int = 0, num_classes: int = 0, context: Any = None) -> None:
        super().__init__()

    @classmethod
    def describe_hparams(cls, hparams: dict[str, Any]) -> str:
        """The hyper-parameters in words (here: ``k=v`` of those that differ from the defaults)."""
        defaults = {k: s.default for k, s in hparam_specs(cls).items()}
        changed = {k: v for k, v in hparams.items() if defaults.get(k, object()) != v}
        return ", ".join(f"{k}={v}" for k, v in sorted(changed.items())) or "defaults"


# --------------------------------------------------------------------------------------------
# Signature and values
# --------------------------------------------------------------------------------------------


def _where(cls: type) -> str:
    return source_file(cls)


def hparam_specs(cls: type) -> dict[str, HParam]:
    """The keyword-only hyper-parameters of a head class (checked by :func:`check_head_class`)."""
    params = inspect.signature(cls.__init__).parameters
    try:
        hints = typing.get_type_hints(cls.__init__, include_extras=False)
    except Exception:  # an annotation that does not resolve: reported by check_head_class
        hints = {}
    return {
        n: HParam(n, hints.get(n, p.annotation), p.default)
        for n, p in params.items()
        if n not in FIXED_ARGS and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def check_head_class(name: str, cls: Any) -> None:
    """Registration-time check of the head contract; raises :class:`UsageError` naming the file."""
    label = f"head {name!r} ({_where(cls)})"
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UsageError(f"{label}: a head must be an nn.Module class, got {cls!r}")
    params = list(inspect.signature(cls.__init__).parameters.values())
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional[:4] != list(FIXED_ARGS):
        raise UsageError(
            f"{label}: __init__ must start with (self, in_channels, num_classes, context=None, *, ...); "
            f"it has ({', '.join(positional)})"
        )
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception as exc:
        raise UsageError(f"{label}: a type annotation of __init__ does not resolve: {exc}") from None
    for p in params:
        if p.name in FIXED_ARGS or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                raise UsageError(f"{label}: __init__ may not take *{p.name} or **{p.name}; list every hyper-parameter")
            continue
        if p.kind is not p.KEYWORD_ONLY:
            raise UsageError(f"{label}: hyper-parameter {p.name!r} must be keyword-only (after '*')")
        if p.default is inspect.Parameter.empty:
            raise UsageError(f"{label}: hyper-parameter {p.name!r} has no default value")
        if p.name not in hints:
            raise UsageError(f"{label}: hyper-parameter {p.name!r} has no type annotation")
        try:
            coerce_value(hints[p.name], p.default)
        except CoerceError as exc:
            raise UsageError(f"{label}: the default of {p.name!r} does not match its annotation: {exc}") from None
    check_metadata(name, cls)
    # a plain nn.Module head gets the neutral metadata of Head, so every reader finds all of it
    for attr in ("sweep", "reference", "heatmap", "derived_from", "reads_label_states"):
        if not hasattr(cls, attr):
            setattr(cls, attr, getattr(Head, attr))
    if not hasattr(cls, "describe_hparams"):
        cls.describe_hparams = classmethod(Head.describe_hparams.__func__)


def check_metadata(name: str, cls: type) -> None:
    """The declared metadata is well formed and names only real hyper-parameters."""
    label = f"head {name!r} ({_where(cls)})"
    specs = hparam_specs(cls)

    def known(keys: Any, what: str) -> None:
        unknown = sorted(set(keys) - set(specs))
        if unknown:
            raise UsageError(f"{label}: {what} names unknown hyper-parameter(s) {choices(unknown)}; valid: {choices(sorted(specs)) or 'none'}")

    sweep = getattr(cls, "sweep", ())
    if not isinstance(sweep, (tuple, list)) or not all(isinstance(s, dict) for s in sweep):
        raise UsageError(f"{label}: 'sweep' must be a tuple of dicts (hyper-parameter -> value or list of values)")
    for entry in sweep:
        known(entry, "'sweep'")
        for key, values in entry.items():
            for value in values if isinstance(values, list) else [values]:
                try:
                    coerce_value(specs[key].annotation, value)
                except CoerceError as exc:
                    raise UsageError(f"{label}: 'sweep' value {key} = {value!r}: {exc}") from None
    reference = getattr(cls, "reference", None)
    if reference is not None:
        if not isinstance(reference, dict):
            raise UsageError(f"{label}: 'reference' must be a dict of hyper-parameters (or None)")
        known(reference, "'reference'")
    heatmap = getattr(cls, "heatmap", None)
    if heatmap is not None:
        if not isinstance(heatmap, Heatmap):
            raise UsageError(f"{label}: 'heatmap' must be a bench.api.Heatmap (or None)")
        known([heatmap.x, heatmap.y, *heatmap.where], "'heatmap'")
    derived = getattr(cls, "derived_from", None)
    if derived is not None:
        if not (isinstance(derived, tuple) and len(derived) == 2 and isinstance(derived[0], str) and isinstance(derived[1], dict)):
            raise UsageError(f"{label}: 'derived_from' must be (head name, hyper-parameters)")
        if not callable(getattr(cls, "adopt", None)):
            raise UsageError(f"{label}: a head with 'derived_from' needs an adopt(trained_head) method")
    reads = getattr(cls, "reads_label_states", False)
    if not isinstance(reads, bool):
        raise UsageError(f"{label}: 'reads_label_states' must be True or False, got {reads!r}")
    if reads:
        forward = inspect.signature(cls.forward).parameters.get("label_state")
        if forward is None or forward.default is not None:
            raise UsageError(f"{label}: a head with 'reads_label_states = True' must take forward(x, label_state=None)")
    describe = getattr(cls, "describe_hparams", None)
    if describe is not None and not callable(describe):
        raise UsageError(f"{label}: 'describe_hparams' must be a static or class method taking the hyper-parameters")


def check_hparam_values(cls: type, hparams: dict[str, Any], label: str) -> dict[str, Any]:
    """Each value against its annotation; returns the values coerced (int -> float where a float
    is expected, list -> tuple where a tuple is). Raises :class:`UsageError` naming ``label``."""
    specs = hparam_specs(cls)
    out = {}
    for key, value in hparams.items():
        spec = specs[key]
        try:
            out[key] = coerce_value(spec.annotation, value)
        except CoerceError as exc:
            detail = f" ({exc})" if isinstance(exc, OutOfRange) else ""
            raise UsageError(f"{label}: hyper-parameter {key!r} = {value!r} is not allowed; expected {spec.describe()}{detail}") from None
    return out


def _literal_values(annotation: Any) -> list[Any]:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    if is_union(annotation):
        return [v for a in get_args(annotation) for v in _literal_values(a)]
    return []


#: the largest magnitude of a float hyper-parameter: float32's range (a head computes in float32:
#: a larger value is infinite in the model and fails every run)
MAX_FLOAT = float(torch.finfo(torch.float32).max)
#: the largest magnitude of an int hyper-parameter (sizes and counts: 2^31 - 1)
MAX_INT = 2**31 - 1


def coerce_value(annotation: Any, value: Any) -> Any:
    """``value`` as a hyper-parameter's ``annotation`` wants it (:func:`bench.core.coerce.coerce`
    within float32's range and ±(2^31 - 1)), or :class:`bench.core.coerce.CoerceError`."""
    try:
        return coerce(annotation, value, max_int=MAX_INT, max_float=MAX_FLOAT)
    except OutOfRange as exc:
        raise OutOfRange(f"{exc}: a head computes in float32, and its sizes and counts stay within 2^31 - 1") from None
