"""Grids as data: a TOML file -> validated, expanded cells, each with a stable ``run_id``.

A grid file (``configs/<name>.toml``)::

    description = "..."
    seeds = [0, 1, 2]

    [recipe]                 # bench/recipe.py: keys, defaults, presets
    preset = "embedded_cpu"
    epochs = 6

    [[datasets]]             # name, optional root / train_split / test_split, then dataset options
    name = "shapes"
    num_train = 2000

    [[backbones]]            # name, optional weights ("imagenet" where packaged, or a local file)
    name = "tiny_cnn"

    [[heads]]                # name, then hyper-parameters; a list is swept (product over keys)
    name = "baseline"
    pool = ["avg", "max"]

    [run]                    # execution settings, not part of a run's identity
    save_weights = "all"

A cell's identity (``run_id``) is the hash of its resolved configuration: dataset name, options and
splits; backbone and weights; head and every hyper-parameter (defaults filled in); the resolved
recipe; the seed. Where the data lives (``root``) and execution settings are not part of it.
Expansion order is seeds, datasets, backbones, head entries (file order), then hyper-parameter
values (keys sorted), so it does not depend on the order of keys in the file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import registry
from bench.backbones import describe_backbone_names, is_known_backbone
from bench.errors import UsageError, choices
from bench.recipe import resolve_recipe

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
TOP_KEYS = ("description", "seeds", "recipe", "datasets", "backbones", "heads", "run")
DATASET_KEYS = ("name", "root", "train_split", "test_split")
BACKBONE_KEYS = ("name", "weights")
RUN_KEYS: dict[str, tuple[type, Any, tuple[Any, ...] | None]] = {
    "save_weights": (str, "all", ("all", "head", "none")),
    "checkpoint": (str, "epoch", ("epoch", "none")),
}


@dataclass
class Cell:
    """One run of the grid: everything needed to train and evaluate it."""

    dataset: str
    dataset_options: dict[str, Any]
    train_split: str
    test_split: str
    backbone: str
    weights: str | None
    head: str
    hparams: dict[str, Any]
    recipe: dict[str, Any]
    seed: int
    root: str | None = None  # where the data lives: not part of the identity
    recipe_preset: str | None = None
    source_run_id: str | None = None  # for a derived (training-free) head: the run it reuses

    def config(self) -> dict[str, Any]:
        """The resolved configuration that defines this run (hashed into ``run_id``)."""
        return {
            "dataset": {
                "name": self.dataset,
                "options": self.dataset_options,
                "train_split": self.train_split,
                "test_split": self.test_split,
            },
            "backbone": {"name": self.backbone, "weights": self.weights},
            "head": {"name": self.head, "hparams": self.hparams},
            "recipe": self.recipe,
            "seed": self.seed,
        }

    @property
    def run_id(self) -> str:
        return config_hash(self.config())

    @property
    def group_id(self) -> str:
        """Identity of the cell up to its seed: rows sharing it are repeats of one experiment."""
        config = self.config()
        del config["seed"]
        return config_hash(config)

    @classmethod
    def from_config(cls, config: dict[str, Any], root: str | None = None) -> "Cell":
        """Rebuild a cell from :meth:`config` output (e.g. the JSON stored with a result row)."""
        d, b, h = config["dataset"], config["backbone"], config["head"]
        return cls(
            dataset=d["name"], dataset_options=d["options"], train_split=d["train_split"],
            test_split=d["test_split"], backbone=b["name"], weights=b["weights"], head=h["name"],
            hparams=h["hparams"], recipe=config["recipe"], seed=config["seed"], root=root,
        )

    def describe(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hparams.items())
        return f"{self.dataset} / {self.backbone} / {self.head}({hp}) / seed {self.seed}"


def config_hash(config: dict[str, Any]) -> str:
    """A 16-hex-digit hash of a JSON-able config, independent of key order."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Grid:
    """An expanded grid: its cells, the datasets skipped for lack of data, execution settings."""

    name: str
    path: Path
    description: str
    cells: list[Cell]
    skipped: list[str] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)


def grid_path(name: str) -> Path:
    """``configs/<name>.toml`` for a bare name, else the path itself."""
    path = Path(name)
    if path.suffix == ".toml" or os.sep in name:
        candidate = path
    else:
        candidate = CONFIG_DIR / f"{name}.toml"
    if not candidate.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.toml") if p.stem != "recipes")
        raise UsageError(f"grid {name!r} not found ({candidate} does not exist); grids in {CONFIG_DIR}: {choices(known)}")
    return candidate


def _coerce(value: Any, default: Any, where: str, key: str) -> Any:
    """Give a TOML value the type of the parameter's default (int -> float where a float is expected)."""
    if default is None or isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool)):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise UsageError(
        f"{where}: {key!r} = {value!r} has type {type(value).__name__}; expected {type(default).__name__} "
        f"(default {default!r})"
    )


def _table_list(data: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    value = data.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise UsageError(f"{where}: needs at least one [[{key}]] table with a 'name'")
    for i, entry in enumerate(value):
        if not isinstance(entry.get("name"), str):
            raise UsageError(f"{where}: [[{key}]] entry {i + 1} has no string 'name'")
    return value


def _filter(entries: list[dict[str, Any]], wanted: list[str] | None, what: str, where: str) -> list[dict[str, Any]]:
    if not wanted:
        return entries
    present = [e["name"] for e in entries]
    unknown = [w for w in wanted if w not in present]
    if unknown:
        raise UsageError(f"{where}: no {what} named {choices(unknown)} in this grid; it has {choices(dict.fromkeys(present))}")
    return [e for e in entries if e["name"] in wanted]


def _dataset_root(name: str, entry_root: str | None, data_roots: dict[str, str]) -> tuple[str | None, str]:
    """Where dataset ``name``'s data is: ``--data-root`` beats the grid's ``root``, which beats
    ``$HEADBENCH_ROOT_<NAME>``. Returns (root or None, a phrase saying how to set it)."""
    env = f"HEADBENCH_ROOT_{name.upper()}"
    how = f"pass --data-root {name}=PATH or set ${env}"
    for candidate in (data_roots.get(name), entry_root, os.environ.get(env)):
        if candidate:
            return str(Path(candidate).expanduser()), how
    return None, how


def _expand_datasets(entries: list[dict[str, Any]], data_roots: dict[str, str], where: str):
    """Yield (name, options, root, train_split, test_split) per dataset entry; collect skips."""
    resolved, skipped = [], []
    for i, entry in enumerate(entries):
        name = entry["name"]
        label = f"{where} [[datasets]] {i + 1} ({name})"
        try:
            cls = registry.dataset_class(name)
        except UsageError as exc:
            raise UsageError(f"{label}: {exc}") from None
        options = {k: v for k, v in entry.items() if k not in DATASET_KEYS}
        defaults = registry.dataset_options(name)
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise UsageError(f"{label}: unknown option(s) {choices(unknown)}; valid: {choices(['root', 'train_split', 'test_split', *sorted(defaults)])}")
        for key, value in options.items():
            if isinstance(value, list) and not (defaults[key] is None or isinstance(defaults[key], (list, tuple))):
                raise UsageError(f"{label}: option {key!r} is a list; to compare datasets add another [[datasets]] entry")
            options[key] = _coerce(value, list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key], label, key)
        full = {**defaults, **options}
        splits = {}
        for key, default in (("train_split", cls.train_split), ("test_split", cls.test_split)):
            splits[key] = entry.get(key, default)
            if splits[key] not in cls.splits:
                raise UsageError(f"{label}: {key} = {splits[key]!r}; valid splits: {choices(cls.splits)}")
        root, how = _dataset_root(name, entry.get("root"), data_roots)
        if getattr(cls, "needs_root", False):
            if root is None:
                skipped.append(f"{name}: skipped, no data root given ({how}); {cls.expected_layout}")
                continue
            if not Path(root).is_dir():
                raise UsageError(f"{label}: data root {root} does not exist or is not a folder ({how}); {cls.expected_layout}")
        resolved.append((name, full, root, splits["train_split"], splits["test_split"]))
    return resolved, skipped


def _expand_heads(entries: list[dict[str, Any]], where: str) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for i, entry in enumerate(entries):
        name = entry["name"]
        label = f"{where} [[heads]] {i + 1} ({name})"
        given = {k: v for k, v in entry.items() if k != "name"}
        try:
            defaults = registry.head_hparams(name)
            registry.check_head_hparams(name, given)
        except UsageError as exc:
            raise UsageError(f"{label}: {exc}") from None
        keys = sorted(given)
        value_lists = []
        for key in keys:
            values = given[key] if isinstance(given[key], list) else [given[key]]
            if not values:
                raise UsageError(f"{label}: {key!r} is an empty list, so the grid would have no cells")
            value_lists.append([_coerce(v, defaults[key], label, key) for v in values])
        for combo in itertools.product(*value_lists):
            out.append((name, {**defaults, **dict(zip(keys, combo))}))
    return out


def _run_options(table: dict[str, Any], where: str) -> dict[str, Any]:
    options = {}
    for key, value in table.items():
        if key not in RUN_KEYS:
            raise UsageError(f"{where}: unknown [run] key {key!r}; valid: {choices(sorted(RUN_KEYS))}")
    for key, (typ, default, allowed) in RUN_KEYS.items():
        value = table.get(key, default)
        if not isinstance(value, typ) or (allowed and value not in allowed):
            raise UsageError(f"{where}: [run] {key} = {value!r}; expected one of {choices(allowed or ())}")
        options[key] = value
    return options


def load_grid(
    name: str,
    heads: list[str] | None = None,
    datasets: list[str] | None = None,
    backbones: list[str] | None = None,
    data_roots: dict[str, str] | None = None,
) -> Grid:
    """Read, validate and expand grid ``name`` (``configs/<name>.toml`` or a path).

    Args:
        heads, datasets, backbones: keep only these names (each must appear in the grid).
        data_roots: ``{dataset name: root}`` from the command line.
    """
    path = grid_path(name)
    where = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{where}: not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown top-level key(s) {choices(unknown)}; valid: {choices(TOP_KEYS)}")

    seeds = data.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UsageError(f"{where}: 'seeds' must be an integer or a non-empty list of integers, got {data.get('seeds')!r}")
    recipe_table = data.get("recipe", {})
    if not isinstance(recipe_table, dict):
        raise UsageError(f"{where}: 'recipe' must be a table [recipe]")
    recipe = resolve_recipe(recipe_table, where)
    preset = recipe_table.get("preset")
    run = _run_options(data.get("run", {}), where)

    dataset_entries = _filter(_table_list(data, "datasets", where), datasets, "dataset", where)
    backbone_entries = _filter(_table_list(data, "backbones", where), backbones, "backbone", where)
    head_entries = _filter(_table_list(data, "heads", where), heads, "head", where)

    for i, entry in enumerate(backbone_entries):
        unknown = sorted(set(entry) - set(BACKBONE_KEYS))
        if unknown:
            raise UsageError(f"{where} [[backbones]] {i + 1}: unknown key(s) {choices(unknown)}; valid: {choices(BACKBONE_KEYS)}")
        if not is_known_backbone(entry["name"]):
            raise UsageError(f"{where} [[backbones]] {i + 1}: unknown backbone {entry['name']!r}; valid: {describe_backbone_names()}")
        if not isinstance(entry.get("weights", ""), str):
            raise UsageError(f"{where} [[backbones]] {i + 1}: 'weights' must be a path string")

    resolved_datasets, skipped = _expand_datasets(dataset_entries, data_roots or {}, where)
    head_cells = _expand_heads(head_entries, where)

    cells: list[Cell] = []
    for seed, (ds, options, root, train_split, test_split), bb, (head, hparams) in itertools.product(
        seeds, resolved_datasets, backbone_entries, head_cells
    ):
        cell = Cell(
            dataset=ds, dataset_options=options, train_split=train_split, test_split=test_split,
            backbone=bb["name"], weights=bb.get("weights") or None, head=head, hparams=hparams,
            recipe=recipe, seed=seed, root=root, recipe_preset=preset,
        )
        cells.append(cell)
    return Grid(name=path.stem, path=path, description=data.get("description", ""), cells=with_sources(cells), skipped=skipped, run=run)


def with_sources(cells: list[Cell]) -> list[Cell]:
    """Drop duplicate cells, and put the source run of every derived head just before it.

    A head class with ``derived_from = (head, hparams)`` is not trained: it reuses the trained
    weights of that head in the same dataset / backbone / recipe / seed (e.g. ``csra_free`` scores
    a trained average-pooling baseline's classifier with ``mean + λ·max``).
    """
    out: list[Cell] = []
    seen: set[str] = set()
    for cell in cells:
        derived = getattr(registry.head_class(cell.head), "derived_from", None)
        if derived is not None:
            source_head, source_hparams = derived
            source = replace(cell, head=source_head, hparams={**registry.head_hparams(source_head), **source_hparams})
            cell.source_run_id = source.run_id
            if source.run_id not in seen:
                seen.add(source.run_id)
                out.append(source)
        if cell.run_id not in seen:
            seen.add(cell.run_id)
            out.append(cell)
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` (1 <= K <= N) -> (K, N)."""
    k, sep, n = text.partition("/")
    try:
        shard, count = int(k), int(n)
    except ValueError:
        shard, count = 0, 0
    if not sep or not 1 <= shard <= count:
        raise UsageError(f"--shard expects K/N with 1 <= K <= N (e.g. 2/4), got {text!r}")
    return shard, count


def shard_cells(cells: list[Cell], shard: int, count: int) -> list[Cell]:
    """Every ``count``-th family of cells, starting with the ``shard``-th (1-based).

    A family is a trained cell together with the derived cells that reuse it, so a derived head
    always runs in the launch that trains its source. The order is the grid's expansion order,
    which is stable, so N launches with shards 1/N .. N/N run every cell exactly once.
    """
    families: dict[str, list[Cell]] = {}
    for cell in cells:
        families.setdefault(cell.source_run_id or cell.run_id, []).append(cell)
    chosen = [family for i, family in enumerate(families.values()) if i % count == shard - 1]
    return [cell for family in chosen for cell in family]
