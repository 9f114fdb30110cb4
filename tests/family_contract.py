"""The invariants every model family of the guided pipeline must keep (diffusers' ``PipelineTesterMixin`` idea).

A family's test class inherits :class:`FamilyContract` and provides three things:

- ``make()``: ``(guided_pipeline, reference)``: the :class:`~distillpp.pipelines.GuidedPipeline` over tiny
  models, and ``reference(prompts, generator, **kw) -> images`` giving the family's own output for
  the same call (the student's diffusers pipeline, or the plain sampler for the zoo);
- ``PROMPTS``: two prompts the family accepts;
- ``CALL``: the keyword arguments of every call (size, ``output_type``, family options).

The suite: strength 0 equals the reference; guidance changes the output reproducibly and runs the
teacher exactly ``guided_steps`` times; bad arguments fail before any model runs; batches of several
prompts and images work; one generator per image makes each image independent of its batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

GUIDED = dict(strength=0.5, guided_steps=1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class CallCounter:
    """Counts the forwards of a module (and the batch of each)."""

    def __init__(self, module: torch.nn.Module):
        self.batches: list[int] = []
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        self.batches.append(x.shape[0])

    def remove(self) -> None:
        self.handle.remove()


def as_array(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.detach().float().cpu().numpy()
    return np.asarray(images, dtype=np.float32)


class FamilyContract:
    PROMPTS: tuple[str, str] = ("a cat", "a dog")
    CALL: dict = {}
    ATOL = 1e-4
    RTOL = 1e-5  # random tiny models can produce latents in the hundreds

    def make(self):  # pragma: no cover - provided by each family
        raise NotImplementedError

    @pytest.fixture(scope="class")
    def made(self):
        return self.make()

    def run(self, pipe, prompts=None, seed=0, **kw):
        prompts = list(self.PROMPTS[:1]) if prompts is None else prompts
        return pipe(prompts, generator=gen(seed), **{**self.CALL, **kw}).images

    def test_strength_zero_equals_the_family_reference(self, made):
        pipe, reference = made
        teacher = CallCounter(pipe.family.teacher_module)
        try:
            ours = self.run(pipe, strength=0.0)
        finally:
            teacher.remove()
        ref = reference(list(self.PROMPTS[:1]), gen(0), **self.CALL)
        assert teacher.batches == []  # strength 0 never runs the teacher
        np.testing.assert_allclose(as_array(ours), as_array(ref), atol=self.ATOL, rtol=self.RTOL)

    def test_guidance_changes_the_output_reproducibly(self, made):
        pipe, _ = made
        plain = as_array(self.run(pipe, strength=0.0))
        a, b = as_array(self.run(pipe, **GUIDED)), as_array(self.run(pipe, **GUIDED))
        np.testing.assert_array_equal(a, b)
        assert np.abs(a - plain).max() > 1e-4
        assert not np.array_equal(as_array(self.run(pipe, seed=1, **GUIDED)), a)

    @pytest.mark.parametrize("guided_steps", [1, 2])
    def test_teacher_runs_exactly_guided_steps_times(self, made, guided_steps):
        pipe, _ = made
        if pipe.family.teacher_module is pipe.family.student_module:
            pytest.skip("adapter-off teacher: counted by the LoRA tests")
        teacher = CallCounter(pipe.family.teacher_module)
        try:
            self.run(pipe, strength=0.3, guided_steps=guided_steps, num_inference_steps=3)
        finally:
            teacher.remove()
        assert len(teacher.batches) == guided_steps

    @pytest.mark.parametrize("bad, name", [
        (dict(strength=1.5), "strength"),
        (dict(guided_steps=9), "guided_steps"),
        (dict(renoise="later"), "renoise"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(height=-8), "height"),
        (dict(generator="seed"), "generator"),
        (dict(not_an_option=1), "not_an_option"),
    ])
    def test_bad_arguments_fail_before_any_model_runs(self, made, bad, name):
        pipe, _ = made
        counters = [CallCounter(m) for m in {id(m): m for m in (pipe.family.student_module,
                                                                 pipe.family.teacher_module)}.values()]
        try:
            kw = {**self.CALL, **bad}
            gen_kw = {} if "generator" in bad else {"generator": gen()}
            with pytest.raises(ValueError, match=name):
                pipe(list(self.PROMPTS[:1]), **gen_kw, **kw)
        finally:
            for c in counters:
                c.remove()
        assert all(c.batches == [] for c in counters)

    def test_batches_of_prompts_and_images(self, made):
        pipe, _ = made
        out = as_array(self.run(pipe, prompts=list(self.PROMPTS), num_images_per_prompt=2, **GUIDED))
        assert out.shape[0] == 4 and np.isfinite(out).all()
        assert not np.array_equal(out[0], out[1])  # different noise per image

    def test_one_generator_per_image_makes_images_independent_of_the_batch(self, made):
        pipe, _ = made
        prompt = self.PROMPTS[0]
        batch = as_array(pipe([prompt, prompt], generator=[gen(3), gen(4)], **{**self.CALL, **GUIDED}).images)
        for row, seed in ((0, 3), (1, 4)):
            alone = as_array(pipe([prompt], generator=[gen(seed)], **{**self.CALL, **GUIDED}).images)
            # Equal up to float accumulation order (another batch size picks other kernels): 1e-5 of the scale.
            scale = max(1.0, float(np.abs(alone).max()))
            np.testing.assert_allclose(batch[row], alone[0], atol=1e-5 * scale, rtol=0)
