"""Where the real DistillppPipeline's fast path spends its time beyond the graph floor (SDXL-size, batch 1).

``benchmarks/gpu_latency.py`` times whole pipeline calls; this script splits one call into the
phases :class:`~distillpp.pipelines.GuidedPipeline` runs (``sigmas``, ``encode``, ``initial``, the
denoisers, ``sample``, ``decode``) and reports, over ``--runs`` calls each:

- host time per phase (``time.perf_counter``, no synchronisation: what the CPU spends issuing work),
- wall time per phase with a ``torch.cuda.synchronize`` after each (where the GPU time goes),
- the host time inside the student/teacher network calls (graph replay: key, copy-in, replay, clone),
- the graph floor of the call's own forwards (the pipeline's student and teacher wrappers timed on the
  arguments they received in the call), so ``sample`` can be compared with it directly,
- the host synchronisations of one call (``torch.cuda.set_sync_debug_mode``), by source line,
- a ``cProfile`` of a few calls (top functions by own and by cumulative time).

Usage (GPU)::

    python benchmarks/pipeline_host_profile.py --out results/profile
    python benchmarks/pipeline_host_profile.py --out /tmp/p --tiny     # CPU smoke test

Writes ``pipeline_host_profile.json``, ``.md`` and ``pipeline_host_profile_cprofile.txt`` into ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import datetime
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_latency import TEACHER_CFG, add_common_arguments, build, diffusers_sdxl, time_it, unet_config  # noqa: E402
from sdxl_gpu_latency import make_components  # noqa: E402  (random SDXL-size text encoders, byte tokenizer)

PHASES = ("sigmas", "encode", "initial", "student_denoiser", "teacher_denoiser", "sample", "decode")


class NetTimer:
    """Wraps a pipeline network: counts calls, sums their host time, keeps the first call's arguments."""

    def __init__(self, net: Callable[..., Any]):
        self.net, self.calls, self.host_s, self.first_args = net, 0, 0.0, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.first_args is None:
            self.first_args = (args, kwargs)
        t0 = time.perf_counter()
        out = self.net(*args, **kwargs)
        self.host_s += time.perf_counter() - t0
        self.calls += 1
        return out


class PhaseTimer:
    """Times the family hooks and ``sample`` of one pipeline by wrapping them on the instance."""

    def __init__(self, pipe: Any, device: torch.device):
        import distillpp.pipelines.core as core

        self.pipe, self.device, self.core, self.sync = pipe, device, core, False
        self.times: dict[str, float] = {}
        self._orig_sample = core.sample
        fam = pipe.family
        for name in PHASES:
            if name != "sample":
                setattr(fam, name, self._timed(name, getattr(fam, name)))
        core.sample = self._timed("sample", core.sample)
        self.student = pipe._student_net = NetTimer(pipe._student_net)
        self.teacher = pipe._teacher_net = NetTimer(pipe._teacher_net) if pipe._teacher_net is not None else None

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.sync and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
            return out

        return wrapper

    def restore(self) -> None:
        self.core.sample = self._orig_sample
        for name in PHASES:
            self.pipe.family.__dict__.pop(name, None)

    def profile(self, call: Callable[[], Any], runs: int, sync: bool) -> dict[str, Any]:
        """Median ms per phase over ``runs`` calls; ``sync``: synchronize after each phase."""
        self.sync = sync
        rows: dict[str, list[float]] = collections.defaultdict(list)
        for _ in range(runs):
            self.times = {}
            nets = [n for n in (self.student, self.teacher) if n is not None]
            before = [(n.calls, n.host_s) for n in nets]
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            call()
            rows["call returned (host)"].append(time.perf_counter() - t0)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            rows["call done (wall)"].append(time.perf_counter() - t0)
            for name, s in self.times.items():
                rows[name].append(s)
            for label, n, (c0, h0) in zip(("student", "teacher"), nets, before):
                rows[f"{label} net calls (host, {n.calls - c0} calls)"].append(n.host_s - h0)
            inside = sum(n.host_s - h0 for n, (_, h0) in zip(nets, before))
            rows["sample minus net calls (host)"].append(self.times.get("sample", 0.0) - inside)
            named = sum(self.times.get(p, 0.0) for p in PHASES)
            rows["outside the phases (host)"].append(rows["call returned (host)"][-1] - named)
        return {k: round(1000 * statistics.median(v), 2) for k, v in rows.items()}


def sync_sources(call: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """Host synchronisations of one call, counted by the source line that caused them."""
    if device.type != "cuda":
        return {}
    counts: collections.Counter = collections.Counter()
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            counts[f"{os.path.relpath(w.filename)}:{w.lineno}"] += 1
    return dict(counts.most_common())


def cprofile(call: Callable[[], Any], runs: int, device: torch.device, top: int = 30) -> str:
    """``cProfile`` of ``runs`` calls (each synchronized): the top functions by own and cumulative time."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(runs):
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    prof.disable()
    out = io.StringIO()
    for key in ("tottime", "cumulative"):
        out.write(f"==== {runs} calls, sorted by {key} ====\n")
        pstats.Stats(prof, stream=out).strip_dirs().sort_stats(key).print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, "pipeline_host_profile.json / .md")
    parser.add_argument("--compile", default="graphs", help="the pipeline's compile= (default graphs)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        raise ValueError("--runs must be >= 1 and --warmup >= 0")
    from diffusers import UNet2DConditionModel

    from distillpp.accel import check_compile
    from distillpp.pipelines import DistillppPipeline

    args.compile = check_compile(args.compile)

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: CUDA is not available; use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    if args.tiny:
        torch.set_num_threads(1)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    side = args.size or (64 if args.tiny else 1024)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    components, teacher_unet = make_components(args.tiny, str(device), dtype, tempfile.mkdtemp(prefix="profile_"))
    student_unet = build(UNet2DConditionModel, str(device), dtype, 4, **unet_config(args.tiny))
    student_pipe = diffusers_sdxl(components["vae"], student_unet, text_encoder=components["text_encoder"],
                                  text_encoder_2=components["text_encoder_2"], tokenizer=components["tokenizer"],
                                  tokenizer_2=components["tokenizer_2"])
    pipe = DistillppPipeline(student_pipe, teacher_unet, compile=args.compile)
    prompt = "a photograph of an astronaut riding a horse on the moon, highly detailed"
    common = dict(height=side, width=side, output_type="latent", num_inference_steps=4, guided_steps=1,
                  teacher_cfg=TEACHER_CFG)

    def guided():
        return pipe(prompt, generator=torch.Generator(device).manual_seed(0), strength=0.05, **common)

    def plain():
        return pipe(prompt, generator=torch.Generator(device).manual_seed(0), strength=0.0, **common)

    for _ in range(args.warmup):
        guided(), plain()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict[str, Any] = {
        "card": card, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:]), "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__, "compile": args.compile, "image": f"{side}x{side}",
        "runs": args.runs, "warmup": args.warmup,
    }
    report["whole call, CUDA events (ms)"] = {"guided 4+1": time_it(guided, args.runs, 1, device),
                                              "plain 4": time_it(plain, args.runs, 1, device)}
    timer = PhaseTimer(pipe, device)
    guided(), plain()  # records the networks' arguments
    floors = {}
    for label, net in (("student b1", timer.student), ("teacher b2 (CFG)", timer.teacher)):
        a, k = net.first_args
        floors[label] = time_it(lambda net=net.net, a=a, k=k: net(*a, **k), args.runs, args.warmup, device)
    floor_guided = 4 * floors["student b1"]["median_ms"] + floors["teacher b2 (CFG)"]["median_ms"]
    floor_plain = 4 * floors["student b1"]["median_ms"]
    report["forwards of the call (pipeline's own wrappers, ms)"] = floors
    report["floor (ms)"] = {"guided 4+1": round(floor_guided, 2), "plain 4": round(floor_plain, 2)}
    for label, call in (("guided 4+1", guided), ("plain 4", plain)):
        report[f"phases {label}, host only (median ms)"] = timer.profile(call, args.runs, sync=False)
        report[f"phases {label}, synchronized after each (median ms)"] = timer.profile(call, args.runs, sync=True)
    timer.restore()
    report["host synchronisations of one guided call (source line: count)"] = sync_sources(guided, device)
    report["host synchronisations of one plain call (source line: count)"] = sync_sources(plain, device)
    with open(os.path.join(args.out, "pipeline_host_profile_cprofile.txt"), "w") as f:
        f.write(cprofile(guided, min(args.runs, 5), device))
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    with open(os.path.join(args.out, "pipeline_host_profile.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    md = markdown(report)
    with open(os.path.join(args.out, "pipeline_host_profile.md"), "w") as f:
        f.write(md)
    print(md, flush=True)
    return 0


def markdown(r: dict[str, Any]) -> str:
    lines = ["# DistillppPipeline fast path: where the time goes (SDXL-size, batch 1)", "",
             f"- card: {r['card']}; date: {r['date']}; torch {r['torch']}, diffusers {r['diffusers']}; "
             f"compile={r['compile']!r}; {r['image']}", f"- command: `{r['command']}`", ""]
    for key, value in r.items():
        if isinstance(value, dict):
            lines.append(f"## {key}")
            lines.append("")
            for k, v in value.items():
                if isinstance(v, dict) and "median_ms" in v:
                    v = f"{v['median_ms']:.1f} [{v['min_ms']:.1f}-{v['max_ms']:.1f}], spread {v['spread_pct']}%"
                lines.append(f"- {k}: {v}")
            lines.append("")
    lines.append(f"Total wall time {r.get('wall_s')} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
