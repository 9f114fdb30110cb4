"""The ComfyUI nodes: a teacher GUIDER, a SAMPLER running distillpp's samplers, and sigma presets.

Only this module imports ComfyUI (``comfy.*``); the maths is in :mod:`.core`. Interfaces used, as read
from ComfyUI's source: ``comfy.samplers.CFGGuider`` (``sample`` -> ``outer_sample`` -> ``inner_sample``,
which calls ``sampler.sample(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
disable_pbar)``), ``sampling_function`` / ``process_conds``, ``comfy.sampler_helpers.convert_cond``,
``ModelPatcher`` (``clone``, ``is_clone``, ``set_additional_models``, ``backup``, ``object_patches``)
and the ``EPS`` / ``CONST`` model-sampling classes.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import torch

import comfy.model_patcher
import comfy.model_sampling
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils

import distillpp
from distillpp.guidance import TeacherGuidance

from . import core

TEACHER_KEY = "distillpp_teacher"
CATEGORY = "sampling/custom_sampling/distillpp"


def model_kind(model_sampling: Any) -> str:
    """``"ve"`` for ComfyUI's EPS family (eps, v, x0, LCM), ``"flow"`` for CONST (FLUX, SD3), else ValueError.

    Args:
        model_sampling: a model's ``model_sampling`` object.
    """
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return "flow"
    if isinstance(model_sampling, comfy.model_sampling.EPS):
        return "ve"
    raise ValueError(f"model sampling {type(model_sampling).__name__} is neither ComfyUI's EPS nor CONST family; "
                     "distillpp handles eps/v/x0 (VE) and flow-matching (CONST) models")


class TeacherGuider(comfy.samplers.CFGGuider):
    """A ``CFGGuider`` over the student whose teacher corrects the first steps (Distillation++).

    With ComfyUI's own samplers every call returns the student's CFG x0, fused with the teacher's
    on the first call at each guided grid sigma (:class:`core.StepGuide`). With this pack's SAMPLER
    the whole run is :func:`distillpp.sample` and the library's result is reproduced.

    A teacher that is the student's base model (``student = base.clone()`` plus LoRA patches) shares
    its torch module with the student; ComfyUI loads one set of weights, patched for the student.
    Every teacher call therefore swaps the base weights (ComfyUI's own backup of the unpatched
    tensors) and the base model-sampling object back in, and restores the student's afterwards.

    Args:
        student, teacher: ComfyUI ``ModelPatcher`` objects.
        guidance: the knobs; ``guidance.teacher_cfg`` is the teacher's CFG scale.
        student_cfg: the student's CFG scale (1 for most distilled students).
    """

    def __init__(self, student: Any, teacher: Any, guidance: TeacherGuidance, student_cfg: float):
        if not isinstance(guidance, TeacherGuidance):
            raise ValueError(f"guidance must be a TeacherGuidance, got {type(guidance).__name__}")
        self.shares_weights = teacher.is_clone(student)
        same = False
        if self.shares_weights:
            same = student.patches_uuid == teacher.patches_uuid and len(student.patches) == len(teacher.patches)
            if same and student.object_patches.keys() == teacher.object_patches.keys():
                raise ValueError("teacher and student are the same model with the same weights; the teacher must be "
                                 "the student's base model (without the distillation LoRA) or another checkpoint")
            if teacher.patches and not same:
                raise ValueError("teacher shares the student's base model but has weight patches of its own; load "
                                 "the teacher as a separate checkpoint or remove its LoRA")
        # Same weight patches, other object patches (e.g. only the student has ModelSamplingDiscrete lcm):
        # the teacher call swaps the model-sampling object but keeps the weights.
        self._swap_weights = self.shares_weights and not same
        patcher = student.clone()
        if not self.shares_weights:
            # Loaded together with the student by ComfyUI's prepare_sampling (get_nested_additional_models).
            patcher.set_additional_models(TEACHER_KEY, [teacher])
        super().__init__(patcher)
        self.teacher_patcher = teacher
        self.guidance = guidance
        self.set_cfg(student_cfg)
        self.teacher_original_conds: dict[str, list] = {}
        self._step_guide: core.StepGuide | None = None

    def set_conds(self, positive: Any, negative: Any, teacher_positive: Any = None,
                  teacher_negative: Any = None) -> None:
        """Student conditioning; the teacher's defaults to it (FLUX-dev wants its own guidance value).

        Args:
            positive, negative: the student's ``CONDITIONING``.
            teacher_positive, teacher_negative: the teacher's, or ``None`` for the student's.
        """
        self.inner_set_conds({"positive": positive, "negative": negative})
        teacher = {"positive": positive if teacher_positive is None else teacher_positive,
                   "negative": negative if teacher_negative is None else teacher_negative}
        self.teacher_original_conds = {k: comfy.sampler_helpers.convert_cond(v) for k, v in teacher.items()}

    @property
    def teacher_cfg(self) -> float:
        return 1.0 if self.guidance.teacher_cfg is None else self.guidance.teacher_cfg

    def student_kind(self) -> str:
        return model_kind(self.inner_model.model_sampling)

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed):
        self.teacher_model = self.teacher_patcher.model
        conds = {k: [c.copy() for c in v] for k, v in self.teacher_original_conds.items()}
        if not self.shares_weights:
            self.teacher_patcher.pre_run()  # current_patcher, read by calc_cond_batch
        with self._teacher_weights():
            self.teacher_conds = comfy.samplers.process_conds(self.teacher_model, noise, conds, device, latent_image,
                                                              denoise_mask, seed)
        self.teacher_options = comfy.model_patcher.create_model_options_clone(self.teacher_patcher.model_options)
        self.teacher_options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        self._seed = seed
        generator = torch.Generator().manual_seed(int(seed or 0))
        self._step_guide = None
        try:
            if not isinstance(sampler, DistillppSamplerObject):
                self._step_guide = core.StepGuide(self.guidance, self.teacher_denoiser(), sigmas,
                                                  self.student_kind(), generator)
            out = super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                       disable_pbar, seed)
            if self._step_guide is not None:
                self._step_guide.finish()
            return out
        finally:
            self._step_guide = None
            if not self.shares_weights:
                self.teacher_patcher.cleanup()
            del self.teacher_conds, self.teacher_model

    def __call__(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        x0 = super().__call__(x, timestep, model_options=model_options, seed=seed)
        if self._step_guide is not None:
            x0 = self._step_guide(x, timestep, x0)
        return x0

    def student_denoiser(self, model_options: dict, seed: Any) -> core.VEDenoiser:
        """The student's CFG x0 (no teacher) as a VE denoiser.

        Args:
            model_options, seed: the sampler's ``extra_args`` entries.
        """
        def fn(x, sigma):
            return comfy.samplers.CFGGuider.__call__(self, x, sigma, model_options=model_options, seed=seed)
        model_sampling = self.inner_model.model_sampling
        return core.VEDenoiser(fn, model_kind(model_sampling), declared_schedule(model_sampling))

    def teacher_denoiser(self) -> core.VEDenoiser:
        """The teacher's CFG x0 (``cfg_scale=`` overrides its scale) as a VE denoiser."""
        def fn(x, sigma, cfg_scale=None):
            cfg = self.teacher_cfg if cfg_scale is None else float(cfg_scale)
            with self._teacher_weights():
                return comfy.samplers.sampling_function(
                    self.teacher_model, x, sigma, self.teacher_conds.get("negative"),
                    self.teacher_conds.get("positive"), cfg, model_options=self.teacher_options, seed=self._seed)
        with self._teacher_weights():  # a shared module holds the student's model sampling otherwise
            model_sampling = self.teacher_patcher.get_model_object("model_sampling")
        return core.VEDenoiser(fn, model_kind(model_sampling), declared_schedule(model_sampling))

    @contextlib.contextmanager
    def _teacher_weights(self) -> Iterator[None]:
        """Within: the shared module holds the base weights and model sampling (no-op for a separate teacher)."""
        if not self.shares_weights:
            yield
            return
        model = self.model_patcher.model
        student = self.model_patcher
        swapped: list[tuple[str, Any, bool]] = []
        objects: list[tuple[str, Any]] = []
        functions: list[tuple[Any, list, list]] = []
        try:
            # Weights patched in place: ComfyUI keeps the unpatched tensor in the (shared) backup dict.
            for key, bk in list(student.backup.items()) if self._swap_weights else []:
                current = comfy.utils.get_attr(model, key)
                if bk.inplace_update:
                    swapped.append((key, current.data.clone(), True))
                    comfy.utils.copy_to_param(model, key, bk.weight)
                else:
                    swapped.append((key, current, False))
                    comfy.utils.set_attr_param(model, key, bk.weight.to(current.device))
            # Low-VRAM loading patches weights on the fly instead: drop those patch functions.
            for m in model.modules() if self._swap_weights else []:
                wf, bf = getattr(m, "weight_function", None), getattr(m, "bias_function", None)
                if wf or bf:
                    functions.append((m, wf, bf))
                    m.weight_function = [f for f in wf or [] if not isinstance(f, comfy.model_patcher.LowVramPatch)]
                    m.bias_function = [f for f in bf or [] if not isinstance(f, comfy.model_patcher.LowVramPatch)]
            # Object patches (e.g. ModelSamplingDiscrete "lcm" on an LCM-LoRA student) back to the teacher's.
            for key in set(student.object_patches) | set(self.teacher_patcher.object_patches):
                target = self.teacher_patcher.object_patches.get(key, student.object_patches_backup.get(key))
                if target is not None:
                    objects.append((key, comfy.utils.get_attr(model, key)))
                    comfy.utils.set_attr(model, key, target)
            yield
        finally:
            for key, value in reversed(objects):
                comfy.utils.set_attr(model, key, value)
            for m, wf, bf in functions:
                m.weight_function, m.bias_function = wf, bf
            for key, value, inplace in swapped:
                if inplace:
                    comfy.utils.copy_to_param(model, key, value)
                else:
                    comfy.utils.set_attr(model, key, value)


class DistillppSamplerObject(comfy.samplers.Sampler):
    """A ComfyUI ``SAMPLER`` that runs :func:`distillpp.sample`; with a :class:`TeacherGuider` it runs guided.

    Args:
        sampler_name: a key of ``distillpp.SAMPLERS``.
        eta: the solver's ``eta`` (``None``: the library's default).
    """

    def __init__(self, sampler_name: str, eta: float | None = None):
        if sampler_name not in distillpp.SAMPLERS:
            raise ValueError(f"sampler_name must be one of {', '.join(repr(s) for s in distillpp.SAMPLERS)}; "
                             f"got {sampler_name!r}")
        self.sampler_name = sampler_name
        self.kwargs: dict[str, Any] = {}
        if eta is not None:
            if "eta" not in inspect.signature(distillpp.SAMPLERS[sampler_name]).parameters:
                raise ValueError(f"eta is not a knob of the {sampler_name!r} sampler; use -1 (its default)")
            self.kwargs["eta"] = float(eta)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        if denoise_mask is not None:
            raise ValueError("denoise_mask: the distillpp sampler does not inpaint; use a ComfyUI sampler "
                             "(the teacher guider still guides it step by step)")
        model_options = extra_args.get("model_options", {})
        seed = extra_args.get("seed")
        model_sampling = model_wrap.inner_model.model_sampling
        kind = model_kind(model_sampling)
        if latent_image is None:
            latent_image = torch.zeros_like(noise)
        x = model_sampling.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        generator = torch.Generator().manual_seed(int(seed or 0))
        teacher = guidance = None
        if isinstance(model_wrap, TeacherGuider):
            student = model_wrap.student_denoiser(model_options, seed)
            teacher, guidance = model_wrap.teacher_denoiser(), model_wrap.guidance
        else:
            student = core.VEDenoiser(lambda x, s: model_wrap(x, s, model_options=model_options, seed=seed), kind,
                                      declared_schedule(model_sampling))
        out = core.run_sampler(self.sampler_name, student, x, sigmas, kind, teacher=teacher, guidance=guidance,
                               generator=generator, callback=callback, disable=disable_pbar, **self.kwargs)
        return model_sampling.inverse_noise_scaling(sigmas[-1], out)


def comfy_schedule(model_sampling: Any) -> Any:
    """The library's noise table of a discrete eps/v model's ``ModelSamplingDiscrete``, else ValueError.

    Args:
        model_sampling: a model's ``model_sampling`` object.
    """
    if model_kind(model_sampling) != "ve" or not hasattr(model_sampling, "linear_start"):
        raise ValueError(f"model: this preset needs a discrete eps/v model (SD1.x/SD2/SDXL), got "
                         f"{type(model_sampling).__name__}")
    table = getattr(model_sampling, "sigmas", None)
    return core.schedule_from_comfy(getattr(model_sampling, "num_timesteps", 1000), model_sampling.linear_start,
                                    model_sampling.linear_end, bool(getattr(model_sampling, "zsnr", False)), table)


def declared_schedule(model_sampling: Any) -> Any:
    """:func:`comfy_schedule`, or ``None`` for models without a discrete scaled-linear table (flow, EDM).

    Args:
        model_sampling: a model's ``model_sampling`` object.
    """
    try:
        return comfy_schedule(model_sampling)
    except ValueError:
        return None


class DistillppTeacherGuider:
    """Node: the teacher GUIDER (plugs into SamplerCustomAdvanced with any SAMPLER and SIGMAS)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "student": ("MODEL",),
                "teacher": ("MODEL",),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "student_cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "teacher_cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "strength": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 1.0, "step": 0.001, "round": 0.0001}),
                "guided_steps": ("INT", {"default": 1, "min": 0, "max": 1000}),
                "renoise": (list(core.RENOISE), {"default": "next"}),
                "noise": (list(core.NOISE), {"default": "random"}),
                "space": (list(core.SPACE), {"default": "x0"}),
                "samples": ("INT", {"default": 1, "min": 1, "max": 64,
                                    "tooltip": "K teacher re-noise draws averaged per guided step"}),
            },
            "optional": {
                "teacher_positive": ("CONDITIONING",),
                "teacher_negative": ("CONDITIONING",),
                "strength_list": ("STRING", {"default": "", "tooltip": "one strength per guided step, e.g. "
                                             "'0.05, 0.02'; overrides strength when not empty"}),
                "noise_mix": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
            },
        }

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = CATEGORY

    def get_guider(self, student, teacher, positive, negative, student_cfg, teacher_cfg, strength, guided_steps,
                   renoise, noise, space, samples, teacher_positive=None, teacher_negative=None, strength_list="",
                   noise_mix=0.5):
        guidance = core.make_guidance(strength, guided_steps, renoise, noise, space, teacher_cfg, samples,
                                      strength_list, noise_mix)
        guider = TeacherGuider(student, teacher, guidance, student_cfg)
        guider.set_conds(positive, negative, teacher_positive, teacher_negative)
        return (guider,)


class DistillppSampler:
    """Node: a SAMPLER running distillpp's samplers (identical results to the library)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sampler_name": (list(distillpp.SAMPLERS), {"default": "euler"}),
        }, "optional": {
            "eta": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 10.0, "step": 0.01,
                              "tooltip": "-1: the sampler's default; else eta of ddim / ancestral samplers"}),
        }}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = CATEGORY

    def get_sampler(self, sampler_name, eta=-1.0):
        return (DistillppSamplerObject(sampler_name, None if eta < 0 else eta),)


class DistillppSigmaPreset:
    """Node: SIGMAS of a distilled student's release scheduler (the library's grids)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "preset": (list(core.PRESETS), {"default": "lightning"}),
            "steps": ("INT", {"default": 4, "min": 1, "max": 1000}),
        }, "optional": {
            "timesteps": ("STRING", {"default": "", "tooltip": "dmd2: explicit timesteps, e.g. '999,749,499,249'"}),
        }}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY

    def get_sigmas(self, model, preset, steps, timesteps=""):
        if preset not in core.PRESETS:
            raise ValueError(f"preset must be one of {', '.join(repr(p) for p in core.PRESETS)}; got {preset!r}")
        ts = core.parse_ints(timesteps, "timesteps")
        if ts is not None and preset != "dmd2":
            raise ValueError(f"timesteps: only the dmd2 preset takes explicit timesteps, got preset {preset!r}")
        if preset == "flux-schnell":
            kind = model_kind(model.get_model_object("model_sampling"))
            if kind != "flow":
                raise ValueError("model: the flux-schnell preset needs a flow-matching (CONST) model")
            return (core.preset_sigmas(preset, steps),)
        return (core.preset_sigmas(preset, steps, comfy_schedule(model.get_model_object("model_sampling")), ts),)


NODE_CLASS_MAPPINGS = {
    "DistillppTeacherGuider": DistillppTeacherGuider,
    "DistillppSampler": DistillppSampler,
    "DistillppSigmaPreset": DistillppSigmaPreset,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DistillppTeacherGuider": "Teacher Guider (distillpp)",
    "DistillppSampler": "Sampler (distillpp)",
    "DistillppSigmaPreset": "Sigma Preset (distillpp)",
}
