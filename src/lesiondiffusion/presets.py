"""Every preset value in one table: bundle geometry, noise schedule and sampler, text encoder, the
pretraining recipe and the networks' and discriminator's constructor arguments, for ``paper`` and ``tiny``.

Each value carries its source: ``paper`` (the paper's text states it; docs/fidelity.md names the place),
``project`` (the paper is silent; this project's choice) or ``deviation`` (departs from what the paper
states, or adds what it does not have; docs/fidelity.md gives the reason). ``bundle.PRESETS``, the
networks' ``PRESETS``, the pretraining defaults and the dataclass defaults are read from here, and
tests/test_fidelity.py checks this table against the machine-readable block of docs/fidelity.md.

A bottom-level module: plain data, no imports from the package.
"""

from __future__ import annotations

import copy
from typing import Any

PAPER, PROJECT, DEVIATION = "paper", "project", "deviation"
SOURCES = (PAPER, PROJECT, DEVIATION)
NAMES = ("tiny", "paper")

# (value, source) per dotted key; sections: crop, schedule, training, vqgan, discriminator, lmnet, linet
_PAPER: dict[str, tuple[Any, str]] = {
    "hu_window": ([-1000.0, 1000.0], PROJECT),
    "spacing_mm": ([1.0, 1.0, 1.0], PROJECT),
    # the method trains every generative network on 128^3 patches: LMNet's crop, LINet's image crop
    # (-> 4 x 64^3 latent) and the VQ-GAN's patch (= LINet's crop, train_vqgan.default_patch)
    "crop.lmnet_size": ([128, 128, 128], PAPER),
    "crop.linet_size": ([128, 128, 128], PAPER),
    "crop.mask_margin_mm": (8.0, PROJECT),
    "crop.context_margin_mm": (24.0, PROJECT),
    "schedule.num_train_timesteps": (1000, PAPER),
    "schedule.schedule": ("cosine", PAPER),  # MONAI NoiseSchedules name (Nichol & Dhariwal cosine alpha-bar)
    "schedule.lmnet_prediction": ("epsilon", PAPER),
    "schedule.linet_prediction": ("epsilon", PAPER),
    "schedule.ddim_steps": (200, PAPER),
    "schedule.guidance_scale": (2.5, PAPER),
    "schedule.eta": (0.0, PROJECT),  # deterministic DDIM
    "encoder": ("biomedclip", PAPER),  # never falls back to hashing; --encoder hashing must be chosen explicitly
    # AdamW with momentum 0.99 (beta1; beta2 is PyTorch's default), batch 1 per GPU, static learning rate
    "training.batch_size": (1, PAPER),
    "training.lr": (1e-4, PAPER),
    "training.weight_decay": (1e-5, PAPER),
    "training.betas": ([0.99, 0.999], PAPER),
    "training.warmup_steps": (0, PAPER),  # static learning rate; a warm-up is optional (--warmup-steps)
    "training.grad_clip": (1.0, DEVIATION),
    "training.adv_criterion": ("bce", PAPER),  # log-GAN term of Eq. 3
    "training.adv_weight": (0.01, DEVIATION),  # Eq. 3 has unit weights
    "training.adv_warmup_steps": (500, DEVIATION),
    "training.commitment_cost": (0.25, DEVIATION),  # MONAI VQVAE's; Eq. 3 has unit weights
    "training.gamma": (1e-3, PAPER),
    "training.p_token": (0.1, PROJECT),
    "training.p_all": (0.1, PROJECT),
    # VQ-GAN: only the first level downsamples (stride 2); a stride-1 level adds capacity without shrinking
    # the latent grid further: the method's latent is exactly half the image size
    "vqgan.spatial_dims": (3, PAPER),
    "vqgan.in_channels": (1, PROJECT),
    "vqgan.out_channels": (1, PROJECT),
    "vqgan.channels": ([64, 128], PROJECT),
    "vqgan.num_res_layers": (2, PROJECT),
    "vqgan.num_res_channels": ([64, 128], PROJECT),
    "vqgan.downsample_parameters": ([[2, 4, 1, 1], [1, 3, 1, 1]], PAPER),  # 2x downsampling
    "vqgan.upsample_parameters": ([[1, 3, 1, 1, 0], [2, 4, 1, 1, 0]], PAPER),
    "vqgan.num_embeddings": (2048, PAPER),
    "vqgan.embedding_dim": (4, PROJECT),
    "discriminator.spatial_dims": (3, PAPER),
    "discriminator.in_channels": (1, PROJECT),
    "discriminator.channels": (64, PROJECT),
    "discriminator.num_layers_d": (3, PROJECT),
    "lmnet.spatial_dims": (3, PAPER),
    "lmnet.in_channels": (4, PAPER),  # noisy mask, organ semantics, target organ, box (Eq. 2: m_t, M, B)
    "lmnet.out_channels": (1, PAPER),
    "lmnet.channels": ([32, 64, 128, 256], PROJECT),
    "lmnet.attention_levels": ([False, False, True, True], PROJECT),
    "lmnet.num_res_blocks": (2, PROJECT),
    "lmnet.num_head_channels": (32, PROJECT),
    "lmnet.norm_num_groups": (32, PROJECT),
    "lmnet.with_conditioning": (True, PAPER),  # attributes by cross-attention
    "lmnet.transformer_num_layers": (1, PROJECT),
    "lmnet.use_flash_attention": (True, PROJECT),
    "linet.spatial_dims": (3, PAPER),
    "linet.channels": ([64, 128, 256, 256], PROJECT),
    "linet.attention_levels": ([False, False, True, True], PROJECT),
    "linet.num_res_blocks": (2, PROJECT),
    "linet.num_head_channels": (32, PROJECT),
    "linet.norm_num_groups": (32, PROJECT),
    "linet.with_conditioning": (True, PAPER),
    "linet.transformer_num_layers": (1, PROJECT),
    "linet.use_flash_attention": (True, PROJECT),
}

# tiny: CPU tests, the demo and smoke runs in seconds; only what differs from the paper preset
_TINY_CHANGES: dict[str, tuple[Any, str]] = {
    "spacing_mm": ([3.0, 3.0, 3.0], PROJECT),
    "crop.lmnet_size": ([16, 16, 16], DEVIATION),
    "crop.linet_size": ([32, 32, 32], DEVIATION),
    "crop.mask_margin_mm": (6.0, PROJECT),
    "crop.context_margin_mm": (12.0, PROJECT),
    # v prediction: a short (CPU) LINet run follows the density prompt only with it (sampling.ScheduleConfig)
    "schedule.linet_prediction": ("v_prediction", DEVIATION),
    "schedule.ddim_steps": (10, DEVIATION),
    "encoder": ("hashing", DEVIATION),  # offline, no download: tests and the demo
    "training.batch_size": (2, DEVIATION),
    "training.betas": ([0.9, 0.999], DEVIATION),
    "training.adv_criterion": ("least_squares", DEVIATION),
    "vqgan.channels": ([16], PROJECT),
    "vqgan.num_res_layers": (1, PROJECT),
    "vqgan.num_res_channels": ([16], PROJECT),
    "vqgan.downsample_parameters": ([[2, 4, 1, 1]], PAPER),
    "vqgan.upsample_parameters": ([[2, 4, 1, 1, 0]], PAPER),
    "discriminator.channels": (8, PROJECT),
    "discriminator.num_layers_d": (2, PROJECT),
    # text cross-attention at every level, so the shape prompt acts where the mask's outline is resolved
    # (toy benchmark, 1500 CPU steps, round-like minus irregular at the same location: coarsest level only
    # sphericity +0.025 / convexity +0.038, all levels +0.198 / +0.313 with 24/24 pairs; docs/pretraining.md
    # section 6)
    "lmnet.channels": ([16, 32, 32], PROJECT),
    "lmnet.attention_levels": ([True, True, True], DEVIATION),
    "lmnet.num_res_blocks": (1, PROJECT),
    "lmnet.num_head_channels": (16, PROJECT),
    "lmnet.norm_num_groups": (8, PROJECT),
    # at the coarsest level alone (2^3 cells for a 16^3 crop) the prompt can only shift the whole crop
    # (toy benchmark with v prediction, hyperdense minus hypodense: coarsest level only +0.0 HU, lower two
    # levels +0.0 HU, all levels +75 HU); costs 5.6x per LINet step at a 16^3 latent on CPU
    "linet.channels": ([16, 32, 32], PROJECT),
    "linet.attention_levels": ([True, True, True], DEVIATION),
    "linet.num_res_blocks": (1, PROJECT),
    "linet.num_head_channels": (16, PROJECT),
    "linet.norm_num_groups": (8, PROJECT),
}

TABLE: dict[str, dict[str, tuple[Any, str]]] = {"paper": _PAPER, "tiny": {**_PAPER, **_TINY_CHANGES}}
assert all(s in SOURCES for p in TABLE.values() for _, s in p.values())


def _check(preset: str) -> dict[str, tuple[Any, str]]:
    if preset not in TABLE:
        # ValueError: this bottom module knows no package error type; callers turn it into theirs
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(TABLE)}.")
    return TABLE[preset]


def value(preset: str, key: str) -> Any:
    """One value (a copy), e.g. ``value("paper", "schedule.ddim_steps")``."""
    return copy.deepcopy(_check(preset)[key][0])


def source(preset: str, key: str) -> str:
    """``paper``, ``project`` or ``deviation``."""
    return _check(preset)[key][1]


def section(preset: str, name: str) -> dict[str, Any]:
    """The values of one section (``crop``, ``schedule``, ``training``, ``vqgan``, ...) as a plain dict."""
    prefix = name + "."
    return {k[len(prefix):]: copy.deepcopy(v) for k, (v, _) in _check(preset).items() if k.startswith(prefix)}


def flat(preset: str) -> dict[str, Any]:
    """Every value of a preset under its dotted key."""
    return {k: copy.deepcopy(v) for k, (v, _) in _check(preset).items()}
