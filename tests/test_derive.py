"""Reports derived from images (`report derive`, `pretrain prepare --derive-reports`) on phantoms with
known reports and on the shared example CT."""

from __future__ import annotations

import json
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


# --------------------------------------------------------------------------------------------------
# shape metrics against analytic values (the yardstick is geometry, not another mesh)
# --------------------------------------------------------------------------------------------------


def _ellipsoid_area(a: float, b: float, c: float) -> float:
    """Exact surface area of an ellipsoid (Legendre's form with incomplete elliptic integrals)."""
    import math

    from scipy.special import ellipeinc, ellipkinc

    a, b, c = sorted((a, b, c), reverse=True)
    if a - c < 1e-9:
        return 4 * math.pi * a * a
    phi = math.acos(c / a)
    m = (a * a * (b * b - c * c)) / (b * b * (a * a - c * c))
    s = math.sin(phi)
    return 2 * math.pi * c * c + 2 * math.pi * a * b / s * (ellipeinc(phi, m) * s * s + ellipkinc(phi, m) * math.cos(phi) ** 2)


def _sphericity(volume: float, area: float) -> float:
    return float(np.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area)


def _union_of_balls_truth(centers, radii, seed=0):
    """Volume, area and convexity of a union of balls by Monte Carlo: area = each sphere's share not inside
    another ball; volume from uniform points in the bounding box; hull from the exposed sphere points."""
    from scipy.spatial import ConvexHull

    rng = np.random.default_rng(seed)
    centers, radii = np.asarray(centers, float), np.asarray(radii, float)
    area, exposed = 0.0, []
    for i, (c, r) in enumerate(zip(centers, radii)):
        u = rng.normal(size=(200_000, 3))
        p = c + r * u / np.linalg.norm(u, axis=1, keepdims=True)
        covered = np.zeros(len(p), bool)
        for j, (c2, r2) in enumerate(zip(centers, radii)):
            if j != i:
                covered |= ((p - c2) ** 2).sum(1) < r2 * r2
        area += 4 * np.pi * r * r * (~covered).mean()
        exposed.append(p[~covered][:20_000])
    lo, hi = (centers - radii[:, None]).min(0), (centers + radii[:, None]).max(0)
    q = rng.uniform(lo, hi, size=(1_000_000, 3))
    inside = np.zeros(len(q), bool)
    for c, r in zip(centers, radii):
        inside |= ((q - c) ** 2).sum(1) < r * r
    volume = float(np.prod(hi - lo) * inside.mean())
    return _sphericity(volume, area), volume / ConvexHull(np.concatenate(exposed)).volume


def _world_grid(extent_mm, spacing, seed):
    """Voxel-centre coordinates (mm) of a grid covering +-extent/2 with a random sub-voxel offset, so the
    shapes are not aligned with the voxel grid in a lucky way."""
    spacing = np.asarray(spacing, float)
    n = np.ceil(np.asarray(extent_mm, float) / spacing).astype(int) + 4
    off = np.random.default_rng(seed).uniform(0, 1, 3) * spacing
    axes = [(np.arange(k) - k / 2) * s + o for k, s, o in zip(n, spacing, off)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


_ROT = np.array([[0.77, -0.34, 0.54], [0.53, 0.80, -0.27], [-0.34, 0.49, 0.80]])
_ROT, _ = np.linalg.qr(_ROT)  # an arbitrary rotation: ellipsoid axes oblique to the voxel grid
_BALLS5 = ([[0, 0, 0], [10, 2, 0], [-6, 8, 3], [2, -9, -4], [-3, 1, 10]], [7, 5, 5, 4.5, 5])
_BALLS2 = ([[-5, 0, 0], [6, 0, 0]], [8, 7])


def _known_shapes(spacing, scale):
    """(name, mask, true sphericity, true convexity) on this grid; sizes times ``scale``."""
    k = scale
    out = []
    g = _world_grid([2 * 10 * k] * 3, spacing, 1)
    out.append(("ball", ((g / (10 * k)) ** 2).sum(-1) <= 1, 1.0, 1.0))
    a, b, c = 16 * k, 10 * k, 7 * k
    g = _world_grid([2 * a] * 3, spacing, 2) @ _ROT
    out.append(("ellipsoid", ((g / [a, b, c]) ** 2).sum(-1) <= 1,
                _sphericity(4 / 3 * np.pi * a * b * c, _ellipsoid_area(a, b, c)), 1.0))
    for name, (cc, rr) in (("2 balls", _BALLS2), ("5 balls", _BALLS5)):
        cc, rr = np.asarray(cc, float) * k * 1.5 ** (name == "5 balls"), np.asarray(rr, float) * k * 1.5 ** (name == "5 balls")
        g = _world_grid(2 * (np.abs(cc) + rr[:, None]).max(0), spacing, 3)
        m = np.zeros(g.shape[:3], bool)
        for ci, ri in zip(cc, rr):
            m |= ((g - ci) ** 2).sum(-1) <= ri * ri
        out.append((name, m, *_union_of_balls_truth(cc, rr)))
    g = _world_grid([30 * k] * 3, spacing, 4)
    box = np.all(np.abs(g) <= 15 * k, axis=-1)
    # the digitised box is a box of whole voxels: its own edge lengths give the exact value
    d = np.array([np.any(box, axis=tuple(j for j in range(3) if j != i)).sum() for i in range(3)]) * np.asarray(spacing)
    out.append(("cube", box, _sphericity(d.prod(), 2 * (d[0] * d[1] + d[1] * d[2] + d[0] * d[2])), 1.0))
    return out


def test_yardstick_values():
    """The analytic references themselves: Legendre's area agrees with Knud Thomsen's approximation
    (within its 1.1 % bound), a cube's sphericity is 0.806, two touching-apart balls add up."""
    a, b, c = 16.0, 10.0, 7.0
    p = 1.6075
    thomsen = 4 * np.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p)
    assert abs(_ellipsoid_area(a, b, c) / thomsen - 1) < 0.011
    assert abs(_sphericity(8000.0, 2400.0) - 0.806) < 0.001
    sph, cvx = _union_of_balls_truth([[0, 0, 0], [30, 0, 0]], [5, 5])
    assert abs(sph - _sphericity(2 * 4 / 3 * np.pi * 125, 2 * 4 * np.pi * 25)) < 0.005 and cvx < 0.5


@pytest.mark.parametrize("spacing, scale", [((1.0, 1.0, 1.0), 1.0), ((0.98, 0.98, 3.27), 2.0)],
                         ids=["1mm", "0.98x0.98x3.27mm"])
def test_shape_metrics_agree_with_analytic_values(spacing, scale):
    """Sphericity and convexity within 0.03 of the true values of a ball, an oblique ellipsoid, unions of
    two and five balls, and a cube; at 1 mm and at the sarcoma CTs' 0.98 x 0.98 x 3.27 mm (shapes twice
    as large there: 40 mm ball, 64 x 40 x 28 mm ellipsoid, 60 mm cube, as real sarcomas are)."""
    from lesiondiffusion.evaluation import convexity, shape_metrics, sphericity

    errors = {}
    for name, mask, true_sph, true_cvx in _known_shapes(spacing, scale):
        sph, cvx = shape_metrics(mask, spacing)
        errors[name] = (round(sph - true_sph, 3), round(cvx - true_cvx, 3))
        assert (sphericity(mask, spacing), convexity(mask, spacing)) == (sph, cvx)
    assert len(errors) == 5 and all(abs(ds) <= 0.03 and abs(dc) <= 0.03 for ds, dc in errors.values()), errors


# --------------------------------------------------------------------------------------------------
# derived reports fit their catalog; tissues are not organs; one report file format end to end
# --------------------------------------------------------------------------------------------------

_TISSUE_CATALOG = """\
name: test_sarcoma
label_name: test_sarcoma
organ_type: parenchymal organ
organs:
  muscle: {weight: 1.0, names: [muscle]}
attributes:
  shape: {irregular: 0.4, oval: 0.3, lobulated: 0.2, round-like: 0.1}
  lesion_location: {within the parenchymal organ: 1.0}
  relationship: {no close relationship with surrounding organs: 0.7, close relationship with adjacent organs: 0.3}
  surface: {well-defined margin: 1.0}
  specific_features: {none: 1.0}
  enhancement: {non-contrast CT: 1.0}
  density: {hypodense: 0.6, isodense: 0.4}
  density_variations: {homogeneous: 0.5, heterogeneous: 0.5}
size_mm: {distribution: uniform, min: 10, max: 30}
hu:
  non-contrast CT: {hypodense: [0, 35], isodense: [35, 60]}
constraints:
  - name: hypodense sarcomas are heterogeneous here
    if: {density: hypodense}
    then: {density_variations: heterogeneous}
"""
_TISSUE = {"muscle": 1, "fat": 2, "bone": 3, "air": 4}


def _tissue_case(tmp_path, monkeypatch):
    """A 36 mm homogeneous lesion half in muscle, half in fat, touching bone, on a tissue map; a catalog
    that allows only 'within', sizes up to 30 mm and demands 'heterogeneous' for hypodense lesions."""
    cat_dir = tmp_path / "catalogs"
    cat_dir.mkdir()
    (cat_dir / "test_sarcoma.yaml").write_text(_TISSUE_CATALOG)
    monkeypatch.setenv("LESIONDIFFUSION_CATALOG_PATH", str(cat_dir))
    shape, spacing = (40, 40, 20), (2.0, 2.0, 4.0)
    tissue = np.full(shape, _TISSUE["muscle"], np.uint8)
    tissue[20:] = _TISSUE["fat"]
    tissue[:, 30:] = _TISSUE["bone"]
    tissue[:, :, :2] = _TISSUE["air"]
    ct = np.select([tissue == 1, tissue == 2, tissue == 3], [50.0, -100.0, 700.0], -1000.0).astype(np.float32)
    g = np.indices(shape).astype(float)
    centre = (20, 21, 10)
    ball = sum(((g[a] - centre[a]) * spacing[a]) ** 2 for a in range(3)) <= 18.0 ** 2
    ball &= tissue != _TISSUE["bone"]  # it reaches the bone and stops there
    ct[ball] = 20.0  # homogeneous: the catalog's rule must turn this into 'heterogeneous'
    tissue[ball] = _TISSUE["muscle"] * (g[0][ball] < 20) + _TISSUE["fat"] * (g[0][ball] >= 20)
    affine = np.diag([*spacing, 1.0])
    return ct, ball.astype(np.uint8), organ_map_from_array(tissue, affine, dict(_TISSUE)), affine


def test_derived_report_is_fitted_to_its_catalog_and_says_what_changed(tmp_path, monkeypatch, capsys, caplog):
    ct, mask, organs, affine = _tissue_case(tmp_path, monkeypatch)
    (entry,) = derive_reports(ct, mask, organs, lesion_type="test_sarcoma")
    rep, derived, notes = entry["report"], entry["derived"], entry["notes"]
    # measured: half the lesion outside the muscle -> protruding; the catalog allows only 'within'
    assert derived["lesion_location"]["measured_value"] == "protruding from the parenchymal organ"
    assert rep["lesion_location"] == "within the parenchymal organ"
    assert max(derived["size_mm"]["measured_value"]) > 30 and max(rep["size_mm"]) == 30.0
    assert rep["density"] == "hypodense" and rep["density_variations"] == "heterogeneous"
    assert derived["density_variations"]["measured_value"] == "homogeneous"
    assert any(n.startswith("lesion_location: 'protruding") and "allows only" in n for n in notes)
    assert any(n.startswith("size_mm:") for n in notes) and any("hypodense sarcomas" in n for n in notes)
    assert "changed to fit catalog test_sarcoma" in caplog.text
    # fat, bone and air touch it, and they are tissues, not organs
    assert rep["relationship"] == "no close relationship with surrounding organs"
    assert derived["relationship"]["not_organs"] == ["air", "bone", "fat"]

    # the CLI's file passes `report check`, and a value the catalog forbids fails it and `pretrain check`
    for name, arr in (("ct", ct), ("mask", mask), ("seg", organs.labels)):
        save_nifti(tmp_path / f"{name}.nii.gz", arr, affine)
    (tmp_path / "tissue.json").write_text(json.dumps(_TISSUE))
    out = tmp_path / "derived.yaml"
    assert main(["report", "derive", "--ct", str(tmp_path / "ct.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"),
                 "--organs", str(tmp_path / "seg.nii.gz"), "--mapping", str(tmp_path / "tissue.json"),
                 "--lesion-type", "test_sarcoma", "-o", str(out)]) == 0
    assert "1 changed to fit their catalog" in capsys.readouterr().out
    assert main(["report", "check", str(out)]) == 0
    assert "lesions[0] (label 1 component 0): OK (test_sarcoma)" in capsys.readouterr().out
    doc = yaml.safe_load(out.read_text())
    doc["lesions"][0]["report"]["lesion_location"] = "protruding from the parenchymal organ"
    out.write_text(yaml.safe_dump(doc))
    assert main(["report", "check", str(out)]) == 2
    assert "lesion_location='protruding from the parenchymal organ' is not allowed" in capsys.readouterr().err

    ds = tmp_path / "ds"
    for sub in ("imagesTr", "labelsTr", "organsTr", "reportsTr"):
        (ds / sub).mkdir(parents=True)
    shutil.copy(tmp_path / "ct.nii.gz", ds / "imagesTr" / "c_0000.nii.gz")
    shutil.copy(tmp_path / "mask.nii.gz", ds / "labelsTr" / "c.nii.gz")
    shutil.copy(tmp_path / "seg.nii.gz", ds / "organsTr" / "c.nii.gz")
    (ds / "dataset.json").write_text('{"channel_names": {"0": "CT"}, "labels": {"background": 0, "test_sarcoma": 1}, '
                                     '"file_ending": ".nii.gz", "organ_mapping": "tissue.json"}')
    shutil.copy(tmp_path / "tissue.json", ds / "tissue.json")
    assert main(["pretrain", "check", str(ds)]) == 2  # no reports yet: the error names the fix
    assert f"pretrain prepare {ds} --derive-reports" in capsys.readouterr().err
    shutil.copy(out, ds / "reportsTr" / "c.yaml")
    problems = pdata.check_dataset(ds)
    assert len(problems) == 1 and "does not fit catalog test_sarcoma" in problems[0]
    assert "lesion_location='protruding from the parenchymal organ' is not allowed" in problems[0]
    (ds / "reportsTr" / "c.yaml").unlink()
    assert main(["pretrain", "prepare", str(ds), "--derive-reports"]) == 0  # derived, fitted, accepted
    assert pdata.check_dataset(ds) == []


def test_catalog_fit_refuses_an_organ_the_catalog_lacks(tmp_path, monkeypatch):
    ct, mask, organs, _ = _tissue_case(tmp_path, monkeypatch)
    with pytest.raises(Exception, match="does not target"):
        derive_reports(ct, mask, organs, lesion_type="kidney_cyst")


def test_mapping_warning_once_and_silent_for_catalog_names(tmp_path, monkeypatch, caplog):
    import logging

    labels = np.zeros((4, 4, 4), np.int32)
    labels[0], labels[1], labels[2] = 1, 2, 3
    mapping = {"muscle": 1, "fat": 2, "tumour_bed_xyz": 3}
    with caplog.at_level(logging.WARNING, logger="lesiondiffusion.organs"):
        for _ in range(3):
            organ_map_from_array(labels, np.eye(4), mapping, path=tmp_path / "seg.nii.gz")
    warned = [r.getMessage() for r in caplog.records if "no catalog finds them" in r.getMessage()]
    assert len(warned) == 1 and "tumour_bed_xyz" in warned[0] and "muscle" not in warned[0]
    cat_dir = tmp_path / "catalogs"
    cat_dir.mkdir()
    (cat_dir / "bed.yaml").write_text(_TISSUE_CATALOG.replace("test_sarcoma", "bed").replace(
        "names: [muscle]", "names: [muscle, tumour_bed_abc]"))
    monkeypatch.setenv("LESIONDIFFUSION_CATALOG_PATH", str(cat_dir))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lesiondiffusion.organs"):
        organ_map_from_array(labels, np.eye(4), {"muscle": 1, "tumour_bed_abc": 3}, path=tmp_path / "other.nii.gz")
    assert not [r for r in caplog.records if "no catalog finds them" in r.getMessage()]


def test_report_derive_file_is_a_synthesize_report(tmp_path, capsys):
    """`report derive -o F` then `synthesize --report F`: one format, read by both (and by pretraining)."""
    ph = make_phantom((48, 48, 32), (2.5, 2.5, 3.5), seed=4, lesion_types=["kidney_cyst"])
    for name, arr in (("ct", ph.ct), ("mask", ph.lesion), ("seg", ph.organs)):
        save_nifti(tmp_path / f"{name}.nii.gz", arr, ph.affine)
    derived = tmp_path / "derived.yaml"
    assert main(["report", "derive", "--ct", str(tmp_path / "ct.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"),
                 "--organs", str(tmp_path / "seg.nii.gz"), "--mapping", "v2", "--enhancement", ph.enhancement,
                 "--lesion-type", "kidney_cyst", "-o", str(derived)]) == 0
    bundle = tmp_path / "bundle"
    assert main(["bundle", "init", "--preset", "tiny", "-o", str(bundle), "--encoder", "hashing:64"]) == 0
    out = tmp_path / "out"
    assert main(["synthesize", "--bundle", str(bundle), "--ct", str(tmp_path / "ct.nii.gz"), "--organs",
                 str(tmp_path / "seg.nii.gz"), "--mapping", "v2", "--catalog", "kidney_cyst", "--report", str(derived),
                 "-n", "1", "--ddim-steps", "2", "--no-preview", "-o", str(out)]) == 0
    written = yaml.safe_load((out / "sample_000" / "report.yaml").read_text())
    want = yaml.safe_load(derived.read_text())["lesions"][0]["report"]
    got = written.get("report", written)
    assert all(got[k] == want[k] for k in ("shape", "density", "organ", "lesion_location", "size"))
