"""LMNet: the lesion-mask diffusion network (MONAI ``DiffusionModelUNet``, voxel space, 3D).

Input channels (``LMNET_CHANNELS``): noisy mask, organ semantics, target-organ mask, lesion box; one
phrase per mask attribute enters through cross-attention (6 with the method's split,
``bundle.METHOD_CONDITIONING``; 8 in bundles of the legacy split). Presets are data (``presets``);
``build_lmnet`` builds one.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet

from .. import presets
from ..errors import BundleError

LMNET_CHANNELS = ("noisy_mask", "organ_semantics", "target_organ", "lesion_box")

# MONAI DiffusionModelUNet arguments per preset, from the one table (``presets``, with each value's source)
PRESETS: dict[str, dict[str, Any]] = {name: presets.section(name, "lmnet") for name in presets.NAMES}
assert all(p["in_channels"] == len(LMNET_CHANNELS) for p in PRESETS.values())


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
