"""The plugin contract's import-time errors: a head file that breaks the contract is refused when
it is imported, with a one-line usage error (exit status 2) naming the file and the parameter."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

from bench.cli import main

HEAD = '''
from torch import nn
from bench.api import Head, register_head


@register_head("{name}")
class Probe(Head):
    sweep = {sweep}

    def __init__(self, in_channels: int, num_classes: int, context=None{params}) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))
'''

CASES = {
    "missing_default": (", *, scale: float", "()", ["hyper-parameter 'scale' has no default value"]),
    "missing_annotation": (", *, scale=1.0", "()", ["hyper-parameter 'scale' has no type annotation"]),
    "positional": (", scale: float = 1.0", "()", ["hyper-parameter 'scale' must be keyword-only"]),
    "var_positional": (", *args", "()", ["may not take *args"]),
    "var_keyword": (", *, scale: float = 1.0, **extra", "()", ["may not take *extra or **extra"]),
    "default_of_wrong_type": (", *, depth: int = 1.5", "()", ["the default of 'depth' does not match its annotation", "expected an int"]),
    "sweep_unknown_key": (", *, scale: float = 1.0", '({"scael": [1.0, 2.0]},)', ["'sweep' names unknown hyper-parameter(s) 'scael'", "valid: 'scale'"]),
    "sweep_wrong_value": (", *, scale: float = 1.0", '({"scale": [1.0, "big"]},)', ["'sweep' value scale = 'big'", "expected a number"]),
    "sweep_not_dicts": (", *, scale: float = 1.0", '{"scale": [1.0]}', ["'sweep' must be a tuple of dicts"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_head_file_breaking_the_contract_is_a_usage_error_naming_file_and_parameter(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    params, sweep, fragments = CASES[case]
    folder = tmp_path / f"heads_{case}"
    folder.mkdir()
    path = folder / f"bad_{case}.py"
    path.write_text(HEAD.format(name=f"bad_{case}", sweep=sweep, params=params))
    monkeypatch.setenv("HEADBENCH_HEADS_PATH", str(folder))
    status = main(["--list"])
    out, err = capsys.readouterr()
    assert status == 2, (out, err)
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert f"head 'bad_{case}'" in err and str(path) in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert f"bad_{case}" not in out  # nothing was registered


def test_a_correct_head_file_is_listed(tmp_path: Path) -> None:
    """The template above, with the contract kept, loads: the errors come from the broken parts.
    (In a subprocess: a head registered here would stay in this process's registry.)"""
    folder = tmp_path / "heads_good"
    folder.mkdir()
    (folder / "good_probe.py").write_text(HEAD.format(name="good_probe", sweep='({"scale": [1.0, 2.0]},)', params=", *, scale: float = 1.0"))
    result = run_cli("--list", env={"HEADBENCH_HEADS_PATH": str(folder)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "good_probe" in result.stdout
