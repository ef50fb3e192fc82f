"""Result rows aggregated over seeds: one line per experiment (``group_id``)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from bench.report.plugins import describe_hparams, is_reference  # noqa: F401 (is_reference: re-exported)
from bench.report.tables import (
    COST_COLUMNS,
    METRICS,
    MIN_COLUMNS,
    SECTION_KEYS,
    SELECT_DEFAULT,
    SETUP_KEYS,
    _missing,
    _parse_json,
    is_optimistic,
    select_of,
)


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Aggregate finished rows over seeds: one line per experiment (``group_id``).

    Returns a frame with the section keys, ``group_id``, ``head``, ``hparams`` (dict),
    ``hparams_text``, ``seeds`` (count), ``run_ids`` (list), ``setup`` (a JSON key of the
    non-head configuration), ``select`` (the model-selection rule, ``last`` for rows without it),
    ``select_noted`` / ``optimistic`` (not ``last`` / selected on the test split),
    ``selected_epochs`` (list), ``val_mAP`` (mean) and, for every metric m present, ``m`` (mean) and ``m_std`` (sample
    std, NaN with one seed); cost columns (:data:`COST_COLUMNS`) are means. Sorted by section,
    then mean mAP descending.
    """
    if rows.empty or "status" not in rows:
        return pd.DataFrame()
    done = rows[rows["status"] == "finished"].copy()
    if done.empty:
        return pd.DataFrame()
    done["hparams"] = done["hparams"].map(lambda h: _parse_json(h) if not _missing(h) else {})
    if "group_id" not in done:
        done["group_id"] = done["run_id"]
    done["group_id"] = done["group_id"].fillna(done["run_id"])
    metric_cols = [m for m in METRICS if m in done]
    cost_cols = [c for c in COST_COLUMNS if c in done]
    out = []
    for group_id, group in done.groupby("group_id", sort=False):
        first = group.iloc[0]
        line: dict[str, Any] = {k: first.get(k) for k in SECTION_KEYS}
        line.update(group_id=group_id, head=first["head"], hparams=first["hparams"], seeds=len(group))
        line["hparams_text"] = describe_hparams(first["head"], first["hparams"] if isinstance(first["hparams"], dict) else {})
        line["run_ids"] = list(group["run_id"])
        line["seed_list"] = sorted(int(s) for s in group["seed"]) if "seed" in group else []
        line["setup"] = _setup_key(first)
        # model selection (recipe key `select`; rows written before it have no column: "last")
        line["select"] = select_of(first)
        line["select_noted"] = line["select"] != SELECT_DEFAULT
        line["optimistic"] = is_optimistic(first)
        epochs = pd.to_numeric(group["selected_epoch"], errors="coerce") if "selected_epoch" in group else pd.Series(dtype=float)
        line["selected_epochs"] = [int(e) for e in epochs.dropna()]
        val = pd.to_numeric(group["val_mAP"], errors="coerce") if "val_mAP" in group else pd.Series(dtype=float)
        line["val_mAP"] = val.mean() if val.notna().any() else np.nan
        for m in metric_cols:
            values = pd.to_numeric(group[m], errors="coerce")
            line[m] = values.mean()
            line[f"{m}_std"] = values.std(ddof=1) if values.notna().sum() > 1 else np.nan
        for c in cost_cols:
            values = pd.to_numeric(group[c], errors="coerce")
            # a head's latency does not depend on the seed, and timing noise (a busy machine) only
            # adds time: the minimum over seeds is the best estimate (as timeit advises)
            line[c] = values.min() if c in MIN_COLUMNS else values.mean()
        out.append(line)
    table = pd.DataFrame(out)
    return table.sort_values([*SECTION_KEYS, "mAP", "head", "hparams_text"], ascending=[True, True, True, False, True, True], kind="stable").reset_index(drop=True)


def _canonical(value: Any) -> Any:
    value = _parse_json(value)
    return None if _missing(value) else value


def _setup_key(row: pd.Series) -> str:
    return json.dumps({k: _canonical(row.get(k)) for k in SETUP_KEYS}, sort_keys=True, default=str)


def _pair_key(row: pd.Series) -> str:
    """Everything of a run's configuration except the head (so a head run and its baseline run of
    the same seed share it)."""
    config = _canonical(row.get("config"))
    if isinstance(config, dict) and "head" in config:
        return json.dumps({k: v for k, v in config.items() if k != "head"}, sort_keys=True, default=str)
    keys = ("dataset", "backbone", "protocol", "seed", *SETUP_KEYS)
    return json.dumps({k: _canonical(row.get(k)) for k in keys}, sort_keys=True, default=str)


