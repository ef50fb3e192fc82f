"""The leaderboard report: tables, Δ mAP, legend, plots, filters, merging, ``run_bench.py report``.

The result directories are synthetic: rows written with ``bench.results.store.write_row`` and per-image
scores with ``save_scores`` (two datasets, baseline avg/max, CSRA over H x λ, ML-GCN over τ x p,
three seeds); expected numbers are computed here from the rows / scores, independently of
``bench.report.build``.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from bench import report
from bench.cli import main
from bench.eval.metrics import multilabel_metrics
from bench.results import store as results

SEEDS = (0, 1, 2)
RECIPE = {"protocol": "finetune", "epochs": 2, "lr": 0.003, "optimizer": "adamw", "batch_size": 32}
DATASETS = {
    # name: (classes, images, dataset options)
    "shapes": (["red_circle", "blue_square", "green_star", "cyan_ring", "pink_cross"], 80, {"num_train": 100, "num_test": 80}),
    "voc2007": (["aeroplane", "bicycle", "bird", "boat"], 60, {"difficult": "train_positive", "label_source": "auto"}),
}
# (head, hparams, quality): higher quality -> scores separate positives better
EXPERIMENTS = [
    ("baseline", {"pool": "avg"}, 0.0),
    ("baseline", {"pool": "max"}, 0.6),
    *[("csra", {"num_heads": h, "lam": lam}, 0.2 + 0.3 * (h == 2) + lam) for h in (1, 2) for lam in (0.1, 0.5)],
    *[("ml_gcn", {"tau": tau, "p": p, "reweight": "paper"}, 0.3 + tau + p) for tau in (0.3, 0.4) for p in (0.2, 0.25)],
    ("ml_gcn", {"tau": 0.4, "p": 0.2, "reweight": "official"}, 2.0),  # not in the τ x p heat map (reweight)
]


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _labels(dataset: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    classes, n, _ = DATASETS[dataset]
    rng = np.random.default_rng(len(dataset))
    targets = (rng.random((n, len(classes))) < 0.35).astype(np.uint8)
    targets[0] = 1  # every class has a positive
    ignore = np.zeros_like(targets, dtype=bool)
    if dataset == "voc2007":
        ignore[rng.random(targets.shape) < 0.08] = True
        ignore[0] = False
    return classes, targets, ignore


def write_experiment(folder: Path, dataset: str, head: str, hparams: dict, quality: float, seed: int, finished_at: str = "2026-01-01T00:00:00", extra: dict | None = None) -> dict:
    """One finished run: its row (metrics from its scores) and its score file."""
    classes, targets, ignore = _labels(dataset)
    n = len(targets)
    rng = np.random.default_rng(int(_hash([dataset, head, hparams, seed]), 16))
    logits = (1.0 + quality) * (2.0 * targets - 1.0) + rng.normal(0, 1.6, targets.shape)
    scores = (1 / (1 + np.exp(-logits))).astype(np.float32)
    options = DATASETS[dataset][2]
    config = {
        "dataset": {"name": dataset, "options": options, "train_split": "train", "test_split": "test"},
        "backbone": {"name": "tiny_cnn", "weights": None},
        "head": {"name": head, "hparams": hparams},
        "recipe": RECIPE,
        "seed": seed,
    }
    no_seed = {k: v for k, v in config.items() if k != "seed"}
    row = {
        "run_id": _hash(config), "group_id": _hash(no_seed), "status": "finished", "dataset": dataset, "backbone": "tiny_cnn",
        "protocol": "finetune", "head": head, "hparams": hparams, "seed": seed, "recipe": RECIPE, "recipe_preset": None,
        "dataset_options": options, "train_split": "train", "test_split": "test", "weights": None, "config": config,
        "test_images": n, "train_images_per_s": 1000.0 + 10 * seed + 100 * quality, "eval_images_per_s": 5000.0,
        "head_params": 1000 * (1 + len(json.dumps(hparams))), "finished_at": finished_at,
    }
    if dataset == "voc2007":
        row["head_latency_b1_ms"] = 0.1 + 0.05 * quality + 0.001 * seed
    row.update(multilabel_metrics(scores, targets, ignore))
    row.update(extra or {})
    ids = [f"{dataset}_{i:04d}" for i in range(n)]
    order = rng.permutation(n)  # score files need not list images in the same order
    results.save_scores(folder, row["run_id"], [ids[i] for i in order], scores[order], targets[order], ignore[order], classes)
    results.write_row(folder, row)
    return row


def make_results(folder: Path, datasets: tuple[str, ...] = tuple(DATASETS), seeds: tuple[int, ...] = SEEDS) -> list[dict]:
    rows = []
    for dataset in datasets:
        for head, hparams, quality in EXPERIMENTS:
            for seed in seeds:
                rows.append(write_experiment(folder, dataset, head, hparams, quality, seed))
    return rows


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("results")
    rows = make_results(folder)
    failed = dict(rows[0], run_id="f" * 16, status="failed", error_type="RuntimeError", error="out of memory", seed=9)
    for key in ("mAP", "CF1"):
        failed.pop(key)
    results.write_row(folder, failed)
    return folder, rows


@pytest.fixture(scope="module")
def built(synthetic: tuple[Path, list[dict]]) -> tuple[Path, str]:
    folder, _ = synthetic
    # 1,000 resamples: with families of 10, 200 could not show any Holm-significant difference
    assert main(["report", "--results", str(folder), "--format", "md,html", "--resamples", "1000"]) == 0
    return folder, (folder / "leaderboard.md").read_text()


def md_tables(text: str) -> dict[str, pd.DataFrame]:
    """``{section heading: its first table}`` of every markdown table under a ``## `` heading."""
    out: dict[str, pd.DataFrame] = {}
    heading, block = None, []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block and heading and heading not in out:
            header = [c.strip() for c in block[0].strip()[1:-1].split("|")]
            body = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", b.strip()[1:-1])] for b in block[2:]]
            out[heading] = pd.DataFrame(body, columns=header)
        block = []
        if line.startswith("## "):
            heading = line[3:].strip()
    return out


def expected_section(rows: list[dict], dataset: str) -> pd.DataFrame:
    frame = pd.DataFrame([r for r in rows if r["dataset"] == dataset and r["status"] == "finished"])
    frame["key"] = frame["head"] + " " + frame["hparams"].map(lambda h: json.dumps(h, sort_keys=True))
    agg = frame.groupby("key").agg(mAP=("mAP", "mean"), std=("mAP", lambda v: float(np.std(v, ddof=1))), n=("mAP", "size"))
    return agg.sort_values("mAP", ascending=False)


def _png_ok(path: Path) -> bool:
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    width, height = struct.unpack(">II", data[16:24])
    chunk_crc = struct.unpack(">I", data[29:33])[0]
    return width > 50 and height > 50 and zlib.crc32(data[12:29]) == chunk_crc


# --------------------------------------------------------------------------------------------


def test_sections_rank_experiments_by_mean_map_with_independent_mean_and_std(synthetic, built) -> None:
    _, rows = synthetic
    _, text = built
    tables = md_tables(text)
    for dataset in DATASETS:
        table = tables[f"{dataset} · tiny_cnn · finetune"]
        expected = expected_section(rows, dataset)
        assert len(table) == len(EXPERIMENTS)
        # "1 (tied)" replaces the rank of the lines not significantly worse than the best (test_ties_for_first)
        ranks = [(i + 1, r) for i, r in enumerate(table["rank"])]
        assert all(r == str(i) for i, r in ranks if r != "1 (tied)")
        for (_, want), (_, got) in zip(expected.iterrows(), table.iterrows()):
            assert got["mAP"] == f"{100 * want['mAP']:.2f} ± {100 * want['std']:.2f}"
            assert int(got["n"]) == 3
        # ranks follow the mean mAP
        means = [float(v.split(" ± ")[0]) for v in table["mAP"]]
        assert means == sorted(means, reverse=True)


def test_every_metric_column_and_the_legend_are_present(built) -> None:
    _, text = built
    table = md_tables(text)["voc2007 · tiny_cnn · finetune"]
    for column in ("rank", "head", "hyper-parameters", "mAP", "n", "CF1", "OF1", "CF1@3", "OF1@3", "mF1", "Δ mAP [95% CI]", "train img/s", "latency b1 (ms)", "head params"):
        assert column in table.columns, column
    assert "latency b1 (ms)" not in md_tables(text)["shapes · tiny_cnn · finetune"].columns  # no latency in those rows
    legend = text.split("## Legend", 1)[1]
    for column in table.columns:
        assert f"**{column}**" in legend, column
    assert "SPEC §1" in legend and "CF1" in legend and "mF1" in legend and "ties" in legend.lower()
    voc = text.split("## voc2007 · tiny_cnn · finetune", 1)[1].split("## ", 1)[0]
    assert "difficult policy: `train_positive` (difficult labels are positives in training and ignored in evaluation" in voc
    assert "lr=0.003" in voc
    shapes = text.split("## shapes · tiny_cnn · finetune", 1)[1].split("## ", 1)[0]
    assert "no difficult labels" in shapes


def test_delta_column_matches_the_score_files_and_marks_significance(synthetic, built) -> None:
    folder, rows = synthetic
    _, text = built
    table = md_tables(text)["shapes · tiny_cnn · finetune"]
    by_label = {(r["head"], r["hyper-parameters"]): r["Δ mAP [95% CI]"] for _, r in table.iterrows()}
    assert by_label[("baseline", "avg pool")] == "ref"
    # Δ point estimate: mean over seeds of mAP(head) - mAP(avg baseline), from the rows
    base = {r["seed"]: r["mAP"] for r in rows if r["dataset"] == "shapes" and r["hparams"] == {"pool": "avg"}}
    best = [r for r in rows if r["dataset"] == "shapes" and r["head"] == "ml_gcn" and r["hparams"]["reweight"] == "official"]
    want = np.mean([r["mAP"] - base[r["seed"]] for r in best])
    # the label comes from the head's describe_hparams when the plugin is installed, else key=value
    cell = by_label[("ml_gcn", report.describe_hparams("ml_gcn", {"tau": 0.4, "p": 0.2, "reweight": "official"}))]
    match = re.fullmatch(r"([+-]\d+\.\d\d) \[([+-]\d+\.\d\d), ([+-]\d+\.\d\d)\]( \*)?", cell)
    assert match, cell
    assert float(match.group(1)) == pytest.approx(100 * want, abs=0.006)
    low, high = float(match.group(2)), float(match.group(3))
    assert low <= float(match.group(1)) <= high
    assert match.group(4) == " *" and low > 0  # a much better head: significant
    # the point estimate also equals the AP recomputed from the score files with scikit-learn
    seed_deltas = []
    for r in best:
        h = results.load_scores(folder, r["run_id"])
        b_id = next(x["run_id"] for x in rows if x["dataset"] == "shapes" and x["hparams"] == {"pool": "avg"} and x["seed"] == r["seed"])
        b = results.load_scores(folder, b_id)
        b_order = {i: k for k, i in enumerate(b["image_ids"])}
        idx = [b_order[i] for i in h["image_ids"]]
        aps = [average_precision_score(h["targets"][:, c], h["scores"][:, c]) - average_precision_score(b["targets"][idx, c], b["scores"][idx, c]) for c in range(5)]
        seed_deltas.append(np.mean(aps))
    assert float(match.group(1)) == pytest.approx(100 * np.mean(seed_deltas), abs=0.006)


def test_best_head_summary_on_top(synthetic, built) -> None:
    _, rows = synthetic
    _, text = built
    assert text.index("## Best head per dataset × backbone") < text.index("## shapes · tiny_cnn")
    best = md_tables(text)["Best head per dataset × backbone"]
    assert list(best["dataset"]) == ["shapes", "voc2007"]
    for _, line in best.iterrows():
        expected = expected_section(rows, line["dataset"])
        assert line["mAP"] == f"{100 * expected['mAP'].iloc[0]:.2f} ± {100 * expected['std'].iloc[0]:.2f}"
        assert expected.index[0].startswith(line["head"])


def test_failed_runs_are_listed(built) -> None:
    _, text = built
    failed = md_tables(text)["Failed runs"]
    assert list(failed["run_id"]) == ["f" * 16] and failed["error_type"].item() == "RuntimeError"


def test_plots_exist_are_png_and_are_linked(built) -> None:
    folder, text = built
    for dataset in DATASETS:
        slug = f"{dataset}_tiny_cnn_finetune"
        for kind in ("tradeoff", "csra_H_lambda", "mlgcn_tau_p", "per_class"):
            path = folder / "plots" / f"{slug}__{kind}.png"
            assert path.is_file() and _png_ok(path), path
            assert f"](plots/{slug}__{kind}.png)" in text
    assert "x = head latency, batch 1 (ms)" in text and "x = head parameters" in text


def test_heatmap_uses_only_paper_reweighting(synthetic, built) -> None:
    from bench.report.plots import _hparam_rows
    from bench.report.plugins import heatmap_specs

    folder, _ = synthetic
    summary = report.summarize(results.load_all(folder))
    spec = next(s for s in heatmap_specs() if s.head == "ml_gcn")
    rows, fixed, why = _hparam_rows(summary[summary["dataset"] == "shapes"], spec, None)
    assert why == "" and len(rows) == 4 and all(h["reweight"] == "paper" for h in rows["hparams"])


def test_plots_without_data_are_skipped_with_a_note(tmp_path: Path) -> None:
    for seed in SEEDS:
        write_experiment(tmp_path, "shapes", "baseline", {"pool": "avg"}, 0.0, seed)
        write_experiment(tmp_path, "shapes", "baseline", {"pool": "max"}, 0.5, seed)
    assert main(["report", "--results", str(tmp_path), "--format", "md", "--resamples", "100"]) == 0
    text = (tmp_path / "leaderboard.md").read_text()
    assert "CSRA: mAP over H × λ: skipped: no `csra` runs in this section" in text
    assert "ML-GCN: mAP over τ × p: skipped: no `ml_gcn` runs" in text
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["shapes_tiny_cnn_finetune__per_class.png", "shapes_tiny_cnn_finetune__tradeoff.png"]


def test_filters_keep_only_the_chosen_rows_and_still_compare_with_the_baseline(synthetic, tmp_path: Path) -> None:
    folder, _ = synthetic
    out = tmp_path / "out"
    assert main(["report", "--results", str(folder), "--out", str(out), "--format", "md", "--dataset", "voc2007", "--head", "csra", "--resamples", "100"]) == 0
    text = (out / "leaderboard.md").read_text()
    tables = md_tables(text)
    assert "shapes · tiny_cnn · finetune" not in tables
    table = tables["voc2007 · tiny_cnn · finetune"]
    assert set(table["head"]) == {"csra"} and len(table) == 4
    assert all(re.match(r"[+-]\d", v) for v in table["Δ mAP [95% CI]"])  # the hidden baseline is still used
    assert "Filters: dataset = voc2007; head = csra" in text
    assert not (out / "report.html").exists()
    # an unknown filter value is a usage error naming what exists
    assert main(["report", "--results", str(folder), "--out", str(out), "--dataset", "coco"]) == 2


def test_merging_two_result_directories(tmp_path: Path) -> None:
    a, b = tmp_path / "machine_a", tmp_path / "machine_b"
    for seed in (0, 1):
        write_experiment(a, "shapes", "baseline", {"pool": "avg"}, 0.0, seed)
        write_experiment(a, "shapes", "baseline", {"pool": "max"}, 0.6, seed)
    write_experiment(b, "shapes", "baseline", {"pool": "avg"}, 0.0, 2)
    write_experiment(b, "shapes", "baseline", {"pool": "max"}, 0.6, 2)
    assert main(["report", "--results", str(a), "--results", str(b), "--format", "md", "--resamples", "100"]) == 0
    table = md_tables((a / "leaderboard.md").read_text())["shapes · tiny_cnn · finetune"]
    assert set(table["n"].astype(int)) == {3}
    maxpool = table[table["hyper-parameters"] == "max pool"]["Δ mAP [95% CI]"].item()
    assert "seeds)" not in maxpool and re.match(r"[+-]\d+\.\d\d \[", maxpool)
    assert not (b / "leaderboard.md").exists()


def test_format_option(synthetic, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder, _ = synthetic
    out = tmp_path / "console-only"
    assert main(["report", "--results", str(folder), "--out", str(out), "--format", "console", "--resamples", "50"]) == 0
    printed = capsys.readouterr().out
    assert "shapes · tiny_cnn · finetune" in printed and "Best head per dataset" in printed
    assert not out.exists() or not any(out.iterdir())
    out2 = tmp_path / "both"
    assert main(["report", "--results", str(folder), "--out", str(out2), "--format", "html", "--format", "md", "--resamples", "50"]) == 0
    assert (out2 / "leaderboard.md").is_file() and (out2 / "report.html").is_file()
    assert main(["report", "--results", str(folder), "--out", str(out2), "--format", "pdf"]) == 2
    assert "--format 'pdf' is not one of" in capsys.readouterr().err
    assert main(["report", "--results", str(tmp_path / "nowhere")]) == 2


def test_default_formats_write_everything(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_experiment(tmp_path, "shapes", "baseline", {"pool": "avg"}, 0.0, 0)
    write_experiment(tmp_path, "shapes", "baseline", {"pool": "max"}, 0.6, 0)
    assert main(["report", "--results", str(tmp_path), "--resamples", "50"]) == 0
    assert (tmp_path / "leaderboard.md").is_file() and (tmp_path / "report.html").is_file()
    assert "shapes · tiny_cnn · finetune" in capsys.readouterr().out
    text = (tmp_path / "leaderboard.md").read_text()
    table = md_tables(text)["shapes · tiny_cnn · finetune"]
    assert all("±" not in v for v in table["mAP"])  # one seed: no ± std


def test_html_is_self_contained(built) -> None:
    folder, _ = built
    page = (folder / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<link" not in page and 'src="data:image/png;base64,' in page
    assert page.count("<img") == 9  # 4 plots x 2 sections + the critical-difference diagram across them


def test_no_finished_runs(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    assert main(["report", "--results", str(tmp_path), "--format", "md"]) == 0
    assert "No finished runs yet." in (tmp_path / "leaderboard.md").read_text()


def test_heatmap_holds_other_hyper_parameters_at_the_default() -> None:
    from bench.report.plots import _hparam_rows
    from bench.report.plugins import heatmap_specs

    spec = next(s for s in heatmap_specs() if s.head == "ml_gcn")
    lines = []
    for graph in ("cooccurrence", "identity"):
        for tau in (0.3, 0.4):
            for p in (0.2, 0.25):
                lines.append({"head": "ml_gcn", "hparams": {"tau": tau, "p": p, "reweight": "paper", "graph": graph, "embeddings": "onehot"}, "mAP": 0.5})
    lines.append({"head": "ml_gcn", "hparams": {"tau": 0.4, "p": 0.2, "reweight": "paper", "graph": "identity", "embeddings": "glove"}, "mAP": 0.5})
    summary = pd.DataFrame(lines)
    rows, fixed, why = _hparam_rows(summary, spec, {"tau": 0.4, "p": 0.2, "reweight": "paper", "graph": "cooccurrence", "embeddings": "onehot"})
    assert why == "" and len(rows) == 4 and fixed == {"embeddings": "onehot", "graph": "cooccurrence"}
    # without known defaults: the most common value
    rows, fixed, _ = _hparam_rows(summary, spec, None)
    assert fixed["embeddings"] == "onehot" and len(rows) == 4 and len({h["graph"] for h in rows["hparams"]}) == 1


def test_pareto_front() -> None:
    from bench.report.plots import pareto_front

    x = np.array([1.0, 2.0, 2.0, 3.0, 0.5, np.nan])
    y = np.array([70.0, 75.0, 74.0, 75.0, 60.0, 99.0])
    # (2, 74) is beaten by (2, 75); (3, 75) by (2, 75); NaN is never on the front
    assert pareto_front(x, y).tolist() == [True, True, False, False, True, False]


def test_a_seed_without_baseline_is_left_out_of_the_delta_and_said_so(tmp_path: Path) -> None:
    for seed in (0, 1):
        write_experiment(tmp_path, "shapes", "baseline", {"pool": "avg"}, 0.0, seed)
    for seed in (0, 1, 2):
        write_experiment(tmp_path, "shapes", "baseline", {"pool": "max"}, 0.6, seed)
    assert main(["report", "--results", str(tmp_path), "--format", "md", "--resamples", "100"]) == 0
    table = md_tables((tmp_path / "leaderboard.md").read_text())["shapes · tiny_cnn · finetune"]
    cell = table[table["hyper-parameters"] == "max pool"]["Δ mAP [95% CI]"].item()
    assert cell.endswith("(2/3 seeds)")


def test_ranks_across_sections_are_drawn_linked_and_inlined(built) -> None:
    folder, text = built
    path = folder / "plots" / "across_sections__critical_difference.png"
    assert path.is_file() and _png_ok(path)
    across = text.split("## Across sections", 1)[1].split("## ", 1)[0]
    assert "](plots/across_sections__critical_difference.png)" in across
    assert "Friedman's test" in across and "Wilcoxon" in across and "Holm" in across
    table = md_tables(text)["Across sections: mean ranks and critical differences"]
    assert len(table) == len(EXPERIMENTS) and list(table.columns) == ["mean rank", "configuration", "mean mAP", "group"]
    ranks = [float(v) for v in table["mean rank"]]
    assert ranks == sorted(ranks) and sum(ranks) == pytest.approx(2 * sum(range(1, len(EXPERIMENTS) + 1)) / 2)
    page = (folder / "report.html").read_text()
    assert 'id="across"' in page and "Critical-difference diagram across sections" in page


def test_one_section_says_why_there_are_no_ranks_across_sections(tmp_path: Path) -> None:
    for seed in (0, 1):
        write_experiment(tmp_path, "shapes", "baseline", {"pool": "avg"}, 0.0, seed)
        write_experiment(tmp_path, "shapes", "baseline", {"pool": "max"}, 0.6, seed)
    assert main(["report", "--results", str(tmp_path), "--format", "md", "--resamples", "50"]) == 0
    text = (tmp_path / "leaderboard.md").read_text()
    across = text.split("## Across sections", 1)[1].split("## ", 1)[0]
    assert "only one section (shapes · tiny_cnn · finetune)" in across
    assert not (tmp_path / "plots" / "across_sections__critical_difference.png").exists()


def test_runs_selected_on_the_test_set_are_labelled_everywhere(tmp_path: Path) -> None:
    from bench.report.html import render_html
    from bench.report.markdown import render_markdown
    from bench.report.tables import OPTIMISTIC

    for seed in (0, 1):
        for head, hparams, quality in EXPERIMENTS[:3]:
            write_experiment(tmp_path, "shapes", head, hparams, quality, seed)
        write_experiment(tmp_path, "shapes", "ml_gcn", {"tau": 0.4, "p": 0.2, "reweight": "official"}, 2.0, seed)
    rows = results.load_all(tmp_path)
    # the columns the training loop adds (issue 14 item 4), written here as synthetic rows
    official = rows["hparams"].map(lambda h: h.get("reweight") == "official")
    csra = rows["head"].eq("csra")
    rows["select"] = np.where(official, "best_test", np.where(csra, "best_val", "last"))
    rows["selected_epoch"] = np.where(official | csra, 7, 12)
    rows["val_mAP"] = np.where(csra, 0.8123, np.nan)
    built_report = report.build(rows, [tmp_path], tmp_path, n_resamples=100)
    section = built_report.sections[0]
    labels = dict(zip(section.table.text["head"] + " " + section.table.text["hyper-parameters"], section.table.text["selection"]))
    ml_gcn = labels["ml_gcn " + report.describe_hparams("ml_gcn", {"tau": 0.4, "p": 0.2, "reweight": "official"})]
    assert ml_gcn == f"best test epoch, epochs 7/7: {OPTIMISTIC}"  # the selected epoch of each seed
    assert labels["csra " + report.describe_hparams("csra", EXPERIMENTS[2][1])] == "best validation epoch, epochs 7/7 (val mAP 81.23)"
    assert labels["baseline max pool"] == "last epoch"
    assert sum(OPTIMISTIC in v for v in labels.values()) == 1
    # the best table (ml_gcn official is the best head) carries the label too
    assert OPTIMISTIC in " ".join(built_report.best.text["selection"])
    text = render_markdown(built_report)
    lines = [line for line in text.splitlines() if line.startswith("|") and "official" in line]
    assert lines and all(OPTIMISTIC in line for line in lines)
    assert "model selection: 2 of 4 configurations did not score their last epoch" in text
    assert f"**{OPTIMISTIC}**" in text.split("## Legend", 1)[1]  # the legend explains the label
    # plots: the per-class plot compares the optimistic head, the trade-off plot marks it
    notes = {p.slug: p.note for p in section.plots}
    assert OPTIMISTIC in notes["per_class"] and OPTIMISTIC in notes["tradeoff"]
    page = render_html(built_report, tmp_path)
    assert page.count('class="txt optimistic"') >= 2 and OPTIMISTIC in page.split('id="legend"', 1)[1]
    frame = built_report.comparisons
    assert set(frame.loc[frame["head"] == "ml_gcn", "select"]) == {"best_test"}
    # rows without the column are `last`: no selection column at all
    plain = report.build(results.load_all(tmp_path), [tmp_path], None, n_resamples=50, plots=False)
    assert "selection" not in plain.sections[0].table.labels


def test_recipe_line_leaves_out_keys_without_effect() -> None:
    from bench.report.model import _recipe_text

    bce = {"loss": "bce", "lr": 0.01, "asl_gamma_neg": 4.0, "asl_clip": 0.05, "select": "last", "val_fraction": 0.1}
    text = _recipe_text(bce, None)
    assert "lr=0.01" in text and "loss=bce" in text and "select=last" in text
    assert "asl_" not in text and "val_fraction" not in text
    asl = {**bce, "loss": "asl", "asl_gamma_neg": 2.0, "select": "best_val"}
    text = _recipe_text(asl, None)
    assert "asl_gamma_neg=2.0" in text and "asl_clip=0.05" in text and "val_fraction=0.1" in text
