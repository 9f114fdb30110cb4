"""The GPU fast path on a real CUDA device (skipped without one; CI has none).

Run on a GPU machine with ``python -m pytest tests/test_accel_cuda.py``. These are the checks the CPU
stand-in in ``test_accel.py`` cannot make: real captures into a shared memory pool, the default CUDA
generator after a failed capture, inductor under our graphs after other graphs were captured and
dropped, and fast outputs against eager ones through a pipeline.
"""

import gc
import warnings

import pytest
import torch

from distillpp.accel import Accelerator, GraphedNet, GraphPool, cuda_capture
from distillpp.pipelines import DistillppPipeline
from test_accel import _tiny_sdxl_pair
from test_pipelines_sd import SIZE, add_tiny_lora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# One call of the tiny SDXL pairs: 4 steps, the first guided by the teacher with CFG (one batch-2 forward).
SDXL_CALL = dict(num_inference_steps=4, strength=0.3, guided_steps=1, teacher_cfg=3.0, height=SIZE, width=SIZE,
                 output_type="latent")


def linear_net(seed=0, features=16):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(features, features).cuda().eval().requires_grad_(False)  # else calls run eagerly

    def net(sample, timestep):
        return lin(sample) * timestep.reshape(-1, 1)

    net.model = lin
    return net


def inputs(batch=2, features=16):
    g = torch.Generator("cuda").manual_seed(1)
    return torch.randn(batch, features, device="cuda", generator=g), torch.full((batch,), 0.5, device="cuda")


def test_a_pool_whose_graphs_were_dropped_takes_new_captures():
    """One pipeline's graphs dropped while a block of their pool is alive, then another captures into it.

    With a bare pool handle PyTorch's allocator fails that second capture (``use_count > 0``), and the
    failed ``capture_begin`` leaves the default generator in capture mode. The anchored
    :class:`GraphPool` keeps the pool's use count above zero.
    """
    acc = Accelerator("graphs", "cuda", memoize=False)
    x, t = inputs()
    first = acc.wrap(linear_net(0), "first")
    expected_first = linear_net(0)(x, t)
    torch.testing.assert_close(first(x, t), expected_first)
    alive = next(iter(first._graphs.values())).outputs  # a block of the pool outlives its graph
    del first
    gc.collect()
    second_net = linear_net(1)
    second = acc.wrap(second_net, "second")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture would warn and run eagerly
        out = second(x, t)
    assert len(second) == 1 and second.replays == 1 and second.eager_calls == 0
    torch.testing.assert_close(out, second_net(x, t))
    assert alive.shape == expected_first.shape
    torch.randn(8, device="cuda")  # the default generator is not stuck in capture mode


def test_the_default_generator_works_after_a_failed_capture():
    def syncing(sample, timestep):
        return sample * float(timestep[0])  # a host read: not capturable

    x, t = inputs()
    with pytest.raises(Exception):
        cuda_capture(syncing, (x, t), {}, torch.device("cuda"), GraphPool("cuda"), warmup=1)
    torch.randn(8, device="cuda")  # would raise "Offset increment outside graph capture" if left in capture mode


def test_inductor_compiles_under_graphs_after_other_graphs_were_dropped():
    """The failure of run 6: inductor's first compile after a graphs pipeline had come and gone."""
    x, t = inputs()
    graphs = Accelerator("graphs", "cuda", memoize=False)
    g = graphs.wrap(linear_net(0), "graphs")
    g(x, t)
    keep = next(iter(g._graphs.values())).outputs
    del g
    gc.collect()
    ind = Accelerator("inductor", "cuda")
    net = linear_net(2)
    fast = ind.wrap(net, "student")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = fast(x, t)
    assert [r.kind for r in ind.records] == ["inductor"] and fast.eager_calls == 0
    torch.testing.assert_close(out, net(x, t), rtol=1e-4, atol=1e-5)
    assert keep is not None


def test_tiny_sdxl_pipeline_graphs_equal_eager_across_pipelines(tmp_path):
    """The real guided pipeline on CUDA: graphs bit-equal to eager, also for a second pipeline whose
    graphs go into the process-wide pool after the first pipeline's were dropped."""
    student, teacher = (m.to("cuda") for m in _tiny_sdxl_pair(tmp_path))
    outs = {}
    for mode in ("none", "graphs", "graphs"):  # graphs again: a new pipeline, the same shared pool
        pipe = DistillppPipeline(student, teacher, compile=mode)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for _ in range(2):  # the second call replays
                images = pipe("a cat", generator=torch.Generator("cuda").manual_seed(0), **SDXL_CALL).images
        outs.setdefault(mode, images)
        torch.testing.assert_close(images, outs[mode], rtol=0, atol=0)
        del pipe
        gc.collect()
    torch.testing.assert_close(outs["graphs"], outs["none"], rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_teacher_on_a_second_gpu_is_graphed_there_and_equals_eager(tmp_path):
    from distillpp.pipelines.placement import PlacedNet

    student, teacher = _tiny_sdxl_pair(tmp_path)  # the pipeline moves the teacher to cuda:1
    student = student.to("cuda:0")
    outs = {}
    for mode in ("none", "graphs"):
        pipe = DistillppPipeline(student, teacher, compile=mode, teacher_device="cuda:1")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns
            for _ in range(2):
                outs[mode] = pipe("a cat", generator=torch.Generator("cuda:0").manual_seed(0), **SDXL_CALL).images
        if mode == "graphs":
            placed = pipe._teacher_net
            assert isinstance(placed, PlacedNet) and isinstance(placed.net, GraphedNet)
            assert placed.net.device == torch.device("cuda:1") and len(placed.net) == 1
            assert placed.net.replays == 2 and placed.net.eager_calls == 0
    assert outs["graphs"].device == torch.device("cuda:0")
    torch.testing.assert_close(outs["graphs"], outs["none"], rtol=0, atol=0)


def lora_pipeline_outputs(tmp_path, device, modes):
    """A tiny SDXL LoRA student guided by its adapter-off self, once per compile mode; (outputs, pipelines)."""
    student = _tiny_sdxl_pair(tmp_path)[0]
    add_tiny_lora(student.unet)
    student = student.to(device)
    outs, pipes = {}, {}
    for mode in modes:
        pipes[mode] = DistillppPipeline(student, "adapter-off", compile=mode)
        for _ in range(2):  # the second call replays
            outs[mode] = pipes[mode]("a cat", generator=torch.Generator(device).manual_seed(0), **SDXL_CALL).images
    return outs, pipes


def test_lora_student_with_its_adapter_off_teacher_under_graphs_and_inductor(tmp_path):
    """Both networks of a LoRA pair (adapter on, adapter off) captured / compiled as their own graphs."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no capture may fall back to eager
        outs, pipes = lora_pipeline_outputs(tmp_path, "cuda", ("none", "graphs", "inductor"))
    torch.testing.assert_close(outs["graphs"], outs["none"], rtol=0, atol=0)
    for mode in ("graphs", "inductor"):
        student, teacher = pipes[mode]._student_net, pipes[mode]._teacher_net  # teacher: over AdapterOffNet
        assert isinstance(student, GraphedNet) and student.eager_calls == 0 and len(student) == 1
        assert isinstance(teacher, GraphedNet) and teacher.eager_calls == 0 and len(teacher) == 1
    # Inductor's kernels round differently (fp32 here, with cuDNN's TF32 convolutions): relative to the scale.
    scale = outs["none"].abs().max().item()
    assert (outs["inductor"] - outs["none"]).abs().max().item() < 2e-3 * scale
    # Each compiled network kept its adapter state: the adapter-off teacher is the eager teacher, not the student.
    g = torch.Generator("cuda").manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16, generator=g, device="cuda"), torch.tensor([500.0, 500.0], device="cuda")
    cond = {"encoder_hidden_states": torch.randn(2, 77, 64, generator=g, device="cuda"),
            "added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g, device="cuda"),
                                  "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2, device="cuda")}}
    with torch.no_grad():
        nets = {m: (pipes[m]._student_net(x, t, **cond), pipes[m]._teacher_net(x, t, **cond)) for m in pipes}
    (s_ref, t_ref), (s_ind, t_ind) = nets["none"], nets["inductor"]
    gap = (s_ref - t_ref).abs().max().item()  # what the LoRA changes
    assert gap > 0.1
    assert (s_ind - s_ref).abs().max().item() < 0.05 * gap and (t_ind - t_ref).abs().max().item() < 0.05 * gap


FAMILIES = ("sd15", "sdxl", "flux", "sd3", "pixart")


def family_outputs(family, tmp_path, device, modes):
    """One tiny guided pair of ``family`` on ``device``, called twice per compile mode; (outputs, pipelines)."""
    if family in ("sd15", "sdxl"):
        from test_pipelines_sd import tiny_pipe, tiny_unet
        from tiny import clip_tokenizer

        clip_tokenizer().save_pretrained(tmp_path)
        student = tiny_pipe(str(tmp_path), sdxl=family == "sdxl").to(device)
        teacher = tiny_unet(family == "sdxl", seed=5).to(device)
        make, call = (lambda mode: DistillppPipeline(student, teacher, compile=mode)), dict(
            teacher_cfg=3.0, height=SIZE, width=SIZE)
    elif family in ("flux", "sd3"):
        import test_pipelines_flow as flow

        from distillpp.pipelines import FlowDistillppPipeline

        student, teacher = (flow.flux_pipe(), flow.flux_transformer(1, guidance_embeds=True)) if family == "flux" \
            else (flow.sd3_pipe(), flow.sd3_transformer(1))
        student, teacher = student.to(device), teacher.to(device)
        make, call = (lambda mode: FlowDistillppPipeline(student, teacher, compile=mode)), dict(flow.SIZE)
    else:
        from diffusers import LCMScheduler
        from test_pipelines_pixart import BETAS, CALL
        from tiny import pixart_pipe, pixart_transformer

        from distillpp.pipelines import GuidedPipeline
        from distillpp.pipelines.pixart import PixArtFamily

        student, teacher = pixart_pipe(LCMScheduler(**BETAS)).to(device), pixart_transformer(1).to(device)
        make, call = (lambda mode: GuidedPipeline(PixArtFamily(student, teacher), compile=mode)), {
            k: v for k, v in CALL.items() if k != "output_type"}
    outs, pipes = {}, {}
    for mode in modes:
        pipes[mode] = make(mode)
        for _ in range(2):  # the second call replays
            outs[mode] = pipes[mode]("a cat", generator=torch.Generator(device).manual_seed(0), num_inference_steps=4,
                                     strength=0.3, guided_steps=1, output_type="latent", **call).images
    return outs, pipes


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_replayed_from_graphs_equals_eager(tmp_path, family):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no capture may fall back to eager
        outs, pipes = family_outputs(family, tmp_path, "cuda", ("none", "graphs"))
    torch.testing.assert_close(outs["graphs"], outs["none"], rtol=0, atol=0)
    for net in (pipes["graphs"]._student_net, pipes["graphs"]._teacher_net):
        assert isinstance(net, GraphedNet) and net.eager_calls == 0 and net.replays >= 2
