"""The CPU recipe of the few-shot phantom benchmark and of the demo (calibrated in docs/fewshot.md).

Names: ``<base>_fewshotcpu`` for the plain nnU-Net baseline and both LesionDiffusion trainers, so one
suffix selects all three settings of a study. What changes against nnU-Net's defaults, and why:

* a small network (8..32 features, one convolution per stage): on 2 CPU cores the default network costs
  ~25 s per 3d iteration; this one ~0.07 s per 2d iteration of batch 16;
* AdamW at lr 2e-3 with nnU-Net's poly decay, 10 epochs x 50 iterations, batch 16: SGD at 1e-2 needed
  ~800 iterations before its first foreground prediction in the calibration, AdamW ~100; the batch is
  the run's whatever the dataset (nnU-Net plans 2d batches by dataset size, so K would change it);
* foreground oversampling 0.66 (nnU-Net: 0.33): phantom lesions are a few hundred voxels;
* one torch thread: nnU-Net's CPU default (one thread per core) collapsed from 0.16 to ~2 s per iteration
  on a shared 2-core machine (thread oversubscription), and two runs in parallel use the two cores;
* no mirroring at inference and no final validation on the training cases (the study scores a held-out
  test set with nnU-Net's own metric code).

The recipe is the same for every setting; only the data source differs.
"""

from __future__ import annotations

import os
import random

import numpy as np

import torch
from torch import nn

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from ..trainers import nnUNetTrainerLesionDiffusion, nnUNetTrainerLesionDiffusionSynthOnly
from .tiny_network import tiny_network


def small_network(plans_manager: PlansManager, configuration_manager: ConfigurationManager, num_input_channels: int,
                  num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
    """The plans' architecture class with 8..32 features and one convolution per stage."""
    return tiny_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                        enable_deep_supervision, base_features=8, max_features=32)


class FewShotCPURecipe:
    """Mixin (before the trainer class) with the recipe above; class attributes are the recipe as data."""

    epochs = 10
    iterations = 50
    batch = 16
    lr = 2e-3
    foreground_oversampling = 0.66
    threads = 1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        seed = os.environ.get("LESIONDIFFUSION_TRAIN_SEED")
        if seed is not None:  # a study's seed: network init, sampling and augmentation draws
            random.seed(int(seed))
            np.random.seed(int(seed))
            torch.manual_seed(int(seed))
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        self.num_epochs = self.epochs
        self.num_iterations_per_epoch = self.iterations
        self.num_val_iterations_per_epoch = 2
        self.initial_lr = self.lr
        self.oversample_foreground_percent = self.foreground_oversampling
        # initialize() takes batch_size from the plans (_set_batch_size_and_oversample), so the recipe's
        # batch goes where nnU-Net reads it; set on the trainer only, it never held, and K silently chose
        # the batch (nnU-Net plans 2d batches by dataset size: 5 for 2 sarcoma crops, 67 for 26)
        self.configuration_manager.configuration["batch_size"] = self.batch
        self.batch_size = self.batch
        self.save_every = 5

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=1e-5)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return out

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("fewshotcpu recipe: final validation skipped (the study scores a held-out test set)")

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return small_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                             enable_deep_supervision)


class nnUNetTrainer_fewshotcpu(FewShotCPURecipe, nnUNetTrainer):
    """Real data only, few-shot CPU recipe."""


class nnUNetTrainerLesionDiffusion_fewshotcpu(FewShotCPURecipe, nnUNetTrainerLesionDiffusion):
    """Synthetic pretraining then real fine-tuning, few-shot CPU recipe."""


class nnUNetTrainerLesionDiffusionSynthOnly_fewshotcpu(FewShotCPURecipe, nnUNetTrainerLesionDiffusionSynthOnly):
    """Synthetic data only, few-shot CPU recipe."""


__all__ = ["FewShotCPURecipe", "small_network", "nnUNetTrainer_fewshotcpu", "nnUNetTrainerLesionDiffusion_fewshotcpu",
           "nnUNetTrainerLesionDiffusionSynthOnly_fewshotcpu"]


class FewShotCPURecipeSmoke(FewShotCPURecipe):
    """The same recipe for 2 epochs x 3 iterations of batch 4 (CI and ``lesiondiffusion demo --fast``)."""

    epochs = 2
    iterations = 3
    batch = 4


class nnUNetTrainer_fewshotcpu_smoke(FewShotCPURecipeSmoke, nnUNetTrainer):
    """Real data only, smoke length."""


class nnUNetTrainerLesionDiffusion_fewshotcpu_smoke(FewShotCPURecipeSmoke, nnUNetTrainerLesionDiffusion):
    """Synthetic then real, smoke length."""


class nnUNetTrainerLesionDiffusionSynthOnly_fewshotcpu_smoke(FewShotCPURecipeSmoke, nnUNetTrainerLesionDiffusionSynthOnly):
    """Synthetic only, smoke length."""


__all__ += ["FewShotCPURecipeSmoke", "nnUNetTrainer_fewshotcpu_smoke", "nnUNetTrainerLesionDiffusion_fewshotcpu_smoke",
            "nnUNetTrainerLesionDiffusionSynthOnly_fewshotcpu_smoke"]
