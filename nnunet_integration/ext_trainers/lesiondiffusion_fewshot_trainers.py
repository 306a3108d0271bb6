from lesiondiffusion.nnunet_integration.variants.fewshot_cpu import *  # noqa: F401,F403  (nnUNet_extTrainer imports this folder's modules by name)
