"""Bad input: a ValueError naming the argument, before any model is called (docs/method.md, section 7)."""

import numpy as np
import pytest
import torch

import distillpp
from distillpp import NonFiniteError, TeacherGuidance


class Never:
    """A denoiser that fails the test if it is ever called."""

    def __call__(self, x, sigma, **kw):
        raise AssertionError("model was called before the arguments were validated")


SIGMAS = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0])
X = torch.randn(2, 3)


def call(**kw):
    args = dict(student=Never(), x=X, sigmas=SIGMAS, sampler="euler", teacher=Never(),
                guidance=TeacherGuidance(strength=0.1, steps=1))
    args.update(kw)
    return distillpp.sample(**args)


@pytest.mark.parametrize("kwargs, words", [
    (dict(sampler="heun"), ["sampler", "euler"]),
    (dict(sigmas=torch.tensor([1.0, 3.0, 0.0])), ["sigmas", "descending"]),
    (dict(sigmas=torch.tensor([3.0, 1.0, 0.1])), ["sigmas", "end in 0"]),
    (dict(sigmas=torch.tensor([3.0, 3.0, 0.0])), ["sigmas", "descending"]),
    (dict(sigmas=torch.tensor([3.0, -1.0, 0.0])), ["sigmas", "positive"]),
    (dict(sigmas=torch.tensor([0.0])), ["sigmas", "at least 2"]),
    (dict(sigmas=[3.0, 1.0, 0.0]), ["sigmas", "Tensor"]),
    (dict(guidance=TeacherGuidance(steps=5)), ["steps", "[0, 4]"]),
    (dict(guidance=TeacherGuidance(strength=[0.1], steps=2)), ["strength", "steps=2"]),
    (dict(guidance=TeacherGuidance(strength=lambda i, s: 1.5, steps=1)), ["strength", "[0, 1]"]),
    (dict(guidance="strong"), ["guidance", "TeacherGuidance"]),
    (dict(generator=0), ["generator"]),
    (dict(teacher=42), ["teacher"]),
])
def test_sample_rejects_bad_arguments_before_any_model_call(kwargs, words):
    with pytest.raises(ValueError) as err:
        call(**kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


@pytest.mark.parametrize("kwargs, words", [
    (dict(strength=1.5), ["strength", "[0, 1]"]),
    (dict(strength=-0.1), ["strength", "[0, 1]"]),
    (dict(strength=[0.1, 2.0], steps=2), ["strength[1]", "[0, 1]"]),
    (dict(strength="high"), ["strength"]),
    (dict(steps=-1), ["steps", ">= 0"]),
    (dict(steps=1.5), ["steps"]),
    (dict(renoise="later"), ["renoise", "'next'", "'same'", "'random'"]),
    (dict(noise="pink"), ["noise", "'random'", "'deterministic'", "'hybrid'"]),
    (dict(space="v"), ["space", "'x0'", "'eps'"]),
    (dict(samples=0), ["samples", ">= 1"]),
    (dict(noise_mix=2.0), ["noise_mix", "[0, 1]"]),
    (dict(teacher_cfg=float("nan")), ["teacher_cfg"]),
])
def test_teacher_guidance_rejects_bad_knobs(kwargs, words):
    with pytest.raises(ValueError) as err:
        TeacherGuidance(**kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_teacher_and_student_shapes_must_match():
    def student(x, sigma, **kw):
        return x * 0.5

    def teacher(x, sigma, **kw):
        return x[:, :2] * 0.5  # e.g. a teacher with other latent channels

    with pytest.raises(ValueError, match="teacher output shape .* differs from the student's"):
        distillpp.sample(student, X, SIGMAS, teacher=teacher, guidance=TeacherGuidance(strength=0.5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_teacher_names_step_and_sigma(bad):
    def student(x, sigma, **kw):
        return x * 0.5

    def teacher(x, sigma, **kw):
        return torch.full_like(x, bad)

    with pytest.raises(NonFiniteError) as err:
        distillpp.sample(student, X, SIGMAS, teacher=teacher, guidance=TeacherGuidance(strength=0.5, steps=2))
    msg = str(err.value)
    assert "teacher" in msg and "step 0" in msg and "sigma=10" in msg and "teacher sigma=3" in msg


def test_unknown_prediction_type_and_schedule_arguments():
    sched = distillpp.DiscreteVPSchedule.from_betas()
    with pytest.raises(ValueError, match="prediction_type"):
        distillpp.DiscreteVPDenoiser(lambda z, t: z, sched, prediction_type="flow")
    with pytest.raises(ValueError, match="beta_schedule"):
        distillpp.DiscreteVPSchedule.from_betas(beta_schedule="cosine-ish")
    with pytest.raises(ValueError, match="timesteps"):
        distillpp.schedules.timestep_sigmas(sched, [249, 499])
    with pytest.raises(ValueError, match="num_inference_steps"):
        distillpp.schedules.lcm_sigmas(sched, 60)
    with pytest.raises(ValueError, match="mu"):
        distillpp.schedules.flow_sigmas(4, use_dynamic_shifting=True)


# ---------------------------------------------------------------- issue 14: values taken for something else


@pytest.mark.parametrize("kwargs, words", [
    (dict(strength="1"), ["strength", "'1'"]),  # was read as a list of one character: lam = 1.0
    (dict(strength="0.5"), ["strength", "'0.5'"]),  # was "strength[1] ... got '.'"
    (dict(noise_mix="abc"), ["noise_mix", "number"]),
    (dict(teacher_cfg="abc"), ["teacher_cfg", "number"]),
    (dict(steps="1"), ["guided_steps", "integer"]),
    (dict(steps=np.float64(1.0)), ["guided_steps", "integer"]),
])
def test_teacher_guidance_refuses_strings_and_non_integers_naming_the_knob(kwargs, words):
    with pytest.raises(ValueError) as err:
        TeacherGuidance(**kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


@pytest.mark.parametrize("value, expected", [
    (np.float32(0.5), 0.5), (np.float64(0.25), 0.25), (torch.tensor(0.5), 0.5), (np.int64(1), 1.0),
])
def test_teacher_guidance_accepts_numpy_and_0d_tensor_scalars(value, expected):
    g = TeacherGuidance(strength=value, steps=np.int64(2), noise_mix=value, teacher_cfg=value)
    assert g.strength == expected and type(g.strength) is float
    assert g.guided_steps == 2 and type(g.guided_steps) is int
    assert g.noise_mix == expected and g.teacher_cfg == expected
    assert TeacherGuidance(steps=torch.tensor(3)).guided_steps == 3


@pytest.mark.parametrize("sampler, kwargs, words", [
    ("ddim", dict(eta=float("nan")), ["eta", "nan"]),
    ("ddim", dict(eta=-1.0), ["eta", ">= 0"]),
    ("ddim", dict(eta="0.5"), ["eta", "number"]),
    ("euler_ancestral", dict(s_noise=float("nan")), ["s_noise", "nan"]),
    ("dpmpp_2s_ancestral", dict(s_noise=float("inf")), ["s_noise", "finite"]),
    ("euler", dict(eta=1.0), ["'euler'", "'eta'"]),
    ("ddim", dict(etta=0.0), ["'etta'", "eta"]),
])
def test_sampler_options_are_checked_before_any_model_call(sampler, kwargs, words):
    with pytest.raises(ValueError) as err:
        call(sampler=sampler, **kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


@pytest.mark.parametrize("kwargs, words", [
    (dict(sigmas=SIGMAS.bfloat16()), ["sigmas", "bfloat16", "float32"]),
    (dict(sigmas=SIGMAS.half()), ["sigmas", "float16"]),
    (dict(x=torch.zeros(2, 3, dtype=torch.long)), ["x", "floating"]),
    (dict(extra_args=[1]), ["extra_args", "dict"]),
    (dict(teacher_args="cond"), ["teacher_args", "dict"]),
    (dict(callback=3), ["callback"]),
    (dict(sampler=["euler"]), ["sampler"]),
])
def test_sample_refuses_wrong_types_naming_the_argument(kwargs, words):
    with pytest.raises(ValueError) as err:
        call(**kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_bf16_samples_keep_the_float32_grid_timesteps():
    """The grid stays float32 while x is bf16: LCM's 759 is still 759 (a bf16 grid said 758 and is refused)."""
    sched = distillpp.DiscreteVPSchedule.from_betas()
    sigmas = distillpp.schedules.lcm_sigmas(sched, 4)
    seen = []

    def net(z, t, **kw):
        seen.append(t.tolist())
        return torch.zeros_like(z)

    x = torch.randn(2, 3, dtype=torch.bfloat16)
    out = distillpp.sample(distillpp.LCMDenoiser(net, sched), x, sigmas, sampler="consistency",
                           generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert [t[0] for t in seen] == [999, 759, 499, 259]
    assert sched.sigma_to_t(sigmas[1:2].bfloat16()).item() != 759  # what a bf16 grid would have used


@pytest.mark.parametrize("kwargs, words", [
    (dict(beta_end=1.5), ["beta_end", "< 1"]),
    (dict(beta_start=0.012, beta_end=0.00085), ["beta_start <= beta_end"]),
    (dict(beta_start=0.0), ["beta_start"]),
    (dict(beta_start=float("nan")), ["beta_start"]),
    (dict(num_train_timesteps=0), ["num_train_timesteps", ">= 1"]),
    (dict(num_train_timesteps=10.5), ["num_train_timesteps", "integer"]),
    (dict(beta_end="0.012"), ["beta_end", "number"]),
    (dict(trained_betas=[0.1, 1.0]), ["trained_betas", "(0, 1)"]),
    (dict(trained_betas=[0.02, 0.01, 0.001]), ["trained_betas", "reversed"]),
    (dict(trained_betas=[]), ["trained_betas"]),
    (dict(beta_start=0.1, beta_end=0.9, beta_schedule="linear"), ["beta_end", "alphas_cumprod to 0"]),
    (dict(trained_betas=["a"]), ["trained_betas"]),
])
def test_from_betas_refuses_tables_with_infinite_or_nan_sigmas(kwargs, words):
    with pytest.raises(ValueError) as err:
        distillpp.DiscreteVPSchedule.from_betas(**kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


@pytest.mark.parametrize("fn, kwargs, words", [
    ("karras_sigmas", dict(sigma_min=0.1, sigma_max=10.0, n=4, rho=0.0), ["rho", "> 0"]),
    ("karras_sigmas", dict(sigma_min=0.1, sigma_max=10.0, n=4, rho=-7.0), ["rho"]),
    ("karras_sigmas", dict(sigma_min=0.1, sigma_max=10.0, n=4, rho=float("nan")), ["rho"]),
    ("karras_sigmas", dict(sigma_min=0.1, sigma_max=float("inf"), n=4), ["sigma_max"]),
    ("karras_sigmas", dict(sigma_min=0.1, sigma_max=10.0, n=2.5), ["n", "integer"]),
    ("karras_sigmas", dict(sigma_min="0.1", sigma_max=10.0, n=4), ["sigma_min", "number"]),
    ("flow_sigmas", dict(num_inference_steps="4"), ["num_inference_steps", "integer"]),
    ("flow_sigmas", dict(num_inference_steps=4, shift=0.0), ["shift", "> 0"]),
    ("flow_sigmas", dict(num_inference_steps=4, use_dynamic_shifting=True, mu=float("nan")), ["mu", "finite"]),
])
def test_grid_constructors_name_the_bad_argument(fn, kwargs, words):
    with pytest.raises(ValueError) as err:
        getattr(distillpp.schedules, fn)(**kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


@pytest.mark.parametrize("fn, args, words", [
    ("euler_sigmas", (4.5,), ["num_inference_steps", "integer"]),
    ("ddim_sigmas", ("4",), ["num_inference_steps", "integer"]),
    ("lcm_sigmas", (0,), ["num_inference_steps", ">= 1"]),
    ("lcm_sigmas", (4, 0), ["original_inference_steps"]),
    ("timestep_sigmas", ([999, 749.5],), ["timesteps", "integers"]),
    ("timestep_sigmas", (["999"],), ["timesteps", "integers"]),
])
def test_vp_grids_name_the_bad_argument(fn, args, words):
    sched = distillpp.DiscreteVPSchedule.from_betas()
    with pytest.raises(ValueError) as err:
        getattr(distillpp.schedules, fn)(sched, *args)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


# ---------------------------------------------------------------- issue 14: guidance that silently does nothing


def _student(x, sigma, **kw):
    return x * 0.5


def test_guidance_without_teacher_warns_and_samples_the_student_alone():
    plain = distillpp.sample(_student, X, SIGMAS)
    with pytest.warns(UserWarning, match="guidance= was given without teacher="):
        out = distillpp.sample(_student, X, SIGMAS, guidance=TeacherGuidance(strength=0.5))
    assert torch.equal(out, plain)


def test_teacher_without_guidance_warns_and_samples_the_student_alone():
    plain = distillpp.sample(_student, X, SIGMAS)
    with pytest.warns(UserWarning, match="teacher= was given without guidance="):
        out = distillpp.sample(_student, X, SIGMAS, teacher=_student)
    assert torch.equal(out, plain)


@pytest.mark.parametrize("guidance", [None, TeacherGuidance(strength=0.0), TeacherGuidance(steps=0)])
def test_no_warning_when_nothing_is_asked_of_a_missing_teacher(guidance, recwarn):
    distillpp.sample(_student, X, SIGMAS, guidance=guidance)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("teacher_args, extra_args, scale, teacher_cfg", [
    (None, None, 7.5, None),  # no conditioning at all: was the conditional branch only
    ({"class_labels": torch.zeros(2)}, None, 1.0, 7.5),  # flat teacher_args with teacher_cfg=7.5
    (None, {"class_labels": torch.zeros(2)}, 2.0, None),  # teacher_args defaults to flat extra_args
    ({"cond": {"class_labels": torch.zeros(2)}}, None, 2.0, None),  # no uncond
])
def test_cfg_teacher_without_cond_and_uncond_is_refused_before_any_model_call(teacher_args, extra_args, scale,
                                                                               teacher_cfg):
    teacher = distillpp.CFGDenoiser(Never(), scale=scale)
    with pytest.raises(ValueError) as err:
        call(teacher=teacher, teacher_args=teacher_args, extra_args=extra_args,
             guidance=TeacherGuidance(strength=0.5, teacher_cfg=teacher_cfg))
    assert "teacher_args" in str(err.value) and "'uncond'" in str(err.value)


def test_cfg_teacher_at_scale_one_needs_no_uncond():
    teacher = distillpp.CFGDenoiser(lambda x, sigma, **kw: x * 0.25, scale=1.0)
    out = distillpp.sample(_student, X, SIGMAS, teacher=teacher, guidance=TeacherGuidance(strength=0.5))
    assert not torch.equal(out, distillpp.sample(_student, X, SIGMAS))


# ---------------------------------------------------------------- issue 14: student output checked when unguided


@pytest.mark.parametrize("sampler", ["euler", "consistency", "ddim"])
def test_student_output_that_would_broadcast_is_refused_unguided(sampler):
    def student(x, sigma, **kw):
        return x[:, :1] * 0.5  # [B, 1] broadcasts against [B, 3] in every solver update

    with pytest.raises(ValueError, match=r"student output \(2, 1\) differs from its input's shape \(2, 3\)"):
        distillpp.sample(student, X, SIGMAS, sampler=sampler, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sampler", ["euler", "consistency", "ddim"])
@pytest.mark.parametrize("guided", [False, True])
def test_non_finite_student_raises_naming_the_step_when_unguided(sampler, guided):
    """NaN from the student at step 2 (sigma 1): unguided, or after a guided first step, no "valid" result."""

    def student(x, sigma, **kw):
        return torch.full_like(x, float("nan")) if float(sigma[0]) < 2 else x * 0.5

    extra = dict(teacher=_student, guidance=TeacherGuidance(strength=0.5, steps=1)) if guided else {}
    with pytest.raises(NonFiniteError) as err:
        distillpp.sample(student, X, SIGMAS, sampler=sampler, generator=torch.Generator().manual_seed(0), **extra)
    assert "student" in str(err.value) and "step 2" in str(err.value) and "sigma=1" in str(err.value)
