"""Shorter trainings in nnU-Net's naming (``nnUNetTrainerLesionDiffusion_5epochs`` ...): the same
trainer, network and schedule fractions; only ``num_epochs`` changes."""

from __future__ import annotations

import torch

from ..trainers import nnUNetTrainerLesionDiffusion, nnUNetTrainerLesionDiffusionSynthOnly


def _epochs(base: type, n: int, name: str) -> type:
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = n

    return type(name, (base,), {"__init__": __init__, "__module__": __name__,
                                "__doc__": f"{base.__name__} with {n} epochs."})


# defined explicitly so they are importable by name (nnU-Net's lookup) and picklable
nnUNetTrainerLesionDiffusion_1epoch = _epochs(nnUNetTrainerLesionDiffusion, 1, "nnUNetTrainerLesionDiffusion_1epoch")
nnUNetTrainerLesionDiffusion_5epochs = _epochs(nnUNetTrainerLesionDiffusion, 5, "nnUNetTrainerLesionDiffusion_5epochs")
nnUNetTrainerLesionDiffusion_10epochs = _epochs(nnUNetTrainerLesionDiffusion, 10, "nnUNetTrainerLesionDiffusion_10epochs")
nnUNetTrainerLesionDiffusion_20epochs = _epochs(nnUNetTrainerLesionDiffusion, 20, "nnUNetTrainerLesionDiffusion_20epochs")
nnUNetTrainerLesionDiffusion_50epochs = _epochs(nnUNetTrainerLesionDiffusion, 50, "nnUNetTrainerLesionDiffusion_50epochs")
nnUNetTrainerLesionDiffusion_100epochs = _epochs(nnUNetTrainerLesionDiffusion, 100, "nnUNetTrainerLesionDiffusion_100epochs")
nnUNetTrainerLesionDiffusion_250epochs = _epochs(nnUNetTrainerLesionDiffusion, 250, "nnUNetTrainerLesionDiffusion_250epochs")
nnUNetTrainerLesionDiffusionSynthOnly_5epochs = _epochs(nnUNetTrainerLesionDiffusionSynthOnly, 5,
                                                        "nnUNetTrainerLesionDiffusionSynthOnly_5epochs")
nnUNetTrainerLesionDiffusionSynthOnly_50epochs = _epochs(nnUNetTrainerLesionDiffusionSynthOnly, 50,
                                                         "nnUNetTrainerLesionDiffusionSynthOnly_50epochs")

__all__ = [n for n in list(globals()) if n.startswith("nnUNetTrainerLesionDiffusion")
           and globals()[n].__module__ == __name__]
