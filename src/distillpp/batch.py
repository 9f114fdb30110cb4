"""``distillpp batch``: many images from a preset, deterministic, resumable, sharded over processes.

Each line of the prompt file is a *row*; each row makes ``--images-per-prompt`` images. An image's
seed depends only on the base seed, its row and its image index (one ``torch.Generator`` per image,
through the pipeline's per-image generator list). The image list is cut into fixed chunks of
``--batch-size`` images, one pipeline call each; processes take every ``WORLD_SIZE``-th chunk and a
restart redoes whole chunks, so an image is always computed in the same batch and its bytes are the
same whatever the number of processes or interruptions. (Another ``--batch-size`` draws the same
noise, but the networks' float results move in their last bits with the batch, which can change a
pixel by one level; ``--batch-size`` is therefore part of the run.)

The output folder holds:

- ``batch_config.json``: what the run is (preset, resolved guidance, steps, seeds, batch size,
  prompt-file checksum, model ids and revisions). A later run into the same folder must match it or
  is refused.
- one PNG per image, ``<row>_<image>.png``, encoded and written by a thread pool while the next
  chunk is computed, to a temporary name and renamed into place;
- ``parts/part-*.jsonl``: one journal per process and attempt, a chunk's lines appended (and
  fsync'ed) once its images are in place and on disk. On a restart these lines say what is
  finished; an image on disk without its line is made again (same bytes) and a journal's torn last
  line is ignored;
- ``manifest.jsonl``: the journals merged, one line per image sorted by row and image, written
  once every image exists (by rank 0 after a barrier, or by the Ray driver).

Engines: ``local`` (one process, or ``torchrun --nproc_per_node N``, each process on
``cuda:LOCAL_RANK`` when CUDA is available) and ``ray`` (a Ray Data ``map_batches`` over an actor
pool, one model replica per actor, one chunk per call; the driver writes files and journals exactly
as the local engine does).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import hashlib
import io
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = [
    "Row",
    "Item",
    "BatchFolderError",
    "BatchFolder",
    "read_prompts",
    "image_seed",
    "plan_items",
    "generate_images",
    "generate_items",
    "load_pipeline",
    "add_arguments",
    "run",
]

FORMAT = "distillpp-batch/1"
CONFIG_NAME = "batch_config.json"
MANIFEST_NAME = "manifest.jsonl"
PARTS_DIR = "parts"
TMP_PREFIX = ".tmp-"


class BatchFolderError(ValueError):
    """The output folder belongs to another run, is not a batch folder, or was modified."""


@dataclass(frozen=True)
class Row:
    """One line of the prompt file.

    Args:
        index: 0-based position among the prompts (blank lines of a text file are skipped).
        prompt: the prompt (zoo presets: a Fashion-MNIST class name or ``"0"``..``"9"``).
        seed: the row's own seed (its images use ``seed + image``), or ``None``.
        negative_prompt: the row's negative prompt, or ``None``.
    """

    index: int
    prompt: str
    seed: int | None = None
    negative_prompt: str | None = None


@dataclass(frozen=True)
class Item:
    """One image to make."""

    row: int
    image: int
    prompt: str
    negative_prompt: str | None
    seed: int
    file: str

    @property
    def key(self) -> tuple[int, int]:
        return self.row, self.image


# --------------------------------------------------------------------------------------------
# Prompts, seeds, work items
# --------------------------------------------------------------------------------------------


def _read_text(path: str) -> str:
    if "://" in path:
        # Object-store paths (s3://, gs://, ...) through pyarrow, which Ray Data installs.
        try:
            from pyarrow import fs
        except ImportError as err:
            raise ValueError(f"--prompts {path}: reading a URI needs pyarrow (pip install 'distillpp[ray]')") from err
        filesystem, inner = fs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as f:
            return f.read().decode("utf-8")
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"--prompts: no such file: {path}") from None


def _row(index: int, record: dict, where: str) -> Row:
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"--prompts {where}: needs a non-empty 'prompt', got {prompt!r}")
    seed = record.get("seed")
    if seed is not None and seed != "":
        try:
            seed = int(seed)
        except (TypeError, ValueError):
            raise ValueError(f"--prompts {where}: 'seed' must be an integer, got {seed!r}") from None
        if seed < 0:
            raise ValueError(f"--prompts {where}: 'seed' must be >= 0, got {seed}")
    else:
        seed = None
    neg = record.get("negative_prompt")
    if neg is not None and not isinstance(neg, str):
        raise ValueError(f"--prompts {where}: 'negative_prompt' must be a string, got {neg!r}")
    return Row(index, prompt.strip(), seed, neg if neg else None)


def read_prompts(path: str | os.PathLike) -> list[Row]:
    """The rows of a prompt file.

    Args:
        path: ``.jsonl`` (one JSON object a line with ``prompt`` and optional ``seed``,
            ``negative_prompt``), ``.csv`` (a header with a ``prompt`` column, optional ``seed`` and
            ``negative_prompt`` columns), or any other file: one prompt a line, blank lines skipped.
            ``s3://...``-style URIs are read through pyarrow.

    Raises:
        ValueError: a malformed line (naming it) or no prompts at all.
    """
    path = str(path)
    text = _read_text(path)
    suffix = Path(path.split("?")[0]).suffix.lower()
    rows: list[Row] = []
    if suffix in (".jsonl", ".ndjson"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"--prompts {path}, line {n}: not JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"--prompts {path}, line {n}: expected a JSON object, got {type(record).__name__}")
            rows.append(_row(len(rows), record, f"{path}, line {n}"))
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if "prompt" not in (reader.fieldnames or []):
            raise ValueError(f"--prompts {path}: the CSV header needs a 'prompt' column, got {reader.fieldnames}")
        for n, record in enumerate(reader, 2):
            rows.append(_row(len(rows), record, f"{path}, line {n}"))
    else:
        rows = [Row(i, p) for i, p in enumerate(line.strip() for line in text.splitlines() if line.strip())]
    if not rows:
        raise ValueError(f"--prompts {path} holds no prompts")
    return rows


def image_seed(base_seed: int, row: int, image: int, row_seed: int | None = None) -> int:
    """The seed of one image: ``row_seed + image`` when the row has a seed, else a 63-bit hash of
    ``(base_seed, row, image)`` (so neighbouring base seeds do not share images).

    Args:
        base_seed: ``--seed``.
        row, image: the image's row and its index within the row.
        row_seed: the row's own ``seed`` column, if any.
    """
    if row_seed is not None:
        return int(row_seed) + int(image)
    digest = hashlib.sha256(f"distillpp-batch/{int(base_seed)}/{int(row)}/{int(image)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def plan_items(rows: Sequence[Row], images_per_prompt: int, base_seed: int) -> list[Item]:
    """Every image of the run, in row-major order."""
    return [
        Item(r.index, k, r.prompt, r.negative_prompt, image_seed(base_seed, r.index, k, r.seed),
             f"{r.index:06d}_{k:03d}.png")
        for r in rows
        for k in range(images_per_prompt)
    ]


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# The output folder
# --------------------------------------------------------------------------------------------


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _write_atomic(path: Path, data: bytes, sync: bool = True) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


@functools.lru_cache(maxsize=1)
def _syncfs() -> Any:
    """Linux's ``syncfs(2)`` through ctypes, or ``None`` where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


def _make_durable(folder: Path, files: Sequence[Path]) -> None:
    """Put ``files`` (just renamed into ``folder``) on disk before their journal lines are written.

    One ``syncfs`` of the folder's filesystem where Linux has it: one journal commit for a whole
    chunk. An ``fsync`` per image costs one commit each (~1 ms on this project's CI disk), which
    capped a run at about a thousand images per second per disk, far below a GPU's rate for the zoo
    models. Elsewhere each file and then the folder (for the renames) is fsync'ed.
    """
    syncfs = _syncfs()
    fd = os.open(folder, os.O_RDONLY)
    try:
        if syncfs is not None and syncfs(fd) == 0:
            return
        for path in files:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if os.name == "posix":
            os.fsync(fd)
    finally:
        os.close(fd)


class BatchFolder:
    """The output folder of one run: config check, image writes, journals, manifest.

    Args:
        path: the ``--out`` folder.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._journal = None

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    def prepare(self, config: dict) -> bool:
        """Create the folder for ``config``, or check that it already holds the same run.

        Removes temporary files left by a killed run. Call from one process only (rank 0), before
        any other writes. Returns ``True`` when resuming.

        Raises:
            BatchFolderError: the folder holds another run, is not a batch folder, or is corrupted.
        """
        where = f"--out {self.path}"
        if self.path.exists() and not self.path.is_dir():
            raise BatchFolderError(f"{where} is a file, not a folder")
        resuming = self.config_path.exists()
        if resuming:
            try:
                old = json.loads(self.config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise BatchFolderError(f"{where}: {CONFIG_NAME} is corrupted ({err}); use a new --out folder") from None
            if not isinstance(old, dict) or old.get("format") != FORMAT:
                raise BatchFolderError(f"{where}: {CONFIG_NAME} is not a {FORMAT} config; use a new --out folder")
            a, b = _flatten(old), _flatten(config)
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            if diff and not self._started():
                # Nothing made yet (e.g. the last attempt stopped at a bad prompt): the folder holds
                # no images to protect, so the corrected command may take it over.
                resuming = False
            elif diff:
                shown = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:3])
                more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
                raise BatchFolderError(
                    f"{where} holds a run with different settings ({shown}{more}); rerun with the same "
                    "arguments to resume it, or use a new --out folder"
                )
        elif self.path.exists() and any(self.path.iterdir()):
            raise BatchFolderError(f"{where} is not empty and has no {CONFIG_NAME}: not a batch folder; "
                                   "use a new or empty --out folder")
        (self.path / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        for stale in list(self.path.glob(TMP_PREFIX + "*")) + list((self.path / PARTS_DIR).glob(TMP_PREFIX + "*")):
            stale.unlink(missing_ok=True)
        if not resuming:
            _write_atomic(self.config_path, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode())
        return resuming

    def _started(self) -> bool:
        parts = self.path / PARTS_DIR
        journals = parts.glob("part-*.jsonl") if parts.is_dir() else []
        return any(self.path.glob("*.png")) or any(p.stat().st_size > 0 for p in journals)

    def records(self) -> dict[tuple[int, int], dict]:
        """Finished images by ``(row, image)``, from every journal.

        Raises:
            BatchFolderError: a journal line other than a torn last one is not a record, or two
                journals disagree about an image.
        """
        out: dict[tuple[int, int], dict] = {}
        parts = self.path / PARTS_DIR
        for part in sorted(parts.glob("part-*.jsonl")) if parts.is_dir() else []:
            data = part.read_bytes().decode("utf-8", errors="replace")
            lines = data.split("\n")
            for n, line in enumerate(lines):
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                    key = (int(rec["row"]), int(rec["image"]))
                    rec["file"], rec["sha256"]  # noqa: B018  (both must be present)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    if n == len(lines) - 1:  # torn last write of a killed process: its image is redone
                        continue
                    raise BatchFolderError(
                        f"--out {self.path}: {part.relative_to(self.path)} line {n + 1} is corrupted; "
                        "use a new --out folder"
                    ) from None
                if key in out and _canonical(out[key]) != _canonical(rec):
                    raise BatchFolderError(f"--out {self.path}: two journals disagree about row {key[0]} image "
                                           f"{key[1]}; use a new --out folder")
                out[key] = rec
        return out

    def verify(self, records: dict[tuple[int, int], dict], items: Iterable[Item]) -> None:
        """Check that each finished image of ``items`` is on disk with its recorded checksum.

        Raises:
            BatchFolderError: a record names another file, or its image is missing or changed.
        """
        for it in items:
            rec = records.get(it.key)
            if rec is None:
                continue
            path = self.path / it.file
            problem = None
            if rec["file"] != it.file or rec.get("seed") != it.seed or rec.get("prompt") != it.prompt:
                problem = "belongs to another run"
            elif not path.is_file():
                problem = "is missing"
            elif _sha256_file(path) != rec["sha256"]:
                problem = "does not match its recorded checksum"
            if problem:
                raise BatchFolderError(f"--out {self.path}: {it.file} {problem} (the folder was modified); "
                                       "use a new --out folder")

    def put(self, item: Item, png: bytes) -> None:
        """Put one image in place under its final name (temporary name, then rename); not yet durable
        nor finished: :meth:`finish` does both."""
        _write_atomic(self.path / item.file, png, sync=False)

    def finish(self, items: Sequence[Item], records: Sequence[dict]) -> None:
        """Mark images put in place as finished: make them durable, then append their records to this
        process's journal in one write (fsync'ed). A kill before the journal line leaves an image
        that a rerun makes again, with the same bytes."""
        if not records:
            return
        _make_durable(self.path, [self.path / it.file for it in items])
        if self._journal is None:
            name = f"part-{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl"
            self._journal = open(self.path / PARTS_DIR / name, "a", encoding="utf-8")
        self._journal.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def merge(self, items: Sequence[Item]) -> Path:
        """Write ``manifest.jsonl``: the records of ``items`` in row/image order.

        Raises:
            RuntimeError: some image has no record (another process did not finish).
        """
        records = self.records()
        missing = [it for it in items if it.key not in records]
        if missing:
            raise RuntimeError(f"{len(missing)} image(s) are not finished (first: row {missing[0].row} image "
                               f"{missing[0].image}); rerun the same command to finish them")
        text = "".join(json.dumps(records[it.key], ensure_ascii=False) + "\n" for it in items)
        path = self.path / MANIFEST_NAME
        _write_atomic(path, text.encode("utf-8"))
        return path


# --------------------------------------------------------------------------------------------
# Pipeline, settings, generation
# --------------------------------------------------------------------------------------------


def load_pipeline(preset: str, device: str, overrides: dict | None = None) -> Any:
    """The guided pipeline of ``preset`` on ``device`` (``distillpp.pipelines.from_preset``)."""
    from .pipelines import from_preset

    kwargs: dict[str, Any] = {"device": device}
    if overrides is not None:
        kwargs["overrides"] = overrides
    return from_preset(preset, **kwargs)


def describe_preset(preset: str, overrides: dict | None = None) -> Any:
    """What the run needs to know of a preset without loading its models: ``preset`` (with
    ``overrides`` applied), its default ``guidance`` and ``has_teacher``, as the loaded pipeline has them.

    Raises:
        ValueError: unknown preset, or an override file with unknown fields.
    """
    from types import SimpleNamespace

    from .pipelines.presets import apply_overrides, get_preset

    p = get_preset(preset)
    if overrides is not None:
        try:
            p = apply_overrides(p, overrides)
        except ValueError as err:
            raise ValueError(f"--overrides: {err}") from None
    return SimpleNamespace(preset=p, guidance=p.guidance, has_teacher=p.teacher != "none")


def _read_overrides(path: str | None, preset: str | None) -> tuple[str, dict | None]:
    """The preset name and the ``--overrides`` file's content, read as ``generate`` reads it
    (:func:`~distillpp.pipelines.presets.load_overrides`); the file may name the preset instead of ``--preset``."""
    from .pipelines.presets import load_overrides

    data = None
    if path is not None:
        try:
            data = _jsonable(load_overrides(path))  # JSON types, as the folder's config stores them
        except ValueError as err:
            raise ValueError(f"--overrides: {err}") from None
    name = preset or (data or {}).get("preset")
    if not name:
        raise ValueError("--preset is required (or an --overrides file naming one)")
    return name, data


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def resolve_guidance(pipe: Any, knobs: dict[str, Any]) -> Any:
    """The :class:`~distillpp.TeacherGuidance` of the run: the default of ``pipe`` (a pipeline, or
    :func:`describe_preset`'s view) with ``knobs`` set.

    Raises:
        ValueError: a knob is given for a preset without a teacher, or out of range (naming it).
    """
    given = {k: v for k, v in knobs.items() if v is not None}
    if not getattr(pipe, "has_teacher", False):
        if given:
            names = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ValueError(f"{names}: preset {pipe.preset.name!r} has no teacher to guide it")
        return None
    return dataclasses.replace(pipe.guidance, **given)


def _guidance_dict(guidance: Any) -> dict | None:
    if guidance is None:
        return None
    return {f.name: _jsonable(getattr(guidance, f.name)) for f in dataclasses.fields(guidance)}


def _weights_revision(folder: Path) -> str | None:
    # A Hugging Face cache snapshot is named after its commit; other folders are hashed (small
    # models only: hashing many GB of weights would delay every start).
    parts = folder.resolve().parts
    if "snapshots" in parts and parts.index("snapshots") + 1 < len(parts):
        return parts[parts.index("snapshots") + 1]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json"))
    if not files or sum(p.stat().st_size for p in files) > 512 * 2**20:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(folder)).encode() + b"\0" + _sha256_file(p).encode())
    return "sha256:" + h.hexdigest()[:16]


def model_info(pipe: Any) -> dict:
    """Ids and revisions of the models behind ``pipe`` (recorded in the config and every manifest line).

    Uses ``pipe.model_info()`` when the pipeline provides it; else the preset's ``base``/``student``/
    ``teacher`` references, with the revision of any local folder (its HF snapshot commit, or a
    checksum of its weights) or the reference's own ``revision``.
    """
    own = getattr(pipe, "model_info", None)
    if callable(own):
        return _jsonable(own())
    preset = pipe.preset
    out: dict[str, Any] = {}
    for role in ("base", "student", "teacher"):
        ref = getattr(preset, role, None)
        if ref is None:
            continue
        ident = getattr(ref, "repo", None) or getattr(ref, "path", None) or str(ref)
        if ident == "none":
            continue
        revision = getattr(ref, "revision", None)
        folder = getattr(ref, "local_dir", None) or (ident if os.path.isdir(str(ident)) else None)
        if getattr(preset, "family", None) == "zoo":
            from .zoo import model_dir

            folder = model_dir(ident)
        if revision is None and folder is not None:
            revision = _weights_revision(Path(folder))
        out[role] = {"id": str(ident), "revision": revision}
    return out


def _png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def generate_images(pipe: Any, items: Sequence[Item], guidance: Any, steps: int | None) -> list[Any]:
    """PIL images of ``items``, one pipeline call per run of items sharing a negative prompt.

    Args:
        pipe: the guided pipeline.
        items: the images to make (any mix of rows).
        guidance: the run's TeacherGuidance, or ``None`` (preset without a teacher).
        steps: ``num_inference_steps`` (``None``: the preset's).
    """
    import torch

    out: list[Any] = []
    start = 0
    while start < len(items):
        end = start + 1
        while end < len(items) and items[end].negative_prompt == items[start].negative_prompt:
            end += 1
        group = items[start:end]
        kwargs: dict[str, Any] = {}
        if guidance is not None:
            kwargs["guidance"] = guidance
        if steps is not None:
            kwargs["num_inference_steps"] = steps
        result = pipe(
            prompt=[it.prompt for it in group], negative_prompt=group[0].negative_prompt,
            generator=[torch.Generator("cpu").manual_seed(it.seed) for it in group],
            output_type="pil", **kwargs,
        )
        out.extend(result.images)
        start = end
    return out


def generate_items(pipe: Any, items: Sequence[Item], guidance: Any, steps: int | None) -> list[bytes]:
    """PNG bytes of ``items`` (:func:`generate_images`, encoded)."""
    return [_png_bytes(image) for image in generate_images(pipe, items, guidance, steps)]


class _ChunkWriter:
    """Writes chunks of images on a thread pool while the caller computes the next chunk.

    Each image is PNG-encoded (when given as a PIL image) and put in place by a pool thread; once a
    chunk's images are all in place, :meth:`BatchFolder.finish` makes them durable and journals them
    in one go (checked at each :meth:`submit`). At most ``depth`` chunks are in flight, so memory stays
    bounded and a kill loses at most those chunks' images (a rerun makes them again, with the same
    bytes). Images of a redone chunk that were finished before a restart are skipped and stay untouched.

    Args:
        folder: the run's folder.
        done: records of the images finished before this attempt.
        run: the run description (settings and models go into each record).
        threads: pool size; encoding and file writes release the GIL for part of their time.
        depth: chunks in flight.
    """

    def __init__(self, folder: BatchFolder, done: dict, run: dict, threads: int = 4, depth: int = 2):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.folder, self.done, self.run, self.depth = folder, done, run, depth
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="batch-writer")
        self.pending: Any = deque()

    def _put(self, item: Item, image: Any) -> dict:
        png = image if isinstance(image, (bytes, bytearray)) else _png_bytes(image)
        self.folder.put(item, bytes(png))
        return _record(item, png, self.run)

    def submit(self, made: Iterable[tuple[Item, Any]]) -> int:
        """Queue one chunk's ``(item, PIL image or PNG bytes)`` pairs; returns how many images were
        finished (journaled) meanwhile."""
        new = [(it, self.pool.submit(self._put, it, image)) for it, image in made if it.key not in self.done]
        self.pending.append(new)
        finished = 0
        # Journal the chunks already written at once (a kill then loses little); wait only when
        # ``depth`` chunks are in flight.
        while self.pending and (len(self.pending) > self.depth or all(f.done() for _, f in self.pending[0])):
            finished += self._finish(self.pending.popleft())
        return finished

    def _finish(self, chunk: list) -> int:
        records = [future.result() for _, future in chunk]
        self.folder.finish([it for it, _ in chunk], records)
        return len(records)

    def drain(self) -> int:
        """Finish every queued chunk; returns how many images that finished."""
        finished = 0
        while self.pending:
            finished += self._finish(self.pending.popleft())
        return finished

    def close(self) -> None:
        """Stop the pool (after :meth:`drain`, or on an error: queued writes complete, unjournaled)."""
        self.pool.shutdown(wait=True)
        self.folder.close()

    def __enter__(self) -> "_ChunkWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """On an error, first journal what was made before it (best effort); always :meth:`close`."""
        if exc_type is not None:
            with contextlib.suppress(Exception):
                self.drain()
        self.close()


def _record(item: Item, png: bytes, run: dict) -> dict:
    return {
        "row": item.row, "image": item.image, "prompt": item.prompt, "negative_prompt": item.negative_prompt,
        "seed": item.seed, "file": item.file, "sha256": _sha256_bytes(png),
        "preset": run["settings"]["preset"], "settings": run["settings"], "models": run["models"],
    }


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``batch`` options to ``parser``."""
    from .pipelines.cli import add_guidance_arguments

    g = parser.add_argument_group("what to make")
    g.add_argument("--preset", help="preset name (see `distillpp generate --list-presets`), e.g. zoo-lcm; may be "
                                    "left out when the --overrides file names one")
    g.add_argument("--prompts", required=True,
                   help="prompt file: one prompt a line, or .jsonl/.csv with a 'prompt' column and optional "
                        "'seed' and 'negative_prompt' (zoo presets: Fashion-MNIST class names)")
    g.add_argument("--out", required=True, help="output folder (rerun the same command into it to resume)")
    g.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt row")
    g.add_argument("--seed", type=int, default=0, help="base seed; each image's seed hashes (seed, row, image)")
    g.add_argument("--batch-size", type=int, default=8,
                   help="images per pipeline call; part of the run (float results depend on the batch in their "
                        "last bits), so a resume must use the same value")
    g.add_argument("--device", default=None,
                   help="device (default: cuda:LOCAL_RANK under torchrun, cuda if available, else cpu)")
    g.add_argument("--steps", type=int, default=None, help="student sampling steps (default: the preset's)")
    # The same flags, types and --overrides file as ``generate``: every TeacherGuidance knob.
    add_guidance_arguments(parser)

    g = parser.add_argument_group("engine")
    g.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process (or each torchrun process); ray: a Ray Data actor pool")
    g.add_argument("--timings", default=None, metavar="FILE",
                   help="local engine: write each process's timings and the run's steady-state images/s (after "
                        "model load and the first batch) as JSON")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (e.g. 'auto' or ray://head:10001; default: $RAY_ADDRESS, else a "
                        "local cluster)")
    g.add_argument("--replicas", type=int, default=None,
                   help="Ray: model replicas (actors) (default: the cluster's GPUs, at least 1)")
    g.add_argument("--gpus-per-replica", type=float, default=None,
                   help="Ray: GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    return parser


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "_Dist":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    def init(self) -> None:
        if self.world > 1:
            import datetime

            import torch.distributed as dist

            # Only small control messages cross processes, so gloo (CPU) serves GPU runs too; the
            # long timeout covers ranks that wait at the final barrier for a slower one.
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=1))

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _check_counts(args: argparse.Namespace) -> None:
    for name in ("images_per_prompt", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.replicas is not None and args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if args.timings and args.engine != "local":
        raise ValueError("--timings is measured by the local engine only (one process or torchrun)")


def _run_description(pipe: Any, args: argparse.Namespace, rows: Sequence[Row], guidance: Any,
                     overrides: dict | None) -> dict:
    settings = {
        "preset": pipe.preset.name,
        "num_inference_steps": int(args.steps if args.steps is not None else pipe.preset.num_inference_steps),
        "guidance": _guidance_dict(guidance),
        "images_per_prompt": args.images_per_prompt,
        "seed": args.seed,
        "overrides": overrides,
    }
    prompts = [dataclasses.asdict(r) for r in rows]
    return {
        "format": FORMAT,
        "settings": settings,
        "models": model_info(pipe),
        "prompts": {"rows": len(rows), "sha256": _sha256_bytes(_canonical(prompts).encode())},
        "images": len(rows) * args.images_per_prompt,
        # The networks' float results change in the last bits with the batch they are computed in, so
        # the batches are part of the run: the same chunks of the image list whatever the process
        # count or the restarts (see _chunks).
        "batch_size": args.batch_size,
    }


def _chunks(items: Sequence[Item], size: int) -> list[Sequence[Item]]:
    """The run's pipeline calls: consecutive ``size``-image chunks of the whole image list. Processes
    take every ``world``-th chunk and a restart redoes whole chunks, so each image is always computed
    in the same batch and its bytes do not depend on sharding or interruptions."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def _progress(total: int, done: int, desc: str, position: int = 0) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit="img", position=position, dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Run ``batch``; returns the exit code (bad arguments and refused folders raise ``ValueError``)."""
    from .pipelines.cli import check_guided_steps, guidance_overrides

    _check_counts(args)
    preset, overrides = _read_overrides(args.overrides, args.preset)
    rows = read_prompts(args.prompts)
    items = plan_items(rows, args.images_per_prompt, args.seed)
    # Settings come from the preset registry, so a bad knob or a refused folder costs no model load.
    view = describe_preset(preset, overrides)
    guidance = resolve_guidance(view, guidance_overrides(args))
    description = _run_description(view, args, rows, guidance, overrides)
    check_guided_steps(guidance, description["settings"]["num_inference_steps"])
    run_args = (preset, overrides, guidance, description, items)
    return _run_ray(args, *run_args) if args.engine == "ray" else _run_local(args, *run_args)


def _summary(made: int, skipped: int, seconds: float, workers: int, folder: BatchFolder, manifest: Path,
             steady: float | None = None) -> str:
    rate = made / seconds if seconds > 0 else 0.0
    extra = f" ({steady:.2f} img/s once loaded and warm)" if steady else ""
    return (f"batch: {made + skipped} images in {folder.path} ({made} made now, {skipped} already done) in "
            f"{seconds:.1f} s, {rate:.2f} img/s{extra} over {workers} worker(s); manifest: {manifest}")


def _timing_report(workers: Sequence[dict]) -> dict:
    """The run's timings from each worker's: wall time from the first start to the last finish, and the
    steady-state rate, i.e. the images made after each worker's first chunk divided by the time from the
    earliest end of a first chunk to the last finish (model loading and warm-up excluded; a worker that
    lags only lowers the rate)."""
    starts = [w["steady_start"] for w in workers if "steady_start" in w]
    steady_images = sum(w["steady_images"] for w in workers)
    steady_s = max(w["end"] for w in workers) - min(starts) if starts else 0.0
    return {
        "workers": list(workers),
        "images_made": sum(w["made"] for w in workers),
        "images_skipped": sum(w["skipped"] for w in workers),
        "seconds": max(w["end"] for w in workers) - min(w["start"] for w in workers),
        "load_seconds": max(w["loaded"] - w["start"] for w in workers),
        "steady_images": steady_images,
        "steady_seconds": steady_s,
        "steady_images_per_s": steady_images / steady_s if steady_images and steady_s > 0 else None,
    }


def _run_local(args: argparse.Namespace, preset: str, overrides: dict | None, guidance: Any, description: dict,
               items: list[Item]) -> int:
    import torch

    dist = _Dist.from_env()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and dist.world > 1:
        device = f"cuda:{dist.local_rank}"  # one GPU per torchrun process
    steps = description["settings"]["num_inference_steps"]
    folder = BatchFolder(args.out)
    dist.init()
    try:
        error = None
        if dist.rank == 0:
            try:
                folder.prepare(description)
                folder.verify(folder.records(), items)
            except BatchFolderError as err:
                error = str(err)
        error = dist.broadcast(error)
        if error:
            raise BatchFolderError(error)
        done = folder.records()
        mine = [c for j, c in enumerate(_chunks(items, args.batch_size)) if j % dist.world == dist.rank]
        total = sum(len(c) for c in mine)
        todo = [c for c in mine if any(it.key not in done for it in c)]
        missing = sum(1 for c in todo for it in c if it.key not in done)
        desc = f"rank {dist.rank}/{dist.world}" if dist.world > 1 else "batch"
        timing = {"rank": dist.rank, "device": device, "made": missing, "skipped": total - missing,
                  "start": time.time()}
        pipe = load_pipeline(preset, device, overrides) if todo else None
        timing["loaded"] = time.time()
        bar = _progress(total, total - missing, desc, dist.rank)
        steady = None
        # Where this process's time goes: pipeline calls (noise, networks, PIL images) and waiting for
        # the writer pool (encoding, writes, syncfs and journal beyond what overlaps the next call).
        timing["generate_seconds"] = timing["write_wait_seconds"] = 0.0
        try:
            with _ChunkWriter(folder, done, description) as writer:
                for chunk in todo:
                    t = time.perf_counter()
                    images = generate_images(pipe, chunk, guidance, steps)
                    timing["generate_seconds"] += time.perf_counter() - t
                    if steady is None:
                        # Steady state starts once the first chunk is out: CUDA context, kernel selection and
                        # caches are warm from here on (the first chunk's writes still fall inside the window).
                        timing["steady_start"], steady = time.time(), 0
                    else:
                        steady += sum(1 for it in chunk if it.key not in done)
                    t = time.perf_counter()
                    bar.update(writer.submit(zip(chunk, images)))
                    timing["write_wait_seconds"] += time.perf_counter() - t
                t = time.perf_counter()
                bar.update(writer.drain())
                timing["write_wait_seconds"] += time.perf_counter() - t
        finally:
            bar.close()
        timing["end"], timing["steady_images"] = time.time(), steady or 0
        timings = dist.gather(timing)
        if dist.rank == 0:
            manifest = folder.merge(items)
            report = _timing_report(timings)
            print(_summary(report["images_made"], report["images_skipped"], report["seconds"], dist.world, folder,
                           manifest, report["steady_images_per_s"]))
            if args.timings:
                _write_atomic(Path(args.timings), (json.dumps(report, indent=2) + "\n").encode())
        dist.gather(None)  # ranks leave after the manifest exists
    finally:
        dist.close()
    return 0


# --------------------------------------------------------------------------------------------
# Ray engine
# --------------------------------------------------------------------------------------------


class _RayGenerator:
    """A Ray Data actor: one model replica, turning batches of items into PNG bytes."""

    def __init__(self, preset: str, overrides: dict | None, guidance: dict | None, steps: int | None):
        import torch

        from .guidance import TeacherGuidance

        # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU; on a CPU cluster with logical GPUs
        # there is no CUDA and the replica runs on the CPU.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(preset, self.device, overrides)
        self.guidance = TeacherGuidance(**guidance) if guidance is not None else None
        self.steps = steps

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"item": [], "png": []}
        for chunk in batch["chunk"]:  # one chunk (pipeline batch) per row, as the local engine makes them
            items = [Item(**d) for d in json.loads(chunk)]
            out["png"] += generate_items(self.pipe, items, self.guidance, self.steps)
            out["item"] += [json.dumps(dataclasses.asdict(it)) for it in items]
        return out


def _run_ray(args: argparse.Namespace, preset: str, overrides: dict | None, guidance: Any, description: dict,
             items: list[Item]) -> int:
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise ValueError(f"--engine ray needs Ray: pip install 'distillpp[ray]' ({err})") from None
    folder = BatchFolder(args.out)
    folder.prepare(description)
    done = folder.records()
    folder.verify(done, items)
    todo = [c for c in _chunks(items, args.batch_size) if any(it.key not in done for it in c)]
    missing = sum(1 for c in todo for it in c if it.key not in done)
    replicas = per_replica = 0
    if todo:
        if not ray.is_initialized():
            ray.init(address=args.ray_address)
        gpus = ray.cluster_resources().get("GPU", 0)
        per_replica = args.gpus_per_replica if args.gpus_per_replica is not None else (1 if gpus else 0)
        replicas = args.replicas or max(1, int(gpus // per_replica) if per_replica else 1)
    t0 = time.perf_counter()
    bar = _progress(len(items), len(items) - missing, f"ray x{replicas}")
    try:
        with _ChunkWriter(folder, done, description) as writer:
            if todo:
                ds = ray.data.from_items([{"chunk": json.dumps([dataclasses.asdict(it) for it in c])} for c in todo])
                out = ds.map_batches(
                    # A fixed pool of ``replicas`` actors. ``compute=`` works from Ray 2.9 on; ``concurrency=``
                    # (2.9-2.50) is deprecated since 2.51.
                    _RayGenerator, batch_size=1, num_gpus=per_replica,
                    compute=ray.data.ActorPoolStrategy(size=replicas),
                    fn_constructor_kwargs={"preset": preset, "overrides": overrides,
                                           "guidance": _guidance_dict(guidance),
                                           "steps": description["settings"]["num_inference_steps"]},
                )
                for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
                    made = ((Item(**json.loads(raw)), bytes(png)) for raw, png in zip(batch["item"], batch["png"]))
                    bar.update(writer.submit(made))
                bar.update(writer.drain())
    finally:
        bar.close()
    manifest = folder.merge(items)
    print(_summary(missing, len(items) - missing, time.perf_counter() - t0, replicas, folder, manifest))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distillpp.batch`` (what ``torchrun`` launches)."""
    from .cli import main as cli_main

    return cli_main(["batch", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
