"""LMNet pretraining task: diffusion over lesion masks in lesion-centred crops, conditioned on organ
channels, the lesion box and one phrase per mask attribute the bundle lists (``conditioning.lmnet``: the
method's 6, or 8 in a bundle of the legacy split), with attribute dropout for CFG.

Loss: ``losses.lmnet_loss`` (box-weighted noise MSE, gamma = 0.001). Inputs are built with
``sampling.lmnet_inputs`` exactly as the synthesis pipeline builds them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lesiondiffusion import sampling
from lesiondiffusion.errors import BundleError
from lesiondiffusion.io import atomic_path
from lesiondiffusion.models.lmnet import size_divisor

from .common import PhraseTable, PretrainOptions, dataset_phrases, run_pretraining
from .datasets import LesionCropDataset
from .engine import Engine, Task
from .losses import drop_attributes, lmnet_loss
from .prepare import Manifest

log = logging.getLogger(__name__)


@dataclass
class DiffusionTaskConfig:
    """Settings shared by the LMNet and LINet tasks."""

    crop: tuple[int, int, int] = (16, 16, 16)
    gamma: float = 1e-3              # LMNet: weight of the whole-crop term
    p_token: float = 0.1             # per-attribute dropout (token -> null vector)
    p_all: float = 0.1               # whole-context dropout (unconditional branch of CFG)
    preview_items: int = 2


class LMNetTask(Task):
    name = "lmnet"

    def __init__(self, lmnet: torch.nn.Module, manifest: Manifest, phrases: PhraseTable,
                 schedule: sampling.ScheduleConfig, cfg: DiffusionTaskConfig, seed: int = 0) -> None:
        self.trainable = {"lmnet": lmnet}
        self.frozen = {}
        self.optim_groups = {"lmnet": ["lmnet"]}
        self.manifest = manifest
        self.phrases = phrases
        self.phrases_added = phrases.added
        self.schedule = schedule
        self.scheduler = sampling.make_train_scheduler(schedule, "lmnet")
        self.cfg = cfg
        self.seed = seed

    def dataset(self) -> LesionCropDataset:
        return LesionCropDataset(self.manifest, self.cfg.crop, self.phrases.index, kind="mask", seed=self.seed)

    @staticmethod
    def conditions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return sampling.organ_semantics(batch["organ_labels"]), batch["organ"], batch["box"]

    def step(self, batch: dict[str, torch.Tensor], engine: Engine) -> dict[str, float]:
        x0 = sampling.mask_to_unit(batch["lesion"])
        sem, organ, box = self.conditions(batch)
        ctx = drop_attributes(self.phrases.context(batch["phrase_ids"]), self.cfg.p_token, self.cfg.p_all)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.scheduler.num_train_timesteps, (x0.shape[0],), device=x0.device)
        xt = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
        with engine.autocast():
            pred = engine.models["lmnet"](sampling.lmnet_inputs(xt, sem, organ, box), timesteps=t, context=ctx)
        loss = lmnet_loss(sampling.training_target(self.scheduler, x0, noise, t), pred, box, self.cfg.gamma)
        gnorm = engine.optimize("lmnet", loss)
        return {"loss": float(loss.detach()), "gnorm": gnorm}

    @torch.no_grad()
    def generate(self, engine: Engine, batch: dict[str, torch.Tensor], context: torch.Tensor, seed: int,
                 guidance: float | None = None, steps: int | None = None) -> torch.Tensor:
        """Sample {0,1} masks for the conditions of ``batch`` and the given text context (DDIM + CFG).

        Uses a private generator, so previews never touch the training RNG stream (exact resume).
        """
        dev = engine.device
        sem, organ, box = (c.to(dev) for c in self.conditions(batch))
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(tuple(box.shape), generator=gen).to(dev)
        sched = sampling.make_ddim(self.schedule, "lmnet", steps=steps)
        model = engine.model_for_export("lmnet")
        with engine.autocast():
            x = sampling.sample_mask(model, torch.cat([sem, organ, box], 1), context.to(dev), sched, noise,
                                     guidance_scale=self.schedule.guidance_scale if guidance is None else guidance)
        return (x.float() > 0).float()

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
        gen = self.generate(engine, batch, ctx, seed=self.seed).cpu().numpy()
        n = gen.shape[0]
        fig, axes = plt.subplots(n, 2, figsize=(5, 2.5 * n), squeeze=False)
        for i in range(n):
            idx = int(batch["index"][i])
            shape = self.manifest.lesions[idx]["report"].get("shape", "?")
            z = int(np.argmax(batch["lesion"][i, 0].sum((0, 1)).numpy()))  # slice with most lesion
            for j, (m, title) in enumerate(((batch["lesion"][i, 0].numpy(), f"real ({shape})"), (gen[i, 0], "generated"))):
                axes[i, j].imshow(batch["organ"][i, 0, :, :, z].numpy().T * 0.3 + m[:, :, z].T, cmap="magma",
                                  vmin=0, vmax=1.3, origin="lower")
                axes[i, j].set_title(title, fontsize=8)
                axes[i, j].axis("off")
        fig.suptitle(f"LMNet step {engine.step}", fontsize=9)
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=80)
        plt.close(fig)


def diffusion_config(crop: Any, opts: PretrainOptions) -> DiffusionTaskConfig:
    keys = {k: v for k, v in opts.extra.items() if k in DiffusionTaskConfig.__dataclass_fields__ and k != "crop"}
    return DiffusionTaskConfig(crop=tuple(int(c) for c in crop), **keys)


def check_crop(bundle: Any, net: str, crop: tuple[int, ...], factor: int) -> None:
    """The UNet halves the input once per level: the crop (over ``factor``, the VQ downsampling for
    LINet) must divide by 2^(levels-1), or the skip connections do not line up."""
    div = size_divisor(getattr(bundle.config, net)) * factor
    if any(c % div for c in crop):
        key = "lmnet_size" if net == "lmnet" else "linet_size"
        fixed = [int(-(-c // div) * div) for c in crop]
        raise BundleError(f"{bundle.path}/config.yaml: crop.{key} = {list(crop)} must be a multiple of {div} "
                          f"for this {net} ({len(getattr(bundle.config, net)['channels'])} levels); use {fixed}.")


def build_task(bundle: Any, manifest: Manifest, opts: PretrainOptions) -> LMNetTask:
    table = PhraseTable(bundle, dataset_phrases(manifest, "mask"))
    cfg = diffusion_config(bundle.config.crop.lmnet_size, opts)
    check_crop(bundle, "lmnet", cfg.crop, 1)
    return LMNetTask(bundle.lmnet, manifest, table, bundle.config.schedule, cfg, seed=opts.train.seed)


def train(opts: PretrainOptions) -> dict[str, Any]:
    """Train LMNet and write it into ``opts.bundle_path``."""
    return run_pretraining(opts, build_task, "lmnet")
