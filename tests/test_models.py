"""Tiny MONAI networks and the samplers: shapes, dtypes, masked noising, inpainting, guidance."""

from __future__ import annotations

import math

import pytest
import torch

from lesiondiffusion import sampling as S
from lesiondiffusion.models import linet, lmnet, vqgan

DIM = 32


def randomize_zero_layers(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """MONAI zero-initialises the UNets' output and attention projections (eps = 0 for any input);
    give them small random weights so the conditioning paths act as in a trained network."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return net


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    vq = vqgan.build_vqgan(vqgan.preset("tiny")).eval()
    lm = randomize_zero_layers(lmnet.build_lmnet(lmnet.preset("tiny", DIM)).eval())
    li = randomize_zero_layers(linet.build_linet(linet.preset("tiny", 4, DIM)).eval(), 1)
    return vq, lm, li


def test_vqgan_latent_is_half_resolution_with_four_channels(nets):
    vq, _, _ = nets
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    with torch.inference_mode():
        z = vq.encode_stage_2_inputs(x)
        y = vq.decode_stage_2_outputs(z)
    assert z.shape == (2, 4, 8, 8, 8) and z.dtype == torch.float32
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert vq.quantizer.quantizer.num_embeddings == 2048
    assert vqgan.downsample_factor(vqgan.preset("paper")) == 2
    disc = vqgan.build_discriminator(vqgan.DISCRIMINATOR_PRESETS["tiny"])
    assert torch.isfinite(disc(x)[-1]).all()


def test_hu_window_mapping_round_trip():
    hu = torch.tensor([-2000.0, -1000.0, 0.0, 40.0, 1000.0, 3000.0])
    unit = vqgan.hu_to_unit(hu, (-1000.0, 1000.0))
    assert unit.min() == -1 and unit.max() == 1
    back = vqgan.unit_to_hu(unit, (-1000.0, 1000.0))
    assert torch.allclose(back, hu.clamp(-1000, 1000), atol=1e-3)


def test_unet_channel_contracts(nets):
    _, lm, li = nets
    ctx = torch.randn(2, 8, DIM)
    t = torch.tensor([10, 500])
    inp = S.lmnet_inputs(torch.randn(2, 1, 16, 16, 16), S.organ_semantics(torch.randint(0, 118, (2, 1, 16, 16, 16))),
                         torch.ones(2, 1, 16, 16, 16), torch.zeros(2, 1, 16, 16, 16))
    assert inp.shape[1] == len(lmnet.LMNET_CHANNELS) == 4
    with torch.inference_mode():
        assert lm(inp, timesteps=t, context=ctx).shape == (2, 1, 16, 16, 16)
        z = torch.randn(2, 4, 8, 8, 8)
        out = li(S.linet_inputs(z, torch.ones(2, 1, 8, 8, 8)), timesteps=t, context=ctx)
    assert out.shape == z.shape and out.dtype == torch.float32


def test_schedule_is_cosine_with_1000_steps():
    cfg = S.ScheduleConfig()
    sched = S.make_train_scheduler(cfg, "lmnet")
    assert cfg.num_train_timesteps == 1000 and len(sched.alphas_cumprod) == 1000
    s = 8e-3
    f = lambda t: math.cos((t / 1000 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert sched.alphas_cumprod[499].item() == pytest.approx(f(500) / f(0), rel=1e-3)
    ddim = S.make_ddim(cfg, "lmnet", steps=7)
    assert len(ddim.timesteps) == 7 and int(ddim.timesteps[0]) == 999


def test_masked_add_noise_keeps_the_outside_clean():
    sched = S.make_train_scheduler(S.ScheduleConfig(), "linet")
    z0 = torch.randn(2, 4, 8, 8, 8)
    mask = S.latent_mask((torch.rand(2, 1, 16, 16, 16) > 0.7).float(), (8, 8, 8))
    zt = S.masked_add_noise(sched, z0, torch.randn_like(z0), mask, torch.tensor([999, 300]))
    outside = (mask == 0).expand_as(z0)
    assert torch.equal(zt[outside], z0[outside])
    assert (zt[~outside] - z0[~outside]).abs().mean() > 0.5


def test_latent_mask_is_conservative():
    m = torch.zeros(1, 1, 16, 16, 16)
    m[0, 0, 5, 7, 9] = 1  # one voxel marks its whole 2x2x2 latent cell
    lm = S.latent_mask(m, (8, 8, 8))
    assert lm.sum() == 1 and lm[0, 0, 2, 3, 4] == 1


def test_inpainting_keeps_known_latent_and_guidance_changes_it(nets):
    _, _, li = nets
    cfg = S.ScheduleConfig()
    z0 = torch.randn(1, 4, 8, 8, 8)
    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[..., 2:6, 2:6, 2:6] = 1
    ctx = torch.randn(1, 8, DIM)
    noise = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        runs = {g: S.inpaint_latent(li, z0, mask, ctx, S.make_ddim(cfg, "linet", 2, clip_range=None), noise, g) for g in (1.0, 2.5)}
        again = S.inpaint_latent(li, z0, mask, ctx, S.make_ddim(cfg, "linet", 2, clip_range=None), noise, 2.5)
    outside = (mask == 0).expand_as(z0)
    for z in runs.values():
        assert torch.equal(z[outside], z0[outside]) and torch.isfinite(z).all()
    assert torch.equal(again, runs[2.5])  # deterministic DDIM
    assert (runs[1.0] - runs[2.5])[~outside].abs().max() > 1e-4  # CFG changes the inpainted values


def test_mask_sampling_shapes_and_range(nets):
    _, lm, _ = nets
    cond = torch.cat([S.organ_semantics(torch.full((2, 1, 16, 16, 16), 3)), torch.ones(2, 2, 16, 16, 16)], dim=1)
    with torch.inference_mode():
        x = S.sample_mask(lm, cond, torch.randn(2, 8, DIM), S.make_ddim(S.ScheduleConfig(), "lmnet", 2), torch.randn(2, 1, 16, 16, 16))
    assert x.shape == (2, 1, 16, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_guided_noise_formula():
    calls = []

    def model(x, timesteps, context):
        calls.append(x.shape[0])
        return context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) + x * 0

    x = torch.zeros(1, 1, 2, 2, 2)
    ctx = torch.full((1, 3, 4), 2.0)
    eps = S.guided_noise(model, x, 5, ctx, 3.0)
    assert calls == [2]  # one doubled batch
    assert torch.allclose(eps, torch.full_like(x, 6.0))  # 0 + 3 * (2 - 0): null context is all zeros
    assert torch.allclose(S.guided_noise(model, x, 5, ctx, 1.0), torch.full_like(x, 2.0))


def test_prediction_targets_and_per_network_config():
    sched = S.make_train_scheduler(S.ScheduleConfig(linet_prediction="v_prediction"), "linet")
    x0, eps = torch.randn(3, 4, 4, 4, 4), torch.randn(3, 4, 4, 4, 4)
    t = torch.tensor([0, 500, 999])
    v = S.training_target(sched, x0, eps, t)
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0)
    eps_sched = S.make_train_scheduler(S.ScheduleConfig(linet_prediction="v_prediction"), "lmnet")
    assert torch.equal(S.training_target(eps_sched, x0, eps, t), eps)
    # a DDIM step that is handed the exact v recovers x0 at the end of sampling, like eps does
    for kind in ("epsilon", "v_prediction"):
        cfg = S.ScheduleConfig(linet_prediction=kind)
        train = S.make_train_scheduler(cfg, "linet")
        ddim = S.make_ddim(cfg, "linet", steps=5, clip_range=None)
        x = train.add_noise(x0, eps, torch.full((3,), int(ddim.timesteps[0])))
        for step_t in ddim.timesteps:
            tt = torch.full((3,), int(step_t))
            x_t_eps = (x - train.alphas_cumprod[tt].view(-1, 1, 1, 1, 1).sqrt() * x0) / (1 - train.alphas_cumprod[tt]).sqrt().view(-1, 1, 1, 1, 1)
            out = S.training_target(train, x0, x_t_eps, tt)
            x, _ = ddim.step(out, int(step_t), x)
        torch.testing.assert_close(x, x0, atol=1e-3, rtol=1e-3)
    # legacy single key maps to both; bad values name the key
    legacy = S.ScheduleConfig.from_dict({"prediction_type": "v_prediction"})
    assert legacy.lmnet_prediction == legacy.linet_prediction == "v_prediction"
    from lesiondiffusion.errors import BundleError

    with pytest.raises(BundleError, match=r"schedule.linet_prediction='velocity' is not one of"):
        S.ScheduleConfig.from_dict({"linet_prediction": "velocity"})
