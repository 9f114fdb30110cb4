"""FLUX and SD3 students guided by flow teachers, on tiny random models built from configs.

The models follow diffusers' own ``get_dummy_components``; the tokenizers are built in memory
(no downloads). Invariants: our grids equal the diffusers scheduler's, ``strength=0`` equals the
student's own diffusers pipeline, the FLUX-dev guidance embedding reaches the teacher only.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

import distillpp  # noqa: E402
from distillpp.pipelines import MissingWeightsError, from_preset, get_preset, list_presets  # noqa: E402
from family_contract import FamilyContract  # noqa: E402
from tiny import clip_config, clip_tokenizer, t5_encoder, t5_tokenizer  # noqa: E402
from tiny import flow_vae as vae  # noqa: E402

from distillpp.pipelines.flow import (  # noqa: E402
    FlowDistillppPipeline,
    FluxFamily,
    check_flow_pair,
    flux_sigmas,
    sd3_sigmas,
)

PROMPT = "a painting of a squirrel eating a burger"
SIZE = dict(height=16, width=16, max_sequence_length=16)

# Scheduler configs of the real models as we know them (scheduler/scheduler_config.json on the Hub: schnell
# static shift 1, dev dynamic shifting, SD3.5 static shift 3); not fetched here.
SCHNELL = dict(shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
               max_image_seq_len=4096)
DEV = dict(SCHNELL, shift=3.0, use_dynamic_shifting=True)
SD35 = dict(shift=3.0)


# ---------------------------------------------------------------------------------------------------
# Tiny components


def flux_transformer(seed: int = 0, guidance_embeds: bool = False, **overrides) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    config = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                  guidance_embeds=guidance_embeds)
    return FluxTransformer2DModel(**{**config, **overrides}).eval()


def sd3_transformer(seed: int = 0, **overrides) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    config = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                  num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
                  out_channels=4)
    return SD3Transformer2DModel(**{**config, **overrides}).eval()


def flux_pipe(scheduler: dict = SCHNELL, guidance_embeds: bool = False) -> FluxPipeline:
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(clip_config()).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**scheduler), vae=vae(1),
                        text_encoder=text_encoder, tokenizer=clip_tokenizer(), text_encoder_2=t5_encoder(),
                        tokenizer_2=t5_tokenizer(), transformer=flux_transformer(0, guidance_embeds))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipe() -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    te = CLIPTextModelWithProjection(clip_config()).eval()
    torch.manual_seed(1)
    te2 = CLIPTextModelWithProjection(clip_config()).eval()
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SD35), vae=vae(4), text_encoder=te, tokenizer=clip_tokenizer(),
        text_encoder_2=te2, tokenizer_2=clip_tokenizer(), text_encoder_3=t5_encoder(), tokenizer_3=t5_tokenizer(),
        transformer=sd3_transformer(0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spy(model: torch.nn.Module) -> list[dict]:
    """Record the keyword arguments of every forward of ``model``."""
    calls: list[dict] = []
    forward = model.forward

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return forward(*args, **kwargs)

    model.forward = recording
    return calls


@pytest.fixture(scope="module")
def flux():
    """A schnell-like student pipeline (static shift 1, no guidance embedding) and a dev-like teacher."""
    return flux_pipe(), flux_transformer(1, guidance_embeds=True)


@pytest.fixture(scope="module")
def sd3():
    return sd3_pipe(), sd3_transformer(1)


# ---------------------------------------------------------------------------------------------------
# The invariants every family keeps


def _guided_and_reference(pipe, teacher):
    """The family contract's pair: our guided pipeline over ``pipe`` and diffusers' own 4-step call."""

    def reference(prompts, generator, **kw):
        return pipe(prompts, num_inference_steps=4, guidance_scale=0.0, generator=generator, **kw).images

    return FlowDistillppPipeline(pipe, teacher), reference


class TestFluxContract(FamilyContract):
    CALL = dict(SIZE, output_type="latent")

    def make(self):
        return _guided_and_reference(flux_pipe(), flux_transformer(1, guidance_embeds=True))


class TestSD3Contract(FamilyContract):
    CALL = dict(SIZE, output_type="latent")

    def make(self):
        return _guided_and_reference(sd3_pipe(), sd3_transformer(1))


# ---------------------------------------------------------------------------------------------------
# Sigma grids


@pytest.mark.parametrize(
    "config", [SCHNELL, DEV, dict(DEV, time_shift_type="linear"), dict(SCHNELL, shift_terminal=0.1)],
    ids=["schnell", "dev", "dev-linear", "terminal"],
)
@pytest.mark.parametrize("n", [1, 4, 28])
@pytest.mark.parametrize("seq_len", [64, 4096])
def test_flux_sigmas_equal_diffusers(config, n, seq_len):
    if config.get("shift_terminal") and n == 1:  # diffusers divides 0 by 0 here
        with pytest.raises(ValueError, match="shift_terminal"):
            flux_sigmas(n, config, seq_len)
        return
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    # What FluxPipeline does: explicit flow times, mu from the packed token count.
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    ours = flux_sigmas(n, scheduler.config, seq_len)
    s = (ours.double() / (1 + ours.double())).float()
    torch.testing.assert_close(s, scheduler.sigmas, rtol=1e-6, atol=0)
    assert ours[0] == distillpp.schedules.FLOW_SIGMA_MAX and ours[-1] == 0


@pytest.mark.parametrize("config", [SD35, dict(SD35, use_dynamic_shifting=True, max_shift=1.16)],
                         ids=["sd35", "dynamic"])
@pytest.mark.parametrize("n", [4, 28])
def test_sd3_sigmas_equal_diffusers(config, n):
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    seq_len = 4096
    kwargs = {"mu": calculate_shift(seq_len, 256, 4096, 0.5, 1.16)} if config.get("use_dynamic_shifting") else {}
    scheduler.set_timesteps(n, **kwargs)
    ours = sd3_sigmas(n, scheduler.config, seq_len)
    s = (ours.double() / (1 + ours.double())).float()
    torch.testing.assert_close(s, scheduler.sigmas, rtol=1e-6, atol=0)


def test_unsupported_scheduler_options_raise():
    with pytest.raises(ValueError, match="stochastic_sampling"):
        flux_sigmas(4, dict(SCHNELL, stochastic_sampling=True), 64)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        sd3_sigmas(4, dict(SD35, use_karras_sigmas=True), 64)


# ---------------------------------------------------------------------------------------------------
# strength 0 equals the student's own diffusers pipeline


@pytest.mark.parametrize("output_type", ["latent", "np"])
def test_flux_strength0_equals_flux_pipeline(flux, output_type):
    pipe, teacher = flux
    ref = pipe([PROMPT, "a cat"], num_inference_steps=4, guidance_scale=0.0, generator=gen(),
               output_type=output_type, num_images_per_prompt=2, **SIZE).images
    guided = FlowDistillppPipeline(pipe, teacher)
    calls = spy(teacher)
    try:
        out = guided([PROMPT, "a cat"], num_inference_steps=4, strength=0.0, generator=gen(),
                     output_type=output_type, num_images_per_prompt=2, **SIZE).images
    finally:
        del teacher.forward
    assert calls == []  # strength 0: the teacher is never built, let alone run
    assert out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4, rtol=0)


def test_given_latents_equal_drawn_ones(flux, sd3):
    for pipe, teacher in (flux, sd3):
        guided = FlowDistillppPipeline(pipe, teacher)
        if pipe is flux[0]:  # FLUX draws [B, C, H, W] noise, then packs 2x2 patches into tokens
            noise = pipe._pack_latents(torch.randn((1, 1, 16, 16), generator=gen(3)), 1, 1, 16, 16)
        else:
            noise = torch.randn((1, 4, 16, 16), generator=gen(3))
        a = guided(PROMPT, strength=0.3, latents=noise, generator=gen(), output_type="latent", **SIZE).images
        b = guided(PROMPT, strength=0.3, generator=gen(3), output_type="latent", **SIZE).images
        assert not torch.equal(a, b)  # the guidance draws differ (other generator) ...
        c = guided(PROMPT, strength=0.0, latents=noise, output_type="latent", **SIZE).images
        d = guided(PROMPT, strength=0.0, generator=gen(3), output_type="latent", **SIZE).images
        assert torch.equal(c, d)  # ... but the initial sample is the same
        with pytest.raises(ValueError, match="latents must have shape"):
            guided(PROMPT, latents=noise[..., :2], output_type="latent", **SIZE)


def test_flux_dev_alone_equals_flux_pipeline():
    """The teacher's adapter (dynamic shifting, guidance embedding) is exactly FLUX-dev's pipeline."""
    pipe = flux_pipe(DEV, guidance_embeds=True)
    ref = pipe(PROMPT, num_inference_steps=6, guidance_scale=3.5, generator=gen(), output_type="latent", **SIZE).images
    out = FlowDistillppPipeline(pipe, None, guidance_scale=3.5)(
        PROMPT, num_inference_steps=6, generator=gen(), output_type="latent", **SIZE).images
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("guidance_scale", [0.0, 5.0])
def test_sd3_strength0_equals_sd3_pipeline(sd3, guidance_scale):
    pipe, teacher = sd3
    ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=guidance_scale, negative_prompt="blurry", generator=gen(),
               output_type="np", **SIZE).images
    out = FlowDistillppPipeline(pipe, teacher)(
        PROMPT, num_inference_steps=4, guidance_scale=guidance_scale, negative_prompt="blurry", strength=0.0,
        generator=gen(), output_type="np", **SIZE).images
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Guidance


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_guidance_changes_output_and_is_reproducible(flux, sd3, family):
    pipe, teacher = flux if family == "flux" else sd3
    guided = FlowDistillppPipeline(pipe, teacher)

    def run(strength, seed=0, **kw):
        return guided(PROMPT, strength=strength, generator=gen(seed), output_type="latent", **SIZE, **kw).images

    plain = run(0.0)
    a, b = run(0.3), run(0.3)
    assert torch.equal(a, b)
    assert (a - plain).abs().max() > 1e-3
    assert not torch.equal(run(0.3, seed=1), a)
    # Two guided steps with two averaged draws, and the other renoise levels and noise directions, run too.
    assert not torch.equal(run(0.3, guided_steps=2, samples=2), a)
    for kw in (dict(renoise="same"), dict(renoise="random"), dict(noise="deterministic"), dict(noise="hybrid")):
        out = run(0.3, **kw)
        assert torch.isfinite(out).all() and not torch.equal(out, plain), kw


def test_flux_guidance_embedding_reaches_teacher_only(flux):
    pipe, teacher = flux
    s_calls, t_calls = spy(pipe.transformer), spy(teacher)
    try:
        guided = FlowDistillppPipeline(pipe, teacher)
        guided(PROMPT, strength=0.2, samples=2, generator=gen(), output_type="latent", **SIZE)
        assert len(s_calls) == 4 and len(t_calls) == 1
        assert all(c.get("guidance") is None for c in s_calls)
        g = t_calls[0]["guidance"]
        assert g.shape == (2,) and torch.all(g == 3.5)
        assert t_calls[0]["hidden_states"].shape[0] == 2  # two re-noise draws in one forward
        assert t_calls[0]["img_ids"].ndim == 2 and t_calls[0]["txt_ids"].ndim == 2  # never batched

        # Teacher true CFG against a negative prompt: one forward over [uncond, cond], own guidance value.
        s_calls.clear(), t_calls.clear()
        cfg = guided(PROMPT, strength=0.2, teacher_cfg=2.0, teacher_negative_prompt="blurry", teacher_guidance=5.0,
                     generator=gen(), output_type="latent", **SIZE).images
        assert len(t_calls) == 1 and t_calls[0]["hidden_states"].shape[0] == 2
        assert torch.all(t_calls[0]["guidance"] == 5.0)
        assert not torch.equal(t_calls[0]["encoder_hidden_states"][0], t_calls[0]["encoder_hidden_states"][1])
        assert all(c.get("guidance") is None for c in s_calls)
        plain = guided(PROMPT, strength=0.2, teacher_guidance=5.0, generator=gen(), output_type="latent", **SIZE).images
        assert not torch.equal(cfg, plain)
    finally:
        del pipe.transformer.forward, teacher.forward


def test_sd3_teacher_cfg_runs_teacher_only(sd3):
    pipe, teacher = sd3
    s_calls, t_calls = spy(pipe.transformer), spy(teacher)
    try:
        FlowDistillppPipeline(pipe, teacher)(PROMPT, strength=0.2, generator=gen(), output_type="latent", **SIZE)
        assert [c["hidden_states"].shape[0] for c in s_calls] == [1, 1, 1, 1]  # Turbo: no student CFG
        assert [c["hidden_states"].shape[0] for c in t_calls] == [2]  # teacher CFG 3.5: [uncond, cond]
    finally:
        del pipe.transformer.forward, teacher.forward


def test_teacher_offload_and_device_give_the_same_samples(flux):
    pipe, teacher = flux
    kw = dict(strength=0.3, output_type="latent", **SIZE)
    ref = FlowDistillppPipeline(pipe, teacher)(PROMPT, generator=gen(), **kw).images
    offloaded = FlowDistillppPipeline(pipe, teacher, teacher_offload="cpu")(PROMPT, generator=gen(), **kw).images
    placed = FlowDistillppPipeline(pipe, teacher, teacher_device="cpu")(PROMPT, generator=gen(), **kw).images
    assert torch.equal(ref, offloaded) and torch.equal(ref, placed)
    with pytest.raises(ValueError, match="teacher_offload"):
        FlowDistillppPipeline(pipe, teacher, teacher_offload="disk")


# ---------------------------------------------------------------------------------------------------
# Errors before sampling


def test_mismatched_pairs_raise_before_sampling(flux, sd3):
    fpipe, _ = flux
    spipe, steacher = sd3
    calls = spy(fpipe.transformer)
    try:
        with pytest.raises(ValueError, match=r"SD3Transformer2DModel \(sd3\).*FluxTransformer2DModel"):
            FlowDistillppPipeline(fpipe, steacher)
        with pytest.raises(ValueError, match="in_channels=8"):
            FlowDistillppPipeline(fpipe, flux_transformer(1, True, in_channels=8))
        with pytest.raises(ValueError, match="joint_attention_dim=64"):
            FlowDistillppPipeline(fpipe, flux_transformer(1, True, joint_attention_dim=64))
        with pytest.raises(ValueError, match="pooled_projection_dim=32"):
            FlowDistillppPipeline(spipe, sd3_transformer(1, pooled_projection_dim=32))
        with pytest.raises(ValueError, match="family"):
            check_flow_pair(fpipe.transformer, steacher)
        with pytest.raises(ValueError, match="FluxPipeline"):
            FluxFamily(spipe, None, {})
        assert calls == []
    finally:
        del fpipe.transformer.forward
    assert check_flow_pair(fpipe.transformer, flux_transformer(1, True)) == "flux"


def test_bad_arguments_raise_before_any_model_call(flux):
    pipe, teacher = flux
    guided = FlowDistillppPipeline(pipe, teacher)
    s_calls, t_calls = spy(pipe.transformer), spy(teacher)
    try:
        with pytest.raises(ValueError, match="space must be 'x0'"):
            guided(PROMPT, strength=0.1, space="eps", generator=gen(), output_type="latent", **SIZE)
        with pytest.raises(ValueError, match="steps must be in"):
            guided(PROMPT, strength=0.1, guided_steps=5, generator=gen(), output_type="latent", **SIZE)
        with pytest.raises(ValueError, match="strength"):
            guided(PROMPT, strength=1.5, output_type="latent", **SIZE)
        with pytest.raises(ValueError, match="height"):
            guided(PROMPT, height=15, width=16, output_type="latent")
        with pytest.raises(ValueError, match="generator"):
            guided(PROMPT, generator=[gen(), gen()], output_type="latent", **SIZE)
        with pytest.raises(ValueError, match="prompt_3"):
            guided(PROMPT, prompt_3="x", output_type="latent", **SIZE)
        with pytest.raises(ValueError, match="output_type"):
            guided(PROMPT, output_type="jpeg", **SIZE)
        assert s_calls == [] and t_calls == []
    finally:
        del pipe.transformer.forward, teacher.forward
    with pytest.raises(ValueError, match="guidance embedding"):
        FlowDistillppPipeline(pipe, teacher, teacher_guidance=None)


# ---------------------------------------------------------------------------------------------------
# Presets and loading


def test_presets_registered():
    assert "flux-schnell" in list_presets("flux") and "sd35-large-turbo" in list_presets("sd3")
    flux_p, sd3_p = get_preset("flux-schnell"), get_preset("sd35-large-turbo")
    assert (flux_p.base, flux_p.teacher) == ("black-forest-labs/FLUX.1-schnell", "black-forest-labs/FLUX.1-dev")
    assert (sd3_p.base, sd3_p.teacher) == ("stabilityai/stable-diffusion-3.5-large-turbo",
                                           "stabilityai/stable-diffusion-3.5-large")
    for p in (flux_p, sd3_p):
        assert p.num_inference_steps == 4 and p.guidance_scale == 0.0 and p.guidance.space == "x0"
        assert 0 < p.guidance.strength <= 0.1 and p.guidance.guided_steps == 1
    assert flux_p.extra["teacher_guidance"] == 3.5 and flux_p.guidance.teacher_cfg == 1.0
    assert 3.5 <= sd3_p.guidance.teacher_cfg <= 4.5


def test_from_preset_loads_local_folders(tmp_path, flux, sd3, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe, teacher = flux
    pipe.save_pretrained(tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher" / "transformer")
    sd3[1].save_pretrained(tmp_path / "sd3" / "transformer")

    guided = from_preset("flux-schnell", base=str(tmp_path / "student"), teacher=str(tmp_path / "teacher"))
    assert isinstance(guided, FlowDistillppPipeline) and guided.teacher_guidance == 3.5
    out = guided(PROMPT, strength=0.0, generator=gen(), output_type="latent", **SIZE).images
    ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=0.0, generator=gen(), output_type="latent", **SIZE).images
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)

    with pytest.raises(ValueError, match="SD3Transformer2DModel transformer"):
        from_preset("flux-schnell", base=str(tmp_path / "student"), teacher=str(tmp_path / "sd3"))
    with pytest.raises(MissingWeightsError, match="FLUX.1-dev"):
        from_preset("flux-schnell", base=str(tmp_path / "student"))  # not in the cache: no download tried
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="could not load preset"):
        from_preset("flux-schnell", base=str(tmp_path / "student"), teacher=str(tmp_path / "empty"))
