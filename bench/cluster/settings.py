"""What a submission asks the scheduler for: the grid's ``[submit]`` table, overridden by the
command line, validated before anything is submitted (errors name the file, the key and what is
allowed; exit status 2).

```toml
[submit]
partition = "gpu"          # SLURM partition
time = "24:00:00"          # per task: minutes, "HH:MM:SS" or "D-HH:MM:SS"
nodes = 1                  # nodes per task (one accelerate launch across them)
gpus_per_node = 4
cpus_per_task = 32
mem_gb = 200
account = "lab"
qos = "normal"
constraint = "a100"
sbatch = ["--mail-type=END", "--exclusive"]   # extra #SBATCH lines
setup = ["module load cuda/12.4", "source .venv/bin/activate"]   # shell lines before the task
signal_delay_s = 120       # SLURM signals the task this long before its time limit
max_requeues = 50          # requeues per task at most (time limits and preemptions)
idle_requeues = 2          # requeues in a row that may pass without any progress
jobs = 32                  # array size when --jobs is not given
```
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.core.errors import UsageError, choices

EXECUTORS = ("slurm", "local")
DEFAULT_TIME_MIN = 24 * 60
#: keys of ``[submit]``: (type, description of the allowed values)
KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "partition": (str, "a partition name"),
    "time": ((int, str), "minutes (an integer >= 1) or \"HH:MM:SS\" / \"D-HH:MM:SS\""),
    "nodes": (int, "an integer >= 1"),
    "gpus_per_node": (int, "an integer >= 0"),
    "cpus_per_task": (int, "an integer >= 1"),
    "mem_gb": ((int, float), "a number > 0"),
    "account": (str, "an account name"),
    "qos": (str, "a quality-of-service name"),
    "constraint": (str, "a node feature expression"),
    "sbatch": (list, "a list of sbatch options such as \"--mail-type=END\""),
    "setup": (list, "a list of shell lines"),
    "signal_delay_s": (int, "an integer >= 10 (seconds)"),
    "max_requeues": (int, "an integer >= 0"),
    "idle_requeues": (int, "an integer >= 0"),
    "jobs": (int, "an integer >= 1"),
    "job_name": (str, "a job name"),
    "logs": (str, "a folder"),
}
MINIMA = {"nodes": 1, "gpus_per_node": 0, "cpus_per_task": 1, "signal_delay_s": 10, "max_requeues": 0, "idle_requeues": 0, "jobs": 1}
_TIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d{2})(?::(\d{2}))?$")
_SBATCH = re.compile(r"^(?:--)?([a-z][a-z0-9-]*)(?:=(.+))?$")


@dataclass
class SubmitSettings:
    """One submission: ``jobs`` independent tasks, each with these resources."""

    executor: str
    jobs: int
    logs: Path
    time_min: int = DEFAULT_TIME_MIN
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch: dict[str, str | bool] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    signal_delay_s: int = 120
    max_requeues: int = 50
    idle_requeues: int = 2
    job_name: str = "headbench"


def parse_time(value: int | str, where: str) -> int:
    """Minutes from an integer or SLURM's ``[D-]HH:MM[:SS]`` (seconds round up to a minute)."""
    if isinstance(value, int) and not isinstance(value, bool):
        minutes = value
    else:
        text = str(value).strip()
        match = _TIME.match(text)
        if text.isdigit():
            minutes = int(text)
        elif match:
            days, hours, mins, secs = (int(g) if g else 0 for g in match.groups())
            minutes = days * 1440 + hours * 60 + mins + (1 if secs else 0)
        else:
            raise UsageError(f"{where}: time = {value!r}; expected {KEYS['time'][1]}")
    if minutes < 1:
        raise UsageError(f"{where}: time = {value!r}; expected {KEYS['time'][1]}")
    return minutes


def parse_sbatch(lines: list[str], where: str) -> dict[str, str | bool]:
    """``["--mail-type=END", "--exclusive"]`` -> ``{"mail-type": "END", "exclusive": True}``."""
    out: dict[str, str | bool] = {}
    for line in lines:
        text = line.strip().removeprefix("#SBATCH").strip() if isinstance(line, str) else ""
        match = _SBATCH.match(text)
        if not match:
            raise UsageError(f"{where}: sbatch entry {line!r}; expected {KEYS['sbatch'][1]} (or \"--flag\")")
        out[match.group(1)] = match.group(2) if match.group(2) is not None else True
    return out


def read_table(grid_file: Path) -> dict[str, Any]:
    """The validated ``[submit]`` table of a grid file (empty when it has none)."""
    where = f"{grid_file} [submit]"
    with open(grid_file, "rb") as f:
        table = tomllib.load(f).get("submit", {})
    if not isinstance(table, dict):
        raise UsageError(f"{grid_file}: 'submit' must be a table [submit], got {table!r}")
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in KEYS:
            raise UsageError(f"{where}: unknown key {key!r}; valid: {choices(KEYS)}")
        out[key] = check_value(key, value, where)
    return out


def check_value(key: str, value: Any, where: str) -> Any:
    """``value`` of ``[submit] key`` (or its command-line flag) in normal form, or a usage error."""
    typ, allowed = KEYS[key]
    if not isinstance(value, typ) or isinstance(value, bool):
        raise UsageError(f"{where}: {key} = {value!r}; expected {allowed}")
    if key == "time":
        return parse_time(value, where)
    if key == "sbatch":
        return parse_sbatch(value, where)
    if key == "setup":
        if not all(isinstance(v, str) for v in value):
            raise UsageError(f"{where}: setup = {value!r}; expected {allowed}")
        return list(value)
    if key in MINIMA and value < MINIMA[key]:
        raise UsageError(f"{where}: {key} = {value!r}; expected {allowed}")
    if key == "mem_gb" and value <= 0:
        raise UsageError(f"{where}: mem_gb = {value!r}; expected {allowed}")
    if isinstance(value, str) and not value.strip():
        raise UsageError(f"{where}: {key} is empty; expected {allowed}")
    return value


def resolve(executor: str, table: dict[str, Any], flags: dict[str, Any], results_dir: Path, default_gpus: int) -> SubmitSettings:
    """The grid's ``[submit]`` table with the command-line ``flags`` (already checked, None when
    not given) on top. ``default_gpus``: GPUs per node when neither says (1 on SLURM; on one
    machine, its visible GPUs shared out among the jobs)."""
    if executor not in EXECUTORS:
        raise UsageError(f"--submit {executor!r}; expected one of {choices(EXECUTORS)}")
    values = {**table, **{k: v for k, v in flags.items() if v is not None}}
    sbatch = {**table.get("sbatch", {}), **flags.get("sbatch", {})}
    setup = [*table.get("setup", []), *(flags.get("setup") or [])]
    logs = Path(values.pop("logs", None) or results_dir / "submitit").resolve()
    time_min = values.pop("time", DEFAULT_TIME_MIN)
    jobs = values.pop("jobs", 1)
    gpus = values.pop("gpus_per_node", default_gpus)
    values.pop("sbatch", None)
    values.pop("setup", None)
    settings = SubmitSettings(executor=executor, jobs=jobs, logs=logs, time_min=time_min, gpus_per_node=gpus, sbatch=sbatch, setup=setup, **values)
    if executor == "local" and settings.nodes != 1:
        raise UsageError(f"--submit local runs on this machine: nodes = {settings.nodes}; use 1 (or --submit slurm)")
    if settings.signal_delay_s >= settings.time_min * 60:
        raise UsageError(f"signal_delay_s = {settings.signal_delay_s} is not shorter than the time limit ({settings.time_min} min)")
    return settings
