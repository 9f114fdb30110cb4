"""GPU latency of guided few-step sampling, eager and on the fast path (CUDA graphs), in one run on one card.

Random weights built from configs (no download): an SDXL-size UNet pair (student and a separate
teacher, fp16, 1024 px) and a FLUX-size transformer (bf16, 1024 px). Measured with CUDA events,
median and spread (min/max and interquartile range) of ``--runs`` runs after ``--warmup``:

- per-forward floor: eager and replayed from a captured graph, batch 1, 2, 4, 8;
- diffusers' own ``StableDiffusionXLPipeline``, eager, 4 steps, sampling only (precomputed prompt
  embeddings, ``output_type="latent"``);
- ours, eager and fast (``compile="graphs"`` through :mod:`distillpp.accel`): plain 4, plain 5 and
  4 + 1 guided (teacher CFG 7.5 as one batch-2B forward) at batch 1 and 4, sampling only, through
  :func:`distillpp.sample` with the accelerated networks (what the pipelines do with ``compile=``);
- first-call (capture) cost and peak memory of every configuration;
- lowering the floor: cuDNN attention, channels-last convolutions, fp8 linear layers, inductor
  kernels under our graphs; each with its per-forward time, fraction of the card's bf16 peak
  (the FLOPs of one forward counted by ``torch.utils.flop_counter``) and its output's deviation
  from the eager fp16 forward;
- equality of fast and eager outputs (max abs / rel difference) for SDXL-size, FLUX-size, a LoRA
  student with its adapter-off teacher, and a zoo model pair (``distillpp.zoo.load``).

Writes ``gpu_latency.json`` and ``gpu_latency.md`` into ``--out`` (the JSON after every section, so
a run cut short keeps what it measured) and prints the table.

    python benchmarks/gpu_latency.py --out benchmarks/results/gpu_latency        # one H100, ~8 min
    python benchmarks/gpu_latency.py --tiny --out /tmp/lat                        # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch

import distillpp
from distillpp.accel import Accelerator, GraphedNet
from distillpp.denoisers import CFGDenoiser, DiscreteVPDenoiser, FlowDenoiser, unet_fn
from distillpp.schedules import DiscreteVPSchedule, euler_sigmas, initial_sample

# NVIDIA's datasheet dense bf16 tensor-core rate (no sparsity), TFLOP/s; the measured matmul rate is the
# practical ceiling and is what fractions are given against.
DATASHEET_BF16_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.5, "H200": 989.4, "A100": 312.0}
TEACHER_CFG = 7.5
FLUX_GUIDANCE = 3.5


# --------------------------------------------------------------------------------------------
# Random-weight models from configs.
# --------------------------------------------------------------------------------------------


def unet_config(tiny: bool) -> dict[str, Any]:
    """SDXL's UNet config (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json), or a tiny one."""
    if tiny:
        return dict(
            sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8, cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=1,
        )
    return dict(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        addition_embed_type_num_heads=64, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
        act_fn="silu", flip_sin_to_cos=True, freq_shift=0, center_input_sample=False,
    )


def vae_config(tiny: bool) -> dict[str, Any]:
    """SDXL's VAE config (decoded in the model dtype, as with the fp16-fix VAE), or a tiny one."""
    if tiny:
        return dict(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
                    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                    norm_num_groups=8, layers_per_block=1, scaling_factor=0.13025, force_upcast=False)
    return dict(block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3, latent_channels=4,
                sample_size=1024, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, norm_num_groups=32, act_fn="silu", scaling_factor=0.13025, force_upcast=False)


def flux_config(tiny: bool, layers: int | None, single_layers: int | None) -> dict[str, Any]:
    """FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev transformer/config.json), or a tiny one."""
    if tiny:
        return dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                    axes_dims_rope=(2, 2, 4))
    return dict(patch_size=1, in_channels=64, num_layers=19 if layers is None else layers,
                num_single_layers=38 if single_layers is None else single_layers, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def build(module_cls: Any, device: str, dtype: torch.dtype, seed: int, *args: Any, **kwargs: Any) -> Any:
    """Instantiate with random init directly on ``device`` (seconds for billions of parameters), then cast."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the target dtype: a 12B transformer in float32 would not fit twice
    try:
        with torch.device(device):
            m = module_cls(*args, **kwargs)
    except Exception:  # a constructor that does not honour the device context
        m = module_cls(*args, **kwargs)
    finally:
        torch.set_default_dtype(default)
    return m.to(device=device, dtype=dtype).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------------


def summary(times_ms: list[float]) -> dict[str, Any]:
    q = statistics.quantiles(times_ms, n=4) if len(times_ms) >= 2 else [times_ms[0]] * 3
    med = statistics.median(times_ms)
    return {
        "median_ms": round(med, 3), "min_ms": round(min(times_ms), 3), "max_ms": round(max(times_ms), 3),
        "p25_ms": round(q[0], 3), "p75_ms": round(q[2], 3), "runs": len(times_ms),
        "spread_pct": round(100 * (max(times_ms) - min(times_ms)) / med, 2),
        "iqr_pct": round(100 * (q[2] - q[0]) / med, 2),
    }


def _once(fn: Callable[[], Any], device: torch.device) -> float:
    """One call of ``fn`` in ms: CUDA events on a GPU, the host clock on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def time_it(fn: Callable[[], Any], runs: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """Median and spread of ``fn`` in ms over ``runs`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return summary([_once(fn, device) for _ in range(runs)])


def time_paired(calls: dict[str, Callable[[], Any]], runs: int, warmup: int,
                device: torch.device) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Interleaved timing (a, b, c, a, b, c, ...): a drift of the host's speed hits every call alike.

    Eager PyTorch is bound by the CPU's kernel launches, so its latency wanders with the host's
    load and clocks; timed one after the other, two eager paths can differ by more than they do.
    Returns each call's summary and, for each call after the first, the median of its per-round ratio
    to the first; then each call's raw times in ms, in round order.
    """
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(runs):
        for k, fn in calls.items():
            times[k].append(_once(fn, device))
    out: dict[str, Any] = {k: summary(v) for k, v in times.items()}
    first = next(iter(calls))
    out["ratio_to_first (median of per-round ratios)"] = {
        k: round(statistics.median(a / b for a, b in zip(times[k], times[first])), 4) for k in calls if k != first}
    return out, times


def peak_memory(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak allocated GiB during one call of ``fn`` (after a reset), on a GPU."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Max abs difference and max abs difference relative to the reference's max magnitude."""
    a, b = a.float(), b.float()
    d = (a - b).abs().max().item()
    scale = b.abs().max().item()
    return {"max_abs": d, "max_rel": d / scale if scale else float("nan"),
            "rms_rel": ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()}


def measured_bf16_tflops(device: torch.device) -> float | None:
    """The card's practical bf16 matmul rate: an 8192^3 product, median of 20 (CUDA events)."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t = time_it(lambda: a @ b, 20, 5, device)
    return round(2 * 8192**3 / (t["median_ms"] * 1e-3) / 1e12, 1)


def forward_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Report:
    """The results dict, written to JSON after every section."""

    def __init__(self, out: str, meta: dict[str, Any]):
        self.out = out
        self.data: dict[str, Any] = {**meta, "sections": {}}
        os.makedirs(out, exist_ok=True)

    def put(self, section: str, key: str, value: Any) -> None:
        self.data["sections"].setdefault(section, {})[key] = value
        self.save()

    def save(self) -> None:
        with open(os.path.join(self.out, "gpu_latency.json"), "w") as f:
            json.dump(self.data, f, indent=2, default=str)
        try:  # the table too, so that a run cut short by its time limit still leaves one
            md = markdown(self.data)
        except Exception as e:  # noqa: BLE001 - the JSON above is what matters
            md = f"(markdown failed: {type(e).__name__}: {e}; see gpu_latency.json)\n"
        with open(os.path.join(self.out, "gpu_latency.md"), "w") as f:
            f.write(md)


def guarded(report: Report, section: str, key: str, fn: Callable[[], Any]) -> Any:
    """Run one measurement; a failure is recorded and printed, and the others still run."""
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - a benchmark reports, it does not stop
        print(f"  {section}/{key} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        value = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        free()
    report.put(section, key, value)
    return value


# --------------------------------------------------------------------------------------------
# Sampling (what a pipeline does with compile=): distillpp.sample over accelerated networks.
# --------------------------------------------------------------------------------------------


class Sampler:
    """Plain or guided few-step Euler sampling of one model pair at one batch size, for timing.

    The student and teacher networks are given already accelerated (or not); everything else is the
    eager code that runs on every path: denoisers, the Euler solver, teacher guidance.
    """

    def __init__(self, family: str, student_net: Any, teacher_net: Any, shape: tuple[int, ...],
                 cond: dict[str, Any], uncond: dict[str, Any] | None, sigmas_of: Callable[[int], torch.Tensor],
                 device: torch.device, dtype: torch.dtype, teacher_cond: dict[str, Any] | None = None):
        self.family, self.shape, self.device = family, shape, device
        self.cond, self.uncond, self.teacher_cond = cond, uncond, teacher_cond
        self.sigmas_of = sigmas_of
        if family == "vp":
            schedule = DiscreteVPSchedule.from_betas(beta_schedule="scaled_linear")
            self.student = DiscreteVPDenoiser(student_net, schedule, dtype=dtype)
            self.teacher = CFGDenoiser(DiscreteVPDenoiser(teacher_net, schedule, dtype=dtype), scale=TEACHER_CFG)
        else:
            self.student = FlowDenoiser(student_net, timestep_scale=1.0, dtype=dtype)
            self.teacher = CFGDenoiser(FlowDenoiser(teacher_net, timestep_scale=1.0, dtype=dtype), scale=1.0)

    def __call__(self, steps: int, guided: bool, seed: int = 0) -> torch.Tensor:
        sigmas = self.sigmas_of(steps).to(self.device)
        gen = torch.Generator(self.device).manual_seed(seed)
        noise = torch.randn(self.shape, generator=gen, device=self.device, dtype=torch.float32)
        x = initial_sample(noise, sigmas, "vp" if self.family == "vp" else "flow")
        kwargs: dict[str, Any] = {}
        if guided:
            teacher_args = {"cond": self.teacher_cond or self.cond}
            if self.uncond is not None:
                teacher_args["uncond"] = self.uncond
            kwargs = dict(teacher=self.teacher, teacher_args=teacher_args,
                          guidance=distillpp.TeacherGuidance(strength=0.05, guided_steps=1,
                                                             teacher_cfg=TEACHER_CFG if self.uncond else None))
        with torch.no_grad():  # as in every pipeline call; graphs replay only without autograd
            return distillpp.sample(self.student, x, sigmas, sampler="euler", generator=gen, extra_args=self.cond,
                                    **kwargs)


def sampling_table(report: Report, section: str, make: Callable[[str, int], Sampler], batches: list[int],
                   modes: list[tuple[str, int, bool]], runs: int, warmup: int, device: torch.device,
                   floors: dict[int, float], accelerators: dict[str, Accelerator], teacher_mult: int = 2) -> None:
    """Eager and fast sampling for every mode and batch: latency, peak memory, first-call cost.

    The graph floor of a mode is its forwards' graph times: ``steps`` student forwards at the batch,
    plus one teacher forward at ``teacher_mult`` times it (2 with CFG) when guided.
    """
    for batch in batches:
        for path in ("eager", "fast"):
            sampler = make(path, batch)
            acc = accelerators.get(path)
            for name, steps, guided in modes:
                key = f"{path} {name} b{batch}"

                def measure(sampler=sampler, steps=steps, guided=guided, acc=acc, batch=batch, name=name):
                    n_before = len(acc.records) if acc is not None else 0
                    t0 = time.perf_counter()
                    sampler(steps, guided)  # first call: captures whatever is new for this shape
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    first_s = time.perf_counter() - t0
                    res = time_it(lambda: sampler(steps, guided), runs, warmup, device)
                    res["first_call_s"] = round(first_s, 3)
                    if acc is not None:
                        res["captures"] = [{"net": r.name, "shape": r.signature, "s": round(r.seconds, 3)}
                                           for r in acc.records[n_before:]]
                    res["peak_mem_gib"] = peak_memory(lambda: sampler(steps, guided), device)
                    f1, f2 = floors.get(batch), floors.get(teacher_mult * batch)
                    if f1 is not None and (not guided or f2 is not None):
                        floor = steps * f1 + (f2 if guided else 0.0)
                        res["graph_floor_ms"] = round(floor, 3)
                        res["vs_floor"] = round(res["median_ms"] / floor, 3)
                    print(f"  {key:26s} {res['median_ms']:9.1f} ms  [{res['min_ms']:.1f}, {res['max_ms']:.1f}]"
                          f"  first {first_s:.2f} s" + (f"  x{res['vs_floor']:.3f} floor" if "vs_floor" in res else ""),
                          flush=True)
                    return res

                guarded(report, section, key, measure)
            del sampler
            free()


def forward_table(report: Report, section: str, net: Any, inputs_of: Callable[[int], tuple[tuple, dict]],
                  batches: list[int], runs: int, warmup: int, device: torch.device,
                  accelerator: Accelerator | None) -> dict[int, float]:
    """Per-forward eager and graph time per batch size; returns the graph floor per batch (ms)."""
    floors: dict[int, float] = {}
    graphed = accelerator.wrap(net, "forward") if accelerator is not None else net
    for batch in batches:
        args, kwargs = inputs_of(batch)

        def eager(args=args, kwargs=kwargs):
            with torch.no_grad():
                return net(*args, **kwargs)

        def fast(args=args, kwargs=kwargs):
            with torch.no_grad():
                return graphed(*args, **kwargs)

        res_e = guarded(report, section, f"forward eager b{batch}", lambda: time_it(eager, runs, warmup, device))

        def graph_entry():
            n_before = len(accelerator.records) if accelerator is not None else 0
            t0 = time.perf_counter()
            out_fast = fast()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_s = time.perf_counter() - t0
            res = time_it(fast, runs, warmup, device)
            res["first_call_s"] = round(first_s, 3)
            res["equal_to_eager"] = diff(out_fast, eager())
            if accelerator is not None and len(accelerator.records) > n_before:
                res["capture_s"] = round(accelerator.records[-1].seconds, 3)
            return res

        res_g = guarded(report, section, f"forward graph b{batch}", graph_entry)
        if "median_ms" in res_g:
            floors[batch] = res_g["median_ms"]
        print(f"  forward b{batch}: eager {res_e.get('median_ms', float('nan')):8.2f} ms, "
              f"graph {res_g.get('median_ms', float('nan')):8.2f} ms", flush=True)
        del args, kwargs
        free()
    return floors


# --------------------------------------------------------------------------------------------
# Lowering the floor (SDXL-size, batch 1, all under our graphs).
# --------------------------------------------------------------------------------------------


class FP8Linear(torch.nn.Module):
    """A linear layer with e4m3 weights and per-call e4m3 activations (per-tensor scales), fp16/bf16 out."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        self.out_dtype = w.dtype
        self.w_scale = (w.abs().amax().float() / 448.0).clamp(min=1e-12)
        self.w_fp8_t = (w.float() / self.w_scale).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
        self.bias = linear.bias.detach() if linear.bias is not None else None
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        x_scale = (x2.abs().amax().float() / 448.0).clamp(min=1e-12)
        x_fp8 = (x2.float() / x_scale).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(x_fp8, self.w_fp8_t, scale_a=x_scale, scale_b=self.w_scale, bias=self.bias,
                               out_dtype=self.out_dtype)
        return out.reshape(*shape[:-1], self.out_features)


def fp8_linears(module: torch.nn.Module) -> int:
    """Swap every nn.Linear whose sizes fit fp8 matmuls (multiples of 16) for :class:`FP8Linear`; returns the count."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear) and child.in_features % 16 == 0 and child.out_features % 16 == 0:
            setattr(module, name, FP8Linear(child))
            n += 1
        else:
            n += fp8_linears(child)
    return n


class FloorProbe:
    """Per-forward time of SDXL-size variants under our graphs (batch 1) and their deviation from eager fp16."""

    def __init__(self, report: Report, section: str, unet: Any, inputs_of: Callable[[int], tuple[tuple, dict]],
                 runs: int, warmup: int, device: torch.device, peak_tflops: float | None):
        self.report, self.section, self.unet, self.device = report, section, unet, device
        self.runs, self.warmup, self.peak = runs, warmup, peak_tflops
        self.args, self.kwargs = inputs_of(1)
        with torch.no_grad():
            self.reference = unet_fn(unet)(*self.args, **self.kwargs).float()
        self.flops = forward_flops(lambda: unet_fn(unet)(*self.args, **self.kwargs))
        report.put(section, "flops_per_forward", self.flops)
        self.baseline_ms: float | None = None

    def measure(self, name: str, net: Any, setup: Callable[[], Any] | None = None) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            with contextlib.ExitStack() as stack, torch.no_grad():
                if setup is not None:
                    stack.enter_context(setup())
                acc = Accelerator("graphs", self.device)
                g = acc.wrap(net, name)
                t0 = time.perf_counter()
                out = g(*self.args, **self.kwargs)
                torch.cuda.synchronize(self.device)
                first = time.perf_counter() - t0
                res = time_it(lambda: g(*self.args, **self.kwargs), self.runs, self.warmup, self.device)
                res["graphed"] = len(g) == 1 if isinstance(g, GraphedNet) else False
            res["first_call_s"] = round(first, 2)
            res["vs_eager_fp16_output"] = diff(out, self.reference)
            res["tflops"] = round(self.flops / (res["median_ms"] * 1e-3) / 1e12, 1)
            if self.peak:
                res["fraction_of_measured_bf16_peak"] = round(res["tflops"] / self.peak, 3)
            if self.baseline_ms is None:
                self.baseline_ms = res["median_ms"]
            res["vs_default_graph"] = round(res["median_ms"] / self.baseline_ms, 3)
            print(f"  floor {name:32s} {res['median_ms']:8.2f} ms  {res['tflops']:6.1f} TFLOP/s  "
                  f"rel diff {res['vs_eager_fp16_output']['max_rel']:.2e}  first {first:.1f} s", flush=True)
            return res

        return guarded(self.report, self.section, name, run)


def floor_variants(probe: FloorProbe) -> None:
    """Default kernels, cuDNN attention, channels-last convolutions and fp8 linear layers, all under graphs."""
    unet = probe.unet
    probe.measure("default (diffusers SDPA)", unet_fn(unet))

    def cudnn():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])

    probe.measure("cuDNN attention", unet_fn(unet), cudnn)

    @contextlib.contextmanager
    def channels_last():
        unet.to(memory_format=torch.channels_last)
        try:
            yield
        finally:
            unet.to(memory_format=torch.contiguous_format)

    probe.measure("channels-last convolutions", unet_fn(unet), channels_last)
    if not (hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(probe.device) >= (8, 9)):
        probe.report.put(probe.section, "fp8 linear layers", {"skipped": "no fp8 matmul on this card"})
        return
    import copy

    fp8_unet = copy.deepcopy(unet)
    n = fp8_linears(fp8_unet)
    probe.report.put(probe.section, "fp8 linear layers swapped", n)
    probe.measure("fp8 linear layers", unet_fn(fp8_unet))
    del fp8_unet
    free()


def inductor_section(report: Report, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                     peak_tflops: float | None) -> None:
    """Inductor-compiled kernels (default mode, static shapes) replayed from our graph, SDXL-size batch 1."""
    from diffusers import UNet2DConditionModel

    unet = build(UNet2DConditionModel, str(device), dtype, 4, **unet_config(args.tiny))
    side = args.size or (64 if args.tiny else 1024)
    gen = torch.Generator(device).manual_seed(2)

    def inputs_of(b: int) -> tuple[tuple, dict]:
        x = torch.randn(b, 4, side // 8, side // 8, generator=gen, device=device, dtype=dtype)
        emb = torch.randn(b, 77, unet.config.cross_attention_dim, generator=gen, device=device, dtype=dtype)
        pooled = torch.randn(b, 1280 if not args.tiny else 32, generator=gen, device=device, dtype=dtype)
        time_ids = torch.tensor([side, side, 0, 0, side, side], device=device, dtype=dtype).repeat(b, 1)
        return (x, torch.full((b,), 999.0, device=device)), {
            "encoder_hidden_states": emb, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    probe = FloorProbe(report, "sdxl floor: inductor (batch 1)", unet, inputs_of, args.runs, args.warmup, device,
                       peak_tflops)
    probe.measure("default (diffusers SDPA)", unet_fn(unet))
    probe.measure("inductor kernels under graphs", torch.compile(unet_fn(unet), dynamic=False))
    del unet, probe
    free()


# --------------------------------------------------------------------------------------------
# The models.
# --------------------------------------------------------------------------------------------


def sdxl_section(report: Report, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                 peak_tflops: float | None, deadline: float) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    tiny, side = args.tiny, args.size or (64 if args.tiny else 1024)
    section = "sdxl"
    t0 = time.perf_counter()
    student_unet = build(UNet2DConditionModel, str(device), dtype, 4, **unet_config(tiny))
    teacher_unet = build(UNet2DConditionModel, str(device), dtype, 3, **unet_config(tiny))
    vae = build(AutoencoderKL, str(device), dtype, 0, **vae_config(tiny))
    n_params = sum(p.numel() for p in student_unet.parameters())
    report.put(section, "model", {"unet_params_billion": round(n_params / 1e9, 3), "image": f"{side}x{side}",
                                  "dtype": str(dtype).replace("torch.", ""),
                                  "build_s": round(time.perf_counter() - t0, 1)})
    print(f"SDXL-size UNet {n_params / 1e9:.2f}B x2 built in {time.perf_counter() - t0:.1f} s", flush=True)

    latent = side // 8
    ctx_dim = student_unet.config.cross_attention_dim
    config = student_unet.config
    pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    gen = torch.Generator(device).manual_seed(0)
    max_b = max(args.batches + [2 * b for b in args.sample_batches])
    embeds = torch.randn(max_b, 77, ctx_dim, generator=gen, device=device, dtype=dtype)
    pooled = torch.randn(max_b, pooled_dim, generator=gen, device=device, dtype=dtype)
    time_ids = torch.tensor([side, side, 0, 0, side, side], device=device, dtype=dtype).repeat(max_b, 1)

    def cond(b: int, offset: int = 0) -> dict[str, Any]:
        return {"encoder_hidden_states": embeds[offset:offset + b],
                "added_cond_kwargs": {"text_embeds": pooled[offset:offset + b], "time_ids": time_ids[:b]}}

    def inputs_of(b: int) -> tuple[tuple, dict]:
        x = torch.randn(b, 4, latent, latent, generator=gen, device=device, dtype=dtype)
        t = torch.full((b,), 999.0, device=device)
        return (x, t), cond(b)

    if "sdxl" in args.sections:
        sdxl_sampling(report, args, device, dtype, student_unet, teacher_unet, vae, inputs_of, cond, embeds, pooled,
                      time_ids, side)
    if "paired" in args.sections:
        guarded(report, section, "interleaved b1 (sampling only)", lambda: sdxl_paired(
            report, args, device, dtype, student_unet, teacher_unet, vae, cond, embeds, pooled, time_ids, side))
    del vae
    free()
    if device.type == "cuda" and "floor" in args.sections and time.perf_counter() < deadline - 60:
        floor_variants(FloorProbe(report, "sdxl floor (batch 1, under graphs)", student_unet, inputs_of, args.runs,
                                  args.warmup, device, peak_tflops))
    if {"pipeline", "pipeline-inductor"} & set(args.sections) and time.perf_counter() < deadline - 120:
        guarded(report, "sdxl pipeline", "_section",
                lambda: pipeline_section(report, args, device, dtype, student_unet, side, deadline))
    if "lora" in args.sections and time.perf_counter() < deadline - 45:
        guarded(report, section, "equality: LoRA student / adapter-off teacher, fast vs eager guided 4+1 b1",
                lambda: lora_equality(teacher_unet, lambda s_net, t_net: sdxl_sampler(
                    s_net, t_net, 1, cond, embeds, pooled, time_ids, side, device, dtype), device))
    del student_unet, teacher_unet
    free()


def diffusers_sdxl(vae: Any, unet: Any, **components: Any) -> Any:
    """Diffusers' own ``StableDiffusionXLPipeline`` with SDXL-Lightning's scheduler (Euler, trailing)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="trailing")
    parts = {"text_encoder": None, "text_encoder_2": None, "tokenizer": None, "tokenizer_2": None, **components}
    pipe = StableDiffusionXLPipeline(vae=vae, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
                                     add_watermarker=False, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_paired(report: Report, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, student_unet: Any,
                teacher_unet: Any, vae: Any, cond: Callable, embeds: torch.Tensor, pooled: torch.Tensor,
                time_ids: torch.Tensor, side: int) -> dict[str, Any]:
    """Diffusers' eager pipeline, our eager and our fast sampling, timed interleaved (batch 1, sampling only)."""
    pipe = diffusers_sdxl(vae, student_unet)
    acc = Accelerator("graphs", device)
    eager = sdxl_sampler(unet_fn(student_unet), unet_fn(teacher_unet), 1, cond, embeds, pooled, time_ids, side,
                         device, dtype)
    fast = sdxl_sampler(acc.wrap(unet_fn(student_unet), "student"), acc.wrap(unet_fn(teacher_unet), "teacher"), 1,
                        cond, embeds, pooled, time_ids, side, device, dtype)
    calls = {
        "diffusers eager plain 4": lambda: pipe(prompt_embeds=embeds[:1], pooled_prompt_embeds=pooled[:1],
                                                num_inference_steps=4, guidance_scale=0.0, height=side, width=side,
                                                output_type="latent", generator=torch.Generator(device).manual_seed(0)),
        "eager plain 4": lambda: eager(4, False),
        "fast plain 4": lambda: fast(4, False),
        "fast guided 4+1": lambda: fast(4, True),
    }
    res, _ = time_paired(calls, args.runs, args.warmup, device)
    print("  interleaved b1: " + ", ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in res.items() if "median_ms" in v)
          + f"; ratios {res['ratio_to_first (median of per-round ratios)']}", flush=True)
    return res


def sdxl_sampler(student_net: Any, teacher_net: Any, b: int, cond: Callable[[int], dict], embeds: torch.Tensor,
                 pooled: torch.Tensor, time_ids: torch.Tensor, side: int, device: torch.device,
                 dtype: torch.dtype) -> Sampler:
    """Euler (trailing, SDXL-Lightning's scheduler) over an SDXL-size pair; teacher CFG against zero embeddings."""
    uncond = {"encoder_hidden_states": torch.zeros_like(embeds[:b]),
              "added_cond_kwargs": {"text_embeds": torch.zeros_like(pooled[:b]), "time_ids": time_ids[:b]}}
    schedule = DiscreteVPSchedule.from_betas(beta_schedule="scaled_linear")
    sigmas_of = lambda n: euler_sigmas(schedule, n, timestep_spacing="trailing")  # noqa: E731
    return Sampler("vp", student_net, teacher_net, (b, 4, side // 8, side // 8), cond(b), uncond, sigmas_of, device,
                   dtype)


def sdxl_sampling(report: Report, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, student_unet: Any,
                  teacher_unet: Any, vae: Any, inputs_of: Callable, cond: Callable, embeds: torch.Tensor,
                  pooled: torch.Tensor, time_ids: torch.Tensor, side: int) -> None:
    """SDXL-size per-forward floor, diffusers' pipeline, our eager and fast sampling, and their equality."""
    section = "sdxl"
    latent = side // 8
    gen = torch.Generator(device).manual_seed(1)
    acc_fwd = Accelerator("graphs", device) if device.type == "cuda" else None
    floors = forward_table(report, section, unet_fn(student_unet), inputs_of, args.batches, args.runs, args.warmup,
                           device, acc_fwd)
    del acc_fwd
    free()

    # Diffusers' own pipeline, eager, sampling only.
    pipe = diffusers_sdxl(vae, student_unet)
    for b in args.sample_batches:
        for steps in (4, 5):
            def run_diffusers(b=b, steps=steps):
                call = lambda: pipe(prompt_embeds=embeds[:b], pooled_prompt_embeds=pooled[:b],  # noqa: E731
                                    num_inference_steps=steps, guidance_scale=0.0, height=side, width=side,
                                    output_type="latent", generator=torch.Generator(device).manual_seed(0))
                res = time_it(call, args.runs, args.warmup, device)
                res["peak_mem_gib"] = peak_memory(call, device)
                print(f"  diffusers eager plain {steps} b{b}: {res['median_ms']:9.1f} ms  "
                      f"[{res['min_ms']:.1f}, {res['max_ms']:.1f}]", flush=True)
                return res

            guarded(report, section, f"diffusers eager plain {steps} b{b}", run_diffusers)
    del pipe

    # VAE decode (reported beside sampling; the same on every path).
    def vae_decode():
        z = torch.randn(1, 4, latent, latent, generator=gen, device=device, dtype=dtype)
        with torch.no_grad():
            return time_it(lambda: vae.decode(z / vae.config.scaling_factor, return_dict=False)[0],
                           max(5, args.runs // 4), 1, device)

    guarded(report, section, "vae decode b1 (eager)", vae_decode)

    # Ours: eager and fast.
    accelerators = {"fast": Accelerator("graphs", device)}
    nets = {"eager": (unet_fn(student_unet), unet_fn(teacher_unet))}
    nets["fast"] = (accelerators["fast"].wrap(nets["eager"][0], "student"),
                    accelerators["fast"].wrap(nets["eager"][1], "teacher"))

    def make(path: str, b: int) -> Sampler:
        return sdxl_sampler(*nets[path], b, cond, embeds, pooled, time_ids, side, device, dtype)

    modes = [("plain 4", 4, False), ("plain 5", 5, False), ("guided 4+1", 4, True)]
    sampling_table(report, section, make, args.sample_batches, modes, args.runs, args.warmup, device, floors,
                   accelerators)
    report.put(section, "first calls (fast path)", [{"net": r.name, "shape": r.signature, "s": round(r.seconds, 3)}
                                             for r in accelerators["fast"].records])

    # Equality: the same guided run, eager and fast.
    def equality():
        eager = make("eager", 1)(4, True, seed=7)
        fast = make("fast", 1)(4, True, seed=7)
        return diff(fast, eager)

    guarded(report, section, "equality: fast vs eager guided 4+1 b1 (latents)", equality)
    del accelerators
    free()


class ArgsRecorder:
    """Wraps a pipeline's network for one call and keeps the arguments of its first call per batch size."""

    def __init__(self, net: Callable[..., Any]):
        self.net, self.args_by_batch = net, {}

    def __call__(self, sample: torch.Tensor, timestep: Any, **cond: Any) -> Any:
        self.args_by_batch.setdefault(int(sample.shape[0]), ((sample, timestep), cond))
        return self.net(sample, timestep, **cond)


def recorded_forwards(pipe: Any, calls: list[Callable[[], Any]]) -> dict[str, tuple[Callable[[], Any], int]]:
    """The pipeline's own (graphed) student and teacher networks, replayable on arguments they got in ``calls``.

    Returns ``{"student bN" / "teacher bN": (forward, N)}``: each replays exactly what the pipeline
    replays, so their times are the graph floor of the pipeline's forwards, measured in the same run.
    """
    nets = {"student": ArgsRecorder(pipe._student_net), "teacher": ArgsRecorder(pipe._teacher_net)}
    pipe._student_net, pipe._teacher_net = nets["student"], nets["teacher"]
    try:
        for call in calls:
            call()
    finally:
        pipe._student_net, pipe._teacher_net = nets["student"].net, nets["teacher"].net
    out = {}
    for who, rec in nets.items():
        for b, (a, k) in sorted(rec.args_by_batch.items()):
            def forward(net=rec.net, a=a, k=k):
                with torch.no_grad():
                    return net(*a, **k)

            out[f"{who} b{b}"] = (forward, b)
    return out


def per_round(times: dict[str, list[float]], fn: Callable[..., float], *keys: str) -> dict[str, Any] | None:
    """Median and [min-max] over rounds of ``fn(*one round's times of keys)``, or None if a key is missing."""
    if not all(k in times for k in keys):
        return None
    vals = [fn(*r) for r in zip(*(times[k] for k in keys))]
    return {"median": round(statistics.median(vals), 4), "min": round(min(vals), 4), "max": round(max(vals), 4)}


PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


def pipeline_section(report: Report, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                     student_unet: Any, side: int, deadline: float) -> None:
    """The real :class:`~distillpp.pipelines.DistillppPipeline` over random SDXL-size text encoders and UNets.

    Sections ``pipeline`` (:func:`pipeline_rounds`) and ``pipeline-inductor`` (:func:`pipeline_inductor`).
    """
    import tempfile

    from sdxl_gpu_latency import make_components  # random SDXL-size text encoders and a byte-level tokenizer

    components, teacher_unet = make_components(args.tiny, str(device), dtype, tempfile.mkdtemp(prefix="gpu_latency_"))
    student_pipe = diffusers_sdxl(components["vae"], student_unet, text_encoder=components["text_encoder"],
                                  text_encoder_2=components["text_encoder_2"], tokenizer=components["tokenizer"],
                                  tokenizer_2=components["tokenizer_2"])

    def calls_of(pipe: Any) -> Callable[[int, int, bool], Callable[[], Any]]:
        """``make(batch, steps, guided)`` -> one call of ``pipe`` (latents out, prompt encoding included)."""
        return lambda b, steps, guided: lambda: pipe(
            PROMPT, num_images_per_prompt=b, generator=torch.Generator(device).manual_seed(0),
            num_inference_steps=steps, strength=0.05 if guided else 0.0, guided_steps=1, teacher_cfg=TEACHER_CFG,
            height=side, width=side, output_type="latent")

    if "pipeline" in args.sections:
        pipeline_rounds(report, args, device, dtype, student_pipe, teacher_unet, components["vae"], side, deadline,
                        calls_of)
    if "pipeline-inductor" in args.sections:
        guarded(report, "sdxl pipeline: compile='inductor'", "_section", lambda: pipeline_inductor(
            report, args, device, student_pipe, teacher_unet, calls_of, deadline, side))
    del student_pipe, teacher_unet, components
    free()


def pipeline_rounds(report: Report, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                    student_pipe: Any, teacher_unet: Any, vae: Any, side: int, deadline: float,
                    calls_of: Callable[[Any], Callable[[int, int, bool], Callable[[], Any]]]) -> None:
    """Every path of the real pipeline interleaved, round by round, with its own graph floor.

    Every call has ``output_type="latent"`` and includes prompt encoding (diffusers' and ours alike);
    encoding and VAE decode are also timed on their own. One round calls, in turn: diffusers' eager
    pipeline, ours eager and fast (``compile="graphs"``: UNets and text encoders replayed from graphs),
    encoding eager and fast, with ``--teacher-device`` the fast guided call with the teacher there, and
    the pipeline's own graphed student and teacher forwards on the arguments of its calls (the graph
    floor, in the same run).
    """
    import copy

    from distillpp.accel import Accelerator, shared_accelerator
    from distillpp.pipelines import DistillppPipeline

    section = "sdxl pipeline"
    prompt = PROMPT
    pipes = {"eager": DistillppPipeline(student_pipe, teacher_unet, compile="none")}
    graphs_acc = shared_accelerator("graphs", device)
    n_records = len(graphs_acc.records)
    pipes["fast"] = DistillppPipeline(student_pipe, teacher_unet, compile="graphs")
    report.put(section, "model", {"image": f"{side}x{side}", "dtype": str(dtype).replace("torch.", ""),
                                  "text encoders graphed (fast)": len(pipes["fast"]._encoders),
                                  "calls": "output_type='latent', prompt encoding included; CFG 7.5 teacher as one "
                                           "batch-2B forward; strength 0.05 on step 1 of 4 (guided)"})

    def ours(path: str, b: int, steps: int, guided: bool) -> Callable[[], Any]:
        return calls_of(pipes[path])(b, steps, guided)

    def encode(path: str) -> Callable[[], Any]:
        def run():
            with torch.no_grad(), (pipes["fast"].fast_encoders() if path == "fast" else contextlib.nullcontext()):
                return student_pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return run

    rounds: dict[int, dict[str, Callable[[], Any]]] = {1: {}, 4: {}}
    # The fast guided call comes first among the fast ones: its first call is a user's first call,
    # capturing the student, the teacher and the text encoders.
    rounds[1] = {"diffusers eager plain 4": diffusers_call(student_pipe, 1, side, device),
                 "eager plain 4": ours("eager", 1, 4, False), "eager guided 4+1": ours("eager", 1, 4, True), "fast guided 4+1": ours("fast", 1, 4, True),
                 "fast plain 4": ours("fast", 1, 4, False), "fast plain 5": ours("fast", 1, 5, False),
                 "encode eager": encode("eager"), "encode fast": encode("fast")}
    rounds[4] = {"fast guided 4+1": ours("fast", 4, 4, True), "fast plain 4": ours("fast", 4, 4, False),
                 "fast plain 5": ours("fast", 4, 5, False)}
    if args.teacher_device:
        second = copy.deepcopy(teacher_unet)  # the pipeline moves its teacher there
        n_second = len(shared_accelerator("graphs", torch.device(args.teacher_device)).records) \
            if torch.device(args.teacher_device).type == "cuda" else 0
        pipes["fast, teacher on " + args.teacher_device] = DistillppPipeline(
            student_pipe, second, compile="graphs", teacher_device=args.teacher_device)
        rounds[1][f"fast guided 4+1, teacher on {args.teacher_device}"] = ours(
            "fast, teacher on " + args.teacher_device, 1, 4, True)

    # First calls (the fast ones capture: UNets per batch, encoders once) and peak memory, one at a time.
    firsts: dict[str, Any] = {}
    for b, calls in rounds.items():
        for label, call in calls.items():
            if label.startswith("encode"):
                continue
            n0 = len(graphs_acc.records)
            t0 = time.perf_counter()
            try:
                call()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                entry = {"first_call_s": round(time.perf_counter() - t0, 3),
                         "captures": [f"{r.name} {r.signature} {r.seconds:.3f} s" for r in graphs_acc.records[n0:]],
                         "peak_mem_gib": peak_memory(call, device)}
            except Exception as e:  # noqa: BLE001 - reported, and the row leaves the rounds
                entry = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                calls[label] = None
            firsts[f"{label} b{b}"] = entry
            print(f"  first call {label} b{b}: {entry}", flush=True)
        rounds[b] = {k: v for k, v in calls.items() if v is not None}
    report.put(section, "first calls and peak memory", firsts)
    records = graphs_acc.records[n_records:]
    if args.teacher_device and torch.device(args.teacher_device).type == "cuda":
        records = records + shared_accelerator("graphs", torch.device(args.teacher_device)).records[n_second:]
    report.put(section, "captures (compile='graphs')", [{"net": r.name, "shape": r.signature, "s": round(r.seconds, 3)}
                                                         for r in records])

    # The graph floor: the fast pipeline's own forwards, on the arguments of its calls.
    guided_calls = [c for c in (rounds[1].get("fast guided 4+1"), rounds[4].get("fast guided 4+1")) if c is not None]
    for name, (fn, b) in recorded_forwards(pipes["fast"], guided_calls).items():
        rounds[1 if b <= 2 else 4][f"floor: {name} forward"] = fn

    def equality():  # the same guided call, fast and eager (and with the teacher on the other device)
        latents = {k: rounds[1][k]().images for k in rounds[1] if "guided" in k}
        return {f"{k} vs eager guided 4+1": diff(v, latents["eager guided 4+1"]) for k, v in latents.items()
                if k != "eager guided 4+1"}

    guarded(report, section, "equality (latents, b1)", equality)

    for b, calls in rounds.items():
        if time.perf_counter() > deadline - 30:
            report.put(section, f"interleaved b{b} (with encoding)", {"skipped": "past --budget-s"})
            continue

        def paired(calls=calls, b=b):
            res, times = time_paired(calls, args.runs, args.warmup, device)
            s, t = f"floor: student b{b} forward", f"floor: teacher b{2 * b} forward"
            derived = {
                "fast guided 4+1 / floor (4 student + 1 teacher forward)": per_round(
                    times, lambda g, s1, t1: g / (4 * s1 + t1), "fast guided 4+1", s, t),
                "fast plain 4 / floor (4 student forwards)": per_round(
                    times, lambda p, s1: p / (4 * s1), "fast plain 4", s),
                "fast plain 5 / floor (5 student forwards)": per_round(
                    times, lambda p, s1: p / (5 * s1), "fast plain 5", s),
                "(fast guided 4+1 - encode fast) / floor": per_round(
                    times, lambda g, e, s1, t1: (g - e) / (4 * s1 + t1), "fast guided 4+1", "encode fast", s, t),
                "diffusers eager plain 4 / fast plain 4 (speed-up)": per_round(
                    times, lambda d, f: d / f, "diffusers eager plain 4", "fast plain 4"),
                "eager plain 4 / diffusers eager plain 4": per_round(
                    times, lambda e, d: e / d, "eager plain 4", "diffusers eager plain 4"),
                "floor guided 4+1 (ms)": per_round(times, lambda s1, t1: 4 * s1 + t1, s, t),
            }
            res["per-round ratios"] = {k: v for k, v in derived.items() if v is not None}
            res["times_ms (every round, in order)"] = {k: [round(x, 2) for x in v] for k, v in times.items()}
            print(f"  interleaved b{b}: " + ", ".join(f"{k} {v['median_ms']:.1f}" for k, v in res.items()
                                                     if isinstance(v, dict) and "median_ms" in v), flush=True)
            print(f"  per-round ratios b{b}: {res['per-round ratios']}", flush=True)
            return res

        guarded(report, section, f"interleaved b{b} (with encoding)", paired)

    # VAE decode (not in any row above: every call returns latents), eager and replayed from a graph.
    def vae_rows():
        z = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator(device).manual_seed(5), device=device,
                        dtype=dtype) / vae.config.scaling_factor

        def decode(latents):
            return vae.decode(latents, return_dict=False)[0]

        decode.model = vae
        graphed = Accelerator("graphs", device).wrap(decode, "vae decode") if device.type == "cuda" else decode
        with torch.no_grad():
            out_e, out_g = decode(z), graphed(z)
            res, _ = time_paired({"vae decode b1 eager": lambda: decode(z),
                                  "vae decode b1 graphed": lambda: graphed(z)}, args.runs, args.warmup, device)
        res["graphed vs eager"] = diff(out_g, out_e)
        return res

    if time.perf_counter() < deadline - 20:
        guarded(report, section, "vae decode b1 (separate from every row above)", vae_rows)
    report.put(section, "targets (batch 1, this run)", pipeline_targets(report.data["sections"][section]))
    fast = pipes["fast"]
    report.put(section, "fast pipeline's graphed networks (replays / eager calls)", {
        g.name: {"graphs": len(g), "replays": g.replays, "eager calls": g.eager_calls}
        for g in [fast._student_net, fast._teacher_net] + [w for _, w in fast._encoders] if isinstance(g, GraphedNet)})
    pipes.clear()
    free()


def pipeline_targets(sec: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, read off this run's batch-1 rounds (medians of per-round ratios)."""
    b1 = sec.get("interleaved b1 (with encoding)", {})
    ratios = b1.get("per-round ratios", {}) if isinstance(b1, dict) else {}

    def ratio(key: str) -> Any:
        return ratios.get(key, {}).get("median", "not measured")

    def spread(key: str) -> Any:
        v = b1.get(key, {}) if isinstance(b1, dict) else {}
        return f"max-min {v['spread_pct']}%, IQR {v['iqr_pct']}%" if "spread_pct" in v else "not measured"

    first = sec.get("first calls and peak memory", {}).get("fast guided 4+1 b1", {})
    return {
        "fast guided 4+1 within 1.05x of its forwards' graph floor (encoding excluded)":
            ratio("(fast guided 4+1 - encode fast) / floor"),
        "fast guided 4+1 / floor with the (graphed) encoding included": ratio(
            "fast guided 4+1 / floor (4 student + 1 teacher forward)"),
        "fast plain 4 at least 2.5x faster than diffusers' eager (both with encoding)": ratio(
            "diffusers eager plain 4 / fast plain 4 (speed-up)"),
        "eager plain 4 within 3% of diffusers' eager": ratio("eager plain 4 / diffusers eager plain 4"),
        "fast path spread under 3%": {k: spread(k) for k in ("fast plain 4", "fast plain 5", "fast guided 4+1")},
        "first call (captures) under 10 s: fast guided 4+1 b1 first call s": first.get("first_call_s", "not measured"),
    }


def diffusers_call(student_pipe: Any, b: int, side: int, device: torch.device) -> Callable[[], Any]:
    """One call of diffusers' own eager SDXL pipeline: plain 4 steps, prompt encoding included, latents out."""
    return lambda: student_pipe(PROMPT, num_images_per_prompt=b, guidance_scale=0.0, num_inference_steps=4,
                                generator=torch.Generator(device).manual_seed(0), height=side, width=side,
                                output_type="latent")


def pipeline_inductor(report: Report, args: argparse.Namespace, device: torch.device, student_pipe: Any,
                      teacher_unet: Any, calls_of: Callable, deadline: float, side: int) -> None:
    """``compile="inductor"`` through the real pipeline: first call (compile) per shape, then every path interleaved.

    Plain 4 (the student at batch 1), then guided 4+1 (the teacher at batch 2), each compiled only
    while at least ``--inductor-need-s`` seconds of ``--budget-s`` are left; compiled artifacts land in
    ``TORCHINDUCTOR_CACHE_DIR`` (a second process on the same machine reuses them: its first call is
    the warm-cache cost). Then one interleaved run, round by round: diffusers' eager pipeline, ours with
    ``compile="graphs"`` and with ``compile="inductor"``, and the floors of both (each pipeline's own
    graphed student and teacher forwards on the arguments of its calls), with the per-forward rate as
    a fraction of the card's measured bf16 matmul rate.
    """
    import os as _os

    from distillpp.pipelines import DistillppPipeline

    section = "sdxl pipeline: compile='inductor'"
    eager = DistillppPipeline(student_pipe, teacher_unet, compile="none")
    graphs = DistillppPipeline(student_pipe, teacher_unet, compile="graphs")
    pipe = DistillppPipeline(student_pipe, teacher_unet, compile="inductor")
    make, make_eager, make_graphs = calls_of(pipe), calls_of(eager), calls_of(graphs)
    report.put(section, "cache", _os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
    compiled: dict[str, Callable[[], Any]] = {}
    for label, steps, guided in (("plain 4", 4, False), ("guided 4+1", 4, True)):
        if label.split()[0] not in args.inductor_calls:
            continue
        left = deadline - time.perf_counter()
        if left < args.inductor_need_s:
            report.put(section, f"inductor {label} b1", {"skipped": f"{left:.0f} s left of --budget-s"})
            continue

        def first(steps=steps, guided=guided, label=label):
            call = make(1, steps, guided)
            n0 = len(pipe_records(pipe, device))
            t0 = time.perf_counter()
            out = call().images
            if device.type == "cuda":
                torch.cuda.synchronize()
            res = {"first_call_s (compile + capture)": round(time.perf_counter() - t0, 1),
                   "compiles": [f"{r.name} {r.signature} {r.seconds:.1f} s ({r.kind})"
                                for r in pipe_records(pipe, device)[n0:]],
                   "vs eager (latents)": diff(out, make_eager(1, steps, guided)().images),
                   "peak_mem_gib": peak_memory(call, device)}
            print(f"  inductor {label} b1: first call {res['first_call_s (compile + capture)']} s, "
                  f"{res['compiles']}, vs eager {res['vs eager (latents)']}", flush=True)
            compiled[f"inductor {label}"] = call
            return res

        guarded(report, section, f"first call: inductor {label} b1 (with encoding)", first)
    if not compiled or time.perf_counter() > deadline - 20:
        return
    rounds = {"diffusers eager plain 4": diffusers_call(student_pipe, 1, side, device),
              "graphs plain 4": make_graphs(1, 4, False), **compiled}
    if "inductor guided 4+1" in compiled:
        rounds["graphs guided 4+1"] = make_graphs(1, 4, True)
    for who, p in (("inductor", pipe), ("graphs", graphs)):
        guided = "inductor guided 4+1" in compiled  # a guided call runs the student and the teacher
        for name, (fn, b) in recorded_forwards(p, [calls_of(p)(1, 4, guided)]).items():
            rounds[f"floor: {who} {name} forward"] = fn
    eager_student = recorded_forwards(eager, [make_eager(1, 4, False)])["student b1"][0]  # a replay counts nothing
    flops = guarded(report, section, "student forward FLOPs (b1)", lambda: forward_flops(eager_student))
    peak = report.data.get("measured_bf16_tflops")

    def paired():
        res, times = time_paired(rounds, args.runs, args.warmup, device)
        derived = {}
        for who in ("inductor", "graphs"):
            s, t = f"floor: {who} student b1 forward", f"floor: {who} teacher b2 forward"
            derived[f"diffusers eager plain 4 / {who} plain 4 (speed-up)"] = per_round(
                times, lambda d, f: d / f, "diffusers eager plain 4", f"{who} plain 4")
            derived[f"{who} plain 4 / its floor (4 student forwards)"] = per_round(
                times, lambda p_, s1: p_ / (4 * s1), f"{who} plain 4", s)
            derived[f"{who} guided 4+1 / its floor (4 student + 1 teacher forward)"] = per_round(
                times, lambda g, s1, t1: g / (4 * s1 + t1), f"{who} guided 4+1", s, t)
            if isinstance(flops, int) and s in res:
                rate = flops / (res[s]["median_ms"] * 1e-3) / 1e12
                res.setdefault("student b1 forward rate (median)", {})[who] = {
                    "TFLOP/s": round(rate, 1), "% of measured bf16 matmul rate": round(100 * rate / peak, 1)
                    if peak else None}
        derived["inductor floor / graphs floor (student b1 forward)"] = per_round(
            times, lambda a, b: a / b, "floor: inductor student b1 forward", "floor: graphs student b1 forward")
        res["per-round ratios"] = {k: v for k, v in derived.items() if v is not None}
        res["times_ms (every round, in order)"] = {k: [round(x, 2) for x in v] for k, v in times.items()}
        print("  inductor interleaved b1: " + ", ".join(f"{k} {v['median_ms']:.1f}" for k, v in res.items()
                                                        if isinstance(v, dict) and "median_ms" in v), flush=True)
        print(f"  per-round ratios: {res['per-round ratios']}", flush=True)
        return res

    guarded(report, section, "interleaved b1 (with encoding)", paired)


def pipe_records(pipe: Any, device: torch.device) -> list:
    """Capture/compile records of the process-wide accelerator that a pipeline's networks joined on ``device``."""
    from distillpp.accel import shared_accelerator

    return [] if pipe.compile == "none" else shared_accelerator(pipe.compile, device).records


def lora_equality(unet: Any, make: Callable[[Any, Any], Sampler], device: torch.device) -> dict:
    """A rank-64 LoRA student whose teacher is the same UNet with the adapter off: fast equals eager."""
    from peft import LoraConfig

    from distillpp.accel import _wrapper_classes

    AdapterOffNet = _wrapper_classes()[0]
    unet.add_adapter(LoraConfig(r=64, lora_alpha=64, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="student")
    dtype = next(unet.parameters()).dtype
    for n, p in unet.named_parameters():
        if "lora_" in n:  # peft keeps adapters in float32; released LoRAs run in the model dtype
            p.data = p.data.to(dtype)
    try:
        student_net = unet_fn(unet)
        teacher_net = AdapterOffNet(student_net, unet)
        acc = Accelerator("graphs", device)
        results = {}
        for path in ("eager", "fast"):
            sampler = make(student_net, teacher_net) if path == "eager" else make(
                acc.wrap(student_net, "lora student"), acc.wrap(teacher_net, "adapter-off teacher"))
            results[path] = sampler(4, True, seed=11)
            if path == "fast":
                rerun = time_it(lambda: sampler(4, True, seed=11), 5, 1, device)
        res = diff(results["fast"], results["eager"])
        res["fast_guided_4+1_b1_ms"] = rerun
        res["captures"] = [{"net": r.name, "shape": r.signature, "s": round(r.seconds, 3)} for r in acc.records]
        print(f"  LoRA adapter-off fast vs eager: max rel {res['max_rel']:.2e}; guided 4+1 {rerun['median_ms']:.1f} ms",
              flush=True)
        return res
    finally:
        unet.delete_adapters("student")


def flux_section(report: Report, args: argparse.Namespace, device: torch.device, peak_tflops: float | None) -> None:
    from diffusers import FluxTransformer2DModel

    from distillpp.zoo import flow_grid

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    section = "flux"
    side = args.size or (64 if args.tiny else 1024)
    cfg = flux_config(args.tiny, args.flux_layers, args.flux_single_layers)
    t0 = time.perf_counter()
    model = build(FluxTransformer2DModel, str(device), dtype, 5, **cfg)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = (side // 16) ** 2
    text_tokens = 16 if args.tiny else 512
    report.put(section, "model", {"params_billion": round(n_params / 1e9, 3), "config": cfg, "image": f"{side}x{side}",
                                  "image_tokens": tokens, "text_tokens": text_tokens,
                                  "dtype": str(dtype).replace("torch.", ""),
                                  "build_s": round(time.perf_counter() - t0, 1),
                                  "note": "one transformer (with FLUX.1-dev's guidance embedding) serves as both "
                                          "student and teacher: timing does not depend on the weights"})
    print(f"FLUX-size transformer {n_params / 1e9:.2f}B built in {time.perf_counter() - t0:.1f} s", flush=True)
    gen = torch.Generator(device).manual_seed(0)
    channels = cfg["in_channels"]
    img_ids = torch.zeros(tokens, 3, device=device)
    h = torch.arange(side // 16, device=device, dtype=torch.float32)
    img_ids[:, 1] = h.repeat_interleave(side // 16)
    img_ids[:, 2] = h.repeat(side // 16)
    txt_ids = torch.zeros(text_tokens, 3, device=device)
    max_b = max(args.flux_batches + args.flux_sample_batches)
    text = torch.randn(max_b, text_tokens, cfg["joint_attention_dim"], generator=gen, device=device, dtype=dtype)
    pooled = torch.randn(max_b, cfg["pooled_projection_dim"], generator=gen, device=device, dtype=dtype)

    def flux_net(hidden_states, timestep, **cond):
        return model(hidden_states=hidden_states, timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, **cond,
                     return_dict=False)[0]

    flux_net.model = model

    def cond(b: int) -> dict[str, Any]:
        return {"encoder_hidden_states": text[:b], "pooled_projections": pooled[:b],
                "guidance": torch.full((b,), FLUX_GUIDANCE, device=device)}

    def inputs_of(b: int) -> tuple[tuple, dict]:
        x = torch.randn(b, tokens, channels, generator=gen, device=device, dtype=dtype)
        return (x, torch.full((b,), 1.0, device=device)), cond(b)

    acc_fwd = Accelerator("graphs", device) if device.type == "cuda" else None
    floors = forward_table(report, section, flux_net, inputs_of, args.flux_batches, args.runs, args.warmup, device,
                           acc_fwd)
    del acc_fwd
    free()
    if device.type == "cuda":
        args1, kwargs1 = inputs_of(1)
        flops = forward_flops(lambda: flux_net(*args1, **kwargs1))
        res = {"flops_per_forward": flops}
        if 1 in floors:
            res["tflops_graph_b1"] = round(flops / (floors[1] * 1e-3) / 1e12, 1)
            if peak_tflops:
                res["fraction_of_measured_bf16_peak"] = round(res["tflops_graph_b1"] / peak_tflops, 3)
        report.put(section, "flops", res)

    accelerators = {"fast": Accelerator("graphs", device)}

    def make(path: str, b: int) -> Sampler:
        net = accelerators["fast"].wrap(flux_net, "transformer") if path == "fast" else flux_net
        # Student (FLUX-schnell-like: 4 Euler steps) and teacher (FLUX.1-dev-like: guidance embedding, no CFG).
        return Sampler("flow", net, net, (b, tokens, channels), cond(b), None, flow_grid, device, dtype)

    modes = [("plain 4", 4, False), ("guided 4+1", 4, True)] + ([("plain 5", 5, False)] if args.flux_plain5 else [])
    sampling_table(report, section, make, args.flux_sample_batches, modes, args.runs, args.warmup, device, floors,
                   accelerators, teacher_mult=1)

    def equality():
        eager = make("eager", 1)(4, True, seed=7)
        fast = make("fast", 1)(4, True, seed=7)
        return diff(fast, eager)

    guarded(report, section, "equality: fast vs eager guided 4+1 b1 (latents)", equality)
    del model, accelerators
    free()


def zoo_section(report: Report, args: argparse.Namespace, device: torch.device) -> None:
    """The shipped Fashion-MNIST lcm student guided by its teacher: fast equals eager, and how much faster."""
    from distillpp import zoo

    section = "zoo"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    student, teacher = zoo.load("lcm", device, dtype), zoo.load("teacher", device, dtype)
    batch = 8 if args.tiny else 64
    labels = torch.arange(batch, device=device) % 10
    acc = Accelerator("graphs", device)
    eager_s, eager_t = student.denoiser.inner.net, teacher.denoiser.inner.net
    fast_s, fast_t = acc.wrap(eager_s, "zoo lcm"), acc.wrap(eager_t, "zoo teacher")
    sigmas = student.sigmas()

    def run(fast: bool, seed: int = 0) -> torch.Tensor:
        student.denoiser.inner.net, teacher.denoiser.inner.net = (fast_s, fast_t) if fast else (eager_s, eager_t)
        gen = torch.Generator(device).manual_seed(seed)
        x = student.initial(torch.randn(batch, 1, 32, 32, generator=gen, device=device), sigmas)
        return distillpp.sample(student.denoiser, x, sigmas, sampler=student.sampler, extra_args=student.args(labels),
                                teacher=teacher.denoiser, teacher_args=teacher.args(labels), generator=gen,
                                guidance=distillpp.TeacherGuidance(strength=0.1, guided_steps=1,
                                                                   teacher_cfg=zoo.TEACHER_CFG))

    eager, fast = run(False, 3), run(True, 3)
    res = {"batch": batch, "dtype": str(dtype).replace("torch.", ""), "lcm guided 4+1 (latents)": diff(fast, eager),
           "images_equal_fraction": (zoo.to_images(fast) == zoo.to_images(eager)).float().mean().item()}
    res[f"eager guided 4+1 b{batch}"] = time_it(lambda: run(False), args.runs, args.warmup, device)
    res[f"fast guided 4+1 b{batch}"] = time_it(lambda: run(True), args.runs, args.warmup, device)
    res["captures"] = [{"net": r.name, "shape": r.signature, "s": round(r.seconds, 3)} for r in acc.records]
    eager_ms, fast_ms = res[f"eager guided 4+1 b{batch}"]["median_ms"], res[f"fast guided 4+1 b{batch}"]["median_ms"]
    print(f"  zoo lcm+teacher b{batch}: eager {eager_ms:.2f} ms, fast {fast_ms:.2f} ms, max rel diff "
          f"{res['lcm guided 4+1 (latents)']['max_rel']:.2e}", flush=True)
    report.put(section, "lcm + teacher", res)


def zoo_pipeline_section(report: Report, args: argparse.Namespace, device: torch.device, deadline: float) -> None:
    """``from_preset("zoo-lcm", compile=...)`` for none, graphs and inductor: latency, first call, equality."""
    from distillpp.pipelines import from_preset

    section = "zoo pipeline (zoo-lcm + teacher, guided 4+1)"
    batch = 8 if args.tiny else 64
    prompts = [str(i % 10) for i in range(batch)]
    images: dict[str, torch.Tensor] = {}
    for mode in ("none", "graphs", "inductor"):
        if mode == "inductor" and (device.type != "cuda" or time.perf_counter() > deadline - 60):
            report.put(section, f"compile={mode} b{batch}", {"skipped": "CPU or not enough time left in --budget-s"})
            continue

        def measure(mode=mode):
            pipe = from_preset("zoo-lcm", device=str(device), compile=mode)

            def call():
                # The zoo family draws its noise on the CPU (device-independent samples).
                return pipe(prompts, generator=torch.Generator().manual_seed(0), output_type="pt",
                            strength=0.1, guided_steps=1).images

            t0 = time.perf_counter()
            images[mode] = call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first = time.perf_counter() - t0
            res = time_it(call, args.runs, args.warmup, device)
            res["first_call_s"] = round(first, 2)
            if mode != "none" and "none" in images:
                res["vs_eager_images"] = diff(images[mode], images["none"])
            print(f"  zoo-lcm pipeline compile={mode}: {res['median_ms']:.2f} ms  first {first:.1f} s", flush=True)
            return res

        guarded(report, section, f"compile={mode} b{batch}", measure)


# --------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------


def _ms(res: Any) -> str:
    if not isinstance(res, dict) or "median_ms" not in res:
        return "failed" if isinstance(res, dict) and "error" in res else "-"
    return f"{res['median_ms']:.1f} [{res['min_ms']:.1f}-{res['max_ms']:.1f}]"


def interleaved_markdown(title: str, res: dict[str, Any]) -> list[str]:
    """An interleaved timing (:func:`time_paired`) as a table, then its per-round ratios."""
    ratios = res.get("ratio_to_first (median of per-round ratios)", {})
    lines = [f"### {title}", "", "| call | ms, median [min-max] | IQR % | spread (max-min) % | per-round ratio to the "
             "first row |", "|---|---|---|---|---|"]
    rows = [(k, v) for k, v in res.items() if isinstance(v, dict) and "median_ms" in v]
    for n, (k, v) in enumerate(rows):
        lines.append(f"| {k} | {_ms(v)} | {v['iqr_pct']} | {v['spread_pct']} | {1 if n == 0 else ratios.get(k, '-')} |")
    for k, v in res.get("per-round ratios", {}).items():
        lines.append(f"- {k}: median {v['median']} [{v['min']}-{v['max']}]")
    for k, v in res.items():
        if not isinstance(v, dict) or "median_ms" in v or k in ("per-round ratios", "times_ms (every round, in order)",
                                                                 "ratio_to_first (median of per-round ratios)"):
            continue
        lines.append(f"- {k}: {json.dumps(v, default=str)}")
    lines.append("")
    return lines


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# GPU latency: eager vs the fast path ({'tiny CPU smoke test' if r['tiny'] else 'random weights'})",
        "",
        f"- card: {r['card']}; date: {r['date']}; torch {r['torch']}, diffusers {r['diffusers']}",
        f"- command: `{r['command']}`",
        f"- bf16 matmul (8192^3) measured: {r['measured_bf16_tflops']} TFLOP/s; datasheet dense bf16: "
        f"{r['datasheet_bf16_tflops']} TFLOP/s",
        f"- CUDA events; median [min-max] of {r['runs']} runs after {r['warmup']} warm-up; spread = (max - min) / "
        "median; sampling only (prompt embeddings precomputed, latents out; VAE decode listed separately) unless a "
        "row says 'with encoding'; Euler, 4 + 1 guided = 4 student steps with the first guided by one teacher "
        "forward (SDXL: CFG 7.5 as one batch-2B forward)",
        "",
    ]
    for name, sec in r["sections"].items():
        lines += [f"## {name}", ""]
        model = sec.get("model")
        if model:
            lines += ["- model: " + ", ".join(f"{k} {v}" for k, v in model.items() if k != "config"), ""]
        fwd = [(k, v) for k, v in sec.items() if k.startswith("forward ")]
        if fwd:
            lines += ["| forward | ms, median [min-max] | spread % | first call s | fast vs eager max rel diff |",
                      "|---|---|---|---|---|"]
            for k, v in fwd:
                eq = v.get("equal_to_eager", {}).get("max_rel") if isinstance(v, dict) else None
                lines.append(f"| {k[8:]} | {_ms(v)} | {v.get('spread_pct', '-') if isinstance(v, dict) else '-'} "
                             f"| {v.get('first_call_s', '-') if isinstance(v, dict) else '-'} "
                             f"| {'-' if eq is None else f'{eq:.1e}'} |")
            lines.append("")
        samp = [(k, v) for k, v in sec.items() if k.startswith(("eager ", "fast ", "diffusers "))]
        if samp:
            lines += ["| sampling | ms, median [min-max] | spread % | IQR % | x graph floor | first call s "
                      "| peak GiB |",
                      "|---|---|---|---|---|---|---|"]
            for k, v in samp:
                if not isinstance(v, dict) or "median_ms" not in v:
                    lines.append(f"| {k} | {_ms(v)} | | | | | |")
                    continue
                lines.append(f"| {k} | {_ms(v)} | {v['spread_pct']} | {v['iqr_pct']} | {v.get('vs_floor', '-')} "
                             f"| {v.get('first_call_s', '-')} | {v.get('peak_mem_gib', '-')} |")
            lines.append("")
        rest = {k: v for k, v in sec.items() if k != "model" and not k.startswith(("forward ", "eager ", "fast ",
                                                                                      "diffusers "))}
        for k, v in rest.items():
            if isinstance(v, dict) and any(isinstance(x, dict) and "median_ms" in x for x in v.values()):
                lines += interleaved_markdown(k, v)
                continue
            if k.startswith("targets") and isinstance(v, dict):
                lines += [f"### {k}", ""] + [f"- {t}: {json.dumps(r, default=str)}" for t, r in v.items()] + [""]
                continue
            if k == "first calls and peak memory" and isinstance(v, dict):
                lines += [f"### {k}", "", "| call | first call s | peak GiB | captured |", "|---|---|---|---|"]
                lines += [f"| {c} | {e.get('first_call_s', e.get('error', '-'))} | {e.get('peak_mem_gib', '-')} "
                          f"| {'; '.join(e.get('captures', [])) or '-'} |" for c, e in v.items()]
                lines.append("")
                continue
            if isinstance(v, dict) and "median_ms" in v:
                extra = {kk: vv for kk, vv in v.items() if kk not in ("median_ms", "min_ms", "max_ms", "p25_ms",
                                                                       "p75_ms", "runs", "iqr_pct")}
                lines.append(f"- {k}: {_ms(v)} ms; " + json.dumps(extra, default=str))
            else:
                lines.append(f"- {k}: {json.dumps(v, default=str)}")
        lines.append("")
    lines += [f"Total wall time {r.get('wall_s')} s.", ""]
    return "\n".join(lines)


def add_common_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """The options this script shares with ``pipeline_host_profile.py``: output folder, tiny models, device,
    timed and warm-up runs, image side."""
    parser.add_argument("--out", required=True, help=f"results folder ({out})")
    parser.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs (calls) per measurement (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up runs per measurement (default 3)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 1024; 64 with --tiny)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, "gpu_latency.json / .md")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8], help="SDXL per-forward batch sizes")
    parser.add_argument("--sample-batches", type=int, nargs="+", default=[1, 4], help="SDXL sampling batch sizes")
    parser.add_argument("--flux-batches", type=int, nargs="+", default=[1, 2], help="FLUX per-forward batch sizes")
    parser.add_argument("--flux-sample-batches", type=int, nargs="+", default=[1], help="FLUX sampling batch sizes")
    parser.add_argument("--flux-plain5", action="store_true", help="also time FLUX plain 5 steps")
    parser.add_argument("--flux-layers", type=int, default=None, help="FLUX double blocks (default 19, the real size)")
    parser.add_argument("--flux-single-layers", type=int, default=None, help="FLUX single blocks (default 38)")
    parser.add_argument("--sections", default="sdxl,paired,floor,lora,pipeline,zoo,flux",
                        help="comma-separated: sdxl (forwards, sampling), paired (diffusers/eager/fast interleaved), "
                             "floor (SDXL floor variants), lora, pipeline (the real DistillppPipeline: every path "
                             "interleaved with its graph floor, encoding and VAE decode), pipeline-inductor "
                             "(compile='inductor' through it; minutes), zoo, flux, zoopipe (zoo-lcm through "
                             "from_preset, every compile mode)")
    parser.add_argument("--inductor", action="store_true",
                        help="last: inductor kernels under graphs for SDXL-size batch 1 (compiles for minutes)")
    parser.add_argument("--budget-s", type=float, default=540, help="skip optional parts past this wall time")
    parser.add_argument("--teacher-device", default=None,
                        help="pipeline section: also time fast guided 4+1 with the teacher on this device (default: "
                             "cuda:1 when two GPUs are visible; 'none' to skip)")
    parser.add_argument("--inductor-need-s", type=float, default=200,
                        help="start an inductor shape only with this many seconds of --budget-s left (default 200)")
    parser.add_argument("--inductor-calls", default="plain,guided",
                        help="pipeline-inductor: which calls to compile and time, of plain (the student at batch 1) "
                             "and guided (also the teacher at batch 2); default both")
    args = parser.parse_args(argv)
    args.inductor_calls = [c.strip() for c in args.inductor_calls.split(",") if c.strip()]
    for c in args.inductor_calls:
        if c not in ("plain", "guided"):
            parser.error(f"--inductor-calls: unknown call {c!r} (plain, guided)")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: CUDA is not available; use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.tiny:
        torch.set_num_threads(1)
        args.runs, args.warmup = min(args.runs, 3), min(args.warmup, 1)
        args.batches, args.sample_batches = [1, 2], [1]
    if args.teacher_device is None:
        two = device.type == "cuda" and torch.cuda.device_count() >= 2
        args.teacher_device = f"cuda:{1 - device.index}" if two and device.index in (0, 1) else ""
    elif args.teacher_device == "none":
        args.teacher_device = ""
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    start = time.perf_counter()
    deadline = start + args.budget_s
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = measured_bf16_tflops(device)
    datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in card), None)
    report = Report(args.out, {
        "card": card, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
        "transformers": __import__("transformers").__version__, "tiny": args.tiny,
        "runs": args.runs, "warmup": args.warmup, "measured_bf16_tflops": peak, "datasheet_bf16_tflops": datasheet,
    })
    print(f"{card}: bf16 matmul {peak} TFLOP/s (datasheet {datasheet})", flush=True)
    if {"sdxl", "paired", "floor", "lora", "pipeline", "pipeline-inductor"} & set(args.sections):
        guarded(report, "sdxl", "_section", lambda: sdxl_section(report, args, device, dtype, peak, deadline))
    if "zoo" in args.sections:
        guarded(report, "zoo", "_section", lambda: zoo_section(report, args, device))
    if "zoopipe" in args.sections:
        guarded(report, "zoo pipeline", "_section", lambda: zoo_pipeline_section(report, args, device, deadline))
    if "flux" in args.sections and time.perf_counter() < deadline - 60:
        guarded(report, "flux", "_section", lambda: flux_section(report, args, device, peak))
    if args.inductor and device.type == "cuda":
        if time.perf_counter() < deadline - 200:
            guarded(report, "sdxl floor: inductor (batch 1)", "_section",
                    lambda: inductor_section(report, args, device, dtype, peak))
        else:
            report.put("sdxl floor: inductor (batch 1)", "skipped", "not enough time left in --budget-s")
    for name in list(report.data["sections"]):
        sec = report.data["sections"][name]
        if sec.get("_section") is None:
            sec.pop("_section", None)
        if not sec:
            del report.data["sections"][name]
    report.data["wall_s"] = round(time.perf_counter() - start, 1)
    report.save()
    md = markdown(report.data)
    with open(os.path.join(args.out, "gpu_latency.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
