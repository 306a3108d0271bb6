"""LMNet: the lesion-mask diffusion network (MONAI ``DiffusionModelUNet``, voxel space, 3D).

Input channels (``LMNET_CHANNELS``): noisy mask, organ semantics, target-organ mask, lesion box; the
8 mask-attribute phrases enter through cross-attention. Presets are data; ``build_lmnet`` builds one.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet

from ..errors import BundleError

LMNET_CHANNELS = ("noisy_mask", "organ_semantics", "target_organ", "lesion_box")

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "spatial_dims": 3,
        "in_channels": len(LMNET_CHANNELS),
        "out_channels": 1,
        "channels": [16, 32, 32],
        # text cross-attention at every level, so the shape prompt acts where the mask's outline is
        # resolved (toy benchmark, 1500 CPU steps, round-like minus irregular at the same location:
        # coarsest level only sphericity +0.025 / convexity +0.038, all levels +0.198 / +0.313 with
        # 24/24 pairs; real toy masks differ by 0.24 / 0.30; docs/pretraining.md section 6)
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


def init_attention_outputs(net: torch.nn.Module, std: float = 0.02) -> int:
    """Give the output projections of a UNet's attention blocks small random weights (returns how many).

    MONAI's ``SpatialTransformer`` zero-initialises ``proj_out`` (``zero_module``), so at the start the
    transformer, and with it the text cross-attention, adds nothing and its query/key/value weights get
    no gradient until ``proj_out`` has grown. That is harmless over 10^5 GPU steps but means a short
    run never learns to follow the prompt (measured: text effect ~6e-4 after 300 CPU steps). A small
    normal init (std 0.02, the usual transformer init) opens the text path from the first step while
    the residual branch stays small. Draws from torch's global RNG: seed it first. Used by
    ``Bundle.init(for_training=True)``; the other zero-initialised layers (residual conv2, final conv)
    stay as MONAI has them.
    """
    from monai.networks.nets.diffusion_model_unet import SpatialTransformer

    count = 0
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, SpatialTransformer):
                for p in module.proj_out.parameters():
                    if p.ndim > 1:
                        p.normal_(0.0, std)
                        count += 1
    return count
