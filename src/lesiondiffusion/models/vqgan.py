"""VQ-GAN of LesionDiffusion: MONAI ``VQVAE`` (2x spatial downsampling, 2048-entry codebook) plus the
``PatchDiscriminator`` used only in training, with presets as data and the HU <-> [-1, 1] mapping.

The latent grid (4 channels at half resolution by default) is where LINet inpaints lesions.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.nets import PatchDiscriminator, VQVAE

from .. import presets
from ..errors import BundleError

# MONAI VQVAE / PatchDiscriminator arguments per preset, from the one table (``presets``, with each value's
# source); only the first level downsamples, so the latent is exactly half the image size (the method's 2x)
PRESETS: dict[str, dict[str, Any]] = {name: presets.section(name, "vqgan") for name in presets.NAMES}
DISCRIMINATOR_PRESETS: dict[str, dict[str, Any]] = {name: presets.section(name, "discriminator") for name in presets.NAMES}


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


@dataclass(frozen=True)
class LatentNorm:
    """Per-channel standardisation of VQ latents before LINet sees them: z_n = (z - shift) * scale.

    A VQ codebook settles wherever training puts it: the tiny toy VQ-GAN's latents have a standard
    deviation of ~0.1 per channel. Against the unit Gaussian noise of the diffusion schedule that
    makes every timestep ~100x noisier than the cosine schedule was designed for, so the lesion's
    content would only be decided in the last few sampling steps. Latent diffusion therefore rescales
    latents to unit variance (Rombach et al. 2022, "scale factor"; MONAI's
    ``LatentDiffusionInferer(scale_factor=)`` takes one global factor); here per channel, with a
    shift, because the codebook channels differ in both mean and spread. (Measured on the toy
    benchmark, it is not what made LINet follow the density prompt: v prediction and attention at
    the lesion's resolution did, with or without it; docs/pretraining.md section 6.) Fitted once on
    the training crops when LINet training starts and stored in the bundle's config.yaml; identity
    for untrained bundles.
    """

    shift: tuple[float, ...]
    scale: tuple[float, ...]

    @classmethod
    def identity(cls, channels: int) -> "LatentNorm":
        return cls((0.0,) * channels, (1.0,) * channels)

    @property
    def is_identity(self) -> bool:
        return all(s == 0.0 for s in self.shift) and all(s == 1.0 for s in self.scale)

    @classmethod
    def fit(cls, latents: torch.Tensor, eps: float = 1e-6) -> "LatentNorm":
        """Mean and 1/std per channel of latents [N, C, ...]."""
        z = latents.detach().float().transpose(0, 1).reshape(latents.shape[1], -1)
        std = z.std(dim=1).clamp_min(eps)
        return cls(tuple(float(v) for v in z.mean(dim=1)), tuple(float(v) for v in 1.0 / std))

    def _view(self, values: tuple[float, ...], z: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=z.dtype, device=z.device).view(1, -1, *([1] * (z.ndim - 2)))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._view(self.shift, z)) * self._view(self.scale, z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self._view(self.scale, z) + self._view(self.shift, z)

    def to_dict(self) -> dict[str, list[float]]:
        return {"shift": [float(v) for v in self.shift], "scale": [float(v) for v in self.scale]}

    @classmethod
    def from_dict(cls, data: Any, channels: int, source: str) -> "LatentNorm":
        fix = "delete the latent_norm section (identity) and retrain LINet, which refits it"
        if not isinstance(data, dict) or set(data) != {"shift", "scale"}:
            raise BundleError(f"{source}: latent_norm must be a mapping with keys shift and scale, found {data!r}; {fix}.")
        try:
            shift = tuple(float(v) for v in data["shift"])
            scale = tuple(float(v) for v in data["scale"])
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{source}: latent_norm values must be lists of numbers ({exc}); {fix}.") from exc
        for key, vals in (("shift", shift), ("scale", scale)):
            if len(vals) != channels:
                raise BundleError(f"{source}: latent_norm.{key} has {len(vals)} values but the VQ-GAN has "
                                  f"{channels} latent channels (vqgan.embedding_dim); {fix}.")
            if not all(math.isfinite(v) for v in vals):
                raise BundleError(f"{source}: latent_norm.{key}={list(vals)} contains NaN/inf; {fix}.")
        if min(scale) <= 0:
            raise BundleError(f"{source}: latent_norm.scale={list(scale)} must be positive; {fix}.")
        return cls(shift, scale)
