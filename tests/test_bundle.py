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
