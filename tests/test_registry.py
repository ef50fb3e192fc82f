"""The plugin registry: drop-in discovery, and errors that name the file and the valid choices."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli

from bench.api import registry
from bench.core.errors import UsageError

MY_HEAD = '''
import torch
from torch import nn
from bench.api.registry import register_head

@register_head("my_head")
class MyHead(nn.Module):
    def __init__(self, in_channels, num_classes, context=None, *, scale: float = 2.0):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)
        self.scale = scale

    def forward(self, x):
        return self.scale * self.fc(x.mean(dim=(2, 3)))
'''


def test_dropped_head_file_is_usable_in_a_grid_with_no_other_edit(tmp_path: Path, tiny_grid: Path) -> None:
    heads = tmp_path / "heads"
    heads.mkdir()
    (heads / "my_head.py").write_text(MY_HEAD)
    grid = tiny_grid.read_text().replace('name = "baseline"\npool = ["avg", "max"]', 'name = "my_head"\nscale = [1.0, 3.0]')
    tiny_grid.write_text(grid)
    env = {"HEADBENCH_HEADS_PATH": str(heads)}
    listed = run_cli("--list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "my_head(scale)" in listed.stdout
    dry = run_cli("--grid", str(tiny_grid), "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "my_head(scale=1.0)" in dry.stdout and "my_head(scale=3.0)" in dry.stdout


def test_head_hparams_and_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "baseline" in registry.list_heads()
    assert registry.head_hparams("baseline") == {"pool": "avg"}
    torch.manual_seed(0)
    x = torch.zeros(2, 8, 3, 3)
    x[0, :, 1, 2] = 1.0  # one active position: its max is 1, its mean 1/9
    x[1] = torch.rand(8, 3, 3) - 0.5
    for pool, pooled in (("max", x.double().amax(dim=(2, 3))), ("avg", x.double().mean(dim=(2, 3)))):
        head = registry.build_head("baseline", in_channels=8, num_classes=3, pool=pool).eval()
        tensors = head.state_dict()
        weight = next(v for v in tensors.values() if v.shape == (3, 8)).double()
        bias = next(v for v in tensors.values() if v.shape == (3,)).double()
        with torch.no_grad():
            out = head(x)
        assert out.shape == (2, 3)
        # logits = W · pool(x) + b, in float64 here; max and average pooling give different numbers
        torch.testing.assert_close(out.double(), pooled @ weight.T + bias, rtol=1e-5, atol=1e-6)
        other = x.double().mean(dim=(2, 3)) if pool == "max" else x.double().amax(dim=(2, 3))
        assert (out.double() - (other @ weight.T + bias)).abs().max() > 1e-2


def test_unknown_head_lists_registered_heads() -> None:
    with pytest.raises(UsageError) as err:
        registry.build_head("nope", 8, 3)
    assert "unknown head 'nope'" in str(err.value) and "'baseline'" in str(err.value)


def test_unknown_hparam_names_the_file_and_the_valid_ones() -> None:
    with pytest.raises(UsageError) as err:
        registry.build_head("baseline", 8, 3, poool="avg")
    message = str(err.value)
    assert "heads/baseline.py" in message and "'poool'" in message and "valid: 'pool'" in message


def test_bad_hparam_value_names_the_file() -> None:
    with pytest.raises(UsageError) as err:
        registry.build_head("baseline", 8, 3, pool="median")
    assert "heads/baseline.py" in str(err.value) and "median" in str(err.value)


def test_unknown_dataset_and_option() -> None:
    with pytest.raises(UsageError, match="unknown dataset 'imagenet'.*'shapes'"):
        registry.build_dataset("imagenet")
    with pytest.raises(UsageError, match="datasets/shapes.py.*'colour'.*valid"):
        registry.build_dataset("shapes", colour=3)


def test_duplicate_name_names_both_files(tmp_path: Path) -> None:
    extra = tmp_path / "heads"
    extra.mkdir()
    (extra / "another_baseline.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            from bench.api.registry import register_head

            @register_head("baseline")
            class Clash(nn.Module):
                def __init__(self, in_channels, num_classes, context=None):
                    super().__init__()
            """
        )
    )
    result = run_cli("--list", env={"HEADBENCH_HEADS_PATH": str(extra)})
    assert result.returncode == 2
    assert "registered twice" in result.stderr
    assert "heads/baseline.py" in result.stderr and "another_baseline.py" in result.stderr


def test_plugin_that_fails_to_import_is_named(tmp_path: Path) -> None:
    extra = tmp_path / "heads"
    extra.mkdir()
    (extra / "broken.py").write_text("import not_a_module_anywhere\n")
    result = run_cli("--list", env={"HEADBENCH_HEADS_PATH": str(extra)})
    assert result.returncode == 2
    assert "broken.py failed to import" in result.stderr and "not_a_module_anywhere" in result.stderr


def test_plugin_folders_do_not_shadow_pypi_packages() -> None:
    """Plugins live under a private namespace: no module called `datasets` or `heads` appears."""
    code = (
        "import json, sys; from bench.api import registry; registry.load_plugins(); "
        "print(json.dumps(sorted(m for m in sys.modules if m in ('datasets', 'heads') or m.startswith('_headbench_plugins.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    names = json.loads(out)
    assert "datasets" not in names and "heads" not in names
    assert any(n.endswith("_shapes") for n in names) and any(n.endswith("_baseline") for n in names)
