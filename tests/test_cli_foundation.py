"""End-to-end CLI tests for the foundation commands: catalogs, report sample/check, place."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from lesiondiffusion.cli import main

CATALOG_DIR = Path(__file__).resolve().parents[1] / "attribute_catalogs"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def phantom_seg(tmp_path) -> Path:
    """A small anisotropic TotalSegmentator-v2 label map: liver, both kidneys, stomach."""
    shape = (48, 40, 20)
    g = np.ogrid[0:48, 0:40, 0:20]
    labels = np.zeros(shape, np.uint8)

    def ball(c, r):
        return sum(((x - ci) / ri) ** 2 for x, ci, ri in zip(g, c, r)) <= 1

    labels[ball((16, 20, 10), (12, 14, 7))] = 5    # liver
    labels[ball((38, 12, 8), (5, 5, 3))] = 2       # kidney_right
    labels[ball((38, 30, 8), (5, 5, 3))] = 3       # kidney_left
    labels[ball((36, 21, 14), (6, 6, 4))] = 6      # stomach
    aff = np.array([[-1.5, 0, 0, 40.0], [0, -1.5, 0, 20.0], [0, 0, 3.0, -50.0], [0, 0, 0, 1]])
    path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(labels, aff), str(path))
    return path


def test_console_entry_point_lists_catalogs():
    exe = shutil.which("lesiondiffusion")
    cmd = [exe] if exe else [sys.executable, "-m", "lesiondiffusion"]
    res = subprocess.run(cmd + ["catalogs", "list"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    names = [line.split()[0] for line in res.stdout.splitlines()]
    assert len(names) == 16 and {"hematencephalon", "soft_tissue_sarcoma"} <= set(names) and "_template" not in names


def test_catalogs_validate_good_and_bad(capsys, tmp_path):
    rc, out, _ = _run(capsys, "catalogs", "validate", str(CATALOG_DIR / "kidney_tumor.yaml"), str(CATALOG_DIR / "gallstone.yaml"))
    assert rc == 0 and out.count("OK") == 2
    bad = tmp_path / "bad.yaml"
    text = (CATALOG_DIR / "gallstone.yaml").read_text().replace("nodular: 0.3", "starry: 0.3")
    bad.write_text(text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "starry" in l)
    rc, _, err = _run(capsys, "catalogs", "validate", str(bad))
    assert rc == 2 and f"{bad}:{line}: attributes.shape.starry" in err and "unknown value 'starry'" in err


def test_catalogs_vocabulary_and_show(capsys):
    rc, out, _ = _run(capsys, "catalogs", "vocabulary", "--synonyms")
    assert rc == 0 and "hypoattenuating lesion" in out and "density_variations:" in out
    rc, out, _ = _run(capsys, "catalogs", "show", "kidney_stone")
    assert rc == 0 and "HU non-contrast CT: hyperdense [250, 1500]" in out and "stones are hyperdense" in out


def test_report_sample_stdout_file_and_fixed_values(capsys, tmp_path):
    rc, out, _ = _run(capsys, "report", "sample", "liver_cyst", "--seed", "5")
    assert rc == 0
    d = yaml.safe_load(out)
    assert d["lesion_type"] == "liver_cyst" and len(d["size_mm"]) == 3
    rc, out2, _ = _run(capsys, "report", "sample", "liver_cyst", "--seed", "5")
    assert out2 == out  # seeded
    target = tmp_path / "r.yaml"
    rc, _, _ = _run(capsys, "report", "sample", "kidney_tumor", "--seed", "1", "--set", "density=low density lesion",
                    "--set", "size_mm=22,18,20", "-o", str(target))
    d = yaml.safe_load(target.read_text())
    assert rc == 0 and d["density"] == "hypodense" and d["size_mm"] == [22.0, 18.0, 20.0] and d["size"] == "medium (2-5 cm)"
    rc, out, _ = _run(capsys, "report", "check", str(target))
    assert rc == 0 and "shape:" in out and "density variations:" in out
    rc, _, _ = _run(capsys, "report", "sample", "kidney_tumor", "-o", str(tmp_path / "r.json"))
    assert rc == 0 and json.loads((tmp_path / "r.json").read_text())["lesion_type"] == "kidney_tumor"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--set", "density"], "expected KEY=VALUE"),
        (["--set", "shape=cystic", "--set", "density=hypodense"], "cystic means fluid and homogeneous"),
        (["--set", "density=sparkly"], "Unknown value 'sparkly'"),
        (["--set", "shape=cystic", "--set", "shape=oval"], "given twice"),
    ],
)
def test_report_sample_bad_set(capsys, args, fragment):
    rc, _, err = _run(capsys, "report", "sample", "liver_cyst", *args)
    assert rc == 2 and fragment in err


def test_report_sample_unknown_type(capsys):
    rc, _, err = _run(capsys, "report", "sample", "spleen_tumor")
    assert rc == 2 and "Unknown lesion type 'spleen_tumor'" in err and "kidney_tumor" in err


def test_report_check_rejects_a_report_outside_its_catalog(capsys, tmp_path):
    p = tmp_path / "r.yaml"
    rc, _, _ = _run(capsys, "report", "sample", "gallstone", "-o", str(p))
    d = yaml.safe_load(p.read_text())
    d["density"] = "ground-glass opacity"
    p.write_text(yaml.safe_dump(d))
    rc, _, err = _run(capsys, "report", "check", str(p))
    assert rc == 2 and "density='ground-glass opacity' is not allowed" in err


def test_place_end_to_end_keeps_affine_and_inputs(capsys, tmp_path, phantom_seg):
    report = tmp_path / "r.yaml"
    _run(capsys, "report", "sample", "kidney_tumor", "--seed", "2", "--set", "size_mm=12,10,9",
         "--set", "lesion_location=within the parenchymal organ", "-o", str(report))
    before = (_sha(phantom_seg), _sha(report))
    out_json, out_nii = tmp_path / "out" / "bbox.json", tmp_path / "out" / "box.nii.gz"
    rc, out, err = _run(capsys, "place", "--organs", str(phantom_seg), "--report", str(report), "-o", str(out_json),
                        "--mask-out", str(out_nii), "--seed", "3", "--mapping", "v2")
    assert rc == 0, err
    assert (_sha(phantom_seg), _sha(report)) == before
    box = json.loads(out_json.read_text())
    assert box["category"] == "within_parenchyma" and set(box["organ_names"]) <= {"kidney_left", "kidney_right"}
    lo, hi = box["voxel"]["lo"], box["voxel"]["hi_exclusive"]
    assert [b - a for a, b in zip(lo, hi)] == [8, 7, 3]  # 12/1.5, 10/1.5 rounded, 9/3
    seg_img, mask_img = nib.load(str(phantom_seg)), nib.load(str(out_nii))
    assert np.allclose(mask_img.affine, seg_img.affine)
    mask = np.asarray(mask_img.dataobj)
    assert mask.shape == seg_img.shape and mask.sum() == np.prod([b - a for a, b in zip(lo, hi)])
    assert mask[tuple(slice(a, b) for a, b in zip(lo, hi))].all()
    # world coordinates follow the (flipped) affine
    aff = seg_img.affine
    centre = np.asarray(box["voxel"]["center"])
    assert np.allclose(box["world_mm"]["center"], aff[:3, :3] @ centre + aff[:3, 3], atol=1e-3)
    # same seed -> same box
    rc, _, _ = _run(capsys, "place", "--organs", str(phantom_seg), "--report", str(report), "-o", str(tmp_path / "again.json"),
                    "--seed", "3")
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["voxel"] == box["voxel"] and again["mapping"] == "auto->v2"


def test_place_refuses_to_overwrite_inputs_and_reports_missing_organ(capsys, tmp_path, phantom_seg):
    report = tmp_path / "r.yaml"
    _run(capsys, "report", "sample", "pancreatic_tumor", "-o", str(report))
    before = _sha(phantom_seg)
    rc, _, err = _run(capsys, "place", "--organs", str(phantom_seg), "--report", str(report), "-o", str(tmp_path / "b.json"),
                      "--mask-out", str(phantom_seg))
    assert rc == 2 and "inputs are never overwritten" in err and _sha(phantom_seg) == before
    rc, _, err = _run(capsys, "place", "--organs", str(phantom_seg), "--report", str(report), "-o", str(tmp_path / "b.json"))
    assert rc == 2 and "Organ 'pancreas'" in err and "labels present: kidney_right, kidney_left, liver, stomach" in err
    assert not (tmp_path / "b.json").exists()  # no partial output on failure


def test_place_with_a_json_mapping(capsys, tmp_path, phantom_seg):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"liver": 5, "kidney_right": 2, "kidney_left": 3, "stomach": 6}))
    report = tmp_path / "r.yaml"
    _run(capsys, "report", "sample", "gastric_cancer", "--seed", "4", "--set", "lesion_location=wall thickening",
         "--set", "size_mm=12,9,8", "-o", str(report))
    rc, out, err = _run(capsys, "place", "--organs", str(phantom_seg), "--report", str(report), "-o", str(tmp_path / "b.json"),
                        "--mapping", str(mapping))
    assert rc == 0, err
    box = json.loads((tmp_path / "b.json").read_text())
    assert box["category"] == "wall" and box["organ_names"] == ["stomach"] and box["mapping"] == str(mapping)


def test_place_on_the_real_ct(capsys, tmp_path, shared_ct_dir):
    seg = shared_ct_dir / "example_seg_fast_force_split.nii.gz"
    report = tmp_path / "r.yaml"
    _run(capsys, "report", "sample", "bladder_cancer", "--seed", "0", "-o", str(report))
    rc, out, err = _run(capsys, "place", "--organs", str(seg), "--report", str(report), "-o", str(tmp_path / "b.json"),
                        "--mask-out", str(tmp_path / "box.nii.gz"))
    assert rc == 0, err
    box = json.loads((tmp_path / "b.json").read_text())
    labels = np.asarray(nib.load(str(seg)).dataobj)
    c = np.round(box["voxel"]["center"]).astype(int)
    assert labels[tuple(c)] == 21  # urinary_bladder, v2 id
    assert np.allclose(nib.load(str(tmp_path / "box.nii.gz")).affine, nib.load(str(seg)).affine)


def test_catalogs_list_marks_a_broken_user_catalog_and_lists_the_rest(capsys, tmp_path, monkeypatch):
    (tmp_path / "broken_type.yaml").write_text("name: broken_type\norgan_type: parenchymal organ\norgans: [\n")
    shutil.copy(CATALOG_DIR / "kidney_cyst.yaml", tmp_path / "my_cyst.yaml")
    text = (tmp_path / "my_cyst.yaml").read_text().replace("name: kidney_cyst", "name: my_cyst")
    (tmp_path / "my_cyst.yaml").write_text(text)
    monkeypatch.setenv("LESIONDIFFUSION_CATALOG_PATH", str(tmp_path))
    rc, out, _ = _run(capsys, "catalogs", "list")
    assert rc == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line[0].isdigit()}
    assert "BROKEN" in lines["broken_type"] and "YAML syntax error" in lines["broken_type"]
    assert "broken_type.yaml" in lines["broken_type"]
    assert len(lines) == 18 and "BROKEN" not in lines["my_cyst"] and "BROKEN" not in lines["liver_tumor"]
    assert "1 of 18 catalog(s) are broken" in out
