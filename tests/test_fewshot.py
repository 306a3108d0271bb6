"""The few-shot protocol's data layout and its aggregation over seeds (the nnU-Net runs themselves are
exercised end to end by tests/test_demo.py)."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.fewshot import FewShotData, FewShotStudy, format_fewshot_markdown, write_fewshot_dataset

PNG = b"\x89PNG\r\n\x1a\n"


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


def test_summary_is_mean_and_sd_over_seeds_per_setting_and_generator(tmp_path):
    study = FewShotStudy(workdir=tmp_path, dataset_dir=tmp_path / "Dataset977_FS", lesion_types=("liver_tumor",),
                         generators=("rule_based",), settings=("real", "synthetic_real"), seeds=(0, 1, 2))
    assert study.jobs() == [(s, g, seed) for seed in (0, 1, 2) for s, g in (("real", None), ("synthetic_real", "rule_based"))]
    rows = []
    for seed, (real, synth) in enumerate(((0.1, 0.2), (0.2, 0.3), (0.3, 0.7))):
        for setting, gen, d in (("real", "-", real), ("synthetic_real", "rule_based", synth)):
            rows.append({"setting": setting, "generator": gen, "seed": seed, "dice": {"liver_tumor": d},
                         "per_case": [{"case": "c0", "dice": {1: d}}]})
    out = study.write_results(rows)
    by = {(e["setting"], e["generator"]): e for e in out["summary"]}
    real, synth = by[("Real only", "-")], by[("Synthetic then real", "rule_based")]
    assert real["seeds"] == 3 and math.isclose(real["liver_tumor_mean"], 0.2)
    assert math.isclose(real["liver_tumor_sd"], 0.1)  # sample sd over seeds
    assert math.isclose(synth["liver_tumor_mean"], 0.4) and math.isclose(synth["liver_tumor_sd"], float(np.std([0.2, 0.3, 0.7], ddof=1)))
    md = out["markdown"].read_text()
    assert "| Real only | - | 3 | 20.0 ± 10.0 |" in md and "| Synthetic then real | rule_based | 3 | 40.0 ± 26.5 |" in md
    assert out["png"].read_bytes()[:8] == PNG
    assert (tmp_path / "fewshot_per_case.csv").read_text().count("\n") == 7  # header + 6 runs x 1 case
    one = format_fewshot_markdown([{"setting": "Real only", "generator": "-", "seeds": 1, "liver_tumor_mean": 0.5,
                                    "liver_tumor_sd": math.nan}], ["liver_tumor"])
    assert "| 50.0 |" in one  # one seed: no sd shown


def test_lesiondiffusion_generators_need_a_bundle(tmp_path):
    with pytest.raises(LesionDiffusionError, match="bundle"):
        FewShotStudy(workdir=tmp_path, dataset_dir=tmp_path, lesion_types=("liver_tumor",))
    with pytest.raises(LesionDiffusionError, match="Unknown generator"):
        FewShotStudy(workdir=tmp_path, dataset_dir=tmp_path, lesion_types=("liver_tumor",), generators=("gan",))
