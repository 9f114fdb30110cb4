"""``distillpp demo`` on tiny random-init stand-ins of the zoo (real loading code, tmp models dir)."""

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

from distillpp import demo

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"



@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from standin_models import write_standin_data, write_standin_models
    finally:
        sys.path.remove(str(BENCHMARKS))
    root = tmp_path_factory.mktemp("standins")
    return write_standin_models(root / "models", tiny=True), write_standin_data(root / "data", n_test=120)


def _args(*argv):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(["--threads", "1", *argv])


@pytest.fixture(scope="module")
def demo_out(standins, tmp_path_factory):
    models, data = standins
    out = tmp_path_factory.mktemp("demo")
    args = _args("--classes", "0,sneaker", "--seeds", "0", "--per-class", "2", "--students", "lcm,flow-student",
                 "--models-dir", str(models), "--data-dir", str(data), "--out", str(out), "--quiet")
    assert demo.run(args) == 0
    return out


def test_demo_writes_grid_and_metrics(demo_out):
    from PIL import Image

    report = json.loads((demo_out / "demo_metrics.json").read_text())
    labels = [r["method"] for r in report["rows"]]
    assert [r["model"] for r in report["rows"]] == ["teacher", "lcm", "lcm", "flow-teacher", "flow-student", "flow-student"]
    assert "teacher" in labels[0] and "50 steps" in labels[0]
    # lcm's preset guides the second step only (strength 0 then 1): one teacher call with CFG = 2 forwards.
    assert report["rows"][2]["guidance"]["steps"] == 2 and report["rows"][2]["nfe_per_image"] == 4 + 2
    assert report["samples_per_method"] == 4 and report["classes"] == [0, 7]
    assert report["fid"]["computed"] and all(r["fid"] is not None for r in report["rows"])
    assert all(0 <= r["class_consistency"] <= 1 for r in report["rows"])
    md = (demo_out / "demo_metrics.md").read_text()
    assert "| method | NFE / image |" in md and "lcm + teacher" in md
    img = Image.open(demo_out / "demo_grid.png")
    # 6 rows of 56 px samples, 2 columns (2 classes x 1 seed), a label column and a header.
    assert img.size[1] > 6 * 56 and img.size[0] > 2 * 56 + 150


def test_demo_guided_rows_use_the_same_noise_as_the_student(standins, tmp_path):
    # Strength 0 with the same seed must reproduce the student row exactly (shared noise, bit-identical).
    models, data = standins
    args = _args("--classes", "3", "--seeds", "5", "--students", "pd", "--strength", "0", "--models-dir", str(models),
                 "--no-fid", "--out", str(tmp_path), "--quiet")
    assert demo.run(args) == 0
    rows = json.loads((tmp_path / "demo_metrics.json").read_text())["rows"]
    assert rows[1]["class_consistency"] == rows[2]["class_consistency"]
    assert "FID skipped: --no-fid" in (tmp_path / "demo_metrics.md").read_text()


def test_demo_without_dataset_says_why_fid_was_skipped(standins, tmp_path, capsys):
    models, _ = standins
    args = _args("--classes", "1", "--students", "pd", "--seeds", "0", "--models-dir", str(models),
                 "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert demo.run(args) == 0
    md = (tmp_path / "out" / "demo_metrics.md").read_text()
    assert "FID skipped" in md and "apt-get install" in md
    printed = capsys.readouterr().out
    assert "demo_grid.png" in printed and "demo_metrics.md" in printed


def test_demo_options_and_validation():
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    help_text = parser.format_help()
    for opt in ("--classes", "--seeds", "--per-class", "--strength", "--guided-steps", "--renoise", "--teacher-cfg",
                "--device", "--out", "--models-dir", "--no-fid", "--quiet"):
        assert opt in help_text
    assert demo.parse_classes("all") == list(range(10))
    assert demo.parse_classes("0,2-3,Ankle boot") == [0, 2, 3, 9]
    assert demo.parse_seeds("0-2,7") == [0, 1, 2, 7]
    with pytest.raises(ValueError, match="--classes"):
        demo.parse_classes("12")
    with pytest.raises(ValueError, match="--strength"):
        demo.run(_args("--strength", "1.5"))
    with pytest.raises(ValueError, match="--students"):
        demo.run(_args("--students", "sdxl"))


def test_comparison_grid_shape():
    rows = [("teacher", "ddim, 50 steps", torch.zeros(3, 1, 32, 32)), ("lcm", "4 steps", torch.ones(3, 1, 32, 32))]
    img = demo.comparison_grid(rows, [("Bag", "seed 0")] * 3)
    assert img.size == (210 + 3 * 60 + 4, 30 + 2 * 60 + 4)


def test_cpu_threads():
    assert demo.cpu_threads(3) == 3
    assert 1 <= demo.cpu_threads(0) <= torch.get_num_threads()


def test_demo_guidance_is_the_zoo_presets_guidance():
    """The demo shows the study's chosen settings, which the zoo presets carry too; flow-student's preset is
    unguided (guidance did not pay in the study) with the demo's guided setting's other knobs."""
    from distillpp.pipelines import get_preset

    for student, g in demo.GUIDANCE_PRESETS.items():
        preset = get_preset(f"zoo-{student}").guidance
        strength = tuple(g["strength"]) if isinstance(g["strength"], list) else g["strength"]
        assert (preset.guided_steps, preset.renoise, preset.space, preset.teacher_cfg) == \
            (g["steps"], g["renoise"], g["space"], g["teacher_cfg"]), student
        assert preset.strength == (0.0 if student == "flow-student" else strength), student
