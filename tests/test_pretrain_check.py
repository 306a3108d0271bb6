"""`lesiondiffusion pretrain check` and the one-time preparation cache (tiny toy datasets)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from lesiondiffusion.cli import main
from lesiondiffusion.errors import DataCheckError
from lesiondiffusion.io import save_nifti
from lesiondiffusion.pretrain import data as pdata
from toydata import write_toy_dataset  # benchmarks/toydata.py (conftest puts benchmarks/ on the path)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "ds", n_lesion=3, n_healthy=1,
                             shape=(20, 20, 12), seed=1)


def _copy(clean: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ds"
    shutil.copytree(clean, out)
    return out


def _reports(ds: Path, case: str) -> dict:
    return yaml.safe_load((ds / "reportsTr" / f"{case}.yaml").read_text())


def _write_reports(ds: Path, case: str, doc: dict) -> None:
    (ds / "reportsTr" / f"{case}.yaml").write_text(yaml.safe_dump(doc))


def test_clean_dataset_passes(clean, capsys):
    assert pdata.check_dataset(clean) == []
    assert main(["pretrain", "check", str(clean)]) == 0
    out = capsys.readouterr().out
    # 3 toy lesions: OK to train on, with the one warning that they cannot teach the catalog's prompts
    assert "OK (4 cases, 1 warning(s) above)" in out and "kidney_tumor prompts in the training reports: shape:" in out


def test_check_lists_every_defect_at_once(clean, tmp_path, capsys):
    ds = _copy(clean, tmp_path)
    # 1 missing file
    (ds / "organsTr" / "toy_000.nii.gz").unlink()
    # 2 shape mismatch: organ map of another size
    img = nib.load(str(ds / "organsTr" / "toy_001.nii.gz"))
    save_nifti(ds / "organsTr" / "toy_001.nii.gz", np.asanyarray(img.dataobj)[:-2], img.affine)
    # 3 affine mismatch: lesion map shifted by 5 mm
    img = nib.load(str(ds / "labelsTr" / "toy_002.nii.gz"))
    shifted = img.affine.copy()
    shifted[0, 3] += 5.0
    save_nifti(ds / "labelsTr" / "toy_002.nii.gz", np.asanyarray(img.dataobj), shifted)
    # 4 report failing the schema + 5 label not in dataset.json + 6 zero-size lesion (component 3)
    doc = _reports(ds, "toy_001")
    bad = json.loads(json.dumps(doc["lesions"][0]))
    bad["report"]["shape"] = "star-shaped"
    unknown = json.loads(json.dumps(doc["lesions"][0]))
    unknown["label"] = 7
    doc["lesions"] = [dict(doc["lesions"][0], component=3), bad, unknown]
    _write_reports(ds, "toy_001", doc)
    # 7 lesion voxels with a label dataset.json does not have; 8 NaN in the CT
    img = nib.load(str(ds / "labelsTr" / "toy_003.nii.gz"))
    arr = np.asanyarray(img.dataobj).copy()
    arr[0, 0, 0] = 5
    save_nifti(ds / "labelsTr" / "toy_003.nii.gz", arr, img.affine)
    ct = nib.load(str(ds / "imagesTr" / "toy_003_0000.nii.gz"))
    carr = np.asanyarray(ct.dataobj).astype(np.float32)
    carr[1, 1, 1] = np.nan
    save_nifti(ds / "imagesTr" / "toy_003_0000.nii.gz", carr, ct.affine)

    problems = pdata.check_dataset(ds)
    text = "\n".join(problems)
    assert "missing" in text and "organsTr/toy_000.nii.gz" in text
    assert "toy_001.nii.gz has shape (18, 20, 12)" in text
    assert "affine differs" in text and "labelsTr/toy_002.nii.gz" in text
    assert "'star-shaped'" in text and "lesions[1].report" in text
    assert "lesions[2].label = 7 is not a lesion label in dataset.json" in text
    assert "lesions[0] refers to label 1 component 3, which has zero voxels" in text
    assert "label values [5]" in text
    assert "NaN" in text
    with pytest.raises(DataCheckError) as err:
        pdata.validate_dataset(ds)
    assert f"{len(problems)} problem(s)" in str(err.value)
    # the CLI prints the same complete list and fails
    assert main(["pretrain", "check", str(ds)]) == 2
    out = capsys.readouterr().err
    assert out.count("\n  - ") == len(problems) >= 8


def test_unreported_lesion_and_missing_report_and_bad_json(clean, tmp_path):
    ds = _copy(clean, tmp_path)
    _write_reports(ds, "toy_000", {"lesions": []})
    (ds / "reportsTr" / "toy_001.yaml").unlink()
    (ds / "reportsTr" / "toy_002.yaml").write_text("lesions: [label: 1\n")
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0,
                                                 "kidney_tumor": 1, "cyst": [2, 3]}}))
    text = "\n".join(pdata.check_dataset(ds))
    assert "no lesion entries although toy_000.nii.gz has labels [1]" in text
    assert "missing reportsTr/toy_001.yaml" in text
    assert "reportsTr/toy_002.yaml: cannot parse" in text
    assert "labels.cyst = [2, 3]" in text


def test_missing_root_files(tmp_path):
    problems = pdata.check_dataset(tmp_path)
    text = "\n".join(problems)
    assert "dataset.json: missing" in text and "imagesTr: folder missing" in text and "no cases found" in text
    assert pdata.check_dataset(tmp_path / "nope")[0].endswith("not a folder. Point --data at the dataset root "
                                                            "(with dataset.json, imagesTr, ...).")


def test_prepare_resamples_windows_crops_and_reuses_cache(clean, tmp_path):
    cfg = pdata.PrepConfig(spacing_mm=(3.0, 3.0, 3.0), hu_window=(-200.0, 200.0),
                           lmnet_crop=(8, 8, 8), linet_crop=(12, 12, 12), jitter=2)
    man = pdata.prepare_dataset(clean, tmp_path / "cache", cfg, progress=False)
    assert len(man.cases) == 4 and len(man.lesions) == 3
    vol = np.load(tmp_path / "cache" / man.cases[0]["image"])
    # (20, 20, 12) voxels at (2, 2, 3) mm -> (13, 13, 12) at 3 mm, values windowed into [-1, 1]
    assert vol.shape == (13, 13, 12) and vol.dtype == np.float16
    assert vol.min() >= -1 and vol.max() <= 1 and vol.min() == -1  # air clipped to the window floor
    with np.load(tmp_path / "cache" / man.lesions[0]["file"]) as z:
        assert z["image"].shape == (16, 16, 16) and z["lesion"].sum() > 0 and z["organ"].sum() > 0
    assert man.lesions[0]["organ_ids"] == [2]
    assert not list((tmp_path / "cache").rglob(".*"))  # no temp files left behind
    mtime = (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns
    again = pdata.prepare_dataset(clean, tmp_path / "cache", cfg, progress=False)
    assert (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns == mtime and again.lesions == man.lesions
    # a different setting invalidates the cache instead of silently reusing it
    other = pdata.prepare_dataset(clean, tmp_path / "cache", pdata.PrepConfig(
        spacing_mm=(2.0, 2.0, 3.0), hu_window=(-200.0, 200.0), lmnet_crop=(8, 8, 8), linet_crop=(12, 12, 12),
        jitter=2),
        progress=False)
    assert np.load(tmp_path / "cache" / other.cases[0]["image"]).shape == (20, 20, 12)

    from lesiondiffusion.report import vocabulary_phrases

    index = {p: i for i, p in enumerate(vocabulary_phrases())}
    ds = pdata.LesionCropDataset(other, (8, 8, 8), index, kind="image", seed=0)
    a, b = ds[1], ds[1]
    assert all(np.array_equal(a[k], b[k]) for k in a)  # same (seed, epoch, index) -> same sample
    ds.set_epoch(1)
    from lesiondiffusion.report import IMAGE_ATTRIBUTES

    assert a["box"].sum() > 0 and a["phrase_ids"].shape == (len(IMAGE_ATTRIBUTES),)
    assert all(les["coarsen"] < 2 for les in other.lesions)  # toy lesions of 4-6 voxels are not shrunk to a dot


def test_prepare_refuses_bad_dataset(clean, tmp_path):
    ds = _copy(clean, tmp_path)
    (ds / "labelsTr" / "toy_000.nii.gz").unlink()
    cfg = pdata.PrepConfig(spacing_mm=(3.0, 3.0, 3.0), hu_window=(-200.0, 200.0),
                           lmnet_crop=(8, 8, 8), linet_crop=(8, 8, 8))
    with pytest.raises(DataCheckError, match="labelsTr/toy_000.nii.gz"):
        pdata.prepare_dataset(ds, tmp_path / "cache", cfg, progress=False)
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_check_warns_on_unknown_type_absent_organ_and_wrong_size(clean, tmp_path, capsys):
    ds = _copy(clean, tmp_path)
    case = sorted(p.stem for p in (ds / "reportsTr").glob("*.yaml") if _reports(ds, p.stem)["lesions"])[0]
    doc = _reports(ds, case)
    doc["lesions"][0]["report"]["lesion_type"] = "my_sarcoma"
    doc["lesions"][0]["report"]["organ"] = "liver"         # the toy organ map holds a kidney only
    doc["lesions"][0]["report"]["size_mm"] = [90, 80, 80]  # the toy lesions are ~10-20 mm
    doc["lesions"][0]["report"]["size"] = "large (>5 cm)"
    _write_reports(ds, case, doc)
    assert pdata.check_dataset(ds) == []  # pretraining can go ahead
    text = "\n".join(pdata.check_dataset_warnings(ds))
    assert "'my_sarcoma' has no catalog" in text
    assert "organ = 'liver': its classes liver have no voxel" in text
    assert "size_mm = [90.0, 80.0, 80.0] but the mask measures" in text
    assert pdata.check_dataset_warnings(clean) == []  # consistent reports: no warning
    assert main(["pretrain", "check", str(ds)]) == 0
    out = capsys.readouterr().out
    # the three above, and the toy set's too few examples per prompt value (its own test is below)
    assert out.count("warning: ") == 4 and "4 warning(s) above" in out


def test_check_counts_prompt_values_and_warns_on_values_the_data_cannot_teach(clean, tmp_path):
    from lesiondiffusion.catalog import load_catalog
    from lesiondiffusion.pretrain.check import prompt_coverage

    ds = _copy(clean, tmp_path)
    counts, warnings = prompt_coverage(ds)
    shapes = counts["kidney_tumor"]["shape"]
    assert sum(shapes.values()) == 3  # one count per lesion report
    assert len(warnings) == 1 and "kidney_tumor: of 3 training lesion(s), fewer than 5" in warnings[0]
    asked = [v for v, w in load_catalog("kidney_tumor").domain("shape").items() if w > 0]
    assert all(f"shape '{v}' ({shapes.get(v, 0)})" in warnings[0] for v in asked)
    # enough examples of every value a catalog samples: no warning for that attribute
    _, few = prompt_coverage(ds, attributes=("shape",), min_examples=0)
    assert few == []
    # a value the data shows often enough drops out of the warning, the rest stay
    top = max(shapes, key=shapes.get)
    _, one = prompt_coverage(ds, attributes=("shape",), min_examples=shapes[top])
    assert f"shape '{top}'" not in one[0] and len(one) == 1


def test_measured_extent_follows_the_affine():
    from lesiondiffusion.derive import measure_extent_mm

    mask = np.zeros((10, 10, 10), bool)
    mask[2:6, 3:5, 4:5] = True  # 4 x 2 x 1 voxels
    assert measure_extent_mm(mask, np.diag([2.0, 3.0, 5.0, 1.0])) == (8.0, 6.0, 5.0)
    swapped = np.array([[0, 3.0, 0, 0], [-2.0, 0, 0, 0], [0, 0, 5.0, 0], [0, 0, 0, 1]])  # axes permuted, flipped
    assert measure_extent_mm(mask, swapped) == (6.0, 8.0, 5.0)


def test_lesions_larger_than_the_crop_are_stored_coarser_not_truncated(clean, tmp_path):
    # crops of 4 voxels (3 mm): every toy lesion (>= 8 mm) is larger than the room left by the jitter
    cfg = pdata.PrepConfig(spacing_mm=(3.0, 3.0, 3.0), hu_window=(-200.0, 200.0),
                           lmnet_crop=(4, 4, 4), linet_crop=(6, 6, 6), jitter=1)
    man = pdata.prepare_dataset(clean, tmp_path / "cache", cfg, progress=False)
    assert man.lesions and all(not rec["truncated"] for rec in man.lesions)
    big = [rec for rec in man.lesions if rec["coarsen"] > 1]
    assert big
    for rec in big:
        with np.load(tmp_path / "cache" / rec["file"]) as z:
            lesion = z["lesion"].astype(bool)
        assert lesion.any() and lesion.shape == cfg.crop_store()
        room = slice(cfg.jitter, cfg.crop_store()[0] - cfg.jitter)
        assert lesion[room, room, room].sum() == lesion.sum()  # whole, inside the jittered network crop
        # the stored lesion spans the room the crop leaves, as its extent says it should after coarsening
        assert max(np.ptp(np.argwhere(lesion), axis=0) + 1) >= max(rec["extent"]) / rec["coarsen"] - 1.5


def test_crop_scaled_is_crop_at_without_coarsening():
    arr = np.arange(10 * 10 * 10, dtype=np.float32).reshape(10, 10, 10)
    assert np.array_equal(pdata.crop_scaled(arr, (5, 5, 5), (4, 4, 4), 1.0, -1, order=1), pdata.crop_at(arr, (5, 5, 5), (4, 4, 4), -1))
    half = pdata.crop_scaled(arr, (4, 4, 4), (4, 4, 4), 2.0, -1, order=1)
    assert half[2, 2, 2] == arr[4, 4, 4] and half[3, 2, 2] == arr[6, 4, 4]  # every second voxel
