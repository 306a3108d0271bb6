"""VQ-GAN pretraining task: MONAI VQVAE + PatchDiscriminator on random windowed CT patches.

Objective in ``losses.VQGANLoss``: L2 reconstruction + VQ commitment, plus the least-squares patch
adversarial term once ``adv_warmup_steps`` have passed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lesiondiffusion.io import atomic_path
from lesiondiffusion.models.vqgan import DISCRIMINATOR_PRESETS, build_discriminator

from .common import PretrainOptions, run_pretraining
from .datasets import VolumePatchDataset
from .engine import Engine, Task
from .losses import VQGANLoss, VQGANLossConfig
from .prepare import Manifest

log = logging.getLogger(__name__)


@dataclass
class VQGANTaskConfig:
    patch: tuple[int, int, int] = (32, 32, 32)
    loss: VQGANLossConfig = field(default_factory=VQGANLossConfig)


def default_patch(bundle: Any) -> tuple[int, int, int]:
    """Train on LINet-sized patches: the latents LINet sees come from exactly this input size."""
    return tuple(int(s) for s in bundle.config.crop.linet_size)  # type: ignore[return-value]


class VQGANTask(Task):
    name = "vqgan"

    def __init__(self, vqgan: torch.nn.Module, discriminator: torch.nn.Module, manifest: Manifest,
                 cfg: VQGANTaskConfig, seed: int = 0) -> None:
        self.trainable = {"vqgan": vqgan, "disc": discriminator}
        self.frozen = {}
        self.optim_groups = {"g": ["vqgan"], "d": ["disc"]}
        self.ema_modules = ["vqgan"]
        self.manifest = manifest
        self.cfg = cfg
        self.seed = seed
        self.loss = VQGANLoss(cfg.loss)
        self._preview_batch: torch.Tensor | None = None

    def dataset(self) -> VolumePatchDataset:
        return VolumePatchDataset(self.manifest, self.cfg.patch, seed=self.seed)

    def step(self, batch: dict[str, torch.Tensor], engine: Engine) -> dict[str, float]:
        x = batch["image"]
        adv_on = self.loss.adversarial_active(engine.step)
        with engine.autocast():
            recon, vq_loss = engine.models["vqgan"](x)
            fake_logits = None
            if adv_on:
                # the generator's adversarial term must not update (or all-reduce) the discriminator:
                # call the unwrapped module with its parameters frozen for this pass
                disc = engine.raw("disc")
                disc.requires_grad_(False)
                fake_logits = disc(recon)[-1]
                disc.requires_grad_(True)
            losses = self.loss.generator(x, recon, vq_loss, fake_logits, engine.step)
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["gnorm_g"] = engine.optimize("g", losses["total"])
        if adv_on:
            with engine.autocast():
                # one discriminator pass over real and fake keeps DDP to one forward per backward
                logits = engine.models["disc"](torch.cat([x, recon.detach()]))[-1]
                real, fake = logits[: x.shape[0]], logits[x.shape[0]:]
                d_loss = self.loss.discriminator(real, fake)
            out["adv_d"] = float(d_loss.detach())
            engine.optimize("d", d_loss)
        return out

    def preview_batch(self) -> torch.Tensor:
        if self._preview_batch is None:
            ds = self.dataset()
            n = min(3, len(ds))
            self._preview_batch = torch.stack([ds[i]["image"] for i in range(n)])
        return self._preview_batch

    @torch.no_grad()
    def reconstruction_error(self, engine: Engine) -> float:
        """Mean squared error on the fixed preview patches (windowed units)."""
        x = self.preview_batch().to(engine.device)
        recon, _ = engine.model_for_export("vqgan")(x)
        return float(torch.mean((recon.float() - x) ** 2))

    def preview(self, engine: Engine, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x = self.preview_batch().to(engine.device)
        recon, _ = engine.model_for_export("vqgan")(x)
        x, recon = x.float().cpu().numpy(), recon.float().cpu().numpy()
        n = x.shape[0]
        fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
        for i in range(n):
            z = x.shape[-1] // 2
            for j, (img, title) in enumerate(((x[i, 0, :, :, z], "input"), (recon[i, 0, :, :, z], "reconstruction"),
                                              (np.abs(recon[i, 0, :, :, z] - x[i, 0, :, :, z]), "|error|"))):
                axes[i, j].imshow(img.T, cmap="gray", vmin=-1 if j < 2 else 0, vmax=1, origin="lower")
                axes[i, j].set_title(title, fontsize=8)
                axes[i, j].axis("off")
        fig.suptitle(f"VQ-GAN step {engine.step}  mse {np.mean((recon - x) ** 2):.4g}", fontsize=9)
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=80)
        plt.close(fig)


def build_task(bundle: Any, manifest: Manifest, opts: PretrainOptions) -> VQGANTask:
    loss_keys = {k: v for k, v in opts.extra.items() if k in VQGANLossConfig.__dataclass_fields__}
    cfg = VQGANTaskConfig(patch=tuple(opts.extra.get("patch") or default_patch(bundle)),
                          loss=VQGANLossConfig(**loss_keys))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.train.seed + 1)
        disc = build_discriminator(dict(DISCRIMINATOR_PRESETS[bundle.config.preset]))
    return VQGANTask(bundle.vqgan, disc, manifest, cfg, seed=opts.train.seed)


def train(opts: PretrainOptions) -> dict[str, Any]:
    """Train the VQ-GAN and write it into ``opts.bundle_path``."""
    return run_pretraining(opts, build_task, "vqgan")
