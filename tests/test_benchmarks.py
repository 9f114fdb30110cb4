"""``benchmarks/fmnist_eval.py --quick`` on tiny random-init stand-ins: writes JSON/Markdown, resumes."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"



@pytest.fixture(scope="module")
def fmnist_eval():
    spec = importlib.util.spec_from_file_location("fmnist_eval", BENCHMARKS / "fmnist_eval.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fmnist_eval"] = module
    spec.loader.exec_module(module)
    return module


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _lines_ok(path):
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def test_quick_run_writes_reports_stops_on_budget_and_resumes(fmnist_eval, tmp_path, capsys):
    out = tmp_path / "out"
    # Another dtype than the CPU default (the GPU runs float16), so the `report` below must find runs of a
    # dtype other than its own; float64 rather than float16 because half precision is ~17x slower on a CPU.
    base = ["all", "--quick", "--standin", str(tmp_path / "si"), "--device", "cpu", "--out", str(out),
            "--students", "lcm,flow-student", "--ablate", "lcm", "--quiet"]
    gpu_like = base + ["--dtype", "float64"]

    # A budget spent before the first run: stops at once, but still writes the (empty) report.
    assert fmnist_eval.main(gpu_like + ["--budget-min", "0.0001"]) == 0
    assert "INCOMPLETE" in capsys.readouterr().out
    assert not (out / "fmnist_runs.jsonl").exists()
    assert (out / "fmnist_eval.md").is_file()

    assert fmnist_eval.main(gpu_like) == 0
    printed = capsys.readouterr().out
    assert "INCOMPLETE" not in printed and "| method | NFE | FID" in printed
    runs = _lines(out / "fmnist_runs.jsonl")
    keys = [r["key"] for r in runs]
    assert len(keys) == len(set(keys)) > 20
    quality = [r for r in runs if r["kind"] == "quality"]
    assert all({"fid", "precision", "recall", "class_consistency"} <= set(r["metrics"]) for r in quality)
    assert all(r["card"] and r["date"] and r["command"].startswith("python3 benchmarks/fmnist_eval.py") for r in runs)
    assert {r["split"] for r in quality} == {"A", "B"}
    assert any(r["kind"] == "timing" for r in runs)

    report = json.loads((out / "fmnist_eval.json").read_text())
    assert [r["role"] for r in report["main"]] == ["teacher", "student", "guided"]
    assert [r["role"] for r in report["flow"]] == ["teacher", "student", "guided"]
    assert report["main"][2]["fid_delta"]["n"] == 2
    assert report["selection"]["lcm"]["selected_1_step"]["steps"] == 1
    assert report["selection"]["lcm"]["selected_2_steps"]["steps"] == 2
    variants = [r["variant"] for r in report["ablation"]["lcm"]]
    assert {"renoise same", "renoise random", "2 guided steps, constant strength",
            "2 guided steps, strength halving per step", "K=4 teacher samples"} <= set(variants)
    assert {r["setting"] for r in report["cost"]} == {"4 steps", "4 steps + 1 guided", "5 steps", "6 steps"}
    assert all(r["timing"].get("cpu|1") for r in report["cost"])
    md = (out / "fmnist_eval.md").read_text()
    for heading in ("## Main table", "## Flow models", "## Cost", "## Ablation: lcm", "## Guidance settings",
                    "STAND-IN MODELS", "command: `python3 benchmarks/fmnist_eval.py"):
        assert heading in md

    # Resuming runs nothing new; `report` (float32 by default on a CPU) rebuilds the same tables.
    assert fmnist_eval.main(gpu_like) == 0
    assert "0 new runs" in capsys.readouterr().out
    assert len(_lines(out / "fmnist_runs.jsonl")) == len(runs)
    # A line cut short by a killed run is ignored and that run redone, on a line of its own.
    text = (out / "fmnist_runs.jsonl").read_text()
    (out / "fmnist_runs.jsonl").write_text(text[: text.rstrip("\n").rfind("\n") + 40])
    assert fmnist_eval.main(gpu_like) == 0
    assert "1 new runs" in capsys.readouterr().out
    assert len(_lines_ok(out / "fmnist_runs.jsonl")) == len(runs)
    assert fmnist_eval.main(["report"] + base[1:]) == 0
    rebuilt = json.loads((out / "fmnist_eval.json").read_text())
    assert rebuilt["main"] == report["main"] and rebuilt["protocol"]["dtype"] == "float64"


def test_timing_only_needs_no_dataset(fmnist_eval, tmp_path, capsys):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from standin_models import write_standin_models
    finally:
        sys.path.remove(str(BENCHMARKS))
    models = write_standin_models(tmp_path / "models", tiny=True)
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--timing-only", "--quick", "--models-dir", str(models), "--data-dir",
            str(tmp_path / "no-data"), "--out", str(out), "--students", "pd", "--quiet"]
    assert fmnist_eval.main(argv) == 0
    runs = _lines(out / "fmnist_runs.jsonl")
    assert runs and all(r["kind"] == "timing" and r["device"] == "cpu" for r in runs)
    assert {r["batch"] for r in runs} == {1, 4}
    assert "CPU ms, batch 1" in (out / "fmnist_eval.md").read_text()


def test_plan_counts_without_running(fmnist_eval, tmp_path, capsys):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from standin_models import write_standin_models
    finally:
        sys.path.remove(str(BENCHMARKS))
    models = write_standin_models(tmp_path / "models", tiny=True)
    assert fmnist_eval.main(["--plan", "--device", "cpu", "--models-dir", str(models), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "quality: " in printed and "total" in printed
    assert not (tmp_path / "fmnist_runs.jsonl").exists()
