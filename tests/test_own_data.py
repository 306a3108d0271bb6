"""A user's own mask-only data: tissue maps from HU, `dataset import`, `pretrain prepare --derive-reports`
and training, end to end on two real sarcoma CTs from ../shared (smoke scale)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from lesiondiffusion.cli import main
from lesiondiffusion.errors import DataCheckError, LesionDiffusionError
from lesiondiffusion.io import load_nifti, save_nifti
from lesiondiffusion.tissue import TISSUE_LABELS, tissue_map

SARCOMA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct" / "ibsi_sts_sarcoma"
needs_sarcoma = pytest.mark.skipif(not SARCOMA.is_dir(), reason="../shared sarcoma data not present")


def test_tissue_map_rules():
    ct = np.full((40, 40, 12), 45.0, np.float32)          # muscle
    ct[:, :8] = -1000                                      # air
    ct[:, 8:14] = -100                                     # subcutaneous fat
    yy, xx = np.mgrid[:40, :40]
    ring = (np.hypot(yy - 25, xx - 25) <= 7) & (np.hypot(yy - 25, xx - 25) > 4)
    core = np.hypot(yy - 25, xx - 25) <= 4
    ct[ring] = 900                                         # cortical bone ...
    ct[core] = -60                                         # ... around fatty marrow
    ct[5, 35, 6] = 400                                     # a one-voxel calcification
    lab = tissue_map(ct, (1.0, 1.0, 3.0))
    assert (lab[:, :6] == TISSUE_LABELS["air"]).mean() > 0.95
    assert (lab[:, 9:13] == TISSUE_LABELS["fat"]).mean() > 0.9
    assert (lab[core] == TISSUE_LABELS["bone"]).all()      # the marrow is bone, not fat
    assert lab[5, 35, 6] == TISSUE_LABELS["muscle"]        # too small to be bone
    assert (lab[30:38, 32:38] == TISSUE_LABELS["muscle"]).all()
    ct[0, 0, 0] = np.nan
    with pytest.raises(LesionDiffusionError, match="NaN"):
        tissue_map(ct, (1.0, 1.0, 3.0))


def test_tissue_map_cli(tmp_path, capsys):
    ct = np.full((20, 20, 8), 40.0, np.float32)
    ct[:, :5] = -1000
    save_nifti(tmp_path / "ct.nii.gz", ct, np.diag([1.0, 1.0, 3.0, 1.0]))
    assert main(["tissue-map", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "t.nii.gz")]) == 0
    lab = load_nifti(tmp_path / "t.nii.gz")[0]
    assert json.loads((tmp_path / "tissue_labels.json").read_text()) == TISSUE_LABELS
    assert (lab[:, :4] == TISSUE_LABELS["air"]).all() and (lab[:, 6:] == TISSUE_LABELS["muscle"]).all()
    # the smoothed air/tissue edge passes through fat HU: one voxel row, nowhere else
    assert set(np.unique(lab[:, 4:6])) <= {TISSUE_LABELS["air"], TISSUE_LABELS["fat"], TISSUE_LABELS["muscle"]}
    assert main(["tissue-map", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "ct.nii.gz")]) == 2  # never the input


def _fake_source(root: Path) -> None:
    aff = np.diag([-1.0, -1.0, 3.0, 1.0])  # LPS, like the sarcoma files
    for case in ("A", "B", "C"):
        (root / case).mkdir(parents=True)
        ct = np.full((24, 24, 8), 40.0, np.float32)
        ct[:, :4] = -1000
        save_nifti(root / case / "ct.nii.gz", ct, aff)
        m = np.zeros((24, 24, 8), np.uint8)
        if case != "C":
            m[8:14, 8:14, 2:5] = 7  # any non-zero value is lesion
        save_nifti(root / case / "gtv.nii.gz", m if case != "B" else m[:, :, :6], aff)


def test_dataset_import_reports_each_skip_and_refuses_overwrite(tmp_path):
    from lesiondiffusion.dataset_import import import_mask_dataset

    src = tmp_path / "src"
    _fake_source(src)
    before = {p: p.read_bytes() for p in src.rglob("*.nii.gz")}
    res = import_mask_dataset(src, tmp_path / "ds", "soft_tissue_sarcoma", mask="{case}/gtv.nii.gz")
    assert res.cases == ["A"]
    why = dict(res.skipped)
    assert "another grid" in why["B"] and "no lesion voxel" in why["C"]
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "soft_tissue_sarcoma": 1}
    assert meta["organ_mapping"] == "tissue_labels.json"
    assert set(np.unique(load_nifti(tmp_path / "ds" / "labelsTr" / "A.nii.gz")[0])) == {0, 1}
    assert {p: p.read_bytes() for p in src.rglob("*.nii.gz")} == before  # the source is never written
    with pytest.raises(DataCheckError, match="--overwrite"):
        import_mask_dataset(src, tmp_path / "ds", "soft_tissue_sarcoma", mask="{case}/gtv.nii.gz")
    with pytest.raises(DataCheckError, match="inside the source"):
        import_mask_dataset(src, src / "out", "soft_tissue_sarcoma", mask="{case}/gtv.nii.gz")
    with pytest.raises(DataCheckError, match=r"\{case\}"):
        import_mask_dataset(src, tmp_path / "x", "soft_tissue_sarcoma", mask="gtv.nii.gz")
    with pytest.raises(LesionDiffusionError, match="Unknown lesion type"):
        import_mask_dataset(src, tmp_path / "y", "no_such_type", mask="{case}/gtv.nii.gz")


def test_catalog_path_from_dataset_json(tmp_path):
    """A user's own catalog folder named in dataset.json is found without an exported variable."""
    from lesiondiffusion import catalog as cat_mod
    from lesiondiffusion.dataset_import import dataset_catalog_path

    cats = tmp_path / "my_catalogs"
    cats.mkdir()
    text = (Path(cat_mod.catalog_files()["soft_tissue_sarcoma"])).read_text().replace(
        "name: soft_tissue_sarcoma", "name: my_muscle_lesion").replace("label_name: soft_tissue_sarcoma",
                                                                         "label_name: my_muscle_lesion")
    (cats / "my_muscle_lesion.yaml").write_text(text)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps({"catalog_path": "../my_catalogs"}))
    saved = list(cat_mod._EXTRA_DIRS)
    try:
        assert dataset_catalog_path(tmp_path / "ds") == [cats.resolve()]
        assert cat_mod.load_catalog("my_muscle_lesion").name == "my_muscle_lesion"
        (tmp_path / "ds" / "dataset.json").write_text(json.dumps({"catalog_path": "../nowhere"}))
        with pytest.raises(LesionDiffusionError, match="nowhere.*does not exist"):
            dataset_catalog_path(tmp_path / "ds")
    finally:
        cat_mod._EXTRA_DIRS[:] = saved


@needs_sarcoma
@pytest.mark.slow
def test_sarcoma_three_commands_end_to_end(tmp_path, capsys):
    """README "your own data": import -> prepare --derive-reports -> train, on two real sarcoma CTs."""
    data = tmp_path / "sarcoma"
    assert main(["dataset", "import", str(SARCOMA), "--mask", "{case}/gtv.nii.gz", "--lesion-type",
                 "soft_tissue_sarcoma", "--cases", "STS_042", "STS_012", "-o", str(data)]) == 0
    assert main(["pretrain", "prepare", str(data), "--derive-reports"]) == 0
    out = capsys.readouterr().out
    assert "OK (2 cases" in out
    from lesiondiffusion.catalog import load_catalog
    from lesiondiffusion.report import LesionReport
    from lesiondiffusion.safeyaml import read_yaml

    cat = load_catalog("soft_tissue_sarcoma")
    for case in ("STS_042", "STS_012"):
        entries = read_yaml(data / "reportsTr" / f"{case}.yaml", "report", LesionDiffusionError)["lesions"]
        rep = LesionReport.from_dict(entries[0]["report"])
        assert rep.organ == "muscle" and rep.lesion_location == "within the parenchymal organ"
        assert rep.relationship == "no close relationship with surrounding organs"  # fat and bone are not organs
        assert cat.check_report(rep) == []
    assert main(["pretrain", "lmnet", "--data", str(data), "-o", str(tmp_path / "run"), "--steps", "2",
                 "--bundle", str(tmp_path / "bundle"), "--workers", "0", "--no-progress", "--preview-every", "0"]) == 0
    assert (tmp_path / "bundle" / "lmnet" / "model.safetensors").is_file()
    # prepared crops are in the canonical (RAS) order: the LPS files were flipped on the way in
    man = json.loads((tmp_path / "cache" / "manifest.json").read_text()) if (tmp_path / "cache").is_dir() else None
    if man is None:
        man = json.loads(next(tmp_path.rglob("manifest.json")).read_text())
    assert len(man["lesions"]) == 2
