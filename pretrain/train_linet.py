"""LINet pretraining task: masked latent diffusion on the frozen VQ-GAN's latents of lesion crops,
conditioned on one phrase per image attribute the bundle lists (``conditioning.linet``: the method's 5, or
8 in a bundle of the legacy split), with attribute dropout for CFG.

Loss: ``losses.linet_loss`` (L1 on the target inside the latent lesion box B', normalised by |B'|; the
target is the noise, or the velocity for ``schedule.linet_prediction: v_prediction``).
Noising and inputs use ``sampling.masked_add_noise`` / ``sampling.linet_inputs`` as synthesis does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lesiondiffusion import sampling
from lesiondiffusion.io import atomic_path
from lesiondiffusion.models.vqgan import LatentNorm

from .common import PhraseTable, PretrainOptions, dataset_phrases, run_pretraining
from .datasets import LesionCropDataset
from .engine import Engine, Task
from .losses import drop_attributes, linet_loss
from .prepare import Manifest, unwindow
from .train_lmnet import DiffusionTaskConfig, check_crop, diffusion_config

log = logging.getLogger(__name__)


class LINetTask(Task):
    name = "linet"

    def __init__(self, linet: torch.nn.Module, vqgan: torch.nn.Module, manifest: Manifest, phrases: PhraseTable,
                 schedule: sampling.ScheduleConfig, cfg: DiffusionTaskConfig, hu_window: tuple[float, float],
                 seed: int = 0, latent_norm: LatentNorm | None = None, on_fit: Callable[[LatentNorm], None] | None = None,
                 norm_items: int = 32) -> None:
        self.trainable = {"linet": linet}
        self.frozen = {"vqgan": vqgan}
        self.optim_groups = {"linet": ["linet"]}
        self.manifest = manifest
        self.phrases = phrases
        self.phrases_added = phrases.added
        self.schedule = schedule
        self.scheduler = sampling.make_train_scheduler(schedule, "linet")
        self.cfg = cfg
        self.hu_window = hu_window
        self.seed = seed
        # None: fitted on the frozen VQ-GAN's latents at the first step (on the training device), then
        # handed to ``on_fit`` so it is written into the bundle with LINet. Deterministic (fixed crops),
        # so a resumed run refits the same values.
        self.latent_norm = latent_norm
        self.on_fit = on_fit
        self.norm_items = norm_items

    def dataset(self) -> LesionCropDataset:
        return LesionCropDataset(self.manifest, self.cfg.crop, self.phrases.index, kind="image", seed=self.seed)

    @torch.no_grad()
    def fit_latent_norm(self, device: torch.device, batch: int = 4) -> LatentNorm:
        """Per-channel mean/std of the frozen VQ-GAN's latents over fixed training crops."""
        ds = LesionCropDataset(self.manifest, self.cfg.crop, self.phrases.index, kind="image", seed=self.seed)
        picks = np.linspace(0, len(ds) - 1, num=min(self.norm_items, len(ds))).round().astype(int)
        vq = self.frozen["vqgan"]
        zs = [vq.encode_stage_2_inputs(torch.stack([ds[int(i)]["image"] for i in picks[k:k + batch]]).to(device)).float()
              for k in range(0, len(picks), batch)]
        norm = LatentNorm.fit(torch.cat(zs))
        log.info("LINet latent standardisation fitted on %d crops: shift %s, scale %s", len(picks),
                 [round(v, 4) for v in norm.shift], [round(v, 3) for v in norm.scale])
        return norm

    def norm(self, device: torch.device) -> LatentNorm:
        if self.latent_norm is None:
            self.latent_norm = self.fit_latent_norm(device)
            if self.on_fit is not None:
                self.on_fit(self.latent_norm)
        return self.latent_norm

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Quantised latent of the frozen VQ-GAN, standardised for LINet (``LatentNorm``)."""
        z = self.frozen["vqgan"].encode_stage_2_inputs(image).float()
        return self.norm(z.device).normalize(z)

    def latent_masks(self, batch: dict[str, torch.Tensor], latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        return (sampling.latent_mask(batch["lesion"], latent_shape),
                sampling.latent_mask(batch["box"], latent_shape))

    def step(self, batch: dict[str, torch.Tensor], engine: Engine) -> dict[str, float]:
        with engine.autocast():
            z0 = self.encode(batch["image"])
        m, box = self.latent_masks(batch, tuple(z0.shape[2:]))
        ctx = drop_attributes(self.phrases.context(batch["phrase_ids"]), self.cfg.p_token, self.cfg.p_all)
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.scheduler.num_train_timesteps, (z0.shape[0],), device=z0.device)
        zt = sampling.masked_add_noise(self.scheduler, z0, noise, m, t)
        with engine.autocast():
            pred = engine.models["linet"](sampling.linet_inputs(zt, m), timesteps=t, context=ctx)
        loss = linet_loss(sampling.training_target(self.scheduler, z0, noise, t), pred, box)
        gnorm = engine.optimize("linet", loss)
        return {"loss": float(loss.detach()), "gnorm": gnorm}

    @torch.no_grad()
    def inpaint(self, engine: Engine, image: torch.Tensor, mask: torch.Tensor, context: torch.Tensor, seed: int,
                guidance: float | None = None, steps: int | None = None) -> torch.Tensor:
        """Inpaint ``mask`` of windowed ``image`` crops for ``context``; returns the decoded crop in HU
        (outside the mask the input is kept exactly, as the pipeline's blend does)."""
        dev = engine.device
        image, mask = image.to(dev), mask.to(dev)
        with engine.autocast():
            z0 = self.encode(image)
        m = sampling.latent_mask(mask, tuple(z0.shape[2:]))
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(tuple(z0.shape), generator=gen).to(dev)
        # as the pipeline does: clamp predicted latents to the codebook's range (see sampling.make_ddim)
        norm = self.norm(dev)
        sched = sampling.make_ddim(self.schedule, "linet", steps=steps, clip_range=sampling.codebook_range(self.frozen["vqgan"], norm))
        with engine.autocast():
            z = sampling.inpaint_latent(engine.model_for_export("linet"), z0, m, context.to(dev), sched, noise,
                                        guidance_scale=self.schedule.guidance_scale if guidance is None else guidance)
            dec = self.frozen["vqgan"].decode_stage_2_outputs(norm.denormalize(z.float())).float().clamp(-1, 1)
        out = dec * mask + image * (1 - mask)
        return unwindow(out, self.hu_window)

    def preview_batch(self) -> dict[str, torch.Tensor]:
        ds = self.dataset()
        items = [ds[i] for i in range(min(self.cfg.preview_items, len(ds)))]
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def preview(self, engine: Engine, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        batch = self.preview_batch()
        ctx = self.phrases.context(batch["phrase_ids"])
        hu = self.inpaint(engine, batch["image"], batch["lesion"], ctx, seed=self.seed).cpu().numpy()
        real = unwindow(batch["image"].numpy(), self.hu_window)
        n = hu.shape[0]
        fig, axes = plt.subplots(n, 2, figsize=(5, 2.5 * n), squeeze=False)
        for i in range(n):
            les = batch["lesion"][i, 0].numpy() > 0
            z = int(np.argmax(les.sum((0, 1))))
            dens = self.manifest.lesions[int(batch["index"][i])]["report"].get("density", "?")
            for j, (img, title) in enumerate(((real[i, 0], f"real ({dens}) {real[i, 0][les].mean():.0f} HU"),
                                              (hu[i, 0], f"inpainted {hu[i, 0][les].mean():.0f} HU"))):
                axes[i, j].imshow(img[:, :, z].T, cmap="gray", vmin=-200, vmax=250, origin="lower")
                axes[i, j].contour(les[:, :, z].T, levels=[0.5], colors="r", linewidths=0.5)
                axes[i, j].set_title(title, fontsize=8)
                axes[i, j].axis("off")
        fig.suptitle(f"LINet step {engine.step}", fontsize=9)
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=80)
        plt.close(fig)


def build_task(bundle: Any, manifest: Manifest, opts: PretrainOptions) -> LINetTask:
    if "vqgan" not in bundle.config.notes:
        log.warning("bundle %s has an untrained (random) VQ-GAN; run `lesiondiffusion pretrain vqgan` first "
                    "or LINet learns to inpaint meaningless latents", opts.bundle_path)
    table = PhraseTable(bundle, dataset_phrases(manifest, "image"))
    cfg = diffusion_config(bundle.config.crop.linet_size, opts)
    check_crop(bundle, "linet", cfg.crop, bundle.config.vq_factor)
    # continuing a trained LINet keeps the standardisation it was trained with; otherwise fit it anew
    keep = bundle.config.latent_norm if "linet" in bundle.config.notes else None

    def store(norm: LatentNorm) -> None:
        bundle.config.latent_norm = norm  # written to config.yaml together with the LINet weights

    return LINetTask(bundle.linet, bundle.vqgan, manifest, table, bundle.config.schedule, cfg,
                     tuple(bundle.config.hu_window), seed=opts.train.seed, latent_norm=keep, on_fit=store)


def train(opts: PretrainOptions) -> dict[str, Any]:
    """Train LINet on the bundle's frozen VQ-GAN and write it into ``opts.bundle_path``."""
    return run_pretraining(opts, build_task, "linet")
