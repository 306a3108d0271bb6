"""LINet: the latent inpainting diffusion network (MONAI ``DiffusionModelUNet`` on VQ latents, 3D).

Input: the masked-noised latent (noise only inside the resized lesion mask, clean outside) plus the
mask channel, so ``in_channels = latent_channels + 1``; one phrase per image attribute enters through
cross-attention (5 with the method's split, ``bundle.METHOD_CONDITIONING``; 8 in bundles of the legacy split).
"""

from __future__ import annotations

import copy
from typing import Any

from monai.networks.nets import DiffusionModelUNet

from .. import presets
from ..errors import BundleError
from .lmnet import build_unet

# MONAI DiffusionModelUNet arguments per preset (channels in/out follow the latent), from the one table
# (``presets``, with each value's source)
PRESETS: dict[str, dict[str, Any]] = {name: presets.section(name, "linet") for name in presets.NAMES}


def preset(name: str, latent_channels: int, cross_attention_dim: int) -> dict[str, Any]:
    if name not in PRESETS:
        raise BundleError(f"unknown LINet preset {name!r}; choose one of {sorted(PRESETS)}.")
    kwargs = copy.deepcopy(PRESETS[name])
    kwargs["in_channels"] = int(latent_channels) + 1
    kwargs["out_channels"] = int(latent_channels)
    kwargs["cross_attention_dim"] = int(cross_attention_dim)
    return kwargs


def build_linet(kwargs: dict[str, Any]) -> DiffusionModelUNet:
    return build_unet(kwargs)
