"""Per-image noise: a list of generators, one per image, makes each image independent of its batch."""

import pytest
import torch

import distillpp
from distillpp import TeacherGuidance
from distillpp.analytic import GaussianMixtureDenoiser
from distillpp.testbed import TRUE_MIXTURE, biased_students, default_sigmas

GUIDANCE = {
    "unguided": None,
    "guided": TeacherGuidance(strength=0.4, guided_steps=2, noise="hybrid"),
    "guided-random-k2": TeacherGuidance(strength=0.4, guided_steps=3, renoise="random", samples=2),
}


@pytest.mark.parametrize("guidance", list(GUIDANCE))
@pytest.mark.parametrize("sampler", list(distillpp.SAMPLERS))
def test_batch_with_one_generator_per_image_equals_batch_one_runs(sampler, guidance):
    student = GaussianMixtureDenoiser(biased_students()["weights"])
    teacher = GaussianMixtureDenoiser(TRUE_MIXTURE)
    sigmas = default_sigmas()
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * float(sigmas[0])
    g = GUIDANCE[guidance]
    kw = dict(sampler=sampler, teacher=teacher if g else None, guidance=g)
    seeds = (10, 11, 12)
    batch = distillpp.sample(student, x, sigmas, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw)
    rows = [distillpp.sample(student, x[b:b + 1], sigmas, generator=[torch.Generator().manual_seed(s)], **kw)
            for b, s in enumerate(seeds)]
    torch.testing.assert_close(batch, torch.cat(rows), rtol=0, atol=1e-12)
    # A list of one generator is that generator.
    single = distillpp.sample(student, x[:1], sigmas, generator=torch.Generator().manual_seed(seeds[0]), **kw)
    assert torch.equal(single, rows[0])
    if sampler not in ("euler", "ddim") or g is not None:  # something random happened: the seeds matter
        other = distillpp.sample(student, x, sigmas, generator=[torch.Generator().manual_seed(s) for s in (10, 99, 12)],
                                 **kw)
        assert torch.equal(other[0], batch[0]) and not torch.equal(other[1], batch[1])


@pytest.mark.parametrize("generator, words", [
    ([torch.Generator(), torch.Generator()], ["generator", "2", "batch of 3"]),
    ([torch.Generator(), 0, torch.Generator()], ["generator", "list"]),
    ("seed", ["generator"]),
])
def test_generator_list_must_match_the_batch(generator, words):
    def never(x, sigma, **kw):
        raise AssertionError("model called before the arguments were validated")

    with pytest.raises(ValueError) as err:
        distillpp.sample(never, torch.randn(3, 2), default_sigmas().float(), generator=generator)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
