"""Reliability, round 3 (issue 26), for people reading the output: a run without its score file,
results files and report folders, the console's width, and every path the docs and the report name.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def unwrapped(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


# -- 7. a run without its score file -----------------------------------------------------------------


def _holm(p: list[float]) -> list[float]:
    """Holm's step-down adjustment, written out: sorted ascending, (m - k) p_(k), running max, cap 1."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - k) * p[i]))
        out[i] = running
    return out


def test_run_without_scores_is_not_ranked_and_keeps_its_place_in_the_holm_family(tmp_path: Path) -> None:
    import pandas as pd
    from test_report import md_tables, write_experiment

    from bench.cli import main
    from bench.results import store

    folder = tmp_path / "r"
    experiments = [("baseline", {"pool": "avg"}, 0.0), ("baseline", {"pool": "max"}, 0.9)]
    experiments += [("csra", {"num_heads": 1, "lam": lam}, q) for lam, q in ((0.1, 1.0), (0.2, 0.95), (0.3, 0.3), (0.4, 2.5))]
    rows = [write_experiment(folder, "shapes", head, hp, q, seed) for head, hp, q in experiments for seed in (0, 1)]
    gone = [r for r in rows if r["hparams"] == {"num_heads": 1, "lam": 0.4}]  # the best by far
    store.scores_path(folder, gone[0]["run_id"]).unlink()
    assert main(["report", "--results", str(folder), "--format", "md", "--resamples", "400"]) == 0
    table = md_tables((folder / "leaderboard.md").read_text())
    section = next(t for title, t in table.items() if "shapes" in title)
    missing_line = section[section["hyper-parameters"].str.contains("λ=0.4")]
    assert list(missing_line["rank"]) == ["- (no scores)"]
    assert section.index[section["rank"] == "- (no scores)"][0] == section.index[-1]  # after every ranked line
    ranked = section[section["rank"] != "- (no scores)"]
    assert ranked.iloc[0]["rank"] in ("1", "1 (tied)")
    comparisons = pd.read_parquet(folder / "comparisons.parquet")
    for kind, intended in (("vs_best", 5), ("vs_reference", 5)):  # 6 lines: the best / the reference excluded
        part = comparisons[comparisons["comparison"] == kind]
        assert len(part) == intended - 1  # the run without scores has no record ...
        assert set(part["family_size"]) == {intended}  # ... but keeps its place in the family
        expected = _holm([*part["p_value"], 1.0])[:-1]
        assert part["p_holm"].tolist() == pytest.approx(expected, abs=1e-12)


def test_report_out_inside_runs_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_report import write_experiment

    from bench.cli import main

    folder = tmp_path / "r"
    write_experiment(folder, "shapes", "baseline", {"pool": "avg"}, 0.0, 0)
    before = sorted(p.name for p in (folder / "runs").iterdir())
    for out in (folder / "runs", folder / "runs" / "sub", folder / "scores"):
        assert main(["report", "--results", str(folder), "--out", str(out), "--format", "md"]) == 2
        text = unwrapped(capsys.readouterr().err)
        assert f"--out: {out} is inside" in text and "give another folder" in text
    assert sorted(p.name for p in (folder / "runs").iterdir()) == before  # nothing written there
    assert main(["report", "--results", str(folder), "--out", str(folder / "report"), "--format", "md"]) == 0
    named_runs = tmp_path / "runs"  # a results directory that is itself named runs/ is fine
    write_experiment(named_runs, "shapes", "baseline", {"pool": "avg"}, 0.0, 0)
    assert main(["report", "--results", str(named_runs), "--format", "md"]) == 0


def test_stray_parquet_in_runs_gets_its_own_advice(tmp_path: Path) -> None:
    import pandas as pd
    from test_report import write_experiment

    from bench.results import store

    folder = tmp_path / "r"
    write_experiment(folder, "shapes", "baseline", {"pool": "avg"}, 0.0, 0)
    pd.DataFrame({"note": ["a", "b"]}).to_parquet(folder / "runs" / "notes.parquet")
    with pytest.warns(UserWarning) as record:
        rows = store.load_all(folder)
    said = [str(w.message) for w in record if "notes.parquet" in str(w.message)]
    assert len(rows) == 1 and len(said) == 1
    assert "'notes' is not of the harness's form" in said[0] and "move it out of that folder" in said[0]
    assert "runs that run again" not in said[0] and "damaged" not in said[0]


# -- for people reading the output: the console fits the terminal ------------------------------------


@pytest.fixture(scope="module")
def shapes_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_report import make_results

    folder = tmp_path_factory.mktemp("results")
    make_results(folder, datasets=("shapes",), seeds=(0, 1))
    return folder


@pytest.mark.parametrize("width", [80, 120])
def test_console_leaderboard_fits_the_terminal(shapes_results: Path, width: int) -> None:
    import re

    from rich.console import Console

    from bench import report

    console = Console(width=width, record=True, force_terminal=True, color_system=None)
    report.build_report([shapes_results], formats=["console"], console=console, n_resamples=100)
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    section = lines[next(i for i, line in enumerate(lines) if line.startswith("shapes · tiny_cnn")):]
    header = next(line for line in section if " rank " in line)
    assert "mAP" in header and "p (Holm)" in header and "CF1" not in header  # the compact set, whole
    body = "\n".join(section)
    assert len(re.findall(r"\d+\.\d\d ± \d+\.\d\d", body)) == 11  # every mAP on one line, none cut
    if width >= 120:
        assert len(re.findall(r"[+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", body)) == 10  # Δ with its interval
    assert "leaderboard.md and report.html" in text


def test_console_wide_shows_every_column(shapes_results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.cli import main

    assert main(["report", "--results", str(shapes_results), "--format", "console", "--wide", "--resamples", "100"]) == 0
    out = capsys.readouterr().out
    assert "CF1" in out and "train img/s" in out
    assert main(["report", "--results", str(shapes_results), "--format", "console", "--resamples", "100"]) == 0
    assert "CF1" not in capsys.readouterr().out


# -- for people reading the output: every path the docs and the report name exists --------------------

PATH_IN_TEXT = r"(?<![\w./<-])((?:bench|docs|heads|datasets|configs|tests)/[\w./-]*\w\.(?:py|md|toml|txt|json))"


def _dangling(text: str) -> list[str]:
    import re

    from conftest import ROOT

    placeholder = re.compile(r"/[A-Z_]+\.")  # configs/NAME.toml: a name to fill in, not a file
    return sorted({p for p in re.findall(PATH_IN_TEXT, text) if not placeholder.search(p) and not (ROOT / p).exists()})


def test_every_path_the_docs_and_sources_name_exists() -> None:
    from conftest import ROOT

    files = [ROOT / "README.md", ROOT / "Makefile", *(ROOT / "docs").glob("*.md")]
    for folder in ("bench", "heads", "datasets", "configs"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".toml")]
    dangling = {str(f.relative_to(ROOT)): d for f in files if (d := _dangling(f.read_text(encoding="utf-8")))}
    assert not dangling, dangling
    assert _dangling("see `bench/backbones.py` and docs/report.md") == ["bench/backbones.py"]  # the check can fail


def test_every_path_the_report_prints_exists(shapes_results: Path) -> None:
    from bench.cli import main

    assert main(["report", "--results", str(shapes_results), "--format", "md", "--resamples", "100"]) == 0
    text = (shapes_results / "leaderboard.md").read_text()
    assert "bench/models/backbones/" in text
    assert _dangling(text) == []
