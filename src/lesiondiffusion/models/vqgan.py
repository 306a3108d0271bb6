"""VQ-GAN of LesionDiffusion: MONAI ``VQVAE`` (2x spatial downsampling, 2048-entry codebook) plus the
``PatchDiscriminator`` used only in training, with presets as data and the HU <-> [-1, 1] mapping.

The latent grid (4 channels at half resolution by default) is where LINet inpaints lesions.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from monai.networks.nets import PatchDiscriminator, VQVAE

from ..errors import BundleError

# Only the first level downsamples (stride 2); the paper preset adds a stride-1 level for capacity
# without shrinking the latent grid further: the method's latent is exactly half the image size.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
        "channels": [16],
        "num_res_layers": 1,
        "num_res_channels": [16],
        "downsample_parameters": [[2, 4, 1, 1]],
        "upsample_parameters": [[2, 4, 1, 1, 0]],
        "num_embeddings": 2048,
        "embedding_dim": 4,
    },
    "paper": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
        "channels": [64, 128],
        "num_res_layers": 2,
        "num_res_channels": [64, 128],
        "downsample_parameters": [[2, 4, 1, 1], [1, 3, 1, 1]],
        "upsample_parameters": [[1, 3, 1, 1, 0], [2, 4, 1, 1, 0]],
        "num_embeddings": 2048,
        "embedding_dim": 4,
    },
}

DISCRIMINATOR_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"spatial_dims": 3, "in_channels": 1, "channels": 8, "num_layers_d": 2},
    "paper": {"spatial_dims": 3, "in_channels": 1, "channels": 64, "num_layers_d": 3},
}


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise BundleError(f"unknown VQ-GAN preset {name!r}; choose one of {sorted(PRESETS)}.")
    return copy.deepcopy(PRESETS[name])


def _tuples(kwargs: dict[str, Any]) -> dict[str, Any]:
    # YAML stores lists; MONAI expects tuples for the (stride, kernel, ...) parameter groups
    out = dict(kwargs)
    for key in ("channels", "num_res_channels"):
        if key in out and isinstance(out[key], list):
            out[key] = tuple(out[key])
    for key in ("downsample_parameters", "upsample_parameters"):
        if key in out:
            out[key] = tuple(tuple(p) for p in out[key])
    return out


def build_vqgan(kwargs: dict[str, Any]) -> VQVAE:
    return VQVAE(**_tuples(kwargs))


def build_discriminator(kwargs: dict[str, Any]) -> PatchDiscriminator:
    return PatchDiscriminator(**kwargs)


def downsample_factor(kwargs: dict[str, Any]) -> int:
    factor = 1
    for params in kwargs["downsample_parameters"]:
        factor *= int(params[0])
    return factor


def hu_to_unit(hu: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    """HU -> [-1, 1] (values outside the window are clipped)."""
    lo, hi = window
    return ((hu.clamp(lo, hi) - lo) / (hi - lo)) * 2.0 - 1.0


def unit_to_hu(x: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    lo, hi = window
    return (x.clamp(-1.0, 1.0) + 1.0) * 0.5 * (hi - lo) + lo
