"""The ComfyUI node pack inside real ComfyUI (skipped unless COMFYUI_PATH points at a ComfyUI checkout).

Tiny random UNets are built with ComfyUI's own model classes (its layers skip initialisation, so every
parameter is filled from a seeded generator) and sampled through ``SamplerCustomAdvanced``:

- the pack loads through ComfyUI's custom-node loader;
- strength 0 is bit-identical to ComfyUI's ``CFGGuider`` with the same sampler (ComfyUI's and ours);
- guided runs with the pack's SAMPLER equal :func:`distillpp.sample` on the same networks, noise and
  sigmas, for eps (VE) and flow (CONST) models;
- with ComfyUI's own Euler sampler the guider is the library's guide plus Euler on the fused x0;
- a LoRA student on a shared base: the teacher call sees the base weights (and base model sampling).

Run: ``COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/test_comfyui_real.py`` in an environment
with ComfyUI's requirements (comfyui/README.md).
"""

from __future__ import annotations

import asyncio
import copy
import os
import sys
from pathlib import Path

import pytest
import torch

import distillpp
from distillpp.schedules import DiscreteVPSchedule, initial_sample

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
PACK = Path(__file__).resolve().parents[1] / "comfyui" / "distillpp_nodes"
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH is not set (real-ComfyUI suite)")

# A tiny SD1.5-style UNet: one attention level, context 32.
UNET = {
    "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1,
    "context_dim": 32, "use_linear_in_transformer": True, "image_size": 8, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
}
SEED = 7


@pytest.fixture(scope="module")
def cf():
    """ComfyUI's modules, on the CPU, plus the pack loaded by ComfyUI's own custom-node loader."""
    sys.path.insert(0, COMFYUI_PATH)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management reads it
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy_extras.nodes_custom_sampler as ncs
    import comfy_extras.nodes_model_advanced as nma
    import nodes

    ok = nodes.load_custom_node(str(PACK))
    ok = asyncio.run(ok) if asyncio.iscoroutine(ok) else ok
    assert ok, "ComfyUI failed to load the pack"
    ns = type("CF", (), {})()
    ns.comfy, ns.ncs, ns.nma, ns.nodes = comfy, ncs, nma, nodes
    # The node classes as ComfyUI registered them (the module ComfyUI imported from the pack folder).
    ns.pack_nodes = sys.modules[nodes.NODE_CLASS_MAPPINGS["DistillppTeacherGuider"].__module__]
    return ns


def build(cf, seed: int, flow: bool = False):
    """A ModelPatcher around a tiny random ComfyUI UNet (EPS, or FLOW = CONST sampling, shift 1)."""
    config = cf.comfy.supported_models.SD15(dict(UNET))
    config.unet_config["num_heads"] = 2
    model_type = cf.comfy.model_base.ModelType.FLOW if flow else cf.comfy.model_base.ModelType.EPS
    model = cf.comfy.model_base.BaseModel(config, model_type=model_type, device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # ComfyUI's layers are created uninitialised
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    cpu = torch.device("cpu")
    return cf.comfy.model_patcher.ModelPatcher(model, cpu, cpu)


def conditioning(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 5, 32, generator=g), {}]]


POS, NEG = conditioning(1), conditioning(2)


def run(cf, guider, sampler, sigmas, seed=SEED):
    """SamplerCustomAdvanced with ComfyUI's RandomNoise on an empty 1x4x8x8 latent."""
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with torch.inference_mode():
        out, _ = cf.ncs.SamplerCustomAdvanced().sample(cf.ncs.Noise_RandomNoise(seed), guider, sampler, sigmas,
                                                       latent)
    return out["samples"]


def teacher_guider(cf, student, teacher, **knobs):
    args = dict(student=student, teacher=teacher, positive=POS, negative=NEG, student_cfg=1.0, teacher_cfg=3.0,
                strength=0.3, guided_steps=2, renoise="next", noise="random", space="x0", samples=1)
    args.update(knobs)
    return cf.pack_nodes.DistillppTeacherGuider().get_guider(**args)[0]


def comfy_sampler(cf, name):
    return cf.ncs.KSamplerSelect().get_sampler(name)[0]


def our_sampler(cf, name):
    return cf.pack_nodes.DistillppSampler().get_sampler(name)[0]


def preset(cf, model, name, steps=4):
    return cf.pack_nodes.DistillppSigmaPreset().get_sigmas(model, name, steps)[0]


def test_pack_loads_through_comfyui_loader(cf):
    for name in ("DistillppTeacherGuider", "DistillppSampler", "DistillppSigmaPreset"):
        assert name in cf.nodes.NODE_CLASS_MAPPINGS
        assert cf.nodes.NODE_CLASS_MAPPINGS[name].RETURN_TYPES[0] in ("GUIDER", "SAMPLER", "SIGMAS")


@pytest.mark.parametrize("sampler", ["comfy:euler", "comfy:lcm", "comfy:euler_ancestral", "ours:euler",
                                     "ours:consistency", "ours:dpmpp_2s_ancestral"])
def test_strength_zero_is_bit_identical_to_comfy_cfg_guider(cf, sampler):
    student, teacher = build(cf, 0), build(cf, 1)
    sigmas = preset(cf, student, "lightning")
    origin, name = sampler.split(":")
    make = comfy_sampler if origin == "comfy" else our_sampler
    plain = cf.ncs.CFGGuider().get_guider(student, POS, NEG, 1.5)[0]
    ours = teacher_guider(cf, student, teacher, strength=0.0, student_cfg=1.5)
    a, b = run(cf, plain, make(cf, name), sigmas), run(cf, ours, make(cf, name), sigmas)
    assert torch.equal(a, b)
    guided = run(cf, teacher_guider(cf, student, teacher, student_cfg=1.5), make(cf, name), sigmas)
    assert (guided - a).abs().max() > 1e-3  # the same run with strength 0.3 moves: the comparison has teeth


def _vp_denoiser(model):
    """distillpp's VE denoiser straight from ComfyUI's BaseModel.apply_model (eps models return x0)."""
    def denoise(x, sigma, c_crossattn):
        return model.apply_model(x, sigma, c_crossattn=c_crossattn.repeat(x.shape[0] // c_crossattn.shape[0], 1, 1))
    denoise.schedule = DiscreteVPSchedule.from_betas()  # SD's table, the tiny SD1.5 config's (declared like ours)
    return denoise


def _flow_denoiser(model):
    """distillpp's FlowDenoiser over the raw velocity network (timestep = flow time * 1000, as ComfyUI's)."""
    def net(x, t, c_crossattn):
        ctx = c_crossattn.repeat(x.shape[0] // c_crossattn.shape[0], 1, 1)
        return model.diffusion_model(x, t, context=ctx)
    return distillpp.FlowDenoiser(net, timestep_scale=1000.0)


def library_reference(student_model, teacher_model, sigmas, sampler, guidance, flow=False, student_cfg=1.0):
    """The same run through distillpp.sample: VE sigmas, the library's initial sample, one generator."""
    wrap = _flow_denoiser if flow else _vp_denoiser
    teacher = distillpp.CFGDenoiser(wrap(teacher_model))
    student = distillpp.CFGDenoiser(wrap(student_model), scale=student_cfg)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(SEED))  # ComfyUI's prepare_noise
    if flow:
        from distillpp.schedules import flow_time_to_sigma

        sigmas = torch.cat([flow_time_to_sigma(sigmas[:-1].double().numpy()).float(), sigmas.new_zeros(1)])
    x = initial_sample(noise, sigmas, family="flow" if flow else "vp")
    cond = {"c_crossattn": POS[0][0]}
    split = {"cond": cond, "uncond": {"c_crossattn": NEG[0][0]}}
    with torch.inference_mode():
        out = distillpp.sample(student, x, sigmas, sampler=sampler, teacher=teacher if guidance else None,
                               guidance=guidance,
                               generator=torch.Generator().manual_seed(SEED), extra_args=split, teacher_args=split)
    return student_model.process_latent_out(out)  # what CFGGuider returns: the latent format's scaling undone


@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
@pytest.mark.parametrize("sampler", sorted(distillpp.SAMPLERS))
def test_guided_run_equals_library(cf, sampler, flow):
    student, teacher = build(cf, 0, flow), build(cf, 1, flow)
    sigmas = preset(cf, student, "flux-schnell" if flow else "lightning")
    space = "eps" if sampler == "consistency" and not flow else "x0"  # eps fusion at flow time 1 is refused
    # renoise "random" draws flow times (flow) or the teacher's integer timesteps (eps: its declared schedule).
    renoise = "random" if flow or sampler in ("ddim", "euler_ancestral") else "next"
    guider = teacher_guider(cf, student, teacher, space=space, samples=2, renoise=renoise, student_cfg=1.5)
    out = run(cf, guider, our_sampler(cf, sampler), sigmas)
    ref = library_reference(student.model, teacher.model, sigmas, sampler, guider.guidance, flow, student_cfg=1.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_comfy_euler_with_guider_is_library_guide_plus_euler_on_fused_x0(cf):
    student, teacher = build(cf, 0), build(cf, 1)
    sigmas = preset(cf, student, "lightning")
    guider = teacher_guider(cf, student, teacher)
    out = run(cf, guider, comfy_sampler(cf, "euler"), sigmas)
    # Reference: the library's guide, then k-diffusion's Euler step along the fused x0.
    s_den = distillpp.CFGDenoiser(_vp_denoiser(student.model))
    t_den = distillpp.CFGDenoiser(_vp_denoiser(teacher.model))
    cond = {"cond": {"c_crossattn": POS[0][0]}, "uncond": {"c_crossattn": NEG[0][0]}}
    guide = guider.guidance.bind(t_den, sigmas, torch.Generator().manual_seed(SEED), cond)
    x = initial_sample(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(SEED)), sigmas)
    with torch.inference_mode():
        for i in range(len(sigmas) - 1):
            x0, _ = guide(i, x, s_den(x, sigmas[i].reshape(1), **cond, cfg_scale=1.0))
            x = x + (x - x0) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    torch.testing.assert_close(out, student.model.process_latent_out(x), rtol=1e-5, atol=1e-5)


FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 8, "context_in_dim": 16,
        "hidden_size": 32, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
        "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True}


def build_flux(cf, seed: int, dev: bool):
    """A tiny random FLUX in ComfyUI: schnell (no guidance embedding, FLOW sampling) or dev (guidance embedding)."""
    config = (cf.comfy.supported_models.Flux if dev else cf.comfy.supported_models.FluxSchnell)(
        dict(FLUX, guidance_embed=dev))
    model = config.get_model({}, device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    cpu = torch.device("cpu")
    return cf.comfy.model_patcher.ModelPatcher(model, cpu, cpu)


def test_flux_schnell_student_flux_dev_teacher_equals_library(cf):
    """The FLUX workflow's wiring: dev's guidance value reaches the teacher only, via teacher_positive."""
    student, teacher = build_flux(cf, 0, dev=False), build_flux(cf, 1, dev=True)
    g = torch.Generator().manual_seed(5)
    ctx, pooled = torch.randn(1, 5, 16, generator=g), torch.randn(1, 8, generator=g)
    pos = [[ctx, {"pooled_output": pooled}]]
    neg = [[torch.zeros(1, 5, 16), {"pooled_output": torch.zeros(1, 8)}]]
    teacher_pos = [[ctx, {"pooled_output": pooled, "guidance": 2.0}]]  # what FluxGuidance 2.0 produces
    sigmas = preset(cf, student, "flux-schnell")
    guider = teacher_guider(cf, student, teacher, positive=pos, negative=neg, teacher_positive=teacher_pos,
                            teacher_cfg=1.0, strength_list="0.5, 0.2", guided_steps=2)
    assert guider.guidance.strength == (0.5, 0.2)
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    with torch.inference_mode():
        out, _ = cf.ncs.SamplerCustomAdvanced().sample(cf.ncs.Noise_RandomNoise(SEED), guider,
                                                       our_sampler(cf, "euler"), sigmas, latent)

    def flux_net(model, guidance):
        def net(x, t, **_):
            b = x.shape[0]
            return model.diffusion_model(x, t, context=ctx.repeat(b, 1, 1), y=pooled.repeat(b, 1),
                                         guidance=torch.full((b,), guidance))
        return distillpp.FlowDenoiser(net, timestep_scale=1.0)  # FLUX's timestep is the flow time itself

    from distillpp.schedules import flow_time_to_sigma

    sigmas_ve = torch.cat([flow_time_to_sigma(sigmas[:-1].double().numpy()).float(), torch.zeros(1)])
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(SEED))
    with torch.inference_mode():
        ref = distillpp.sample(flux_net(student.model, 3.5), initial_sample(noise, sigmas_ve, "flow"), sigmas_ve,
                               sampler="euler", teacher=flux_net(teacher.model, 2.0), guidance=guider.guidance,
                               generator=torch.Generator().manual_seed(SEED))
        wrong = distillpp.sample(flux_net(student.model, 3.5), initial_sample(noise, sigmas_ve, "flow"), sigmas_ve,
                                 sampler="euler", teacher=flux_net(teacher.model, 3.5), guidance=guider.guidance,
                                 generator=torch.Generator().manual_seed(SEED))
    torch.testing.assert_close(out["samples"], student.model.process_latent_out(ref), rtol=1e-5, atol=1e-5)
    assert (ref - wrong).abs().max() > 1e-3  # the teacher's guidance value matters in this test


def _lora(cf, patcher, seed):
    """A random rank-2 LoRA on every attention projection, in kohya's key format, through ComfyUI's loader."""
    keys = cf.comfy.lora.model_lora_keys_unet(patcher.model, {})
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for lora_key, model_key in keys.items():
        if not lora_key.startswith("lora_unet_") or "attn" not in lora_key or not model_key.endswith("weight"):
            continue
        w = cf.comfy.utils.get_attr(patcher.model, model_key)
        if w.ndim != 2:
            continue
        sd[f"{lora_key}.lora_up.weight"] = torch.randn(w.shape[0], 2, generator=g) * 0.3
        sd[f"{lora_key}.lora_down.weight"] = torch.randn(2, w.shape[1], generator=g) * 0.3
    assert sd
    student, _ = cf.comfy.sd.load_lora_for_models(patcher, None, sd, 1.0, 0.0)
    return student


@pytest.mark.parametrize("lcm", [False, True], ids=["lora", "lcm-lora+lcm-sampling"])
def test_lora_student_teacher_sees_base_weights(cf, lcm):
    base = build(cf, 0)
    base_copy = copy.deepcopy(base.model)  # unpatched weights, a separate module
    student = _lora(cf, base, 3)
    if lcm:  # ComfyUI's LCM-LoRA recipe: ModelSamplingDiscrete "lcm" on the student only
        student = cf.nma.ModelSamplingDiscrete().patch(student, "lcm", False)[0]
    # The student's merged weights in a separate module, for the reference run.
    student_copy = copy.deepcopy(base.model)
    student.patch_model()
    student_copy.diffusion_model.load_state_dict(base.model.diffusion_model.state_dict())
    student.unpatch_model()
    if lcm:
        student_copy.model_sampling = student.object_patches["model_sampling"]
    key = sorted(student.patches)[0]
    assert not torch.equal(cf.comfy.utils.get_attr(student_copy, key), cf.comfy.utils.get_attr(base_copy, key))
    assert torch.equal(cf.comfy.utils.get_attr(base.model, key), cf.comfy.utils.get_attr(base_copy, key))

    sampler, sigmas = ("consistency", preset(cf, base, "lcm")) if lcm else ("euler", preset(cf, base, "lightning"))
    guider = teacher_guider(cf, student, base, strength=0.5, guided_steps=3)
    assert guider.shares_weights
    out = run(cf, guider, our_sampler(cf, sampler), sigmas)
    right = library_reference(student_copy, base_copy, sigmas, sampler, guider.guidance)
    naive = library_reference(student_copy, student_copy, sigmas, sampler, guider.guidance)
    torch.testing.assert_close(out, right, rtol=1e-5, atol=1e-5)
    assert (out - naive).abs().max() > 1e-2  # guiding with the patched weights would be visibly different

    # ComfyUI's state is intact afterwards: the base and the student still sample as themselves.
    plain = cf.ncs.CFGGuider().get_guider(base, POS, NEG, 1.0)[0]
    again = cf.ncs.CFGGuider().get_guider(student, POS, NEG, 1.0)[0]
    ref_base = library_reference(base_copy, base_copy, sigmas, sampler, None)
    ref_student = library_reference(student_copy, student_copy, sigmas, sampler, None)
    torch.testing.assert_close(run(cf, plain, our_sampler(cf, sampler), sigmas), ref_base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(cf, again, our_sampler(cf, sampler), sigmas), ref_student, rtol=1e-5, atol=1e-5)


def test_lora_guider_refuses_teacher_with_the_students_own_weights(cf):
    base = build(cf, 0)
    student = _lora(cf, base, 3)
    with pytest.raises(ValueError, match="same weights"):
        teacher_guider(cf, student, student.clone())


WORKFLOWS = sorted((PACK.parent / "workflows").glob("*.json"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflows_pass_comfyui_validation(cf, path, tmp_path):
    """ComfyUI's own prompt validation (node types, links, widget values) with empty placeholder model files."""
    import json

    import execution
    import folder_paths

    for extra in ("nodes_custom_sampler", "nodes_model_advanced", "nodes_flux", "nodes_sd3"):
        ok = cf.nodes.load_custom_node(str(Path(COMFYUI_PATH) / "comfy_extras" / f"{extra}.py"),
                                       module_parent="comfy_extras")
        assert asyncio.run(ok) if asyncio.iscoroutine(ok) else ok
    prompt = json.loads(path.read_text())
    loaders = {"ckpt_name": "checkpoints", "unet_name": "diffusion_models", "lora_name": "loras",
               "vae_name": "vae", "clip_name1": "text_encoders", "clip_name2": "text_encoders"}
    for node in prompt.values():
        for key, folder in loaders.items():
            if key in node["inputs"]:
                (tmp_path / folder).mkdir(exist_ok=True)
                (tmp_path / folder / node["inputs"][key]).touch()
                folder_paths.add_model_folder_path(folder, str(tmp_path / folder))
    folder_paths.filename_list_cache.clear()
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))
    assert valid, (error, node_errors)
    assert outputs == ["23"]
