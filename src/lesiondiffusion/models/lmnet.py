"""LMNet: the lesion-mask diffusion network (MONAI ``DiffusionModelUNet``, voxel space, 3D).

Input channels (``LMNET_CHANNELS``): noisy mask, organ semantics, target-organ mask, lesion box; the
8 mask-attribute phrases enter through cross-attention. Presets are data; ``build_lmnet`` builds one.
"""

from __future__ import annotations

import copy
from typing import Any

from monai.networks.nets import DiffusionModelUNet

from ..errors import BundleError

LMNET_CHANNELS = ("noisy_mask", "organ_semantics", "target_organ", "lesion_box")

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "spatial_dims": 3,
        "in_channels": len(LMNET_CHANNELS),
        "out_channels": 1,
        "channels": [16, 32, 32],
        "attention_levels": [False, False, True],
        "num_res_blocks": 1,
        "num_head_channels": 16,
        "norm_num_groups": 8,
        "with_conditioning": True,
        "transformer_num_layers": 1,
        "use_flash_attention": True,
    },
    "paper": {
        "spatial_dims": 3,
        "in_channels": len(LMNET_CHANNELS),
        "out_channels": 1,
        "channels": [32, 64, 128, 256],
        "attention_levels": [False, False, True, True],
        "num_res_blocks": 2,
        "num_head_channels": 32,
        "norm_num_groups": 32,
        "with_conditioning": True,
        "transformer_num_layers": 1,
        "use_flash_attention": True,
    },
}


def preset(name: str, cross_attention_dim: int) -> dict[str, Any]:
    if name not in PRESETS:
        raise BundleError(f"unknown LMNet preset {name!r}; choose one of {sorted(PRESETS)}.")
    kwargs = copy.deepcopy(PRESETS[name])
    kwargs["cross_attention_dim"] = int(cross_attention_dim)
    return kwargs


def build_unet(kwargs: dict[str, Any]) -> DiffusionModelUNet:
    """A conditioned ``DiffusionModelUNet`` from YAML-friendly kwargs (lists become tuples)."""
    out = dict(kwargs)
    for key in ("channels", "attention_levels", "num_res_blocks", "num_head_channels"):
        if isinstance(out.get(key), list):
            out[key] = tuple(out[key])
    return DiffusionModelUNet(**out)


def build_lmnet(kwargs: dict[str, Any]) -> DiffusionModelUNet:
    return build_unet(kwargs)


def size_divisor(kwargs: dict[str, Any]) -> int:
    """Spatial sizes must be multiples of this (one halving per level below the top)."""
    return 2 ** (len(kwargs["channels"]) - 1)
