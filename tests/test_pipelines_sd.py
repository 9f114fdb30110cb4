"""DistillppPipeline on tiny random SD1.5- and SDXL-shaped diffusers pipelines (CPU, no downloads).

The recipe follows diffusers' own ``get_dummy_components``: seeded tiny UNets, VAE and CLIP text
encoders built from configs; the CLIP tokenizer is built from a byte-level vocabulary written to a
temporary folder. Invariants over golden numbers: strength 0 equals the student's diffusers
pipeline; the teacher sees the LoRA switched off, the student sees it on; mismatched pairs fail
before sampling.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

import distillpp  # noqa: E402
from distillpp.pipelines import PRESETS, DistillppPipelineOutput, MissingWeightsError, from_preset, get_preset  # noqa: E402
from distillpp.pipelines.base import AdapterOffNet, lora_state  # noqa: E402
from distillpp.pipelines.sd import DistillppPipeline, SCHEDULER_SAMPLERS, student_scheduler  # noqa: E402

torch.set_num_threads(2)

SIZE = 32  # image side; the tiny VAE downsamples by 2 -> 16x16 latents
SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


# ------------------------------------------------------------------------------------------
# Tiny components.
# ------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizer")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = _bytes_to_unicode()
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return str(d)


def _text_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=1000, hidden_act="gelu", projection_dim=32,
    )


def tiny_unet(sdxl: bool, seed: int = 0, time_cond_proj_dim: int | None = None, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    kw = dict(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, cross_attention_dim=32, norm_num_groups=32, time_cond_proj_dim=time_cond_proj_dim,
    )
    if sdxl:
        kw.update(cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    kw.update(overrides)
    return UNet2DConditionModel(**kw).eval()


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    ).eval()


def tiny_pipe(tokenizer_dir: str, sdxl: bool, scheduler=None, unet=None):
    """A tiny random SD1.5-shaped or SDXL-shaped diffusers pipeline."""
    scheduler = scheduler or EulerDiscreteScheduler(**SCHED, timestep_spacing="trailing")
    unet = unet or tiny_unet(sdxl)
    torch.manual_seed(0)
    te = CLIPTextModel(_text_config()).eval()
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    if not sdxl:
        pipe = StableDiffusionPipeline(
            vae=tiny_vae(), text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler, safety_checker=None,
            feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        )
    else:
        torch.manual_seed(1)
        te2 = CLIPTextModelWithProjection(_text_config()).eval()
        pipe = StableDiffusionXLPipeline(
            vae=tiny_vae(), text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet,
            scheduler=scheduler, image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_tiny_lora(unet: UNet2DConditionModel, name: str = "student", seed: int = 3) -> None:
    """A rank-4 LoRA on the attention projections with non-zero weights (peft initialises B to 0)."""
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                     adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


PROMPT = "a painting of a squirrel eating a burger"


# ------------------------------------------------------------------------------------------
# Strength 0 reproduces the student's own diffusers pipeline.
# ------------------------------------------------------------------------------------------

EQUIVALENCE_CASES = [
    ("euler-trailing", lambda: EulerDiscreteScheduler(**SCHED, timestep_spacing="trailing"), None, 0.0),
    ("euler-ancestral", lambda: EulerAncestralDiscreteScheduler(**SCHED, timestep_spacing="trailing"), None, 0.0),
    ("lcm", lambda: LCMScheduler(**SCHED), 32, 8.0),
    ("euler-leading-cfg", lambda: EulerDiscreteScheduler(**SCHED, timestep_spacing="leading"), None, 3.0),
    ("ddim-trailing", lambda: DDIMScheduler(**SCHED, timestep_spacing="trailing", set_alpha_to_one=True,
                                            clip_sample=False), None, 0.0),
]


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("case", EQUIVALENCE_CASES, ids=[c[0] for c in EQUIVALENCE_CASES])
def test_strength_zero_matches_diffusers(tokenizer_dir, sdxl, case):
    _, make_sched, tcond, w = case
    pipe = tiny_pipe(tokenizer_dir, sdxl, make_sched(), unet=tiny_unet(sdxl, time_cond_proj_dim=tcond))
    kwargs = dict(num_inference_steps=3, height=SIZE, width=SIZE, output_type="np", guidance_scale=w,
                  num_images_per_prompt=2)
    prompts = [PROMPT, "a cat"]
    ref = pipe(prompts, negative_prompt=["blurry", "ugly"], generator=gen(7), **kwargs).images
    teacher = tiny_unet(sdxl, seed=5)
    ours = DistillppPipeline(pipe, teacher)(prompts, negative_prompt=["blurry", "ugly"], generator=gen(7),
                                            strength=0.0, **kwargs)
    assert isinstance(ours, DistillppPipelineOutput)
    assert ours.images.shape == ref.shape == (4, SIZE, SIZE, 3)
    assert np.abs(ours.images - ref).max() <= 1e-4
