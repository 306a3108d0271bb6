"""Training losses of the three networks and the attribute dropout used for classifier-free guidance.

The adversarial and vector-quantisation terms come from MONAI (PatchAdversarialLoss, VQVAE's own
quantisation loss); the box-weighted diffusion losses of LMNet and LINet are not in any library and
are written here, each with its equation in the docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss

from lesiondiffusion import presets


@dataclass
class VQGANLossConfig:
    """Weights of the VQ-GAN objective; the adversarial term is off for ``adv_warmup_steps`` steps.
    Defaults are the ``tiny`` preset's (``presets``), like every pretraining default: `lesiondiffusion
    pretrain` defaults to ``--preset tiny``."""

    recon_weight: float = 1.0
    vq_weight: float = 1.0
    adv_weight: float = presets.value("tiny", "training.adv_weight")
    adv_warmup_steps: int = presets.value("tiny", "training.adv_warmup_steps")
    # MONAI PatchAdversarialLoss criterion: "bce" is the log-GAN loss the method states (paper preset);
    # "least_squares" is the tiny preset's
    adv_criterion: str = presets.value("tiny", "training.adv_criterion")


class VQGANLoss:
    """VQ-GAN generator and discriminator objectives.

    Generator:      L_G = w_r * ||x - x_hat||_2^2 (mean) + w_q * L_vq + [step >= warmup] * w_a * L_adv(D(x_hat), real)
    Discriminator:  L_D = 0.5 * (L_adv(D(x_hat.detach()), fake) + L_adv(D(x), real))

    L_vq is MONAI VQVAE's quantisation loss: the commitment term beta * ||z_e - sg[e]||^2 (beta 0.25);
    the codebook term ||sg[z_e] - e||^2 of the method is replaced by the quantiser's EMA codebook
    update, its standard equivalent (van den Oord et al. 2017, appendix A.1) and the only codebook
    MONAI's VQVAE has. L_adv is MONAI's PatchAdversarialLoss on the last PatchDiscriminator output,
    ``bce`` (the log-GAN loss of the method) or ``least_squares``.
    """

    def __init__(self, cfg: VQGANLossConfig | None = None) -> None:
        self.cfg = cfg or VQGANLossConfig()
        self.adv = PatchAdversarialLoss(criterion=self.cfg.adv_criterion)

    def adversarial_active(self, step: int) -> bool:
        return self.cfg.adv_weight > 0 and step >= self.cfg.adv_warmup_steps

    def generator(self, x: torch.Tensor, recon: torch.Tensor, vq_loss: torch.Tensor,
                  fake_logits: torch.Tensor | None, step: int) -> dict[str, torch.Tensor]:
        recon_l = F.mse_loss(recon.float(), x.float())
        total = self.cfg.recon_weight * recon_l + self.cfg.vq_weight * vq_loss.float()
        out = {"recon": recon_l, "vq": vq_loss.float()}
        if fake_logits is not None and self.adversarial_active(step):
            adv = self.adv(fake_logits.float(), target_is_real=True, for_discriminator=False)
            total = total + self.cfg.adv_weight * adv
            out["adv_g"] = adv
        out["total"] = total
        return out

    def discriminator(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        fake = self.adv(fake_logits.float(), target_is_real=False, for_discriminator=True)
        real = self.adv(real_logits.float(), target_is_real=True, for_discriminator=True)
        return 0.5 * (fake + real)


def lmnet_loss(target: torch.Tensor, pred: torch.Tensor, box: torch.Tensor, gamma: float = 1e-3) -> torch.Tensor:
    """Box-weighted loss of LMNet, averaged over the batch:

        L = ||(y - y_theta) * B||_2^2 + gamma * ||y - y_theta||_2^2

    y is the network's target: the noise eps for ``epsilon`` prediction (the method's loss), or the
    velocity for ``v_prediction`` (``sampling.training_target``). Both squared norms are means over
    voxels (sums would tie the scale to the crop size); B is the {0,1} lesion bounding box, so errors
    inside the box count (1 + gamma) times, outside only gamma.
    """
    diff2 = (target.float() - pred.float()) ** 2
    return (diff2 * box.float()).mean() + gamma * diff2.mean()


def linet_loss(target: torch.Tensor, pred: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """L1 loss of LINet restricted to the latent lesion box B' and normalised by its size:

        L = sum(|y - y_theta| * B') / (|B'| * C)

    y is the noise for ``epsilon`` prediction (the method's loss) or the velocity for
    ``v_prediction``; summed over the batch, with |B'| the number of latent cells in the box (times C
    channels), so small and large lesions weigh the same per cell. An empty box contributes nothing.
    """
    box = box.float().expand_as(target)
    denom = box.sum().clamp_min(1.0)
    return ((target.float() - pred.float()).abs() * box).sum() / denom


def drop_attributes(context: torch.Tensor, p_token: float, p_all: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Attribute dropout for classifier-free guidance on a [B, tokens, dim] context.

    Each attribute token is replaced by the null (all-zero) vector with probability ``p_token``;
    the whole context is nulled with probability ``p_all``, which trains the unconditional branch
    that sampling uses (sampling.null_context is all zeros too).
    """
    b, t = context.shape[:2]
    keep_tok = torch.rand((b, t), generator=generator, device="cpu") >= p_token
    keep_all = torch.rand((b, 1), generator=generator, device="cpu") >= p_all
    keep = (keep_tok & keep_all).to(context.device, context.dtype)
    return context * keep[..., None]
