"""The partial-labels report (issue 29): test mAP vs observed share per head and loss with the
seed spread, and the section's settings saying what was observed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from bench.eval.metrics import multilabel_metrics
from bench.report.observed import loss_label, observed_share_points
from bench.results import store as results

ALL: dict = {"num_train": 100}
TENTH = {"num_train": 100, "observe": "fraction", "observe_fraction": 0.1, "observe_seed": 0}
SINGLE = {"num_train": 100, "observe": "single_positive", "observe_seed": 0}
HALF = {"num_train": 100, "observe": "fraction", "observe_fraction": 0.5, "observe_seed": 0}
BCE_IGNORE = {"loss": "bce", "unknown_labels": "ignore"}
LLR = {"loss": "ll_r", "ll_r_delta_rel": 0.02}


def row(head: str, options: dict, recipe: dict, seed: int, m: float, share: float | None) -> dict:
    return {"run_id": f"{head}{json.dumps(options)}{json.dumps(recipe)}{seed}", "status": "finished", "head": head, "hparams": {},
            "dataset_options": options, "recipe": recipe, "seed": seed, "mAP": m, "observed_fraction": share}


def test_points_are_means_over_seeds_with_min_max_per_loss_head_and_setting() -> None:
    rows = pd.DataFrame([
        row("baseline", ALL, BCE_IGNORE, 0, 0.80, 1.0), row("baseline", ALL, BCE_IGNORE, 1, 0.90, 1.0),
        row("baseline", TENTH, BCE_IGNORE, 0, 0.50, 0.098), row("baseline", TENTH, BCE_IGNORE, 1, 0.60, 0.098),
        row("baseline", SINGLE, BCE_IGNORE, 0, 0.40, 0.30), row("baseline", SINGLE, BCE_IGNORE, 1, 0.45, 0.30),
        row("baseline", HALF, BCE_IGNORE, 0, 0.70, None),  # a row from before the column: the asked share
        row("baseline", SINGLE, BCE_IGNORE, 2, 0.99, None),  # single_positive without its realised share: left out
        row("csra", TENTH, LLR, 0, 0.55, 0.098),
        {**row("csra", TENTH, LLR, 1, 0.10, 0.098), "status": "failed"},
    ])
    points = observed_share_points(rows)
    base = points[points["config"].str.startswith("baseline") & (points["loss"] == "bce (unknown: ignore)")].set_index("mode")
    assert base.loc["all", "mAP"] == pytest.approx(0.85) and base.loc["all", "share"] == 1.0
    assert (base.loc["all", "low"], base.loc["all", "high"], base.loc["all", "seeds"]) == (0.80, 0.90, 2)
    assert base.loc["single_positive", "mAP"] == pytest.approx(0.425) and base.loc["single_positive", "share"] == pytest.approx(0.30)
    assert base.loc["single_positive", "seeds"] == 2
    fraction = base.loc["fraction"].set_index("share")
    assert fraction.loc[0.098, "mAP"] == pytest.approx(0.55) and fraction.loc[0.5, "mAP"] == pytest.approx(0.70)
    llr = points[points["loss"] == "ll_r"]
    assert len(llr) == 1 and llr.iloc[0]["mAP"] == pytest.approx(0.55) and llr.iloc[0]["seeds"] == 1  # the failed run is not a point
    # one observe setting only: nothing to plot
    assert observed_share_points(rows[rows["dataset_options"].map(lambda o: "observe" not in o)]).empty


def test_loss_labels_name_unknown_labels_only_where_the_loss_reads_it() -> None:
    assert loss_label({"loss": "bce", "unknown_labels": "negative"}) == "bce (unknown: negative)"
    assert loss_label({"loss": "asl"}) == "asl (unknown: ignore)"  # the default
    assert loss_label(json.dumps({"loss": "ll_r", "unknown_labels": "negative"})) == "ll_r"


def _write(folder: Path, head: str, options: dict, seed: int, quality: float, share: float) -> None:
    classes = ["a", "b", "c"]
    rng = np.random.default_rng([seed, int(100 * quality) + 100])
    targets = (rng.random((40, 3)) < 0.4).astype(np.uint8)
    targets[0] = 1
    ignore = np.zeros_like(targets, dtype=bool)
    scores = (1 / (1 + np.exp(-((1 + quality) * (2.0 * targets - 1) + rng.normal(0, 1.5, targets.shape))))).astype(np.float32)
    recipe = {"protocol": "frozen", "loss": "bce"}
    config = {"dataset": {"name": "shapes", "options": options, "train_split": "train", "test_split": "test"},
              "backbone": {"name": "tiny_cnn", "weights": None}, "head": {"name": head, "hparams": {}}, "recipe": recipe, "seed": seed}
    digest = lambda c: hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:16]  # noqa: E731
    record = {"run_id": digest(config), "group_id": digest({k: v for k, v in config.items() if k != "seed"}), "status": "finished",
              "dataset": "shapes", "backbone": "tiny_cnn", "protocol": "frozen", "head": head, "hparams": {}, "seed": seed,
              "recipe": recipe, "dataset_options": options, "train_split": "train", "test_split": "test", "config": config,
              "test_images": 40, "observe": options.get("observe", "all"), "observe_fraction": options.get("observe_fraction"),
              "observed_fraction": share, **multilabel_metrics(scores, targets, ignore)}
    results.save_scores(folder, record["run_id"], [str(i) for i in range(40)], scores, targets, ignore, classes)
    results.write_row(folder, record)


def test_report_draws_the_plot_and_says_what_was_observed(tmp_path: Path) -> None:
    for head, quality in (("baseline", 0.0), ("csra", 0.5)):
        for options, share, drop in ((ALL, 1.0, 0.0), (TENTH, 0.1, 0.6)):
            for seed in (0, 1):
                _write(tmp_path, head, options, seed, quality - drop, share)
    assert main(["report", "--results", str(tmp_path), "--format", "md", "--resamples", "100"]) == 0
    text = (tmp_path / "leaderboard.md").read_text()
    assert "test mAP vs observed share of training labels" in text
    pngs = list((tmp_path / "plots").glob("*__observed_share.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "observed labels: each training label observed with probability 0.1 (observe_seed 0)" in text
    assert "observe=" not in text  # not repeated as a raw key=value option
