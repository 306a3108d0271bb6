"""Pretraining of VQ-GAN, LMNet and LINet from a user dataset (installed as lesiondiffusion.pretrain)."""
