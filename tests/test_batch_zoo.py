"""``distillpp batch`` on the shipped zoo (``zoo-lcm``, CPU): one process, ``torchrun --nproc_per_node 2``
(gloo), a SIGKILL followed by a rerun and Ray (``pytest -m ray``, skipped without Ray) give the same
bytes for the same ``--batch-size``; another batch size the same images up to float rounding."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import distillpp.batch as batch
from distillpp.pipelines import get_preset
from distillpp.cli import main as cli_main

HERE = Path(__file__).resolve().parent
PROMPTS = ["Sneaker", "bag", "7", "Dress"]  # class names (any case) or digits
N_IMAGES = 2 * len(PROMPTS)


@functools.lru_cache(maxsize=None)
def _zoo_pipeline(preset: str, device: str) -> object:
    from distillpp.pipelines import from_preset

    return from_preset(preset, device=device)


@pytest.fixture
def cached_pipeline(monkeypatch):
    """Load zoo-lcm once for all in-process runs of this module."""
    monkeypatch.setattr(batch, "load_pipeline",
                        lambda preset, device, overrides=None: _zoo_pipeline(preset, device))


def _args(tmp_path: Path, out: str, *extra: str) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return ["--preset", "zoo-lcm", "--prompts", str(prompts), "--out", str(tmp_path / out),
            "--images-per-prompt", "2", "--seed", "3", "--device", "cpu", *extra]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a run except the per-process journals (their names differ by design)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """One single-process run, batch size 2."""
    tmp = tmp_path_factory.mktemp("ref")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch, "load_pipeline", lambda preset, device, overrides=None: _zoo_pipeline(preset, device))
        assert cli_main(["batch", *_args(tmp, "ref", "--batch-size", "2")]) == 0
    snap = _snapshot(tmp / "ref")
    assert sorted(snap) == sorted([f"{r:06d}_{k:03d}.png" for r in range(len(PROMPTS)) for k in range(2)]
                                  + ["batch_config.json", "manifest.jsonl"])
    return tmp, snap


def test_manifest_lists_every_image_once_with_settings_models_and_checksums(reference):
    tmp, snap = reference
    lines = [json.loads(x) for x in snap["manifest.jsonl"].decode().splitlines()]
    assert [(r["row"], r["image"]) for r in lines] == [(r, k) for r in range(len(PROMPTS)) for k in range(2)]
    assert [r["prompt"] for r in lines[::2]] == PROMPTS
    import hashlib

    for r in lines:
        assert hashlib.sha256(snap[r["file"]]).hexdigest() == r["sha256"]
        # the preset's default (a per-step strength: lcm guides its second step only)
        assert r["settings"]["guidance"]["strength"] == list(get_preset("zoo-lcm").guidance.strength)
        assert r["models"]["teacher"]["revision"].startswith("sha256:")
    assert len({r["seed"] for r in lines}) == N_IMAGES
    # the same image is not made for different seeds: all PNGs differ
    assert len({r["sha256"] for r in lines}) == N_IMAGES


def test_other_batch_size_gives_the_same_images_up_to_rounding_and_a_rerun_changes_nothing(
        tmp_path, reference, cached_pipeline, capsys):
    import numpy as np
    from PIL import Image

    ref_dir, ref = reference
    assert cli_main(["batch", *_args(tmp_path, "b", "--batch-size", "3")]) == 0
    other = _snapshot(tmp_path / "b")
    assert sorted(other) == sorted(ref)
    for name in (n for n in ref if n.endswith(".png")):
        # Same noise; the networks' floats differ in their last bits with the batch they are computed in.
        a = np.asarray(Image.open(tmp_path / "b" / name), dtype=int)
        b = np.asarray(Image.open(ref_dir / "ref" / name), dtype=int)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01
    strip = lambda data: [{k: v for k, v in json.loads(x).items() if k != "sha256"}  # noqa: E731
                          for x in data.decode().splitlines()]
    assert strip(other["manifest.jsonl"]) == strip(ref["manifest.jsonl"])
    before = {p: os.stat(p).st_mtime_ns for p in (tmp_path / "b").glob("*.png")}
    assert cli_main(["batch", *_args(tmp_path, "b", "--batch-size", "3")]) == 0  # finished: nothing to do
    assert _snapshot(tmp_path / "b") == other
    assert {p: os.stat(p).st_mtime_ns for p in (tmp_path / "b").glob("*.png")} == before
    assert cli_main(["batch", *_args(tmp_path, "b", "--batch-size", "2")]) == 2  # a resume keeps its batches
    assert "batch_size: 3 -> 2" in capsys.readouterr().err


def test_torchrun_two_processes_give_the_same_bytes(tmp_path, reference):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    _, ref = reference
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(HERE / "batch_helpers.py"),
           *_args(tmp_path, "t", "--batch-size", "2")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _snapshot(tmp_path / "t") == ref
    assert len(list((tmp_path / "t" / "parts").glob("part-*.jsonl"))) == 2  # one journal per rank
    assert f"{N_IMAGES} images" in proc.stdout and "over 2 worker(s)" in proc.stdout


def test_sigkill_midway_then_rerun_loses_and_duplicates_nothing(tmp_path, reference, cached_pipeline):
    _, ref = reference
    out = tmp_path / "k"
    cmd = [sys.executable, str(HERE / "batch_helpers.py"), *_args(tmp_path, "k", "--batch-size", "2")]
    proc = subprocess.Popen(cmd, env=_env(DISTILLPP_TEST_DELAY="0.5"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            parts = list((out / "parts").glob("part-*.jsonl")) if (out / "parts").is_dir() else []
            if sum(p.read_bytes().count(b"\n") for p in parts) >= 3:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    finished = batch.BatchFolder(out).records()
    assert 3 <= len(finished) < N_IMAGES, "the kill should land midway"
    assert not (out / "manifest.jsonl").exists()
    # Whatever is under a final name is complete; only temporary names can hold partial writes.
    for name, data in _snapshot(out).items():
        if name.endswith(".png") and not name.startswith("."):
            assert data == ref[name]
    before = {rec["file"]: os.stat(out / rec["file"]) for rec in finished.values()}

    assert cli_main(["batch", *_args(tmp_path, "k", "--batch-size", "2")]) == 0
    assert _snapshot(out) == ref
    assert not list(out.glob(".tmp-*"))
    for name, st in before.items():  # images finished before the kill were left alone
        after = os.stat(out / name)
        assert (after.st_ino, after.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)


@pytest.mark.ray
def test_ray_local_cluster_with_two_logical_gpus_gives_the_same_bytes(tmp_path, reference):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    _, ref = reference
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert cli_main(["batch", *_args(tmp_path, "r", "--batch-size", "2", "--engine", "ray")]) == 0
    finally:
        ray.shutdown()
    assert _snapshot(tmp_path / "r") == ref
