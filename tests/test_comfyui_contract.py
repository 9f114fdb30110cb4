"""The node pack against a STAND-IN of ComfyUI's interfaces (tests/comfyui_standin.py), in CI.

The stand-in's models are exact Gaussian denoisers, so guided runs can be compared with
:func:`distillpp.sample` on the same denoisers. tests/test_comfyui_real.py runs the same contract
in real ComfyUI when COMFYUI_PATH is set.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
import torch

import distillpp
from distillpp.schedules import initial_sample

import comfyui_standin as standin

PACK = Path(__file__).resolve().parents[1] / "comfyui" / "distillpp_nodes"
POS, NEG = [[torch.tensor([0.5]), {}]], [[torch.tensor([-1.0]), {}]]
SEED = 11


@pytest.fixture(scope="module")
def pack():
    """The pack imported the way ComfyUI imports a custom-node folder, over the stand-in ``comfy``."""
    name = "distillpp_nodes_standin"
    with pytest.MonkeyPatch.context() as mp:
        for key, module in standin.install().items():
            mp.setitem(sys.modules, key, module)
        spec = importlib.util.spec_from_file_location(name, PACK / "__init__.py",
                                                      submodule_search_locations=[str(PACK)])
        module = importlib.util.module_from_spec(spec)
        mp.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        yield sys.modules[f"{name}.nodes"]
        for key in [k for k in sys.modules if k.startswith(name + ".")]:
            del sys.modules[key]


def patcher(flow=False, weight=1.0):
    return standin.ModelPatcher(standin.Model(flow, weight))


def guider(pack, student, teacher, **knobs):
    args = dict(student=student, teacher=teacher, positive=POS, negative=NEG, student_cfg=1.0, teacher_cfg=2.0,
                strength=0.4, guided_steps=2, renoise="next", noise="random", space="x0", samples=2)
    args.update(knobs)
    return pack.DistillppTeacherGuider().get_guider(**args)[0]


def sigmas_for(pack, model, flow):
    return pack.DistillppSigmaPreset().get_sigmas(model, "flux-schnell" if flow else "lcm", 4)[0]


def run(g, sampler, sigmas):
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(SEED))
    return g.sample(noise, torch.zeros(4, 3), sampler, sigmas, seed=SEED)


def library(student_w, teacher_w, sigmas, sampler, guidance, flow):
    """The same run through distillpp.sample with the stand-in's denoisers in VE coordinates."""
    from distillpp.schedules import flow_time_to_sigma

    def exact(weight):
        def denoise(x, sigma, c):
            s = sigma.reshape(-1, 1)
            c = c.repeat_interleave(x.shape[0] // c.shape[0]).reshape(-1, 1)
            return weight * (x + s**2 * c) / (1 + s**2)  # data ~ N(c, 1), in any coordinates' x0
        return distillpp.CFGDenoiser(denoise)

    if flow:
        sigmas = torch.cat([flow_time_to_sigma(sigmas[:-1].double().numpy()).float(), torch.zeros(1)])
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(SEED))
    x = initial_sample(noise, sigmas, "flow" if flow else "vp")
    split = {"cond": {"c": POS[0][0]}, "uncond": {"c": NEG[0][0]}}
    return distillpp.sample(exact(student_w), x, sigmas, sampler=sampler, teacher=exact(teacher_w),
                            guidance=guidance, generator=torch.Generator().manual_seed(SEED), extra_args=split,
                            teacher_args=split)


def test_every_node_declares_the_inputs_its_function_takes(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        spec = cls.INPUT_TYPES()
        declared = set(spec["required"]) | set(spec.get("optional", {}))
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        assert declared == set(params) - {"self"}
        required = {n for n, p in params.items() if p.default is inspect.Parameter.empty and n != "self"}
        assert required == set(spec["required"])
        assert len(cls.RETURN_TYPES) == 1 and cls.CATEGORY


@pytest.mark.parametrize("flow", [False, True], ids=["ve", "flow"])
@pytest.mark.parametrize("sampler", ["euler", "consistency", "dpmpp_2s_ancestral"])
def test_guider_with_the_pack_sampler_is_distillpp_sample(pack, sampler, flow):
    student, teacher = patcher(flow, 0.8), patcher(flow, 1.0)
    sigmas = sigmas_for(pack, student, flow)
    g = guider(pack, student, teacher)
    out = run(g, pack.DistillppSampler().get_sampler(sampler)[0], sigmas)
    torch.testing.assert_close(out, library(0.8, 1.0, sigmas, sampler, g.guidance, flow), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["pack", "comfy-euler"])
def test_strength_zero_is_the_plain_cfg_guider(pack, which):
    student, teacher = patcher(weight=0.8), patcher()
    sigmas = sigmas_for(pack, student, False)
    sampler = pack.DistillppSampler().get_sampler("euler")[0] if which == "pack" else standin.EulerSampler()
    plain = standin.CFGGuider(student)
    plain.set_conds(POS, NEG)
    plain.set_cfg(1.5)
    ours = guider(pack, student, teacher, strength=0.0, student_cfg=1.5)
    assert torch.equal(run(plain, sampler, sigmas), run(ours, sampler, sigmas))
    assert not torch.equal(run(plain, sampler, sigmas), run(guider(pack, student, teacher, student_cfg=1.5),
                                                            sampler, sigmas))


def test_lora_student_on_a_shared_base_is_guided_by_the_base_weights(pack):
    base = patcher(weight=1.0)
    student = base.clone()
    student.add_patches({"weight": torch.tensor(-0.2)})  # the 'LoRA': weight 0.8 once loaded
    student.add_object_patch("model_sampling", standin.EPS())  # like ModelSamplingDiscrete "lcm"
    g = guider(pack, student, base)
    assert g.shares_weights and not g.model_patcher.additional_models
    sigmas = sigmas_for(pack, base, False)
    out = run(g, pack.DistillppSampler().get_sampler("euler")[0], sigmas)
    torch.testing.assert_close(out, library(0.8, 1.0, sigmas, "euler", g.guidance, False), rtol=1e-5, atol=1e-5)
    naive = library(0.8, 0.8, sigmas, "euler", g.guidance, False)
    assert (out - naive).abs().max() > 1e-3
    # The student's patched weight and model sampling are back after every teacher call.
    assert float(base.model.weight) == pytest.approx(0.8) and base.model.model_sampling is \
        student.object_patches["model_sampling"]
    with pytest.raises(ValueError, match="same weights"):
        guider(pack, student, student.clone())
    other = base.clone()
    other.add_patches({"weight": torch.tensor(0.1)})
    with pytest.raises(ValueError, match="weight patches of its own"):
        guider(pack, student, other)


def test_teacher_with_the_students_weights_but_base_sampling_keeps_the_weights(pack):
    base = patcher(weight=1.0)
    lora = base.clone()
    lora.add_patches({"weight": torch.tensor(-0.2)})
    student = lora.clone()
    student.add_object_patch("model_sampling", standin.EPS())
    g = guider(pack, student, lora)  # same weights, only the model-sampling object differs
    sigmas = sigmas_for(pack, base, False)
    out = run(g, pack.DistillppSampler().get_sampler("euler")[0], sigmas)
    torch.testing.assert_close(out, library(0.8, 0.8, sigmas, "euler", g.guidance, False), rtol=1e-5, atol=1e-5)


def test_separate_teacher_is_loaded_with_the_student(pack):
    student, teacher = patcher(weight=0.8), patcher()
    g = guider(pack, student, teacher)
    assert g.model_patcher.additional_models[pack.TEACHER_KEY] == [teacher]
    assert student.additional_models == {}  # the student the user passed is not modified


def test_bad_inputs_raise_value_errors_naming_them(pack):
    with pytest.raises(ValueError, match="eta"):
        pack.DistillppSampler().get_sampler("consistency", eta=0.5)
    with pytest.raises(ValueError, match="sampler_name"):
        pack.DistillppSamplerObject("heun")
    with pytest.raises(ValueError, match="flux-schnell"):
        pack.DistillppSigmaPreset().get_sigmas(patcher(), "flux-schnell", 4)
    with pytest.raises(ValueError, match="model"):
        pack.DistillppSigmaPreset().get_sigmas(patcher(flow=True), "lightning", 4)
    with pytest.raises(ValueError, match="timesteps"):
        pack.DistillppSigmaPreset().get_sigmas(patcher(), "lcm", 4, "999,499")
    with pytest.raises(ValueError, match="strength"):
        guider(pack, patcher(), patcher(weight=0.5), strength=2.0)
    with pytest.raises(ValueError, match="denoise_mask"):
        g = guider(pack, patcher(weight=0.8), patcher())
        noise = torch.randn(4, 3)
        g.sample(noise, torch.zeros(4, 3), pack.DistillppSampler().get_sampler("euler")[0],
                 sigmas_for(pack, patcher(), False), denoise_mask=torch.ones(4, 3), seed=0)
    with pytest.raises(ValueError, match="neither"):
        pack.model_kind(object())
