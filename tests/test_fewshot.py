"""The few-shot dataset layout and the few-shot preset of the segmentation protocol (the protocol's runs,
tables and parallel scheduling are tested in tests/test_evaluate.py; the preset end to end by tests/test_demo.py)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.evaluation.segmentation import Run, SegmentationProtocol
from lesiondiffusion.fewshot import FewShotData, FewShotStudy, write_fewshot_dataset


def test_fewshot_dataset_has_k_lesion_cases_healthy_templates_and_a_separate_test_set(tmp_path):
    data = FewShotData(lesion_types=("liver_tumor",), k_real=2, n_healthy=2, n_test_per_type=2,
                       shape=(40, 40, 24), spacing=(4.0, 4.0, 6.0), dataset_id=977, name="FS")
    ds = write_fewshot_dataset(tmp_path, data, progress=False)
    labels = sorted((ds / "labelsTr").glob("*.nii.gz"))
    with_lesion = [p for p in labels if np.asarray(nib.load(p).dataobj).any()]
    assert len(labels) == 4 and len(with_lesion) == 2
    tests = sorted((ds / "labelsTs").glob("*.nii.gz"))
    assert len(tests) == 2 and all(np.asarray(nib.load(p).dataobj).max() == 1 for p in tests)
    assert len(list((ds / "organsTs").glob("*.nii.gz"))) == 2
    train_imgs = {np.asarray(nib.load(p).dataobj).tobytes() for p in (ds / "imagesTr").glob("*.nii.gz")}
    assert not any(np.asarray(nib.load(p).dataobj).tobytes() in train_imgs for p in (ds / "imagesTs").glob("*.nii.gz"))
    with pytest.raises(LesionDiffusionError, match="n_test_per_type"):
        write_fewshot_dataset(tmp_path, FewShotData(n_test_per_type=0), progress=False)


def test_study_is_the_protocol_with_the_cpu_recipe_and_the_schedule_knobs(tmp_path):
    """FewShotStudy only presets SegmentationProtocol: recipe, seeds, parallel runs, and the knobs in
    every synthetic run's lesiondiffusion.yaml (and in its reuse identity)."""
    ds = tmp_path / "raw" / "Dataset977_FS"
    study = FewShotStudy(workdir=tmp_path / "w", dataset_dir=ds, bundle=tmp_path / "bundle",
                         generators=("rule_based", "lesiondiffusion"), settings=("real", "synthetic_real"),
                         seeds=(0, 1, 2), synthetic_cases=8, ddim_steps=4, hu_correction="off", pretrain_fraction=0.3,
                         synthetic_probability=1.0, finetune_synthetic_probability=0.1, parallel=3,
                         env={"PATH": "/usr/bin"})
    p = study.protocol()
    assert isinstance(p, SegmentationProtocol)
    assert (p.dataset, p.out_dir, p.configuration, p.fold, p.parallel, p.sources, p.seeds) == (
        ds.name, tmp_path / "w", "2d", "all", 3, ("offline",), (0, 1, 2))
    assert [p.trainer(s) for s in ("real", "synthetic", "synthetic_real")] == [
        "nnUNetTrainer_fewshotcpu", "nnUNetTrainerLesionDiffusionSynthOnly_fewshotcpu",
        "nnUNetTrainerLesionDiffusion_fewshotcpu"]
    assert len(p.runs()) == 3 + 2 * 3
    env = p.env
    assert env["nnUNet_raw"] == str(ds.parent) and env["OMP_NUM_THREADS"] == "1"
    base = p.base_config({1: "liver_tumor"})
    ld = p.run_config(base, Run("synthetic_real", "lesiondiffusion", "offline", 2))
    assert ld["seed"] == 2 and ld["mode"] == "offline" and ld["synthetic_probability"] == 1.0
    assert ld["schedule"] == {"pretrain_fraction": 0.3, "finetune_synthetic_probability": 0.1}
    assert ld["generator"]["hu_correction"] == "off" and ld["generator"]["options"] == {"ddim_steps": 4}
    assert ld["generator"]["bundle"] == str((tmp_path / "bundle").resolve())
    assert ld["catalogs"] == [{"name": "liver_tumor", "label": "liver_tumor"}]
    assert "/caches/lesiondiffusion__n8__" in ld["offline"]["cache_dir"]
    rb = p.run_config(base, Run("synthetic_real", "rule_based", "offline", 2))
    assert rb["generator"] == {"device": "cpu", "backend": "rule_based"}
    # a changed knob or seed is another run: nothing finished with other settings is reused
    run = Run("synthetic_real", "lesiondiffusion", "offline", 2)
    other = FewShotStudy(workdir=tmp_path / "w", dataset_dir=ds, bundle=tmp_path / "bundle", pretrain_fraction=0.6)
    po = other.protocol()
    assert po.identity(run, po.run_config(po.base_config({1: "liver_tumor"}), run)) != p.identity(run, ld)
    assert p.identity(Run("real", None, None, 0), None) != p.identity(Run("real", None, None, 1), None)
    online = FewShotStudy(workdir=tmp_path, dataset_dir=ds, generators=("rule_based",), synthetic_cases=None)
    assert online.protocol().sources == ("online",)


def test_lesiondiffusion_generators_need_a_bundle(tmp_path):
    with pytest.raises(LesionDiffusionError, match="bundle"):
        FewShotStudy(workdir=tmp_path, dataset_dir=tmp_path)
    with pytest.raises(LesionDiffusionError, match="Unknown or no generator"):
        FewShotStudy(workdir=tmp_path, dataset_dir=tmp_path, generators=("gan",))
