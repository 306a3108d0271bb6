"""Phantom generator: anatomy, HU, labels, speed, lesions that follow their reports, dataset layout."""

from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pytest
import yaml

from lesiondiffusion.phantoms import TS_V2_IDS, make_phantom, write_phantom_dataset


@pytest.mark.parametrize("shape", [(32, 32, 32), (48, 48, 48), (64, 64, 40)])
def test_every_organ_present_at_small_sizes(shape):
    ph = make_phantom(shape, (2.0, 2.0, 3.0), seed=3)
    present = set(np.unique(ph.organs).tolist())
    missing = [name for name, i in TS_V2_IDS.items() if i not in present]
    assert not missing, f"organs missing at {shape}: {missing}"
    assert ph.ct.shape == shape and ph.ct.dtype == np.float32
    assert ph.organs.shape == shape and ph.lesion.shape == shape
    assert not ph.lesion.any() and ph.reports == []
    assert np.isfinite(ph.ct).all()


def test_hu_means_are_realistic():
    ph = make_phantom((96, 96, 48), (3.0, 3.0, 4.0), seed=1, enhanced=False)
    def mean(name):
        from scipy import ndimage
        # interior only: edges carry partial-volume blur
        m = ndimage.binary_erosion(ph.organs == TS_V2_IDS[name])
        return float(ph.ct[m].mean())
    assert 40 < mean("liver") < 80
    assert 30 < mean("spleen") < 70
    assert mean("vertebrae_L3") > 250
    assert mean("lung_lower_lobe_left") < -600
    # the corner of the field of view is air
    assert ph.ct[:3, :3, :].mean() < -900
    enh = make_phantom((96, 96, 48), (3.0, 3.0, 4.0), seed=1, enhanced=True)
    from scipy import ndimage
    k = ndimage.binary_erosion(enh.organs == TS_V2_IDS["kidney_left"])
    a = ndimage.binary_erosion(enh.organs == TS_V2_IDS["aorta"])
    assert enh.ct[k].mean() > 100 and enh.ct[a].mean() > 130
    # noise is present: within-organ spread is several HU but far below tissue contrast
    liver = ndimage.binary_erosion(ph.organs == TS_V2_IDS["liver"], iterations=2)
    assert 5 < ph.ct[liver].std() < 40


def test_hollow_organs_have_wall_and_lumen():
    ph = make_phantom((96, 96, 48), (3.0, 3.0, 4.0), seed=2)
    stomach = ph.ct[ph.organs == TS_V2_IDS["stomach"]]
    colon = ph.ct[ph.organs == TS_V2_IDS["colon"]]
    assert (stomach < -500).any() and (stomach > 0).any()  # gas and wall/fluid
    assert (colon < -500).any() and (colon > 0).any()
    bladder = ph.ct[ph.organs == TS_V2_IDS["urinary_bladder"]]
    assert abs(float(np.median(bladder))) < 40  # urine-filled


def test_anatomical_sides_and_affine():
    ph = make_phantom((64, 64, 40), (2.0, 2.0, 3.0), seed=0)
    assert ph.spacing == (2.0, 2.0, 3.0)
    assert nib.aff2axcodes(ph.affine) == ("R", "A", "S")
    def centre(name):
        return np.argwhere(ph.organs == TS_V2_IDS[name]).mean(0)
    # axis 0 runs to patient right: liver and right kidney on the high side
    assert centre("liver")[0] > centre("spleen")[0]
    assert centre("kidney_right")[0] > centre("kidney_left")[0]
    # superior axis: lungs above bladder; vertebrae ordered L5 (low) .. T12 (high)
    assert centre("lung_lower_lobe_left")[2] > centre("urinary_bladder")[2]
    assert centre("vertebrae_L5")[2] < centre("vertebrae_L1")[2] < centre("vertebrae_T12")[2]


def test_seeded_and_varied():
    a = make_phantom((32, 32, 32), seed=5)
    b = make_phantom((32, 32, 32), seed=5)
    c = make_phantom((32, 32, 32), seed=6)
    assert np.array_equal(a.ct, b.ct) and np.array_equal(a.organs, b.organs)
    assert not np.array_equal(a.organs, c.organs)


def test_fast_enough():
    make_phantom((48, 48, 48), seed=0)
    t = time.perf_counter()
    for s in range(3):
        make_phantom((48, 48, 48), seed=s)
    assert (time.perf_counter() - t) / 3 < 0.5


def test_bad_shape_is_clear():
    from lesiondiffusion.errors import LesionDiffusionError

    with pytest.raises(LesionDiffusionError, match="shape"):
        make_phantom((4, 64, 40))
    with pytest.raises(LesionDiffusionError, match="spacing"):
        make_phantom((32, 32, 32), (2.0, 0.0, 3.0))


# --- lesions (need catalog.py / placement.py) -------------------------------------------------


def _sphericity(mask: np.ndarray, spacing) -> float:
    from lesiondiffusion.evaluation import sphericity

    return sphericity(mask, spacing)


@pytest.mark.parametrize("lesion_type", ["kidney_tumor", "liver_tumor", "gastric_cancer"])
def test_lesion_follows_report(lesion_type):
    from lesiondiffusion.catalog import load_catalog
    from lesiondiffusion.phantoms import PhantomConfig

    # without blur and noise the painted values are exactly what the renderer chose from the report
    clean = PhantomConfig(noise_hu=0.0, partial_volume_sigma_vox=0.0, texture_hu=0.0)
    for seed in (11, 12):
        ph = make_phantom((64, 64, 40), (3.0, 3.0, 4.0), seed=seed, lesion_types=[lesion_type], config=clean)
        assert len(ph.reports) == 1
        rep = ph.reports[0]
        assert rep.lesion_type == lesion_type
        m = ph.lesion == 1
        assert m.sum() > 0
        lo, hi = load_catalog(lesion_type).hu_range(rep.density, rep.enhancement)
        # heterogeneity and feature spots (necrosis, calcification) move single voxels, not the median
        assert lo - 30 <= float(np.median(ph.ct[m])) <= hi + 30, (rep.density, rep.density_variations)
        # the lesion touches its organ
        organ = np.isin(ph.organs, [TS_V2_IDS[n] for n in ph.boxes[0].organ_names if n in TS_V2_IDS])
        assert (m & organ).sum() > 0
        # the same seed without lesions differs only around the lesion
        healthy = make_phantom((64, 64, 40), (3.0, 3.0, 4.0), seed=seed, config=clean)
        assert np.array_equal(healthy.organs, ph.organs)


def test_lesion_shape_follows_shape_attribute():
    from lesiondiffusion.catalog import load_catalog
    from lesiondiffusion.errors import LesionDiffusionError

    cat = load_catalog("liver_tumor")
    try:
        cat.sample(0, fixed={"shape": "irregular"})
        cat.sample(0, fixed={"shape": "round-like"})
    except LesionDiffusionError:
        pytest.skip("liver_tumor catalog lacks round-like/irregular shapes")
    # compare masks drawn by the phantom renderer for the same box with both shapes
    from lesiondiffusion.phantoms import _lesion_mask
    from lesiondiffusion.placement import LesionBox

    shape = (48, 48, 48)
    organ = np.ones(shape, bool)
    sph = {}
    for s in ("round-like", "irregular"):
        vals = []
        for seed in range(6):
            rep = cat.sample(seed, fixed={"shape": s})
            rep.size_mm = (30.0, 30.0, 30.0)
            box = LesionBox(lo=(8, 8, 8), hi=(40, 40, 40), center_vox=(24.0, 24.0, 24.0),
                            size_mm=(30.0, 30.0, 30.0), category="within_parenchyma",
                            organ_names=["liver"], report=rep)
            mask = _lesion_mask(box, organ, organ, (1.0, 1.0, 1.0), np.random.default_rng(seed))
            vals.append(_sphericity(mask, (1.0, 1.0, 1.0)))
        sph[s] = float(np.mean(vals))
    assert sph["round-like"] > sph["irregular"] + 0.05


def test_write_phantom_dataset_layout(tmp_path):
    ds = write_phantom_dataset(
        tmp_path, n_healthy=2, lesion_types=["kidney_tumor", "liver_tumor"], shape=(48, 48, 32),
        spacing=(3.0, 3.0, 4.0), seed=0, dataset_id=901, name="PhTest",
    )
    assert ds.name == "Dataset901_PhTest"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {"background": 0, "kidney_tumor": 1, "liver_tumor": 2}
    assert meta["numTraining"] == 4 and meta["file_ending"] == ".nii.gz"
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (ds / "imagesTr").glob("*_0000.nii.gz"))
    assert len(cases) == 4
    n_lesion = 0
    for case in cases:
        img = nib.load(ds / "imagesTr" / f"{case}_0000.nii.gz")
        lab = nib.load(ds / "labelsTr" / f"{case}.nii.gz")
        org = nib.load(ds / "organsTr" / f"{case}.nii.gz")
        assert img.shape == lab.shape == org.shape == (48, 48, 32)
        assert np.allclose(img.affine, lab.affine) and np.allclose(img.affine, org.affine)
        rep = yaml.safe_load((ds / "reportsTr" / f"{case}.yaml").read_text())
        labels = np.asarray(lab.dataobj)
        for entry in rep["lesions"]:
            assert (labels == entry["label"]).any()
            assert entry["report"]["lesion_type"] == list(meta["labels"])[entry["label"]]
        n_lesion += bool(rep["lesions"])
        assert bool(labels.any()) == bool(rep["lesions"])
    assert n_lesion == 2
    # re-running keeps finished cases (same bytes, not rewritten)
    before = {p: p.stat().st_mtime_ns for p in ds.rglob("*.nii.gz")}
    write_phantom_dataset(
        tmp_path, n_healthy=2, lesion_types=["kidney_tumor", "liver_tumor"], shape=(48, 48, 32),
        spacing=(3.0, 3.0, 4.0), seed=0, dataset_id=901, name="PhTest",
    )
    assert before == {p: p.stat().st_mtime_ns for p in ds.rglob("*.nii.gz")}


def test_phantom_ids_agree_with_organs_table():
    from lesiondiffusion.organs import TOTALSEG_V2

    for name, i in TS_V2_IDS.items():
        assert TOTALSEG_V2[name] == i, name


@pytest.mark.parametrize("surface, fades", [("ill-defined margin", True), ("well-defined margin", False)])
def test_lesion_margin_follows_surface_attribute(surface, fades):
    """An ill-defined margin blends into the organ across the label boundary; a well-defined one is a
    step: the organ voxels touching the lesion keep their HU."""
    from scipy import ndimage

    from lesiondiffusion.catalog import load_catalog
    from lesiondiffusion.phantoms import _ellipsoid_vox, _paint_lesion

    catalog = load_catalog("liver_tumor")
    report = catalog.sample(0, fixed={"surface": surface, "density": "hypodense", "density_variations": "homogeneous",
                                      "specific_features": "none", "enhancement": "non-contrast CT"})
    ct = np.full((24, 24, 24), 60.0, np.float32)
    mask = _ellipsoid_vox(ct.shape, (12, 12, 12), (6, 6, 6))
    _paint_lesion(ct, mask, report, catalog, (1.0, 1.0, 1.0), np.random.default_rng(0), texture_hu=0.0)
    outer = ndimage.binary_dilation(mask) & ~mask
    core = ndimage.binary_erosion(mask, iterations=3)
    lesion_hu = float(ct[core].mean())
    assert lesion_hu < 40  # hypodense against the 60 HU organ
    shift = 60.0 - float(ct[outer].mean())
    if fades:
        assert shift > 0.15 * (60.0 - lesion_hu)
    else:
        assert abs(shift) < 1e-3
    assert np.all(ct[ndimage.distance_transform_edt(~mask) >= 2] == 60.0)  # nothing further away changes
