"""Train the Fashion-MNIST zoo: ``distillpp train <what>`` or ``python -m distillpp.zoo.train <what>``.

Stage 1 (from data): ``teacher`` (eps-prediction DDPM), ``flow-teacher`` (rectified flow) and
``classifier``. Stage 2 (from a stage-1 teacher): ``lcm`` (latent consistency distillation,
Luo et al. 2023), ``pd`` (guided progressive distillation, Salimans & Ho 2022; Meng et al. 2023)
and ``flow-student`` (reflow, Liu et al. 2023). Students bake the teacher's CFG scale in.

Every command trains until ``--minutes`` of wall-clock time (counted from process start, so
imports and data loading are included) or ``--max-steps``, whichever comes first, saves fp16
safetensors + ``config.json`` every ``--save-every`` minutes and at the end (atomically; SIGTERM
stops at the next step and saves), and writes ``train_info.json`` beside the weights. On CUDA the
networks run under bf16 autocast; their last convolution stays float32 (see :func:`fp32_output`).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..api import sample
from ..cli import check_device, check_out_dir, finite_float, positive_float, positive_int, unit_float
from ..denoisers import CFGDenoiser, DiscreteVPDenoiser, FlowDenoiser, LCMDenoiser, append_dims, unet_fn
from ..schedules import DiscreteVPSchedule, ddim_sigmas, initial_sample
from . import TEACHER_CFG, clip_range, flow_grid
from .data import NULL_LABEL, load_split
from .nets import (
    WEIGHTS_NAME,
    ZooClassifier,
    flow_scheduler_config,
    fp32_output,
    make_unet,
    save_weights,
    vp_scheduler_config,
    write_json,
)

__all__ = ["main", "add_arguments", "run", "COMMANDS"]

# what -> (default batch size, default learning rate, one-line help)
COMMANDS: dict[str, tuple[int, float, str]] = {
    "teacher": (512, 1e-3, "discrete VP (DDPM) teacher: linear betas, 1000 steps, eps-prediction, label dropout"),
    "flow-teacher": (512, 1e-3, "rectified-flow teacher (velocity eps - x0, label dropout for CFG)"),
    "classifier": (512, 2e-3, "CNN classifier (for accuracy of samples and Frechet distance features)"),
    "lcm": (512, 2e-4, "LCM consistency distillation of the CFG teacher (4-step consistency sampler)"),
    "pd": (512, 2e-4, "progressive distillation of the CFG teacher down to 4 DDIM steps"),
    "flow-student": (512, 2e-4, "reflow of the CFG flow teacher into a 4-step Euler student"),
}
TINY_CLASSIFIER = dict(channels=(8, 16, 16), hidden_size=32)
_STOP = threading.Event()  # set by SIGTERM / SIGINT during run()


# ----------------------------------------------------------------------------- plumbing


def _process_age() -> float:
    """Seconds since this process started (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _command_line() -> str:
    prog = Path(sys.argv[0]).name
    if prog in ("train.py", "__main__.py", "-c", ""):
        prog = f"{Path(sys.executable).name} -m distillpp.zoo.train"
    return " ".join([prog] + [shlex.quote(a) for a in sys.argv[1:]])


class Clock:
    """A wall-clock and step budget: ``done`` once either is spent (at least one step always runs)."""

    def __init__(self, start: float, seconds: float, max_steps: int):
        self.start, self.seconds, self.max_steps = start, max(seconds, 1e-9), max(1, max_steps)

    def elapsed(self) -> float:
        return time.time() - self.start

    def progress(self, step: int) -> float:
        return min(1.0, max(step / self.max_steps, self.elapsed() / self.seconds))

    def done(self, step: int) -> bool:
        return step >= 1 and self.progress(step) >= 1.0

    def split(self, k: int, n: int) -> "Clock":
        """The k-th of n equal parts of what is left of this budget."""
        left = self.seconds - self.elapsed()
        return Clock(time.time(), left / (n - k), self.max_steps // n)


class Run:
    """Shared plumbing of one training command: device, clock, data, logging, saving."""

    def __init__(self, what: str, args: argparse.Namespace):
        self.what, self.args = what, args
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Count start-up (imports, CUDA init) against the budget, but at most a minute of it so a
        # long-lived process (a test session) still trains.
        start = time.time() - min(_process_age(), 60.0)
        max_steps = args.max_steps if args.max_steps is not None else (2 if args.tiny else 10**12)
        self.clock = Clock(start, args.minutes * 60.0, max_steps)
        self.batch_size = args.batch_size or (8 if args.tiny else COMMANDS[what][0])
        self.lr = args.lr or COMMANDS[what][1]
        self.log_every = args.log_every or (1 if args.tiny else 200)
        self.out = Path(args.out) / what
        torch.manual_seed(args.seed)
        self.gen = torch.Generator(self.device).manual_seed(args.seed)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.log(f"device {self.device_name}, batch {self.batch_size}, lr {self.lr:g}, "
                 f"budget {args.minutes:g} min / {max_steps} steps -> {self.out}")

    # Randomness, all from the run's generator.
    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, device=self.device, generator=self.gen)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, device=self.device, generator=self.gen)

    def randint(self, high: int, n: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), device=self.device, generator=self.gen)

    def data(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        t = time.time()
        x, y = load_split(split, self.args.data_dir, device=self.device)
        self.log(f"{split}: {len(y)} images on {self.device} ({time.time() - t:.1f}s)")
        return x, y

    def batch(self, x: torch.Tensor, y: torch.Tensor, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.randint(len(y), n or self.batch_size)
        return x[idx], y[idx]

    @property
    def stop(self) -> bool:
        return _STOP.is_set()

    def autocast(self) -> Any:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def log(self, msg: str) -> None:
        print(f"[{self.what} {self.clock.elapsed():6.0f}s] {msg}", flush=True)

    def save(self, model: torch.nn.Module, step: int, loss: float | None, final: bool,
             scheduler: dict | None = None, **extra: Any) -> None:
        save_weights(model, self.out)
        if scheduler is not None:
            write_json(self.out / "scheduler_config.json", scheduler)
        info = {
            "name": self.what,
            "complete": final and not self.stop,
            "steps": step,
            "minutes": round(self.clock.elapsed() / 60, 3),
            "device": self.device_name,
            "final_loss": loss,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": _command_line(),
            "batch_size": self.batch_size,
            "lr": self.lr,
            "seed": self.args.seed,
            "tiny": bool(self.args.tiny),
            "parameters": sum(p.numel() for p in model.parameters()),
            **extra,
        }
        write_json(self.out / "train_info.json", info)
        self.log(f"saved {'final' if final else 'checkpoint'} weights ({step} steps) to {self.out}")


class EMA:
    """Exponential moving average of a model's parameters (a frozen copy)."""

    def __init__(self, model: torch.nn.Module):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, decay: float) -> None:
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1.0 - decay)


def _ema_decay(step: int, max_decay: float) -> float:
    """EMA warm-up (as in diffusers' ``EMAModel``): short averages while the model moves fast."""
    return min(max_decay, (1 + step) / (10 + step))


def fit(
    run: Run,
    model: torch.nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    clock: Clock,
    save: Callable[[int, float | None, bool], None],
    ema: EMA | None = None,
    ema_decay: float = 0.999,
    weight_decay: float = 0.0,
    warmup: int = 100,
    tag: str = "",
) -> tuple[int, float | None]:
    """AdamW with warm-up and cosine decay (to 10%) over the budget's progress; returns (steps, last loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=run.lr, weight_decay=weight_decay, fused=run.device.type == "cuda")
    step, last_loss = 0, None
    window_loss = torch.zeros((), device=run.device)
    window_steps, window_start, last_save = 0, time.time(), time.time()
    model.train()
    while not run.stop and not clock.done(step):
        p = clock.progress(step)
        for group in opt.param_groups:
            group["lr"] = run.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * p)))
        with run.autocast():
            loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            ema.update(model, _ema_decay(step, ema_decay))
        step += 1
        window_loss += loss.detach()
        window_steps += 1
        if step % run.log_every == 0 or clock.done(step) or run.stop:
            last_loss = float(window_loss) / window_steps
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"{run.what}: loss is {last_loss} at step {step}; lower --lr")
            rate = window_steps / max(time.time() - window_start, 1e-9)
            run.log(f"{tag}step {step} loss {last_loss:.5f} lr {opt.param_groups[0]['lr']:.2e} "
                    f"{rate:.1f} steps/s, {max(0.0, clock.seconds - clock.elapsed()):.0f}s left")
            window_loss.zero_()
            window_steps, window_start = 0, time.time()
        if time.time() - last_save > run.args.save_every * 60:
            save(step, last_loss, False)
            last_save = time.time()
    return step, last_loss


def _drop_labels(run: Run, y: torch.Tensor, p: float) -> torch.Tensor:
    """Replace a fraction ``p`` of labels by the null label (classifier-free guidance training)."""
    return torch.where(run.rand(len(y)) < p, torch.full_like(y, NULL_LABEL), y)


def _load_teacher(run: Run, name: str) -> tuple[Any, Path]:
    from diffusers import UNet2DModel

    folder = Path(run.args.teacher) if run.args.teacher else Path(run.args.out) / name
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"the {run.what} student needs its teacher: {folder} has no {WEIGHTS_NAME}. "
            f"Train it first (`distillpp train {name} --out {Path(run.args.out)}`) or pass --teacher DIR."
        )
    unet = UNet2DModel.from_pretrained(folder, torch_dtype=torch.float32).to(run.device)
    run.log(f"teacher from {folder}")
    return fp32_output(unet).eval().requires_grad_(False), folder


def _vp_schedule(run: Run, teacher_dir: Path) -> tuple[dict, DiscreteVPSchedule, DiscreteVPSchedule, str]:
    """The teacher's scheduler config, its noise table (CPU, for grids) and a copy on the device.

    Denoisers get the device copy: with a CPU table every call would copy it to the GPU, and a
    copy from pageable memory waits for the GPU queue, stalling the training loop.
    """
    config = json.loads((teacher_dir / "scheduler_config.json").read_text())
    schedule = DiscreteVPSchedule.from_config(config)
    on_device = DiscreteVPSchedule(schedule.alphas_cumprod.to(run.device))
    return config, schedule, on_device, config.get("prediction_type", "epsilon")


def _cfg_args(y: torch.Tensor) -> dict[str, Any]:
    return {"cond": {"class_labels": y}, "uncond": {"class_labels": torch.full_like(y, NULL_LABEL)}}


def _view(v: torch.Tensor) -> torch.Tensor:
    return append_dims(v, 4)


# ----------------------------------------------------------------------------- stage 1


def train_teacher(args: argparse.Namespace) -> int:
    """DDPM (Ho et al. 2020) with label dropout for CFG; eps-prediction like SD 1.5, or v-prediction.

    On the linear schedule sigma reaches 157, where an eps-network must reproduce its input to within
    1/sigma. The full-size UNet manages after ~2000 steps (H100 run: DDIM-50 class accuracy 0.955),
    but the tiny test UNet does not: on 400-step CPU runs its samples stayed noisy (class accuracy
    0.15) where ``--prediction-type v_prediction`` (Salimans & Ho 2022; SD 2.x) gave 0.90.
    Students inherit the teacher's parametrization.
    """
    run = Run("teacher", args)
    x_all, y_all = run.data()
    unet = fp32_output(make_unet(args.tiny)).to(run.device)
    ema = EMA(unet)
    # clip_sample: sampling clamps x0 to the data range (see distillpp.zoo.clip_range); students inherit it.
    scheduler = vp_scheduler_config("ddim", prediction_type=args.prediction_type, clip_sample=True)
    abar = DiscreteVPSchedule.from_config(scheduler).alphas_cumprod.to(run.device)

    def loss_fn(step: int) -> torch.Tensor:
        x0, y = run.batch(x_all, y_all)
        t = run.randint(len(abar), len(y))
        eps = run.randn(*x0.shape)
        a = _view(abar[t])
        z = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = unet(z, t, class_labels=_drop_labels(run, y, args.p_uncond)).sample
        target = eps if args.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return F.mse_loss(pred.float(), target)

    def save(step: int, loss: float | None, final: bool) -> None:
        run.save(ema.model, step, loss, final, scheduler, p_uncond=args.p_uncond, ema_decay=args.ema)

    save(*fit(run, unet, loss_fn, run.clock, save, ema=ema, ema_decay=args.ema), True)
    return 0


def train_flow_teacher(args: argparse.Namespace) -> int:
    """Rectified flow (Liu et al. 2023; SD3's logit-normal times mixed with uniform) with label dropout."""
    run = Run("flow-teacher", args)
    x_all, y_all = run.data()
    unet = fp32_output(make_unet(args.tiny)).to(run.device)
    ema = EMA(unet)

    def loss_fn(step: int) -> torch.Tensor:
        x0, y = run.batch(x_all, y_all)
        n = len(y)
        s = torch.where(run.rand(n) < 0.5, torch.sigmoid(run.randn(n)), run.rand(n))
        eps = run.randn(*x0.shape)
        x_s = (1 - _view(s)) * x0 + _view(s) * eps
        pred = unet(x_s, s * 1000, class_labels=_drop_labels(run, y, args.p_uncond)).sample
        return F.mse_loss(pred.float(), eps - x0)

    def save(step: int, loss: float | None, final: bool) -> None:
        run.save(ema.model, step, loss, final, flow_scheduler_config(), p_uncond=args.p_uncond, ema_decay=args.ema)

    save(*fit(run, unet, loss_fn, run.clock, save, ema=ema, ema_decay=args.ema), True)
    return 0


def _augment(run: Run, x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels (per image, on the device)."""
    n, _, h, w = x.shape
    x = torch.where(_view(run.rand(n) < 0.5), x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dy, dx = run.randint(5, n), run.randint(5, n)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def test_accuracy(model: ZooClassifier, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on images ``x`` with labels ``y``."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    model.train(was_training)
    return correct / len(y)


def train_classifier(args: argparse.Namespace) -> int:
    """VGG-style CNN, AdamW, label smoothing, flip + shift augmentation."""
    run = Run("classifier", args)
    x_all, y_all = run.data()
    x_test, y_test = run.data("test")
    model = ZooClassifier(**(TINY_CLASSIFIER if args.tiny else {})).to(run.device)

    def loss_fn(step: int) -> torch.Tensor:
        x, y = run.batch(x_all, y_all)
        return F.cross_entropy(model(_augment(run, x)).float(), y, label_smoothing=0.1)

    def save(step: int, loss: float | None, final: bool) -> None:
        acc = test_accuracy(model, x_test, y_test)
        run.log(f"test accuracy {acc:.4f}")
        run.save(model, step, loss, final, test_accuracy=acc)

    save(*fit(run, model, loss_fn, run.clock, save, weight_decay=0.05), True)
    return 0


# ----------------------------------------------------------------------------- stage 2


def _pseudo_huber(d: torch.Tensor, c: float) -> torch.Tensor:
    """Pseudo-Huber loss per sample, ``sqrt(|d|^2 + c^2) - c`` (Song & Dhariwal 2023)."""
    return ((d.float().flatten(1).pow(2).sum(1) + c * c).sqrt() - c).mean()


def train_lcm(args: argparse.Namespace) -> int:
    """Latent consistency distillation (Luo et al. 2023) of the CFG teacher, in pixel space.

    On the 50-step LCM grid (t = 19, 39, ..., 999; skip k = 20), the teacher's CFG DDIM step takes
    ``x_t`` to ``x_s`` (s = t - 20, clamped at 0); the student ``f(x_t, t)`` (with LCM's boundary
    condition, exactly :class:`LCMDenoiser`) is pulled towards the EMA target ``f_ema(x_s, s)``.
    """
    run = Run("lcm", args)
    teacher_unet, teacher_dir = _load_teacher(run, "teacher")
    x_all, y_all = run.data()
    scheduler, schedule, on_device, pred_type = _vp_schedule(run, teacher_dir)
    teacher = CFGDenoiser(DiscreteVPDenoiser(unet_fn(teacher_unet), on_device, pred_type), args.cfg,
                         clip=clip_range(scheduler))
    unet = copy.deepcopy(teacher_unet).requires_grad_(True)
    target = EMA(unet)
    student = LCMDenoiser(unet_fn(unet), on_device, pred_type)
    target_d = LCMDenoiser(unet_fn(target.model), on_device, pred_type)
    sigmas = on_device.sigmas.float()
    T = schedule.num_train_timesteps
    k = T // 50
    grid = torch.arange(1, 51, device=run.device) * k - 1
    huber_c = args.huber_c if args.huber_c is not None else 0.00054 * math.sqrt(x_all[0].numel())

    def loss_fn(step: int) -> torch.Tensor:
        x0, y = run.batch(x_all, y_all)
        t = grid[run.randint(len(grid), len(y))]
        sigma_t, sigma_s = sigmas[t], sigmas[(t - k).clamp(min=0)]
        x = x0 + _view(sigma_t) * run.randn(*x0.shape)
        with torch.no_grad():
            # Teacher DDIM step with CFG, then the EMA target at the lower level.
            x0_t = teacher(x, sigma_t, **_cfg_args(y))
            x_s = x0_t + _view(sigma_s) * (x - x0_t) / _view(sigma_t)
            tgt = target_d(x_s, sigma_s, class_labels=y)
        return _pseudo_huber(student(x, sigma_t, class_labels=y) - tgt, huber_c)

    def save(step: int, loss: float | None, final: bool) -> None:
        run.save(target.model, step, loss, final, {**scheduler, "_class_name": "LCMScheduler",
                 "original_inference_steps": 50}, cfg=args.cfg, skip=k, target_ema=args.ema, huber_c=huber_c,
                 teacher=str(teacher_dir))

    save(*fit(run, unet, loss_fn, run.clock, save, ema=target, ema_decay=args.ema, warmup=50), True)
    return 0


def train_pd(args: argparse.Namespace) -> int:
    """Guided progressive distillation (Salimans & Ho 2022; Meng et al. 2023), trailing DDIM grids.

    Round 1 distils two CFG-teacher DDIM steps of the ``--teacher-steps`` grid into one student
    step; each later round halves again from the previous (EMA) student, down to ``--steps``.
    Trailing grids nest (the 4-step grid t = 999, 749, 499, 249 is every other point of the
    8-step one), and the student is trained only at its own grid points. The loss is the error of
    the student's next state in VP coordinates, ``|x_next - x_target|^2 / (1 + sigma_next^2)``
    (plain x0 error on the last step), so no level's noise scale dominates.
    """
    run = Run("pd", args)
    n = args.teacher_steps
    rounds = []
    while n > args.steps:
        if n % 2:
            raise ValueError(f"--teacher-steps must be --steps times a power of 2, got {args.teacher_steps} "
                             f"and {args.steps}")
        rounds.append((n, n // 2))
        n //= 2
    if n != args.steps or not rounds:
        raise ValueError(f"--teacher-steps must be --steps times a power of 2 (>= 2x), got {args.teacher_steps} "
                         f"and {args.steps}")
    teacher_unet, teacher_dir = _load_teacher(run, "teacher")
    x_all, y_all = run.data()
    scheduler, schedule, on_device, pred_type = _vp_schedule(run, teacher_dir)
    cfg_teacher = CFGDenoiser(DiscreteVPDenoiser(unet_fn(teacher_unet), on_device, pred_type), args.cfg,
                         clip=clip_range(scheduler))

    def teacher(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cfg_teacher(x, sigma, **_cfg_args(y))

    unet = copy.deepcopy(teacher_unet).requires_grad_(True)
    total_steps = 0
    for r, (n_teacher, n_student) in enumerate(rounds):
        clock = run.clock.split(r, len(rounds))
        tg = ddim_sigmas(schedule, n_teacher, timestep_spacing="trailing").to(run.device)
        sg = ddim_sigmas(schedule, n_student, timestep_spacing="trailing").to(run.device)
        assert torch.equal(tg[::2], sg), "trailing grids must nest"
        ema = EMA(unet)
        student = DiscreteVPDenoiser(unet_fn(unet), on_device, pred_type)
        run.log(f"round {r + 1}/{len(rounds)}: {n_teacher} -> {n_student} steps")

        def loss_fn(step: int) -> torch.Tensor:
            x0, y = run.batch(x_all, y_all)
            i = run.randint(n_student, len(y))
            sigma, mid, nxt = sg[i], tg[2 * i + 1], sg[i + 1]
            x = x0 + _view(sigma) * run.randn(*x0.shape)
            with torch.no_grad():
                # Two teacher DDIM steps: sigma -> mid -> nxt.
                d0 = teacher(x, sigma, y)
                x_mid = d0 + _view(mid) * (x - d0) / _view(sigma)
                d1 = teacher(x_mid, mid, y)
                x_tgt = d1 + _view(nxt) * (x_mid - d1) / _view(mid)
            d = student(x, sigma, class_labels=y)
            x_hat = d + _view(nxt) * (x - d) / _view(sigma)
            return ((x_hat - x_tgt).float().pow(2).flatten(1).mean(1) / (1 + nxt.float() ** 2)).mean()

        def save(step: int, loss: float | None, final: bool) -> None:
            run.save(ema.model, total_steps + step, loss, final and r == len(rounds) - 1, scheduler,
                     cfg=args.cfg, student_steps=n_student, rounds=[list(p) for p in rounds], round=r + 1,
                     grid="ddim trailing", teacher=str(teacher_dir))

        steps, loss = fit(run, unet, loss_fn, clock, save, ema=ema, ema_decay=args.ema, warmup=50,
                          tag=f"round {r + 1} ")
        save(steps, loss, True)
        total_steps += steps
        if run.stop:
            break
        # The next round's teacher: this round's EMA student, conditional only (CFG is baked in).
        prev = DiscreteVPDenoiser(unet_fn(ema.model), on_device, pred_type)
        teacher = lambda x, sigma, y, prev=prev: prev(x, sigma, class_labels=y)  # noqa: E731
        unet = copy.deepcopy(ema.model).train().requires_grad_(True)
    return 0


def train_flow_student(args: argparse.Namespace) -> int:
    """Reflow (Liu et al. 2023): pair noise with CFG flow-teacher samples, retrain on straight lines.

    Pairs come first, for up to ``--pair-fraction`` of the budget (or ``--pairs``); the student,
    initialised from the teacher, then regresses ``v = z - x1`` at ``x_s = (1 - s) x1 + s z``,
    half of each batch at the 4-step grid's times and half at uniform times.
    """
    run = Run("flow-student", args)
    teacher_unet, teacher_dir = _load_teacher(run, "flow-teacher")
    teacher = CFGDenoiser(FlowDenoiser(unet_fn(teacher_unet), timestep_scale=1000.0), args.cfg)
    pair_sigmas = flow_grid(args.pair_steps)
    pair_batch = args.pair_batch or (4 if args.tiny else 1024)
    max_pairs = args.pairs or (8 if args.tiny else 50_000)
    gen_deadline = run.clock.start + args.pair_fraction * run.clock.seconds
    zs, xs, ys = [], [], []
    count, t = 0, time.time()
    while count == 0 or (count < max_pairs and time.time() < gen_deadline and not run.stop):
        y = run.randint(10, pair_batch)
        size = teacher_unet.config.sample_size
        z = run.randn(pair_batch, teacher_unet.config.in_channels, size, size)
        with torch.no_grad(), run.autocast():
            x1 = sample(teacher, initial_sample(z, pair_sigmas, "flow"), pair_sigmas, sampler="euler",
                        extra_args=_cfg_args(y))
        zs.append(z), xs.append(x1.float().clamp(-1, 1)), ys.append(y)
        count += pair_batch
    z_all, x_all, y_all = torch.cat(zs), torch.cat(xs), torch.cat(ys)
    run.log(f"{count} pairs from {args.pair_steps} CFG Euler steps ({time.time() - t:.0f}s)")

    unet = copy.deepcopy(teacher_unet).requires_grad_(True)
    ema = EMA(unet)
    grid_times = torch.linspace(1, 0, args.steps + 1, device=run.device)[:-1]

    def loss_fn(step: int) -> torch.Tensor:
        idx = run.randint(len(y_all), run.batch_size)
        z, x1, y = z_all[idx], x_all[idx], y_all[idx]
        n = len(y)
        on_grid = torch.arange(n, device=run.device) < n // 2
        s = torch.where(on_grid, grid_times[run.randint(args.steps, n)], run.rand(n))
        x_s = (1 - _view(s)) * x1 + _view(s) * z
        pred = unet(x_s, s * 1000, class_labels=y).sample
        return F.mse_loss(pred.float(), z - x1)

    def save(step: int, loss: float | None, final: bool) -> None:
        run.save(ema.model, step, loss, final, flow_scheduler_config(), cfg=args.cfg, pairs=count,
                 pair_steps=args.pair_steps, student_steps=args.steps, grid="uniform flow time",
                 teacher=str(teacher_dir))

    # The learning-rate schedule spans what is left of the budget after making pairs.
    clock = run.clock.split(0, 1)
    save(*fit(run, unet, loss_fn, clock, save, ema=ema, ema_decay=args.ema, warmup=50), True)
    return 0


# ----------------------------------------------------------------------------- command line

_TRAINERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "teacher": train_teacher,
    "flow-teacher": train_flow_teacher,
    "classifier": train_classifier,
    "lcm": train_lcm,
    "pd": train_pd,
    "flow-student": train_flow_student,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``<what>`` subcommands and their options to ``parser`` (used by ``distillpp train``)."""
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    for what, (batch, lr, help_text) in COMMANDS.items():
        p = sub.add_parser(what, help=help_text, description=help_text)
        p.add_argument("--data-dir", default=None,
                       help="Fashion-MNIST folder (default: $DISTILLPP_FASHION_MNIST, else "
                       "/usr/share/datasets/fashion-mnist)")
        p.add_argument("--out", default=str(Path(__file__).resolve().parent / "models"),
                       help="models folder; weights go to OUT/<what>/ (default: the package's %(default)s)")
        p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
        p.add_argument("--minutes", type=positive_float, default=30.0,
                       help="wall-clock budget, counted from process start (default: %(default)s)")
        p.add_argument("--max-steps", type=positive_int, default=None, help="step budget (default: unlimited; 2 with --tiny)")
        p.add_argument("--batch-size", type=positive_int, default=None, help=f"batch size (default: {batch}; 8 with --tiny)")
        p.add_argument("--lr", type=positive_float, default=None, help=f"peak learning rate (default: {lr:g})")
        p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
        p.add_argument("--tiny", action="store_true", help="tiny networks and 2 steps, for CPU tests")
        p.add_argument("--save-every", type=positive_float, default=1.0,
                       help="minutes between checkpoints (default: %(default)s)")
        p.add_argument("--log-every", type=positive_int, default=None,
                       help="steps between progress lines (default: 200; 1 with --tiny)")
        if what == "teacher":
            p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon",
                           help="what the UNet predicts; students inherit it (default: %(default)s)")
        if what in ("teacher", "flow-teacher"):
            p.add_argument("--p-uncond", type=unit_float, default=0.12,
                           help="label dropout rate, to the null label 10 (default: %(default)s)")
        if what != "classifier":
            p.add_argument("--ema", type=unit_float, default=0.95 if what == "lcm" else 0.999,
                           help=("EMA decay of the consistency target" if what == "lcm" else "EMA decay")
                           + " (default: %(default)s)")
        if what in ("lcm", "pd", "flow-student"):
            teacher = "flow-teacher" if what == "flow-student" else "teacher"
            p.add_argument("--teacher", default=None, help=f"teacher folder (default: OUT/{teacher})")
            p.add_argument("--cfg", type=finite_float, default=TEACHER_CFG,
                           help="teacher CFG scale baked into the student (default: %(default)s)")
        if what == "lcm":
            p.add_argument("--huber-c", type=positive_float, default=None,
                           help="pseudo-Huber c (default: 0.00054 sqrt(pixels), 0.017 here)")
        if what == "pd":
            p.add_argument("--teacher-steps", type=positive_int, default=16,
                           help="teacher DDIM steps of round 1 (default: %(default)s)")
            p.add_argument("--steps", type=positive_int, default=4,
                           help="student steps after the last round (default: %(default)s)")
        if what == "flow-student":
            p.add_argument("--steps", type=positive_int, default=4, help="student Euler steps (default: %(default)s)")
            p.add_argument("--pairs", type=positive_int, default=None,
                           help="max noise/sample pairs (default: 50000; 8 with --tiny)")
            p.add_argument("--pair-steps", type=positive_int, default=25,
                           help="teacher Euler steps per pair (default: %(default)s)")
            p.add_argument("--pair-batch", type=positive_int, default=None,
                           help="pairs per teacher batch (default: 1024; 4 with --tiny)")
            p.add_argument("--pair-fraction", type=unit_float, default=0.35,
                           help="at most this fraction of the budget goes to making pairs (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Run the subcommand chosen by :func:`add_arguments` (``args.what``).

    SIGTERM and SIGINT finish the current step, save and return (a killed budget run loses nothing).

    Raises:
        ValueError: a bad ``--out``, ``--device`` or ``--teacher``, before any data or model is loaded.
    """
    check_out_dir(args.out)
    if args.device is not None:
        check_device(args.device)
    if getattr(args, "teacher", None) is not None and not Path(args.teacher).is_dir():
        raise ValueError(f"--teacher {args.teacher}: no such folder")

    def on_signal(signum: int, frame: Any) -> None:
        _STOP.set()
        print(f"signal {signum}: stopping after this step", flush=True)

    _STOP.clear()
    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    except ValueError:  # not in the main thread: no graceful stop
        pass
    try:
        return _TRAINERS[args.what](args) or 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """``python -m distillpp.zoo.train <what> [options]``."""
    parser = argparse.ArgumentParser(prog="distillpp train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
