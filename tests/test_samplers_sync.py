"""No host synchronisation inside a guided sampling loop, and non-finite outputs still named by step.

A CPU run cannot observe CUDA synchronisations, so this counts what would cause them: every Python-level
read of a tensor's value (``item``, ``tolist``, ``numpy``, ``cpu``, ``float()``, ``int()``, ``bool()``,
``__index__``) between the first model evaluation and the sampler's return. Preparing the run (reading
the grid once, binding the guide) and the one read of the finiteness flags after the run are outside
that window by design.
"""

import pytest
import torch

import distillpp
from distillpp import NonFiniteError, TeacherGuidance
from distillpp.samplers import SAMPLERS

READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")
SCHED = distillpp.DiscreteVPSchedule.from_betas()


@pytest.fixture
def reads(monkeypatch):
    count = [0]
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


class Marked:
    """A denoiser that notes the read count at its first call."""

    def __init__(self, inner, count, first):
        self.inner, self.count, self.first = inner, count, first

    def __call__(self, x, sigma, **kw):
        if not self.first:
            self.first.append(self.count[0])
        return self.inner(x, sigma, **kw)


def _vp(scale):
    return distillpp.DiscreteVPDenoiser(lambda z, t: scale * z, SCHED)


CASES = [
    (sampler, g) for sampler in SAMPLERS for g in (
        TeacherGuidance(strength=0.3, guided_steps=3, renoise="next", noise="hybrid"),
        TeacherGuidance(strength=[0.3, 0.0, 0.2], guided_steps=3, renoise="random", samples=2, space="eps"),
    )
]


@pytest.mark.parametrize("generator", ["one", "per-image"])
@pytest.mark.parametrize("sampler,guidance", CASES, ids=[f"{s}-{g.renoise}" for s, g in CASES])
def test_guided_loop_reads_no_tensor_back_to_the_host(reads, sampler, guidance, generator):
    sigmas = distillpp.schedules.lcm_sigmas(SCHED, 4)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    gen = (torch.Generator().manual_seed(1) if generator == "one"
           else [torch.Generator().manual_seed(s) for s in (1, 2)])
    first = []
    student, teacher = Marked(_vp(0.1), reads, first), Marked(_vp(0.05), reads, first)
    guide = guidance.bind(teacher, sigmas, gen, {}, teacher_schedule=SCHED)
    knobs = {"schedule": SCHED} if sampler == "tcd" else {}
    out = SAMPLERS[sampler](student, x, sigmas, generator=gen, guide=guide, **knobs)
    assert first and reads[0] == first[0], f"{reads[0] - first[0]} host reads inside the loop"
    guide.raise_if_non_finite()
    assert torch.isfinite(out).all()


def test_cfgpp_loop_reads_no_tensor_back_to_the_host(reads):
    sigmas = distillpp.schedules.lcm_sigmas(SCHED, 4)
    x = torch.randn(2, 3, 4, 4) * float(sigmas[0])
    first = []
    student = distillpp.CFGDenoiser(Marked(_vp(0.1), reads, first), scale=3.0)
    args = {"cond": {}, "uncond": {}}
    SAMPLERS["dpmpp_2s_ancestral"](student, x, sigmas, extra_args=args, cfgpp=True)
    assert first and reads[0] == first[0]


def _nan_after(step_sigma, value):
    """A denoiser that returns ``value`` everywhere once sigma drops to ``step_sigma`` or below."""

    def den(x, sigma, **kw):
        out = 0.5 * x
        return torch.where(sigma.reshape(-1, 1) <= step_sigma * (1 + 1e-6), torch.full_like(out, value), out)

    return den


@pytest.mark.parametrize("who", ["student", "teacher"])
def test_non_finite_error_names_the_first_bad_step_after_the_run(who):
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0])
    x = torch.randn(2, 3)
    healthy = lambda x, sigma, **kw: 0.5 * x  # noqa: E731
    # The student goes bad at sigma 3 (step 1); the teacher, re-noised to the next sigma, at step 1 too.
    student = _nan_after(3.0, float("nan")) if who == "student" else healthy
    teacher = _nan_after(1.0, float("inf")) if who == "teacher" else healthy
    with pytest.raises(NonFiniteError) as err:
        distillpp.sample(student, x, sigmas, teacher=teacher, guidance=TeacherGuidance(strength=0.5, guided_steps=3))
    msg = str(err.value)
    assert f"the {who} returned" in msg and "step 1 (sigma=3" in msg, msg


@pytest.fixture
def device_reads(monkeypatch):
    """Meta tensors stand in for GPU tensors: every read of one is recorded (it would synchronise).

    A read of a bool meta tensor's values (the finiteness flags) answers "all finite"; any other raises.
    """
    log = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if self.device.type != "meta":
                return _original(self, *args, **kwargs)
            log.append(_name)
            if _name == "tolist" and self.dtype == torch.bool:
                return [True] * self.numel()
            raise AssertionError(f"{_name}() of a device tensor {tuple(self.shape)} {self.dtype}")

        monkeypatch.setattr(torch.Tensor, name, counted)
    return log


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("guided", [False, True, "random"])
def test_a_device_run_reads_back_only_its_finiteness_flags(device_reads, sampler, guided):
    # The host grid is read as floats; of the device's tensors, only the flags are read, once per
    # denoiser after the loop (the grid was copied to the device and read back three times before).
    # "random": a discrete teacher's timesteps are drawn from its table, copied to the device up front.
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0])
    x = torch.empty(2, 3, 4, device="meta")
    den = lambda x, sigma, **kw: 0.5 * x  # noqa: E731
    kwargs = dict(teacher=den, guidance=TeacherGuidance(strength=0.3, guided_steps=2, noise="hybrid")) if guided \
        else {}
    if guided == "random":
        kwargs.update(guidance=TeacherGuidance(strength=0.3, guided_steps=2, renoise="random"), teacher_schedule=SCHED)
    out = distillpp.sample(den, x, sigmas, sampler=sampler, **kwargs)
    assert out.device.type == "meta"
    assert device_reads == ["tolist"] * (2 if guided else 1)
