"""DistillppPipeline on tiny random SD1.5- and SDXL-shaped diffusers pipelines (CPU, no downloads).

The recipe follows diffusers' own ``get_dummy_components``: seeded tiny UNets, VAE and CLIP text
encoders built from configs; the CLIP tokenizer is built from a byte-level vocabulary written to a
temporary folder. Invariants over golden numbers: strength 0 equals the student's diffusers
pipeline; the teacher sees the LoRA switched off, the student sees it on; mismatched pairs fail
before sampling.
"""

from __future__ import annotations

import json

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

from family_contract import FamilyContract  # noqa: E402
from tiny import clip_config, clip_tokenizer  # noqa: E402

import distillpp  # noqa: E402
from distillpp.pipelines import PRESETS, DistillppPipelineOutput, MissingWeightsError, from_preset, get_preset  # noqa: E402
from distillpp.pipelines.lora import AdapterOffNet, lora_state  # noqa: E402
from distillpp.pipelines.sd import DistillppPipeline, SCHEDULER_SAMPLERS, student_scheduler  # noqa: E402


SIZE = 32  # image side; the tiny VAE downsamples by 2 -> 16x16 latents


SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


# ------------------------------------------------------------------------------------------
# Tiny components.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The shared tiny CLIP tokenizer, saved where the pipelines load it from."""
    d = tmp_path_factory.mktemp("tokenizer")
    clip_tokenizer().save_pretrained(d)
    return str(d)


def _text_config() -> CLIPTextConfig:
    return clip_config()


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
        block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE,
        norm_num_groups=8, layers_per_block=1,
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

# (name, scheduler, UNet time_cond_proj_dim, student guidance_scale, steps)
EQUIVALENCE_CASES = [
    ("euler-trailing", lambda: EulerDiscreteScheduler(**SCHED, timestep_spacing="trailing"), None, 0.0, 3),
    ("euler-ancestral", lambda: EulerAncestralDiscreteScheduler(**SCHED, timestep_spacing="trailing"), None, 0.0, 3),
    ("lcm", lambda: LCMScheduler(**SCHED), 32, 8.0, 3),
    ("euler-leading-cfg", lambda: EulerDiscreteScheduler(**SCHED, timestep_spacing="leading"), None, 3.0, 2),
    # diffusers' DDIM steps to t - 1000 // n, which is the next grid timestep only when n divides 1000
    # (Hyper-SD's 4 and 8 steps do); with n = 3 it lands one timestep off the trailing grid.
    ("ddim-trailing", lambda: DDIMScheduler(**SCHED, timestep_spacing="trailing", set_alpha_to_one=True,
                                            clip_sample=False), None, 0.0, 4),
]


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("case", EQUIVALENCE_CASES, ids=[c[0] for c in EQUIVALENCE_CASES])
def test_strength_zero_matches_diffusers(tokenizer_dir, sdxl, case):
    _, make_sched, tcond, w, steps = case
    pipe = tiny_pipe(tokenizer_dir, sdxl, make_sched(), unet=tiny_unet(sdxl, time_cond_proj_dim=tcond))
    kwargs = dict(num_inference_steps=steps, height=SIZE, width=SIZE, output_type="np", guidance_scale=w,
                  num_images_per_prompt=2)
    prompts = [PROMPT, "a cat"]
    ref = pipe(prompts, negative_prompt=["blurry", "ugly"], generator=gen(7), **kwargs).images
    teacher = tiny_unet(sdxl, seed=5)
    ours = DistillppPipeline(pipe, teacher)(prompts, negative_prompt=["blurry", "ugly"], generator=gen(7),
                                            strength=0.0, **kwargs)
    assert isinstance(ours, DistillppPipelineOutput)
    assert ours.images.shape == ref.shape == (4, SIZE, SIZE, 3)
    assert np.abs(ours.images - ref).max() <= 1e-4


# ------------------------------------------------------------------------------------------
# Recording what each UNet call sees.
# ------------------------------------------------------------------------------------------


class CallLog:
    """Forward pre-hooks on UNets: batch size, LoRA on/off and the text conditioning of each call."""

    def __init__(self):
        self.calls: list[dict] = []
        self.handles = []

    def watch(self, unet, name: str) -> "CallLog":
        layers = [m for m in unet.modules() if hasattr(m, "disable_adapters") and hasattr(m, "merged_adapters")]

        def hook(module, args, kwargs):
            ehs = kwargs.get("encoder_hidden_states")
            self.calls.append({
                "unet": name,
                "batch": args[0].shape[0],
                "lora_on": bool(layers) and not any(m.disable_adapters for m in layers),
                "ehs": ehs.detach().clone() if ehs is not None else None,
                "t": args[1].detach().clone(),
                "timestep_cond": kwargs.get("timestep_cond") is not None,
            })

        self.handles.append(unet.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def sd_lora_pipe(tokenizer_dir):
    pipe = tiny_pipe(tokenizer_dir, False)
    add_tiny_lora(pipe.unet)
    return pipe


@pytest.fixture(scope="module")
def sdxl_lora_pipe(tokenizer_dir):
    pipe = tiny_pipe(tokenizer_dir, True)
    add_tiny_lora(pipe.unet)
    return pipe


@pytest.mark.parametrize("which", ["sd_lora_pipe", "sdxl_lora_pipe"])
def test_adapter_off_teacher_sees_lora_disabled(request, which):
    pipe = request.getfixturevalue(which)
    dp = DistillppPipeline(pipe, "adapter-off", guidance_scale=0.0)
    log = CallLog().watch(pipe.unet, "unet")
    try:
        dp(PROMPT, num_inference_steps=3, guided_steps=2, strength=0.3, teacher_cfg=4.0, generator=gen(),
           height=SIZE, width=SIZE, output_type="latent")
    finally:
        log.remove()
    # Step 0: student (LoRA on), teacher (LoRA off, CFG batch 2); step 1 likewise; step 2: student only.
    assert [(c["batch"], c["lora_on"]) for c in log.calls] == [(1, True), (2, False), (1, True), (2, False), (1, True)]
    assert lora_state(pipe.unet).disabled is False  # restored after the run

    # The adapter-off teacher computes exactly the base UNet (LoRA removed), not the student.
    base = tiny_unet(dp.family.is_sdxl)
    x = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=gen(1))
    t = torch.tensor([500.0, 500.0])
    cond = {"encoder_hidden_states": torch.randn(2, 77, 64 if dp.family.is_sdxl else 32, generator=gen(2))}
    if dp.family.is_sdxl:
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=gen(3)),
                                     "time_ids": torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2, dtype=torch.float32)}
    with torch.no_grad():
        off = AdapterOffNet(distillpp.unet_fn(pipe.unet), pipe.unet)(x, t, **cond)
        ref = base(x, t, **cond).sample
        on = pipe.unet(x, t, **cond).sample
    assert torch.allclose(off, ref, atol=1e-5)
    assert (on - ref).abs().max() > 1e-3  # the LoRA does change the student


def test_fused_lora_detected_and_unfused_on_request(tokenizer_dir):
    pipe = tiny_pipe(tokenizer_dir, False)
    add_tiny_lora(pipe.unet)
    pipe.fuse_lora(components=["unet"])
    with pytest.raises(ValueError, match="fused"):
        DistillppPipeline(pipe, "adapter-off")
    with pytest.warns(UserWarning, match="unfusing"):
        DistillppPipeline(pipe, "adapter-off", unfuse=True)
    assert lora_state(pipe.unet, pipe).merged == [] and pipe.num_fused_loras == 0
    # Fused and then unloaded: the base weights are gone for good.
    pipe.fuse_lora(components=["unet"])
    pipe.unload_lora_weights()
    with pytest.raises(ValueError, match="base weights are gone"):
        DistillppPipeline(pipe, "adapter-off", unfuse=True)
    # No LoRA at all.
    with pytest.raises(ValueError, match="needs a LoRA adapter"):
        DistillppPipeline(tiny_pipe(tokenizer_dir, False), "adapter-off")


@pytest.fixture(scope="module")
def sd_pair(tokenizer_dir):
    return tiny_pipe(tokenizer_dir, False), tiny_unet(False, seed=5)


def test_negative_prompts_reach_the_teacher(sd_pair):
    pipe, teacher = sd_pair
    dp = DistillppPipeline(pipe, teacher, guidance_scale=0.0)

    def encode(texts):
        return pipe.encode_prompt(texts, "cpu", 1, False)[0]

    for kwargs, expected_neg in [
        ({}, ["", ""]),
        ({"negative_prompt": "blurry"}, ["blurry", "blurry"]),
        ({"negative_prompt": "blurry", "teacher_negative_prompt": ["ugly", "dark"]}, ["ugly", "dark"]),
    ]:
        log = CallLog().watch(teacher, "teacher").watch(pipe.unet, "student")
        try:
            dp([PROMPT, "a cat"], num_inference_steps=2, strength=0.2, generator=gen(), height=SIZE, width=SIZE,
               output_type="latent", **kwargs)
        finally:
            log.remove()
        student = [c for c in log.calls if c["unet"] == "student"]
        tcalls = [c for c in log.calls if c["unet"] == "teacher"]
        assert len(tcalls) == 1 and tcalls[0]["batch"] == 4 and all(c["batch"] == 2 for c in student)
        uncond, cond = tcalls[0]["ehs"].chunk(2)
        assert torch.allclose(cond, encode([PROMPT, "a cat"]))
        assert torch.allclose(uncond, encode(expected_neg)), kwargs
        assert torch.allclose(student[0]["ehs"], encode([PROMPT, "a cat"]))


def test_batch_samples_and_reproducibility(sd_pair):
    pipe, teacher = sd_pair
    dp = DistillppPipeline(pipe, teacher, guidance_scale=0.0)
    kw = dict(num_inference_steps=2, height=SIZE, width=SIZE, output_type="np", num_images_per_prompt=2)
    log = CallLog().watch(teacher, "teacher")
    try:
        a = dp([PROMPT, "a cat"], generator=gen(3), strength=0.5, samples=2, **kw).images
    finally:
        log.remove()
    assert a.shape == (4, SIZE, SIZE, 3) and np.isfinite(a).all()
    assert [c["batch"] for c in log.calls] == [4 * 2 * 2]  # batch x CFG x samples, one forward
    b = dp([PROMPT, "a cat"], generator=gen(3), strength=0.5, samples=2, **kw).images
    np.testing.assert_array_equal(a, b)
    c = dp([PROMPT, "a cat"], generator=gen(4), strength=0.5, samples=2, **kw).images
    plain = dp([PROMPT, "a cat"], generator=gen(3), strength=0.0, **kw).images
    assert np.abs(a - c).max() > 1e-3 and np.abs(a - plain).max() > 1e-3
    # Images of a batch are not copies of each other.
    assert np.abs(a[0] - a[1]).max() > 1e-3
    pil = dp(PROMPT, generator=gen(3), num_inference_steps=1, height=SIZE, width=SIZE)
    assert len(pil.images) == 1 and pil.images[0].size == (SIZE, SIZE)


def test_call_argument_errors(sd_pair):
    pipe, teacher = sd_pair
    dp = DistillppPipeline(pipe, teacher)
    for kwargs, match in [
        (dict(strength=1.5), "strength"),
        (dict(guided_steps=5, num_inference_steps=2), "steps"),
        (dict(space="latent"), "space"),
        (dict(generator=[gen(), gen()]), "generator"),
        (dict(height=33), "multiples"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt"),
        (dict(output_type="jpg"), "output_type"),
    ]:
        with pytest.raises(ValueError, match=match):
            dp(PROMPT, **kwargs)


# ------------------------------------------------------------------------------------------
# Mismatched pairs fail before sampling.
# ------------------------------------------------------------------------------------------


def test_mismatched_pairs_raise(tokenizer_dir, sd_pair):
    sdxl_pipe = tiny_pipe(tokenizer_dir, True)
    sd_pipe, sd_teacher = sd_pair
    with pytest.raises(ValueError, match="cross_attention_dim.*addition_embed_type|addition_embed_type"):
        DistillppPipeline(sdxl_pipe, sd_teacher)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        DistillppPipeline(sd_pipe, tiny_unet(False, cross_attention_dim=64))
    with pytest.raises(ValueError, match="latent"):
        DistillppPipeline(sd_pipe, tiny_unet(False, in_channels=8, out_channels=8))
    with pytest.raises(ValueError, match="prediction_type"):
        DistillppPipeline(sd_pipe, sd_teacher, teacher_scheduler={**sd_pipe.scheduler.config,
                                                                  "prediction_type": "flow_prediction"})
    bad = tiny_pipe(tokenizer_dir, False, diffusers.DPMSolverMultistepScheduler(**SCHED))
    with pytest.raises(ValueError, match="scheduler DPMSolverMultistepScheduler is not supported"):
        DistillppPipeline(bad, sd_teacher)
    with pytest.raises(ValueError, match="teacher_device or teacher_offload"):
        DistillppPipeline(sd_pipe, sd_teacher, teacher_device="cpu", teacher_offload="cpu")
    # v-prediction teachers are fine.
    DistillppPipeline(sd_pipe, sd_teacher, teacher_scheduler={**sd_pipe.scheduler.config,
                                                              "prediction_type": "v_prediction"})


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"], scope="class")
class TestSDContract(FamilyContract):
    CALL = dict(height=SIZE, width=SIZE, output_type="latent")

    @pytest.fixture(scope="class")
    def made(self, tokenizer_dir, sdxl):
        pipe = tiny_pipe(tokenizer_dir, sdxl)  # Euler, trailing spacing (Lightning)

        def reference(prompts, generator, **kw):
            return pipe(prompts, num_inference_steps=4, guidance_scale=0.0, generator=generator, **kw).images

        return DistillppPipeline(pipe, tiny_unet(sdxl, seed=5), guidance_scale=0.0), reference


# ------------------------------------------------------------------------------------------
# Teacher placement.
# ------------------------------------------------------------------------------------------


def test_teacher_offload_and_placement_give_the_same_images(sd_pair):
    pipe, teacher = sd_pair
    kw = dict(num_inference_steps=2, strength=0.5, height=SIZE, width=SIZE, output_type="np")
    same = DistillppPipeline(pipe, teacher)(PROMPT, generator=gen(5), **kw).images
    ptrs = [p.data_ptr() for p in teacher.parameters()]
    off = DistillppPipeline(pipe, teacher, teacher_offload="cpu")
    np.testing.assert_array_equal(off(PROMPT, generator=gen(5), **kw).images, same)
    assert all(p.device.type == "cpu" for p in teacher.parameters())
    assert [p.data_ptr() for p in teacher.parameters()] == ptrs  # host copy kept, nothing copied back
    placed = DistillppPipeline(pipe, teacher, teacher_device="cpu")
    np.testing.assert_array_equal(placed(PROMPT, generator=gen(5), **kw).images, same)


def test_placed_net_moves_nested_conditioning():
    from distillpp.pipelines.placement import PlacedNet

    seen = {}

    def net(x, t, **cond):
        seen.update(x=x.device, t=t.device, ehs=cond["added_cond_kwargs"]["time_ids"].device)
        return x * 2

    out = PlacedNet(net, "cpu")(torch.ones(1, 2), torch.ones(1), added_cond_kwargs={"time_ids": torch.ones(1, 6)})
    assert seen == {"x": torch.device("cpu"), "t": torch.device("cpu"), "ehs": torch.device("cpu")}
    assert torch.equal(out, torch.full((1, 2), 2.0))


# ------------------------------------------------------------------------------------------
# Every SD/SDXL preset is wired to the right scheduler, sigmas, sampler and guidance defaults.
# ------------------------------------------------------------------------------------------

SD_PRESETS = sorted(n for n, p in PRESETS.items() if p.family in ("sd15", "sd2", "sdxl"))
EXPECTED_SAMPLER = {"lightning": "euler", "turbo": "euler_ancestral", "lcm": "consistency", "dmd2": "consistency",
                    "hyper-sd": "ddim", "hyper-sd-1step": "tcd"}
EXPECTED_SPACE = {"lightning": "x0", "turbo": "x0", "lcm": "eps", "dmd2": "eps", "hyper-sd": "x0", "hyper-sd-1step": "x0"}


def _kind(name: str) -> str:
    return next(k for k in ("lightning", "turbo", "dmd2", "hyper-sd-1step", "hyper-sd", "lcm") if k in name)


def _diffusers_sigmas(scheduler, num_steps, timesteps):
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=list(timesteps))
    else:
        scheduler.set_timesteps(num_steps)
    if hasattr(scheduler, "sigmas"):
        return scheduler.sigmas.float()
    abar = scheduler.alphas_cumprod[scheduler.timesteps.long()].double()
    return torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)]).float()


def test_sd_presets_registered():
    expected = {"sd15-lcm", "sdxl-lcm", "sd15-lcm-lora", "sdxl-lcm-lora", "sdxl-dmd2-4step", "sdxl-dmd2-4step-lora",
                "sdxl-turbo", "sd-turbo", "sdxl-hyper-sd-4step-lora", "sdxl-hyper-sd-8step-lora"}
    expected |= {f"sdxl-lightning-{n}step{s}" for n in (2, 4, 8) for s in ("", "-lora")}
    assert expected <= set(SD_PRESETS)
    assert get_preset("sdxl-dmd2-4step").timesteps == (999, 749, 499, 249)
    with pytest.raises(ValueError, match="known presets"):
        get_preset("sdxl-nope")


@pytest.mark.parametrize("name", SD_PRESETS)
def test_preset_wiring(tokenizer_dir, name):
    preset = get_preset(name)
    kind = _kind(name)
    sdxl = preset.family == "sdxl"
    base_sched = EulerDiscreteScheduler(**SCHED, timestep_spacing="leading")  # SD/SDXL base configs
    embedding = preset.scheduler == "LCMScheduler" and preset.student_kind != "lora" and preset.timesteps is None
    pipe = tiny_pipe(tokenizer_dir, sdxl, student_scheduler(preset, base_sched),
                     unet=tiny_unet(sdxl, time_cond_proj_dim=32 if embedding else None))
    if preset.student_kind == "lora":
        add_tiny_lora(pipe.unet)
        teacher = "adapter-off"
    else:
        teacher = tiny_unet(sdxl, seed=5)
    dp = DistillppPipeline(pipe, teacher, base_sched, preset=preset)

    assert type(pipe.scheduler).__name__ == preset.scheduler
    assert dp.sampler == EXPECTED_SAMPLER[kind] == SCHEDULER_SAMPLERS[preset.scheduler]
    assert dp.guidance.space == EXPECTED_SPACE[kind]
    assert dp.guidance.teacher_cfg > 1 and 0 < dp.guidance.strength <= 0.1
    ref = _diffusers_sigmas(type(pipe.scheduler).from_config(pipe.scheduler.config), preset.num_inference_steps,
                            preset.timesteps)
    torch.testing.assert_close(dp.sigmas(), ref, rtol=1e-5, atol=1e-6)
    if kind in ("lightning", "turbo", "hyper-sd"):
        assert pipe.scheduler.config.timestep_spacing == "trailing"

    # Strength 0 is the student's diffusers pipeline with the preset's settings.
    kw = dict(height=SIZE, width=SIZE, output_type="latent", guidance_scale=preset.guidance_scale)
    if "eta" in preset.extra:
        dp = DistillppPipeline(pipe, teacher, base_sched, preset=preset, eta=preset.extra["eta"])
    steps = {"timesteps": list(preset.timesteps)} if preset.timesteps else {"num_inference_steps": preset.num_inference_steps}
    expected = pipe(PROMPT, generator=gen(11), **kw, **steps, eta=preset.extra.get("eta", 0.0)).images
    plain = dp(PROMPT, generator=gen(11), strength=0.0, **kw).images
    torch.testing.assert_close(plain, expected, rtol=1e-4, atol=1e-4)

    # One guided call with the preset's defaults: the teacher runs on the first guided_steps steps.
    log = CallLog().watch(dp.family.teacher_module, "teacher" if teacher != "adapter-off" else "unet")
    if teacher != "adapter-off":
        log.watch(pipe.unet, "student")
    try:
        out = dp(PROMPT, generator=gen(11), height=SIZE, width=SIZE, output_type="latent").images
    finally:
        log.remove()
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 0
    student_calls = [c for c in log.calls if c["batch"] == 1]
    teacher_calls = [c for c in log.calls if c["batch"] == 2]
    assert len(student_calls) == len(dp.sigmas()) - 1
    assert len(teacher_calls) == preset.guidance.guided_steps
    assert all(c["timestep_cond"] == embedding for c in student_calls)
    assert not any(c["timestep_cond"] for c in teacher_calls)
    if teacher == "adapter-off":
        assert all(c["lora_on"] for c in student_calls) and not any(c["lora_on"] for c in teacher_calls)


# ------------------------------------------------------------------------------------------
# from_preset: local folders, offline, and a clear error when weights are missing.
# ------------------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty Hugging Face cache with downloads forbidden."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return tmp_path


@pytest.mark.parametrize("name", ["sdxl-lightning-4step-lora", "sdxl-dmd2-4step", "sd-turbo", "sdxl-lcm"])
def test_from_preset_missing_weights_lists_ids(offline, name):
    preset = get_preset(name)
    with pytest.raises(MissingWeightsError) as err:
        from_preset(name)
    msg = str(err.value)
    assert preset.base in msg and "hf download" in msg
    if preset.student is not None:
        assert preset.student.repo in msg and (preset.student.filename or "") in msg
    if preset.teacher not in ("base", "adapter-off"):
        assert preset.teacher in msg


@pytest.fixture(scope="module")
def saved_models(tokenizer_dir, tmp_path_factory):
    """Tiny SD and SDXL pipelines, a LoRA file and a UNet state-dict file saved like the real repos."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("models")
    sdxl = tiny_pipe(tokenizer_dir, True, EulerDiscreteScheduler(**SCHED, timestep_spacing="leading"))
    sdxl.save_pretrained(root / "sdxl-base")
    save_file(tiny_unet(True, seed=8).state_dict(), str(root / "student_unet.safetensors"))
    lora_unet = tiny_unet(True)
    add_tiny_lora(lora_unet)
    StableDiffusionXLPipeline.save_lora_weights(root / "lora", unet_lora_layers=get_peft_model_state_dict(lora_unet, adapter_name="student"),
                                                weight_name="student_lora.safetensors")
    sd = tiny_pipe(tokenizer_dir, False, EulerDiscreteScheduler(**SCHED, timestep_spacing="leading"))
    sd.save_pretrained(root / "sd-student")
    tiny_pipe(tokenizer_dir, False, unet=tiny_unet(False, seed=9)).save_pretrained(root / "sd-teacher")
    return root


def test_from_preset_local_folders(offline, saved_models):
    r = saved_models
    lora = from_preset("sdxl-lightning-4step-lora", base=str(r / "sdxl-base"),
                       student=str(r / "lora" / "student_lora.safetensors"))
    assert lora.family.teacher_kind == "adapter-off" and lora.sampler == "euler" and lora.family.is_sdxl
    assert lora_state(lora.family.owner.unet).adapters == ["student"]
    out = lora(PROMPT, generator=gen(), height=SIZE, width=SIZE, output_type="np").images
    assert out.shape == (1, SIZE, SIZE, 3) and np.isfinite(out).all()

    dmd2 = DistillppPipeline.from_preset("sdxl-dmd2-4step", base=str(r / "sdxl-base"),
                                        student=str(r / "student_unet.safetensors"))
    assert dmd2.sampler == "consistency" and dmd2.timesteps == (999, 749, 499, 249)
    assert dmd2.family.teacher_module is not dmd2.family.owner.unet
    expected = tiny_unet(True, seed=8).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in dmd2.family.owner.unet.state_dict().items())
    assert dmd2(PROMPT, generator=gen(), height=SIZE, width=SIZE, output_type="latent").images.shape == (1, 4, 16, 16)

    turbo = from_preset("sd-turbo", base=str(r / "sd-student"), teacher=str(r / "sd-teacher"),
                        teacher_offload="cpu")
    assert turbo.sampler == "euler_ancestral" and not turbo.family.is_sdxl
    assert turbo(PROMPT, generator=gen(), height=SIZE, width=SIZE, output_type="np").images.shape == (1, SIZE, SIZE, 3)


# ------------------------------------------------------------------------------------------
# CLI.
# ------------------------------------------------------------------------------------------


def test_cli_without_weights_exits_nonzero_with_ids(offline, capsys, tmp_path):
    from distillpp.pipelines.cli import main

    code = main(["--preset", "sdxl-lightning-4step-lora", "--prompt", "a cat", "--out", str(tmp_path / "o"),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code != 0
    assert "ByteDance/SDXL-Lightning" in err and "stabilityai/stable-diffusion-xl-base-1.0" in err
    assert "hf download" in err
    assert main(["--prompt", "x"]) != 0 and main(["--preset", "sd-turbo"]) != 0


def test_cli_generates_side_by_side_from_local_folders(offline, saved_models, tmp_path, capsys):
    from distillpp.pipelines.cli import main

    out = tmp_path / "out"
    r = saved_models
    code = main([
        "--preset", "sdxl-lightning-4step-lora", "--base", str(r / "sdxl-base"),
        "--student", str(r / "lora" / "student_lora.safetensors"), "--prompt", "a cat", "--prompt", "a dog",
        "--negative-prompt", "blurry", "--seeds", "0", "1", "--batch-size", "2", "--steps", "2", "--height", str(SIZE),
        "--width", str(SIZE), "--strength", "0.3", "--side-by-side", "--out", str(out), "--device", "cpu",
        "--dtype", "fp32",
    ])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / "generate.json").read_text())
    assert len(meta["images"]) == 2 * 2 * 2
    from PIL import Image

    for rec in meta["images"]:
        assert Image.open(rec["image"]).size == (SIZE, SIZE)
        assert Image.open(rec["side_by_side"]).size == (2 * SIZE, SIZE)
    assert main(["--list-presets"]) == 0 and "sdxl-dmd2-4step" in capsys.readouterr().out


def test_loading_a_preset_prints_no_torch_dtype_deprecation(offline, saved_models):
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        from_preset("sd-turbo", base=str(saved_models / "sd-student"), teacher=str(saved_models / "sd-teacher"),
                    torch_dtype=torch.float32)
    assert not [w for w in seen if "torch_dtype" in str(w.message)]


@pytest.mark.parametrize("argv, words", [
    (["--steps", "0"], ["--steps", ">= 1"]),
    (["--strength", "2"], ["--strength", "[0, 1]"]),
    (["--guided-steps", "9"], ["guided_steps", "[0, 4]"]),
    (["--renoise", "later"], ["--renoise", "next"]),
    (["--device", "cuda:0"], ["--device", "CUDA"]),
    (["--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["--overrides", "/nonexistent.json"], ["overrides", "not readable"]),
])
def test_generate_checks_arguments_before_loading_any_weights(offline, capsys, tmp_path, monkeypatch, argv, words):
    """Bad generate options fail in one line before any weights are looked up (the preset's are not even here)."""
    import distillpp.pipelines.presets as presets
    from distillpp.pipelines.cli import main

    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")

    def no_loading(*a, **k):
        raise AssertionError("weights were looked up before the arguments were checked")

    monkeypatch.setattr(presets, "from_preset", no_loading)
    base = ["--preset", "sdxl-lightning-4step", "--prompt", "a cat", "--out", str(tmp_path / "o")]
    try:
        code = main(base + argv)
    except SystemExit as e:  # argparse's own type checks
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert all(w in err for w in words), err
    assert len([line for line in err.strip().splitlines() if line.strip()]) <= 3


def test_missing_weights_with_download_under_hf_hub_offline_says_why(offline, capsys, tmp_path):
    from distillpp.pipelines.cli import main

    code = main(["--preset", "sd-turbo", "--prompt", "a cat", "--download", "--device", "cpu",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "HF_HUB_OFFLINE" in err and "pass --download" not in err


def test_flow_pipeline_from_preset_exists_and_checks_the_family():
    from distillpp.pipelines.flow import FlowDistillppPipeline

    with pytest.raises(ValueError, match="sdxl preset"):
        FlowDistillppPipeline.from_preset("sdxl-lightning-4step")
    with pytest.raises(MissingWeightsError, match="FLUX.1-schnell"):
        FlowDistillppPipeline.from_preset("flux-schnell")
