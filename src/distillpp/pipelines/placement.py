"""Where the teacher runs: beside the student, on another device, or offloaded to CPU memory.

The wrappers take a *network* ``net(model_input, timestep, **cond)`` (what :func:`distillpp.unet_fn`
returns) rather than a denoiser, so they compose with any denoiser wrapper:

- :class:`PlacedNet`: the teacher on another device, inputs and outputs moved across;
- :class:`OffloadedNet`: the teacher's weights kept in pinned CPU memory and copied to the
  execution device only for its call.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

__all__ = ["move_to", "PlacedNet", "OffloadedNet", "place_teacher_net", "TEACHER_OFFLOAD"]

TEACHER_OFFLOAD = (None, "cpu")


def move_to(obj: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor in a nested dict/list/tuple to ``device`` (and floating tensors to ``dtype``)."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype, non_blocking=True)
        return obj.to(device=device, non_blocking=True) if device is not None else obj
    if isinstance(obj, dict):
        return {k: move_to(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device, dtype) for v in obj)
    return obj


class PlacedNet:
    """A network living on another device: inputs are moved to it, the output back.

    Args:
        net: the network on ``device``.
        device: where ``net``'s weights live (e.g. ``"cuda:1"``).
    """

    def __init__(self, net: Callable[..., torch.Tensor], device: torch.device | str):
        self.net = net
        self.device = torch.device(device)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        back = sample.device
        out = self.net(sample.to(self.device), timestep.to(self.device), **move_to(cond, self.device))
        return out.to(back)


class OffloadedNet:
    """A network whose weights stay in (pinned) CPU memory and visit the execution device per call.

    Only host-to-device copies happen: the CPU copy is kept, so returning the weights is a
    pointer swap. Pinned memory makes the copy run at full PCIe/NVLink-C2C bandwidth.

    Args:
        net: the network over ``module``.
        module: its ``torch.nn.Module`` (moved to CPU here).
        execution_device: where the call runs (the student's device).
        pin_memory: pin the CPU copy (only with CUDA available).
    """

    def __init__(
        self,
        net: Callable[..., torch.Tensor],
        module: torch.nn.Module,
        execution_device: torch.device | str,
        pin_memory: bool = True,
    ):
        self.net = net
        self.module = module.to("cpu")
        self.execution_device = torch.device(execution_device)
        pin = pin_memory and torch.cuda.is_available() and self.execution_device.type == "cuda"
        self._tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        for t in list(module.parameters()) + list(module.buffers()):
            host = t.data.pin_memory() if pin else t.data
            t.data = host
            self._tensors.append((t, host))

    @contextlib.contextmanager
    def onloaded(self) -> Iterator[None]:
        """Context with the weights on the execution device."""
        for t, host in self._tensors:
            t.data = host.to(self.execution_device, non_blocking=True)
        try:
            yield
        finally:
            for t, host in self._tensors:
                t.data = host

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        with self.onloaded():
            return self.net(sample, timestep, **cond)


def place_teacher_net(
    net: Callable[..., torch.Tensor],
    module: torch.nn.Module,
    execution_device: torch.device | str,
    teacher_device: torch.device | str | None = None,
    teacher_offload: str | None = None,
) -> Callable[..., torch.Tensor]:
    """Wrap a separate teacher network for its placement.

    Args:
        net: the teacher network ``net(model_input, timestep, **cond)``.
        module: its ``torch.nn.Module``.
        execution_device: the student's device.
        teacher_device: keep the teacher on this device (default: the student's); inputs and outputs
            are moved across.
        teacher_offload: ``"cpu"``: keep the teacher in CPU memory and copy it to ``execution_device``
            for each call.

    Raises:
        ValueError: both placements given, or an unknown ``teacher_offload``.
    """
    if teacher_offload is not None and teacher_offload != "cpu":
        raise ValueError(f"teacher_offload must be None or 'cpu', got {teacher_offload!r}")
    if teacher_offload is not None and teacher_device is not None:
        raise ValueError("give teacher_device or teacher_offload, not both")
    execution_device = torch.device(execution_device)
    if teacher_offload == "cpu":
        return OffloadedNet(net, module, execution_device)
    device = torch.device(teacher_device) if teacher_device is not None else execution_device
    module.to(device)
    if device != execution_device:
        return PlacedNet(net, device)
    return net
