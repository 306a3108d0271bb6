"""The three trainers on a tiny toy dataset: one finite step each, exact resume (also after a kill),
and the CLI writing a bundle the synthesis side loads."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from lesiondiffusion.cli import main
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.pretrain import common, train_linet, train_lmnet, train_vqgan
from lesiondiffusion.pretrain.engine import TrainConfig
from toydata import write_toy_dataset  # benchmarks/toydata.py (conftest puts benchmarks/ on the path)

TRAINERS = {"vqgan": train_vqgan, "lmnet": train_lmnet, "linet": train_linet}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrain")
    data = write_toy_dataset(root / "data", n_lesion=3, n_healthy=1, shape=(20, 20, 12), seed=2)
    from lesiondiffusion.bundle import Bundle

    bundle = Bundle.init("tiny", encoder="hashing", seed=0)
    # the crop sizes are bundle data: halving them keeps every code path and cuts CPU time 8x
    bundle.config.crop.lmnet_size = (8, 8, 8)
    bundle.config.crop.linet_size = (16, 16, 16)
    bundle.save(root / "bundle0")
    return {"root": root, "data": data, "bundle0": root / "bundle0", "cache": root / "cache"}


def _opts(toy, tmp_path: Path, net: str, steps: int, bundle: Path, **train_kw) -> common.PretrainOptions:
    kw = dict(steps=steps, batch_size=2, num_workers=0, progress=False, preview_every=0, checkpoint_every=2,
              log_every=1)
    kw.update(train_kw)
    extra = {"patch": (16, 16, 16), "adv_warmup_steps": 2} if net == "vqgan" else {}
    return common.PretrainOptions(data=toy["data"], run_dir=tmp_path / f"run_{net}", bundle=bundle,
                                  cache=toy["cache"], train=TrainConfig(**kw), extra=extra)


def _bundle(toy, tmp_path: Path, name: str = "bundle") -> Path:
    dst = tmp_path / name
    shutil.copytree(toy["bundle0"], dst)
    return dst


def _weights(path: Path, net: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / net / "model.safetensors"))


@pytest.mark.parametrize("net", ["vqgan", "lmnet", "linet"])
def test_one_step_finite_and_exported(toy, tmp_path, net):
    bundle = _bundle(toy, tmp_path)
    before = _weights(bundle, net)
    extra_kw = {"preview_every": 1, "ema_decay": 0.9} if net != "vqgan" else {"preview_every": 1}
    opts = _opts(toy, tmp_path, net, 1, bundle, **extra_kw)
    if net == "vqgan":
        opts.extra["adv_warmup_steps"] = 0  # exercise the adversarial branch in the single step
    summary = TRAINERS[net].train(opts)
    assert summary["step"] == 1
    assert summary["losses"] and all(torch.isfinite(torch.tensor(v)) for v in summary["losses"].values())
    if net == "vqgan":
        assert {"recon", "vq", "adv_g", "adv_d"} <= set(summary["losses"])
    after = _weights(bundle, net)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the trained net went into the bundle
    for other in {"vqgan", "lmnet", "linet"} - {net}:
        assert all(torch.equal(a, b) for a, b in zip(_weights(toy["bundle0"], other).values(),
                                                     _weights(bundle, other).values()))
    run = opts.run_dir
    assert (run / "checkpoint.pt").exists() and list((run / "previews").glob("*.png"))
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert {r["name"] for r in rows} >= {"lr"} and all(r["step"] == "1" for r in rows)


def _final_state(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)


def _assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for name in a["models"]:
        for k, v in a["models"][name].items():
            torch.testing.assert_close(v, b["models"][name][k], rtol=1e-6, atol=1e-7, msg=f"{name}.{k}")
    for name in a["optimizers"]:
        sa, sb = a["optimizers"][name]["state"], b["optimizers"][name]["state"]
        assert sa.keys() == sb.keys()
        for pid in sa:
            for k in sa[pid]:
                torch.testing.assert_close(sa[pid][k], sb[pid][k], rtol=1e-6, atol=1e-7)
    assert a["schedulers"] == b["schedulers"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


@pytest.mark.parametrize("net", ["vqgan", "lmnet"])
def test_resume_two_plus_two_equals_four(toy, tmp_path, net, monkeypatch):
    straight = _opts(toy, tmp_path / "a", net, 4, _bundle(toy, tmp_path, "ba"))
    TRAINERS[net].train(straight)
    first = _opts(toy, tmp_path / "b", net, 2, _bundle(toy, tmp_path, "bb"))
    TRAINERS[net].train(first)
    with pytest.raises(LesionDiffusionError, match="Pass --resume"):
        TRAINERS[net].train(first)  # an existing run is never silently overwritten
    second = _opts(toy, tmp_path / "b", net, 4, first.bundle)
    second.resume = True
    TRAINERS[net].train(second)
    _assert_same(_final_state(straight.run_dir), _final_state(second.run_dir))
    # metrics of the resumed run read like one uninterrupted run
    steps = [int(r["step"]) for r in csv.DictReader((second.run_dir / "metrics.csv").open()) if r["name"] == "lr"]
    assert steps == [1, 2, 3, 4]
    if net != "vqgan":
        return

    # a run killed during step 4 (checkpoint every 2 steps) loses only step 3 and resumes exactly
    killed = _opts(toy, tmp_path / "c", net, 4, _bundle(toy, tmp_path, "bc"))
    real_step = train_vqgan.VQGANTask.step

    def dying_step(self, batch, engine):
        if engine.step == 3:
            raise KeyboardInterrupt
        return real_step(self, batch, engine)

    monkeypatch.setattr(train_vqgan.VQGANTask, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        TRAINERS[net].train(killed)
    assert _final_state(killed.run_dir)["step"] == 2
    assert not list(killed.run_dir.glob(".checkpoint*"))  # no half-written checkpoint left behind
    monkeypatch.setattr(train_vqgan.VQGANTask, "step", real_step)
    killed.resume = True
    TRAINERS[net].train(killed)
    _assert_same(_final_state(straight.run_dir), _final_state(killed.run_dir))


def test_cli_three_commands_give_loadable_bundle(toy, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    common_args = ["--data", str(toy["data"]), "--preset", "tiny", "--bundle", str(bundle), "--steps", "1",
                   "--cache", str(toy["cache"]), "--no-progress", "--preview-every", "0", "--device", "cpu"]
    assert main(["pretrain", "vqgan", "-o", str(tmp_path / "vq"), "--patch", "16", "16", "16", "--workers", "1",
                 *common_args]) == 0
    assert main(["pretrain", "lmnet", "-o", str(tmp_path / "lm"), "--workers", "0", *common_args]) == 0
    assert main(["pretrain", "linet", "-o", str(tmp_path / "li"), "--workers", "0", *common_args]) == 0
    out = capsys.readouterr().out
    assert "linet: 1 steps done" in out and str(bundle) in out

    from lesiondiffusion.bundle import Bundle

    loaded = Bundle.load(bundle)
    assert all(net in loaded.config.notes for net in ("vqgan", "lmnet", "linet"))
    try:
        from lesiondiffusion.pipeline import LesionSynthesizer
    except ImportError:  # the synthesis pipeline is another module; the bundle contract is checked above
        return
    LesionSynthesizer.from_bundle(bundle)


def test_cli_refuses_wrong_preset(toy, tmp_path, capsys):
    bundle = _bundle(toy, tmp_path)
    rc = main(["pretrain", "lmnet", "--data", str(toy["data"]), "--preset", "paper", "--bundle", str(bundle),
               "-o", str(tmp_path / "run"), "--steps", "1", "--no-progress", "--device", "cpu"])
    assert rc == 2
    assert "preset 'tiny' but --preset is 'paper'" in capsys.readouterr().err


def test_crop_not_matching_unet_depth_is_a_clear_error(toy, tmp_path, capsys):
    import yaml

    bundle = _bundle(toy, tmp_path)
    cfg = yaml.safe_load((bundle / "config.yaml").read_text())
    cfg["crop"]["linet_size"] = [12, 12, 12]  # latent 6^3 cannot be halved twice by the tiny LINet
    (bundle / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc = main(["pretrain", "linet", "--data", str(toy["data"]), "--bundle", str(bundle), "-o", str(tmp_path / "r"),
               "--steps", "1", "--no-progress", "--device", "cpu", "--cache", str(tmp_path / "cache")])
    assert rc == 2
    assert "crop.linet_size = [12, 12, 12] must be a multiple of 8" in capsys.readouterr().err


def test_linet_fits_latent_standardisation_and_vqgan_retrain_resets_it(toy, tmp_path, caplog):
    """LINet trains on unit-variance latents (VQ codebooks sit at ~0.1 scale); the fitted shift/scale
    go into the bundle with LINet, and a later VQ-GAN retrain invalidates both."""
    from lesiondiffusion import sampling
    from lesiondiffusion.bundle import Bundle
    from lesiondiffusion.pretrain.data import LesionCropDataset, Manifest

    bundle = _bundle(toy, tmp_path)
    train_vqgan.train(_opts(toy, tmp_path, "vqgan", 1, bundle))
    train_linet.train(_opts(toy, tmp_path, "linet", 1, bundle))
    b = Bundle.load(bundle)
    norm = b.config.latents
    assert not norm.is_identity and b.config.notes.get("linet")
    # on the training crops, the stored mapping gives zero-mean unit-variance latents per channel
    man = Manifest.load(toy["cache"])
    table = common.PhraseTable(b, common.dataset_phrases(man, "image"))
    ds = LesionCropDataset(man, tuple(b.config.crop.linet_size), table.index, kind="image", seed=0)
    with torch.no_grad():
        z = b.vqgan.encode_stage_2_inputs(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    zn = norm.normalize(z)
    torch.testing.assert_close(zn.mean(dim=(0, 2, 3, 4)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(zn.std(dim=(0, 2, 3, 4)), torch.ones(4), atol=1e-3, rtol=0)
    lo, hi = sampling.codebook_range(b.vqgan, norm)
    assert lo <= float(zn.min()) and float(zn.max()) <= hi  # the DDIM clip range covers every clean latent

    # continuing LINet keeps the stored standardisation
    cont = _opts(toy, tmp_path / "cont", "linet", 1, bundle)
    train_linet.train(cont)
    assert Bundle.load(bundle).config.latents == norm

    caplog.set_level("WARNING")
    train_vqgan.train(_opts(toy, tmp_path / "again", "vqgan", 1, bundle))
    b2 = Bundle.load(bundle)
    assert b2.config.latent_norm is None and "linet" not in b2.config.notes
    assert "pretrain linet` again" in caplog.text
