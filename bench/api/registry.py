"""One generic registry, four instances: heads, datasets, backbones and losses.

Heads and datasets are plugins: a file dropped into ``heads/`` or ``datasets/`` (or a folder named
in ``HEADBENCH_HEADS_PATH`` / ``HEADBENCH_DATASETS_PATH``, ``os.pathsep``-separated) registers
itself with a decorator when it is imported. Plugin files are imported by path under the private
package ``_headbench_plugins`` (so our ``datasets/`` folder never shadows the PyPI ``datasets``
package), in sorted file order, once per process, on the first lookup.

Backbones and losses are built-in: the modules that define them (``bench.models.backbones``,
``bench.models.losses``) register them when imported; the registry imports those modules on its
first lookup (as timm's ``create_model`` relies on ``timm.models`` having been imported). A
backbone *family* (``timm:<model>``) is a name prefix with its own builder and name check.

Errors keep one quality everywhere: a duplicate name names both files, an unknown name lists the
registered ones, an unknown or ill-typed hyper-parameter names the plugin's file and the valid
names (see :mod:`bench.api.head` for the head contract).

A plugin file that fails to import (any exception, ``sys.exit`` included, or a registration the
registry refuses) does not stop the others: it is kept in :meth:`Registry.broken`, said once as a
:class:`BrokenPluginWarning`, and named again wherever it matters -- looking up a name that is not
registered, or a grid's ``name = "*"``, which cannot mean "every head" while one does not load.
A registered name may not hold a character the command line and grids give a meaning to
(:data:`RESERVED_CHARACTERS`: ``*`` is the grids' wildcard, ``,`` separates ``--heads`` names,
``=`` separates ``--data-root`` pairs).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from bench.api.context import HeadContext
from bench.api.head import check_head_class, check_hparam_values, hparam_specs
from bench.api.observe import split_observe
from bench.core.errors import UsageError, choices
from bench.core.paths import PROJECT_ROOT, source_file

__all__ = [
    "PROJECT_ROOT", "RESERVED_CHARACTERS", "BrokenPluginWarning", "Registry", "broken_plugins", "build_backbone", "build_dataset", "build_head", "build_loss",
    "check_head_hparams", "dataset_class", "dataset_options", "head_class", "head_hparams",
    "is_known_backbone", "list_backbones", "list_datasets", "list_heads", "list_losses", "load_plugins",
    "plugin_dirs", "reference_head", "register_backbone", "register_backbone_family", "register_dataset",
    "register_head", "register_loss", "source_file",
]

_NAMESPACE = "_headbench_plugins"
T = TypeVar("T")
#: characters a registered name may not hold: each has a meaning in a grid or on the command line
RESERVED_CHARACTERS = "*,=/\\ \t\n"


class BrokenPluginWarning(UserWarning):
    """A plugin file failed to import; the other plugins are still usable."""


@dataclass(frozen=True)
class _Family:
    """Names ``<prefix><anything>`` built by one builder (e.g. ``timm:<model>``)."""

    prefix: str
    build: Callable[..., Any]
    is_known: Callable[[str], bool]
    description: str


class Registry(Generic[T]):
    """Names -> registered objects of one kind (``head``, ``dataset``, ``backbone``, ``loss``).

    Args:
        kind: the word used in messages.
        folder: the project folder holding plugin files of this kind (None: no plugin files).
        env: the environment variable naming extra plugin folders.
        builtins: modules that register this kind's built-in entries when imported.
        check: called as ``check(name, obj)`` at registration; raises :class:`UsageError`.
    """

    def __init__(
        self,
        kind: str,
        folder: str | None = None,
        env: str | None = None,
        builtins: tuple[str, ...] = (),
        check: Callable[[str, Any], None] | None = None,
    ) -> None:
        self.kind, self.folder, self.env, self.builtins, self._check = kind, folder, env, builtins, check
        self._table: dict[str, T] = {}
        self._families: dict[str, _Family] = {}
        self._loaded: set[Path] = set()
        self._builtins_loaded = False
        self._broken: dict[Path, str] = {}

    # -- registration --------------------------------------------------------------------------
    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the class or function under ``name``."""
        if not isinstance(name, str) or not name or any(ch in RESERVED_CHARACTERS for ch in name):
            raise UsageError(
                f"a {self.kind} name must be a non-empty string without {choices(RESERVED_CHARACTERS)} "
                f"('*' is the grids' wildcard, ',' separates names on the command line), got {name!r}"
            )

        def decorator(obj: T) -> T:
            old = self._table.get(name)
            if old is not None and old is not obj:
                if _same_definition(old, obj):
                    return obj  # the same file imported again under another module name: keep the first
                raise UsageError(
                    f"{self.kind} name {name!r} is registered twice: in {source_file(old)} "
                    f"and in {source_file(obj)}; rename one of them"
                )
            if self._check is not None:
                self._check(name, obj)
            self._table[name] = obj
            if isinstance(obj, type):
                obj.registry_name = name  # type: ignore[attr-defined]
            return obj

        return decorator

    def register_family(self, prefix: str, build: Callable[..., Any], is_known: Callable[[str], bool], description: str) -> None:
        """Every name starting with ``prefix`` is built by ``build(name, ...)``."""
        self._families[prefix] = _Family(prefix, build, is_known, description)

    # -- discovery -----------------------------------------------------------------------------
    def plugin_dirs(self) -> list[Path]:
        """Folders searched for plugin files: the project's own, then the environment's extras."""
        if self.folder is None:
            return []
        dirs = [PROJECT_ROOT / self.folder]
        if self.env:
            dirs += [Path(p).resolve() for p in os.environ.get(self.env, "").split(os.pathsep) if p]
        return dirs

    def load(self) -> None:
        """Import the built-in modules and every plugin file not yet imported (idempotent)."""
        if not self._builtins_loaded:
            self._builtins_loaded = True
            for module in self.builtins:
                importlib.import_module(module)
        for folder in self.plugin_dirs():
            if folder in self._loaded or not folder.is_dir():
                continue
            self._loaded.add(folder)
            for path in sorted(folder.glob("*.py")):
                if not path.name.startswith("_"):
                    tables = [(r, dict(r._table)) for r in _PLUGIN_REGISTRIES]
                    try:
                        _import_plugin(path, self.kind)
                    except UsageError as exc:
                        for registry, table in tables:  # a file that fails registers nothing
                            registry._table = table
                        self._broken[path] = str(exc)
                        warnings.warn(f"{exc}; its {self.kind}s are unavailable, the others work", BrokenPluginWarning, stacklevel=2)

    def broken(self) -> dict[Path, str]:
        """Plugin files of this kind that failed to import: path -> the error (after :meth:`load`)."""
        self.load()
        return dict(self._broken)

    def broken_note(self) -> str:
        """``"; plugin file(s) that failed to import: ..."`` (empty when none did), for messages."""
        broken = self.broken()
        return "; plugin file(s) that failed to import: " + "; ".join(broken.values()) if broken else ""

    # -- lookup --------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Registered names, sorted (families not included: see :meth:`describe_names`)."""
        self.load()
        return sorted(self._table)

    def family(self, name: str) -> _Family | None:
        self.load()
        return next((f for p, f in self._families.items() if name.startswith(p)), None)

    def is_known(self, name: str) -> bool:
        if name in self.names():
            return True
        fam = self.family(name)
        return fam is not None and fam.is_known(name)

    def describe_names(self) -> str:
        """The valid names, for error messages."""
        text = choices(self.names())
        families = [f.description for f in self._families.values()]
        return text + (" or " + " or ".join(families) if families else "")

    def get(self, name: str) -> T:
        self.load()
        if name not in self._table:
            where = f" (a {self.kind} is added by dropping a file into {self.folder}/)" if self.folder else ""
            raise UsageError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {self.describe_names()}{where}{self.broken_note()}")
        return self._table[name]

    def items(self) -> list[tuple[str, T]]:
        self.load()
        return sorted(self._table.items())


def _same_definition(a: Any, b: Any) -> bool:
    """The same plugin file imported twice (e.g. under two module names) is not a duplicate."""
    try:
        return inspect.getfile(a) == inspect.getfile(b) and a.__qualname__ == b.__qualname__
    except (TypeError, OSError, AttributeError):
        return False


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
    except UsageError as exc:
        del sys.modules[module_name]
        raise UsageError(f"plugin {path} failed to import: {exc}") from exc
    except SystemExit as exc:  # a plugin must not end the process that imports it
        del sys.modules[module_name]
        raise UsageError(f"plugin {path} failed to import: it called sys.exit({exc.code!r}) at import") from None
    except Exception as exc:
        del sys.modules[module_name]
        raise UsageError(f"plugin {path} failed to import: {type(exc).__name__}: {exc}") from exc


def _check_dataset_class(name: str, cls: Any) -> None:
    from bench.api.dataset import MultiLabelDataset

    if not (isinstance(cls, type) and issubclass(cls, MultiLabelDataset)):
        raise UsageError(f"dataset {name!r} ({source_file(cls)}) must subclass bench.api.MultiLabelDataset")


HEADS: Registry[type] = Registry("head", "heads", "HEADBENCH_HEADS_PATH", check=check_head_class)
DATASETS: Registry[type] = Registry("dataset", "datasets", "HEADBENCH_DATASETS_PATH", check=_check_dataset_class)
BACKBONES: Registry[Callable[..., Any]] = Registry("backbone", builtins=("bench.models.backbones",))
LOSSES: Registry[Callable[..., Any]] = Registry("loss", builtins=("bench.models.losses",))
_PLUGIN_REGISTRIES = (HEADS, DATASETS)


# --------------------------------------------------------------------------------------------
# The public functions (stable names; also re-exported by ``bench.registry``)
# --------------------------------------------------------------------------------------------


def register_head(name: str) -> Callable[[type], type]:
    """Class decorator: make a head available to grids under ``name`` (contract: :mod:`bench.api.head`)."""
    return HEADS.register(name)


def register_dataset(name: str) -> Callable[[type], type]:
    """Class decorator: make a :class:`~bench.api.dataset.MultiLabelDataset` available under ``name``."""
    return DATASETS.register(name)


def register_backbone(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator of a builder ``(weights: str | None) -> Backbone``."""
    return BACKBONES.register(name)


def register_backbone_family(prefix: str, build: Callable[..., Any], is_known: Callable[[str], bool], description: str) -> None:
    """Names ``<prefix><model>`` are built by ``build(name, weights)`` (e.g. ``timm:``)."""
    BACKBONES.register_family(prefix, build, is_known, description)


def register_loss(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator of a loss class: an ``nn.Module`` called as ``loss(logits, targets, known=None,
    epoch=1)`` -> a scalar (``known``: the batch's observed mask, bool [B, C], None = all observed;
    ``epoch``: 1-based; see ``bench/models/losses.py``)."""
    return LOSSES.register(name)


def plugin_dirs(kind: str) -> list[Path]:
    """Folders searched for ``kind`` (``head`` or ``dataset``) plugins."""
    return {"head": HEADS, "dataset": DATASETS}[kind].plugin_dirs()


def broken_plugins(kind: str) -> dict[Path, str]:
    """Plugin files of ``kind`` (``head`` or ``dataset``) that failed to import: path -> error."""
    return {"head": HEADS, "dataset": DATASETS}[kind].broken()


def load_plugins() -> None:
    """Import every head and dataset plugin file not yet imported (idempotent)."""
    for registry in _PLUGIN_REGISTRIES:
        registry.load()


def list_heads() -> list[str]:
    """Names of all registered heads, sorted."""
    return HEADS.names()


def list_datasets() -> list[str]:
    """Names of all registered datasets, sorted."""
    return DATASETS.names()


def list_backbones() -> list[str]:
    """Registered backbone names; ``timm:<model>`` names are accepted in addition."""
    return BACKBONES.names()


def list_losses() -> list[str]:
    """Names of the losses a recipe's ``loss`` key may take."""
    return LOSSES.names()


def is_known_backbone(name: str) -> bool:
    """Whether :func:`build_backbone` knows ``name`` (checked without building or downloading)."""
    return BACKBONES.is_known(name)


def describe_backbone_names() -> str:
    """The valid backbone names, for error messages."""
    return BACKBONES.describe_names()


def head_class(name: str) -> type:
    """The class registered as head ``name``."""
    return HEADS.get(name)


def dataset_class(name: str) -> type:
    """The class registered as dataset ``name``."""
    return DATASETS.get(name)


def head_hparams(name: str) -> dict[str, Any]:
    """The hyper-parameters head ``name`` accepts, with their defaults."""
    return {key: spec.default for key, spec in hparam_specs(head_class(name)).items()}


def dataset_options(name: str) -> dict[str, Any]:
    """The options dataset ``name`` accepts, with their defaults."""
    params = inspect.signature(dataset_class(name).__init__).parameters
    fixed = ("self", "root", "split")
    return {n: p.default for n, p in params.items() if n not in fixed and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def check_head_hparams(name: str, hparams: dict[str, Any]) -> None:
    """Raise a :class:`UsageError` naming the head's file if ``hparams`` has an unknown key."""
    cls = head_class(name)
    _check_keywords("head", name, cls, hparams, head_hparams(name))


def _check_keywords(kind: str, name: str, cls: type, given: dict[str, Any], valid: dict[str, Any]) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        word = "hyper-parameter" if kind == "head" else "option"
        raise UsageError(
            f"{kind} {name!r} ({source_file(cls)}) has no {word}(s) {choices(unknown)}; "
            f"valid: {choices(sorted(valid)) or 'none'}"
        )


def reference_head() -> tuple[str, dict[str, Any]] | None:
    """The (head, hyper-parameters) every other head is compared with: the one registered head
    that declares ``reference`` (the average-pooling baseline), or None when none does."""
    found = [(name, dict(cls.reference)) for name, cls in HEADS.items() if getattr(cls, "reference", None) is not None]
    if len(found) > 1:
        raise UsageError(f"several heads declare themselves the reference: {choices(n for n, _ in found)}; keep one")
    return found[0] if found else None


def build_head(
    name: str,
    in_channels: int,
    num_classes: int,
    context: HeadContext | None = None,
    **hparams: Any,
) -> Any:
    """Build head ``name`` for a [B, in_channels, h, w] feature map and ``num_classes`` outputs.

    Unknown hyper-parameters, values of the wrong type, values the head rejects (``ValueError``)
    and any other failure of the head's ``__init__`` (a ``RuntimeError``, even ``sys.exit``)
    become a :class:`UsageError` naming the head's file and the hyper-parameters it was given.
    """
    cls = head_class(name)
    _check_keywords("head", name, cls, hparams, head_hparams(name))
    hparams = check_hparam_values(cls, hparams, f"head {name!r} ({source_file(cls)})")
    try:
        return cls(in_channels, num_classes, context, **hparams)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"head {name!r} ({source_file(cls)}): {exc}") from exc
    except UsageError:
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a plugin's bug, reported as its own
        given = ", ".join(f"{k}={v!r}" for k, v in hparams.items()) or "its defaults"
        what = f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
        raise UsageError(f"head {name!r} ({source_file(cls)}) failed to build with {given}: {what}") from None


def build_dataset(name: str, root: str | os.PathLike | None = None, split: str | None = None, **options: Any) -> Any:
    """Build split ``split`` (default: the dataset's training split) of dataset ``name``.

    ``options`` may hold the observe keys every dataset accepts (``bench.api.observe``); they are
    validated and left out of the plugin's arguments."""
    cls = dataset_class(name)
    # the harness's observe options (bench/api/observe.py) are checked here and never reach the
    # plugin: the observed mask is drawn by the engine for the training split only
    options, _observe = split_observe(options, f"dataset {name!r}")
    _check_keywords("dataset", name, cls, options, dataset_options(name))
    split = cls.train_split if split is None else split
    if split not in cls.splits:
        raise UsageError(f"dataset {name!r} has no split {split!r}; valid splits: {choices(cls.splits)}")
    try:
        return cls(root, split, **options)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"dataset {name!r} ({source_file(cls)}): {exc}") from exc
    except UsageError:
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a plugin's bug or an option it cannot honour (MemoryError)
        given = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "its default options"
        what = f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
        raise UsageError(f"dataset {name!r} ({source_file(cls)}) failed to build split {split!r} with {given}: {what}") from None


def build_backbone(name: str, weights: str | None = None) -> Any:
    """Build backbone ``name`` (random init, ``"imagenet"`` where a package ships weights, or the
    local file ``weights``): a ``bench.models.backbones.Backbone`` mapping images to [B, d, h, w]."""
    weights = str(weights) if weights else None
    if name not in BACKBONES.names():
        fam = BACKBONES.family(name)
        if fam is not None:
            return fam.build(name, weights)
    return BACKBONES.get(name)(weights)


def build_loss(name: str, **params: Any) -> Any:
    """The loss a recipe's ``loss`` key names, called as ``loss(logits, targets, known=None, epoch=1)`` -> a scalar."""
    cls = LOSSES.get(name)
    try:
        return cls(**params)
    except TypeError as exc:
        raise UsageError(f"loss {name!r} ({source_file(cls)}): {exc}") from exc
