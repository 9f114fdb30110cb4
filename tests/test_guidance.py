"""Teacher guidance: invariants on the analytic test bed (docs/method.md, section 4)."""

import math

import pytest
import torch

import distillpp
from distillpp import TeacherGuidance
from distillpp.analytic import GaussianMixture, GaussianMixtureDenoiser, energy_distance
from distillpp.testbed import TRUE_MIXTURE, biased_students, default_sigmas, run_config

SAMPLERS = list(distillpp.SAMPLERS)


class Counting:
    """A denoiser wrapper that records every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, x, sigma, **kw):
        self.calls.append((x.shape, sigma.clone(), kw))
        return self.inner(x, sigma, **{k: v for k, v in kw.items() if k != "cfg_scale"})


def _setup(n=64, seed=0):
    student = GaussianMixtureDenoiser(biased_students()["weights"])
    teacher = GaussianMixtureDenoiser(TRUE_MIXTURE)
    sigmas = default_sigmas()
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * float(sigmas[0])
    return student, teacher, sigmas, x


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("noise", ["random", "deterministic", "hybrid"])
def test_strength_zero_is_bit_identical(sampler, noise):
    student, teacher, sigmas, x = _setup()
    plain = distillpp.sample(student, x, sigmas, sampler=sampler, generator=torch.Generator().manual_seed(3))
    counting = Counting(teacher)
    g = TeacherGuidance(strength=0.0, steps=2, noise=noise)
    guided = distillpp.sample(student, x, sigmas, sampler=sampler, teacher=counting, guidance=g,
                              generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain, guided)
    assert counting.calls == []  # and the teacher is never evaluated


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_guidance_changes_output_and_is_reproducible(sampler):
    student, teacher, sigmas, x = _setup()
    g = TeacherGuidance(strength=0.5, steps=2)
    runs = [distillpp.sample(student, x, sigmas, sampler=sampler, teacher=teacher, guidance=g,
                             generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    plain = distillpp.sample(student, x, sigmas, sampler=sampler, generator=torch.Generator().manual_seed(5))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], plain)


def test_teacher_none_or_guidance_none_is_student_alone():
    student, teacher, sigmas, x = _setup()
    plain = distillpp.sample(student, x, sigmas, sampler="euler")
    assert torch.equal(plain, distillpp.sample(student, x, sigmas, sampler="euler", teacher=teacher))
    assert torch.equal(plain, distillpp.sample(student, x, sigmas, sampler="euler", guidance=TeacherGuidance()))


def test_guided_step_follows_the_method_exactly():
    """Step 0 of Euler, x0 space, deterministic noise, renoise next: the formulas of docs/method.md by hand."""
    student, teacher, sigmas, x = _setup()
    lam = 0.3
    seen = []
    g = TeacherGuidance(strength=lam, steps=1, noise="deterministic")
    out = distillpp.sample(student, x, sigmas, sampler="euler", teacher=teacher, guidance=g, callback=seen.append)
    s0, s1 = sigmas[0], sigmas[1]
    ones = torch.ones(x.shape[0], dtype=x.dtype)
    x0_s = student(x, s0 * ones)
    d = (x - x0_s) / s0
    x0_t = teacher(x0_s + s1 * d, s1 * ones)
    x0 = (1 - lam) * x0_s + lam * x0_t
    x1 = x0 + s1 * d
    info = seen[0]["guidance"]
    assert torch.allclose(info.x0_teacher, x0_t) and torch.allclose(info.x0, x0)
    assert torch.allclose(info.sigma_teacher, s1 * ones)
    assert seen[1]["guidance"] is None
    assert torch.allclose(seen[1]["x"], x1)
    assert torch.allclose(info.correction, (x0 - x0_s).pow(2).mean(1).sqrt())
    assert out.shape == x.shape


def test_eps_space_fusion_formula():
    student, teacher, sigmas, x = _setup()
    lam, seen = 0.2, []
    g = TeacherGuidance(strength=lam, steps=1, noise="deterministic", space="eps", renoise="same")
    distillpp.sample(student, x, sigmas, sampler="euler", teacher=teacher, guidance=g, callback=seen.append)
    s0 = sigmas[0]
    ones = torch.ones(x.shape[0], dtype=x.dtype)
    x0_s = student(x, s0 * ones)
    eps_s = (x - x0_s) / s0
    x_t = x0_s + s0 * eps_s
    eps_t = (x_t - teacher(x_t, s0 * ones)) / s0
    expected = x - s0 * (eps_s + lam * (eps_t - eps_s))
    assert torch.allclose(seen[0]["denoised"], expected)


def test_renoise_schedules_pick_the_documented_levels():
    student, teacher, sigmas, x = _setup(n=256)
    for renoise, check in [
        ("next", lambda s, i: torch.allclose(s, sigmas[i + 1].expand_as(s))),
        ("same", lambda s, i: torch.allclose(s, sigmas[i].expand_as(s))),
        ("random", lambda s, i: bool((s > 0).all() and (s <= sigmas[i] * (1 + 1e-6)).all() and s.std() > 0)),
    ]:
        seen = []
        distillpp.sample(student, x, sigmas, sampler="euler", teacher=teacher,
                         guidance=TeacherGuidance(strength=0.5, steps=2, renoise=renoise),
                         generator=torch.Generator().manual_seed(0), callback=seen.append)
        for i in range(2):
            assert check(seen[i]["guidance"].sigma_teacher, i), renoise


def test_random_renoise_uses_teacher_timesteps_when_it_has_a_schedule():
    schedule = distillpp.DiscreteVPSchedule.from_betas()
    sigmas = distillpp.schedules.lcm_sigmas(schedule, 4).double()
    table = schedule.sigmas

    class ScheduledTeacher(GaussianMixtureDenoiser):
        pass

    teacher = ScheduledTeacher(TRUE_MIXTURE)
    teacher.schedule = schedule
    student, _, _, _ = _setup()
    x = torch.randn(512, 2, dtype=torch.float64) * float(sigmas[0])
    seen = []
    distillpp.sample(student, x, sigmas, sampler="consistency", teacher=teacher,
                     guidance=TeacherGuidance(strength=0.5, steps=1, renoise="random"),
                     generator=torch.Generator().manual_seed(0), callback=seen.append)
    s = seen[0]["guidance"].sigma_teacher
    assert torch.isin(s, table).all()  # every level is one of the teacher's timesteps
    assert s.max() <= sigmas[0] * (1 + 1e-6)


def test_last_step_guidance_uses_smallest_positive_sigma():
    student, teacher, sigmas, x = _setup()
    seen = []
    n = len(sigmas) - 1
    distillpp.sample(student, x, sigmas, sampler="euler", teacher=teacher,
                     guidance=TeacherGuidance(strength=0.5, steps=n), callback=seen.append)
    assert torch.allclose(seen[-1]["guidance"].sigma_teacher, sigmas[-2].expand(x.shape[0]))


def test_per_step_strength_list_and_callable():
    student, teacher, sigmas, x = _setup()
    for strength, expected in [([0.4, 0.2], [0.4, 0.2]), (lambda i, s: 0.4 / 2**i, [0.4, 0.2])]:
        seen = []
        distillpp.sample(student, x, sigmas, sampler="euler", teacher=teacher,
                         guidance=TeacherGuidance(strength=strength, steps=2), callback=seen.append)
        assert [seen[i]["guidance"].strength for i in range(2)] == expected
    # A zero in the list skips the teacher on that step only.
    counting = Counting(teacher)
    distillpp.sample(student, x, sigmas, sampler="euler", teacher=counting,
                     guidance=TeacherGuidance(strength=[0.0, 0.3], steps=2))
    assert len(counting.calls) == 1


def test_samples_k_is_one_batched_forward_and_reduces_variance():
    student, teacher, sigmas, x = _setup(n=32)
    counting = Counting(teacher)
    distillpp.sample(student, x, sigmas, sampler="euler", teacher=counting,
                     guidance=TeacherGuidance(strength=0.5, steps=1, samples=4))
    assert len(counting.calls) == 1 and counting.calls[0][0][0] == 4 * 32

    def fused(k, seed):
        seen = []
        distillpp.sample(student, x, sigmas, sampler="euler", teacher=teacher,
                         guidance=TeacherGuidance(strength=1.0, steps=2, samples=k, renoise="same"),
                         generator=torch.Generator().manual_seed(seed), callback=seen.append)
        return seen[1]["guidance"].x0_teacher

    spread1 = torch.stack([fused(1, s) for s in range(24)]).std(0).mean()
    spread4 = torch.stack([fused(4, s) for s in range(24)]).std(0).mean()
    # Averaging 4 independent draws should halve the spread; allow generous slack.
    assert spread4 < 0.7 * spread1


def test_teacher_cfg_and_teacher_args_reach_the_teacher():
    mix = TRUE_MIXTURE
    cfg = distillpp.CFGDenoiser(GaussianMixtureDenoiser(mix))
    counting = Counting(cfg)
    # Counting strips cfg_scale before the inner call, so call CFG manually to check the kwarg arrives.
    student, _, sigmas, x = _setup(n=8)
    labels = torch.zeros(8, dtype=torch.long)
    targs = {"cond": {"labels": labels}, "uncond": {"labels": labels - 1}}
    distillpp.sample(student, x, sigmas, sampler="euler", teacher=counting,
                     guidance=TeacherGuidance(strength=0.5, steps=1, teacher_cfg=3.0, samples=2),
                     teacher_args=targs)
    (shape, _, kw), = counting.calls
    assert kw["cfg_scale"] == 3.0
    assert kw["cond"]["labels"].shape[0] == 16 and kw["uncond"]["labels"].shape[0] == 16


def test_cfg_denoiser_is_one_batched_forward_and_extrapolates():
    mix = TRUE_MIXTURE
    inner = Counting(GaussianMixtureDenoiser(mix))
    cfg = distillpp.CFGDenoiser(inner, scale=2.0)
    x = torch.randn(5, 2, dtype=torch.float64)
    sigma = torch.full((5,), 0.7, dtype=torch.float64)
    y = torch.arange(5)
    out = cfg(x, sigma, cond={"labels": y}, uncond={"labels": torch.full((5,), -1)})
    assert len(inner.calls) == 1 and inner.calls[0][0][0] == 10
    d = GaussianMixtureDenoiser(mix)
    u, c = d(x, sigma), d(x, sigma, labels=y)
    assert torch.allclose(out, u + 2.0 * (c - u))
    assert torch.allclose(cfg(x, sigma, cond={"labels": y}, uncond={"labels": y * 0 - 1}, cfg_scale=1.0), c)


def test_exact_teacher_helps_biased_student_and_next_beats_same():
    """The test bed's finding (see benchmarks/results/testbed): guiding the first two of four steps."""
    student = biased_students()["weights"]
    ref, _ = TRUE_MIXTURE.sample(3000, torch.Generator().manual_seed(12345))
    for seed in (0, 1):
        _, plain, _ = run_config(student, "euler", None, 3000, seed, ref)
        _, nxt, _ = run_config(student, "euler", TeacherGuidance(strength=0.3, steps=2, renoise="next"),
                               3000, seed, ref)
        _, same, _ = run_config(student, "euler", TeacherGuidance(strength=0.3, steps=2, renoise="same"),
                                3000, seed, ref)
        assert nxt < 0.85 * plain, (seed, plain, nxt)
        assert nxt < same, (seed, nxt, same)


def test_exact_teacher_alone_is_the_reference():
    """Sanity of the bed: the exact denoiser sampled with many steps matches the truth closely."""
    ref, _ = TRUE_MIXTURE.sample(2000, torch.Generator().manual_seed(12345))
    fine = distillpp.schedules.karras_sigmas(0.002, 20.0, 100).double()
    out, e_fine, _ = run_config(TRUE_MIXTURE, "euler", None, 2000, 0, ref, sigmas=fine)
    _, e_biased, _ = run_config(biased_students()["weights"], "euler", None, 2000, 0, ref, sigmas=fine)
    assert e_fine < 0.01 and e_biased > 3 * e_fine


def test_gaussian_mixture_denoiser_is_the_posterior_mean():
    mix = GaussianMixture(torch.tensor([[0.0, 0.0], [3.0, 0.0]]), torch.tensor([0.5, 0.3]), torch.tensor([1.0, 2.0]))
    d = GaussianMixtureDenoiser(mix)
    g = torch.Generator().manual_seed(0)
    x0, _ = mix.sample(200_000, g)
    sigma = 0.8
    x = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    pred = d(x, torch.full((len(x),), sigma, dtype=torch.float64))
    # Posterior mean minimises the MSE: it beats small perturbations of itself.
    mse = (pred - x0).pow(2).sum(1).mean()
    assert mse < (pred * 1.02 - x0).pow(2).sum(1).mean()
    assert mse < (pred + 0.02 - x0).pow(2).sum(1).mean()
    # E[x0 - D(x)] = 0 on average.
    assert (pred - x0).mean(0).abs().max() < 0.01
    assert math.isfinite(energy_distance(pred[:500], x0[:500]))


def test_teacher_sigma_keeps_the_grid_dtype_for_low_precision_samples():
    """A bf16 sample must not round the teacher's sigma (DMD2's 749 would become 750)."""
    schedule = distillpp.DiscreteVPSchedule.from_betas()
    sigmas = distillpp.schedules.timestep_sigmas(schedule, [999, 749, 499, 249])
    seen = []

    def net(z, t, **kw):
        seen.append(t.clone())
        return torch.zeros_like(z)

    den = distillpp.DiscreteVPDenoiser(net, schedule)
    x = torch.randn(2, 1, 4, 4).to(torch.bfloat16)
    distillpp.sample(den, x, sigmas, sampler="consistency", teacher=den,
                     guidance=TeacherGuidance(strength=0.5, steps=3), generator=torch.Generator().manual_seed(0))
    # student t, teacher t (next level), per guided step
    assert [int(t[0]) for t in seen[:6]] == [999, 749, 749, 499, 499, 249]


def test_teacher_schedule_is_handed_to_the_guide_explicitly():
    """``teacher_schedule=`` (no ``schedule`` attribute on the teacher) gives integer-timestep draws."""
    schedule = distillpp.DiscreteVPSchedule.from_betas()
    sigmas = distillpp.schedules.lcm_sigmas(schedule, 4).double()
    student, teacher, _, _ = _setup()
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * float(sigmas[0])
    assert not hasattr(teacher, "schedule")

    def levels(**kw):
        seen = []
        distillpp.sample(student, x, sigmas, sampler="consistency", teacher=teacher,
                         guidance=TeacherGuidance(strength=0.5, guided_steps=1, renoise="random"),
                         generator=torch.Generator().manual_seed(0), callback=seen.append, **kw)
        return seen[0]["guidance"].sigma_teacher

    assert torch.isin(levels(teacher_schedule=schedule), schedule.sigmas).all()
    assert not torch.isin(levels(), schedule.sigmas).any()  # flow-time draws without a schedule
    guide = TeacherGuidance(strength=0.5, renoise="random").bind(teacher, sigmas, torch.Generator().manual_seed(0),
                                                                 teacher_schedule=schedule)
    assert torch.isin(guide.teacher_sigma(0, 64, x.device), schedule.sigmas).all()


def test_teacher_calls_skip_strength_zero_steps_and_check_the_grid():
    sigmas = torch.tensor([14.6, 3.0, 1.0, 0.3, 0.0])
    assert TeacherGuidance(strength=0.3, guided_steps=2).teacher_calls(sigmas) == 2
    assert TeacherGuidance(strength=(0.0, 0.5), guided_steps=2).teacher_calls(sigmas) == 1
    assert TeacherGuidance(strength=0.0, guided_steps=3).teacher_calls(sigmas) == 0
    with pytest.raises(ValueError, match="guided_steps"):
        TeacherGuidance(strength=0.3, guided_steps=5).teacher_calls(sigmas)
