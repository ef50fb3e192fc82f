"""Grids as data: a TOML file -> validated, expanded cells, each with a stable ``run_id``.

A grid file (``configs/<name>.toml``)::

    description = "..."
    seeds = [0, 1, 2]

    [recipe]                 # bench/config/recipe.py: keys, defaults, presets
    preset = "embedded_cpu"
    epochs = 6

    [[recipes]]              # optional: variants of [recipe], each a table of keys over it; the
    loss = "bce"             # grid runs every cell once per variant (e.g. loss x unknown_labels
    unknown_labels = "ignore"  # pairs that a product of lists could not express)

    [[datasets]]             # name, optional root / train_split / test_split, then dataset options
    name = "<dataset>"
    num_train = 2000
    observe = "fraction"     # any dataset: observed training labels (bench/api/observe.py)
    observe_fraction = 0.1

    [[backbones]]            # name, optional weights ("imagenet" where packaged, or a local file)
    name = "tiny_cnn"

    [[heads]]                # name, then hyper-parameters; a list is swept (product over keys)
    name = "<head>"
    hparam = [1, 2]

    [[heads]]                # "*": EVERY registered head with its declared sweep (``Head.sweep``),
    name = "*"               # or once with its defaults when it declares none; ``exclude`` = [names]

    [run]                    # execution settings, not part of a run's identity
    save_weights = "all"
    heads_together = true    # frozen backbone: a cell group's heads train in one pass (bench/engine/job.py, trainer.py)

A cell's identity (``run_id``) is the hash of its resolved configuration: dataset name, options and
splits; backbone and weights; head and every hyper-parameter (defaults filled in); the resolved
recipe; the seed. Where the data lives (``root``) and execution settings are not part of it, with
one exception: a dataset that declares ``data_in_identity`` (your own ``folder``) adds a digest of
its train and test splits' labelled samples (``"data"``), so other data under another root are
other runs; the run ids of every other dataset are unchanged.
Expansion order is seeds, datasets, recipe variants, backbones, head entries (file order; ``"*"`` expands to the
registered heads in name order), then hyper-parameter values (keys sorted), so it does not depend
on the order of keys in the file. A ``[tune]`` table (bench/config/tune.py, docs/tuning.md)
expands every cell at every point of its search space (points innermost).

``--heads NAME`` keeps only that head's cells when the grid runs it; a registered head the grid
does not run is added with its declared sweep (or its defaults) on the grid's datasets, backbones,
recipe and seeds, so any head dropped into ``heads/`` can be run on any grid.
"""

from __future__ import annotations

import itertools
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.api import registry
from bench.api.observe import split_observe
from bench.api.head import check_hparam_values
from bench.api.registry import describe_backbone_names, is_known_backbone
from bench.config.recipe import Recipe, resolve_recipe
from bench.config.run_options import RunOptions
from bench.config.datasets import expand_datasets
from bench.config.identity import config_hash
from bench.config.tune import TuneSpec, parse_tune, point_recipes, refit_cells, tune_family, tune_fields, tune_group
from bench.core.errors import UsageError, choices
from bench.core.paths import PROJECT_ROOT

CONFIG_DIR = PROJECT_ROOT / "configs"
#: seeds feed numpy's and torch's generators, which take 32-bit unsigned integers
MAX_SEED = 2**32 - 1
# [submit]: scheduler settings for `--submit` (read and validated by bench/cluster/settings.py)
TOP_KEYS = ("description", "seeds", "recipe", "recipes", "tune", "datasets", "backbones", "heads", "run", "submit")
BACKBONE_KEYS = ("name", "weights")


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
    recipe: Recipe
    seed: int
    root: str | None = None  # where the data lives: not part of the identity
    data: str | None = None  # data_in_identity datasets: a digest of the splits' samples (in the identity)
    recipe_preset: str | None = None
    source_run_id: str | None = None  # for a derived (training-free) head: the run it reuses
    # [tune] (bench/config/tune.py): search space, point (values, 0-based grid order), or a refit
    tune_space: dict[str, list[Any]] | None = None
    tune_point: dict[str, Any] | None = None
    tune_index: int | None = None
    tune_default: int | None = None  # the point equal to the grid's [recipe], if any (reports compare with it)
    tune_refit: bool = False
    #: a refit: its group's points, which must all have rows before it trains (as ``source_run_id``)
    tune_sources: tuple[str, ...] = ()

    def config(self) -> dict[str, Any]:
        """The resolved configuration that defines this run (hashed into ``run_id``); a tuned cell
        adds ``tune`` (space, refit), so it is never an untuned run (whose row has no tune group)."""
        config = self._config()
        if self.tune_space is not None:
            config["tune"] = {"space": self.tune_space, **({"refit": True} if self.tune_refit else {})}
        return config

    @property
    def tuned(self) -> bool:
        return self.tune_space is not None

    @property
    def tune_group(self) -> str | None:
        """The tune group of a tuned cell (:func:`bench.config.tune.tune_group`); None when untuned."""
        return tune_group(self)

    def tune_fields(self) -> dict[str, Any]:
        """A tuned cell's result-row columns (:func:`bench.config.tune.tune_fields`); empty when untuned."""
        return tune_fields(self)

    def _config(self) -> dict[str, Any]:
        dataset = {"name": self.dataset, "options": self.dataset_options, "train_split": self.train_split, "test_split": self.test_split}
        if self.data is not None:  # only datasets that declare data_in_identity: other run ids stay as they were
            dataset["data"] = self.data
        return {
            "dataset": dataset,
            "backbone": {"name": self.backbone, "weights": self.weights},
            "head": {"name": self.head, "hparams": self.hparams},
            "recipe": self.recipe.identity(),
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
        tune = config.get("tune") or {}
        return cls(
            tune_space=tune.get("space"), tune_refit=bool(tune.get("refit", False)),
            dataset=d["name"], dataset_options=d["options"], train_split=d["train_split"],
            test_split=d["test_split"], backbone=b["name"], weights=b["weights"], head=h["name"],
            hparams=h["hparams"], recipe=Recipe.from_dict(config["recipe"]), seed=config["seed"], root=root, data=d.get("data"),
        )

    def describe(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hparams.items())
        observe = split_observe(self.dataset_options)[1]
        shown = "" if observe.mode == "all" else f" (observe {observe.mode}" + (f" {observe.fraction:g}" if observe.mode == "fraction" else "") + ")"
        text = f"{self.dataset}{shown} / {self.backbone} / {self.head}({hp}) / seed {self.seed}"
        if self.tune_point is not None:
            text += f" / point {self.tune_index + 1} (" + ", ".join(f"{k}={v}" for k, v in self.tune_point.items()) + ")"
        return text + (" / refit of the chosen point" if self.tune_refit else "")


@dataclass(frozen=True)
class PendingDataset:
    """A dataset of the grid that has no data root yet: how many cells it will add, and how to
    give its root."""

    name: str
    cells: int
    how: str
    layout: str

    def describe(self) -> str:
        return f"{self.name}: skipped, no data root given ({self.how}); {self.cells} cells once it is given; {self.layout}"


@dataclass
class Grid:
    """An expanded grid: its cells, the datasets skipped for lack of data, execution settings."""

    name: str
    path: Path
    description: str
    cells: list[Cell]
    pending: list[PendingDataset] = field(default_factory=list)
    run: RunOptions = field(default_factory=RunOptions)
    head_configs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # after --heads
    backbones: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    tune: TuneSpec | None = None
    #: ``[tune] refit``: per tune group, the chosen point on train + validation; NOT in ``cells``: run
    #: each after its ``tune_sources`` have rows, with ``tune.refit_recipe(cell.recipe, chosen point)``
    refits: list[Cell] = field(default_factory=list)

    @property
    def skipped(self) -> list[str]:
        """One line per dataset skipped for lack of a data root."""
        return [p.describe() for p in self.pending]


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


def _select_heads(entries: list[dict[str, Any]], wanted: list[str] | None, where: str) -> list[dict[str, Any]]:
    """``--heads``: the grid's entries of those heads; a registered head the grid does not run
    gets its declared sweep (or its defaults)."""
    if not wanted:
        return entries
    out = [e for e in entries if e["name"] in wanted]
    present = {e["name"] for e in entries}
    for name in dict.fromkeys(wanted):
        if name in present:
            continue
        if name not in registry.list_heads():
            raise UsageError(f"{where}: --heads names unknown head {name!r}; registered heads: {choices(registry.list_heads())}")
        out += declared_entries(name)
    return out


ALL_HEADS = "*"


def declared_entries(name: str) -> list[dict[str, Any]]:
    """``[[heads]]`` entries for head ``name``'s declared sweep (one entry of defaults if none)."""
    sweep = getattr(registry.head_class(name), "sweep", ()) or ({},)
    return [{"name": name, **entry} for entry in sweep]


def _resolve_head_entries(entries: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Replace a ``name = "*"`` entry with every registered head's declared entries."""
    out: list[dict[str, Any]] = []
    for i, entry in enumerate(entries):
        if entry["name"] != ALL_HEADS:
            out.append(entry)
            continue
        extra = sorted(set(entry) - {"name", "exclude"})
        if extra:
            raise UsageError(f"{where} [[heads]] {i + 1} (\"*\"): only 'exclude' may go with name = \"*\"; got {choices(extra)}")
        exclude = entry.get("exclude", [])
        if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
            raise UsageError(f"{where} [[heads]] {i + 1} (\"*\"): 'exclude' must be a list of head names")
        broken = registry.broken_plugins("head")
        if broken:
            raise UsageError(
                f"{where} [[heads]] {i + 1} (\"*\"): every head is asked for, but head plugin file(s) failed to import: "
                + "; ".join(broken.values()) + "; fix or remove them, or name the heads to run"
            )
        unknown = [e for e in exclude if e not in registry.list_heads()]
        if unknown:
            raise UsageError(f"{where} [[heads]] {i + 1} (\"*\"): exclude names unknown head(s) {choices(unknown)}; registered: {choices(registry.list_heads())}")
        for name in registry.list_heads():
            if name not in exclude:
                out += declared_entries(name)
    return out


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
            value_lists.append(values)
        for combo in itertools.product(*value_lists):
            # each value against the head's annotation, ranges included (bench.core.coerce), before
            # training; the coerced value (1 -> 1.0 for a float) is what the run id hashes
            out.append((name, {**defaults, **check_hparam_values(registry.head_class(name), dict(zip(keys, combo)), label)}))
    return out


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
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{where}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise UsageError(f"{where}: cannot be read: {exc.strerror or exc}") from exc
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown top-level key(s) {choices(unknown)}; valid: {choices(TOP_KEYS)}")

    seeds = data.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UsageError(f"{where}: 'seeds' must be an integer or a non-empty list of integers, got {data.get('seeds')!r}")
    out_of_range = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if out_of_range:
        raise UsageError(f"{where}: 'seeds' holds {choices(out_of_range)}, out of range; a seed is an integer in 0 .. {MAX_SEED} (2^32 - 1)")
    if not isinstance(data.get("description", ""), str):
        raise UsageError(f"{where}: 'description' must be a string, got {data['description']!r}")
    recipe_table = data.get("recipe", {})
    if not isinstance(recipe_table, dict):
        raise UsageError(f"{where}: 'recipe' must be a table [recipe]")
    recipes = _recipe_variants(recipe_table, data.get("recipes"), where)
    tune = parse_tune(data.get("tune"), recipe_table, where)
    if tune is not None and data.get("recipes") is not None:
        raise UsageError(f"{where}: [tune] and [[recipes]] cannot be combined (one search space is laid over one [recipe]); "
                         "tune the recipe keys in [tune], or split the grid")
    recipe, preset = recipes[0]
    # (point values, point index, recipe) per point; one untuned point per recipe variant without [tune]
    points = [(None, None, None)] if tune is None else [(p, i, r) for i, (p, r) in enumerate(point_recipes(tune, recipe_table, where))]
    space = tune.identity() if tune is not None else None
    default = next((i for p, i, _ in points if p is not None and all(getattr(recipe, k) == v for k, v in p.items())), None)
    run = RunOptions.from_table(data.get("run", {}), where)

    dataset_entries = _filter(_table_list(data, "datasets", where), datasets, "dataset", where)
    backbone_entries = _filter(_table_list(data, "backbones", where), backbones, "backbone", where)
    head_entries = _select_heads(_resolve_head_entries(_table_list(data, "heads", where), where), heads, where)

    for i, entry in enumerate(backbone_entries):
        unknown = sorted(set(entry) - set(BACKBONE_KEYS))
        if unknown:
            raise UsageError(f"{where} [[backbones]] {i + 1}: unknown key(s) {choices(unknown)}; valid: {choices(BACKBONE_KEYS)}")
        if not is_known_backbone(entry["name"]):
            raise UsageError(f"{where} [[backbones]] {i + 1}: unknown backbone {entry['name']!r}; valid: {describe_backbone_names()}")
        if not isinstance(entry.get("weights", ""), str):
            raise UsageError(f"{where} [[backbones]] {i + 1}: 'weights' must be a path string")

    resolved_datasets, skipped = expand_datasets(dataset_entries, data_roots or {}, where)
    head_cells = _expand_heads(head_entries, where)
    per_dataset = len(with_sources([
        Cell(dataset="", dataset_options={}, train_split="", test_split="", backbone=bb["name"], weights=bb.get("weights") or None,
             head=head, hparams=hparams, recipe=point_recipe or variant, seed=seed, tune_space=space, tune_point=point, tune_index=index)
        for seed, (variant, _), bb, (head, hparams), (point, index, point_recipe) in itertools.product(seeds, recipes, backbone_entries, head_cells, points)
    ]))
    pending = [PendingDataset(name, per_dataset, how, layout) for name, how, layout in skipped]

    cells: list[Cell] = []
    # a tuned grid: every head configuration x seed at every point (the points innermost, so a
    # tune group's points are adjacent in grid order)
    for seed, (ds, options, root, train_split, test_split, data_id), (variant, preset), bb, (head, hparams), (point, index, point_recipe) in itertools.product(
        seeds, resolved_datasets, recipes, backbone_entries, head_cells, points
    ):
        cell = Cell(
            dataset=ds, dataset_options=options, train_split=train_split, test_split=test_split,
            backbone=bb["name"], weights=bb.get("weights") or None, head=head, hparams=hparams,
            recipe=point_recipe or variant, seed=seed, root=root, recipe_preset=preset, data=data_id,
            tune_space=space, tune_point=point, tune_index=index, tune_default=default,
        )
        cells.append(cell)
    cells = with_sources(cells)
    check_derived_weights(cells, run, where)
    refits = refit_cells(cells, recipe) if tune is not None and tune.refit else []
    return Grid(name=path.stem, path=path, description=data.get("description", ""), cells=cells, pending=pending, run=run,
        head_configs=head_cells, backbones=[b["name"] for b in backbone_entries], seeds=list(seeds), tune=tune, refits=refits,
    )


def _recipe_variants(table: dict[str, Any], variants: Any, where: str) -> list[tuple[Recipe, str | None]]:
    """The grid's recipes with their preset names: ``[recipe]`` alone, or one per ``[[recipes]]``
    entry, each a table of keys laid over ``[recipe]`` (it may name its own ``preset``)."""
    if variants is None:
        return [(resolve_recipe(table, where), table.get("preset"))]
    if not isinstance(variants, list) or not variants or not all(isinstance(v, dict) for v in variants):
        raise UsageError(f"{where}: 'recipes' must be one or more [[recipes]] tables of recipe keys (variants of [recipe])")
    out: list[tuple[Recipe, str | None]] = []
    for i, variant in enumerate(variants):
        merged = {**table, **variant}
        out.append((resolve_recipe(merged, f"{where} [[recipes]] {i + 1}"), merged.get("preset")))
    seen: dict[str, int] = {}
    for i, (recipe, _) in enumerate(out):
        key = config_hash(recipe.identity())
        if key in seen:
            raise UsageError(f"{where}: [[recipes]] {seen[key] + 1} and {i + 1} resolve to the same recipe; remove one")
        seen[key] = i
    precisions = sorted({recipe.mixed_precision for recipe, _ in out})
    if len(precisions) > 1:
        raise UsageError(f"{where}: [[recipes]] use mixed_precision {choices(precisions)}; one launch runs one precision, so give them all the same")
    return out


def check_derived_weights(cells: list[Cell], run: RunOptions, where: str) -> None:
    """A derived head (class metadata ``derived_from``) rebuilds its source run's trained model
    from the source's saved weights, backbone included: ``[run] save_weights`` must then be
    ``"all"``, or every derived run would fail after its source trained."""
    save = run.save_weights
    derived = sorted({c.head for c in cells if c.source_run_id is not None})
    if save != "all" and derived:
        files = ", ".join(f"{h} ({registry.source_file(registry.head_class(h))})" for h in derived)
        raise UsageError(
            f"{where}: [run] save_weights = {save!r}, but head(s) {files} reuse the trained weights of another run "
            "(derived_from), which needs the full weights saved: set save_weights = 'all' (valid values: 'all', 'head', "
            "'none'; 'all' is the only one with derived heads), or leave those heads out"
        )


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


def grids_without_roots() -> list[str]:
    """Names of the shipped grids whose datasets all need no data root (the embedded data)."""
    out = []
    for path in sorted(CONFIG_DIR.glob("*.toml")):
        if path.stem == "recipes":
            continue
        try:
            with open(path, "rb") as f:
                entries = tomllib.load(f).get("datasets", [])
            if entries and all(not getattr(registry.dataset_class(e["name"]), "needs_root", False) for e in entries):
                out.append(path.stem)
        except Exception:  # a broken grid file is reported when it is used, not here
            continue
    return out


def no_cells_error(grid: Grid) -> UsageError:
    """The usage error of a grid all of whose datasets lack a data root."""
    flags = " ".join(f"--data-root {p.name}=PATH" for p in grid.pending)
    embedded = grids_without_roots()
    text = f"{grid.path}: no cell to run: no data root for {choices(p.name for p in grid.pending)}; pass {flags} (or set $HEADBENCH_ROOT_<NAME>)"
    if embedded:
        text += f"; grids that run on the embedded data with no root: {choices(embedded)} (e.g. --grid {embedded[0]})"
    return UsageError(text)


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


def head_group_key(cell: Cell) -> str | None:
    """The key shared by every cell whose heads can train in one pass over the data: same dataset
    (options, splits, root), backbone and weights, recipe and seed, with the backbone frozen
    (``protocol = "frozen"`` or ``freeze_backbone = true``), so that they all see the same
    batches of the same features. None when the backbone trains (each cell is its own pass)."""
    if not (cell.recipe.protocol == "frozen" or cell.recipe.freeze_backbone):
        return None
    config = cell.config()
    del config["head"]
    if cell.tune_point is not None:
        # every point of a tuned grid joins the same pass: the key ignores the tuned keys, and the
        # engine builds each member's optimizer, schedule, loss and clipping from its own recipe
        config["recipe"] = {k: v for k, v in config["recipe"].items() if k not in cell.tune_point}
    return config_hash({**config, "root": cell.root})


def shard_cells(cells: list[Cell], shard: int, count: int) -> list[Cell]:
    """Every ``count``-th family of cells, starting with the ``shard``-th (1-based).

    A family is a trained cell together with the derived cells that reuse it, so a derived head
    always runs in the launch that trains its source; on a frozen backbone it is the whole head
    group (:func:`head_group_key`), whose heads train in one pass. In a tuned grid a family holds
    whole tune groups (with their refits, when ``cells`` includes ``Grid.refits``): every point and
    the refit of a head configuration x seed, and on a frozen backbone every head of the seed.
    The order is the grid's expansion order, which is stable, so N launches with shards 1/N .. N/N
    run every cell exactly once.
    A shard left empty (N above the number of families) is a :class:`UsageError` that says so.
    """
    families: dict[str, list[Cell]] = {}
    family_of: dict[str, str] = {}
    for cell in cells:
        if cell.source_run_id is not None and cell.source_run_id in family_of:
            key = family_of[cell.source_run_id]
        elif cell.tuned:
            key = tune_family(cell)
        else:
            key = head_group_key(cell) or cell.source_run_id or cell.run_id
        family_of[cell.run_id] = key
        families.setdefault(key, []).append(cell)
    chosen = [family for i, family in enumerate(families.values()) if i % count == shard - 1]
    if cells and not chosen:
        raise UsageError(
            f"--shard {shard}/{count} is empty: these cells form only {len(families)} famil{'y' if len(families) == 1 else 'ies'} "
            f"(a family trains together: a frozen-backbone head group, or a run with the derived heads that reuse it), "
            f"so shards {len(families) + 1}..{count} have nothing to run; use at most {len(families)} shards"
        )
    return [cell for family in chosen for cell in family]

