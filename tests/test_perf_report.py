"""docs/performance.md says whether each target is met and, when not, by how much."""

from bench.perf.training import render


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


def test_a_section_is_replaced_in_place_and_the_rest_of_the_report_kept(tmp_path):
    from bench.perf.training import kept_sections, write_section

    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nold training sections\n\n<!-- section:other -->\n## Other\nkept\n<!-- /section:other -->\n")
    write_section(doc, "heads-together", "Heads together", "first table")
    write_section(doc, "heads-together", "Heads together", "second table")
    text = doc.read_text()
    assert text.count("## Heads together") == 1 and "second table" in text and "first table" not in text
    assert "old training sections" in text and "## Other\nkept" in text
    # hand-written text after the generated block (inside the section) survives a new measurement
    doc.write_text(text.replace("<!-- /generated:heads-together -->", "<!-- /generated:heads-together -->\nprojection paragraph"))
    write_section(doc, "heads-together", "Heads together", "third table")
    assert "projection paragraph" in doc.read_text() and "third table" in doc.read_text()
    kept = kept_sections(doc.read_text())
    assert "## Other" in kept and "third table" in kept and "old training sections" not in kept


def test_heads_together_section_reports_targets():
    from bench.perf.training import render_together

    limit = {"pass_s": 1.0, "heads_fwd_bwd_s": 2.0, "heads_step_s": 0.5, "limit_s": 3.0, "group_s": 4.0, "ratio": 4.0 / 3.0, "batches": 8, "repeats": 3}
    slow = {**limit, "group_s": 6.0, "ratio": 2.0}
    a = {"heads": 21, "backbone": "resnet18", "augment": "flip", "num_train": 1000, "image_size": 64, "epochs": 3, "batch_size": 32,
         "alone_s": 120.0, "together_s": 24.0, "ratio": 5.0, "alone_train_s": 100.0, "together_train_s": 10.0, "group_epoch_s": 4.0, "limit": limit}
    full = {"runs": 55, "heads": 51, "alone_s": 50.0, "together_s": 40.0, "ratio": 1.25, "alone_train_s": 30.0, "together_train_s": 20.0,
            "group_epoch_s": 6.5, "limit": slow}
    cached = {"full": full, "growth": [{**full, "n": 5}], "backbone": "tiny_cnn", "num_train": 1500, "epochs": 3, "image_size": 64, "batch_size": 32}
    text = render_together("cpu", "python -m bench.perf --only together", a, cached)
    assert "| wall | 120.0 | 24.0 | **5.0×** | ≥ 4×: met |" in text
    assert "| wall | 50.0 | 40.0 | **1.25×** | not slower: met |" in text
    assert "| 4.00 | 1.00 | 2.00 | 3.00 | **1.33×** | 0.50 | 4.00 | met |" in text  # (d) (a): 4.0 / (1.0 + 2.0)
    assert "| 6.00 | 1.00 | 2.00 | 3.00 | **2.00×** | 0.50 | 6.50 | missed by 0.50 |" in text  # (d) (b): 6.0 / 3.0
