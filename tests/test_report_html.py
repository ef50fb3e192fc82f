"""``report.html`` in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``)
driven by selenium. Checks that the tables and their rows are there, that every inlined plot
decodes (naturalWidth > 0), and that clicking a column header reorders the rows numerically.

When Chromium (or selenium) is missing these tests are SKIPPED with the reason and how to install
it (``make test`` installs it, so there they run).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from test_report import DATASETS, EXPERIMENTS, make_results

from bench import report

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL = (
    "install it with `sudo apt-get install -y chromium chromium-driver` (Debian/Ubuntu; `make test` does this) "
    "and `pip install selenium` in the virtualenv (the `test` extra)"
)
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1600,1200",
)


def _browser(profile: Path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip(f"selenium is not installed: {INSTALL}")
    chromium = CHROMIUM if CHROMIUM.exists() else (Path(shutil.which("chromium")) if shutil.which("chromium") else None)
    driver = CHROMEDRIVER if CHROMEDRIVER.exists() else (Path(shutil.which("chromedriver")) if shutil.which("chromedriver") else None)
    if chromium is None or driver is None:
        missing = " and ".join(str(p) for p, found in ((CHROMIUM, chromium), (CHROMEDRIVER, driver)) if found is None)
        pytest.skip(f"headless Chromium is needed to test report.html, but {missing} is missing: {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    # an explicit driver path: selenium never looks for (or downloads) a driver
    return webdriver.Chrome(service=Service(executable_path=str(driver)), options=options)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory):
    browser = _browser(tmp_path_factory.mktemp("chromium-profile"))  # first: skips at once without Chromium
    try:
        folder = tmp_path_factory.mktemp("html")
        make_results(folder)
        written = report.build_report([folder], formats=["html"], n_resamples=100)
        browser.set_page_load_timeout(120)
        browser.get(written["html"].resolve().as_uri())
        yield browser
    finally:
        browser.quit()


def _column(browser, table_id: str, label: str) -> tuple[list[str], list[str]]:
    """(texts, sort keys) of a column of a table, in the current row order."""
    return browser.execute_script(
        """
        const table = document.getElementById(arguments[0]);
        const col = Array.from(table.tHead.rows[0].cells).findIndex(th => th.textContent === arguments[1]);
        if (col < 0) { return null; }
        const rows = Array.from(table.tBodies[0].rows);
        return [rows.map(r => r.cells[col].textContent), rows.map(r => r.cells[col].getAttribute('data-sort'))];
        """,
        table_id,
        label,
    )


def _click(browser, table_id: str, label: str) -> None:
    from selenium.webdriver.common.by import By

    header = next(th for th in browser.find_element(By.ID, table_id).find_elements(By.CSS_SELECTOR, "thead th") if th.text.strip() == label)
    header.click()


def test_tables_and_rows_are_present(page) -> None:
    assert page.title == "headbench leaderboard"
    counts = page.execute_script("return Array.from(document.querySelectorAll('table.sortable')).map(t => [t.id, t.tBodies[0].rows.length]);")
    counts = dict(counts)
    assert counts["table-best"] == len(DATASETS)
    for dataset in DATASETS:
        assert counts[f"table-{dataset}_tiny_cnn_finetune"] == len(EXPERIMENTS)
    ranks, keys = _column(page, "table-shapes_tiny_cnn_finetune", "rank")
    # "1 (tied)": not significantly worse than the best; the sort key keeps the numeric rank
    assert all(r in (str(i), "1 (tied)") for i, r in enumerate(ranks, start=1))
    assert [int(float(k)) for k in keys] == list(range(1, len(EXPERIMENTS) + 1))
    assert counts["table-across"] == len(EXPERIMENTS)  # ranks across the two sections
    heads, _ = _column(page, "table-shapes_tiny_cnn_finetune", "head")
    assert set(heads) == {"baseline", "csra", "ml_gcn"}


def test_every_plot_is_inlined_and_decodes(page) -> None:
    images = page.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.src.slice(0, 22)]);"
    )
    assert len(images) == 4 * len(DATASETS) + 1  # and the critical-difference diagram across sections
    for complete, width, height, src in images:
        assert complete and width > 0 and height > 0
        assert src == "data:image/png;base64,"


def _numbers(texts: list[str]) -> list[float]:
    return [float(re.match(r"[+-]?\d+(\.\d+)?", t).group(0)) for t in texts]


def test_clicking_a_header_sorts_the_rows_numerically(page) -> None:
    table = "table-voc2007_tiny_cnn_finetune"
    before, _ = _column(page, table, "mAP")
    assert _numbers(before) == sorted(_numbers(before), reverse=True)  # ranked: best first

    _click(page, table, "mAP")  # first click: ascending
    texts, _ = _column(page, table, "mAP")
    assert _numbers(texts) == sorted(_numbers(before)) and texts != before
    _, ranks = _column(page, table, "rank")  # the numeric ranks (sort keys): "1 (tied)" hides them
    assert [int(float(r)) for r in ranks] == list(range(len(EXPERIMENTS), 0, -1))  # rows moved as a whole

    _click(page, table, "mAP")  # second click: descending
    texts, _ = _column(page, table, "mAP")
    assert _numbers(texts) == sorted(_numbers(before), reverse=True)

    # a numeric column whose text is not a plain number ("16.0k"): sorted by its numeric key
    _click(page, table, "head params")
    texts, keys = _column(page, table, "head params")
    values = [float(k) for k in keys]
    assert values == sorted(values) and all(t.endswith("k") for t in texts)
    # numbers that need a numeric (not a text) sort: latency "0.101" < "0.15" < "0.2"
    _click(page, table, "latency b1 (ms)")
    texts, _ = _column(page, table, "latency b1 (ms)")
    assert [float(t) for t in texts] == sorted(float(t) for t in texts)


def test_text_columns_sort_alphabetically(page) -> None:
    table = "table-shapes_tiny_cnn_finetune"
    _click(page, table, "head")
    heads, _ = _column(page, table, "head")
    assert heads == sorted(heads)
    _click(page, table, "head")
    heads, _ = _column(page, table, "head")
    assert heads == sorted(heads, reverse=True)
    sort_state = page.execute_script(
        "return Array.from(document.getElementById(arguments[0]).tHead.rows[0].cells).map(th => th.getAttribute('aria-sort'));", table
    )
    assert sort_state.count("descending") == 1 and sort_state.count("ascending") == 0
