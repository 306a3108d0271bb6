"""LesionDiffusion for nnU-Net: text-controlled 3D CT lesion synthesis as a segmentation augmentation.

Data flows one way: catalog -> report -> placement -> mask model -> latent inpainting -> sample store
-> trainer. Each stage lives in the module of that name.
"""

__version__ = "0.1.0"
