"""Our explicit sigma grids equal what diffusers' scheduler objects compute for the same config.

Every expected value here comes from a diffusers scheduler built for the case, never from our
own code. Grids are float32 like diffusers'; the tolerance is rtol 1e-5.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from distillpp import schedules
from distillpp.schedules import DiscreteVPSchedule

# Stable Diffusion's (and SDXL's, LCM's, DMD2's) training noise table.
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
RTOL = 1e-5


def assert_grid(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.to(torch.float32), rtol=RTOL, atol=0.0)


def vp_sigmas_at(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """sigma_t of the scheduler's own ``alphas_cumprod`` at its timesteps, then the final 0."""
    a = scheduler.alphas_cumprod[timesteps.long()].double()
    return torch.cat([((1 - a) / a).sqrt(), torch.zeros(1, dtype=torch.float64)]).float()


@pytest.fixture(scope="module")
def sd() -> DiscreteVPSchedule:
    return DiscreteVPSchedule.from_betas(**SD)


@pytest.mark.parametrize(
    "config",
    [SD, dict(beta_schedule="linear"), dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000)],
    ids=["scaled_linear", "linear", "squaredcos_cap_v2"],
)
def test_alphas_cumprod_equal_diffusers(config):
    scheduler = DDIMScheduler(**config)
    ours = DiscreteVPSchedule.from_config(scheduler.config).alphas_cumprod
    torch.testing.assert_close(ours, scheduler.alphas_cumprod, rtol=0, atol=0)


# --- Euler / Euler ancestral ------------------------------------------------------------------

EULER_SPACINGS = [("leading", 1), ("trailing", 0), ("linspace", 0)]


@pytest.mark.parametrize("spacing,offset", EULER_SPACINGS, ids=[s for s, _ in EULER_SPACINGS])
@pytest.mark.parametrize("n", [1, 3, 4, 8, 25, 50])
def test_euler_sigmas(sd, spacing, offset, n):
    scheduler = EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(n)
    assert_grid(schedules.euler_sigmas(sd, n, spacing, offset), scheduler.sigmas)


@pytest.mark.parametrize("spacing,offset", [("trailing", 0), ("leading", 1)], ids=["trailing", "leading"])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 30])
def test_euler_ancestral_sigmas(sd, spacing, offset, n):
    scheduler = EulerAncestralDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(n)
    assert_grid(schedules.euler_sigmas(sd, n, spacing, offset), scheduler.sigmas)


@pytest.mark.parametrize("spacing,offset", EULER_SPACINGS, ids=[s for s, _ in EULER_SPACINGS])
@pytest.mark.parametrize("n", [2, 4, 10, 25])
def test_euler_karras_sigmas(sd, spacing, offset, n):
    scheduler = EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=True)
    scheduler.set_timesteps(n)
    ours = schedules.euler_sigmas(sd, n, spacing, offset, use_karras_sigmas=True)
    assert_grid(ours, scheduler.sigmas)


@pytest.mark.parametrize("sigma_min,sigma_max,n", [(0.1, 10.0, 5), (0.002, 80.0, 18), (0.0292, 14.61, 1)])
def test_karras_sigmas(sigma_min, sigma_max, n):
    # diffusers' Euler builds exactly this grid when its config fixes the Karras range.
    scheduler = EulerDiscreteScheduler(**SD, use_karras_sigmas=True, sigma_min=sigma_min, sigma_max=sigma_max)
    scheduler.set_timesteps(n)
    assert_grid(schedules.karras_sigmas(sigma_min, sigma_max, n), scheduler.sigmas)


# --- DDIM ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0)],
                         ids=["leading+1", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 3, 4, 10, 25, 50])
def test_ddim_sigmas(sd, spacing, offset, n):
    scheduler = DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=True)
    scheduler.set_timesteps(n)
    assert_grid(schedules.ddim_sigmas(sd, n, spacing, offset), vp_sigmas_at(scheduler, scheduler.timesteps))


# --- LCM and explicit timesteps (DMD2) -----------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("original", [50, 100])
def test_lcm_sigmas(sd, n, original):
    scheduler = LCMScheduler(**SD, original_inference_steps=original)
    scheduler.set_timesteps(n)
    ours = schedules.lcm_sigmas(sd, n, original_inference_steps=original)
    assert_grid(ours, vp_sigmas_at(scheduler, scheduler.timesteps))
    # The timestep our denoiser feeds the network is the scheduler's own.
    torch.testing.assert_close(sd.sigma_to_t(ours[:-1]), scheduler.timesteps.float(), rtol=0, atol=0)


def test_dmd2_timestep_sigmas(sd):
    timesteps = [999, 749, 499, 249]
    scheduler = LCMScheduler(**SD)
    scheduler.set_timesteps(timesteps=timesteps)
    ref = vp_sigmas_at(scheduler, scheduler.timesteps)
    assert_grid(schedules.timestep_sigmas(sd, timesteps), ref)
    assert_grid(schedules.sigmas_from_scheduler(scheduler, 4, timesteps=timesteps), ref)
    torch.testing.assert_close(sd.sigma_to_t(ref[:-1]), torch.tensor(timesteps, dtype=torch.float32))


# --- Rectified flow -------------------------------------------------------------------------------

FLOW_CASES = {
    "flux-schnell": dict(shift=1.0),
    "sd3": dict(shift=3.0),
    "flux-dev": dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                     max_image_seq_len=4096),
    "linear-time-shift": dict(use_dynamic_shifting=True, time_shift_type="linear"),
    "shift-terminal": dict(shift=3.0, shift_terminal=0.1),
}


FLOW_PARAMS = [
    (case, n, seq_len)
    for case, config in FLOW_CASES.items()
    for n in [1, 4, 8, 28, 50]
    # one step with shift_terminal is 0/0 (NaN) in diffusers too
    if not (n == 1 and "shift_terminal" in config)
    # the resolution (token count) only matters with dynamic shifting
    for seq_len in ([256, 1024, 4096] if config.get("use_dynamic_shifting") else [1024])
]


@pytest.mark.parametrize("case,n,image_seq_len", FLOW_PARAMS)
def test_flow_sigmas(case, n, image_seq_len):
    config = FLOW_CASES[case]
    dynamic = config.get("use_dynamic_shifting", False)
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = schedules.flow_time_shift_mu(image_seq_len) if dynamic else None
    scheduler.set_timesteps(n, mu=mu)
    kwargs = dict(
        shift=config.get("shift", 1.0),
        use_dynamic_shifting=dynamic,
        mu=mu,
        time_shift_type=config.get("time_shift_type", "exponential"),
        shift_terminal=config.get("shift_terminal"),
    )
    assert_grid(schedules.flow_sigmas(n, return_flow_times=True, **kwargs), scheduler.sigmas)
    # The VE grid maps back to the same flow times (flow time 1 is FLOW_SIGMA_MAX).
    ve = schedules.flow_sigmas(n, **kwargs)
    assert_grid(schedules.sigma_to_flow_time(ve.double()).float(), scheduler.sigmas)
    assert_grid(schedules.sigmas_from_scheduler(scheduler, n, mu=mu), ve)


@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096, 6144])
def test_flow_time_shift_mu_equals_flux_calculate_shift(image_seq_len):
    ref = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    assert schedules.flow_time_shift_mu(image_seq_len) == pytest.approx(ref, rel=1e-12)


# --- sigmas_from_scheduler dispatch -----------------------------------------------------------------

@pytest.mark.parametrize(
    "scheduler,n,reference",
    [
        (EulerDiscreteScheduler(**SD, timestep_spacing="leading", steps_offset=1), 30, "sigmas"),
        (EulerDiscreteScheduler(**SD, timestep_spacing="trailing"), 4, "sigmas"),
        (EulerDiscreteScheduler(**SD), 20, "sigmas"),
        (EulerDiscreteScheduler(**SD, use_karras_sigmas=True), 25, "sigmas"),
        (EulerAncestralDiscreteScheduler(**SD, timestep_spacing="trailing"), 4, "sigmas"),
        (DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=True), 50, "timesteps"),
        (DDIMScheduler(**SD, timestep_spacing="trailing", set_alpha_to_one=True), 4, "timesteps"),
        (LCMScheduler(**SD), 4, "timesteps"),
        (LCMScheduler(**SD), 8, "timesteps"),
        (FlowMatchEulerDiscreteScheduler(shift=3.0), 28, "flow"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, (int, str)) else str(v),
)
def test_sigmas_from_scheduler(scheduler, n, reference):
    scheduler.set_timesteps(n)
    ours = schedules.sigmas_from_scheduler(scheduler, n)
    if reference == "sigmas":
        ref = scheduler.sigmas
    elif reference == "timesteps":
        ref = vp_sigmas_at(scheduler, scheduler.timesteps)
    else:
        ref = schedules.flow_time_to_sigma(scheduler.sigmas.double()).float()
        ours, ref = schedules.sigma_to_flow_time(ours.double()).float(), scheduler.sigmas
    assert_grid(ours, ref)


def test_sigmas_from_scheduler_dispatches_to_the_matching_constructor(sd):
    euler = EulerDiscreteScheduler(**SD, timestep_spacing="trailing")
    assert torch.equal(schedules.sigmas_from_scheduler(euler, 4), schedules.euler_sigmas(sd, 4, "trailing"))
    ddim = DDIMScheduler(**SD, steps_offset=1)
    assert torch.equal(schedules.sigmas_from_scheduler(ddim, 25), schedules.ddim_sigmas(sd, 25, "leading", 1))
    lcm = LCMScheduler(**SD)
    assert torch.equal(schedules.sigmas_from_scheduler(lcm, 4), schedules.lcm_sigmas(sd, 4))
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert torch.equal(schedules.sigmas_from_scheduler(flow, 4), schedules.flow_sigmas(4, shift=3.0))


@pytest.mark.parametrize(
    "scheduler,match",
    [
        (DPMSolverMultistepScheduler(**SD), "not supported"),
        (EulerDiscreteScheduler(**SD, use_exponential_sigmas=True), "use_exponential_sigmas"),
        (EulerDiscreteScheduler(**SD, interpolation_type="log_linear"), "interpolation_type"),
        (EulerDiscreteScheduler(**SD, use_karras_sigmas=True, sigma_min=0.1), "sigma_min"),
        (DDIMScheduler(**SD, rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
        (FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), "use_karras_sigmas"),
        (FlowMatchEulerDiscreteScheduler(invert_sigmas=True), "invert_sigmas"),
    ],
    ids=["dpmsolver", "exponential", "log_linear", "karras-range", "zero-snr", "flow-karras", "flow-invert"],
)
def test_sigmas_from_scheduler_refuses_grids_it_would_not_reproduce(scheduler, match):
    with pytest.raises(ValueError, match=match):
        schedules.sigmas_from_scheduler(scheduler, 4)


# --- sigma -> timestep -----------------------------------------------------------------------------

def test_sigma_to_t_quantized_round_trip(sd):
    t = torch.arange(sd.num_train_timesteps)
    sigmas = sd.sigmas.float()  # float32 like every grid
    assert torch.equal(sd.sigma_to_t(sigmas, quantize=True), t.float())
    # Off-grid sigmas go to the nearest timestep in log-sigma.
    between = (sigmas[:-1].double().log() * 0.9 + sigmas[1:].double().log() * 0.1).exp().float()
    assert torch.equal(sd.sigma_to_t(between, quantize=True), t[:-1].float())


@pytest.mark.parametrize("n", [4, 25, 50])
def test_sigma_to_t_interpolated_equals_diffusers_karras_timesteps(sd, n):
    scheduler = EulerDiscreteScheduler(**SD, use_karras_sigmas=True)
    scheduler.set_timesteps(n)  # its timesteps come from diffusers' _sigma_to_t
    ours = sd.sigma_to_t(scheduler.sigmas[:-1], quantize=False)
    torch.testing.assert_close(ours, scheduler.timesteps, rtol=RTOL, atol=1e-4)


def test_sigma_to_t_interpolated_equals_diffusers_sigma_to_t(sd):
    scheduler = EulerDiscreteScheduler(**SD)
    log_sigmas = np.log(sd.sigmas.float().numpy())
    sigmas = torch.logspace(-2.5, 1.5, 97, dtype=torch.float32)  # also outside [sigma_min, sigma_max]
    ref = np.array([scheduler._sigma_to_t(s, log_sigmas) for s in sigmas.numpy()], dtype=np.float32)
    ours = sd.sigma_to_t(sigmas, quantize=False)
    torch.testing.assert_close(ours, torch.from_numpy(ref), rtol=RTOL, atol=1e-4)
