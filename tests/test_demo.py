"""``lesiondiffusion demo --fast`` end to end (real pretraining, synthesis, nnU-Net), its outputs,
re-use of finished steps, and the workdir guard."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

PNG = b"\x89PNG\r\n\x1a\n"


def _demo(workdir: Path, *extra: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lesiondiffusion", "demo", "--fast", "--no-progress", "--workdir", str(workdir), *extra],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    r = _demo(workdir)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, f"demo failed:\nSTDOUT\n{r.stdout[-4000:]}\nSTDERR\n{r.stderr[-6000:]}"
    return workdir, r, seconds


@pytest.mark.slow
def test_demo_fast_outputs_are_valid(demo_run):
    workdir, r, seconds = demo_run
    summary = json.loads((workdir / "summary.json").read_text())
    # the final summary says where everything is
    for key in ("dataset", "bundle", "summary_png"):
        assert summary[key] in r.stdout, key
    for name in ("real_only", "lesiondiffusion"):
        assert summary["nnunet_models"][name] in r.stdout, name
    assert "DEMO WEIGHTS" in r.stdout and "Dice" in r.stdout

    # dataset: nnU-Net raw layout, images/labels/organs on one grid
    ds = Path(summary["dataset"])
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["labels"]["background"] == 0
    img0 = sorted((ds / "imagesTr").glob("*_0000.nii.gz"))[0]
    ref = nib.load(img0)

    # generator bundle written by the pretraining code, labelled as demo weights
    bundle = Path(summary["bundle"])
    for part in ("config.yaml", "vqgan/model.safetensors", "lmnet/model.safetensors", "linet/model.safetensors"):
        assert (bundle / part).exists(), part
    assert "NOT FOR RESEARCH" in (bundle / "DEMO_WEIGHTS_NOT_FOR_RESEARCH.txt").read_text()

    # synthesis: NIfTI on the template's grid, a lesion inside, a report and a PNG preview
    assert summary["synthesis"], "no synthetic lesion was produced"
    hollow_seen = False
    for d in map(Path, summary["synthesis"]):
        im = nib.load(d / "image.nii.gz")
        les = nib.load(d / "lesion.nii.gz")
        assert im.shape == les.shape == ref.shape
        assert np.allclose(im.affine, ref.affine) and np.allclose(les.affine, ref.affine)
        data = np.asarray(im.dataobj)
        assert np.isfinite(data).all() and data.min() >= -1024 and data.max() <= 3071
        assert np.asarray(les.dataobj).sum() > 0
        assert (d / "report.yaml").exists()
        assert (d / "preview.png").read_bytes()[:8] == PNG
        hollow_seen |= "gastric" in d.name
    steps = {p.stem: json.loads(p.read_text()) for p in (workdir / "steps").glob("*.json")}
    types = {s["type"] for s in steps["synthesis"]["samples"]} | {f["type"] for f in steps["synthesis"]["failures"]}
    assert "gastric_cancer" in types  # a hollow-organ type was attempted (success depends on the tiny weights)

    # nnU-Net: both trainings (real only and LesionDiffusion), predictions on the test grid, Dice numbers
    assert set(summary["dice"]) == {"real_only", "lesiondiffusion"}
    for name in ("real_only", "lesiondiffusion"):
        assert (Path(summary["nnunet_models"][name]) / "checkpoint_final.pth").exists()
        preds = sorted(Path(summary["predictions"][name]).glob("*.nii.gz"))
        assert len(preds) == len(list((ds / "labelsTs").glob("*.nii.gz"))) > 0
        for p in preds:
            pr = nib.load(p)
            lab = nib.load(ds / "labelsTs" / p.name)
            assert pr.shape == lab.shape and np.allclose(pr.affine, lab.affine, atol=1e-4)
        assert set(summary["dice"][name]) == set(meta["labels"]) - {"background"}
        for v in summary["dice"][name].values():
            assert isinstance(v, float) and (math.isnan(v) or 0.0 <= v <= 1.0)
    assert summary["trainers"] == {"real_only": "nnUNetTrainer_fewshotcpu_smoke",
                                   "lesiondiffusion": "nnUNetTrainerLesionDiffusion_fewshotcpu_smoke"}
    assert "real only" in r.stdout and "LesionDiffusion" in r.stdout  # the printed comparison
    for name in ("segmentation_dice.md", "segmentation_dice.csv", "segmentation_runs.csv"):
        assert (workdir / "segmentation" / name).exists(), name
    table = (workdir / "segmentation" / "segmentation_dice.md").read_text()
    assert "| Real only |" in table and "| Synthetic then real | lesiondiffusion | offline cache |" in table
    # the LesionDiffusion run trained on synthetic cases from the offline cache
    log = next(Path(summary["nnunet_models"]["lesiondiffusion"]).glob("training_log_*.txt")).read_text()
    assert "offline cache" in log

    # one-page summary
    assert (workdir / "summary.png").read_bytes()[:8] == PNG
    print(f"demo --fast took {seconds:.0f} s")


@pytest.mark.slow
def test_demo_rerun_reuses_steps(demo_run):
    workdir, _, _ = demo_run
    t0 = time.perf_counter()
    r = _demo(workdir, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("already done") == 5
    assert time.perf_counter() - t0 < 120


def test_demo_refuses_workdir_of_other_settings(tmp_path):
    from lesiondiffusion.demo import Demo

    d = Demo(tmp_path, fast=True)
    d._mark("data", {"dataset": "x"})
    other = Demo(tmp_path, fast=False)
    from lesiondiffusion.errors import LesionDiffusionError

    with pytest.raises(LesionDiffusionError, match="--restart"):
        other.check_workdir()
    # --restart removes only the demo's own outputs
    keep = tmp_path / "my_notes.txt"
    keep.write_text("mine")
    other.restart()
    other.check_workdir()
    assert keep.exists() and not (tmp_path / "steps").exists()


def test_demo_trainer_variants_are_found_by_nnunet(monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from lesiondiffusion.demo import PRESETS
    from lesiondiffusion.nnunet_integration.discovery import ext_trainer_dir
    from lesiondiffusion.evaluation.segmentation import SETTINGS

    monkeypatch.setenv("nnUNet_extTrainer", str(ext_trainer_dir()))
    for settings in PRESETS.values():
        for _, base in SETTINGS.values():
            name = base + settings.trainer_suffix
            cls = recursive_find_trainer_class_by_name(name)
            assert issubclass(cls, nnUNetTrainer) and cls.__name__ == name
    recipe = recursive_find_trainer_class_by_name("nnUNetTrainerLesionDiffusion_fewshotcpu")
    assert (recipe.epochs, recipe.iterations, recipe.batch) == (10, 50, 16)
