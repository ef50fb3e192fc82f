"""Plugin registry: heads and datasets are discovered by dropping a file into ``heads/`` or ``datasets/``.

Plugin files are imported by path under the private package ``_headbench_plugins`` (so our
``datasets/`` folder never shadows the PyPI ``datasets`` package), in sorted file order, once per
process. Extra plugin folders can be named in ``HEADBENCH_HEADS_PATH`` / ``HEADBENCH_DATASETS_PATH``
(``os.pathsep``-separated), which is how the tests add a head without touching the repository.

A head is a ``torch.nn.Module`` class whose ``__init__`` takes ``(in_channels, num_classes,
context=None, *, hparam=default, ...)`` and whose ``forward`` maps [B, d, h, w] to [B, C] logits.
A dataset is a :class:`bench.dataset.MultiLabelDataset` class whose ``__init__`` takes
``(root=None, split=..., *, option=default, ...)``. Keyword parameters with defaults are the
hyper-parameters (options) a grid may set; anything else is rejected with the list of valid names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bench.context import HeadContext
from bench.errors import UsageError, choices

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_NAMESPACE = "_headbench_plugins"
_KINDS = {"head": ("heads", "HEADBENCH_HEADS_PATH"), "dataset": ("datasets", "HEADBENCH_DATASETS_PATH")}

_registry: dict[str, dict[str, type]] = {"head": {}, "dataset": {}}
_loaded_dirs: set[Path] = set()

T = TypeVar("T", bound=type)


def _source_file(obj: object) -> str:
    try:
        path = Path(inspect.getfile(obj))  # type: ignore[arg-type]
    except (TypeError, OSError):
        return "<unknown file>"
    try:
        return str(path.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def _register(kind: str, name: str) -> Callable[[T], T]:
    def decorator(cls: T) -> T:
        table = _registry[kind]
        if name in table and table[name] is not cls:
            raise UsageError(
                f"{kind} name {name!r} is registered twice: in {_source_file(table[name])} "
                f"and in {_source_file(cls)}; rename one of them"
            )
        table[name] = cls
        cls.registry_name = name  # type: ignore[attr-defined]
        return cls

    return decorator


def register_head(name: str) -> Callable[[T], T]:
    """Class decorator: make a head available to grids under ``name``."""
    return _register("head", name)


def register_dataset(name: str) -> Callable[[T], T]:
    """Class decorator: make a dataset available to grids under ``name``."""
    return _register("dataset", name)


def plugin_dirs(kind: str) -> list[Path]:
    """Folders searched for ``kind`` plugins: the project's own, then the environment's extras."""
    folder, env = _KINDS[kind]
    dirs = [PROJECT_ROOT / folder]
    dirs += [Path(p).resolve() for p in os.environ.get(env, "").split(os.pathsep) if p]
    return dirs


def _import_plugin(path: Path, kind: str) -> None:
    if _NAMESPACE not in sys.modules:
        package = types.ModuleType(_NAMESPACE)
        package.__path__ = []  # a namespace for plugin modules, nothing importable by itself
        sys.modules[_NAMESPACE] = package
    folder_tag = hashlib.sha1(str(path.parent).encode()).hexdigest()[:8]
    module_name = f"{_NAMESPACE}.{kind}_{folder_tag}_{path.stem}"
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except UsageError:
        del sys.modules[module_name]
        raise
    except Exception as exc:
        del sys.modules[module_name]
        raise UsageError(f"plugin {path} failed to import: {type(exc).__name__}: {exc}") from exc


def load_plugins() -> None:
    """Import every plugin file not yet imported (idempotent; cheap after the first call)."""
    for kind in _KINDS:
        for folder in plugin_dirs(kind):
            if folder in _loaded_dirs or not folder.is_dir():
                continue
            for path in sorted(folder.glob("*.py")):
                if not path.name.startswith("_"):
                    _import_plugin(path, kind)
            _loaded_dirs.add(folder)


def _lookup(kind: str, name: str) -> type:
    load_plugins()
    table = _registry[kind]
    if name not in table:
        folder = _KINDS[kind][0]
        raise UsageError(
            f"unknown {kind} {name!r}; registered {kind}s: {choices(sorted(table))} "
            f"(a {kind} is added by dropping a file into {folder}/)"
        )
    return table[name]


def list_heads() -> list[str]:
    """Names of all registered heads, sorted."""
    load_plugins()
    return sorted(_registry["head"])


def list_datasets() -> list[str]:
    """Names of all registered datasets, sorted."""
    load_plugins()
    return sorted(_registry["dataset"])


def head_class(name: str) -> type:
    """The class registered as head ``name``."""
    return _lookup("head", name)


def dataset_class(name: str) -> type:
    """The class registered as dataset ``name``."""
    return _lookup("dataset", name)


_HEAD_FIXED = ("self", "in_channels", "num_classes", "context")
_DATASET_FIXED = ("self", "root", "split")


def _keyword_defaults(cls: type, fixed: tuple[str, ...]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {
        n: p.default
        for n, p in params.items()
        if n not in fixed and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def head_hparams(name: str) -> dict[str, Any]:
    """The hyper-parameters head ``name`` accepts, with their defaults."""
    return _keyword_defaults(head_class(name), _HEAD_FIXED)


def dataset_options(name: str) -> dict[str, Any]:
    """The options dataset ``name`` accepts, with their defaults."""
    return _keyword_defaults(dataset_class(name), _DATASET_FIXED)


def check_head_hparams(name: str, hparams: dict[str, Any]) -> None:
    """Raise a :class:`UsageError` naming the head's file if ``hparams`` has an unknown key."""
    _check_keywords("head", name, head_class(name), hparams, head_hparams(name))


def _check_keywords(kind: str, name: str, cls: type, given: dict[str, Any], valid: dict[str, Any]) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        word = "hyper-parameter" if kind == "head" else "option"
        raise UsageError(
            f"{kind} {name!r} ({_source_file(cls)}) has no {word}(s) {choices(unknown)}; "
            f"valid: {choices(sorted(valid)) or 'none'}"
        )


def build_head(
    name: str,
    in_channels: int,
    num_classes: int,
    context: HeadContext | None = None,
    **hparams: Any,
) -> Any:
    """Build head ``name`` for a [B, in_channels, h, w] feature map and ``num_classes`` outputs.

    Unknown hyper-parameters, and values the head rejects (``ValueError``), become a
    :class:`UsageError` naming the head's file.
    """
    cls = head_class(name)
    _check_keywords("head", name, cls, hparams, head_hparams(name))
    try:
        return cls(in_channels, num_classes, context, **hparams)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"head {name!r} ({_source_file(cls)}): {exc}") from exc


def build_dataset(name: str, root: str | os.PathLike | None = None, split: str | None = None, **options: Any) -> Any:
    """Build split ``split`` (default: the dataset's training split) of dataset ``name``."""
    cls = dataset_class(name)
    _check_keywords("dataset", name, cls, options, dataset_options(name))
    split = cls.train_split if split is None else split
    if split not in cls.splits:
        raise UsageError(f"dataset {name!r} has no split {split!r}; valid splits: {choices(cls.splits)}")
    try:
        return cls(root, split, **options)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"dataset {name!r} ({_source_file(cls)}): {exc}") from exc
