"""PixArt-alpha/Sigma students (a DiT with learned sigma and a T5 encoder) on tiny random models."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from diffusers import DDIMScheduler, LCMScheduler  # noqa: E402

from distillpp.pipelines import GuidedPipeline, get_preset, list_presets  # noqa: E402
from distillpp.pipelines.pixart import PixArtFamily  # noqa: E402

from family_contract import FamilyContract, gen  # noqa: E402
from tiny import pixart_pipe, pixart_transformer  # noqa: E402

BETAS = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
CALL = dict(height=16, width=16, output_type="latent", max_sequence_length=16)


def make(scheduler, sigma: bool = False, guidance_scale: float = 0.0):
    pipe = pixart_pipe(scheduler, sigma=sigma)
    guided = GuidedPipeline(PixArtFamily(pipe, pixart_transformer(1)), guidance_scale=guidance_scale)

    def reference(prompts, generator, **kw):
        return pipe(prompts, generator=generator, num_inference_steps=4, guidance_scale=guidance_scale,
                    use_resolution_binning=False, **kw).images

    return guided, reference


class TestPixArtLCM(FamilyContract):
    CALL = CALL

    def make(self):
        return make(LCMScheduler(**BETAS))


class TestPixArtSigmaDDIMWithCFG(FamilyContract):
    CALL = CALL

    def make(self):
        return make(DDIMScheduler(**BETAS, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True),
                    sigma=True, guidance_scale=3.0)


def test_pixart_presets_and_pair_checks():
    assert {"pixart-alpha-lcm", "pixart-alpha-dmd-512"} <= set(list_presets("pixart"))
    dmd = get_preset("pixart-alpha-dmd-512")
    assert dmd.timesteps == (400,) and dmd.num_inference_steps == 1 and dmd.guidance.space == "eps"
    pipe = pixart_pipe(LCMScheduler(**BETAS))
    with pytest.raises(ValueError, match="caption_channels"):
        GuidedPipeline(PixArtFamily(pipe, pixart_transformer(1, caption_channels=16)))
    with pytest.raises(ValueError, match="PixArtAlphaPipeline"):
        PixArtFamily(object(), None)


def test_one_step_dmd_grid_guides_its_only_step():
    """DMD-style one step at t=400: guiding it re-noises to the smallest positive sigma of the grid."""
    pipe = pixart_pipe(LCMScheduler(**BETAS))
    guided = GuidedPipeline(PixArtFamily(pipe, pixart_transformer(1)), preset=get_preset("pixart-alpha-dmd-512"),
                            guidance_scale=0.0)
    sigmas = guided.sigmas()
    assert len(sigmas) == 2 and sigmas[-1] == 0
    seen = []
    out = guided("a cat", generator=gen(), callback=seen.append, strength=0.5, **CALL).images
    ref = pipe("a cat", generator=gen(), num_inference_steps=1, timesteps=[400], guidance_scale=0.0,
               use_resolution_binning=False, **CALL).images
    plain = guided("a cat", generator=gen(), strength=0.0, **CALL).images
    torch.testing.assert_close(plain, ref, atol=1e-4, rtol=0)
    assert seen[0]["guidance"] is not None and float(seen[0]["guidance"].sigma_teacher[0]) == float(sigmas[0])
    assert (out - plain).abs().max() > 0
