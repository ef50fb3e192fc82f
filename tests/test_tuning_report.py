"""The report of a tuned grid (bench/report/tuning.py) on synthetic rows and score files.

Three head configurations x two seeds x three points; the validation mAP of every point is set by
hand, so the choices are known; the expected numbers (means over seeds of the chosen points, the
mAP at every point, Kendall's τ with scipy, the test-set optimism) are computed here from the rows.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.cli import main
from bench.eval.metrics import multilabel_metrics
from bench.report import build
from bench.results import store as results

CLASSES = ["red_circle", "blue_square", "green_star", "cyan_ring", "pink_cross"]
N = 60
SPACE = {"lr": [0.0003, 0.003, 0.03]}
RECIPE = {"protocol": "frozen", "epochs": 2, "optimizer": "adamw", "batch_size": 32, "select": "best_val", "val_fraction": 0.2}
CONFIGS = [("baseline", {"pool": "avg"}), ("baseline", {"pool": "max"}), ("csra", {"num_heads": 1, "lam": 0.5})]
# (config index, point) -> quality of the test scores; (config index, seed, point) -> validation mAP
QUALITY = {(0, 0): 0.2, (0, 1): 0.8, (0, 2): 0.4, (1, 0): 1.2, (1, 1): 0.3, (1, 2): 0.5, (2, 0): 0.9, (2, 1): 1.0, (2, 2): 1.6}
VAL = {
    (0, 0): [0.30, 0.50, 0.40], (0, 1): [0.30, 0.45, 0.45],
    (1, 0): [0.60, 0.40, 0.60], (1, 1): [0.61, 0.40, 0.20],  # seed 0: a tie of points 1 and 3 -> point 1
    (2, 0): [0.20, 0.70, 0.50], (2, 1): [0.99, 0.30, 0.50],  # seed 1: point 1 failed (never chosen) -> point 3
}
CHOSEN = {(0, 0): 1, (0, 1): 1, (1, 0): 0, (1, 1): 0, (2, 0): 1, (2, 1): 2}
FAILED = {(2, 1, 0)}


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _targets() -> np.ndarray:
    targets = (np.random.default_rng(3).random((N, len(CLASSES))) < 0.35).astype(np.uint8)
    targets[0] = 1
    return targets


def write_rows(folder: Path) -> list[dict]:
    targets = _targets()
    ignore = np.zeros_like(targets, dtype=bool)
    ids = [f"img_{i:03d}" for i in range(N)]
    rows = []
    for c, (head, hparams) in enumerate(CONFIGS):
        for seed in (0, 1):
            group = _hash([head, hparams, seed, SPACE])
            for p, lr in enumerate(SPACE["lr"]):
                recipe = {**RECIPE, "lr": lr}
                config = {"dataset": {"name": "shapes", "options": {}, "train_split": "train", "test_split": "test"},
                          "backbone": {"name": "tiny_cnn", "weights": None}, "head": {"name": head, "hparams": hparams},
                          "recipe": recipe, "seed": seed, "tune": {"space": SPACE}}
                row = {
                    "run_id": _hash(config), "group_id": _hash({k: v for k, v in config.items() if k != "seed"}),
                    "dataset": "shapes", "backbone": "tiny_cnn", "protocol": "frozen", "head": head, "hparams": hparams, "seed": seed,
                    "recipe": recipe, "config": config, "dataset_options": {}, "train_split": "train", "test_split": "test",
                    "select": "best_val", "val_images": 30, "val_mAP": VAL[(c, seed)][p], "test_images": N,
                    "tune_group": group, "tune_index": p, "tune_points": 3, "tune_point": {"lr": lr}, "tune_default": 1, "tune_refit": False,
                }
                if (c, seed, p) in FAILED:
                    row.update(status="failed", error_type="RuntimeError", error="boom")
                    results.write_row(folder, row)
                    rows.append(row)
                    continue
                rng = np.random.default_rng(int(_hash([c, seed, p]), 16))
                logits = (1.0 + QUALITY[(c, p)] + 0.1 * seed) * (2.0 * targets - 1.0) + rng.normal(0, 1.6, targets.shape)
                scores = (1 / (1 + np.exp(-logits))).astype(np.float32)
                row.update(status="finished", **multilabel_metrics(scores, targets, ignore))
                results.save_scores(folder, row["run_id"], ids, scores, targets, ignore, CLASSES)
                results.write_row(folder, row)
                rows.append(row)
    return rows


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], str]:
    folder = tmp_path_factory.mktemp("tuned")
    rows = write_rows(folder)
    assert main(["report", "--results", str(folder), "--format", "md,html", "--resamples", "200"]) == 0
    return folder, rows, (folder / "leaderboard.md").read_text()


def _row(rows: list[dict], c: int, seed: int, p: int) -> dict:
    head, hparams = CONFIGS[c]
    return next(r for r in rows if r["head"] == head and r["hparams"] == hparams and r["seed"] == seed and r["tune_index"] == p)


def _table_after(text: str, title: str) -> pd.DataFrame:
    after = text.split(title, 1)[1].splitlines()
    start = next(i for i, line in enumerate(after) if line.startswith("|"))
    lines = []
    for line in after[start:]:
        if not line.startswith("|"):
            break
        lines.append(line)
    header = [c.strip() for c in lines[0].strip()[1:-1].split("|")]
    body = [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])] for line in lines[2:]]
    return pd.DataFrame(body, columns=header)


def test_the_leaderboard_ranks_each_seeds_choice(tuned) -> None:
    _, rows, text = tuned
    board = _table_after(text, "## shapes · tiny_cnn · frozen\n")
    assert len(board) == 3
    expected = {}
    for c, (head, hparams) in enumerate(CONFIGS):
        chosen = [_row(rows, c, s, CHOSEN[(c, s)])["mAP"] for s in (0, 1)]
        expected[head + json.dumps(hparams)] = (np.mean(chosen), np.std(chosen, ddof=1))
    got = sorted((float(v.split(" ± ")[0]), float(v.split(" ± ")[1])) for v in board["mAP"])
    want = sorted((round(100 * m, 2), round(100 * s, 2)) for m, s in expected.values())
    assert [x for pair in got for x in pair] == pytest.approx([x for pair in want for x in pair], abs=0.006)
    assert set(board["n"]) == {"2"}
    # Δ vs the tuned reference (baseline avg) is computed for the two other configurations
    deltas = board["Δ mAP [95% CI]"].tolist()
    assert sum(d.startswith("ref") for d in deltas) == 1 and all(re.match(r"^[+-]\d", d) for d in deltas if not d.startswith("ref"))
    assert "lr=tuned" in text.split("## shapes · tiny_cnn · frozen", 1)[1].split("\n## ", 1)[0]


def test_the_map_of_every_point_kendall_tau_and_optimism(tuned) -> None:
    _, rows, text = tuned
    part = text.split("## Tuning: shapes · tiny_cnn · frozen", 1)[1]
    grid = _table_after(part, "(a) Test mAP (%) of every head configuration at every point")
    matrix = np.full((3, 3), np.nan)
    tuned_mean = np.zeros(3)
    for c in range(3):
        for p in range(3):
            values = [_row(rows, c, s, p)["mAP"] for s in (0, 1) if (c, s, p) not in FAILED]
            matrix[c, p] = np.mean(values)
        tuned_mean[c] = np.mean([_row(rows, c, s, CHOSEN[(c, s)])["mAP"] for s in (0, 1)])
    labels = ["baseline (avg", "baseline (max", "csra"]
    for c, label in enumerate(labels):
        line = grid[grid["head configuration"].str.startswith(label)].iloc[0]
        assert [float(line[f"P{p + 1}"]) for p in range(3)] == pytest.approx(list(np.round(100 * matrix[c], 1)), abs=0.051)
        assert float(line["tuned"]) == pytest.approx(round(100 * tuned_mean[c], 1), abs=0.051)
    taus = _table_after(part, "(b) Kendall's τ between each point's ranking and the tuned ranking")
    for p in range(3):
        want = stats.kendalltau(matrix[:, p], tuned_mean).statistic
        assert float(taus["Kendall's τ"].iloc[p]) == pytest.approx(want, abs=0.006)
    assert "(grid's recipe)" in taus["point"].iloc[1]
    chosen = _table_after(part, "Chosen points (validation) and the leaderboard at the grid's recipe")
    for c, label in enumerate(labels):
        line = chosen[chosen["head configuration"].str.startswith(label)].iloc[0]
        assert line["chosen point per seed"].startswith(f"seed 0: P{CHOSEN[(c, 0)] + 1} ") and f"seed 1: P{CHOSEN[(c, 1)] + 1} " in line["chosen point per seed"]
        optimism = []
        for s in (0, 1):
            test = [_row(rows, c, s, p)["mAP"] for p in range(3) if (c, s, p) not in FAILED]
            optimism.append(max(test) - _row(rows, c, s, CHOSEN[(c, s)])["mAP"])
        assert float(line["test-set optimism"]) == pytest.approx(100 * np.mean(optimism), abs=0.006)
        assert int(line["rank at the grid's recipe"]) == int(stats.rankdata(-matrix[:, 1], method="min")[c])
    assert "Heads were tuned" in part and "ties go to the earliest point" in part
    assert "Failed points (never chosen): csra" in part and "seed 1: P1" in part
    assert "![mAP at every point" in part


def test_tune_selected_is_in_the_report_frame(tuned) -> None:
    folder, rows, _ = tuned
    loaded = results.load_all(folder).set_index("run_id")
    first = rows[0]
    # the tune columns survive the row schema (bench/results/schema.py)
    assert loaded.loc[first["run_id"], "tune_point"] == {"lr": 0.0003}
    assert int(loaded.loc[first["run_id"], "tune_index"]) == 0 and int(loaded.loc[first["run_id"], "tune_default"]) == 1
    assert loaded.loc[first["run_id"], "tune_group"] == first["tune_group"] and not bool(loaded.loc[first["run_id"], "tune_refit"])
    report = build(results.load_all(folder))
    frame = report.tuning[0].frame
    selected = set(frame.loc[frame["tune_selected"], "run_id"])
    expected = {_row(rows, c, s, p)["run_id"] for (c, s), p in CHOSEN.items()}
    assert selected == expected
    # every reader of the results gets the same flag (derived on load, never stored in a row file)
    assert set(loaded.index[loaded["tune_selected"].map(lambda v: v is True)]) == expected
    assert all(v is False for r, v in loaded["tune_selected"].items() if r not in expected and isinstance(loaded.loc[r, "tune_group"], str))


def test_the_html_report_has_the_tuning_section(tuned) -> None:
    folder, _, _ = tuned
    page = (folder / "report.html").read_text()
    assert "Tuning: shapes · tiny_cnn · frozen" in page and "Kendall" in page and "data:image/png;base64," in page


def test_leaderboard_rows_keep_each_choice_or_its_fresh_refit() -> None:
    from bench.report.tuning import leaderboard_rows

    def row(run_id: str, group: str, seed: int, index: int | None, val: float, status: str = "finished", refit: bool = False) -> dict:
        lr = None if index is None else SPACE["lr"][index]
        recipe = {**RECIPE, "lr": lr if lr is not None else 0.003, **({"select": "last"} if refit else {})}
        config = {"dataset": {"name": "shapes"}, "head": {"name": "csra", "hparams": {}}, "recipe": recipe, "seed": seed,
                  "tune": {"space": SPACE, **({"refit": True} if refit else {})}}
        return {"run_id": run_id, "group_id": run_id, "tune_group": group, "tune_index": index, "tune_points": 3, "tune_refit": refit,
                "status": status, "val_mAP": val, "head": "csra", "hparams": {}, "seed": seed, "recipe": recipe, "config": config}

    rows = pd.DataFrame([
        row("a0", "A", 0, 0, 0.5), row("a1", "A", 0, 1, 0.7), row("a2", "A", 0, 2, 0.1, status="failed"),
        row("a-refit", "A", 0, 1, float("nan"), refit=True),  # a refit of A's choice: shown instead of it
        row("b0", "B", 1, 0, 0.9), row("b1", "B", 1, 1, 0.2), row("b2", "B", 1, 2, 0.3),
        row("b-refit", "B", 1, 1, float("nan"), refit=True),  # stale: B's choice is point 0
        {"run_id": "plain", "group_id": "plain", "tune_group": None, "status": "finished", "head": "baseline", "seed": 0},
    ])
    kept = leaderboard_rows(rows).set_index("run_id")
    assert sorted(kept.index) == ["a-refit", "a2", "b0", "plain"]
    assert kept.loc["a-refit", "recipe"]["lr"] == "tuned" and kept.loc["b0", "config"]["recipe"]["lr"] == "tuned"
    # the seeds of one head configuration are one experiment only when both rows are points or both refits
    assert kept.loc["a-refit", "group_id"] != kept.loc["b0", "group_id"]
    rows = rows[~rows["run_id"].isin(["a-refit", "b-refit"])]
    kept = leaderboard_rows(rows).set_index("run_id")
    assert sorted(kept.index) == ["a1", "a2", "b0", "plain"]
    assert kept.loc["a1", "group_id"] == kept.loc["b0", "group_id"] != "a1"
    assert bool(kept.loc["a1", "tune_selected"]) and not bool(kept.loc["a2", "tune_selected"])
