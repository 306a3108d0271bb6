"""Reports derived from images (`report derive`, `pretrain prepare --derive-reports`) on phantoms with
known reports and on the shared example CT."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import yaml

from lesiondiffusion.cli import main
from lesiondiffusion.derive import THRESHOLDS, derive_reports, thresholds_markdown
from lesiondiffusion.io import save_nifti
from lesiondiffusion.organs import load_organ_map, organ_map_from_array
from lesiondiffusion.phantoms import make_phantom, write_phantom_dataset
from lesiondiffusion.pretrain import data as pdata


def test_derived_report_of_a_phantom_records_what_chose_each_attribute(tmp_path, capsys):
    ph = make_phantom((48, 48, 32), (2.5, 2.5, 3.5), seed=4, lesion_types=["kidney_cyst"])
    truth = ph.reports[0]
    for name, arr in (("ct", ph.ct), ("mask", ph.lesion), ("seg", ph.organs)):
        save_nifti(tmp_path / f"{name}.nii.gz", arr, ph.affine)
    out = tmp_path / "derived.yaml"
    assert main(["report", "derive", "--ct", str(tmp_path / "ct.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"),
                 "--organs", str(tmp_path / "seg.nii.gz"), "--mapping", "v2", "--enhancement", ph.enhancement,
                 "--lesion-type", "kidney_cyst", "-o", str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    (entry,) = doc["lesions"]
    rep, derived = entry["report"], entry["derived"]
    assert rep["organ"] == truth.organ == "kidney" and rep["organ_type"] == "parenchymal organ"
    assert rep["enhancement"] == truth.enhancement and rep["size"] == truth.size
    assert rep["density"] == truth.density  # painted from the catalog's range, read back through it
    assert 0 < derived["lesion_location"]["inside_fraction"] <= 1 and derived["shape"]["convexity"] > 0.5
    assert derived["density"]["lesion_mean_hu"] is not None and derived["size_mm"]["value"] == rep["size_mm"]
    # the file is a reportsTr file as pretraining reads it
    assert len(pdata.parse_report_entries(out, {1: "kidney_cyst"}, problems := [])) == 1 and not problems
    assert all(t.attribute.split()[0].strip(",") in thresholds_markdown() for t in THRESHOLDS)


def test_pretrain_prepare_derives_missing_reports_only(tmp_path, capsys):
    ds = write_phantom_dataset(tmp_path, n_healthy=1, lesion_types=["liver_tumor", "kidney_cyst"],
                               shape=(40, 40, 24), spacing=(3.0, 3.0, 4.0), seed=2, progress=False)
    kept = ds / "reportsTr" / "ldphantom_001.yaml"
    before = kept.read_bytes()
    (ds / "reportsTr" / "ldphantom_002.yaml").unlink()
    assert main(["pretrain", "prepare", str(ds), "--derive-reports"]) == 0
    out = capsys.readouterr().out
    assert "derived 1 report(s)" in out and "1 report file(s) written" in out and "OK (3 cases" in out
    assert kept.read_bytes() == before  # an existing report is never touched
    doc = yaml.safe_load((ds / "reportsTr" / "ldphantom_002.yaml").read_text())
    assert doc["lesions"][0]["report"]["lesion_type"] == "kidney_cyst"  # the dataset.json label name
    assert doc["lesions"][0]["report"]["organ"] == "kidney"
    assert main(["pretrain", "prepare", str(ds)]) == 2  # nothing asked for


def test_derive_on_the_example_ct(shared_ct_dir):
    img = nib.load(str(shared_ct_dir / "example_ct_sm.nii.gz"))
    ct = np.asanyarray(img.dataobj).astype(np.float32)
    organs = load_organ_map(shared_ct_dir / "example_seg.nii.gz", "v2")
    liver = organs.mask(["liver"])
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(np.pad(liver, 1))[1:-1, 1:-1, 1:-1]  # the scan's border is outside
    c = np.unravel_index(int(np.argmax(depth)), liver.shape)
    g = np.indices(liver.shape)
    mask = (sum((g[a] - c[a]) ** 2 for a in range(3)) <= 3 ** 2).astype(np.uint8)  # 7 voxels = 21 mm across
    mask[~liver] = 0
    ct_les = ct.copy()
    ct_les[mask.astype(bool)] -= 60  # a hypodense lesion
    (entry,) = derive_reports(ct_les, mask, organs, enhancement="enhanced CT", lesion_type="liver_tumor")
    rep = entry["report"]
    assert rep["organ"] == "liver" and rep["lesion_location"] == "within the parenchymal organ"
    assert rep["size_mm"] == [21.0, 21.0, 21.0] and rep["shape"] == "round-like"
    assert entry["derived"]["density"]["lesion_mean_hu"] < entry["derived"]["density"]["organ_mean_hu"] - 40
    with pytest.raises(Exception, match="no voxel"):
        derive_reports(ct, mask, organs, label=3)
