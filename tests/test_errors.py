"""Bad input: a ValueError naming the argument, before any model is called (SPEC section 7)."""

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
