"""`lesiondiffusion nnunet env/register/unregister`, trainer discovery through nnUNet_extTrainer, and
config validation errors (file, key, value, fix)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lesiondiffusion.cli import main
from lesiondiffusion.commands.nnunet import SHIM_NAME, SHIM_TEXT
from lesiondiffusion.nnunet_integration.discovery import ext_trainer_dir
from lesiondiffusion.errors import ConfigError
from lesiondiffusion.nnunet_integration.config import config_from_dict, config_path_for, load_config


def test_env_prints_export_line_and_path(capsys, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", "/some/other")
    assert main(["nnunet", "env"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"export nnUNet_extTrainer=/some/other{os.pathsep}{ext_trainer_dir()}"
    assert main(["nnunet", "env", "--path"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == ext_trainer_dir() and (path / "lesiondiffusion_trainers.py").is_file()
    assert not (path / "__init__.py").exists()  # nnU-Net imports the folder's modules as top-level names


def test_nnunet_finds_trainers_through_ext_trainer_env():
    """The exact lookup nnUNetv2_train/predict do, in a fresh interpreter with only the env var set."""
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
            "for n in ('nnUNetTrainerLesionDiffusion', 'nnUNetTrainerLesionDiffusionSynthOnly',\n"
            "          'nnUNetTrainerLesionDiffusion_5epochs', 'nnUNetTrainerLesionDiffusion_tinynet_2epochs_3iters'):\n"
            "    c = f(n); print(c.__name__, c.__module__)\n")
    env = dict(os.environ, nnUNet_extTrainer=str(ext_trainer_dir()))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "nnUNetTrainerLesionDiffusion_5epochs lesiondiffusion.nnunet_integration.variants.training_length" in out.stdout
    env.pop("nnUNet_extTrainer")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Could not find requested nnunet trainer" in out.stderr


def test_register_and_unregister_shim(tmp_path, capsys):
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    assert main(["nnunet", "register", "--target", str(tmp_path)]) == 0
    shim = tmp_path / SHIM_NAME
    assert shim.read_text() == SHIM_TEXT
    cls = recursive_find_python_class(str(tmp_path), "nnUNetTrainerLesionDiffusion", None)
    assert cls is not None and cls.__module__ == "lesiondiffusion.nnunet_integration.trainers"
    assert main(["nnunet", "register", "--target", str(tmp_path)]) == 0  # idempotent
    other = tmp_path / "mine.py"
    other.write_text("x = 1\n")
    assert main(["nnunet", "unregister", "--target", str(tmp_path)]) == 0
    assert not shim.exists() and other.exists()  # only what register wrote is removed
    assert main(["nnunet", "unregister", "--target", str(tmp_path)]) == 0
    assert "nothing to remove" in capsys.readouterr().out
    shim.write_text("# someone else's file\n")
    assert main(["nnunet", "unregister", "--target", str(tmp_path)]) == 2
    assert main(["nnunet", "register", "--target", str(tmp_path)]) == 2
    assert shim.read_text() == "# someone else's file\n"
    assert "left untouched" in capsys.readouterr().err


def _cfg(**over):
    base = {"generator": {"backend": "rule_based"}, "catalogs": [{"name": "kidney_tumor"}]}
    base.update(over)
    return base


@pytest.mark.parametrize("raw, key, fix", [
    (_cfg(store={"reuse": 0}), "store.reuse", "between 1"),
    (_cfg(store={"sise": 4}), "store.sise", "allowed keys under 'store'"),
    (_cfg(synthetic_probability=1.5), "synthetic_probability", "between 0.0 and 1.0"),
    (_cfg(mode="sometimes"), "mode", "online, offline"),
    (_cfg(generator={"backend": "rule_based", "hu_correction": "yes"}), "generator.hu_correction", "off, shift, clip"),
    (_cfg(catalogs=[]), "catalogs", "at least one catalog"),
    (_cfg(generator={"backend": "gan"}), "generator.backend", "lesiondiffusion, rule_based"),
    (_cfg(templates={"folders": ["/nonexistent/x"]}), "templates.folders[0]", "organsTr"),
    ({"catalogs": ["kidney_tumor"]}, "generator.bundle", "rule_based"),
    ({"catalogs": ["kidney_tumor"], "generator": {"bundle": "/no/bundle"}}, "generator.bundle", "rule_based"),
])
def test_config_errors_name_file_key_value_and_fix(raw, key, fix):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, source="/cfg/lesiondiffusion.yaml")
    msg = str(err.value)
    assert msg.startswith("/cfg/lesiondiffusion.yaml: key ") and f"'{key}'" in msg and fix in msg


def test_defaults_and_file_lookup(tmp_path, monkeypatch):
    cfg = config_from_dict(_cfg(), "x.yaml")
    assert cfg.store.reuse == 8 and cfg.store.size == 32 and cfg.mode == "online"
    assert cfg.schedule.pretrain_fraction == 0.5 and cfg.catalogs[0].weight == 1.0
    assert cfg.generator.hu_correction == "off"  # the method's output by default
    # YAML 1.1 reads a bare `off` as false; it means the string
    assert config_from_dict(yaml.safe_load(
        "generator: {backend: rule_based, hu_correction: off}\ncatalogs: [{name: kidney_tumor}]")).generator.hu_correction == "off"
    assert config_from_dict(_cfg(generator={"backend": "rule_based", "hu_correction": "off"})).generator.hu_correction == "off"
    assert yaml.safe_load(cfg.to_yaml())["generator"]["backend"] == "rule_based"
    monkeypatch.delenv("LESIONDIFFUSION_CONFIG", raising=False)
    assert config_path_for(tmp_path) == tmp_path / "lesiondiffusion.yaml"
    monkeypatch.setenv("LESIONDIFFUSION_CONFIG", str(tmp_path / "elsewhere.yaml"))
    assert config_path_for(tmp_path) == tmp_path / "elsewhere.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text("catalogs: [kidney_tumor\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cache_build_cli_reports_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_cfg()))
    assert main(["cache", "build", "--config", str(cfg), "--dataset", "Dataset999_Nope", "-n", "2"]) == 2
    assert "nnUNetv2_plan_and_preprocess" in capsys.readouterr().err
    assert main(["cache", "build", "--config", str(cfg), "--dataset", "Dataset999_Nope", "-n", "0"]) == 2


def test_generator_device_per_ddp_rank():
    """'cuda' follows the rank's own GPU; 'cuda:N' is a dedicated generator GPU for every rank; cpu stays."""
    from lesiondiffusion.nnunet_integration.config import GeneratorConfig

    assert GeneratorConfig(device="cuda").device_for_rank(3) == "cuda:3"
    assert GeneratorConfig(device="cuda").device_for_rank(None) == "cuda"
    assert GeneratorConfig(device="cuda:7").device_for_rank(3) == "cuda:7"
    assert GeneratorConfig(device="cpu").device_for_rank(1) == "cpu"
