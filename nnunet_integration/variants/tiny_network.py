"""CPU-sized trainers for tests, CI and the demo: the plans' architecture with 4..16 features and one
convolution per stage, ``E`` epochs of ``I`` iterations, one validation iteration per epoch and
inference without mirroring. Names: ``<base>_tinynet_<E>epochs_<I>iters``, for the plain nnU-Net
baseline and both LesionDiffusion trainers, so one suffix selects all three settings of a study.
They measure nothing about the method (a network this small learns little); they show that it runs.
"""

from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from ..trainers import nnUNetTrainerLesionDiffusion, nnUNetTrainerLesionDiffusionSynthOnly


def tiny_network(plans_manager: PlansManager, configuration_manager: ConfigurationManager, num_input_channels: int,
                 num_output_channels: int, enable_deep_supervision: bool = True, *, base_features: int = 4,
                 max_features: int = 16) -> nn.Module:
    """The plans' architecture class with ``base_features``..``max_features`` features (doubling per
    stage; 4..16 by default) and one conv per stage."""
    kwargs = deepcopy(configuration_manager.network_arch_init_kwargs)
    n = kwargs.get("n_stages", len(kwargs.get("features_per_stage", [])))
    kwargs["features_per_stage"] = [min(base_features * 2 ** i, max_features) for i in range(n)]
    for key in ("n_conv_per_stage", "n_blocks_per_stage"):
        if key in kwargs:
            kwargs[key] = [1] * n
    if "n_conv_per_stage_decoder" in kwargs:
        kwargs["n_conv_per_stage_decoder"] = [1] * (n - 1)
    return get_network_from_plans(configuration_manager.network_arch_class_name, kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import, num_input_channels,
                                  num_output_channels, allow_init=True, deep_supervision=enable_deep_supervision)


class TinyNetworkShortRun:
    """Mixin (before the trainer class): tiny network, ``epochs`` x ``iterations``, resumable every epoch."""

    epochs = 2
    iterations = 3

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.epochs
        self.num_iterations_per_epoch = self.iterations
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1  # an interrupted short run resumes from its last epoch

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        # validate/predict without mirroring (8x fewer passes); training keeps mirroring
        self.inference_allowed_mirroring_axes = None
        return out

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return tiny_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                            enable_deep_supervision)


def _tiny(base: type, epochs: int, iterations: int) -> type:
    name = f"{base.__name__}_tinynet_{epochs}epochs_{iterations}iters"
    return type(name, (TinyNetworkShortRun, base), {
        "epochs": epochs, "iterations": iterations, "__module__": __name__,
        "__doc__": f"{base.__name__} with the tiny network, {epochs} epochs x {iterations} iterations (CPU tests)."})


# 2 x 3: the smoke size of tests and `lesiondiffusion demo --fast`
nnUNetTrainer_tinynet_2epochs_3iters = _tiny(nnUNetTrainer, 2, 3)
nnUNetTrainerLesionDiffusion_tinynet_2epochs_3iters = _tiny(nnUNetTrainerLesionDiffusion, 2, 3)
nnUNetTrainerLesionDiffusionSynthOnly_tinynet_2epochs_3iters = _tiny(nnUNetTrainerLesionDiffusionSynthOnly, 2, 3)
# 10 x 10: a few CPU minutes
nnUNetTrainer_tinynet_10epochs_10iters = _tiny(nnUNetTrainer, 10, 10)
nnUNetTrainerLesionDiffusion_tinynet_10epochs_10iters = _tiny(nnUNetTrainerLesionDiffusion, 10, 10)
nnUNetTrainerLesionDiffusionSynthOnly_tinynet_10epochs_10iters = _tiny(nnUNetTrainerLesionDiffusionSynthOnly, 10, 10)

__all__ = [n for n in list(globals()) if n.startswith("nnUNetTrainer") and "_tinynet_" in n]
