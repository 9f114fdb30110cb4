"""The zoo's networks and how they are stored.

Every diffusion model is a class-conditional ``UNet2DModel`` (1 x 32 x 32, 11 class embeddings:
the ten Fashion-MNIST classes and the null label 10 for classifier-free guidance). The classifier
is a small VGG-style CNN that is also a diffusers ``ModelMixin``, so both load with
``from_pretrained``. Weights are stored as fp16 safetensors next to ``config.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import save_file
from torch import nn

__all__ = [
    "UNET_CONFIG",
    "TINY_UNET_CONFIG",
    "WEIGHTS_NAME",
    "make_unet",
    "ZooClassifier",
    "save_weights",
    "write_json",
    "vp_scheduler_config",
    "flow_scheduler_config",
    "fp32_output",
]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# About 2.74M parameters (5.5 MB in fp16): five of them plus the classifier stay under 32 MiB.
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=32,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    attention_head_dim=32,
    norm_num_groups=8,
    num_class_embeds=11,
)

# For CPU tests: the same architecture, a few thousand parameters.
TINY_UNET_CONFIG: dict[str, Any] = dict(UNET_CONFIG, block_out_channels=(8, 16, 16), attention_head_dim=8,
                                        norm_num_groups=4)


def make_unet(tiny: bool = False) -> UNet2DModel:
    """A freshly initialised zoo UNet (``tiny`` for tests)."""
    return UNet2DModel(**(TINY_UNET_CONFIG if tiny else UNET_CONFIG))


class _FP32Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float())


def fp32_output(unet: UNet2DModel) -> UNet2DModel:
    """Run the UNet's last convolution in float32 under autocast.

    Distillation losses live in x0 space. For eps-prediction ``x0 = x - sigma * eps`` multiplies
    the output by up to sigma = 157 (the linear schedule's top), so bf16 rounding of the output
    (2^-8) alone would put errors of ~0.5 into x0; v-prediction is well conditioned, and the
    float32 head costs next to nothing either way. Swapping the class keeps the state dict and
    ``deepcopy`` (EMA copies) intact.
    """
    unet.conv_out.__class__ = _FP32Conv2d
    return unet


class ZooClassifier(ModelMixin, ConfigMixin):
    """Fashion-MNIST classifier: three VGG blocks (conv-BN-ReLU x2, max-pool), a hidden layer, logits.

    Input: ``[B, 1, 32, 32]`` images in [-1, 1]. :meth:`features` returns the hidden layer (the
    penultimate activations, used for a Frechet distance); :meth:`forward` the 10 logits.

    Args:
        in_channels: image channels.
        num_classes: number of classes.
        channels: width of each of the three blocks.
        hidden_size: size of the penultimate (feature) layer.
        sample_size: input height and width.
        dropout_rate: dropout before the last layer (training only).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: tuple[int, ...] = (32, 64, 128),
        hidden_size: int = 256,
        sample_size: int = 32,
        dropout_rate: float = 0.3,
    ):
        super().__init__()
        # Module names must differ from the config keys (ConfigMixin sets those as attributes).
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in channels:
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                c_in = c
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        side = sample_size // 2 ** len(channels)
        self.penultimate = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * side * side, hidden_size), nn.ReLU(inplace=True)
        )
        self.drop = nn.Dropout(dropout_rate)
        self.head = nn.Linear(hidden_size, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[B, hidden_size]``."""
        return self.penultimate(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.head(self.drop(self.features(x)))


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write JSON atomically (a killed run never leaves half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_weights(model: ModelMixin, folder: str | os.PathLike) -> None:
    """Save ``model`` in diffusers format (``config.json`` + fp16 safetensors), atomically.

    Floating-point tensors are stored in fp16 (integer buffers such as BatchNorm's counter keep
    their dtype); ``from_pretrained(folder, torch_dtype=...)`` loads them back in any dtype.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, folder / WEIGHTS_NAME)
    write_json(folder / "config.json", json.loads(model.to_json_string()))


def vp_scheduler_config(kind: str = "ddim", **extra: Any) -> dict[str, Any]:
    """The zoo's discrete VP schedule as a diffusers scheduler config (DDPM linear betas)."""
    config: dict[str, Any] = {
        "_class_name": {"ddim": "DDIMScheduler", "lcm": "LCMScheduler"}[kind],
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "timestep_spacing": "trailing",
    }
    if kind == "lcm":
        config.update(original_inference_steps=50, timestep_spacing="leading")
    config.update(extra)
    return config


def flow_scheduler_config(**extra: Any) -> dict[str, Any]:
    """The flow models' scheduler config (the zoo samples them on a uniform flow-time grid)."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0, **extra}
