"""The Fashion-MNIST zoo as a model family: offline presets through the one guided pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import distillpp
from distillpp import zoo
from distillpp.pipelines import from_preset, list_presets
from distillpp.pipelines.zoo import class_label

from family_contract import FamilyContract, gen


def zoo_reference(name: str):
    """The plain sampler on the zoo model, with the noise the pipeline draws (CPU, one generator)."""
    model = zoo.load(name)

    def reference(prompts, generator, output_type="pt", **_):
        y = torch.tensor([class_label(p) for p in prompts])
        sigmas = model.sigmas()
        x = model.initial(torch.randn((len(prompts), 1, 32, 32), generator=generator), sigmas)
        out = distillpp.sample(model.denoiser, x, sigmas, sampler=model.sampler, extra_args=model.args(y),
                               generator=generator)
        return zoo.to_images(out).float() / 255.0

    return reference


@pytest.mark.parametrize("student", ["lcm", "pd", "flow-student"], scope="class")
class TestZooFamily(FamilyContract):
    PROMPTS = ("Sneaker", "bag")
    CALL = {"output_type": "pt"}

    @pytest.fixture(scope="class")
    def made(self, student):
        return from_preset(f"zoo-{student}"), zoo_reference(student)


def test_zoo_presets_and_prompts():
    assert {"zoo-lcm", "zoo-pd", "zoo-flow-student", "zoo-teacher", "zoo-flow-teacher"} <= set(list_presets("zoo"))
    assert class_label("ankle BOOT") == 9 and class_label("3") == 3
    with pytest.raises(ValueError, match="not a Fashion-MNIST class"):
        class_label("a red fox")
    pipe = from_preset("zoo-lcm")
    assert pipe.has_teacher and pipe.sampler == "consistency" and pipe.guidance.strength == (0.0, 1.0)
    torch.testing.assert_close(pipe.sigmas(), zoo.load("lcm").sigmas())
    images = pipe(["Trouser", "Sandal"], generator=gen(), output_type="pil").images
    assert [im.size for im in images] == [(28, 28)] * 2 and images[0].mode == "L"
    with pytest.raises(ValueError, match="height and width must be 28"):
        pipe("Bag", height=56, width=56)
    with pytest.raises(ValueError, match="base= does not apply"):
        from_preset("zoo-lcm", base="somewhere")


def test_teacher_alone_presets_refuse_explicit_guidance():
    teacher = from_preset("zoo-teacher")
    assert not teacher.has_teacher and teacher.num_inference_steps == 50
    out = teacher("Coat", generator=gen(), num_inference_steps=4, output_type="np").images
    assert out.shape == (1, 28, 28, 1) and np.isfinite(out).all()
    with pytest.raises(ValueError, match="no teacher"):
        teacher("Coat", strength=0.3, num_inference_steps=4)


def test_override_file_changes_the_preset(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text('{"preset": "zoo-pd", "guidance": {"strength": 0.3, "renoise": "same"}, "num_inference_steps": 3}')
    pipe = from_preset("zoo-pd", overrides=path)
    assert pipe.guidance.strength == 0.3 and pipe.guidance.renoise == "same" and pipe.num_inference_steps == 3
    with pytest.raises(ValueError, match="made for preset 'zoo-pd'"):
        from_preset("zoo-lcm", overrides=path)
    path.write_text('{"guidance": {"strenght": 0.3}}')
    with pytest.raises(ValueError, match="strenght"):
        from_preset("zoo-pd", overrides=path)
