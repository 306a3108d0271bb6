"""The few-shot CPU recipe's batch is the batch nnU-Net trains with: initialize() takes batch_size from
the plans, so a recipe that only set it on the trainer trained with whatever nnU-Net planned."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DATASET_ID = 917
NAME = "LDRecipeBatch"
DS = f"Dataset{DATASET_ID}_{NAME}"
PLANNED_BATCH = 3  # written into the plans: neither the recipe's 16 nor the smoke recipe's 4


def _env(root: Path) -> dict[str, str]:
    return {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
            "nnUNet_results": str(root / "res"), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
            "nnUNet_compile": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    """Four small phantoms (two with a lesion) planned and preprocessed for 2d by nnU-Net's CLI."""
    import os

    from lesiondiffusion.phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("recipe")
    write_phantom_dataset(root / "raw", n_healthy=2, lesion_types=["liver_tumor"], shape=(40, 40, 12),
                          spacing=(3.0, 3.0, 4.0), seed=0, dataset_id=DATASET_ID, name=NAME, cases_per_type=2,
                          progress=False)
    proc = subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID),
                           "-c", "2d", "-np", "1"], env={**os.environ, **_env(root), "nnUNet_n_proc_DA": "1"},
                          capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plans_file = root / "pre" / DS / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["2d"]["batch_size"] = PLANNED_BATCH
    plans_file.write_text(json.dumps(plans, indent=2))
    return root


@pytest.mark.parametrize("name, batch", [
    ("nnUNetTrainer_fewshotcpu", 16),
    ("nnUNetTrainerLesionDiffusion_fewshotcpu", 16),
    ("nnUNetTrainer_fewshotcpu_smoke", 4),
])
def test_the_dataloader_yields_the_recipes_batch_not_the_planned_one(planned, monkeypatch, name, batch):
    import torch

    from lesiondiffusion.nnunet_integration import variants

    for k, v in _env(planned).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("LESIONDIFFUSION_CONFIG", raising=False)
    pre = planned / "pre" / DS
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # what nnU-Net's run_training adds before building the trainer
    dataset_json = json.loads((pre / "dataset.json").read_text())
    cls = getattr(variants, name)
    assert cls.batch == batch
    trainer = cls(plans, "2d", "all", dataset_json, device=torch.device("cpu"))
    threads = torch.get_num_threads()
    try:
        trainer.initialize()  # nnU-Net's _set_batch_size_and_oversample runs here
        assert trainer.batch_size == batch and trainer.configuration_manager.batch_size == batch
        dl_train, dl_val = trainer.get_dataloaders()
        for _ in range(2):
            sample = next(dl_train)
            assert sample["data"].shape[0] == batch and len(sample["keys"]) == batch
        assert next(dl_val)["data"].shape[0] == batch
        # the plans on disk keep nnU-Net's figure: only this run's configuration changed
        assert json.loads((pre / "nnUNetPlans.json").read_text())["configurations"]["2d"]["batch_size"] == PLANNED_BATCH
    finally:
        torch.set_num_threads(threads)  # the recipe pins one thread for the process
