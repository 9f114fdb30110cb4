"""The Fashion-MNIST zoo: data loading, every training subcommand (tiny, CPU), loading back, sampling."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import distillpp
from distillpp import zoo
from distillpp.zoo import check, data, train
from distillpp.zoo.nets import WEIGHTS_NAME, ZooClassifier, save_weights

REAL_DATA = Path("/usr/share/datasets/fashion-mnist")
STAGES = ("teacher", "flow-teacher", "classifier", "lcm", "pd", "flow-student")
TEACHER_OF = {"teacher": "teacher", "lcm": "teacher", "pd": "teacher",
              "flow-teacher": "flow-teacher", "flow-student": "flow-teacher"}


def _write_dataset(folder: Path, n_train: int = 32, n_test: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        data.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        data.write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder



@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("fashion"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic) -> tuple[Path, dict[str, float]]:
    """Every subcommand, one tiny step each, in stage order; returns the models folder and timings."""
    out = tmp_path_factory.mktemp("models")
    seconds = {}
    for what in STAGES:
        extra = ["--pair-steps", "2", "--pairs", "4"] if what == "flow-student" else []
        extra += ["--teacher-steps", "8"] if what == "pd" else []
        t = time.time()
        rc = train.main([what, "--tiny", "--device", "cpu", "--max-steps", "1", "--batch-size", "4",
                         "--data-dir", str(synthetic), "--out", str(out), *extra])
        seconds[what] = time.time() - t
        assert rc == 0
    return out, seconds


# ----------------------------------------------------------------------------- data


def test_synthetic_split_is_padded_and_scaled(tmp_path):
    folder = tmp_path / "fm"
    folder.mkdir()
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[1, 27, 27] = 255, 255
    for prefix in ("train", "t10k"):
        data.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        data.write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.array([7, 0, 9]))
    x, y = data.load_split("test", folder)
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == [7, 0, 9] and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1
    assert x[0, 0, 2, 2] == 1 and x[1, 0, 29, 29] == 1  # the 28x28 image sits in the middle
    assert (x[:, :, :2] == -1).all() and (x[:, :, :, 30:] == -1).all()  # padding is background


def test_data_dir_from_environment(monkeypatch, synthetic):
    monkeypatch.setenv(data.ENV_VAR, str(synthetic))
    assert data.dataset_dir() == synthetic
    x, y = data.load_split("train")
    assert x.shape == (32, 1, 32, 32) and len(y) == 32


def test_missing_dataset_names_path_and_install_hint(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        data.load_split("train", missing)
    assert str(missing) in str(err.value)
    assert "apt-get update && apt-get install -y dataset-fashion-mnist" in str(err.value)
    monkeypatch.setenv(data.ENV_VAR, str(missing))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.load_split("test")
    with pytest.raises(ValueError, match="split"):
        data.load_split("validation", missing)


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    x, y = data.load_split("test", REAL_DATA)
    assert x.shape == (10_000, 1, 32, 32) and y.shape == (10_000,)
    assert torch.bincount(y).tolist() == [1000] * 10
    assert x.min() == -1 and x.max() == 1 and (x[..., :2, :] == -1).all()
    assert -0.6 < float(x.mean()) < -0.2  # mostly dark background, but not empty
    x_train, y_train = data.load_split("train", REAL_DATA)
    assert x_train.shape == (60_000, 1, 32, 32) and torch.bincount(y_train).tolist() == [6000] * 10


# ----------------------------------------------------------------------------- training and loading


def test_every_subcommand_writes_diffusers_fp16_folders(trained):
    out, seconds = trained
    print("tiny CPU seconds per subcommand:", {k: round(v, 1) for k, v in seconds.items()})
    for what in STAGES:
        folder = out / what
        info = json.loads((folder / "train_info.json").read_text())
        assert info["complete"] and info["steps"] >= 1 and info["name"] == what
        assert info["device"] == "cpu" and info["tiny"] and "command" in info and "date" in info
        assert json.loads((folder / "config.json").read_text())["_class_name"] in ("UNet2DModel", "ZooClassifier")
        with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
            dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        assert torch.float16 in dtypes and torch.float32 not in dtypes
    assert json.loads((out / "pd" / "train_info.json").read_text())["student_steps"] == 4
    lcm_scheduler = json.loads((out / "lcm" / "scheduler_config.json").read_text())
    assert lcm_scheduler["_class_name"] == "LCMScheduler" and lcm_scheduler["prediction_type"] == "epsilon"
    assert "test_accuracy" in json.loads((out / "classifier" / "train_info.json").read_text())
    # The teacher clamps x0 to the data range and its students inherit the flag (speckle fix).
    for what in ("teacher", "lcm", "pd"):
        assert zoo.clip_range(json.loads((out / what / "scheduler_config.json").read_text())) == 1.0, what
        assert zoo.load(what, models_dir=out).clip == 1.0
    assert zoo.load("flow-student", models_dir=out).clip is None


@pytest.mark.parametrize("name", zoo.ZOO_NAMES)
def test_load_and_sample_guided_by_teacher(trained, name):
    out, _ = trained
    model = zoo.load(name, models_dir=out)
    teacher = zoo.load(TEACHER_OF[name], models_dir=out)
    assert model.name == name and model.family == teacher.family
    assert isinstance(model.denoiser, distillpp.CFGDenoiser) and model.sampler in distillpp.SAMPLERS
    assert model.default_cfg == (zoo.TEACHER_CFG if name.endswith("teacher") else 1.0)
    assert (model.schedule is None) == (model.family == "flow")
    sigmas = model.sigmas()
    assert len(sigmas) == model.default_steps + 1 and sigmas[-1] == 0
    gen = torch.Generator().manual_seed(0)
    x = model.initial(torch.randn(2, 1, 32, 32, generator=gen), sigmas)
    out_x = distillpp.sample(model.denoiser, x, sigmas, sampler=model.sampler, extra_args=model.args([3, 10 - 1]),
                             teacher=teacher.denoiser, guidance=distillpp.TeacherGuidance(strength=0.2),
                             generator=gen)
    assert out_x.shape == (2, 1, 32, 32) and torch.isfinite(out_x).all()
    images = zoo.to_images(out_x)
    assert images.dtype == torch.uint8 and images.shape == (2, 1, 28, 28)


def test_grids_and_args(trained):
    out, _ = trained
    pd, lcm = zoo.load("pd", models_dir=out), zoo.load("lcm", models_dir=out)
    assert pd.denoiser.inner.prediction_type == "epsilon" and isinstance(lcm.denoiser.inner, distillpp.LCMDenoiser)
    assert pd.schedule.sigma_to_t(pd.sigmas()[:-1]).tolist() == [999, 749, 499, 249]
    assert lcm.schedule.sigma_to_t(lcm.sigmas()[:-1]).tolist() == [999, 759, 499, 259]
    assert zoo.load("teacher", models_dir=out).sigmas(25).shape == (26,)
    flow = zoo.load("flow-student", models_dir=out)
    s = distillpp.schedules.sigma_to_flow_time(flow.sigmas().double())
    assert torch.allclose(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64), atol=1e-6)
    args = flow.args(torch.tensor([1, 2]))
    assert args["cond"]["class_labels"].tolist() == [1, 2]
    assert args["uncond"]["class_labels"].tolist() == [10, 10]


def test_missing_weights_and_unknown_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="distillpp train teacher"):
        zoo.load("teacher", models_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="distillpp train classifier"):
        zoo.load_classifier(models_dir=tmp_path)
    with pytest.raises(ValueError, match="name must be one of"):
        zoo.load("sdxl", models_dir=tmp_path)


def test_student_without_teacher_says_what_to_train(tmp_path, synthetic):
    with pytest.raises(FileNotFoundError, match="distillpp train flow-teacher"):
        train.main(["flow-student", "--tiny", "--device", "cpu", "--data-dir", str(synthetic), "--out", str(tmp_path)])


def test_pd_rounds_must_halve(trained, synthetic):
    out, _ = trained
    with pytest.raises(ValueError, match="power of 2"):
        train.main(["pd", "--tiny", "--device", "cpu", "--data-dir", str(synthetic), "--out", str(out),
                    "--teacher-steps", "12", "--steps", "8"])


def test_wall_clock_budget_stops_after_one_step(tmp_path, synthetic):
    train.main(["classifier", "--tiny", "--device", "cpu", "--data-dir", str(synthetic), "--out", str(tmp_path),
                "--minutes", "0.0001", "--max-steps", "1000"])
    info = json.loads((tmp_path / "classifier" / "train_info.json").read_text())
    assert info["steps"] == 1 and info["complete"]


def test_classifier_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ZooClassifier(**train.TINY_CLASSIFIER).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    save_weights(model, tmp_path / "classifier")
    loaded = zoo.load_classifier(models_dir=tmp_path)
    assert not loaded.training and loaded.config.channels == list(train.TINY_CLASSIFIER["channels"])
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert loaded(x).shape == (4, 10) and loaded.features(x).shape == (4, 32)
        assert torch.allclose(loaded(x), model(x), atol=2e-2)


def test_to_images():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 4)
    assert zoo.to_images(x, crop=False).flatten().tolist() == [0, 128, 255, 255]
    assert zoo.to_images(torch.zeros(2, 1, 32, 32)).shape == (2, 1, 28, 28)
    assert zoo.to_images(torch.zeros(2, 1, 32, 32), crop=False).shape == (2, 1, 32, 32)


def test_add_arguments_for_the_cli():
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["pd", "--tiny", "--teacher-steps", "8", "--minutes", "3"])
    assert args.what == "pd" and args.teacher_steps == 8 and args.minutes == 3.0 and args.cfg == zoo.TEACHER_CFG
    with pytest.raises(SystemExit):
        parser.parse_args(["unet"])


def test_sanity_check_runs(trained, synthetic, capsys, tmp_path):
    out, _ = trained
    rc = check.main([str(out), "--data-dir", str(synthetic), "--device", "cpu", "--samples", "10", "--steps", "2",
                     "--png", str(tmp_path / "samples.png"), "--png-per-class", "2"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "classifier test accuracy" in text and "SANITY OK" in text
    assert (tmp_path / "samples.png").is_file()



def test_v_prediction_teacher_passes_to_students(tmp_path, synthetic):
    common = ["--tiny", "--device", "cpu", "--max-steps", "1", "--batch-size", "4", "--data-dir", str(synthetic),
              "--out", str(tmp_path)]
    train.main(["teacher", "--prediction-type", "v_prediction", *common])
    train.main(["lcm", *common])
    lcm = zoo.load("lcm", models_dir=tmp_path)
    assert lcm.denoiser.inner.prediction_type == "v_prediction"
    sigmas = lcm.sigmas()
    x = lcm.initial(torch.randn(2, 1, 32, 32), sigmas)
    assert torch.isfinite(distillpp.sample(lcm.denoiser, x, sigmas, sampler=lcm.sampler, extra_args=lcm.args([1, 2]),
                                           generator=torch.Generator().manual_seed(0))).all()


def test_harness_samples_do_not_depend_on_the_batch_size():
    """Each image has its own generator (issue: the demo's rows changed with --batch-size)."""
    from distillpp.zoo.harness import Method, ModelCache, generate, initial_noise

    models = ModelCache()
    labels = torch.tensor([7, 8, 9, 0, 1])
    noise = initial_noise(0, len(labels))
    method = Method("lcm", guidance={"strength": 0.5, "guided_steps": 1})
    a = generate(method, models, labels, noise, seed=3, batch_size=5)
    b = generate(method, models, labels, noise, seed=3, batch_size=2)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.equal(generate(method, models, labels, noise, seed=4, batch_size=5), a)


def test_shipped_teacher_clamps_x0_where_the_raw_estimate_leaves_the_data_range():
    """The speckle's cause: at high noise the CFG teacher's raw x0 estimate leaves [-1, 1]; clip_sample
    clamps it, and the clamp changes nothing where the estimate is inside."""
    teacher = zoo.load("teacher")
    assert teacher.clip == 1.0
    raw = distillpp.CFGDenoiser(teacher.denoiser.inner, teacher.default_cfg)
    sigmas = teacher.sigmas(50)
    gen = torch.Generator().manual_seed(0)
    x = teacher.initial(torch.randn(20, 1, 32, 32, generator=gen), sigmas)
    sigma = sigmas[0].expand(20)
    with torch.no_grad():
        unclamped, clamped = raw(x, sigma, **teacher.args(torch.arange(20) % 10)), \
            teacher.denoiser(x, sigma, **teacher.args(torch.arange(20) % 10))
    assert unclamped.abs().max() > 1.2  # the raw estimate leaves the data range ...
    assert clamped.abs().max() <= 1.0  # ... the model's own denoiser does not
    inside = unclamped.abs() <= 1
    assert torch.equal(clamped[inside], unclamped[inside])
