"""``distillpp tune`` / ``distillpp.tune``: the data-free tuner.

An exact Gaussian-mixture teacher (:mod:`distillpp.analytic`) with a biased student, as a model family
of the guided pipeline, is a pair whose answer is known: the testbed found that guiding two steps cuts
the distance to the true distribution by more than half (benchmarks/results/testbed), so the tuner must
choose guidance; with a student equal to its teacher there is nothing to gain. The zoo tests use
tiny settings (a few images, a 2-step reference): they check the plumbing, the budget, the override file
and that no Fashion-MNIST file is read, not the zoo's answer (benchmarks/tune_validation.py does that).
"""

from __future__ import annotations

import json

import pytest
import torch

from distillpp import TeacherGuidance
from distillpp.analytic import GaussianMixture, GaussianMixtureDenoiser
from distillpp.cli import main as cli_main
from distillpp.pipelines import GuidedPipeline
from distillpp.pipelines.core import Conditioning, ModelFamily
from distillpp.pipelines.presets import Preset, from_preset
from distillpp.schedules import karras_sigmas
from distillpp.testbed import TRUE_MIXTURE, biased_students
from distillpp.tuning import Setting, tune


class _Exact(torch.nn.Module):
    """An exact mixture denoiser as a "network" ``net(x, sigma) -> x0`` (a parameter gives it a device)."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.denoiser = GaussianMixtureDenoiser(mixture)
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x, sigma, **_):
        return self.denoiser(x, sigma)


class _KarrasNoise:
    """Karras grid from 20 to 0.02 (the testbed's), Euler, pure noise at the first sigma."""

    sampler = "euler"
    sampler_kwargs: dict = {}

    def sigmas(self, steps, timesteps=None):
        return karras_sigmas(0.02, 20.0, steps).float()

    def initial(self, noise, sigmas):
        return noise * sigmas[0]


class MixtureFamily(ModelFamily):
    """2-D samples of an unconditional mixture: student and teacher are exact denoisers of two mixtures."""

    name = "mixture"
    size_multiple = 1
    teacher_kind = "separate"

    def __init__(self, student: GaussianMixture, teacher: GaussianMixture):
        self.student_module, self.teacher_module = _Exact(student), _Exact(teacher)
        self.noise = _KarrasNoise()

    def network(self, module):
        return module

    def default_size(self):
        return 1, 1

    def encode(self, call, student_cfg, teacher):
        return Conditioning({}, {} if teacher else None)

    def latent_shape(self, call):
        return (call.batch, 2)

    def draw_noise(self, call, dtype):
        return torch.stack([torch.randn(2, generator=g) for g in call.generator])

    def student_denoiser(self, net, call):
        return net

    def teacher_denoiser(self, net, call):
        return net

    def decode(self, latents, call):
        return latents, None


PRESET = Preset(name="mixture-test", family="mixture", base="-", student_kind="pipeline", student=None,
                teacher="exact", scheduler="euler", num_inference_steps=4,
                guidance=TeacherGuidance(strength=0.5, guided_steps=1), height=1, width=1, variant=None)
# 1 prompt x 1000 images; a 20-step reference of the exact teacher.
RUN = dict(prompts=["ring"], images_per_prompt=1000, reference_steps=20, budget=100_000)


def mixture_pipe(student: GaussianMixture) -> GuidedPipeline:
    return GuidedPipeline(MixtureFamily(student, TRUE_MIXTURE), preset=PRESET)


def test_biased_student_gets_guidance_and_an_equal_one_does_not():
    biased = tune(PRESET, pipe=mixture_pipe(biased_students()["weights+radius"]), **RUN)
    assert not biased.chosen.plain, biased.table()
    plain = biased.trials[0]
    assert plain.setting.plain
    chosen = next(t for t in biased.trials if t.setting == biased.chosen)
    gain = plain.criterion - chosen.criterion
    assert chosen.setting.guided_steps == 2 and gain > 2 * chosen.se_vs_plain, biased.table()

    # A student equal to the teacher as a sampler: the same exact denoiser, and a reference of the same 4 Euler
    # steps, so the plain student *is* the reference and any guidance can only move away from it. (With the
    # default 20-step reference, guidance does pay even for the exact denoiser: it corrects the 4-step grid's
    # discretisation error.)
    equal = tune(PRESET, pipe=mixture_pipe(TRUE_MIXTURE), **{**RUN, "reference_steps": 4})
    assert equal.trials[0].criterion == pytest.approx(0.0, abs=1e-12)
    assert equal.chosen.plain, equal.table()
    assert "does not pay" in equal.reason


def test_budget_is_respected_and_forwards_are_counted(tmp_path):
    pipe = mixture_pipe(biased_students()["weights"])
    n, steps, ref = 100, 4, 10
    reference = n * ref + n  # the teacher's 10 steps (no CFG) and its feature pass
    plain = n * (steps + 1)
    guided = n * (steps + 1 + 1)  # one guided step: one teacher forward per image
    budget = reference + plain + 2 * guided + guided // 2  # room for two guided candidates, not three
    results = tmp_path / "r.json"
    r = tune(PRESET, pipe=pipe, prompts=["ring"], images_per_prompt=n, reference_steps=ref, budget=budget,
             results=results)
    assert r.forwards <= budget
    assert r.reference_forwards == reference
    assert [t.forwards for t in r.trials] == [plain, guided, guided]
    assert r.forwards == reference + sum(t.forwards for t in r.trials)
    saved = json.loads(results.read_text())
    assert saved["forwards"] == r.forwards and len(saved["trials"]) == 3
    with pytest.raises(ValueError, match="budget must be at least"):
        tune(PRESET, pipe=pipe, prompts=["ring"], images_per_prompt=n, reference_steps=ref, budget=reference)


def test_setting_knobs_are_valid_guidance():
    assert Setting(0.0).knobs() == {"strength": 0.0, "guided_steps": 0}
    for s in (Setting(0.0), Setting(0.5, 2, "same", 1.5)):
        TeacherGuidance(**s.knobs())
    # A per-step strength read back from JSON (a list) becomes the tuple it was written from.
    second_only = Setting(**json.loads(json.dumps({"strength": (0.0, 0.5), "guided_steps": 2})))
    assert second_only == Setting((0.0, 0.5), 2) and second_only.strength == (0.0, 0.5)


@pytest.fixture(scope="module")
def zoo_pd():
    return from_preset("zoo-pd", device="cpu")


def test_zoo_override_file_round_trips_without_touching_fashion_mnist(zoo_pd, tmp_path, monkeypatch):
    import distillpp.zoo.data as data

    monkeypatch.setenv("DISTILLPP_FASHION_MNIST", str(tmp_path / "nowhere"))

    def refuse(*args, **kwargs):
        raise AssertionError("the tuner read Fashion-MNIST")

    for name in ("load_split", "load_fashion_mnist"):
        if hasattr(data, name):
            monkeypatch.setattr(data, name, refuse)
    out = tmp_path / "tuned.json"
    n = 4  # 2 classes x 2 images; the teacher runs with CFG (2 forwards), pd takes 4 steps
    reference, plain, guided = n * 2 * 2 + n, n * (4 + 1), n * (4 + 2 + 1)
    r = tune("zoo-pd", prompts=["Sneaker", "Bag"], images_per_prompt=2, reference_steps=2, strengths=[0.75],
             budget=reference + plain + guided, margin=0.0, out=out, pipe=zoo_pd)
    assert [t.setting for t in r.trials] == [Setting(0.0), Setting(0.75, 1, "next", r.info["reference_cfg"])]
    saved = json.loads(out.read_text())
    assert saved == r.overrides and saved["preset"] == "zoo-pd"
    loaded = from_preset("zoo-pd", overrides=out)
    for k, v in r.chosen.knobs().items():
        assert getattr(loaded.guidance, k) == v
    gen_out = tmp_path / "gen"
    assert cli_main(["generate", "--preset", "zoo-pd", "--overrides", str(out), "--prompt", "Bag", "--seeds", "0",
                     "--device", "cpu", "--out", str(gen_out)]) == 0
    assert len(list(gen_out.glob("*.png"))) == 1


@pytest.mark.parametrize("argv, message", [
    (["--preset", "zoo-teacher"], "has no teacher"),
    (["--preset", "nope"], "unknown preset"),
    (["--preset", "zoo-pd", "--prompts", "Banana"], "prompts"),
    (["--preset", "zoo-pd", "--budget", "0"], "--budget"),
    (["--preset", "zoo-pd", "--strengths", "0"], "--strengths"),
    (["--preset", "zoo-pd", "--images-per-prompt", "0"], "--images-per-prompt"),
    (["--preset", "zoo-pd", "--out", "/nonexistent-folder/x.json"], "--out"),
    (["--preset", "zoo-pd", "--prompts", "Bag", "--images-per-prompt", "1"], "at least 4 images"),
])
def test_bad_arguments_fail_in_one_line_before_loading(argv, message, capsys, monkeypatch):
    import distillpp.pipelines.presets as presets

    def no_loading(*a, **k):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(presets, "from_preset", no_loading)
    try:
        code = cli_main(["tune", *argv])
    except SystemExit as exit_:  # argparse's own type errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("distillpp tune: error:") and message in err, err


def test_budget_below_the_reference_is_refused_before_any_forward(zoo_pd):
    calls = []
    handle = zoo_pd.family.teacher_module.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="budget must be at least"):
            tune("zoo-pd", pipe=zoo_pd, budget=50)
    finally:
        handle.remove()
    assert calls == []


def test_a_diffusers_pipeline_is_tuned_in_latent_space(tmp_path):
    """A tiny random SD1.5-shaped student and teacher UNet: the tuner runs through the diffusers family
    (text encoding, its noise table, the teacher UNet's mid_block as features) and writes a preset-less
    override file."""
    pytest.importorskip("transformers")
    from test_pipelines_sd import clip_tokenizer, tiny_pipe, tiny_unet

    from distillpp.pipelines.sd import DistillppPipeline

    tok = tmp_path / "tok"
    clip_tokenizer().save_pretrained(tok)
    pipe = DistillppPipeline(tiny_pipe(str(tok), False), tiny_unet(False, seed=5), num_inference_steps=2)
    calls = []
    handle = pipe.family.teacher_module.mid_block.register_forward_hook(lambda *a: calls.append(1))
    try:
        r = tune(None, pipe=pipe, prompts=["a cat", "a dog"], images_per_prompt=2, reference_steps=3,
                 strengths=[0.5], budget=10_000, out=tmp_path / "o.json")
    finally:
        handle.remove()
    assert r.info["feature_layer"] == "UNetMidBlock2DCrossAttn" and r.info["sample_space"] == "latent"
    own = r.info["reference_cfg"]
    assert [t.setting for t in r.trials][:3] == [Setting(0.0), Setting(0.5, 1, "next", own), Setting(0.5, 2, "next", own)]
    # The rest of the stated search: the second step alone, renoise same/random, the teacher without CFG.
    settings = [t.setting for t in r.trials]
    assert Setting((0.0, 0.5), 2, "next", own) in settings
    assert {t.setting.renoise for t in r.trials if t.stage == "renoise"} == {"same", "random"}
    assert any(t.setting.teacher_cfg == 1.0 for t in r.trials if t.stage == "teacher cfg") == (own != 1.0)
    assert Setting((0.0, 0.5), 2).knobs()["strength"] == [0.0, 0.5] and Setting((0.0, 0.0), 2).plain
    assert calls  # the teacher's mid_block gave the features
    assert set(json.loads((tmp_path / "o.json").read_text())) == {"guidance"}
    assert pipe._student_net is not None and not hasattr(pipe._student_net, "count")  # counters removed


def test_validation_reads_both_study_formats_and_compares_like_with_like(tmp_path):
    """benchmarks/tune_validation.py: the study's best row per student from fmnist_eval.json (a tree; seed set A's
    selection grid left out) and from fmnist_study_best.json (flat rows), guidance in one normalised form."""
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        import tune_validation as tv
    finally:
        sys.path.remove(str(bench))
    g_harness = {"strength": 0.75, "steps": 2, "renoise": "next", "space": "x0", "teacher_cfg": None}
    g_pipeline = {"strength": 0.75, "guided_steps": 2, "renoise": "next", "noise": "random", "space": "x0",
                  "samples": 1, "teacher_cfg": 2.0}
    assert tv.normalize(g_harness, 2.0) == tv.normalize(g_pipeline, 1.5)
    assert tv.normalize({"strength": 0.0}, 2.0) is None and tv.normalize({"strength": [0.0, 0.0], "steps": 2}, 2) is None

    def fid(mean):
        return {"mean": mean, "std": 0.01, "values": [mean] * 3, "n": 3}

    tree = {"protocol": {"seeds_B": [0, 1, 2], "n_B": 10000},
            "main": [{"label": "pd", "method": {"model": "pd", "steps": None, "cfg": None, "guidance": None},
                      "fid": fid(2.0)}],
            "ablation": {"pd": [{"variant": "two", "method": {"model": "pd", "steps": None, "cfg": None,
                                                              "guidance": g_harness}, "fid": fid(0.5)}]},
            "cost": [{"method": {"model": "pd", "steps": 6, "cfg": None, "guidance": None}, "fid": fid(0.1)}],
            "selection": {"pd": {"grid": [{"method": {"model": "pd", "steps": None, "cfg": None,
                                                      "guidance": {"strength": 0.1}}, "fid": fid(0.01)}]}}}
    flat = [{"model": "pd", "seed_set": "report", "steps": 4, "role": "plain 4 steps", "guidance": None,
             "seeds": [0, 1, 2], "n": 10000, "fid_mean": 2.0, "fid_std": 0.01, "fid_values": [2.0] * 3},
            {"model": "pd", "seed_set": "report", "steps": 4, "role": "chosen", "guidance": g_pipeline,
             "seeds": [0, 1, 2], "n": 10000, "fid_mean": 0.5, "fid_std": 0.01, "fid_values": [0.5] * 3},
            {"model": "pd", "seed_set": "report", "steps": 6, "role": "plain 6 steps", "guidance": None,
             "seeds": [0, 1, 2], "n": 10000, "fid_mean": 0.1, "fid_std": 0.01, "fid_values": [0.1] * 3}]
    for name, data in (("eval.json", tree), ("best.json", flat)):
        path = tmp_path / name
        path.write_text(json.dumps(data))
        rows, protocol = tv.load_study(path, "pd", 2.0, 4)
        best = min(rows, key=lambda r: r["fid"]["mean"])
        assert len(rows) == 2 and best["knobs"] == tv.normalize(g_pipeline, 2.0), name
        assert best["chosen"] == (name == "best.json")  # the flat file marks the study's own choice
        assert protocol["seeds"] == [0, 1, 2] and protocol["n"] == 10000
    verdict = tv.verdict({"mean": 0.52, "std": 0.01, "values": [0.52] * 3}, {"mean": 0.5, "std": 0.03, "values": [0.5] * 3})
    assert verdict["within_spread"] and not tv.verdict({"mean": 0.6, "std": 0.01, "values": [0.6] * 3},
                                                       {"mean": 0.5, "std": 0.03, "values": [0.5] * 3})["within_spread"]
