"""A STAND-IN for the few ComfyUI interfaces the distillpp node pack uses. NOT ComfyUI.

ComfyUI is not on the package registries, so CI checks the pack's contract against this minimal
imitation, written from ComfyUI's source (comfy/samplers.py, model_patcher.py, model_sampling.py,
sampler_helpers.py, utils.py): ``CFGGuider.sample -> outer_sample -> inner_sample -> sampler.sample``,
``sampling_function``, ``process_conds``, ``ModelPatcher`` clones that share one torch module and
one weight backup, loading that patches the shared module in place, and the EPS/CONST
model-sampling classes. The real thing is exercised by tests/test_comfyui_real.py (COMFYUI_PATH).

:func:`install` returns the fake modules, keyed like ``sys.modules``.
"""

from __future__ import annotations

import copy
import types
import uuid

import torch


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


# comfy.utils -------------------------------------------------------------------------------
def get_attr(obj, key):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr(obj, key, value):
    *path, last = key.split(".")
    for part in path:
        obj = getattr(obj, part)
    old = getattr(obj, last)
    setattr(obj, last, value)
    return old


def set_attr_param(obj, key, value):
    return set_attr(obj, key, torch.nn.Parameter(value, requires_grad=False))


def copy_to_param(obj, key, value):
    get_attr(obj, key).data.copy_(value)


# comfy.model_sampling ----------------------------------------------------------------------
class EPS:
    """VE coordinates; ``noise_scaling`` as ComfyUI's (max_denoise: ``sqrt(1 + sigma^2)``)."""

    sigma_max = torch.tensor(14.6146)
    num_timesteps, linear_start, linear_end, zsnr = 1000, 0.00085, 0.012, False  # SD's table

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return noise * ((1 + sigma**2).sqrt() if max_denoise else sigma) + latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent


class CONST:
    """Flow coordinates: ``x = (1 - s) x0 + s eps``."""

    sigma_max = torch.tensor(1.0)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1 - sigma) * latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent / (1 - sigma)


class Model(torch.nn.Module):
    """A BaseModel stand-in: data ~ N(c, 1) per element, ``weight`` scales its exact x0 (a 'LoRA' changes it)."""

    def __init__(self, flow: bool = False, weight: float = 1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(weight), requires_grad=False)
        self.model_sampling = CONST() if flow else EPS()
        self.current_patcher = None

    def extra_conds(self, cross_attn):
        return {"c_crossattn": cross_attn}

    def apply_model(self, x, sigma, c_crossattn):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        c = c_crossattn.reshape(-1, *([1] * (x.ndim - 1)))
        if isinstance(self.model_sampling, CONST):
            a = 1 - s  # x = a x0 + s eps
            x0 = c + a * (x - a * c) / (a**2 + s**2)
        else:
            x0 = (x + s**2 * c) / (1 + s**2)
        return self.weight * x0


# comfy.model_patcher -----------------------------------------------------------------------
class LowVramPatch:
    pass


def create_model_options_clone(options):
    return copy.deepcopy(options)


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.patches: dict = {}
        self.backup: dict = {}
        self.object_patches: dict = {}
        self.object_patches_backup: dict = {}
        self.model_options = {"transformer_options": {}}
        self.patches_uuid = uuid.uuid4()
        self.additional_models: dict = {}

    def clone(self):
        n = ModelPatcher(self.model)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.backup, n.object_patches_backup = self.backup, self.object_patches_backup  # shared, as in ComfyUI
        n.model_options = copy.deepcopy(self.model_options)
        n.additional_models = {k: [m.clone() for m in v] for k, v in self.additional_models.items()}
        return n

    def is_clone(self, other):
        return getattr(other, "model", None) is self.model

    def add_patches(self, patches):
        self.patches_uuid = uuid.uuid4()
        for k, delta in patches.items():
            self.patches.setdefault(k, []).append(delta)

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def get_model_object(self, name):
        return self.object_patches.get(name, get_attr(self.model, name))

    def set_additional_models(self, key, models):
        self.additional_models[key] = models

    def patch_model(self):
        """Load: patch the (shared) module in place, backing the original up once."""
        self.unpatch_model()
        for k, deltas in self.patches.items():
            w = get_attr(self.model, k)
            self.backup.setdefault(k, types.SimpleNamespace(weight=w.data.clone(), inplace_update=False))
            set_attr_param(self.model, k, w.data + sum(deltas))
        for k, obj in self.object_patches.items():
            self.object_patches_backup.setdefault(k, set_attr(self.model, k, obj))

    def unpatch_model(self):
        for k, bk in list(self.backup.items()):
            set_attr_param(self.model, k, bk.weight)
        self.backup.clear()
        for k, obj in list(self.object_patches_backup.items()):
            set_attr(self.model, k, obj)
        self.object_patches_backup.clear()

    def pre_run(self):
        self.model.current_patcher = self

    def cleanup(self):
        pass


# comfy.sampler_helpers ---------------------------------------------------------------------
def convert_cond(cond):
    return [dict(c[1], cross_attn=c[0], model_conds={}, uuid=uuid.uuid4()) for c in cond]


# comfy.samplers ----------------------------------------------------------------------------
def process_conds(model, noise, conds, device, latent_image=None, denoise_mask=None, seed=None):
    return {k: [dict(c, model_conds=model.extra_conds(c["cross_attn"])) for c in v] for k, v in conds.items()}


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):  # noqa: B006
    def run(conds):
        return model.apply_model(x, timestep, **conds[0]["model_conds"])

    out = run(cond)
    if cond_scale == 1.0 or uncond is None:
        return out
    u = run(uncond)
    return u + (out - u) * cond_scale


class Sampler:
    def max_denoise(self, model_wrap, sigmas):
        return float(sigmas[0]) >= float(model_wrap.inner_model.model_sampling.sigma_max) * (1 - 1e-5)


class EulerSampler(Sampler):
    """ComfyUI's KSAMPLER("euler") in short: k-diffusion Euler on the guider's x0."""

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        ms = model_wrap.inner_model.model_sampling
        x = ms.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        for i in range(len(sigmas) - 1):
            x0 = model_wrap(x, sigmas[i] * x.new_ones(x.shape[0]), model_options=extra_args["model_options"],
                            seed=extra_args["seed"])
            x = x + (x - x0) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return ms.inverse_noise_scaling(sigmas[-1], x)


class CFGGuider:
    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.original_conds = {}
        self.cfg = 1.0

    def set_conds(self, positive, negative):
        self.inner_set_conds({"positive": positive, "negative": negative})

    def set_cfg(self, cfg):
        self.cfg = cfg

    def inner_set_conds(self, conds):
        for k in conds:
            self.original_conds[k] = convert_cond(conds[k])

    def __call__(self, x, timestep, model_options={}, seed=None):  # noqa: B006
        return sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                 self.conds.get("positive"), self.cfg, model_options=model_options, seed=seed)

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed):
        self.conds = process_conds(self.inner_model, noise, self.conds, device, latent_image, denoise_mask, seed)
        extra_args = {"model_options": create_model_options_clone(self.model_options), "seed": seed}
        return sampler.sample(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)

    def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                     disable_pbar=False, seed=None):
        # ComfyUI's load_models_gpu: the patcher, then its additional models; clones share one module.
        for p in [self.model_patcher] + [m for v in self.model_patcher.additional_models.values() for m in v]:
            p.patch_model()
        self.inner_model = self.model_patcher.model
        self.model_patcher.pre_run()
        try:
            return self.inner_sample(noise, latent_image, "cpu", sampler, sigmas, denoise_mask, callback,
                                     disable_pbar, seed)
        finally:
            self.model_patcher.cleanup()

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        self.conds = {k: [c.copy() for c in v] for k, v in self.original_conds.items()}
        return self.outer_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)


def install() -> dict[str, types.ModuleType]:
    """The stand-in modules, keyed by the names the pack imports."""
    comfy = _module("comfy")
    mods = {
        "comfy": comfy,
        "comfy.utils": _module("comfy.utils", get_attr=get_attr, set_attr=set_attr, set_attr_param=set_attr_param,
                               copy_to_param=copy_to_param),
        "comfy.model_sampling": _module("comfy.model_sampling", EPS=EPS, CONST=CONST),
        "comfy.model_patcher": _module("comfy.model_patcher", ModelPatcher=ModelPatcher, LowVramPatch=LowVramPatch,
                                       create_model_options_clone=create_model_options_clone),
        "comfy.sampler_helpers": _module("comfy.sampler_helpers", convert_cond=convert_cond),
        "comfy.samplers": _module("comfy.samplers", CFGGuider=CFGGuider, Sampler=Sampler,
                                  sampling_function=sampling_function, process_conds=process_conds),
    }
    for name, m in mods.items():
        if name != "comfy":
            setattr(comfy, name.split(".", 1)[1], m)
    return mods
