from lesiondiffusion.nnunet_integration.trainers import *  # noqa: F401,F403  (nnUNet_extTrainer imports this folder's modules by name)
