"""With no teacher, each pure sampler reproduces the matching diffusers scheduler loop.

Both sides run the same tiny seeded random network on the same starting sample and, for
stochastic samplers, the same CPU generator seed. The reference is diffusers' own loop:

    for t in scheduler.timesteps:
        out = net(scheduler.scale_model_input(latents, t), t).sample
        latents = scheduler.step(out, t, latents, generator=g).prev_sample

Our side is ``distillpp.sample`` over ``sigmas_from_scheduler`` with a denoiser wrapper. Outputs
are O(1), so max |diff| <= 1e-5 in float32 means "equal up to rounding".
dpmpp_2s_ancestral has no diffusers twin; it is checked for second-order convergence instead.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
    UNet2DModel,
)

import distillpp
from distillpp import schedules
from distillpp.analytic import GaussianMixture, GaussianMixtureDenoiser

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ATOL = 1e-5


def tiny_unet(seed: int) -> UNet2DModel:
    """diffusers' ``get_dummy_components`` recipe for a UNet2DModel, seeded."""
    torch.manual_seed(seed)
    return UNet2DModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


class TinyEpsNet(torch.nn.Module):
    """A random UNet added to the exact eps-prediction for unit-Gaussian data, ``sqrt(1 - abar_t) z``.

    With the random UNet alone, ``x0 = x - sigma * eps`` is 50x larger than data and an absolute
    tolerance would only test the last few bits; this keeps samples O(1). Same call convention as
    a diffusers UNet, so ``distillpp.unet_fn`` and the reference loop use it alike.
    """

    def __init__(self, unet: UNet2DModel, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.abar = alphas_cumprod.double().numpy()

    def forward(self, sample, timestep, return_dict=True):
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).numpy()
        abar = torch.from_numpy(np.interp(t, np.arange(len(self.abar)), self.abar)).float()
        out = (1 - abar).sqrt().reshape(-1, 1, 1, 1) * sample + self.unet(sample, timestep).sample
        return SimpleNamespace(sample=out) if return_dict else (out,)


@pytest.fixture(scope="module")
def sd():
    return schedules.DiscreteVPSchedule.from_betas(**SD)


@pytest.fixture(scope="module")
def net(sd):
    return TinyEpsNet(tiny_unet(0), sd.alphas_cumprod)


@pytest.fixture(scope="module")
def velocity_net():
    return tiny_unet(1)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1234))


def generator(seed):
    return None if seed is None else torch.Generator().manual_seed(seed)


@torch.no_grad()
def diffusers_loop(scheduler, net, latents, seed=None, **step_kwargs):
    g = generator(seed)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        out = net(inp, t).sample
        latents = scheduler.step(out, t, latents, generator=g, **step_kwargs).prev_sample
    return latents


def ours(denoiser, x, sigmas, sampler, seed=None, **kwargs):
    return distillpp.sample(denoiser, x, sigmas, sampler=sampler, generator=generator(seed), **kwargs)


def assert_same(ours_out, ref, atol=ATOL):
    assert ours_out.shape == ref.shape
    diff = (ours_out - ref).abs().max().item()
    assert diff <= atol, f"max |ours - diffusers| = {diff:.3g} > {atol:g} (|ref| max {ref.abs().max():.3g})"
    # Sanity: the comparison is not between two trivially tiny tensors.
    assert ref.abs().max() > 0.5


# --- Euler / Euler ancestral -------------------------------------------------------------------

EULER = [
    ("trailing", 0, 4, "epsilon"),
    ("leading", 1, 4, "epsilon"),
    ("leading", 1, 8, "epsilon"),
    ("trailing", 0, 4, "v_prediction"),
    ("leading", 1, 4, "v_prediction"),
]
EULER_IDS = [f"{s}-{n}-{p}" for s, _, n, p in EULER]


@pytest.mark.parametrize("spacing,offset,n,prediction", EULER, ids=EULER_IDS)
def test_euler_equals_diffusers(sd, net, noise, spacing, offset, n, prediction):
    scheduler = EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=offset,
                                       prediction_type=prediction)
    scheduler.set_timesteps(n)
    x = noise * scheduler.init_noise_sigma  # sigma_max (trailing) or sqrt(sigma_max^2 + 1) (leading)
    sigmas = schedules.sigmas_from_scheduler(scheduler, n)
    denoiser = distillpp.DiscreteVPDenoiser(distillpp.unet_fn(net), sd, prediction_type=prediction)
    assert_same(ours(denoiser, x, sigmas, "euler"), diffusers_loop(scheduler, net, x))


def test_euler_karras_equals_diffusers_with_interpolated_timesteps(sd, net, noise):
    # Karras sigmas fall between training timesteps; diffusers feeds the net fractional t.
    scheduler = EulerDiscreteScheduler(**SD, use_karras_sigmas=True)
    scheduler.set_timesteps(8)
    x = noise * scheduler.init_noise_sigma
    sigmas = schedules.sigmas_from_scheduler(scheduler, 8)
    denoiser = distillpp.DiscreteVPDenoiser(distillpp.unet_fn(net), sd, quantize=False)
    assert_same(ours(denoiser, x, sigmas, "euler"), diffusers_loop(scheduler, net, x))


def test_euler_linspace_is_close_to_diffusers(sd, net, noise):
    # Known, small discrepancy: diffusers' "linspace" grid sits at fractional timesteps and it feeds
    # the net those t directly, with sigma linear in t. Our denoiser recovers t from sigma by
    # log-sigma interpolation (as diffusers' own Karras path does), which differs by < 1e-3 in t.
    scheduler = EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    scheduler.set_timesteps(8)
    x = noise * scheduler.init_noise_sigma
    sigmas = schedules.sigmas_from_scheduler(scheduler, 8)
    denoiser = distillpp.DiscreteVPDenoiser(distillpp.unet_fn(net), sd, quantize=False)
    assert_same(ours(denoiser, x, sigmas, "euler"), diffusers_loop(scheduler, net, x), atol=1e-4)


@pytest.mark.parametrize("spacing,offset,n,prediction", EULER[:2] + EULER[3:4], ids=EULER_IDS[:2] + EULER_IDS[3:4])
def test_euler_ancestral_equals_diffusers(sd, net, noise, spacing, offset, n, prediction):
    scheduler = EulerAncestralDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=offset,
                                                prediction_type=prediction)
    scheduler.set_timesteps(n)
    x = noise * scheduler.init_noise_sigma
    sigmas = schedules.sigmas_from_scheduler(scheduler, n)
    denoiser = distillpp.DiscreteVPDenoiser(distillpp.unet_fn(net), sd, prediction_type=prediction)
    out = ours(denoiser, x, sigmas, "euler_ancestral", seed=7)
    assert_same(out, diffusers_loop(scheduler, net, x, seed=7))
    # The noise matters: another seed gives another sample.
    assert (out - ours(denoiser, x, sigmas, "euler_ancestral", seed=8)).abs().max() > 1e-2


# --- DDIM -----------------------------------------------------------------------------------------

DDIM = [
    ("leading", 1, 4, 0.0, "epsilon"),
    ("leading", 1, 4, 0.5, "epsilon"),
    ("trailing", 0, 4, 0.0, "epsilon"),
    ("trailing", 0, 4, 0.5, "epsilon"),
    ("leading", 1, 8, 1.0, "epsilon"),
    ("trailing", 0, 5, 0.5, "v_prediction"),
]


@pytest.mark.parametrize("spacing,offset,n,eta,prediction", DDIM,
                         ids=[f"{s}-{n}-eta{e}-{p}" for s, _, n, e, p in DDIM])
def test_ddim_equals_diffusers(sd, net, noise, spacing, offset, n, eta, prediction):
    scheduler = DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=offset, prediction_type=prediction,
                              set_alpha_to_one=True, clip_sample=False)
    scheduler.set_timesteps(n)
    sigmas = schedules.sigmas_from_scheduler(scheduler, n)
    # diffusers' DDIM sample is VP (z = noise); ours is VE, x = z * sqrt(1 + sigma_0^2).
    x = schedules.initial_sample(noise, sigmas, "vp")
    denoiser = distillpp.DiscreteVPDenoiser(distillpp.unet_fn(net), sd, prediction_type=prediction)
    seed = 11 if eta else None
    out = ours(denoiser, x, sigmas, "ddim", seed=seed, eta=eta)
    # set_alpha_to_one=True: the last step lands on abar = 1, where VP and VE samples coincide.
    assert_same(out, diffusers_loop(scheduler, net, noise, seed=seed, eta=eta))


# --- Multistep consistency (LCM, DMD2) -------------------------------------------------------------

@pytest.mark.parametrize("timesteps", [None, [999, 749, 499, 249]], ids=["lcm-4", "dmd2-999-749-499-249"])
def test_consistency_equals_lcm_scheduler(sd, net, noise, timesteps):
    scheduler = LCMScheduler(**SD)
    if timesteps is None:
        scheduler.set_timesteps(4)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    sigmas = schedules.sigmas_from_scheduler(scheduler, 4, timesteps=timesteps)
    x = schedules.initial_sample(noise, sigmas, "vp")
    denoiser = distillpp.LCMDenoiser(distillpp.unet_fn(net), sd)
    # LCM's last step returns its boundary-condition x0 in both, so the outputs compare directly.
    assert_same(ours(denoiser, x, sigmas, "consistency", seed=5), diffusers_loop(scheduler, net, noise, seed=5))


# --- TCD (strategic stochastic sampling) ---------------------------------------------------------

TCD = [(4, 0.3, "epsilon", False), (4, 0.0, "epsilon", False), (8, 1.0, "epsilon", False),
       (4, 0.3, "v_prediction", False), (4, 0.3, "epsilon", True), (2, 0.3, "epsilon", False)]


@pytest.mark.parametrize("n,gamma,prediction,passed", TCD,
                         ids=[f"{n}-gamma{g}-{p}{'-orig-passed' if o else ''}" for n, g, p, o in TCD])
def test_tcd_equals_tcd_scheduler(sd, net, noise, n, gamma, prediction, passed):
    scheduler = TCDScheduler(**SD, prediction_type=prediction)
    scheduler.set_timesteps(n, original_inference_steps=50 if passed else None)
    sigmas = schedules.tcd_sigmas(sd, n, original_inference_steps=50, original_steps_passed=passed)
    abar = scheduler.alphas_cumprod[scheduler.timesteps].double()
    torch.testing.assert_close(sigmas[:-1].double(), ((1 - abar) / abar).sqrt(), rtol=1e-5, atol=0)
    assert sigmas[-1] == 0
    x = schedules.initial_sample(noise, sigmas, "vp")
    denoiser = distillpp.DiscreteVPDenoiser(distillpp.unet_fn(net), sd, prediction_type=prediction)
    # The schedule comes from the denoiser's declared one; TCD's last step ends at t = 0 in VP scaling.
    out = ours(denoiser, x, sigmas, "tcd", seed=3, gamma=gamma)
    assert_same(out, diffusers_loop(scheduler, net, noise, seed=3, eta=gamma))
    if gamma > 0 and n > 1:
        assert (out - ours(denoiser, x, sigmas, "tcd", seed=4, gamma=gamma)).abs().max() > 1e-2


def test_tcd_guided_strength_zero_is_bit_identical_and_guidance_moves_it(sd, net, noise):
    sigmas = schedules.tcd_sigmas(sd, 4)
    x = schedules.initial_sample(noise, sigmas, "vp")
    student = distillpp.DiscreteVPDenoiser(distillpp.unet_fn(net), sd)
    teacher = distillpp.DiscreteVPDenoiser(lambda z, t: 0.9 * net(z, t).sample, sd)
    plain = ours(student, x, sigmas, "tcd", seed=3)
    for space in ("x0", "eps"):
        g0 = distillpp.TeacherGuidance(strength=0.0, guided_steps=2, space=space)
        assert torch.equal(plain, ours(student, x, sigmas, "tcd", seed=3, teacher=teacher, guidance=g0))
        g = distillpp.TeacherGuidance(strength=0.5, guided_steps=2, space=space, renoise="random")
        guided = ours(student, x, sigmas, "tcd", seed=3, teacher=teacher, guidance=g)
        assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-3


# --- Rectified flow -------------------------------------------------------------------------------

@pytest.mark.parametrize("shift,n", [(3.0, 4), (3.0, 8), (1.0, 4)], ids=["sd3-4", "sd3-8", "schnell-4"])
def test_flow_euler_equals_flow_match_scheduler(velocity_net, noise, shift, n):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(n)
    sigmas = schedules.sigmas_from_scheduler(scheduler, n)
    x = schedules.initial_sample(noise, sigmas, "flow")  # flow time 1: x_fm = noise
    denoiser = distillpp.FlowDenoiser(distillpp.unet_fn(velocity_net), timestep_scale=1000.0)
    # The last flow step lands on flow time 0, where x_fm equals the VE sample.
    assert_same(ours(denoiser, x, sigmas, "euler"), diffusers_loop(scheduler, velocity_net, noise))


# --- DPM++ 2S ancestral: no diffusers twin, so check its order on an exact denoiser -----------------

def test_dpmpp_2s_is_second_order_and_euler_first_order():
    mixture = GaussianMixture.ring(k=8, radius=2.0, std=0.3)
    denoiser = GaussianMixtureDenoiser(mixture)
    sigma_min, sigma_max = 0.01, 20.0
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma_max

    def solve(sampler, n):
        grid = schedules.karras_sigmas(sigma_min, sigma_max, n)
        knobs = {"eta": 0.0} if sampler == "dpmpp_2s_ancestral" else {}
        return distillpp.sample(denoiser, x, grid, sampler=sampler, **knobs)

    reference = solve("dpmpp_2s_ancestral", 400)

    def ratios(sampler):
        errors = [(solve(sampler, n) - reference).norm(dim=1).mean().item() for n in (8, 16, 32)]
        return [a / b for a, b in zip(errors, errors[1:])]

    for r in ratios("dpmpp_2s_ancestral"):
        assert 3.0 < r < 5.0, r  # error / 4 per halved step: second order
    for r in ratios("euler"):
        assert 1.6 < r < 2.6, r  # error / 2 per halved step: first order



# --- The network sees diffusers' timesteps, whatever the sample's dtype ----------------------------

TIMESTEP_CASES = {
    "dmd2": (lambda: LCMScheduler(**SD), dict(timesteps=[999, 749, 499, 249]), "consistency"),
    "lcm-4": (lambda: LCMScheduler(**SD), dict(num_inference_steps=4), "consistency"),
    "euler-trailing-4": (lambda: EulerDiscreteScheduler(**SD, timestep_spacing="trailing"),
                         dict(num_inference_steps=4), "euler"),
    "ddim-leading-25": (lambda: DDIMScheduler(**SD, steps_offset=1), dict(num_inference_steps=25), "ddim"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", list(TIMESTEP_CASES))
def test_network_sees_the_scheduler_timesteps(sd, dtype, case):
    # bf16 cannot hold sigma_749 apart from sigma_750: the timestep must come from the float32 grid.
    make, set_kwargs, sampler = TIMESTEP_CASES[case]
    scheduler = make()
    scheduler.set_timesteps(**set_kwargs)
    n = len(scheduler.timesteps)
    sigmas = schedules.sigmas_from_scheduler(scheduler, n, timesteps=set_kwargs.get("timesteps"))
    seen = []

    def record(z, t):
        seen.append(t)
        return torch.zeros_like(z)

    denoiser_class = distillpp.LCMDenoiser if sampler == "consistency" else distillpp.DiscreteVPDenoiser
    x = schedules.initial_sample(torch.randn(2, 4, 2, 2), sigmas, "vp").to(dtype)
    out = ours(denoiser_class(record, sd), x, sigmas, sampler, seed=0)
    assert out.dtype == dtype
    expected = scheduler.timesteps.float()[:, None].expand(n, 2)
    torch.testing.assert_close(torch.stack(seen), expected, rtol=0, atol=0)
