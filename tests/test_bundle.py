"""Model bundle: init/save/load equality, version and shape checks, CLI init/info/embed."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lesiondiffusion.bundle import BUNDLE_VERSION, Bundle, default_phrases
from lesiondiffusion.cli import main
from lesiondiffusion.errors import BundleError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle") / "tiny"
    bundle = Bundle.init("tiny", "hashing:64", seed=1)
    bundle.save(path)
    return bundle, path


def test_init_caches_every_vocabulary_and_catalog_phrase(saved):
    bundle, _ = saved
    phrases = default_phrases()
    assert set(phrases) <= set(bundle.cache.phrases)
    cfg = bundle.config
    assert cfg.version == BUNDLE_VERSION and cfg.preset == "tiny"
    assert cfg.lmnet["cross_attention_dim"] == cfg.linet["cross_attention_dim"] == 64
    assert cfg.linet["in_channels"] == cfg.latent_channels + 1 == 5
    assert cfg.schedule.schedule == "cosine" and cfg.schedule.guidance_scale == 2.5
    # seeded initialisation
    again = Bundle.init("tiny", "hashing:64", seed=1, phrases=["shape: oval"])
    assert torch.equal(next(again.lmnet.parameters()), next(bundle.lmnet.parameters()))


def test_save_load_round_trip_is_exact(saved):
    bundle, path = saved
    for name in ("config.yaml", "vqgan/model.safetensors", "lmnet/model.safetensors", "linet/model.safetensors",
                 "text_embeddings/embeddings.safetensors", "text_embeddings/phrases.json"):
        assert (path / name).is_file(), name
    loaded = Bundle.load(path)
    assert loaded.equals(bundle)
    assert not loaded.lmnet.training
    assert loaded.cache.encoder.id == "hashing:64"  # offline encoders are re-attached on load
    ctx = loaded.context([bundle.cache.phrases[:8]])
    assert ctx.shape == (1, 8, 64)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_file_names_it_and_the_fix(saved, tmp_path):
    _, path = saved
    bad = _copy(path, tmp_path / "b")
    (bad / "linet" / "model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"linet/model.safetensors is missing.*pretrain linet"):
        Bundle.load(bad)
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.load(tmp_path / "nowhere")


def test_wrong_shapes_name_file_key_expected_and_found(saved, tmp_path):
    _, path = saved
    bad = _copy(path, tmp_path / "b")
    weights = load_file(str(bad / "lmnet" / "model.safetensors"))
    key = "conv_in.conv.weight"
    weights[key] = torch.zeros(16, 3, 3, 3, 3)
    save_file(weights, str(bad / "lmnet" / "model.safetensors"))
    with pytest.raises(BundleError) as err:
        Bundle.load(bad)
    msg = str(err.value)
    assert "lmnet/model.safetensors" in msg and key in msg
    assert "expected shape (16, 4, 3, 3, 3)" in msg and "found (16, 3, 3, 3, 3)" in msg


def test_version_and_config_errors(saved, tmp_path):
    _, path = saved
    bad = _copy(path, tmp_path / "b")
    cfg = yaml.safe_load((bad / "config.yaml").read_text())
    cfg["version"] = BUNDLE_VERSION + 1
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(BundleError, match="upgrade lesiondiffusion"):
        Bundle.load(bad)
    cfg["version"] = BUNDLE_VERSION
    cfg["linet"]["in_channels"] = 4
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(BundleError, match=r"linet.in_channels = 4 but it must be 5"):
        Bundle.load(bad)
    (bad / "config.yaml").write_text("version: [1\n")
    with pytest.raises(BundleError, match="not valid YAML"):
        Bundle.load(bad)


def test_cli_init_info_embed(tmp_path, capsys):
    out = tmp_path / "cli_bundle"
    assert main(["bundle", "init", "--preset", "tiny", "-o", str(out), "--encoder", "hashing:32"]) == 0
    assert main(["bundle", "init", "--preset", "tiny", "-o", str(out)]) == 2  # refuses to replace
    assert "--force" in capsys.readouterr().err
    assert main(["bundle", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "preset: tiny" in text and "hashing:32" in text
    assert main(["bundle", "embed", str(out), "--phrase", "shape: like a pear"]) == 0
    assert "shape: like a pear" in Bundle.load(out).cache
    assert main(["bundle", "info", str(tmp_path / "missing")]) == 2


def test_latent_norm_round_trip_and_standardises():
    from lesiondiffusion.models.vqgan import LatentNorm

    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, 5, 5, 5, generator=g) * torch.tensor([0.1, 0.2, 0.05, 1.0]).view(1, 4, 1, 1, 1) \
        + torch.tensor([0.5, -0.2, 0.0, 3.0]).view(1, 4, 1, 1, 1)
    norm = LatentNorm.fit(z)
    zn = norm.normalize(z)
    torch.testing.assert_close(zn.mean(dim=(0, 2, 3, 4)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(zn.std(dim=(0, 2, 3, 4)), torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(norm.denormalize(zn), z, atol=1e-5, rtol=0)
    assert LatentNorm.identity(4).is_identity and not norm.is_identity
    torch.testing.assert_close(LatentNorm.identity(4).normalize(z), z)


def test_latent_norm_is_saved_and_checked(saved, tmp_path):
    from lesiondiffusion.models.vqgan import LatentNorm

    bundle, path = saved
    assert Bundle.load(path).config.latents.is_identity  # untrained bundles: identity
    out = tmp_path / "n"
    bundle.config.latent_norm = LatentNorm((0.1, -0.2, 0.3, 0.0), (10.0, 8.0, 9.0, 12.5))
    try:
        bundle.save(out)
    finally:
        bundle.config.latent_norm = None
    assert Bundle.load(out).config.latents == LatentNorm((0.1, -0.2, 0.3, 0.0), (10.0, 8.0, 9.0, 12.5))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    for bad, match in ((
            {"shift": [0, 0, 0], "scale": [1, 1, 1]}, r"latent_norm.shift has 3 values but the VQ-GAN has 4"),
            ({"shift": [0, 0, 0, 0], "scale": [1, 1, 0, 1]}, r"latent_norm.scale=.* must be positive"),
            ({"shift": [0, 0, float("nan"), 0], "scale": [1, 1, 1, 1]}, r"latent_norm.shift.*(NaN|nan)"),
            ({"scale": [1, 1, 1, 1]}, r"keys shift and scale")):
        cfg["latent_norm"] = bad
        (out / "config.yaml").write_text(yaml.safe_dump(cfg))
        with pytest.raises(BundleError, match=match):
            Bundle.load(out)
    del cfg["latent_norm"]  # bundles written before the key existed load as identity
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert Bundle.load(out).config.latent_norm is None
