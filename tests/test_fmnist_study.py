"""``benchmarks/fmnist_study.py`` on tiny random-init stand-ins: the coarse-to-fine grid, the cost column,
the machine-readable outputs (preset-override files, the rows for the tuner's validation), resuming."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("fmnist_study", BENCHMARKS / "fmnist_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fmnist_study"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    sys.path.insert(0, str(BENCHMARKS))
    from standin_models import write_standin_data, write_standin_models

    root = tmp_path_factory.mktemp("standin")
    return write_standin_models(root / "models", tiny=True), write_standin_data(root / "data", n_test=60)


def _argv(standin, out, *extra):
    models, data = standin
    return ["--device", "cpu", "--samples", "4", "--report-samples", "6", "--select-seeds", "100", "--seeds", "0,1",
            "--strengths", "0.5", "--teacher-steps", "2", "--students", "lcm,flow-student", "--top", "1", "--models-dir", str(models),
            "--data-dir", str(data), "--out", str(out), "--quiet", *extra]


def test_study_grid_outputs_and_resume(study, standin, tmp_path, capsys):
    from distillpp import TeacherGuidance
    from distillpp.pipelines.presets import apply_overrides, get_preset

    out = tmp_path / "study"
    assert study.main(_argv(standin, out)) == 0
    runs = [json.loads(line) for line in (out / "fmnist_study_runs.jsonl").read_text().splitlines()]
    assert all("hf_ratio" in r["metrics"] and "pixel_fd" in r["metrics"] for r in runs)
    assert {r["split"] for r in runs} == {"A", "B"}
    assert {r["seed"] for r in runs if r["split"] == "A"} == {100}

    rep = json.loads((out / "fmnist_study.json").read_text())
    lcm = rep["students"]["lcm"]
    stages = {r["stage"] for r in lcm["selection"]}
    assert {"renoise x strength", "which step: second step only", "which step: first two steps",
            "which step: first two, decaying", "eps space", "K teacher draws", "teacher CFG"} <= stages
    assert "eps space" not in {r["stage"] for r in rep["students"]["flow-student"]["selection"]}
    assert {r["guidance"]["renoise"] for r in lcm["selection"] if r["stage"] == "renoise x strength"} == \
        {"same", "next", "random"}
    # Cost: a step of strength 0 does not call the teacher; the CFG teacher costs 2 forwards per call.
    by_stage = {}
    for r in lcm["selection"]:
        by_stage.setdefault(r["stage"], []).append(r)
    assert all(r["nfe"] == 6 for r in by_stage["which step: second step only"])
    assert all(r["nfe"] == 8 for r in by_stage["which step: first two steps"])
    assert by_stage["K teacher draws"][0]["cost"].endswith("x 8")  # 4 draws x 2 CFG forwards per teacher call
    cfg1 = [r for r in by_stage["teacher CFG"] if r["guidance"]["teacher_cfg"] == 1.0]
    assert cfg1 and cfg1[0]["cost"].endswith("x 1")
    roles = [r["role"] for r in lcm["reporting"]]
    assert {"plain 4 steps", "plain 5 steps", "plain 6 steps", "chosen"} <= set(roles)
    chosen = next(r for r in lcm["reporting"] if r["role"] == "chosen")
    assert chosen["fid"]["n"] == 2 and chosen["seeds"] == [0, 1]
    assert [t["method"]["model"] for t in rep["teachers"]] == ["teacher", "flow-teacher"]

    # The tuner validation's rows and the preset-override files.
    best = json.loads((out / "fmnist_study_best.json").read_text())
    assert {"model", "guidance", "steps", "seed_set", "fid_mean", "fid_std", "role"} <= set(best[0])
    assert {r["model"] for r in best if r["role"] == "chosen"} == {"lcm", "flow-student"}
    assert all(r["seed_set"] == "report" and r["steps"] == 4 for r in best if r["role"] == "chosen")
    chosen_files = json.loads((out / "fmnist_study_chosen.json").read_text())
    assert set(chosen_files["lowest_fid"]) == set(chosen_files["one_teacher_call"]) == {"zoo-lcm", "zoo-flow-student"}
    for name, override in [*chosen_files["lowest_fid"].items(), *chosen_files["one_teacher_call"].items()]:
        TeacherGuidance(**override["guidance"])
        assert apply_overrides(get_preset(name), override).guidance == TeacherGuidance(**override["guidance"])
    one_call = chosen_files["one_teacher_call"]["zoo-lcm"]["guidance"]
    strengths = one_call["strength"] if isinstance(one_call["strength"], list) else [one_call["strength"]]
    assert one_call["samples"] == 1 and sum(1 for v in strengths[: one_call["guided_steps"]] if v) == 1
    md = (out / "fmnist_study.md").read_text()
    for text in ("## Summary", "HF ratio", "pixel FD", "forwards/image", "## lcm (teacher: teacher)", "Selection grid", "command: `"):
        assert text in md
    assert (out / "fmnist_study_grid.png").stat().st_size > 1000

    # Resuming runs nothing new.
    n = len(runs)
    assert study.main(_argv(standin, out, "--no-grid")) == 0
    assert len((out / "fmnist_study_runs.jsonl").read_text().splitlines()) == n
    assert "0 new runs" in capsys.readouterr().out


@pytest.mark.parametrize("extra, match", [
    (["--strengths", "0.5,1.5"], "--strengths"),
    (["--seeds", "100"], "disjoint"),
    (["--students", "lcm,sdxl"], "--students"),
    (["--teachers", "lcm"], "--teachers"),
    (["--samples", "0"], "--samples"),
])
def test_bad_arguments_fail_before_any_model_loads(study, tmp_path, extra, match):
    argv = ["--device", "cpu", "--models-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *extra]
    with pytest.raises(ValueError, match=match):
        study.main(argv)
