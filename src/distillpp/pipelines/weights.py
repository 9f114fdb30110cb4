"""Weights: local folders or Hugging Face ids, never a hanging download.

A preset names the weights it needs as :class:`WeightsRef` s. :func:`check_weights` resolves them
all (local paths, then the Hugging Face cache; the network only with ``download=True``) or raises
one :class:`MissingWeightsError` that lists every missing piece and the command that fetches it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "WeightsRef", "MissingWeightsError", "offline_mode", "resolve_weights", "check_weights",
    "override_ref", "from_pretrained_variant", "load_state_dict_file", "loading_errors",
]


class MissingWeightsError(FileNotFoundError):
    """The weights a preset needs are neither local folders nor in the Hugging Face cache."""


def offline_mode() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``DIFFUSERS_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) forbids downloads."""
    for var in ("HF_HUB_OFFLINE", "DIFFUSERS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    return False


@dataclass(frozen=True)
class WeightsRef:
    """One set of weights a preset needs: a Hugging Face repo (or local path), optionally one file.

    Attributes:
        repo: Hugging Face id (``owner/name``) or a local folder/file.
        filename: a single file inside the repo (LoRA, UNet state dict); ``None`` for a whole folder.
        subfolder: subfolder of a diffusers repo (``"unet"``).
        role: what it is for, shown in errors (``"student LoRA"``, ``"teacher"``).
        allow_patterns: files of a folder repo that are needed (shown in the download hint).
    """

    repo: str
    filename: str | None = None
    subfolder: str | None = None
    role: str = ""
    allow_patterns: tuple[str, ...] = ()

    @property
    def is_local(self) -> bool:
        return os.path.exists(self.repo)

    @property
    def is_hub_id(self) -> bool:
        """Looks like a Hugging Face id (``owner/name``) rather than a filesystem path."""
        return bool(re.fullmatch(r"[\w-][\w.-]*/[\w-][\w.-]*", self.repo)) and not self.is_local

    def download_command(self) -> str:
        """The ``hf download`` command (huggingface_hub's CLI) that fetches these weights into the cache."""
        if self.filename:
            return f"hf download {self.repo} {self.filename}"
        include = (" --include " + " ".join(f'"{p}"' for p in self.allow_patterns)) if self.allow_patterns else ""
        return f"hf download {self.repo}{include}"

    def describe(self) -> str:
        what = self.repo + (f" (file {self.filename})" if self.filename else "")
        return f"{self.role}: {what}" if self.role else what


def resolve_weights(ref: WeightsRef, local_files_only: bool = True) -> str:
    """Local path of ``ref``: the folder/file itself, or the cached (or downloaded) snapshot/file.

    Raises:
        MissingWeightsError: not local and not in the cache (or downloading failed).
    """
    if ref.is_local:
        path = os.path.join(ref.repo, ref.filename) if ref.filename and os.path.isdir(ref.repo) else ref.repo
        if not os.path.exists(path):
            raise MissingWeightsError(f"{ref.describe()}: {path} does not exist")
        return path
    if not ref.is_hub_id:
        raise MissingWeightsError(
            f"{ref.describe()}: {ref.repo} is neither an existing local path nor a Hugging Face id"
        )
    local_files_only = local_files_only or offline_mode()
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if ref.filename:
            return hf_hub_download(ref.repo, ref.filename, subfolder=ref.subfolder, local_files_only=local_files_only)
        return snapshot_download(
            ref.repo, local_files_only=local_files_only, allow_patterns=list(ref.allow_patterns) or None
        )
    except Exception as e:  # huggingface_hub raises several types (LocalEntryNotFound, HTTP, OS errors)
        raise MissingWeightsError(f"{ref.describe()}: {type(e).__name__}: {e}") from e


def check_weights(refs: Sequence[WeightsRef], local_files_only: bool = True, what: str = "") -> dict[WeightsRef, str]:
    """Resolve every ref, or raise one :class:`MissingWeightsError` listing all missing ones and how to get them."""
    found: dict[WeightsRef, str] = {}
    missing: list[tuple[WeightsRef, str]] = []
    for ref in refs:
        try:
            found[ref] = resolve_weights(ref, local_files_only)
        except MissingWeightsError as e:
            missing.append((ref, str(e)))
    if missing:
        lines = [f"missing weights{' for ' + what if what else ''}:"]
        for ref, why in missing:
            lines.append(f"  - {ref.describe()}")
        lines.append("get them with (or pass local folders instead of the ids):")
        for ref, _ in missing:
            if ref.is_hub_id:
                lines.append(f"  {ref.download_command()}")
        if offline_mode():
            lines.append("(no download was attempted: HF_HUB_OFFLINE (or DIFFUSERS_OFFLINE/TRANSFORMERS_OFFLINE) "
                         "is set; unset it to let download=True / --download fetch them)")
        elif local_files_only:
            lines.append("(no download was attempted: local files only; pass download=True / --download to fetch)")
        details = [why for _, why in missing if "LocalEntryNotFound" not in why]
        if details:
            lines.append("details: " + "; ".join(details))
        raise MissingWeightsError("\n".join(lines))
    return found


def override_ref(ref: WeightsRef, value: str | None) -> WeightsRef:
    """``ref`` with its repo replaced by a local folder/file or another id (keeping the file name if present)."""
    if value is None:
        return ref
    if os.path.isfile(value):
        return WeightsRef(value, role=ref.role)
    if os.path.isdir(value) and ref.filename and not os.path.exists(os.path.join(value, ref.filename)):
        return WeightsRef(value, role=ref.role)  # a diffusers folder instead of a single file
    return WeightsRef(value, ref.filename, ref.subfolder, ref.role, ref.allow_patterns)


def from_pretrained_variant(loader: Callable[..., Any], path: str, variant: str | None, **kwargs: Any) -> Any:
    """``loader(path, variant=...)``, falling back to the default weights when the variant is absent."""
    if variant is None:
        return loader(path, **kwargs)
    try:
        return loader(path, variant=variant, **kwargs)
    except (OSError, ValueError):
        return loader(path, **kwargs)


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file (or a tensors-only torch file, loaded with ``weights_only``)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class loading_errors:  # noqa: N801 - used as a context manager, like contextlib's helpers
    """Turn an ``OSError`` raised while loading a preset into a :class:`MissingWeightsError` with the fix.

    An incomplete folder or snapshot (a missing subfolder or weights file) surfaces as ``OSError``
    from ``from_pretrained``; the user needs to know which preset and how to complete it.
    """

    def __init__(self, what: str, paths: Sequence[str], refs: Sequence[WeightsRef]):
        self.what, self.paths, self.refs = what, list(paths), list(refs)

    def __enter__(self) -> "loading_errors":
        return self

    def __exit__(self, kind: Any, err: Any, tb: Any) -> bool:
        if err is None or isinstance(err, MissingWeightsError) or not isinstance(err, OSError):
            return False
        hints = "\n".join("  " + r.download_command() for r in self.refs if r.is_hub_id)
        raise MissingWeightsError(
            f"could not load {self.what} from {', '.join(self.paths)}: {err}\nget the weights with:\n{hints}"
        ) from err
