"""The GPU fast path's CPU-side logic: mode checks, the CPU fallback, signature keying, graph reuse.

CUDA graphs cannot be captured on the CI machine, so the capture is replaced by a stand-in with the
same contract (static inputs in, static outputs written by ``replay()``); everything around it
(keying, static-buffer copies, copy-out, adapter-state keys, recapture after a weight move) is the
code that runs on the GPU.
"""

import warnings

import pytest
import torch

import distillpp
from distillpp.accel import (Accelerator, GraphedNet, ModuleForward, _flatten, accelerate_module, accelerate_net,
                              check_compile, routed_forwards)
from distillpp.denoisers import CFGDenoiser, DiscreteVPDenoiser, unet_fn
from distillpp.schedules import DiscreteVPSchedule, ddim_sigmas, initial_sample
from distillpp.zoo.nets import make_unet


class FakeCapture:
    """A CPU stand-in for :func:`distillpp.accel.cuda_capture` that counts captures.

    ``replay()`` recomputes the network on the static inputs and writes the static outputs in place,
    which is what replaying a CUDA graph does.
    """

    def __init__(self):
        self.count = 0

    def __call__(self, net, args, kwargs, device, pool, warmup):
        self.count += 1
        outputs = net(*args, **kwargs)

        def replay():  # nested outputs too (a text encoder's ModelOutput with its hidden-state tuple)
            for static, fresh in zip(leaves(outputs), leaves(net(*args, **kwargs))):
                static.copy_(fresh)

        return replay, outputs


def leaves(obj):
    tensors = []
    _flatten(obj, tensors)
    return tensors


def scaled_net(sample, timestep, scale=1.0, cond=None):
    out = sample * timestep.reshape(-1, *([1] * (sample.ndim - 1))) * scale
    if cond is not None:
        out = out + cond["emb"].mean()
    return out


def graphed(net, capture=None):
    return GraphedNet(net, "cpu", capture=capture or FakeCapture())


def linear_net(features):
    """A network over one ``nn.Linear``, with ``.model`` set as :func:`distillpp.unet_fn` does."""
    lin = torch.nn.Linear(features, features)

    def net(sample, timestep):
        return lin(sample)

    net.model = lin
    return net, lin


def test_compile_mode_is_checked_and_names_the_argument():
    assert check_compile(None) == "none"
    for mode in ("none", "graphs", "inductor"):
        assert check_compile(mode) == mode
    for bad in ("fast", "", True, 1):
        with pytest.raises(ValueError, match="compile"):
            check_compile(bad)
    with pytest.raises(ValueError, match="compile"):
        Accelerator("reduce-overhead", "cpu")


def test_mode_none_returns_the_network_itself():
    def net(sample, timestep):
        return sample

    assert accelerate_net(net, "none", "cpu") is net
    assert accelerate_net(net, None, "cpu") is net


def test_graphs_on_cpu_fall_back_to_eager_with_a_one_line_warning():
    def net(sample, timestep):
        return sample

    acc = Accelerator("graphs", "cpu")
    assert acc.effective_mode == "none"
    with pytest.warns(RuntimeWarning, match="compile='graphs' needs a CUDA device; running eagerly on cpu") as record:
        assert acc.wrap(net, "student") is net
    assert len(record) == 1 and "\n" not in str(record[0].message)


def test_pipeline_with_compile_graphs_on_cpu_warns_and_equals_eager():
    from distillpp.pipelines import from_preset

    eager = from_preset("zoo-lcm", device="cpu")
    with pytest.warns(RuntimeWarning, match="needs a CUDA device"):
        fast = from_preset("zoo-lcm", device="cpu", compile="graphs")
    kwargs = dict(output_type="pt", num_inference_steps=2, strength=0.2, guided_steps=1)
    a = eager(["Sneaker", "Bag"], generator=torch.Generator().manual_seed(0), **kwargs).images
    b = fast(["Sneaker", "Bag"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="compile"):
        from_preset("zoo-lcm", device="cpu", compile="cuda-graphs")


def test_one_capture_per_signature_and_replays_see_new_values():
    capture = FakeCapture()
    g = graphed(scaled_net, capture)
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([1.0, 2.0])
    with torch.no_grad():
        first = g(x, t)
        torch.testing.assert_close(first, scaled_net(x, t), rtol=0, atol=0)
        x2, t2 = torch.randn(2, 3, 4, 4), torch.tensor([3.0, 0.5])
        second = g(x2, t2)
        assert capture.count == 1 and len(g) == 1
        torch.testing.assert_close(second, scaled_net(x2, t2), rtol=0, atol=0)
        # Copied out: the first result was not overwritten by the second replay.
        torch.testing.assert_close(first, scaled_net(x, t), rtol=0, atol=0)
        second.add_(1.0)  # mutating a result does not touch the graph's outputs
        torch.testing.assert_close(g(x2, t2), scaled_net(x2, t2), rtol=0, atol=0)
        assert capture.count == 1 and g.replays == 3

        g(torch.randn(4, 3, 4, 4), torch.ones(4))  # batch 4 (teacher CFG over batch 2, or K draws)
        g(x.half(), t)  # dtype
        g(x, t, scale=2.0)  # a non-tensor argument's value
        emb = {"emb": torch.randn(2, 5)}
        out = g(x, t, cond=emb)  # nested conditioning
        torch.testing.assert_close(out, scaled_net(x, t, cond=emb), rtol=0, atol=0)
        assert capture.count == 5
        emb2 = {"emb": torch.randn(2, 5)}
        torch.testing.assert_close(g(x, t, cond=emb2), scaled_net(x, t, cond=emb2), rtol=0, atol=0)
        assert capture.count == 5


def test_keys_separate_shapes_dtypes_and_values():
    g = graphed(scaled_net)
    x, t = torch.randn(1, 4, 8, 8), torch.ones(1)
    keys = {
        g.key(x, t),
        g.key(torch.randn(2, 4, 8, 8), torch.ones(2)),
        g.key(x.half(), t),
        g.key(x, t.double()),
        g.key(x, t, scale=2.0),
        g.key(x, t, cond={"emb": torch.randn(1, 3)}),
    }
    assert len(keys) == 6
    assert g.key(x, t) == g.key(torch.randn(1, 4, 8, 8), torch.full((1,), 7.0))


def test_unhashable_arguments_run_eagerly():
    capture = FakeCapture()
    g = graphed(lambda sample, timestep, opts=None: sample * len(opts or []), capture)
    x = torch.randn(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(g(x, torch.ones(1), opts=[{"a": {1, 2}}]), x)  # a set inside: no hash
        g(x, torch.ones(1), opts=["text"])  # strings and lists are keyed and captured
    assert capture.count == 1 and g.eager_calls == 1


def test_autograd_calls_run_eagerly_and_frozen_inference_is_replayed():
    capture = FakeCapture()
    g = graphed(scaled_net, capture)  # no module known: with gradients on, it may need autograd
    with torch.enable_grad():
        g(torch.randn(1, 2), torch.ones(1))
    assert capture.count == 0 and g.eager_calls == 1

    net, lin = linear_net(2)
    capture = FakeCapture()
    g = graphed(net, capture)
    with torch.enable_grad():
        out = g(torch.randn(1, 2), torch.ones(1))  # trainable weights
    assert capture.count == 0 and out.requires_grad
    lin.requires_grad_(False)
    g = graphed(net, capture)
    with torch.enable_grad():
        g(torch.randn(1, 2), torch.ones(1))  # frozen weights, plain inputs: nothing for autograd to record
        assert capture.count == 1
        x = torch.randn(1, 2, requires_grad=True)
        assert g(x, torch.ones(1)).requires_grad  # an input that needs a gradient runs eagerly
    assert capture.count == 1 and g.eager_calls == 1


def test_failed_capture_warns_once_and_runs_eagerly():
    def broken(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    g = graphed(scaled_net, broken)
    x, t = torch.randn(1, 2), torch.ones(1)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="could not capture"):
            out = g(x, t)
        torch.testing.assert_close(out, scaled_net(x, t))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            g(x, t)  # remembered as eager: no second attempt, no second warning
    assert g.eager_calls == 2 and len(g) == 0


def test_moved_weights_drop_the_stale_graphs():
    net, lin = linear_net(3)
    capture = FakeCapture()
    g = graphed(net, capture)
    x = torch.randn(2, 3)
    with torch.no_grad():
        g(x, torch.ones(2))
        g(x, torch.ones(2))
        assert capture.count == 1
        lin.weight.data = lin.weight.data.clone()  # what .to(), offloading or reloading does
        torch.testing.assert_close(g(x, torch.ones(2)), lin(x))
    assert capture.count == 2


def test_lora_adapter_off_teacher_is_keyed_and_captured_separately():
    peft = pytest.importorskip("peft")
    from distillpp.accel import _wrapper_classes

    AdapterOffNet = _wrapper_classes()[0]

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), model)

    def net(sample, timestep):
        return model(sample)

    net.model = model
    teacher = AdapterOffNet(net, model)
    student_capture, teacher_capture = FakeCapture(), FakeCapture()
    student_g = graphed(net, student_capture)
    teacher_g = graphed(teacher, teacher_capture)
    x, t = torch.randn(2, 4), torch.ones(2)
    assert student_g.key(x, t) != teacher_g.key(x, t)
    with torch.no_grad():
        on, off = net(x, t), teacher(x, t)
        assert not torch.allclose(on, off)
        for _ in range(2):  # interleaved as in guided sampling
            torch.testing.assert_close(student_g(x, t), on, rtol=0, atol=0)
            torch.testing.assert_close(teacher_g(x, t), off, rtol=0, atol=0)
        assert student_g.key(x, t)[0] == ("adapters", ("on", ("default",)))
        assert teacher_g.key(x, t)[0] == ("adapters", "off")
        # Switching the adapters off outside the wrapper is a different state, not a stale replay.
        key_on = student_g.key(x, t)
        for layer in teacher._layers:
            layer.enable_adapters(False)
        assert student_g.key(x, t) != key_on
        torch.testing.assert_close(student_g(x, t), off, rtol=0, atol=0)
    assert student_capture.count == 2 and teacher_capture.count == 1


def test_guided_sampling_through_graphed_nets_equals_eager():
    """Student and CFG teacher (batch-2 forward, K=2 draws) replayed from stand-in graphs: bit-identical."""
    torch.manual_seed(0)
    unet_s, unet_t = make_unet(tiny=True).eval(), make_unet(tiny=True).eval()
    schedule = DiscreteVPSchedule.from_betas(beta_schedule="linear")
    sigmas = ddim_sigmas(schedule, 3, timestep_spacing="trailing")
    labels = torch.tensor([1, 7])
    args = {"class_labels": labels}
    t_args = {"cond": {"class_labels": labels}, "uncond": {"class_labels": torch.full_like(labels, 10)}}
    guidance = distillpp.TeacherGuidance(strength=0.3, guided_steps=2, samples=2)

    def run(student_net, teacher_net):
        student = DiscreteVPDenoiser(student_net, schedule)
        teacher = CFGDenoiser(DiscreteVPDenoiser(teacher_net, schedule), scale=2.0)
        gen = torch.Generator().manual_seed(3)
        x = initial_sample(torch.randn(2, 1, 32, 32, generator=gen), sigmas, "vp")
        return distillpp.sample(student, x, sigmas, sampler="ddim", teacher=teacher, guidance=guidance,
                                generator=gen, extra_args=args, teacher_args=t_args)

    eager = run(unet_fn(unet_s), unet_fn(unet_t))
    s_cap, t_cap = FakeCapture(), FakeCapture()
    fast = run(GraphedNet(unet_fn(unet_s), "cpu", name="student", capture=s_cap),
               GraphedNet(unet_fn(unet_t), "cpu", name="teacher", capture=t_cap))
    torch.testing.assert_close(fast, eager, rtol=0, atol=0)
    assert s_cap.count == 1  # batch 2 at every step
    assert t_cap.count == 1  # CFG x K draws: one batch-8 signature


def test_accelerator_reuses_wrappers_and_keeps_offloaded_teachers_eager(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    from distillpp.accel import _wrapper_classes

    AdapterOffNet, OffloadedNet, PlacedNet = _wrapper_classes()
    net, _ = linear_net(2)

    def compiled_from(wrapped):
        return getattr(wrapped, "_torchdynamo_orig_callable", None)

    acc = Accelerator("inductor", "cpu")  # off CUDA: compiled, no graphs; wrapping compiles nothing yet
    wrapped = acc.wrap(net, "student")
    assert compiled_from(wrapped) is net and acc.wrap(net) is wrapped
    offloaded = OffloadedNet(net, torch.nn.Linear(2, 2), "cpu", pin_memory=False)
    assert acc.wrap(offloaded, "teacher") is offloaded
    placed = acc.wrap(PlacedNet(net, "cpu"), "teacher")
    assert isinstance(placed, PlacedNet) and compiled_from(placed.net) is net
    peft = pytest.importorskip("peft")
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["0"]),
                                         torch.nn.Sequential(torch.nn.Linear(4, 4)))
    off = acc.wrap(AdapterOffNet(lambda sample, timestep: model(sample), model), "teacher")
    assert isinstance(off, AdapterOffNet) and compiled_from(off.net) is not None  # the inner call is compiled
    assert acc.first_call_s == 0.0


def test_accelerate_net_takes_the_module_device_and_shares_one_pool_per_device():
    from distillpp.accel import shared_accelerator

    net, lin = linear_net(2)
    assert accelerate_net(net, "none", module=lin) is net
    with pytest.warns(RuntimeWarning, match="needs a CUDA device"):
        assert accelerate_net(net, "graphs", module=lin) is net  # the module is on the CPU
    assert shared_accelerator("graphs", "cpu") is shared_accelerator("graphs", torch.device("cpu"))
    with pytest.raises(ValueError, match="compile"):
        accelerate_net(net, "cudagraphs", module=lin)


# ------------------------------------------------------------------------------------------
# Text encoders: graphed in place while diffusers' own encode_prompt calls them.
# ------------------------------------------------------------------------------------------


def _tiny_sdxl_pair(tmp_path):
    from test_pipelines_sd import tiny_pipe, tiny_unet
    from tiny import clip_tokenizer

    clip_tokenizer().save_pretrained(tmp_path)
    return tiny_pipe(str(tmp_path), sdxl=True), tiny_unet(True, seed=5)


def _tiny_pipeline(family, tmp_path):
    """Two guided pipelines over one tiny diffusers pipeline, its text-encoder names and call keywords."""
    if family == "sdxl":
        from distillpp.pipelines import DistillppPipeline

        student, teacher = _tiny_sdxl_pair(tmp_path)
        make, kwargs = DistillppPipeline, dict(teacher_cfg=3.0)
    else:
        import test_pipelines_flow as flow

        from distillpp.pipelines import FlowDistillppPipeline

        student, teacher = (flow.flux_pipe(), flow.flux_transformer(1, guidance_embeds=True)) if family == "flux" \
            else (flow.sd3_pipe(), flow.sd3_transformer(1))
        make, kwargs = FlowDistillppPipeline, dict(flow.SIZE)
    return make(student, teacher), make(student, teacher), dict(
        output_type="latent", num_inference_steps=2, strength=0.3, guided_steps=1, **kwargs)


@pytest.mark.parametrize("family,encoders", [("sdxl", ["text_encoder", "text_encoder_2"]),
                                             ("flux", ["text_encoder", "text_encoder_2"]),
                                             ("sd3", ["text_encoder", "text_encoder_2", "text_encoder_3"])])
def test_text_encoders_replayed_from_graphs_equal_eager_and_are_restored(tmp_path, family, encoders):
    # CLIP and T5 encoders inside diffusers' own encode_prompt, their ModelOutputs rebuilt after copy-out.
    eager, fast, kwargs = _tiny_pipeline(family, tmp_path)
    captures = FakeCapture()
    fast._encoders = [(m, GraphedNet(ModuleForward(m), "cpu", name=n, capture=captures))
                      for n, m in fast.family.text_encoders()]
    assert [n for n, _ in fast.family.text_encoders()] == encoders
    for seed in (0, 1):  # the first call captures every encoder; the second replays them
        a = eager("a red fox", generator=torch.Generator().manual_seed(seed), **kwargs).images
        b = fast("a red fox", generator=torch.Generator().manual_seed(seed), **kwargs).images
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert captures.count == len(encoders)
    assert all(g.replays >= 2 and g.eager_calls == 0 for _, g in fast._encoders)
    assert all("forward" not in m.__dict__ for m, _ in fast._encoders)  # diffusers' modules are untouched after
    if family == "sdxl":
        student = fast.family.owner
        with fast.fast_encoders():
            emb = student.encode_prompt("a red fox", device="cpu", do_classifier_free_guidance=False)[0]
        torch.testing.assert_close(emb, student.encode_prompt("a red fox", device="cpu",
                                                              do_classifier_free_guidance=False)[0], rtol=0, atol=0)


def test_text_encoders_stay_eager_off_cuda_and_routes_are_undone_on_errors():
    lin = torch.nn.Linear(2, 2)
    assert accelerate_module(lin, "graphs") is None and accelerate_module(lin, "inductor") is None  # CPU weights
    assert accelerate_module(lin, None) is None
    with pytest.raises(ValueError, match="compile"):
        accelerate_module(lin, "fast")
    fast = GraphedNet(ModuleForward(lin), "cpu", capture=FakeCapture())
    x = torch.randn(3, 2)
    with pytest.raises(RuntimeError, match="inside"), torch.no_grad():
        with routed_forwards([(lin, fast)]):
            torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
            assert fast.replays == 1
            raise RuntimeError("inside")
    assert "forward" not in lin.__dict__ and lin(x).shape == (3, 2) and fast.replays == 1


def test_compile_graphs_on_cpu_keeps_the_sd_pipeline_eager(tmp_path):
    from distillpp.pipelines import DistillppPipeline

    student, teacher = _tiny_sdxl_pair(tmp_path)
    with pytest.warns(RuntimeWarning, match="compile='graphs' needs a CUDA device; running eagerly on cpu"):
        fast = DistillppPipeline(student, teacher, compile="graphs")
    assert fast._encoders == []
    eager = DistillppPipeline(student, teacher)
    kwargs = dict(output_type="latent", num_inference_steps=2, strength=0.3, guided_steps=1)
    torch.testing.assert_close(fast("fox", generator=torch.Generator().manual_seed(0), **kwargs).images,
                               eager("fox", generator=torch.Generator().manual_seed(0), **kwargs).images,
                               rtol=0, atol=0)


def test_inductor_cache_defaults_under_home_unless_the_user_chose_one(monkeypatch, tmp_path):
    import os

    from distillpp.accel import _torch_default_cache

    monkeypatch.setenv("HOME", str(tmp_path))
    ours = os.path.join(str(tmp_path), ".cache", "distillpp", "torchinductor")
    # Importing diffusers' pipelines writes PyTorch's /tmp default into the variable: still replaced.
    for preset in (None, _torch_default_cache()):
        if preset is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", preset)
        Accelerator("inductor", "cpu")
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == ours
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    Accelerator("inductor", "cpu")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback when no CUDA pool can be made")
def test_a_shared_pool_that_cannot_be_made_warns_and_leaves_each_capture_its_own():
    acc = Accelerator("graphs", "cpu")
    with pytest.warns(RuntimeWarning, match="shared CUDA graph pool"):
        assert acc.pool(torch.device("cuda", 0)) is None
    assert acc.pool(torch.device("cpu")) is None
