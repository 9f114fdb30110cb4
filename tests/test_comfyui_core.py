"""The ComfyUI node pack's ComfyUI-free logic (comfyui/distillpp_nodes/core.py), on plain tensors.

Preset grids are checked against diffusers' schedulers (the students' release schedulers), the flow
change of variables against distillpp's FlowDenoiser, and the guidance step against the library's
guide. No ComfyUI is needed: core.py is loaded from its file.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
)

import distillpp
from distillpp.analytic import GaussianMixture, GaussianMixtureDenoiser
from distillpp.schedules import DiscreteVPSchedule, flow_time_to_sigma, initial_sample

CORE = Path(__file__).resolve().parents[1] / "comfyui" / "distillpp_nodes" / "core.py"
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _load_core():
    spec = importlib.util.spec_from_file_location("distillpp_comfyui_core", CORE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


core = _load_core()


@pytest.fixture(scope="module")
def sd() -> DiscreteVPSchedule:
    return DiscreteVPSchedule.from_betas(**SD)


def _vp(scheduler, timesteps) -> torch.Tensor:
    a = scheduler.alphas_cumprod[torch.as_tensor(timesteps).long()].double()
    return torch.cat([((1 - a) / a).sqrt(), torch.zeros(1, dtype=torch.float64)]).float()


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_presets_equal_the_students_release_schedulers(sd, steps):
    euler = EulerDiscreteScheduler(**SD, timestep_spacing="trailing")
    euler.set_timesteps(steps)
    torch.testing.assert_close(core.preset_sigmas("lightning", steps, sd), euler.sigmas.float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(core.preset_sigmas("turbo", steps, sd), euler.sigmas.float(), rtol=1e-5, atol=0)
    lcm = LCMScheduler(**SD)
    lcm.set_timesteps(steps)
    torch.testing.assert_close(core.preset_sigmas("lcm", steps, sd), _vp(lcm, lcm.timesteps), rtol=1e-5, atol=0)
    ddim = DDIMScheduler(**SD, timestep_spacing="trailing", set_alpha_to_one=True)
    ddim.set_timesteps(steps)
    torch.testing.assert_close(core.preset_sigmas("hyper-sd", steps, sd), _vp(ddim, ddim.timesteps), rtol=1e-5,
                               atol=0)
    tcd = TCDScheduler(**SD)
    tcd.set_timesteps(steps)
    torch.testing.assert_close(core.preset_sigmas("tcd", steps, sd), _vp(tcd, tcd.timesteps), rtol=1e-5, atol=0)
    flow = FlowMatchEulerDiscreteScheduler(shift=1.0)  # FLUX.1-schnell's scheduler config
    flow.set_timesteps(steps)
    torch.testing.assert_close(core.preset_sigmas("flux-schnell", steps), flow.sigmas.float(), rtol=1e-6, atol=0)


def test_dmd2_preset_is_its_explicit_timesteps(sd):
    lcm = LCMScheduler(**SD)
    lcm.set_timesteps(timesteps=[999, 749, 499, 249])
    torch.testing.assert_close(core.preset_sigmas("dmd2", 4, sd), _vp(lcm, lcm.timesteps), rtol=1e-5, atol=0)
    custom = core.preset_sigmas("dmd2", 4, sd, core.parse_ints("999, 500", "timesteps"))
    torch.testing.assert_close(custom, _vp(lcm, [999, 500]), rtol=1e-5, atol=0)


def test_comfy_linear_schedule_is_scaled_linear_and_others_are_refused():
    # ComfyUI's make_beta_schedule("linear"): float64 linspace of sqrt(beta), squared.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    comfy_table = ((1 - abar) / abar).sqrt().float()
    schedule = core.schedule_from_comfy(1000, 0.00085, 0.012, False, comfy_table)
    # Our betas are float32 like diffusers', ComfyUI's float64: 1.3e-5 apart at t = 0.
    torch.testing.assert_close(schedule.sigmas.float(), comfy_table, rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="scaled-linear"):
        core.schedule_from_comfy(1000, 0.00085, 0.012, False, comfy_table * 1.1)
    with pytest.raises(ValueError, match="zsnr"):
        core.schedule_from_comfy(1000, 0.00085, 0.012, True)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda sd: core.preset_sigmas("lightnin", 4, sd), "preset"),
        (lambda sd: core.preset_sigmas("lcm", 0, sd), "steps"),
        (lambda sd: core.preset_sigmas("lcm", 4), "schedule"),
        (lambda sd: core.preset_sigmas("dmd2", 2, sd, [249, 999]), "descending"),
        (lambda sd: core.parse_floats("0.1, x", "strength_list"), "strength_list"),
        (lambda sd: core.parse_ints("999, 7.5", "timesteps"), "timesteps"),
        (lambda sd: core.make_guidance(0.1, 2, "next", "random", "x0", 7.5, 1, "0.1"), "strength_list"),
        (lambda sd: core.make_guidance(1.5, 1, "next", "random", "x0", 7.5), "strength"),
        (lambda sd: core.make_guidance(0.1, 1, "nxt", "random", "x0", 7.5), "renoise"),
        (lambda sd: core.make_guidance(0.1, 1, "next", "random", "v", 7.5), "space"),
        (lambda sd: core.make_guidance(0.1, 1, "next", "random", "x0", 7.5, 0), "samples"),
        (lambda sd: core.sigmas_to_ve(torch.tensor([1.5, 0.0]), "flow"), "flow times"),
        (lambda sd: core.VEDenoiser(lambda x, s: x, "vp"), "kind"),
        (lambda sd: core.StepGuide(distillpp.TeacherGuidance(space="eps"), lambda x, s: x,
                                   core.preset_sigmas("flux-schnell", 4), "flow"), "space"),
        (lambda sd: core.run_sampler("euler", lambda x, s: x, torch.zeros(1, 2), core.preset_sigmas("flux-schnell", 4),
                                     "flow", lambda x, s: x, distillpp.TeacherGuidance(space="eps")), "space"),
    ],
)
def test_bad_node_inputs_raise_value_errors_naming_them(sd, call, match):
    with pytest.raises(ValueError, match=match):
        call(sd)


def test_make_guidance_reads_the_widgets():
    g = core.make_guidance(0.1, 2, "same", "hybrid", "eps", 3.0, 4, "0.2 0.05", 0.25)
    assert (g.strength, g.guided_steps, g.renoise, g.noise, g.space, g.teacher_cfg, g.samples, g.noise_mix) == (
        (0.2, 0.05), 2, "same", "hybrid", "eps", 3.0, 4, 0.25)
    assert core.make_guidance(0.1, 1, "next", "random", "x0", 7.5, strength_list=" ").strength == 0.1


def test_flow_coordinates_round_trip_and_pure_noise_is_sigma_1e8():
    s = torch.tensor([1.0, 0.75, 0.25, 0.0])
    ve = core.sigmas_to_ve(s, "flow")
    assert ve[0] == core.FLOW_SIGMA_MAX and ve[-1] == 0
    torch.testing.assert_close(ve[1:3], torch.tensor([3.0, 1.0 / 3.0]))
    x = torch.randn(4, 3, 5)
    torch.testing.assert_close(core.x_from_ve(core.x_to_ve(x, ve, "flow"), ve, "flow"), x)
    # x_ve = x0 + sigma eps  <->  x_flow = (1 - s) x0 + s eps
    x0, eps = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    torch.testing.assert_close(core.x_to_ve((1 - s[1]) * x0 + s[1] * eps, ve[1:2].expand(4), "flow"),
                               x0 + ve[1] * eps)
    assert core.x_to_ve(x, ve, "ve") is x and core.sigmas_to_ve(s, "ve") is s


def test_flow_adapter_is_the_flow_denoisers_change_of_variables():
    torch.manual_seed(0)
    w = torch.randn(3, 3)

    def velocity(x, t):  # any velocity network; timestep = flow time (FLUX's convention)
        return torch.einsum("ij,bj...->bi...", w, x) * (1 + t.reshape(-1, 1, 1))

    def comfy_x0(x, s):  # what ComfyUI's CONST model returns: x - s * v
        return x - s.reshape(-1, 1, 1) * velocity(x, s)

    x, sigma = torch.randn(2, 3, 4), torch.tensor([0.5, 7.0])
    torch.testing.assert_close(core.VEDenoiser(comfy_x0, "flow")(x, sigma),
                               distillpp.FlowDenoiser(velocity, timestep_scale=1.0)(x, sigma), rtol=1e-6, atol=1e-6)


def _mixture_pair():
    """An exact teacher (a 2-D Gaussian mixture's posterior mean) and a biased student."""
    exact = GaussianMixtureDenoiser(GaussianMixture(torch.tensor([[2.0, 0.0], [-2.0, 1.0]]), torch.tensor([0.3, 0.5]),
                                                    torch.tensor([0.6, 0.4])))
    return (lambda x, s: exact(x, s) * 0.8 + 0.1), (lambda x, s: exact(x, s))


@pytest.mark.parametrize("kind", ["ve", "flow"])
@pytest.mark.parametrize("sampler", ["euler", "consistency"])
def test_run_sampler_is_distillpp_sample_in_comfy_coordinates(sd, kind, sampler):
    student_ve, teacher_ve = _mixture_pair()
    if kind == "ve":
        sigmas, native_s, native_t = core.preset_sigmas("lightning", 4, sd), student_ve, teacher_ve
    else:  # the same exact denoisers seen from flow coordinates (what a ComfyUI CONST model computes)
        sigmas = core.preset_sigmas("flux-schnell", 4)

        def to_ve(x, s):  # flow time 1 is VE sigma 1e8 (x / (1 - s) = x (1 + sigma))
            sigma = flow_time_to_sigma(s.double().numpy()).float()
            return x * (1 + sigma).reshape(-1, 1), sigma

        def native_s(x, s):
            return student_ve(*to_ve(x, s))

        def native_t(x, s):
            return teacher_ve(*to_ve(x, s))
    g = distillpp.TeacherGuidance(strength=0.4, guided_steps=2, samples=2)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    x = noise if kind == "flow" else initial_sample(noise, sigmas, "vp")  # ComfyUI's noise_scaling at sigma_max
    out = core.run_sampler(sampler, core.VEDenoiser(native_s, kind), x, sigmas, kind,
                           teacher=core.VEDenoiser(native_t, kind), guidance=g,
                           generator=torch.Generator().manual_seed(2))
    sigmas_ve = core.sigmas_to_ve(sigmas, kind)
    ref = distillpp.sample(student_ve, initial_sample(noise, sigmas_ve, "flow" if kind == "flow" else "vp"),
                           sigmas_ve, sampler=sampler, teacher=teacher_ve, guidance=g,
                           generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    unguided = core.run_sampler(sampler, core.VEDenoiser(native_s, kind), x, sigmas, kind,
                                generator=torch.Generator().manual_seed(2))
    assert (out - unguided).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["ve", "flow"])
def test_step_guide_fuses_once_per_guided_grid_sigma(sd, kind):
    student_ve, teacher_ve = _mixture_pair()
    sigmas = core.preset_sigmas("lightning", 4, sd) if kind == "ve" else core.preset_sigmas("flux-schnell", 4)
    sigmas_ve = core.sigmas_to_ve(sigmas, kind)
    g = distillpp.TeacherGuidance(strength=0.5, guided_steps=2, noise="deterministic")
    guide = core.StepGuide(g, teacher_ve, sigmas, kind)
    ref = g.bind(teacher_ve, sigmas_ve)
    x_ve = initial_sample(torch.randn(8, 2, generator=torch.Generator().manual_seed(3)), sigmas_ve,
                          "flow" if kind == "flow" else "vp")
    for i in range(len(sigmas) - 1):
        s = sigmas[i].expand(8)
        x = core.x_from_ve(x_ve, sigmas_ve[i].expand(8), kind)
        x0_s = student_ve(x_ve, sigmas_ve[i].expand(8))
        fused = guide(x, s, x0_s)
        expected, _ = ref(i, x_ve, x0_s)
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
        assert (i < 2) == (not torch.equal(fused, x0_s))
        assert torch.equal(guide(x, s, x0_s), x0_s)  # a second call at the same sigma is not guided
        x_ve = x0_s + sigmas_ve[i + 1] * (x_ve - x0_s) / sigmas_ve[i]
    assert core.step_index(0.123, [1.0, 0.5, 0.0]) is None and core.step_index(0.5, [1.0, 0.5, 0.0]) == 1
    assert not math.isnan(float(sigmas_ve[0]))


def test_step_guide_reports_a_non_finite_teacher_after_the_run():
    sigmas = core.preset_sigmas("flux-schnell", 4)
    guide = core.StepGuide(distillpp.TeacherGuidance(strength=0.5, guided_steps=1), lambda x, s: x * float("nan"),
                           sigmas, "flow")
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    guide(x, sigmas[0].expand(2), torch.zeros(2, 3))
    with pytest.raises(distillpp.NonFiniteError, match="teacher"):
        guide.finish()
