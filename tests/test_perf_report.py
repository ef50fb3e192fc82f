"""docs/performance.md says whether each target is met and, when not, by how much."""

from bench.perf import render


def _a(ratio_finetune: float) -> dict:
    return {"grid": "full-embedded", "runs": 45, "heads": 45, "backbone": "tiny_cnn", "image_size": 64, "num_train": 1000,
            "epochs": 3, "batch_size": 32, "frozen_s": 20.0, "finetune_s": 20.0 * ratio_finetune, "ratio": ratio_finetune}


def test_a_missed_speed_up_says_how_far_short_and_why():
    text = render("cpu", "python -m bench.perf", [_a(4.0)], None, None, None, None)
    assert "| `tiny_cnn` | 80.0 | 20.0 | **4.0×** | missed: 40% of the target, 2.5× short |" in text
    assert "Where the target is missed" in text
    # 45 runs x 3 epochs x ceil(1000 / 32) = 4320 steps; 20 s / 4320 = 4.6 ms
    assert "4.6 ms per training step over 4320 steps" in text


def test_met_targets_are_reported_as_met():
    b = {"num_train": 2048, "epochs": 5, "minimal_s": 1.0, "harness_s": 1.03, "overhead": 0.03, "harness_all": [1.03], "minimal_all": [1.0]}
    text = render("cpu", "python -m bench.perf", [_a(12.0)], b, None, None, None)
    assert "**12.0×** | met |" in text and "Where the target is missed" not in text
    assert "**+3.0 %** (target ≤ 5 %: met)" in text


def test_missed_overhead_says_by_how_many_points():
    b = {"num_train": 2048, "epochs": 5, "minimal_s": 1.0, "harness_s": 1.08, "overhead": 0.08, "harness_all": [1.08], "minimal_all": [1.0]}
    assert "(target ≤ 5 %: missed by 3.00 percentage points)" in render("cpu", "c", None, b, None, None, None)
