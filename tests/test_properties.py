"""Property-based tests (hypothesis): valid input gives finite output of the input's shape and dtype;
invalid input gives a ValueError naming the parameter, never an error from inside torch.

Analytic denoisers only (the exact posterior mean of N(0, s^2 I) data, ``x * s^2 / (s^2 + sigma^2)``),
few examples each, no deadline: the whole file runs in seconds.
"""

import contextlib
import io
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import distillpp  # noqa: E402
from distillpp import TeacherGuidance, cli, demo  # noqa: E402
from distillpp.guidance import NOISE, RENOISE, SPACE  # noqa: E402
from distillpp.schedules import (  # noqa: E402
    DiscreteVPSchedule,
    ddim_sigmas,
    euler_sigmas,
    karras_sigmas,
    lcm_sigmas,
)

FAST = settings(max_examples=30, deadline=None, derandomize=True)
# Samplers that need nothing beyond sample()'s common arguments.
PLAIN_SAMPLERS = [s for s in ("euler", "euler_ancestral", "consistency", "ddim", "dpmpp_2s_ancestral")
                  if s in distillpp.SAMPLERS]


def gaussian_denoiser(scale: float):
    """Exact x0 = E[x0 | x] for x0 ~ N(0, scale^2 I), x = x0 + sigma * eps."""

    def denoise(x, sigma, **cond):
        s = sigma.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        return (x.double() * scale**2 / (scale**2 + s**2)).to(x.dtype)

    return denoise


class Never:
    def __call__(self, x, sigma, **kw):
        raise AssertionError("a model ran before the arguments were validated")


shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3))
dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
grids = st.builds(
    lambda lo, ratio, n, rho: karras_sigmas(lo, lo * ratio, n, rho),
    st.floats(0.002, 1.0), st.floats(1.5, 1000.0), st.integers(1, 5), st.floats(0.5, 10.0),
)


@st.composite
def guidances(draw, steps: int):
    guided = draw(st.integers(0, steps))
    if draw(st.booleans()):
        strength = draw(st.floats(0.0, 1.0))
    else:
        strength = draw(st.lists(st.floats(0.0, 1.0), min_size=guided, max_size=guided + 1))
    return TeacherGuidance(
        strength=strength, guided_steps=guided, renoise=draw(st.sampled_from(RENOISE)),
        noise=draw(st.sampled_from(NOISE)), space=draw(st.sampled_from(SPACE)),
        samples=draw(st.integers(1, 3)), noise_mix=draw(st.floats(0.0, 1.0)),
    )


@FAST
@given(shape=shapes, dtype=dtypes, sigmas=grids, sampler=st.sampled_from(PLAIN_SAMPLERS), data=st.data(),
       seed=st.integers(0, 2**31 - 1))
def test_valid_sample_calls_give_finite_output_of_the_input_shape_and_dtype(shape, dtype, sigmas, sampler, data,
                                                                              seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * float(sigmas[0])).to(dtype)
    guided = data.draw(st.booleans())
    kwargs = {}
    if guided:
        kwargs = dict(teacher=gaussian_denoiser(1.0), guidance=data.draw(guidances(len(sigmas) - 1)))
    if sampler in ("ddim", "euler_ancestral", "dpmpp_2s_ancestral"):
        kwargs["eta"] = data.draw(st.floats(0.0, 1.0))
    out = distillpp.sample(gaussian_denoiser(0.8), x, sigmas, sampler=sampler, generator=gen, **kwargs)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out.float()).all()


SIGMAS = torch.tensor([10.0, 3.0, 1.0, 0.0])
X = torch.zeros(2, 3)
bad_numbers = st.one_of(st.just(float("nan")), st.just(float("inf")), st.floats(max_value=-1e-6, allow_nan=False),
                        st.text(max_size=3), st.none(), st.lists(st.floats(0, 1), max_size=2))
BAD_SAMPLE_ARGS = {
    "sampler": st.one_of(st.text(max_size=8).filter(lambda s: s not in distillpp.SAMPLERS), st.integers(),
                         st.lists(st.just("euler"), min_size=1, max_size=1)),
    "sigmas": st.one_of(
        st.lists(st.floats(0, 10), min_size=1, max_size=4),  # not a tensor
        st.just(torch.tensor([1.0, 3.0, 0.0])), st.just(torch.tensor([3.0, 1.0, 0.5])),
        st.just(torch.tensor([3.0, float("nan"), 0.0])), st.just(SIGMAS.bfloat16()), st.just(SIGMAS.half()),
        st.just(torch.tensor([[3.0, 0.0]])), st.just(torch.tensor([0.0])), st.just(SIGMAS.long()),
    ),
    "x": st.one_of(st.just(torch.zeros(2, 3, dtype=torch.long)), st.just(torch.tensor(1.0)), st.lists(st.floats())),
    "guidance": st.one_of(st.text(max_size=5), st.integers(), st.just({"strength": 0.1})),
    "generator": st.one_of(st.integers(), st.text(max_size=3)),
    "extra_args": st.one_of(st.lists(st.integers(), max_size=2), st.text(max_size=3), st.integers()),
    "teacher_args": st.one_of(st.lists(st.integers(), max_size=2), st.text(max_size=3)),
    "teacher": st.one_of(st.integers(), st.text(max_size=3)),
    "student": st.one_of(st.integers(), st.text(max_size=3)),
    "callback": st.one_of(st.integers(), st.text(min_size=1, max_size=3)),
    "eta": bad_numbers,
}


@FAST
@given(name=st.sampled_from(sorted(BAD_SAMPLE_ARGS)), data=st.data())
def test_invalid_sample_arguments_raise_a_value_error_naming_them(name, data):
    args = dict(student=Never(), x=X, sigmas=SIGMAS, sampler="ddim", teacher=Never(),
                guidance=TeacherGuidance(strength=0.5))
    args[name] = data.draw(BAD_SAMPLE_ARGS[name])
    with pytest.raises(ValueError) as err:
        distillpp.sample(**args)
    assert name in str(err.value), str(err.value)


@FAST
@given(strength=st.floats(0, 1), steps=st.integers(0, 8), renoise=st.sampled_from(RENOISE),
       noise=st.sampled_from(NOISE), space=st.sampled_from(SPACE), samples=st.integers(1, 4),
       noise_mix=st.floats(0, 1), cfg=st.one_of(st.none(), st.floats(-20, 20)), wrap=st.sampled_from(["py", "np", "t"]))
def test_valid_teacher_guidance_knobs_are_kept_as_plain_python_values(strength, steps, renoise, noise, space,
                                                                      samples, noise_mix, cfg, wrap):
    np = pytest.importorskip("numpy")
    box = {"py": lambda v: v, "np": lambda v: np.asarray(v)[()], "t": torch.tensor}[wrap]
    g = TeacherGuidance(strength=box(strength), guided_steps=box(steps), renoise=renoise, noise=noise, space=space,
                        samples=box(samples), noise_mix=box(noise_mix), teacher_cfg=None if cfg is None else box(cfg))
    assert type(g.strength) is float and g.strength == pytest.approx(strength, rel=1e-6)
    assert type(g.guided_steps) is int and g.guided_steps == steps == g.steps
    assert type(g.samples) is int and type(g.noise_mix) is float
    assert g.teacher_cfg is None or type(g.teacher_cfg) is float


BAD_KNOBS = {
    "strength": st.one_of(st.floats(1.0001, 1e6), st.floats(-1e6, -1e-6), st.just(float("nan")), st.text(max_size=4),
                          st.lists(st.floats(1.01, 5), min_size=1, max_size=2), st.just(True)),
    "guided_steps": st.one_of(st.integers(max_value=-1), st.floats(0.5, 3.5).filter(lambda v: v != int(v)),
                              st.text(max_size=3), st.just(True)),
    "renoise": st.text(max_size=6).filter(lambda s: s not in RENOISE),
    "noise": st.text(max_size=6).filter(lambda s: s not in NOISE),
    "space": st.one_of(st.text(max_size=4).filter(lambda s: s not in SPACE), st.integers()),
    "samples": st.one_of(st.integers(max_value=0), st.floats(1.5, 2.5), st.text(max_size=2)),
    "noise_mix": st.one_of(st.floats(1.0001, 10), st.floats(-10, -1e-6), st.just(float("nan")), st.text(max_size=3)),
    "teacher_cfg": st.one_of(st.just(float("nan")), st.just(float("inf")), st.text(max_size=3)),
}


@FAST
@given(name=st.sampled_from(sorted(BAD_KNOBS)), data=st.data())
def test_invalid_teacher_guidance_knobs_raise_a_value_error_naming_them(name, data):
    with pytest.raises(ValueError) as err:
        TeacherGuidance(**{name: data.draw(BAD_KNOBS[name])})
    assert name in str(err.value), str(err.value)


@FAST
@given(T=st.integers(2, 1000), lo=st.floats(1e-5, 0.02), hi=st.floats(0.02, 0.05),
       kind=st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]), data=st.data())
def test_valid_schedules_and_grids_are_finite_and_descending(T, lo, hi, kind, data):
    sched = DiscreteVPSchedule.from_betas(num_train_timesteps=T, beta_start=lo, beta_end=hi, beta_schedule=kind)
    sig = sched.sigmas
    assert sig.shape == (T,) and torch.isfinite(sig).all() and (sig > 0).all() and (sig[1:] > sig[:-1]).all()
    n = data.draw(st.integers(1, min(T, 20)))
    for grid in (euler_sigmas(sched, n, data.draw(st.sampled_from(["linspace", "leading", "trailing"]))),
                 ddim_sigmas(sched, n, "trailing"), lcm_sigmas(sched, 1, 1)):
        assert grid.dtype == torch.float32
        distillpp.check_sigmas(grid)
    if T >= 50:
        distillpp.check_sigmas(lcm_sigmas(sched, data.draw(st.integers(1, 50)), 50))


BAD_SCHEDULE = {
    "num_train_timesteps": st.one_of(st.integers(max_value=0), st.floats(1.5, 9.5), st.text(max_size=3)),
    "beta_start": st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.text(max_size=3)),
    "beta_end": st.one_of(st.floats(1.0, 10.0), st.floats(0.0, 0.0008), st.just(float("nan"))),
    "trained_betas": st.one_of(st.lists(st.floats(1.0, 5.0), min_size=1, max_size=3), st.just([]),
                               st.just([0.02, 0.01]), st.lists(st.text(min_size=1, max_size=2), min_size=1, max_size=2)),
}


@FAST
@given(name=st.sampled_from(sorted(BAD_SCHEDULE)), data=st.data())
def test_invalid_schedules_raise_a_value_error_naming_the_argument(name, data):
    with pytest.raises(ValueError) as err:
        DiscreteVPSchedule.from_betas(**{name: data.draw(BAD_SCHEDULE[name])})
    assert name in str(err.value), str(err.value)


@FAST
@given(name=st.sampled_from(["sigma_min", "sigma_max", "n", "rho"]), data=st.data())
def test_invalid_karras_grids_raise_a_value_error_naming_the_argument(name, data):
    bad = {
        "sigma_min": st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.floats(20.0, 1e6), st.text(max_size=2)),
        "sigma_max": st.one_of(st.floats(-5.0, 0.1), st.just(float("inf")), st.just(float("nan"))),
        "n": st.one_of(st.integers(max_value=0), st.floats(1.5, 3.5), st.text(max_size=2)),
        "rho": st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.just(float("inf")), st.text(max_size=2)),
    }[name]
    args = dict(sigma_min=0.1, sigma_max=10.0, n=4, rho=7.0)
    args[name] = data.draw(bad)
    with pytest.raises(ValueError) as err:
        karras_sigmas(**args)
    assert name in str(err.value) or (name.startswith("sigma") and "sigma_min < sigma_max" in str(err.value))


seed_lists = st.lists(st.integers(0, 10**6), min_size=1, max_size=6)


@FAST
@given(seeds=seed_lists, style=st.sampled_from(["space", "comma", "mixed"]), command=st.sampled_from(["demo", "testbed"]))
def test_seed_syntaxes_parse_to_the_same_list(seeds, style, command):
    words = {"space": [str(s) for s in seeds], "comma": [",".join(map(str, seeds))],
             "mixed": [",".join(map(str, seeds[:1]))] + [str(s) for s in seeds[1:]]}[style]
    assert cli.build_parser([command]).parse_args([command, "--seeds", *words]).seeds == seeds


@FAST
@given(text=st.text(max_size=12))
def test_cli_list_parsers_raise_value_errors_naming_the_option_or_parse(text):
    for parse, option in ((cli.parse_int_list, "--seeds"), (demo.parse_classes, "--classes")):
        try:
            values = parse(text)
        except ValueError as err:
            assert option in str(err)
        else:
            assert values and all(isinstance(v, int) and v >= 0 for v in values)
            if option == "--classes":
                assert all(0 <= v <= 9 for v in values)


@FAST
@given(option=st.sampled_from(["--batch-size", "--per-class", "--threads", "--guided-steps", "--teacher-cfg"]),
       value=st.one_of(st.integers(-5, 5).map(str), st.text(max_size=4), st.sampled_from(["nan", "inf", "1e3"])))
def test_demo_options_are_accepted_or_refused_by_name(option, value):
    parser = cli.build_parser(["demo"])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(["demo", option, value])
    except SystemExit as stop:
        assert stop.code == 2 and option in err.getvalue()
        return
    number = getattr(args, option[2:].replace("-", "_"))
    assert isinstance(number, (int, float)) and math.isfinite(number)
    assert option == "--teacher-cfg" or number >= (0 if option == "--threads" else 1)
