"""``distillpp batch`` on a stand-in pipeline: prompt files, seeds, refused folders and arguments."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from distillpp import TeacherGuidance

import distillpp.batch as batch
from distillpp.cli import main as cli_main


PROMPTS = ["Sneaker", "Bag", "Trouser", "Dress", "Coat"]


class StandIn:
    """The guided-pipeline interface in miniature (the zoo presets are exercised in test_batch_zoo.py):
    each image depends on its own generator, its prompt and the guidance's strength and noise_mix only."""

    has_teacher = True

    def __init__(self, name: str = "standin"):
        self.preset = SimpleNamespace(name=name, num_inference_steps=4)
        self.guidance = TeacherGuidance(strength=0.1)

    def __call__(self, prompt, negative_prompt=None, generator=None, output_type="pil", guidance=None,
                 num_inference_steps=None):
        g = guidance or self.guidance
        images = []
        for p, gen in zip(prompt, generator):
            label = ((sum(map(ord, p)) % 7) / 7 + g.noise_mix) / 2
            x = torch.rand(28, 28, generator=gen) * (1 - g.strength) + label * g.strength
            images.append(Image.fromarray((x.numpy() * 255).round().astype(np.uint8), mode="L"))
        return SimpleNamespace(images=images)


def _prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


def _args(tmp_path: Path, out: str, *extra: str) -> list[str]:
    return ["--preset", "standin", "--prompts", str(_prompt_file(tmp_path)), "--out", str(tmp_path / out),
            "--images-per-prompt", "2", "--seed", "7", *extra]


@pytest.fixture
def standin(monkeypatch):
    """The stand-in as preset ``standin`` (registered for this test only)."""
    from distillpp.pipelines.presets import PRESETS, Preset

    monkeypatch.setitem(PRESETS, "standin", Preset(
        name="standin", family="standin", base="standin-student", student_kind="pipeline", student=None,
        teacher="standin-teacher", scheduler="none", num_inference_steps=4, guidance=StandIn().guidance))
    monkeypatch.setattr(batch, "load_pipeline", lambda preset, device, overrides=None: StandIn(preset))


def test_seeds_depend_on_base_seed_row_and_image_only():
    a = batch.plan_items([batch.Row(0, "x"), batch.Row(1, "y", seed=100)], 3, base_seed=5)
    b = batch.plan_items([batch.Row(0, "other prompt"), batch.Row(1, "z", seed=100)], 3, base_seed=5)
    assert [i.seed for i in a] == [i.seed for i in b]
    assert [i.seed for i in a[3:]] == [100, 101, 102]
    assert len({i.seed for i in a[:3]}) == 3
    c = batch.plan_items([batch.Row(0, "x")], 3, base_seed=6)
    assert {i.seed for i in c}.isdisjoint(i.seed for i in a[:3])


def test_prompt_files_jsonl_csv_and_errors(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "Bag", "seed": 3}\n\n{"prompt": "Coat", "negative_prompt": "blurry"}\n')
    assert batch.read_prompts(jl) == [batch.Row(0, "Bag", 3, None), batch.Row(1, "Coat", None, "blurry")]
    cs = tmp_path / "p.csv"
    cs.write_text("prompt,seed,negative_prompt\nBag,,\n\"Ankle boot\",4,x\n")
    assert batch.read_prompts(cs) == [batch.Row(0, "Bag"), batch.Row(1, "Ankle boot", 4, "x")]
    jl.write_text('{"prompt": "Bag"}\n{"prompt": "Coat", "seed": "x"}\n')
    with pytest.raises(ValueError, match="line 2: 'seed'"):
        batch.read_prompts(jl)
    cs.write_text("text\nBag\n")
    with pytest.raises(ValueError, match="'prompt' column"):
        batch.read_prompts(cs)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        batch.read_prompts(tmp_path / "empty.txt")


def main(argv: list[str]) -> int:
    try:
        return cli_main(["batch", *argv])
    except SystemExit as stop:  # argparse's own type checks (the flags shared with generate)
        return stop.code


def _fails_with(capsys, argv: list[str], pattern: str) -> None:
    assert main(argv) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and "img/s" not in x]  # minus progress bars
    assert len(err) == 1 and pattern in err[0], err


def test_other_runs_foreign_and_corrupted_folders_are_refused(tmp_path, standin, monkeypatch, capsys):
    assert main(_args(tmp_path, "a")) == 0
    with monkeypatch.context() as m:  # a finished run is checked and re-merged without loading a model
        m.setattr(batch, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model for a finished run"))
        assert main(_args(tmp_path, "a")) == 0
    capsys.readouterr()
    _fails_with(capsys, _args(tmp_path, "a", "--strength", "0.2"),
                "holds a run with different settings (settings.guidance.strength: 0.1 -> 0.2)")
    _fails_with(capsys, _args(tmp_path, "a", "--images-per-prompt", "3"), "different settings")
    _fails_with(capsys, _args(tmp_path, "a", "--batch-size", "3"), "(batch_size: 8 -> 3)")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _fails_with(capsys, _args(tmp_path, "foreign"), "not a batch folder")
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1

    shutil.copytree(tmp_path / "a", tmp_path / "tampered")
    (tmp_path / "tampered" / "000002_001.png").write_bytes(b"not a png")
    _fails_with(capsys, _args(tmp_path, "tampered"), "000002_001.png does not match its recorded checksum")
    shutil.copytree(tmp_path / "a", tmp_path / "gone")
    (tmp_path / "gone" / "000000_000.png").unlink()
    _fails_with(capsys, _args(tmp_path, "gone"), "000000_000.png is missing")
    shutil.copytree(tmp_path / "a", tmp_path / "badjournal")
    part = next((tmp_path / "badjournal" / "parts").glob("part-*.jsonl"))
    part.write_text("garbage\n" + part.read_text())
    _fails_with(capsys, _args(tmp_path, "badjournal"), "line 1 is corrupted")
    shutil.copytree(tmp_path / "a", tmp_path / "badconfig")
    (tmp_path / "badconfig" / "batch_config.json").write_text("{")
    _fails_with(capsys, _args(tmp_path, "badconfig"), "batch_config.json is corrupted")


def test_bad_arguments_fail_before_loading_a_model(tmp_path, standin, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("no model should load")

    monkeypatch.setattr(batch, "load_pipeline", boom)
    _fails_with(capsys, _args(tmp_path, "x", "--batch-size", "0"), "--batch-size must be >= 1")
    _fails_with(capsys, _args(tmp_path, "x", "--images-per-prompt", "0"), "--images-per-prompt must be >= 1")
    ov = tmp_path / "ov.json"
    ov.write_text(json.dumps({"preset": "zoo-pd"}))
    _fails_with(capsys, _args(tmp_path, "x", "--overrides", str(ov)),
                "--overrides: overrides were made for preset 'zoo-pd', not 'standin'")
    _fails_with(capsys, ["--prompts", str(_prompt_file(tmp_path)), "--out", str(tmp_path / "x")],
                "--preset is required")
    _fails_with(capsys, _args(tmp_path, "x", "--samples", "0"), "argument --samples: must be an integer >= 1, got 0")
    _fails_with(capsys, _args(tmp_path, "x", "--noise-mix", "1.5"), "noise_mix must be in [0, 1], got 1.5")
    _fails_with(capsys, _args(tmp_path, "x", "--guided-steps", "5"), "--guided-steps must be in [0, 4]")
    ov.write_text(json.dumps({"guidance": {"strength": 0.3}, "colour": "red"}))
    _fails_with(capsys, _args(tmp_path, "x", "--overrides", str(ov)), "unknown fields ['colour']")
    assert not (tmp_path / "x").exists()


def test_image_without_its_journal_line_and_torn_lines_are_redone_identically(tmp_path, standin):
    assert main(_args(tmp_path, "a")) == 0
    ref = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()}
    (tmp_path / "a" / "manifest.jsonl").unlink()
    part = next((tmp_path / "a" / "parts").glob("part-*.jsonl"))
    lines = part.read_text().splitlines(keepends=True)
    # A kill after the image's rename but before its journal line was complete.
    part.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    (tmp_path / "a" / ".tmp-000004_001.png.999").write_bytes(b"partial")  # a kill during a write
    assert main(_args(tmp_path, "a")) == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()} == ref
    records = batch.BatchFolder(tmp_path / "a").records()
    assert sorted(records) == [(r, k) for r in range(5) for k in range(2)]


def test_a_folder_with_no_images_yet_takes_the_corrected_command(tmp_path, standin, monkeypatch, capsys):
    class Refuses(StandIn):
        def __call__(self, prompt, **kwargs):
            bad = [p for p in prompt if p == "Coat"]
            if bad:
                raise ValueError(f"prompt {bad[0]!r} is not a class")
            return super().__call__(prompt, **kwargs)

    monkeypatch.setattr(batch, "load_pipeline", lambda preset, device, overrides=None: Refuses(preset))
    prompts = tmp_path / "p.txt"
    prompts.write_text("Coat\nBag\n")
    argv = ["--preset", "standin", "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    _fails_with(capsys, argv, "prompt 'Coat' is not a class")
    assert (tmp_path / "o" / "batch_config.json").exists() and not list((tmp_path / "o").glob("*.png"))
    prompts.write_text("Dress\nBag\n")
    assert main(argv) == 0
    assert len(list((tmp_path / "o").glob("*.png"))) == 2
    prompts.write_text("Shirt\nBag\n")  # now images exist: a different prompt file is refused
    _fails_with(capsys, argv, "different settings (prompts.sha256")


def test_generates_guidance_flags_and_override_file_reach_the_images_and_the_manifest(tmp_path, standin):
    def manifest(out: str) -> list[dict]:
        return [json.loads(x) for x in (tmp_path / out / "manifest.jsonl").read_text().splitlines()]

    for mix in ("0.25", "0.75"):
        assert main(_args(tmp_path, f"mix{mix}", "--noise", "hybrid", "--noise-mix", mix)) == 0
    low, high = manifest("mix0.25"), manifest("mix0.75")
    assert {(r["settings"]["guidance"]["noise"], r["settings"]["guidance"]["noise_mix"]) for r in low} == \
        {("hybrid", 0.25)}
    config = json.loads((tmp_path / "mix0.25" / "batch_config.json").read_text())
    assert config["settings"]["guidance"]["noise_mix"] == 0.25
    assert {r["sha256"] for r in low}.isdisjoint(r["sha256"] for r in high)  # the knob reached the pipeline

    ov = tmp_path / "tuned.json"
    ov.write_text(json.dumps({"preset": "standin", "guidance": {"noise": "hybrid", "noise_mix": 0.25,
                                                                "strength": 0.3}}))
    no_preset = _args(tmp_path, "file")[2:]  # the file names the preset
    assert no_preset[0] == "--prompts" and main([*no_preset, "--overrides", str(ov)]) == 0
    rows = manifest("file")
    assert {(r["settings"]["guidance"]["strength"], r["settings"]["guidance"]["noise_mix"]) for r in rows} == \
        {(0.3, 0.25)}
    assert rows[0]["settings"]["overrides"] == json.loads(ov.read_text())
    # A flag wins over the file: strength back to the preset's 0.1 gives the images of the flags-only run.
    assert main(_args(tmp_path, "both", "--overrides", str(ov), "--strength", "0.1")) == 0
    assert [r["sha256"] for r in manifest("both")] == [r["sha256"] for r in low]
    assert [r["sha256"] for r in rows] != [r["sha256"] for r in low]


def test_timings_file_counts_the_images_after_each_workers_first_batch(tmp_path, standin, capsys):
    timings = tmp_path / "t.json"
    argv = _args(tmp_path, "a", "--batch-size", "3", "--timings", str(timings))  # 10 images: chunks 3, 3, 3, 1
    assert main(argv) == 0
    report = json.loads(timings.read_text())
    assert (report["images_made"], report["images_skipped"], report["steady_images"]) == (10, 0, 7)
    assert len(report["workers"]) == 1 and report["workers"][0]["generate_seconds"] > 0
    assert report["steady_images_per_s"] > 0 and report["seconds"] >= report["steady_seconds"] > 0
    assert main(argv) == 0  # finished: nothing made, so no steady rate
    report = json.loads(timings.read_text())
    assert (report["images_made"], report["images_skipped"], report["steady_images_per_s"]) == (0, 10, None)
    capsys.readouterr()
    _fails_with(capsys, [*argv, "--engine", "ray"], "--timings is measured by the local engine only")


def test_without_syncfs_each_image_is_fsynced_and_the_bytes_are_the_same(tmp_path, standin, monkeypatch):
    assert main(_args(tmp_path, "a")) == 0
    synced = []
    monkeypatch.setattr(batch, "_syncfs", lambda: None)
    monkeypatch.setattr(batch.os, "fsync", lambda fd: synced.append(fd))
    assert main(_args(tmp_path, "b")) == 0
    assert len(synced) >= 10 + 2  # ten images, then the folder and the journal, at least
    snap = lambda out: {p.name: p.read_bytes() for p in (tmp_path / out).iterdir() if p.is_file()}  # noqa: E731
    assert snap("a") == snap("b")
