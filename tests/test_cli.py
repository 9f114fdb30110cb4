"""The ``distillpp`` command: lazy subcommands, one-line errors before any work, Ctrl-C, one --seeds syntax."""

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distillpp import cli, demo, testbed
from distillpp.zoo import train

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("argv", [
    ["--help"], ["demo", "--help"], ["demo", "--batch-size", "0"], ["demo", "--out", "FILE"], ["demo", "--classes", "x"],
])
def test_help_and_demo_argument_errors_import_no_torch_or_diffusers(argv, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    argv = [str(a_file) if a == "FILE" else a for a in argv]
    code = ("import sys\nfrom distillpp import cli\ntry:\n    rc = cli.main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    rc = e.code\nheavy = sorted(m for m in ('torch', 'diffusers', 'distillpp.testbed', 'distillpp.zoo.train', "
            "'distillpp.pipelines.cli') if m in sys.modules)\nprint('RC', rc, 'HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, (out.stdout, out.stderr)
    if argv == ["--help"]:
        assert "RC 0" in out.stdout and all(name in out.stdout for name in cli.SUBCOMMANDS)
    elif "--help" not in argv:
        assert "RC 2" in out.stdout and "distillpp demo: error: " in out.stderr and "Traceback" not in out.stderr


def test_demo_students_are_the_metrics_students():
    assert demo.STUDENTS == tuple(demo.TEACHER_OF)


def test_only_the_chosen_subcommand_gets_its_options():
    parser = cli.build_parser(["testbed", "--n", "20"])
    args = parser.parse_args(["testbed", "--n", "20"])
    assert args.n == 20 and args._run is testbed.run
    with pytest.raises(SystemExit):  # demo's options are not built for a testbed command line
        parser.parse_args(["demo", "--classes", "0"])


def _subparsers(command):
    parser = cli.build_parser([command])
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = action.choices[command]
    if command != "train":
        return {command: sub}
    inner = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
    return {f"train {what}": p for what, p in inner.choices.items()}


@pytest.mark.parametrize("command", ["demo", "testbed", "train"])
def test_every_option_has_help_and_states_its_default_at_most_once(command):
    for name, parser in _subparsers(command).items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings[0]} has no help text"
            text = formatter._expand_help(action)
            assert text.lower().count("default") <= 1, f"{name} {action.option_strings[0]}: {text!r}"
            assert "(default: None)" not in text and "(default: False)" not in text, text
        help_text = parser.format_help()
        assert help_text.count("(default: 100)") <= 1


@pytest.mark.parametrize("command", ["demo", "testbed"])
@pytest.mark.parametrize("words", [["0", "1", "2"], ["0,1,2"], ["0-2"], ["0", "1-2"], ["0,1", "2"]])
def test_seeds_take_one_syntax_everywhere(command, words):
    args = cli.build_parser([command]).parse_args([command, "--seeds", *words])
    assert args.seeds == [0, 1, 2]


@pytest.mark.parametrize("text", ["x", "3-1", "1.5", "-1", ","])
def test_bad_seeds_name_the_option(text):
    with pytest.raises(ValueError, match="--seeds"):
        cli.parse_int_list(text)


def _one_line_error(capsys, argv, command):
    """Run ``distillpp argv``; the exit status and the single error line (no traceback)."""
    try:
        rc = cli.main(argv)
    except SystemExit as stop:  # argparse's own errors
        rc = stop.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines()  # "distillpp train teacher: error: ..." for train's own parsers
             if line.startswith(f"distillpp {command}") and ": error: " in line]
    assert len(lines) == 1, err
    return rc, lines[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load models or data, or to train, fails the test."""

    def never(*args, **kwargs):
        raise AssertionError("work started before the arguments were validated")

    monkeypatch.setattr(demo, "ModelCache", never)
    monkeypatch.setattr(demo, "get_zoo", never)
    monkeypatch.setattr(testbed, "study", never)
    monkeypatch.setattr(train, "_TRAINERS", {what: never for what in train.COMMANDS})


def _bad_demo_args(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["--out", str(a_file)], ["--out", "is a file"]),
        (["--out", str(a_file / "sub")], ["--out"]),
        (["--batch-size", "0"], ["--batch-size", ">= 1"]),
        (["--threads", "-1"], ["--threads"]),
        (["--per-class", "0"], ["--per-class"]),
        (["--classes", "12"], ["--classes"]),
        (["--seeds", "a"], ["--seeds"]),
        (["--teacher-cfg", "nan"], ["--teacher-cfg", "finite"]),
        (["--strength", "nan"], ["--strength", "[0, 1]"]),
        (["--students", "sdxl"], ["--students"]),
        (["--device", "tpu:x"], ["--device"]),
        (["--models-dir", str(tmp_path / "nowhere")], ["--models-dir", "no such folder"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], ["--device", "CUDA is not available"]))
    return cases


def test_demo_bad_arguments_fail_in_one_line_before_any_loading(tmp_path, capsys, no_loading):
    for extra, words in _bad_demo_args(tmp_path):
        rc, line = _one_line_error(capsys, ["demo", "--out", str(tmp_path / "out"), *extra], "demo")
        assert rc == 2, (extra, line)
        for w in words:
            assert w in line, (extra, line)


@pytest.mark.parametrize("extra, words", [
    (["--out", "FILE"], ["--out", "is a file"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--minutes", "0"], ["--minutes", "> 0"]),
    (["--lr", "nan"], ["--lr", "finite"]),
    (["--teacher", "NOWHERE"], ["--teacher", "no such folder"]),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], ["--device", "CUDA"])]))
def test_train_bad_arguments_fail_in_one_line_before_training(extra, words, tmp_path, capsys, no_loading):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    extra = [str(a_file) if e == "FILE" else str(tmp_path / "nowhere") if e == "NOWHERE" else e for e in extra]
    what = "lcm" if "--teacher" in extra else "teacher"
    rc, line = _one_line_error(capsys, ["train", what, "--tiny", *extra], "train")
    assert rc == 2
    for w in words:
        assert w in line, line


@pytest.mark.parametrize("extra, words", [
    (["--out", "FILE"], ["--out", "is a file"]),
    (["--n", "5"], ["--n", ">= 10"]),
    (["--strengths", "0.1", "2"], ["--strengths", "[0, 1]"]),
    (["--seeds", "0", "x"], ["--seeds"]),
])
def test_testbed_bad_arguments_fail_in_one_line(extra, words, tmp_path, capsys, no_loading):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    extra = [str(a_file) if e == "FILE" else e for e in extra]
    rc, line = _one_line_error(capsys, ["testbed", *extra], "testbed")
    assert rc == 2
    for w in words:
        assert w in line, line


def test_check_device_refuses_missing_accelerators():
    assert cli.check_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda:0: CUDA is not available"):
            cli.check_device("cuda:0")
    with pytest.raises(ValueError, match="--gpu"):
        cli.check_device("nonsense", "--gpu")


def test_staged_outputs_appear_together_or_not_at_all(tmp_path):
    a, b = tmp_path / "grid.png", tmp_path / "metrics.json"
    b.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with cli.staged_outputs(a, b) as (ta, tb):
            ta.write_text("new grid")
            assert ta.suffix == ".png" and not a.exists()
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"] and b.read_text() == "old"
    with cli.staged_outputs(a, b) as (ta, tb):
        ta.write_text("new grid")
        tb.write_text("new")
    assert a.read_text() == "new grid" and b.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "metrics.json"]


# ------------------------------------------------------------------ the demo, without its sampling cost


@pytest.fixture
def quick_demo(monkeypatch, tmp_path):
    """The demo on the shipped models with sampling replaced by the initial noise (loading, grid and metrics run)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from standin_models import write_standin_data
    finally:
        sys.path.remove(str(BENCHMARKS))
    data = write_standin_data(tmp_path / "data", n_test=40)

    def generate(method, models, labels, noise, seed, batch_size, progress=None):
        return noise.clone()

    monkeypatch.setattr(demo, "generate", generate)
    return ["demo", "--students", "pd", "--threads", "1", "--data-dir", str(data), "--quiet"]


def test_demo_with_one_sample_per_method_reports_why_fid_was_skipped(quick_demo, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main([*quick_demo, "--classes", "0", "--seeds", "0", "--out", str(out)]) == 0
    report = json.loads((out / "demo_metrics.json").read_text())
    assert report["fid"]["computed"] is False
    assert "at least 2 samples" in report["fid"]["skipped_reason"]
    assert all(r["class_consistency"] is not None for r in report["rows"])
    assert "at least 2 samples" in (out / "demo_metrics.md").read_text()


def test_interrupted_demo_prints_one_line_and_leaves_no_partial_outputs(quick_demo, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "demo_metrics.json").write_text("from an earlier run")

    def interrupted(*args, **kwargs):  # Ctrl-C while the metrics are computed, after the grid was drawn
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "evaluate_samples", interrupted)
    rc = cli.main([*quick_demo, "--classes", "0,1", "--seeds", "0", "--no-fid", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 130
    assert err.strip().splitlines() == ["distillpp demo: interrupted"]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["demo_metrics.json"]
    assert (out / "demo_metrics.json").read_text() == "from an earlier run"


def test_sigint_ends_a_real_run_with_one_line_and_no_outputs(tmp_path):
    out = tmp_path / "testbed"
    proc = subprocess.Popen([sys.executable, "-m", "distillpp.cli", "testbed", "--n", "4000", "--quiet",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not out.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # the folder is created once the arguments are checked, just before sampling
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["distillpp testbed: interrupted"], stderr
    assert list(out.iterdir()) == []
