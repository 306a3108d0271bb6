"""LINet: the latent inpainting diffusion network (MONAI ``DiffusionModelUNet`` on VQ latents, 3D).

Input: the masked-noised latent (noise only inside the resized lesion mask, clean outside) plus the
mask channel, so ``in_channels = latent_channels + 1``; the 8 image-attribute phrases enter through
cross-attention.
"""

from __future__ import annotations

import copy
from typing import Any

from monai.networks.nets import DiffusionModelUNet

from ..errors import BundleError
from .lmnet import build_unet

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "spatial_dims": 3,
        "channels": [16, 32, 32],
        # text cross-attention at every level: at the coarsest level alone (2^3 cells for a 16^3
        # crop) the prompt can only shift the whole crop, and a short run never learned to confine
        # the density change to the lesion (toy benchmark with v prediction, hyperdense minus
        # hypodense: coarsest level only +0.0 HU, lower two levels +0.0 HU, all levels +75 HU;
        # docs/pretraining.md section 6). Costs 5.6x per LINet step at a 16^3 latent on CPU.
        "attention_levels": [True, True, True],
        "num_res_blocks": 1,
        "num_head_channels": 16,
        "norm_num_groups": 8,
        "with_conditioning": True,
        "transformer_num_layers": 1,
        "use_flash_attention": True,
    },
    "paper": {
        "spatial_dims": 3,
        "channels": [64, 128, 256, 256],
        "attention_levels": [False, False, True, True],
        "num_res_blocks": 2,
        "num_head_channels": 32,
        "norm_num_groups": 32,
        "with_conditioning": True,
        "transformer_num_layers": 1,
        "use_flash_attention": True,
    },
}


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
