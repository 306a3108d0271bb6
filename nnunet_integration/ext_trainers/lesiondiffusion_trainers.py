# nnUNet_extTrainer imports this folder's modules by name: every LesionDiffusion trainer and variant
from lesiondiffusion.nnunet_integration.trainers import *  # noqa: F401,F403
from lesiondiffusion.nnunet_integration.variants import *  # noqa: F401,F403
