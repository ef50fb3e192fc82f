"""Display tables: ONE list of column definitions for every renderer and for the legend.

:func:`make_table` turns a summary into display strings (and numeric sort keys) from the column
definitions (:data:`LEADERBOARD_COLUMNS`); the markdown, console and HTML renderers only lay that
table out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pandas as pd

METRICS = ("mAP", "CP", "CR", "CF1", "mF1", "OP", "OR", "OF1", "CP_top3", "CR_top3", "CF1_top3", "mF1_top3", "OP_top3", "OR_top3", "OF1_top3")
SECTION_KEYS = ("dataset", "backbone", "protocol")
# Per-experiment means of these row columns are carried into the summary when present.
COST_COLUMNS = ("train_images_per_s", "eval_images_per_s", "head_latency_b1_ms", "head_latency_b64_ms", "head_params", "head_flops", "total_params")
MIN_COLUMNS = ("head_latency_b1_ms", "head_latency_b64_ms")  # aggregated by the minimum over seeds
# The parts of a run's configuration, besides the head, that define its "setup".
SETUP_KEYS = ("dataset_options", "train_split", "test_split", "weights", "recipe")
FORMATS = ("md", "html", "console")

CONVENTIONS = """\
Metric conventions (SPEC §1): values are percentages on the test split. **mAP** is the mean over
the evaluated classes of non-interpolated average precision; tied scores form one threshold (as
scikit-learn), so it does not depend on the order of images. A class is evaluated when it has at
least one positive, non-ignored test label; other classes are left out of every class average.
Ignored entries (VOC "difficult" labels under the `ignore` policy) take no part in any metric. A
label is predicted when its probability is ≥ 0.5; the @3 variants also require it to be among the
3 highest scores of its image (ties to the lower class index). **CF1** (ML-GCN/CSRA) and **mF1**
(macro F1) are different numbers and are always reported under their own names."""



def _parse_json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _missing(value: Any) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _pct(mean: float, std: float, digits: int = 1) -> str:
    if _missing(mean):
        return "-"
    return f"{100 * mean:.{digits}f}" + ("" if _missing(std) else f" ± {100 * std:.{digits}f}")


def _count(value: float) -> str:
    if _missing(value):
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}" if scale > 1e3 else f"{value / scale:.1f}{suffix}"
    return f"{value:.0f}"


def _ms(value: float) -> str:
    if _missing(value):
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def _rate(value: float) -> str:
    return "-" if _missing(value) else f"{value:.0f}"


def _num(value: Any) -> float:
    return float("nan") if _missing(value) else float(value)


#: The model-selection rule of a run (recipe key ``select``, row column ``select``; rows without
#: the column are ``last``), and the label every table, plot and page puts on runs that selected
#: their epoch on the test split.
SELECT_DEFAULT = "last"
SELECT_ON_TEST = "best_test"
OPTIMISTIC = "selected on the test set (optimistic)"
SIGNIFICANCE_LEVEL = 0.05


def select_of(line: pd.Series | dict[str, Any]) -> str:
    """The line's selection rule (``last`` when the row has none)."""
    value = line.get("select")
    return SELECT_DEFAULT if _missing(value) or value == "" else str(value)


def is_optimistic(line: pd.Series | dict[str, Any]) -> bool:
    """True for runs whose epoch was selected on the test split."""
    return select_of(line) == SELECT_ON_TEST


def experiment_label(line: pd.Series | dict[str, Any], optimistic: bool = True) -> str:
    """``head (hyper-parameters)``, with ``[selected on the test set (optimistic)]`` for such runs."""
    text = str(line.get("hparams_text") or "")
    label = f"{line['head']} ({text})" if text and text != "-" else str(line["head"])
    return f"{label} [{OPTIMISTIC}]" if optimistic and is_optimistic(line) else label


def selection_text(line: pd.Series | dict[str, Any]) -> str:
    """The selection rule in words, with the selected epoch(s) and the validation mAP when known."""
    select = select_of(line)
    epochs = line.get("selected_epochs")
    epochs = [] if not isinstance(epochs, (list, tuple)) else [e for e in epochs if not _missing(e)]
    at = f", epoch{'s' if len(epochs) > 1 else ''} {'/'.join(str(int(e)) for e in epochs)}" if epochs else ""  # one per seed
    if select == SELECT_ON_TEST:
        return f"best test epoch{at}: {OPTIMISTIC}"
    if select == "best_val":
        val = line.get("val_mAP")
        return f"best validation epoch{at}" + ("" if _missing(val) else f" (val mAP {100 * float(val):.2f})")
    if select == SELECT_DEFAULT:
        return "last epoch"
    return select


def p_text(p: Any) -> str:
    """A p-value for a table: 3 decimals, ``<0.001`` below, ``-`` when missing."""
    if _missing(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def seed_spread_text(line: pd.Series | dict[str, Any]) -> str:
    """``[+0.80, +1.60] sd 0.40``: range and sample sd of the per-seed Δ (points); ``-`` under two seeds."""
    sd = line.get("delta_seed_sd")
    if _missing(sd):
        return "-"
    return f"[{100 * line['delta_seed_min']:+.2f}, {100 * line['delta_seed_max']:+.2f}] sd {100 * sd:.2f}"


def rank_text(line: pd.Series | dict[str, Any]) -> str:
    """``3``, ``1 (tied)`` for a line not significantly worse than the section's best, or
    ``- (no scores)`` for a line without per-image scores (not ranked among the others)."""
    if bool(line.get("scores_missing", False)):
        return "- (no scores)"
    return "1 (tied)" if bool(line.get("tied_first")) else str(int(line["rank"]))


def tied_text(line: pd.Series | dict[str, Any]) -> str:
    """On a section's best line: whether others tie with it."""
    others, tested = line.get("tied_others"), line.get("tie_tested")
    if _missing(tested) or not tested:
        return "-"
    others = 0 if _missing(others) else int(others)
    return f"yes, with {others} other{'s' if others != 1 else ''}" if others else f"no ({int(tested)} compared)"


def delta_text(line: pd.Series | dict[str, Any]) -> str:
    """``+1.23 [+0.45, +2.01] *`` (percentage points), ``ref``, or ``-``."""
    note = line.get("delta_note")
    if note == "ref":
        return "ref"
    if _missing(line.get("delta")):
        return "-"
    text = f"{100 * line['delta']:+.2f}"
    if not _missing(line.get("delta_low")):
        text += f" [{100 * line['delta_low']:+.2f}, {100 * line['delta_high']:+.2f}]"
        if line.get("delta_significant"):
            text += " *"
    pairs, seeds = line.get("delta_pairs"), line.get("seeds")
    if not _missing(pairs) and not _missing(seeds) and pairs < seeds:
        text += f" ({int(pairs)}/{int(seeds)} seeds)"
    return text


@dataclass(frozen=True)
class Column:
    """A display column: its label, its legend text, how to render and sort one summary line."""

    label: str
    legend: str
    text: Callable[[pd.Series], str]
    sort: Callable[[pd.Series], Any]
    needs: str | None = None  # shown only when this summary column has a value in the section
    align: str = "right"


def _metric_column(metric: str, label: str, legend: str, digits: int = 1) -> Column:
    return Column(
        label, legend, lambda r: _pct(r.get(metric), r.get(f"{metric}_std"), digits), lambda r: _num(r.get(metric)), needs=metric
    )


LEADERBOARD_COLUMNS: tuple[Column, ...] = (
    Column(
        "rank",
        "Position by mean mAP within the section (1 = best; equal means share a rank; a `--head` filter hides rows, not "
        "ranks). `1 (tied)`: the section's best configuration and every configuration not significantly worse than it: "
        "each compared with the best by the same paired bootstrap as Δ mAP (paired by seed), Holm-adjusted over those "
        "comparisons, and not `significantly worse` (adjusted p < 0.05 with a negative difference). Shown only when at "
        "least one configuration ties with the best: the top of the table is then not separable from noise. "
        "`- (no scores)`: a configuration a run of which has no per-image score file; it cannot be compared, so it "
        "follows the ranked ones, and its comparisons stay in the Holm families at p = 1.",
        rank_text, lambda r: int(r["rank"]),
    ),
    Column("head", "The registered head (`heads/<name>.py`).", lambda r: str(r["head"]), lambda r: str(r["head"]), align="left"),
    Column("hyper-parameters", "The head's hyper-parameters in words (the head's `describe_hparams`, else key=value).", lambda r: str(r["hparams_text"]), lambda r: str(r["hparams_text"]), align="left"),
    Column("setup", "Which of the section's setups (recipe, dataset options, splits, backbone weights; listed above the table) the row used. Shown only when a section mixes setups.", lambda r: str(r.get("setup", "")), lambda r: str(r.get("setup", "")), needs="setup_varies", align="left"),
    _metric_column("mAP", "mAP", "Mean average precision (%): mean ± sample standard deviation over seeds (no ± with one seed).", digits=2),
    Column("n", "Number of seeds (finished runs) aggregated in the row.", lambda r: str(int(r["seeds"])), lambda r: int(r["seeds"])),
    _metric_column("CF1", "CF1", "Per-class F1 as ML-GCN/CSRA define it: 2·CP·CR/(CP+CR) from the class-mean precision CP and recall CR (%), mean ± std."),
    _metric_column("OF1", "OF1", "Overall (micro) F1 from precision and recall summed over all labels (%), mean ± std."),
    _metric_column("CF1_top3", "CF1@3", "CF1 when each image keeps at most its 3 highest-scoring labels (%)."),
    _metric_column("OF1_top3", "OF1@3", "OF1 when each image keeps at most its 3 highest-scoring labels (%)."),
    _metric_column("mF1", "mF1", "Mean of the per-class F1 scores (macro F1, as mmpretrain/ASL) (%): a different number from CF1."),
    Column(
        "Δ mAP [95% CI]",
        "mAP(head) − mAP(the section's reference with the same dataset, backbone, protocol, recipe and seed), in percentage "
        "points, mean over seeds; in brackets the 95 % paired-bootstrap percentile interval over test images (both runs "
        "scored on the same resampled images; procedure in `bench/eval/bootstrap.py` and `docs/report.md`). This interval "
        "holds the trained models fixed: it covers which test images were drawn, NOT training randomness (seed, "
        "initialisation, data order) — see the seed range column for that. `*`: significant after Holm's correction "
        "over the section's family (every non-reference configuration of this dataset × backbone × protocol): "
        "adjusted p < 0.05 (column `p (Holm)`); an interval excluding 0 alone is not enough with many comparisons. "
        "`ref`: the reference itself. `-`: no reference run or no score files. `(k/n seeds)`: only k seeds had a "
        "reference run to pair with.",
        delta_text, lambda r: _num(r.get("delta")) if r.get("delta_note") != "ref" else 0.0, needs="delta_any",
    ),
    Column(
        "p (Holm)",
        "Two-sided paired-bootstrap p-value of Δ mAP = 0 (from the same resamples as the interval; definition in "
        "`docs/report.md`), Holm-adjusted over the section's family of comparisons with the reference. `*` in the Δ "
        "column marks adjusted p < 0.05. With R resamples no p-value is below 2/(R + 1), so a family of m "
        "comparisons needs R well above 40·m for any `*` (the Notes say when a section's family is too large for "
        "the resamples). `results/comparisons.parquet` also holds the unadjusted p-values.",
        lambda r: p_text(r.get("delta_p_holm")), lambda r: _num(r.get("delta_p_holm")), needs="delta_p",
    ),
    Column(
        "Δ seeds [min, max]",
        "The spread over seeds of the per-seed Δ mAP (each seed's head run minus the reference run of the same seed, "
        "full test set): its range and sample standard deviation, in points. It covers training randomness on this test "
        "set (with only a few seeds: an indication, not an interval), not the test-set sampling the bootstrap interval "
        "covers; neither covers other datasets or recipes. `-`: fewer than two seeds.",
        seed_spread_text, lambda r: _num(r.get("delta_seed_sd")), needs="delta_seed_sd",
    ),
    Column(
        "selection",
        "Which epoch's model was scored (recipe key `select`): `last epoch` (the default); `best validation epoch` (the "
        "epoch with the best mAP on a validation split carved from the training split; the test split is scored once); "
        f"`best test epoch: {OPTIMISTIC}` (every epoch scored on the test split and the best kept, as the papers' "
        "released code did: reproduces their numbers, but the selection uses the test labels, so the score is biased "
        "upwards). Shown when a table has runs that do not use the last epoch.",
        selection_text, lambda r: select_of(r), needs="select_noted", align="left",
    ),
    Column("train img/s", "Training images per second of the whole pipeline, all processes (mean over seeds).", lambda r: _rate(r.get("train_images_per_s")), lambda r: _num(r.get("train_images_per_s")), needs="train_images_per_s"),
    Column("eval img/s", "Evaluation images per second of the whole pipeline (mean over seeds).", lambda r: _rate(r.get("eval_images_per_s")), lambda r: _num(r.get("eval_images_per_s")), needs="eval_images_per_s"),
    Column("latency b1 (ms)", "Head forward latency at batch size 1, milliseconds (the head alone, on backbone features), minimum over seeds (timing noise only adds time).", lambda r: _ms(r.get("head_latency_b1_ms")), lambda r: _num(r.get("head_latency_b1_ms")), needs="head_latency_b1_ms"),
    Column("latency b64 (ms)", "Head forward latency at batch size 64, milliseconds (the head alone), minimum over seeds.", lambda r: _ms(r.get("head_latency_b64_ms")), lambda r: _num(r.get("head_latency_b64_ms")), needs="head_latency_b64_ms"),
    Column("head params", "Trainable parameters of the head alone (k = 10³, M = 10⁶).", lambda r: _count(r.get("head_params")), lambda r: _num(r.get("head_params")), needs="head_params"),
    Column("head FLOPs", "Floating-point operations of one forward pass of the head per image, as recorded in the run's `head_flops` (k/M/G).", lambda r: _count(r.get("head_flops")), lambda r: _num(r.get("head_flops")), needs="head_flops"),
)

BEST_COLUMNS: tuple[Column, ...] = (
    Column("dataset", "The registered dataset (`datasets/<name>.py`) whose test split is scored.", lambda r: str(r["dataset"]), lambda r: str(r["dataset"]), align="left"),
    Column("backbone", "The feature extractor the head sits on (`bench/models/backbones/`).", lambda r: str(r["backbone"]), lambda r: str(r["backbone"]), align="left"),
    Column("protocol", "The recipe's protocol: `finetune` trains backbone and head, `frozen` trains the head on fixed backbone features.", lambda r: str(r["protocol"]), lambda r: str(r["protocol"]), align="left"),
    *[c for c in LEADERBOARD_COLUMNS if c.label in ("head", "hyper-parameters", "mAP", "n", "Δ mAP [95% CI]")],
    Column(
        "tied for 1st",
        "Whether other configurations of the section are not significantly worse than this best one (see `rank`): "
        "`yes, with k others`, or `no (m compared)`; `-`: no comparison was possible (no score files).",
        tied_text, lambda r: _num(r.get("tied_others")), needs="tie_tested", align="left",
    ),
    *[c for c in LEADERBOARD_COLUMNS if c.label == "selection"],
)

ACROSS_COLUMNS: tuple[Column, ...] = (
    Column("mean rank", "Mean over the sections of the configuration's rank by mean mAP within each section (1 = best; ties share the mean rank).",
           lambda r: f"{r['mean_rank']:.2f}", lambda r: float(r["mean_rank"])),
    Column("configuration", "Head and hyper-parameters, present in every section compared.", lambda r: str(r["configuration"]), lambda r: str(r["configuration"]), align="left"),
    Column("mean mAP", "Mean over the sections of the configuration's mean mAP (%).", lambda r: f"{100 * r['mean_mAP']:.2f}", lambda r: float(r["mean_mAP"])),
    Column("group", "Letters of the groups (bars of the critical-difference diagram) the configuration belongs to: configurations "
           "adjacent in mean rank with no pair significantly different (pairwise Wilcoxon signed-rank tests over the "
           "sections, Holm-adjusted, p < 0.05). Configurations sharing a letter are not distinguishable on these sections.",
           lambda r: str(r["group"]), lambda r: str(r["group"]), align="left"),
)

FAILED_COLUMNS: tuple[Column, ...] = tuple(
    Column(name, "", lambda r, k=name: "" if _missing(r.get(k)) else str(r.get(k))[:160], lambda r, k=name: "" if _missing(r.get(k)) else str(r.get(k)), align="left")
    for name in ("run_id", "dataset", "backbone", "head", "seed", "error_type", "error")
)


@dataclass
class Table:
    """A rendered table: display strings, sort keys (numbers or strings; NaN = missing), alignment."""

    columns: list[Column]
    text: pd.DataFrame
    sort_keys: pd.DataFrame

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.columns]

    def __len__(self) -> int:
        return len(self.text)


def _has(frame: pd.DataFrame, name: str | None) -> bool:
    if name is None:
        return True
    if name not in frame:
        return False
    values = frame[name]
    return bool(values.map(lambda v: not _missing(v) and v is not False).any())


def make_table(summary: pd.DataFrame, columns: Sequence[Column] = LEADERBOARD_COLUMNS) -> Table:
    """The display table of ``summary`` (already ranked/ordered): one entry per column whose data
    is present. Every renderer (markdown, console, HTML) lays out this one table."""
    shown = [c for c in columns if _has(summary, c.needs)]
    records = [r for _, r in summary.iterrows()]
    text = pd.DataFrame({c.label: [c.text(r) for r in records] for c in shown}, columns=[c.label for c in shown])
    keys = pd.DataFrame({c.label: [c.sort(r) for r in records] for c in shown}, columns=[c.label for c in shown])
    return Table(shown, text, keys)


