"""``distillpp ui``: the app's functions on the shipped zoo, the running app through gradio_client, and
the page in a real browser (Debian's chromium driven by Playwright).

``DISTILLPP_UI_SCREENSHOT=docs/ui.png pytest tests/test_ui.py -k browser`` writes the README's picture
(4 seeds, the teacher at its 50 steps); without it the browser test samples less and keeps its
screenshot in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distillpp import ui
from distillpp.pipelines import MissingWeightsError

CHROMIUM = Path("/usr/bin/chromium")
# gradio's queue calls pandas options that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")


def request(**overrides):
    kw = dict(preset="zoo-lcm", prompt="Sneaker", seeds="0, 1", strength=0.75, per_step="", guided_steps=1,
              steps=None, renoise="next", noise="random", space="x0", teacher_cfg=1.5, samples=1,
              with_teacher=False, teacher_steps=None)
    kw.update(overrides)
    return ui.parse_request(**kw)


def pixels(images):
    return [np.asarray(im.convert("L")) for im in images]


@pytest.fixture(scope="module")
def backend():
    return ui.Backend(device="cpu")


# ------------------------------------------------------------------------------------------- inputs


def test_parse_request_reads_every_setting():
    req = request(prompt="  Sneaker ", seeds="3, 0-1", per_step="0.5, 0.25", guided_steps=2, steps=6,
                  renoise="same", noise="hybrid", space="eps", teacher_cfg=2, samples=3, with_teacher=True,
                  teacher_steps=10)
    assert req.prompt == "Sneaker" and req.seeds == (3, 0, 1)
    assert req.strength == (0.5, 0.25) and req.guided_steps == 2 and req.steps == 6
    assert (req.renoise, req.noise, req.space, req.teacher_cfg, req.samples) == ("same", "hybrid", "eps", 2.0, 3)
    assert req.with_teacher and req.teacher_steps == 10
    assert request(teacher_cfg=None).guidance_kwargs().get("teacher_cfg") is None
    # noise_mix only means something for hybrid noise, and is passed on only then.
    assert request(noise="hybrid", noise_mix="0.25").guidance_kwargs()["noise_mix"] == 0.25
    assert "noise_mix" not in request(noise_mix=0.25).guidance_kwargs()


@pytest.mark.parametrize("overrides, message", [
    ({"prompt": "   "}, "prompt is empty"),
    ({"strength": 1.5}, "strength must be in [0, 1], got 1.5"),
    ({"strength": float("nan")}, "strength must be in [0, 1]"),
    ({"per_step": "0.5, 2"}, "per-step strengths must each be in [0, 1], got 2"),
    ({"per_step": "0.5, x"}, "per-step strengths must be numbers"),
    ({"per_step": "0.5, 0.2", "guided_steps": 3}, "3 guided steps need 3 values, got 2"),
    ({"seeds": " "}, "seeds is empty"),
    ({"seeds": "0, one"}, "seeds must be integers"),
    ({"seeds": "-1"}, "seeds must be integers"),
    ({"seeds": "0-40"}, "at most 16"),
    ({"preset": "zoo-teacher"}, "not a student preset with a teacher"),
    ({"preset": ""}, "preset is empty"),
    ({"renoise": "later"}, "renoise must be one of"),
    ({"guided_steps": -1}, "guided steps must be a whole number >= 0"),
    ({"samples": 0}, "K (teacher samples) must be a whole number >= 1"),
    ({"teacher_cfg": "high"}, "teacher CFG must be a number"),
    ({"teacher_cfg": float("inf")}, "teacher_cfg must be a finite number"),
    ({"noise": "hybrid", "noise_mix": 1.5}, "noise_mix must be in [0, 1]"),
    ({"noise_mix": "lots"}, "noise mix must be a number"),
])
def test_parse_request_refuses_bad_input_with_a_readable_message(overrides, message):
    with pytest.raises(ValueError) as err:
        request(**overrides)
    assert message in str(err.value)


def defaults_request(preset, d, seeds="0"):
    """The request the page's controls make when they hold ``d`` (from ``ui.preset_defaults``)."""
    return ui.parse_request(preset, "Sneaker", seeds, d["strength"], d["per_step"], d["guided_steps"],
                            d["steps"], d["renoise"], d["noise"], d["space"], d["teacher_cfg"], d["samples"],
                            False, None, d["noise_mix"])


def guidance_of(req):
    from distillpp import TeacherGuidance

    kw = req.guidance_kwargs()
    return TeacherGuidance(**{**kw, "noise_mix": kw.get("noise_mix", req.noise_mix)})


def assert_same_guidance(req, g):
    got = guidance_of(req)
    names = ["strength", "guided_steps", "renoise", "noise", "space", "teacher_cfg", "samples"]
    if g.noise == "hybrid":
        names.append("noise_mix")
    assert {n: getattr(got, n) for n in names} == {n: getattr(g, n) for n in names}


def test_preset_defaults_follow_the_preset():
    from distillpp.pipelines import get_preset

    d = ui.preset_defaults("zoo-lcm")
    p = get_preset("zoo-lcm")
    assert d["zoo"] and d["steps"] == p.num_inference_steps
    # The controls filled with the defaults ask for the preset's own guidance, whatever form its strength has.
    assert_same_guidance(defaults_request("zoo-lcm", d), p.guidance)
    assert d["teacher_steps"] == get_preset("zoo-teacher").num_inference_steps
    assert ui.teacher_preset("zoo-flow-student") == "zoo-flow-teacher"
    sd = ui.preset_defaults("sdxl-lcm")
    assert not sd["zoo"] and sd["teacher_steps"] is None and ui.teacher_preset("sdxl-lcm") is None
    offered = ui.guided_presets()
    assert offered[:3] == ["zoo-flow-student", "zoo-lcm", "zoo-pd"] and "zoo-teacher" not in offered


@pytest.mark.parametrize("strength, guided, per_step, slider", [
    ((0.0, 1.0), 2, "0, 1", 0.0),  # per-step strengths as a preset's default
    ((0.6, 0.3, 0.1), 2, "0.6, 0.3, 0.1", 0.6),  # more values than guided steps: the extra ones are unused
    (0.123456789, 1, "0.123456789", 0.123456789),  # off the slider's 0.01 grid: kept exact in the text field
    (0.25, 1, "", 0.25),
])
def test_preset_defaults_fill_the_per_step_field_for_a_tuple_strength(monkeypatch, strength, guided, per_step,
                                                                      slider):
    from dataclasses import replace

    from distillpp import TeacherGuidance
    from distillpp.pipelines import PRESETS, get_preset

    g = TeacherGuidance(strength=strength, guided_steps=guided, space="x0", teacher_cfg=1.5)
    monkeypatch.setitem(PRESETS, "zoo-lcm", replace(get_preset("zoo-lcm"), guidance=g))
    d = ui.preset_defaults("zoo-lcm")
    assert (d["per_step"], d["strength"], d["guided_steps"]) == (per_step, slider, guided)
    req = defaults_request("zoo-lcm", d)
    assert_same_guidance(req, g)
    from distillpp.pipelines.cli import parse_strength

    argv = shlex.split(ui.command_line(req))
    given = parse_strength(argv[argv.index("--strength") + 1])
    assert np.atleast_1d(given).tolist() == np.atleast_1d(strength).tolist()


def write_overrides(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


TUNED = {"preset": "zoo-pd", "num_inference_steps": 3,
         "guidance": {"strength": [0.3, 0.65], "guided_steps": 2, "renoise": "same", "noise": "hybrid",
                      "noise_mix": 0.25, "space": "x0", "teacher_cfg": 3.5, "samples": 2}}


def test_ui_overrides_flag_starts_on_the_files_preset_with_its_settings(tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from distillpp.cli import main

    path = write_overrides(tmp_path / "tuned.json", TUNED)
    started = {}

    class Started(Exception):
        pass

    def fake_serve(app, *args, **kwargs):
        started["app"] = app
        raise Started

    real_build = ui.build_app
    monkeypatch.setattr(ui, "build_app", lambda backend, preset: started.update(backend=backend) or real_build(
        backend, preset=preset))
    monkeypatch.setattr(ui, "serve", fake_serve)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the other tests keep their threads
    with pytest.raises(Started):
        main(["ui", "--overrides", path, "--device", "cpu"])
    assert started["backend"].overrides == {"zoo-pd": os.path.abspath(path)}
    values = {b.label: b.value for b in started["app"].blocks.values()
              if getattr(b, "label", None) and hasattr(b, "value")}
    assert values["Preset"] == "zoo-pd"
    assert values["Per-step strengths (optional)"] == "0.3, 0.65" and values["Strength λ"] == 0.3
    assert values["Guided steps"] == 2
    assert values["Student steps"] == 3 and values["K teacher samples per step"] == 2
    assert (values["Re-noise level"], values["Noise"], values["Fusion space"]) == ("same", "hybrid", "x0")
    assert values["Teacher CFG"] == 3.5 and values["Noise mix (hybrid)"] == 0.25
    # --preset naming the file's own preset is the same start.
    assert ui.read_overrides(path, "zoo-pd") == "zoo-pd"
    # A file without "preset" applies to --preset, else to the default preset.
    bare = write_overrides(tmp_path / "bare.json", {"guidance": {"strength": 0.4, "guided_steps": 1}})
    assert ui.read_overrides(bare) == ui.DEFAULT_PRESET and ui.read_overrides(bare, "zoo-pd") == "zoo-pd"


def test_reproduction_strings_carry_the_override_settings(tmp_path):
    from dataclasses import replace

    from distillpp.cli import main

    path = write_overrides(tmp_path / "tuned.json", TUNED)
    backend = ui.Backend(device="cpu", overrides={"zoo-pd": path})
    req = defaults_request("zoo-pd", ui.preset_defaults("zoo-pd", path), seeds="0, 2")
    r = backend.generate_pair(req)
    assert len(r.corrections) == 3 and all(c > 0 for step in r.corrections[:2] for c in step)
    # Every setting of the file is in effect: half the noise mix gives other images.
    other = backend.generate_pair(replace(req, noise_mix=0.5))
    assert any(np.abs(a.astype(int) - b).max() > 0 for a, b in zip(pixels(r.guided), pixels(other.guided)))

    cmd = ui.command_line(req, "cpu", path)
    assert f"--overrides {path}" in cmd and "--strength 0.3,0.65" in cmd and "--noise-mix 0.25" in cmd
    out = tmp_path / "out"
    assert main(shlex.split(cmd)[1:] + ["--out", str(out)]) == 0
    for k, seed in enumerate(req.seeds):
        saved = [p for p in out.glob(f"*seed{seed}*.png") if "student-vs-guided" not in p.name]
        np.testing.assert_array_equal(pixels([Image.open(saved[0])])[0], pixels(r.guided)[k])

    code = ui.python_code(req, "cpu", path)
    assert f"overrides={path!r}" in code
    namespace: dict = {}
    exec(compile(code, "<ui python>", "exec"), namespace)
    for name in ("student", "guided"):
        for a, b in zip(pixels(namespace[name]), pixels(getattr(r, name)), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("data, argv, message", [
    ({"preset": "zoo-teacher"}, [], "preset 'zoo-teacher' is not offered by distillpp ui"),
    ({"preset": "zoo-lcm", "guidance": {"strength": 1.5}}, [], "strength must be in [0, 1], got 1.5"),
    ({"preset": "zoo-lcm", "guidance": {"strength": [0.5], "guided_steps": 2}}, [],
     "strength has 1 values but guided_steps=2 are guided"),
    ({"preset": "zoo-lcm", "guidance": {"guided_steps": 9}}, [], "guided_steps must be in [0, 4]"),
    ({"preset": "zoo-lcm", "guidance": {"lam": 0.5}}, [], "unknown guidance knobs ['lam']"),
    ({"preset": "zoo-lcm", "seed": 3}, [], "overrides has unknown fields ['seed']"),
    ({"preset": "zoo-lcm"}, ["--preset", "zoo-pd"], "overrides were made for preset 'zoo-lcm', not 'zoo-pd'"),
    ("{not json", [], "is not readable JSON"),
    (None, [], "is not readable JSON"),  # no such file
])
def test_ui_refuses_a_bad_overrides_file_in_one_line_before_serving(tmp_path, monkeypatch, capsys, data, argv,
                                                                     message):
    from distillpp.cli import main

    path = tmp_path / "overrides.json"
    if data is not None:
        path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    monkeypatch.setattr(ui, "_import_gradio", lambda: pytest.fail("the file must be checked before Gradio loads"))
    assert main(["ui", "--overrides", str(path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distillpp ui: error: --overrides: ") and message in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------------- sampling


def test_generate_pair_same_seeds_for_student_guided_and_teacher(backend):
    seen = []
    req = request(with_teacher=True, teacher_steps=6)
    r = backend.generate_pair(req, progress=lambda f, text: seen.append((f, text)))
    assert len(r.student) == len(r.guided) == len(r.teacher) == 2
    assert all(im.size == (28, 28) for im in r.student + r.guided + r.teacher)
    # Each image depends only on its seed: seed 1 alone, from the pipeline directly, is the same student image.
    pipe = backend.pipeline("zoo-lcm")
    alone = pipe(["Sneaker"], generator=[torch.Generator().manual_seed(1)], strength=0.0).images
    np.testing.assert_array_equal(pixels(alone)[0], pixels(r.student)[1])
    for s, g in zip(pixels(r.student), pixels(r.guided)):
        assert np.abs(s.astype(int) - g).max() > 0  # the teacher changed every image
    # One guided step: only the first step has a correction.
    assert len(r.corrections) == 4 and all(c > 0 for c in r.corrections[0])
    assert all(c == 0 for step in r.corrections[1:] for c in step)
    fractions = [f for f, _ in seen]
    assert len(seen) == 2 * 4 + 6 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert "teacher: step 6/6" in seen[-1][1]
    assert "Largest correction" in ui.summary(r)
    rows = ui.correction_rows(r)
    assert len(rows) == 8 and rows[0] == {"step": "1", "correction": r.corrections[0][0], "seed": "seed 0"}


def test_plotted_correction_is_the_guided_calls_own(backend):
    # In x0 space x0 = x0_s + lam (x0_t - x0_s) with the same teacher draw, so the correction scales with lam.
    high = backend.generate_pair(request(strength=0.75, seeds="0"))
    low = backend.generate_pair(request(strength=0.25, seeds="0"))
    np.testing.assert_allclose(np.array(high.corrections[0]) / np.array(low.corrections[0]), 3.0, rtol=1e-4)
    two = backend.generate_pair(request(per_step="0.5, 0.5", guided_steps=2, seeds="0"))
    assert all(c > 0 for c in two.corrections[0] + two.corrections[1])
    assert all(c == 0 for c in two.corrections[2] + two.corrections[3])


def test_strength_zero_changes_nothing(backend):
    r = backend.generate_pair(request(strength=0.0, seeds="2"))
    np.testing.assert_array_equal(pixels(r.student)[0], pixels(r.guided)[0])
    assert r.corrections == [[0.0]] * 4 and r.teacher is None
    assert "did not change anything" in ui.summary(r)


def test_python_code_reproduces_the_images(backend):
    req = request(seeds="1, 4", per_step="0.6, 0.3", guided_steps=2, steps=5, with_teacher=True, teacher_steps=5)
    r = backend.generate_pair(req)
    namespace: dict = {}
    exec(compile(ui.python_code(req), "<ui python>", "exec"), namespace)
    for name in ("student", "guided", "teacher"):
        for a, b in zip(pixels(namespace[name]), pixels(getattr(r, name)), strict=True):
            np.testing.assert_array_equal(a, b)


def test_command_line_reproduces_the_images(backend, tmp_path):
    from distillpp.cli import main

    req = request(seeds="0, 3", strength=0.5, renoise="same")
    r = backend.generate_pair(req)
    argv = shlex.split(ui.command_line(req, "cpu"))
    assert argv[:2] == ["distillpp", "generate"]
    assert main(argv[1:] + ["--out", str(tmp_path)]) == 0
    for k, seed in enumerate(req.seeds):
        saved = [p for p in tmp_path.glob(f"*seed{seed}*.png") if "student-vs-guided" not in p.name]
        assert len(saved) == 1, sorted(p.name for p in tmp_path.iterdir())
        np.testing.assert_array_equal(pixels([Image.open(saved[0])])[0], pixels(r.guided)[k])
        pair = pixels([Image.open(next(tmp_path.glob(f"*seed{seed}*student-vs-guided.png")))])[0]
        np.testing.assert_array_equal(pair[:, :28], pixels(r.student)[k])


def test_missing_weights_become_a_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError) as err:
        ui.Backend().generate_pair(request(preset="sdxl-lcm", prompt="a red fox", teacher_cfg=None))
    text = ui._error_text(err.value)
    assert text.startswith("**Weights missing.**") and "latent-consistency/lcm-sdxl" in text
    assert "Unexpected" in ui._error_text(RuntimeError("boom")) and "boom" in ui._error_text(RuntimeError("boom"))


def test_ui_listens_on_localhost_by_default():
    parser = argparse.ArgumentParser()
    ui.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.host, args.download, args.preset, args.overrides) == ("127.0.0.1", False, None, None)


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["--preset", "zoo-teacher"], "--preset must be one of zoo-flow-student, zoo-lcm, zoo-pd"),
    (["--device", "tpu:9"], "--device must be a torch device"),
])
def test_ui_refuses_bad_options_before_serving(argv, message, capsys):
    from distillpp.cli import main

    assert main(["ui", *argv]) == 2
    assert message in capsys.readouterr().err


def test_ui_without_gradio_says_how_to_install(monkeypatch, capsys):
    from distillpp.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    assert main(["ui"]) == 2
    assert "pip install 'distillpp[ui]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the running app


@pytest.fixture(scope="module")
def server(backend):
    """The app on a free port of 127.0.0.1, in this process (saves a second torch/diffusers start-up);
    stopped after the module's tests. No weights cache and no downloads, so diffusers presets miss weights."""
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as hf_home:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", hf_home)
        app = ui.build_app(backend)
        url = ui.serve(app, "127.0.0.1", 0, block=False)
        try:
            with urllib.request.urlopen(url + "/", timeout=30) as response:
                assert response.status == 200
            yield url
        finally:
            app.close()


def predict(client, **overrides):
    kw = dict(preset="zoo-lcm", prompt="Sneaker", seeds="0, 1", strength=0.75, per_step="", guided_steps=1,
              steps=4, renoise="next", noise="random", space="x0", teacher_cfg=1.5, samples=1,
              with_teacher=False, teacher_steps=50, noise_mix=0.5)
    kw.update(overrides)
    return client.predict(*kw.values(), api_name="/generate")


def test_gradio_client_generates_and_the_app_survives_bad_input(server):
    from gradio_client import Client

    client = Client(server, verbose=False)
    for overrides, message in [
        ({"prompt": ""}, "**Error:** prompt is empty"),
        ({"per_step": "0.5, 1.5"}, "**Error:** per-step strengths must each be in [0, 1], got 1.5"),
        ({"prompt": "Spaceship"}, "**Error:** prompt 'Spaceship' is not a Fashion-MNIST class"),
        ({"preset": "sdxl-lcm", "prompt": "a red fox"}, "**Weights missing.**"),
    ]:
        out = predict(client, **overrides)
        assert out[0].startswith(message) and "Traceback" not in out[0], out[0]
        assert out[1]["value"] == [] and out[5] == ""

    status, student, guided, teacher, plot, cmd, code = predict(client, with_teacher=True, teacher_steps=4)
    assert status.startswith("**zoo-lcm**") and "Largest correction" in status
    for gallery in (student, guided, teacher):
        assert [item["caption"] for item in gallery["value"]] == ["seed 0", "seed 1"]
    images = {name: [np.asarray(Image.open(item["image"]).convert("L")) for item in g["value"]]
              for name, g in (("student", student), ("guided", guided))}
    assert images["student"][0].shape == (168, 168)  # 28 x 28 shown 6x, nearest neighbour
    assert all(np.abs(a.astype(int) - b).max() > 0 for a, b in zip(images["student"], images["guided"]))
    steps = {}
    for step, correction, _ in plot["data"]:
        steps.setdefault(step, []).append(correction)
    assert sorted(steps) == ["1", "2", "3", "4"] and all(c > 0 for c in steps["1"])
    assert all(c == 0 for s in "234" for c in steps[s])
    assert cmd.startswith("distillpp generate --preset zoo-lcm --prompt Sneaker --seeds 0 1")
    assert "from_preset('zoo-lcm'" in code and "from_preset('zoo-teacher'" in code


def test_browser_runs_a_zoo_preset(server, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium): the real-browser test needs it")
    from playwright.sync_api import expect, sync_playwright

    docs = os.environ.get("DISTILLPP_UI_SCREENSHOT")
    shot = Path(docs) if docs else tmp_path / "ui.png"
    n_seeds, teacher_steps = (4, 50) if docs else (2, 5)
    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            local = (server, "data:", "blob:")
            page.on("request", lambda r: None if r.url.startswith(local) else outside.append(r.url))
            page.goto(server + "/")
            seeds = page.locator("#seeds textarea, #seeds input").first
            # A bad input shows a message in the page; the app then still samples.
            seeds.fill("")
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("seeds is empty", timeout=30_000)
            seeds.fill(", ".join(str(s) for s in range(n_seeds)))
            # A diffusers preset: a text prompt instead of the class, no teacher column, missing weights said so.
            preset = page.get_by_label("Preset")
            preset.click()
            preset.fill("sdxl-lcm")
            page.keyboard.press("Enter")
            expect(page.locator("#class")).to_be_hidden()
            expect(page.locator("#teacher")).to_be_hidden()
            page.locator("#prompt textarea, #prompt input").first.fill("a red fox in snow")
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("Weights missing", timeout=30_000)
            expect(page.locator("#status")).to_contain_text("latent-consistency/lcm-sdxl")
            preset.click()
            preset.fill("zoo-lcm")
            page.keyboard.press("Enter")
            expect(page.locator("#class")).to_be_visible()
            expect(page.locator("#status")).to_contain_text("Pick settings")
            page.locator("#teacher-steps input").fill(str(teacher_steps))
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("Largest correction", timeout=120_000)
            for gallery in ("#student", "#guided", "#teacher"):
                expect(page.locator(f"{gallery} img")).to_have_count(n_seeds)
            expect(page.locator("#plot .mark-symbol path")).to_have_count(4 * n_seeds)  # a point per step and seed
            x_axis = page.locator('#plot [aria-label^="X-axis"]')
            expect(x_axis).to_have_attribute("aria-label", re.compile("discrete scale with 4 values: 1, 2, 3, 4"))
            assert page.locator("#cmd textarea").input_value().startswith("distillpp generate --preset zoo-lcm")
            # The plot draws after its data arrives: wait until every point has a shape.
            page.wait_for_function(
                "n => [...document.querySelectorAll('#plot .mark-symbol path')]"
                ".filter(p => (p.getAttribute('d') || '').length > 4).length === n", arg=4 * n_seeds)
            page.wait_for_timeout(500)
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not outside, f"the page fetched from outside 127.0.0.1: {outside}"
    assert Image.open(shot).size[0] == 1400
