"""Diffusion schedule, model-input builders and the two samplers of LesionDiffusion.

Training (pretrain/) and synthesis (pipeline.py) build network inputs with the same public functions
here (``lmnet_inputs``, ``linet_inputs``, ``masked_add_noise``), so the two can never drift apart.
MONAI supplies the schedulers and the DDIM update; masked latent inpainting with classifier-free
guidance is not in MONAI and is written here as small functions.

Null condition convention (classifier-free guidance): the unconditional context is an all-zero
tensor of the same shape as the text context, [batch, tokens, dim]. Training drops attributes by
zeroing their tokens (the whole context for the unconditional branch), so sampling uses zeros too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from . import presets
from .errors import BundleError


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
NETS = ("lmnet", "linet")


@dataclass
class ScheduleConfig:
    """Noise schedule and sampler settings stored in a bundle's config.yaml under ``schedule``.

    Each network has its own prediction target (MONAI ``prediction_type``): ``epsilon`` is the
    method's noise prediction; ``v_prediction`` (Salimans & Ho 2022) predicts
    sqrt(abar) * eps - sqrt(1 - abar) * x0, which at high noise levels is mostly the clean sample,
    so the loss rewards getting the lesion's content (its density) right exactly where only the
    prompt can tell. Measured on the toy benchmark (docs/pretraining.md section 6), tiny LINet with
    cross-attention at every level, 1500 CPU steps: epsilon prediction ignored the density prompt
    (hyperdense minus hypodense -0.7 +- 1.2 HU), v prediction followed it (+75 HU, 24/24 pairs). The
    tiny preset therefore uses v for LINet; the paper preset keeps the method's epsilon.

    Defaults (for a config.yaml without the key) are the ``paper`` preset's, the method's, from ``presets``.
    """

    num_train_timesteps: int = presets.value("paper", "schedule.num_train_timesteps")
    schedule: str = presets.value("paper", "schedule.schedule")  # MONAI NoiseSchedules name (cosine alpha-bar)
    lmnet_prediction: str = presets.value("paper", "schedule.lmnet_prediction")
    linet_prediction: str = presets.value("paper", "schedule.linet_prediction")
    ddim_steps: int = presets.value("paper", "schedule.ddim_steps")  # 200; the tiny preset sets 10
    guidance_scale: float = presets.value("paper", "schedule.guidance_scale")  # classifier-free, both networks; 1.0 disables it
    eta: float = presets.value("paper", "schedule.eta")  # deterministic DDIM

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.yaml") -> "ScheduleConfig":
        data = dict(data)
        if "prediction_type" in data:  # configs written before the per-network split: one type for both
            legacy = data.pop("prediction_type")
            data.setdefault("lmnet_prediction", legacy)
            data.setdefault("linet_prediction", legacy)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleError(f"{source}: unknown key(s) {unknown} under 'schedule'; allowed keys are {sorted(known)}.")
        cfg = cls(**data)
        if cfg.ddim_steps < 1 or cfg.ddim_steps > cfg.num_train_timesteps:
            raise BundleError(
                f"{source}: schedule.ddim_steps={cfg.ddim_steps} must be between 1 and "
                f"num_train_timesteps={cfg.num_train_timesteps}."
            )
        for key in ("lmnet_prediction", "linet_prediction"):
            if getattr(cfg, key) not in PREDICTION_TYPES:
                raise BundleError(f"{source}: schedule.{key}={getattr(cfg, key)!r} is not one of {list(PREDICTION_TYPES)}; "
                                  "it must be the target the network was trained with.")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def prediction(self, net: str) -> str:
        if net not in NETS:
            raise ValueError(f"net must be one of {NETS}, got {net!r}")
        return str(getattr(self, f"{net}_prediction"))


def make_train_scheduler(cfg: ScheduleConfig, net: str) -> DDPMScheduler:
    """The forward process used in training (``add_noise``) and for the masked noising below."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule, prediction_type=cfg.prediction(net)
    )


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the network learns to output for (x0, noise, t) under the scheduler's prediction type."""
    kind = scheduler.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise BundleError(f"unsupported prediction type {kind!r}; use one of {list(PREDICTION_TYPES)}.")


def make_ddim(
    cfg: ScheduleConfig, net: str, steps: int | None = None, clip_range: tuple[float, float] | None = (-1.0, 1.0)
) -> DDIMScheduler:
    """DDIM sampler on the same schedule; each step clamps the predicted x0 to ``clip_range``.

    Masks are trained in [-1, 1] (the default). For VQ latents pass ``codebook_range(vqgan)``: a clean
    latent is a codebook vector, so a prediction outside the codebook's range is impossible and
    clamping it keeps early steps (where 1/sqrt(alpha_bar) is large) from blowing up. ``None`` disables.
    """
    lo, hi = clip_range if clip_range is not None else (-1.0, 1.0)
    sched = DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        schedule=cfg.schedule,
        prediction_type=cfg.prediction(net),
        clip_sample=clip_range is not None,
        clip_sample_min=float(lo),
        clip_sample_max=float(hi),
    )
    sched.set_timesteps(int(steps or cfg.ddim_steps))
    return sched


# samplers the pipeline can run: DDIM (the method's) and MONAI's PNDM in its PLMS form (``skip_prk_steps``), a
# linear multistep sampler that reuses the last network outputs, compared against DDIM by
# benchmarks/bench_steps.py (it has no x0 clamp, so the codebook-range clamp of the latents does not apply)
SAMPLERS = ("ddim", "pndm")


def make_sampler(cfg: ScheduleConfig, net: str, steps: int | None = None, sampler: str = "ddim",
                 clip_range: tuple[float, float] | None = (-1.0, 1.0)) -> DDIMScheduler | PNDMScheduler:
    """A fresh sampler (multistep samplers keep state between steps: one per sampling run)."""
    if sampler == "ddim":
        return make_ddim(cfg, net, steps, clip_range=clip_range)
    if sampler != "pndm":
        raise BundleError(f"sampler {sampler!r}: use one of {', '.join(SAMPLERS)}.")
    sched = PNDMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                          skip_prk_steps=True, prediction_type=cfg.prediction(net))
    sched.set_timesteps(int(steps or cfg.ddim_steps))
    return sched


def codebook_range(vqgan: torch.nn.Module, norm: Any = None) -> tuple[float, float]:
    """(min, max) over all entries of a MONAI VQVAE codebook: the range of any clean latent.

    ``norm`` (``models.vqgan.LatentNorm``): the range in LINet's standardised latent space instead.
    """
    weight = vqgan.quantizer.quantizer.embedding.weight.detach()  # [codes, channels]
    if norm is not None:
        weight = norm.normalize(weight[:, :, None])[:, :, 0]
    return float(weight.min()), float(weight.max())


# ---- model inputs (shared with training) ------------------------------------------------------
def lmnet_inputs(
    noisy_mask: torch.Tensor, organ_semantics: torch.Tensor, target_organ: torch.Tensor, lesion_box: torch.Tensor
) -> torch.Tensor:
    """LMNet input [B, 4, D, H, W] in ``models.lmnet.LMNET_CHANNELS`` order.

    ``noisy_mask`` is the diffused mask x_t (clean masks live in {-1, 1}); ``organ_semantics`` is
    ``organ_semantics(labels)`` in [0, 1]; ``target_organ`` and ``lesion_box`` are {0, 1} masks.
    """
    return torch.cat([noisy_mask, organ_semantics, target_organ, lesion_box], dim=1)


def linet_inputs(z_t: torch.Tensor, latent_mask: torch.Tensor) -> torch.Tensor:
    """LINet input [B, C+1, ...]: masked-noised latent z_t followed by the latent-grid lesion mask."""
    return torch.cat([z_t, latent_mask], dim=1)


# TotalSegmentator v2 has 117 classes; dividing by a fixed constant (not the volume's max label)
# keeps each organ's value identical across volumes, which is what makes it a semantic channel.
ORGAN_SEMANTIC_SCALE = 117.0


def organ_semantics(labels: torch.Tensor) -> torch.Tensor:
    """Organ label volume (canonical TotalSegmentator v2 ids) -> float channel in [0, 1]."""
    return (labels.float() / ORGAN_SEMANTIC_SCALE).clamp(0.0, 1.0)


def mask_to_unit(mask: torch.Tensor) -> torch.Tensor:
    """Binary {0,1} lesion mask -> the {-1, 1} range LMNet diffuses in."""
    return mask.float() * 2.0 - 1.0


def latent_mask(mask: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """Resize a {0,1} image-grid mask [B,1,...] to the latent grid with max pooling: a latent cell is
    noised if any of its voxels is lesion, so the whole lesion is regenerated (never half-kept)."""
    return F.adaptive_max_pool3d(mask.float(), tuple(int(s) for s in latent_shape))


def masked_add_noise(
    scheduler: DDPMScheduler | DDIMScheduler,
    z0: torch.Tensor,
    noise: torch.Tensor,
    mask: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """LINet's forward process: noise only inside the lesion mask, clean latent outside.

        z_t = (sqrt(abar_t) * z_0 + sqrt(1 - abar_t) * eps) * m + z_0 * (1 - m)

    ``mask`` (m) is the latent-grid lesion mask [B, 1, ...] broadcast over channels.
    """
    noisy = scheduler.add_noise(original_samples=z0, noise=noise, timesteps=timesteps)
    return noisy * mask + z0 * (1.0 - mask)


# ---- samplers -----------------------------------------------------------------------------------
def null_context(context: torch.Tensor) -> torch.Tensor:
    """The unconditional context for classifier-free guidance: all zeros (see module docstring)."""
    return torch.zeros_like(context)


def guided_noise(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    t: int,
    context: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance: out = out(x, null) + s * (out(x, c) - out(x, null)).

    ``out`` is whatever the network predicts (noise, or velocity for ``v_prediction``): guidance is
    linear in either, and the DDIM step that follows converts it according to the scheduler's type.

    Both branches run as one doubled batch; ``guidance_scale == 1`` runs the conditional branch only.
    """
    batch = x.shape[0]
    if guidance_scale == 1.0:
        timesteps = torch.full((batch,), t, device=x.device, dtype=torch.long)
        return model(x, timesteps=timesteps, context=context)
    timesteps = torch.full((2 * batch,), t, device=x.device, dtype=torch.long)
    eps = model(torch.cat([x, x]), timesteps=timesteps, context=torch.cat([context, null_context(context)]))
    eps_cond, eps_null = eps[:batch], eps[batch:]
    return eps_null + guidance_scale * (eps_cond - eps_null)


def sample_mask(
    model: Callable[..., torch.Tensor],
    condition: torch.Tensor,
    context: torch.Tensor,
    scheduler: DDIMScheduler,
    noise: torch.Tensor,
    guidance_scale: float = 2.5,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """LMNet DDIM sampling: x_T = noise; x_{t-1} = DDIM(x_t, guided(x_t, t)); returns x_0 in [-1, 1].

    ``condition`` holds the three conditioning channels [B, 3, ...] (organ semantics, target organ,
    box) in ``lmnet_inputs`` order after the noisy mask.
    """
    x = noise
    sem, organ, box = condition[:, 0:1], condition[:, 1:2], condition[:, 2:3]

    def eps_model(inp: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        reps = inp.shape[0] // sem.shape[0]
        return model(
            lmnet_inputs(inp, sem.repeat(reps, 1, 1, 1, 1), organ.repeat(reps, 1, 1, 1, 1), box.repeat(reps, 1, 1, 1, 1)),
            timesteps=timesteps,
            context=context,
        )

    for i, t in enumerate(scheduler.timesteps):
        eps = guided_noise(eps_model, x, int(t), context, guidance_scale)
        x, _ = scheduler.step(eps.float(), int(t), x)
        if progress is not None:
            progress(i)
    return x.clamp(-1.0, 1.0)


def inpaint_latent(
    model: Callable[..., torch.Tensor],
    z0: torch.Tensor,
    mask: torch.Tensor,
    context: torch.Tensor,
    scheduler: DDIMScheduler,
    noise: torch.Tensor,
    guidance_scale: float = 2.5,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Masked latent inpainting with DDIM and classifier-free guidance (LINet).

    Start: z_T = eps * m + z_0 * (1 - m). Each step:
        z' = DDIM(z_t, guided(linet_inputs(z_t, m), t, c))
        z_{t-1} = z' * m + z_0 * (1 - m)
    The known clean latent is re-imposed outside the mask, not re-noised, matching the training
    input where the outside of the mask is always clean (``masked_add_noise``).
    """
    z = noise * mask + z0 * (1.0 - mask)

    def eps_model(inp: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        reps = inp.shape[0] // mask.shape[0]
        return model(linet_inputs(inp, mask.repeat(reps, 1, 1, 1, 1)), timesteps=timesteps, context=context)

    for i, t in enumerate(scheduler.timesteps):
        eps = guided_noise(eps_model, z, int(t), context, guidance_scale)
        z_prev, _ = scheduler.step(eps.float(), int(t), z)
        z = z_prev * mask + z0 * (1.0 - mask)
        if progress is not None:
            progress(i)
    return z
