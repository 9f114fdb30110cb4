"""Per-image latency and peak memory of teacher-guided SDXL sampling on a GPU (random weights, no downloads).

Builds SDXL-size student and teacher pipelines from configs (the real SDXL UNet and VAE configs,
real-size random CLIP-L / CLIP-bigG text encoders, a byte-level tokenizer written locally) and
times the same path as ``distillpp generate`` (:class:`distillpp.pipelines.DistillppPipeline`
called with the CLI's keyword arguments) at 1024x1024:

- a LoRA student (rank-64 LCM-LoRA-style adapter) whose teacher is the same UNet with the adapter
  switched off;
- a full-UNet student (Lightning/DMD2-style) with a separate teacher UNet, for each teacher
  placement: same device, CPU offload (pinned memory, copied in per call), another GPU (when
  there are two).

For each: 4 plain steps, 5 plain steps, 4 steps + 1 teacher-guided step (Euler, trailing), the
median of ``--runs`` CUDA-synchronized runs after warm-up, end to end (prompt encoding, sampling,
VAE decode to PIL) and sampling only (``output_type="latent"``), plus peak memory
(``torch.cuda.max_memory_allocated``) per device. Writes ``sdxl_gpu_latency.md`` and ``.json``
into ``--out``.

    python benchmarks/sdxl_gpu_latency.py --out benchmarks/results/sdxl_gpu_latency   # H100, ~3 min
    python benchmarks/sdxl_gpu_latency.py --tiny --out /tmp/lat                        # CPU smoke test
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from distillpp.pipelines.cli import add_arguments, call_kwargs
from distillpp.pipelines.sd import DistillppPipeline
from gpu_latency import build, unet_config, vae_config  # the SDXL configs, shared with the fast-path benchmark

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


# --------------------------------------------------------------------------------------------
# Random-weight SDXL components.
# --------------------------------------------------------------------------------------------


def text_configs(tiny: bool) -> tuple[Any, Any]:
    from transformers import CLIPTextConfig

    if tiny:
        c = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                           num_attention_heads=4, num_hidden_layers=2, vocab_size=1000, projection_dim=32)
        return c, c
    common = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=49408, max_position_embeddings=77)
    # CLIP ViT-L/14 text tower and OpenCLIP ViT-bigG/14 text tower (SDXL's two encoders).
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                            projection_dim=768, hidden_act="quick_gelu", **common)
    clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                            projection_dim=1280, hidden_act="gelu", **common)
    return clip_l, clip_g


def write_tokenizer(folder: str) -> str:
    """A byte-level CLIP tokenizer (every byte a token, no merges): right shapes, no download."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77}, f)
    return folder


def make_components(tiny: bool, device: str, dtype: torch.dtype, workdir: str) -> tuple[dict[str, Any], Any]:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    cfg_l, cfg_g = text_configs(tiny)
    tok = CLIPTokenizer.from_pretrained(write_tokenizer(os.path.join(workdir, "tokenizer")))
    components = dict(
        vae=build(AutoencoderKL, device, dtype, 0, **vae_config(tiny)),
        text_encoder=build(CLIPTextModel, device, dtype, 1, cfg_l),
        text_encoder_2=build(CLIPTextModelWithProjection, device, dtype, 2, cfg_g),
        tokenizer=tok, tokenizer_2=tok,
        # SDXL-Lightning's scheduler: Euler, trailing (the base config otherwise).
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="trailing"),
        image_encoder=None, feature_extractor=None,
    )
    teacher_unet = build(UNet2DConditionModel, device, dtype, 3, **unet_config(tiny))
    return components, teacher_unet


def sdxl_pipe(components: dict[str, Any], unet: Any) -> Any:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**components, unet=unet, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------------


def sync(devices: list[str]) -> None:
    for d in devices:
        if d.startswith("cuda"):
            torch.cuda.synchronize(d)


def cli_kwargs(side: int, steps: int, guided: bool) -> dict[str, Any]:
    """The keyword arguments ``distillpp generate`` would pass for these options."""
    argv = ["--preset", "sdxl-lightning-4step", "--prompt", PROMPT, "--height", str(side), "--width", str(side),
            "--steps", str(steps), "--strength", "0.05" if guided else "0", "--guided-steps", "1" if guided else "0",
            "--teacher-cfg", "7.5"]
    return call_kwargs(add_arguments(argparse.ArgumentParser()).parse_args(argv))


def time_modes(pipe: DistillppPipeline, side: int, runs: int, warmup: int, devices: list[str]) -> dict[str, Any]:
    """Median latency (s/image) and peak memory of plain 4, plain 5 and 4+1 guided, end to end and latent-only."""
    out: dict[str, Any] = {}
    modes = [("plain_4", 4, False), ("plain_5", 5, False), ("guided_4+1", 4, True)]
    for name, steps, guided in modes:
        kw = cli_kwargs(side, steps, guided)
        for output_type in ("pil", "latent"):
            for d in devices:
                if d.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats(d)
            times = []
            for r in range(warmup + runs):
                gen = torch.Generator("cpu").manual_seed(r)
                sync(devices)
                t0 = time.perf_counter()
                pipe(PROMPT, generator=gen, output_type=output_type, **kw)
                sync(devices)
                if r >= warmup:
                    times.append(time.perf_counter() - t0)
            key = f"{name}{'' if output_type == 'pil' else '_latent'}"
            out[key] = {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}
            if output_type == "pil":
                out[key]["peak_mem_gib"] = {
                    d: torch.cuda.max_memory_allocated(d) / 2**30 for d in devices if d.startswith("cuda")
                }
        print(f"  {name:11s} end-to-end {out[name]['median_s'] * 1000:8.1f} ms   "
              f"sampling {out[name + '_latent']['median_s'] * 1000:8.1f} ms", flush=True)
    return out


def time_diffusers(pipe: Any, side: int, runs: int, warmup: int, devices: list[str]) -> dict[str, Any]:
    """The student's own diffusers pipeline, 4 steps, end to end: what our plain path should cost."""
    times = []
    for r in range(warmup + runs):
        sync(devices)
        t0 = time.perf_counter()
        pipe(PROMPT, num_inference_steps=4, guidance_scale=0.0, height=side, width=side,
             generator=torch.Generator("cpu").manual_seed(r))
        sync(devices)
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    print(f"  plain_4     end-to-end {statistics.median(times) * 1000:8.1f} ms", flush=True)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}


def guarded(fn: Any) -> dict[str, Any]:
    """Run one configuration; a failure (e.g. out of memory) is recorded and the others still run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a benchmark reports, it does not stop
        print(f"  failed: {type(e).__name__}: {e}", flush=True)
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="results folder (Markdown + JSON)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models on CPU (smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per mode (default 5; 1 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs per mode (default 2; 1 with --tiny)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 1024; 64 with --tiny)")
    args = parser.parse_args(argv)

    tiny = args.tiny
    device = args.device or ("cpu" if tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: CUDA is not available; use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    dtype = torch.float32 if device == "cpu" else torch.float16
    if tiny and device == "cpu":
        torch.set_num_threads(1)  # tiny models gain nothing from threads; spin-waits hurt on busy machines
    runs = args.runs or (1 if tiny else 5)
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    side = args.size or (64 if tiny else 1024)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    n_gpu = torch.cuda.device_count() if device.startswith("cuda") else 0
    card = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"
    t_start = time.perf_counter()

    workdir = tempfile.mkdtemp(prefix="sdxl_latency_")
    print(f"building {'tiny' if tiny else 'SDXL-size'} random models on {device} ({dtype})...", flush=True)
    components, teacher_unet = make_components(tiny, device, dtype, workdir)
    from diffusers import UNet2DConditionModel

    student_unet = build(UNet2DConditionModel, device, dtype, 4, **unet_config(tiny))
    n_params = sum(p.numel() for p in student_unet.parameters())
    print(f"  UNet {n_params / 1e9:.2f}B parameters; built in {time.perf_counter() - t_start:.1f} s", flush=True)

    results: dict[str, Any] = {}
    # Full-UNet student, separate teacher, each placement.
    placements: list[tuple[str, dict[str, Any], list[str]]] = [("same device", {}, [device])]
    placements.append(("cpu offload", {"teacher_offload": "cpu"}, [device]))
    if n_gpu > 1:
        placements.append(("other device (cuda:1)", {"teacher_device": "cuda:1"}, [device, "cuda:1"]))
    student_pipe = sdxl_pipe(components, student_unet)
    print("diffusers StableDiffusionXLPipeline, 4 steps (reference for our plain path):", flush=True)
    reference = guarded(lambda: time_diffusers(student_pipe, side, runs, warmup, [device]))
    for label, placement, devices in placements:
        print(f"full-UNet student, teacher on {label}:", flush=True)
        results[f"full-UNet student / teacher: {label}"] = guarded(
            lambda: time_modes(DistillppPipeline(student_pipe, teacher_unet, **placement), side, runs, warmup, devices))
        teacher_unet.to(device)  # back from the CPU or the other GPU
        free()
    del student_pipe, student_unet
    free()

    # LoRA student: the teacher UNet plus a rank-64 adapter; its teacher is itself with the adapter off.
    from peft import LoraConfig

    teacher_unet.add_adapter(LoraConfig(r=4 if tiny else 64, lora_alpha=4 if tiny else 64,
                                        target_modules=LORA_TARGETS), adapter_name="student")
    for n, p in teacher_unet.named_parameters():
        if "lora_" in n:  # peft keeps adapters in float32; released LoRAs run in the model dtype
            p.data = p.data.to(dtype)
    lora_pipe = sdxl_pipe(components, teacher_unet)
    print("LoRA student, teacher = same UNet with the adapter off:", flush=True)
    results["LoRA student / teacher: adapter-off (same UNet)"] = guarded(
        lambda: time_modes(DistillppPipeline(lora_pipe, "adapter-off"), side, runs, warmup, [device]))

    report = {
        "card": card,
        "gpus": n_gpu,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "image": f"{side}x{side}",
        "batch": 1,
        "unet_params_billion": round(n_params / 1e9, 3),
        "runs": runs,
        "warmup": warmup,
        "tiny": tiny,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "results": results,
        "diffusers_reference_plain_4": reference,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sdxl_gpu_latency.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(args.out, "sdxl_gpu_latency.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return 0


def markdown(r: dict[str, Any]) -> str:
    ms = lambda s: f"{s * 1000:.1f}"  # noqa: E731
    dms = lambda s: f"{s * 1000:+.1f}"  # noqa: E731
    lines = [
        f"# SDXL teacher-guidance latency ({'tiny CPU smoke test' if r['tiny'] else 'SDXL-size random weights'})",
        "",
        f"- card: {r['card']} ({r['gpus']} GPU(s) visible); date: {r['date']}",
        f"- command: `{r['command']}`",
        f"- torch {r['torch']}, diffusers {r['diffusers']}; {r['dtype']}; {r['image']}, batch {r['batch']}; "
        f"UNet {r['unet_params_billion']}B parameters; median of {r['runs']} runs after {r['warmup']} warm-up",
        "- path: `DistillppPipeline.__call__` with `distillpp generate`'s arguments; Euler (trailing); teacher CFG 7.5 "
        "(one batch-2 teacher forward per guided step); VAE decoded in the model dtype; random weights, so only timings "
        "mean anything",
        "",
        "Per-image latency in ms: end to end (prompt encoding + sampling + VAE decode + PIL) / sampling only.",
        "",
        "| configuration | 4 steps | 5 steps | 4 + 1 guided | guided vs 4 | guided vs 5 | peak memory (GiB) 4+1 guided |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in r["results"].items():
        if "error" in res:
            lines.append(f"| {name} | failed: {res['error']} | | | | | |")
            continue
        p4, p5, g = res["plain_4"], res["plain_5"], res["guided_4+1"]
        p4l, p5l, gl = res["plain_4_latent"], res["plain_5_latent"], res["guided_4+1_latent"]
        mem = ", ".join(f"{d}: {v:.2f}" for d, v in g.get("peak_mem_gib", {}).items()) or "n/a (CPU)"
        lines.append(
            f"| {name} | {ms(p4['median_s'])} / {ms(p4l['median_s'])} | {ms(p5['median_s'])} / {ms(p5l['median_s'])} "
            f"| {ms(g['median_s'])} / {ms(gl['median_s'])} | {dms(g['median_s'] - p4['median_s'])} "
            f"| {dms(g['median_s'] - p5['median_s'])} | {mem} |"
        )
    ref = r.get("diffusers_reference_plain_4", {})
    if "median_s" in ref:
        lines += ["", f"Reference: the full-UNet student's own diffusers `StableDiffusionXLPipeline`, 4 steps, end to end: "
                      f"{ms(ref['median_s'])} ms."]
    lines += ["", "Peak memory of every mode (GiB, end-to-end runs):", ""]
    for name, res in r["results"].items():
        if "error" in res:
            continue
        parts = []
        for mode in ("plain_4", "plain_5", "guided_4+1"):
            mem = res[mode].get("peak_mem_gib", {})
            if mem:
                parts.append(f"{mode}: " + ", ".join(f"{d} {v:.2f}" for d, v in mem.items()))
        lines.append(f"- {name}: " + ("; ".join(parts) if parts else "n/a (CPU)"))
    lines += ["", f"Total wall time {r['wall_s']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
