"""``distillpp batch`` on 1 and N GPUs: throughput, scaling, byte-identical output, SIGKILL and resume.

One invocation, on a machine with at least ``--nproc`` CUDA GPUs (or the CPU with ``--device cpu``):

1. (unless ``--images`` is given) a short one-process calibration run measures the steady-state rate
   and picks the image count so the one-GPU run takes about ``--target-seconds``;
2. ``distillpp batch`` in one process (``CUDA_VISIBLE_DEVICES=0``) into ``one/``;
3. the same rows under ``torchrun --standalone --nproc_per_node N`` into ``many/``;
4. checks that ``many/`` equals ``one/`` byte for byte: the same file names, identical
   ``manifest.jsonl``, and every PNG's sha256, recomputed from disk, equal to its manifest row;
5. starts the torchrun run again into ``killed/``, SIGKILLs torchrun and its workers at once (the
   workers run in sessions of their own, so the whole process tree is stopped, then killed) once
   ``--kill-at`` of the images are journaled, reruns the same command and checks: 0 images lost,
   0 duplicated (every image in exactly one journal line and one manifest row), no temporary file
   left, images finished before the kill untouched (same inode and mtime), and the folder equal to
   ``many/`` byte for byte.

Throughput comes from the processes' own clocks (``distillpp batch --timings``): the steady-state
rate is the images made after each process's first batch divided by the time from the earliest end
of a first batch to the last process's last journaled image. Model loading, CUDA start-up and the
first batch are outside it; the PNG encoding and writes, the per-chunk ``syncfs`` and journal fsync
are inside. End-to-end wall time is measured around the command (Python start, imports, torchrun
rendezvous, model load, manifest merge included). Speedup = N-process steady rate / one-process
steady rate; scaling efficiency = speedup / N.

Usage::

    python benchmarks/batch_scaling.py --out-dir results/batch_scaling              # 2 GPUs, zoo-lcm guided
    python benchmarks/batch_scaling.py --device cpu --images 96 --batch-size 8 --out-dir /tmp/bs  # CPU, gloo

Writes ``batch_scaling.json`` and ``batch_scaling.md`` into ``--out-dir``; exit status 1 when an
output check fails (a speedup below ``--target-speedup`` is reported, not an error).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Fashion-MNIST class names, the zoo presets' prompts.
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda: process i on GPU i; cpu: a dry run of the same steps (torchrun over gloo)")
    p.add_argument("--nproc", type=int, default=2, help="processes (GPUs) of the torchrun runs")
    p.add_argument("--preset", default="zoo-lcm", help="preset (default guidance: the preset's, teacher-guided)")
    p.add_argument("--images", type=int, default=None,
                   help="images per run (default: calibrated so the one-process run takes --target-seconds)")
    p.add_argument("--images-per-prompt", type=int, default=100, help="images per prompt row")
    p.add_argument("--batch-size", type=int, default=None, help="images per pipeline call (default: 1024 cuda, 8 cpu)")
    p.add_argument("--target-seconds", type=float, default=50.0,
                   help="steady-state seconds wanted for the one-process run when calibrating")
    p.add_argument("--max-images", type=int, default=300_000, help="cap on the calibrated image count")
    p.add_argument("--kill-at", type=float, default=0.4, help="fraction of images journaled before the SIGKILL")
    p.add_argument("--target-speedup", type=float, default=1.8, help="speedup the table compares against")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per batch command")
    p.add_argument("--work-dir", default=None, help="where the run folders go (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the run folders (default: deleted at the end)")
    p.add_argument("--out-dir", required=True, help="folder for batch_scaling.json and batch_scaling.md")
    args = p.parse_args(argv)
    if args.nproc < 2:
        p.error("--nproc must be >= 2")
    if not 0 < args.kill_at < 1:
        p.error("--kill-at must be in (0, 1)")
    if args.images is not None and args.images < 1:
        p.error("--images must be >= 1")
    if args.images_per_prompt < 1:
        p.error("--images-per-prompt must be >= 1")
    if args.batch_size is None:
        args.batch_size = 1024 if args.device == "cuda" else 8
    return args


# ------------------------------------------------------------------------------------ running batch


def _threads(args: argparse.Namespace) -> int:
    """CPU threads per process, the same in every run: one core each on the CPU (as each process would own
    a GPU), else the machine's cores split between the N processes (torchrun alone would give each one)."""
    return 1 if args.device == "cpu" else max(1, (os.cpu_count() or 1) // args.nproc)


def _env(args: argparse.Namespace, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(_threads(args)), **extra}


def _prompts(work: Path, rows: int) -> Path:
    path = work / "prompts.txt"
    path.write_text("".join(CLASSES[r % len(CLASSES)] + "\n" for r in range(rows)), encoding="utf-8")
    return path


def _batch_args(args: argparse.Namespace, prompts: Path, out: Path, timings: Path) -> list[str]:
    return ["--preset", args.preset, "--prompts", str(prompts), "--out", str(out),
            "--images-per-prompt", str(args.images_per_prompt), "--batch-size", str(args.batch_size),
            "--seed", "0", "--device", args.device, "--timings", str(timings)]


def _command(args: argparse.Namespace, nproc: int, batch_args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "distillpp.batch", *batch_args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "distillpp.batch", *batch_args]


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return ""


def run_batch(args: argparse.Namespace, name: str, nproc: int, prompts: Path, work: Path) -> dict:
    """Run one ``distillpp batch`` command to completion; its timings, wall time and log tail."""
    out, timings, log = work / name, work / f"{name}.timings.json", work / f"{name}.log"
    cmd = _command(args, nproc, _batch_args(args, prompts, out, timings))
    env = _env(args, **({"CUDA_VISIBLE_DEVICES": "0"} if nproc == 1 and args.device == "cuda" else {}))
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: exit status {proc.returncode}\n{_tail(log)}")
    report = json.loads(timings.read_text(encoding="utf-8"))
    print(f"[{name}] {nproc} process(es): {report['images_made']} images, wall {wall:.1f} s, "
          f"steady {report['steady_images_per_s'] or 0:.1f} img/s", flush=True)
    return {"name": name, "nproc": nproc, "command": cmd, "wall_seconds": wall, "timings": report,
            "log_tail": _tail(log, 600)}


# ------------------------------------------------------------------------------------ checks


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_digest(folder: Path) -> dict:
    """The run's files: manifest bytes, PNG names, and each PNG's checksum recomputed from disk."""
    manifest = (folder / "manifest.jsonl").read_bytes()
    rows = [json.loads(line) for line in manifest.decode("utf-8").splitlines()]
    pngs = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix == ".png")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        sums = dict(zip(pngs, pool.map(_sha256, [folder / n for n in pngs])))
    return {
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "manifest_rows": len(rows),
        "unique_images": len({(r["row"], r["image"]) for r in rows}),
        "files": sums,
        "mismatched": sum(1 for r in rows if sums.get(r["file"]) != r["sha256"]),
        "temporary_files": sorted(p.name for p in folder.rglob(".tmp-*")),
        "top_level": sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix != ".png"),
    }


def compare(a: dict, b: dict) -> dict:
    """Byte-for-byte comparison of two :func:`folder_digest` results."""
    same_names = sorted(a["files"]) == sorted(b["files"])
    differing = sum(1 for n in a["files"] if b["files"].get(n) != a["files"][n])
    return {
        "same_manifest_bytes": a["manifest_sha256"] == b["manifest_sha256"],
        "same_file_names": same_names and a["top_level"] == b["top_level"],
        "differing_images": differing,
        "ok": a["manifest_sha256"] == b["manifest_sha256"] and same_names and differing == 0
              and a["mismatched"] == 0 and b["mismatched"] == 0 and not a["temporary_files"]
              and not b["temporary_files"],
    }


def _journal_records(folder: Path) -> list[tuple[int, int]]:
    """Every complete journal line's (row, image), duplicates kept (a torn last line is skipped)."""
    keys = []
    for part in sorted((folder / "parts").glob("part-*.jsonl")):
        for line in part.read_text(encoding="utf-8", errors="replace").split("\n"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            keys.append((rec["row"], rec["image"]))
    return keys


class JournalCounter:
    """Counts journal lines as they are appended, reading only each journal's new bytes."""

    def __init__(self, folder: Path):
        self.parts = folder / "parts"
        self.offsets: dict[Path, int] = {}
        self.lines = 0

    def poll(self) -> int:
        for part in self.parts.glob("part-*.jsonl") if self.parts.is_dir() else []:
            start = self.offsets.get(part, 0)
            with open(part, "rb") as f:
                f.seek(start)
                data = f.read()
            self.offsets[part] = start + len(data)
            self.lines += data.count(b"\n")
        return self.lines


def _descendants(pid: int) -> list[int]:
    """``pid``'s child processes, recursively (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().decode(errors="replace").rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_and_resume(args: argparse.Namespace, prompts: Path, work: Path, total: int, reference: dict) -> dict:
    """SIGKILL a torchrun run midway (torchrun and every worker), rerun it, and check the folder."""
    name = "killed"
    out, timings, log = work / name, work / f"{name}.timings.json", work / f"{name}.first.log"
    cmd = _command(args, args.nproc, _batch_args(args, prompts, out, timings))
    target = max(1, int(args.kill_at * total))
    counter = JournalCounter(out)
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=_env(args), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + args.timeout
        while proc.poll() is None and time.monotonic() < deadline and counter.poll() < target:
            time.sleep(0.05)
        tree = [proc.pid, *_descendants(proc.pid)]
        # torchrun starts each worker in a session of its own: stop the whole tree first so no process
        # reacts to another's death, then kill them all.
        for pid in tree:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        proc.wait(timeout=60)
    killed_after = time.perf_counter() - t0
    gone = time.monotonic() + 30
    while any(_alive(pid) for pid in tree[1:]) and time.monotonic() < gone:
        time.sleep(0.1)
    survivors = [pid for pid in tree[1:] if _alive(pid)]
    before = set(_journal_records(out))
    stats_before = {f"{r:06d}_{k:03d}.png": os.stat(out / f"{r:06d}_{k:03d}.png") for r, k in before}
    temp_after_kill = len(list(out.rglob(".tmp-*")))
    manifest_before = (out / "manifest.jsonl").exists()
    print(f"[{name}] SIGKILL of {len(tree)} processes after {killed_after:.1f} s: {len(before)}/{total} images "
          f"journaled, {temp_after_kill} temporary file(s), {len(survivors)} survivor(s)", flush=True)

    resumed = run_batch(args, name, args.nproc, prompts, work)
    digest = folder_digest(out)
    journal = _journal_records(out)
    touched = sum(1 for n, st in stats_before.items()
                  if (os.stat(out / n).st_ino, os.stat(out / n).st_mtime_ns) != (st.st_ino, st.st_mtime_ns))
    same = compare(digest, reference)
    result = {
        "command": cmd,
        "killed_after_seconds": killed_after,
        "processes_killed": len(tree),
        "survivors": len(survivors),
        "returncode_of_killed": proc.returncode,
        "finished_before_kill": len(before),
        "manifest_before_kill": manifest_before,
        "temporary_files_after_kill": temp_after_kill,
        "resumed": resumed,
        "lost": total - digest["unique_images"],
        "duplicated": (digest["manifest_rows"] - digest["unique_images"]) + (len(journal) - len(set(journal))),
        "temporary_files_left": len(digest["temporary_files"]),
        "finished_images_touched": touched,
        "equal_to_uninterrupted": same,
    }
    # The rerun makes exactly the images without a journal line (finished ones are skipped).
    result["ok"] = (proc.returncode == -signal.SIGKILL and not survivors and 0 < len(before) < total
                    and not manifest_before and result["lost"] == 0 and result["duplicated"] == 0
                    and result["temporary_files_left"] == 0 and touched == 0 and same["ok"]
                    and resumed["timings"]["images_made"] == total - len(before))
    return result


# ------------------------------------------------------------------------------------ the report


def machine() -> dict:
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(), "host": platform.node()}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["gpus"] = [line.strip() for line in smi.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        info["gpus"] = []
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def markdown(report: dict) -> str:
    one, many = report["runs"]["one"], report["runs"]["many"]
    n = many["nproc"]
    m = report["machine"]
    rows = [
        "| run | processes | images | steady img/s | load s (max) | end-to-end wall s | end-to-end img/s "
        "| in pipeline calls | waiting on writes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (one, many):
        t = r["timings"]
        busy, wait = _shares(t["workers"])
        rows.append(f"| {r['name']} | {r['nproc']} | {t['images_made']} | {t['steady_images_per_s']:.1f} | "
                    f"{t['load_seconds']:.1f} | {r['wall_seconds']:.1f} | {t['images_made'] / r['wall_seconds']:.1f} "
                    f"| {busy:.0%} | {wait:.0%} |")
    s = report["scaling"]
    k = report["kill_and_resume"]
    lines = [
        f"# distillpp batch: 1 vs {n} {'GPUs' if report['settings']['device'] == 'cuda' else 'CPU processes'}",
        "",
        f"{report['date']}; {', '.join(m['gpus']) or 'no GPU'}; {m['cpus']} CPUs; Python {m['python']}, "
        f"torch {m.get('torch')}; commit {m.get('commit') or 'not recorded'}.",
        f"Preset {report['settings']['preset']} (its default teacher guidance), {report['settings']['images']} "
        f"images ({report['settings']['rows']} rows x {report['settings']['images_per_prompt']}), batch size "
        f"{report['settings']['batch_size']}, OMP_NUM_THREADS={report['settings']['omp_num_threads']} in every "
        f"process. Command: `{report['command']}`",
        "",
        *rows,
        "",
        f"Speedup {n} vs 1 (steady state): **{s['speedup']:.2f}x**, scaling efficiency {s['efficiency']:.0%} "
        f"(target {s['target']:.1f}x: {'met' if s['meets_target'] else 'NOT met'}); end-to-end "
        f"{s['end_to_end_speedup']:.2f}x.",
        "",
        "Steady state: images made after each process's first batch / (last process's last journaled image - "
        "earliest end of a first batch), from the processes' own clocks (`distillpp batch --timings`); model "
        "load, CUDA start-up and the first batch excluded, PNG encoding, writes and fsyncs included. End-to-end: "
        "the whole command (Python start, torchrun rendezvous, load, manifest) timed by this script. The last two "
        "columns: each process's share of its time after the model load spent in pipeline calls (noise, networks, "
        "PIL images) and blocked on its PNG writer pool (encoding, writes, syncfs, journal), averaged over processes.",
        "",
        f"- {n}-process output equals the 1-process output byte for byte: "
        f"**{'yes' if report['same_bytes']['ok'] else 'NO'}** (manifest bytes "
        f"{'equal' if report['same_bytes']['same_manifest_bytes'] else 'differ'}, "
        f"{report['same_bytes']['differing_images']} differing images, every PNG's sha256 recomputed).",
        f"- SIGKILL of torchrun and its {k['processes_killed'] - 1} workers after {k['killed_after_seconds']:.1f} s "
        f"({k['finished_before_kill']} images journaled), then the same command again: lost {k['lost']}, "
        f"duplicated {k['duplicated']}, temporary files left {k['temporary_files_left']}, finished images "
        f"touched {k['finished_images_touched']}, equal to the uninterrupted run: "
        f"**{'yes' if k['equal_to_uninterrupted']['ok'] else 'NO'}** -> **{'pass' if k['ok'] else 'FAIL'}**.",
    ]
    if report.get("calibration"):
        c = report["calibration"]
        lines += [f"- Calibration: {c['images']} images in one process at {c['steady_images_per_s']:.1f} img/s "
                  f"chose {report['settings']['images']} images for ~{report['settings']['target_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def _shares(workers: list[dict]) -> tuple[float, float]:
    """Mean share of each worker's post-load time in pipeline calls and in waiting for its writers."""
    spans = [(w, w["end"] - w["loaded"]) for w in workers if w["end"] > w["loaded"]]
    if not spans:
        return 0.0, 0.0
    return (sum(w.get("generate_seconds", 0.0) / d for w, d in spans) / len(spans),
            sum(w.get("write_wait_seconds", 0.0) / d for w, d in spans) / len(spans))


def _round_images(n: int, args: argparse.Namespace) -> int:
    """``n`` rounded up to whole rows, at least two batches per process."""
    n = max(n, 2 * args.nproc * args.batch_size)
    return -(-n // args.images_per_prompt) * args.images_per_prompt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < args.nproc:
            print(f"--device cuda needs {args.nproc} GPUs, this machine has {torch.cuda.device_count()}",
                  file=sys.stderr)
            return 2
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="batch_scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("calibrate", "one", "many", "killed"):
        if (work / name).exists():
            shutil.rmtree(work / name)
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([os.path.relpath(sys.argv[0]) if sys.argv[0] else "batch_scaling.py", *sys.argv[1:]]),
        "machine": machine(),
    }
    t_start = time.perf_counter()
    try:
        calibration = None
        images = args.images
        if images is None:
            cal_images = _round_images(10 * args.batch_size, args)
            cal = run_batch(args, "calibrate", 1, _prompts(work, cal_images // args.images_per_prompt), work)
            rate = cal["timings"]["steady_images_per_s"]
            calibration = {"images": cal_images, "steady_images_per_s": rate, "wall_seconds": cal["wall_seconds"]}
            images = min(args.max_images, int(rate * args.target_seconds))
            shutil.rmtree(work / "calibrate", ignore_errors=True)
        images = _round_images(images, args)
        rows = images // args.images_per_prompt
        prompts = _prompts(work, rows)
        report["calibration"] = calibration
        report["settings"] = {"device": args.device, "preset": args.preset, "images": images, "rows": rows,
                              "images_per_prompt": args.images_per_prompt, "batch_size": args.batch_size,
                              "nproc": args.nproc, "target_seconds": args.target_seconds, "kill_at": args.kill_at,
                              "omp_num_threads": _threads(args)}
        one = run_batch(args, "one", 1, prompts, work)
        many = run_batch(args, "many", args.nproc, prompts, work)
        report["runs"] = {"one": one, "many": many}
        speedup = many["timings"]["steady_images_per_s"] / one["timings"]["steady_images_per_s"]
        report["scaling"] = {
            "speedup": speedup, "efficiency": speedup / args.nproc, "target": args.target_speedup,
            "meets_target": speedup >= args.target_speedup,
            "end_to_end_speedup": one["wall_seconds"] / many["wall_seconds"],
        }
        digest_one, digest_many = folder_digest(work / "one"), folder_digest(work / "many")
        report["same_bytes"] = compare(digest_many, digest_one)
        report["same_bytes"]["images_checked"] = len(digest_one["files"])
        _write(out_dir, report)  # what is known so far, in case the kill test runs out of time
        report["kill_and_resume"] = kill_and_resume(args, prompts, work, images, digest_many)
    except Exception as err:  # keep what was measured, say what failed
        report["error"] = f"{type(err).__name__}: {err}"
        _write(out_dir, report)
        print(f"batch_scaling: error: {report['error']}", file=sys.stderr)
        return 1
    finally:
        report["total_seconds"] = time.perf_counter() - t_start
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    _write(out_dir, report)
    md = markdown(report)
    (out_dir / "batch_scaling.md").write_text(md, encoding="utf-8")
    print(md)
    ok = report["same_bytes"]["ok"] and report["kill_and_resume"]["ok"]
    return 0 if ok else 1


def _write(out_dir: Path, report: dict) -> None:
    tmp = out_dir / ".batch_scaling.json.partial"
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / "batch_scaling.json")


if __name__ == "__main__":
    sys.exit(main())
