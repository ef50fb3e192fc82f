"""The GPU suite (``python -m bench.perf --suite gpu``) needs a GPU to measure; here its plan
resolves on the CPU (every backbone, head and dataset it reads from the shipped grids) and its
report has the three parts."""

from __future__ import annotations

import pytest

from bench.perf import gpu_suite


def test_dry_run_resolves_the_plan_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_suite.main(["--dry-run", "--heads", "45"]) == 0
    err = capsys.readouterr().err
    assert "timm:resnet50, timm:resnet101" in err and "45 heads of configs/full.toml" in err and "448 px" in err


def test_unknown_backbone_is_refused() -> None:
    with pytest.raises(SystemExit, match="unknown backbone"):
        gpu_suite.main(["--dry-run", "--backbones", "no_such_net"])


def test_report_has_throughput_group_and_bootstrap() -> None:
    throughput = [{"backbone": "timm:resnet50", "batch": 64, "image_size": 448, "harness_ips": 900.0, "bare_ips": 1000.0,
                   "bare_step_ips": 950.0, "ratio": 0.9, "peak_mib": 20000.0}]
    group = {"heads": 45, "backbone": "timm:resnet101", "epochs": 2, "alone_s": 300.0, "together_s": 30.0, "alone_train_s": 200.0,
             "together_train_s": 10.0, "ratio": 10.0}
    boot = {"device": "cuda", "seeds": 3, "images": 40000, "classes": 80, "resamples": 1000, "seconds": 2.5, "delta": 0.01, "low": 0.005, "high": 0.015}
    text = gpu_suite.render("H200", "python -m bench.perf --suite gpu", throughput, group, boot, 20, "voc2007")
    assert "| `timm:resnet50` | 900 | 1000 | **90 %** | 950 | 20000 |" in text
    assert "| wall | 300.0 | 30.0 | **10.0×** |" in text and "**2.50 s**" in text
