"""Organ maps and rule-based placement: label tables, mappings, unit conversion, and the placement
rules measured independently on the real CT for every catalog and location category."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from scipy import ndimage

from lesiondiffusion.catalog import list_catalogs, load_catalog
from lesiondiffusion.errors import OrganMapError, PlacementError
from lesiondiffusion.organs import (
    TOTALSEG_V1,
    TOTALSEG_V2,
    guess_version,
    load_organ_map,
    organ_map_from_array,
)
from lesiondiffusion.placement import LesionBox, NoPlacement, extent_vox, lumen_depth_threshold, place_lesion
from lesiondiffusion.report import LOCATION_CATEGORY

# ------------------------------------------------------------------------------------------------
# label tables and mappings


def test_totalsegmentator_tables():
    assert len(TOTALSEG_V2) == 117 and len(TOTALSEG_V1) == 104
    v2 = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "pancreas",
          15: "esophagus", 20: "colon", 21: "urinary_bladder", 23: "kidney_cyst_left", 25: "sacrum",
          26: "vertebrae_S1", 50: "vertebrae_C1", 51: "heart", 52: "aorta", 90: "brain", 117: "costal_cartilages"}
    for i, n in v2.items():
        assert TOTALSEG_V2[n] == i
    v1 = {7: "aorta", 10: "pancreas", 18: "vertebrae_L5", 41: "vertebrae_C1", 42: "esophagus", 50: "brain",
          57: "colon", 104: "urinary_bladder", 13: "lung_upper_lobe_left"}
    for i, n in v1.items():
        assert TOTALSEG_V1[n] == i
    assert len(set(TOTALSEG_V2.values())) == 117


def _sphere(shape, centre, radius_vox, label=5, dtype=np.uint8):
    g = np.ogrid[tuple(slice(0, s) for s in shape)]
    d = sum(((x - c) / r) ** 2 for x, c, r in zip(g, centre, np.broadcast_to(radius_vox, 3)))
    out = np.zeros(shape, dtype=dtype)
    out[d <= 1] = label
    return out


def test_mapping_options(tmp_path):
    labels = _sphere((20, 20, 10), (10, 10, 5), 4, label=5)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    assert organ_map_from_array(labels, aff, "v2").has("liver")
    assert organ_map_from_array(labels, aff, "v1").has("liver")
    m = organ_map_from_array(labels, aff, {"hepar": 5})
    assert m.has("hepar") and not m.has("liver")
    m = organ_map_from_array(labels, aff, {"5": "liver"})  # id -> name, as TotalSegmentator writes it
    assert m.names == {"liver": 5}
    (tmp_path / "map.json").write_text(json.dumps({"liver": 5, "spleen": 1}))
    m = organ_map_from_array(labels, aff, str(tmp_path / "map.json"))
    assert m.has("liver") and not m.has("spleen") and m.spacing == (2.0, 2.0, 3.0)
    assert m.mask(["liver", "unknown_name"]).sum() == (labels == 5).sum()


@pytest.mark.parametrize(
    "mapping, fragment",
    [
        ({"liver": "five"}, "label ids must be integers"),
        ({"liver": 5, "spleen": 5}, "assigned to several classes"),
        ({"liver": 0}, "must be >= 1"),
        ({}, "non-empty mapping"),
        ("v3", "neither 'v1', 'v2', 'auto' nor an existing JSON file"),
    ],
)
def test_bad_mappings(mapping, fragment):
    labels = _sphere((10, 10, 10), (5, 5, 5), 3)
    with pytest.raises(OrganMapError, match=fragment):
        organ_map_from_array(labels, np.eye(4), mapping)


def test_bad_label_maps(tmp_path):
    import nibabel as nib

    ct = np.random.default_rng(0).normal(0, 100, (8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(ct, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    with pytest.raises(OrganMapError, match="Pass the segmentation, not the CT"):
        load_organ_map(tmp_path / "ct.nii.gz")
    with pytest.raises(OrganMapError, match="not found"):
        load_organ_map(tmp_path / "missing.nii.gz")
    (tmp_path / "map.json").write_text("{liver: 5")
    labels = _sphere((8, 8, 8), (4, 4, 4), 2)
    with pytest.raises(OrganMapError, match="invalid JSON"):
        organ_map_from_array(labels, np.eye(4), str(tmp_path / "map.json"))


def test_guess_version_on_synthetic_maps():
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    v2 = np.zeros((30, 30, 60), np.uint8)
    v2[5:25, 5:25, 2:10] = 20       # colon (v2) at the bottom
    v2[10:15, 10:15, 20:25] = 7     # pancreas (v2)
    v2[10:15, 10:15, 50:58] = 10    # lung lobe (v2), far above
    assert guess_version(v2, aff)[0] == "v2"
    v1 = np.zeros_like(v2)
    v1[5:25, 5:25, 2:10] = 57       # colon (v1)
    v1[10:15, 10:15, 20:25] = 7     # aorta (v1)
    v1[16:20, 10:15, 20:24] = 10    # pancreas (v1), same level
    assert guess_version(v1, aff)[0] == "v1"


# ------------------------------------------------------------------------------------------------
# unit conversion and synthetic placement


def test_extent_handles_anisotropic_and_permuted_affines():
    aff = np.diag([0.8, 0.8, 2.5, 1.0])
    assert np.allclose(extent_vox(aff, (20, 10, 5)), [25, 12.5, 2])
    perm = np.array([[0, 0, 2.0, 0], [-1.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 1]])  # voxel axes -> world (y, z, x)
    assert np.allclose(extent_vox(perm, (20, 10, 6)), [10 / 1.0, 6 / 3.0, 20 / 2.0])


def test_synthetic_parenchyma_anisotropic_and_reproducible():
    shape, spacing = (60, 60, 24), (1.0, 1.0, 2.5)
    labels = _sphere(shape, (30, 30, 12), (25, 25, 10), label=5)  # liver: 50 x 50 x 50 mm ball
    om = organ_map_from_array(labels, np.diag(spacing + (1.0,)), "v2")
    cat = load_catalog("liver_tumor")
    rep = cat.sample(0, {"lesion_location": "within the parenchymal organ", "size_mm": [20, 16, 10]})
    box = place_lesion(om, rep, cat, seed=4)
    assert isinstance(box, LesionBox)
    assert box.shape == (20, 16, 4)  # mm / spacing per axis
    assert box.measures["inside_fraction"] >= 0.9 and box.report is rep
    again = place_lesion(om, rep, cat, seed=4)
    assert again.lo == box.lo and again.hi == box.hi
    d = box.to_dict()
    assert d["voxel"]["lo"] == list(box.lo) and d["world_mm"]["center"] == pytest.approx(
        [box.center_vox[0] * 1.0, box.center_vox[1] * 1.0, box.center_vox[2] * 2.5])
    assert d["report"]["size_mm"] == [20.0, 16.0, 10.0]


def test_shrinks_to_fit_small_organ_then_gives_up_bounded():
    labels = _sphere((40, 40, 40), (20, 20, 20), 6, label=3)  # kidney_left, 12 mm ball at 1 mm
    om = organ_map_from_array(labels, np.eye(4), "v2")
    cat = load_catalog("kidney_tumor")
    rep = cat.sample(0, {"lesion_location": "within the parenchymal organ", "size_mm": [40, 36, 38]})
    box = place_lesion(om, rep, cat, seed=0)
    assert box.measures["shrink"] < 1.0
    assert max(box.report.size_mm) >= cat.size.min and max(box.report.size_mm) <= 13.5
    assert box.report.size in ("tiny (<1 cm)", "small (1-2 cm)") and box.size_mm == box.report.size_mm
    tiny = organ_map_from_array(_sphere((20, 20, 20), (10, 10, 10), 1, label=3), np.eye(4), "v2")
    t0 = time.perf_counter()
    res = place_lesion(tiny, rep, cat, seed=0, on_failure="skip")
    assert isinstance(res, NoPlacement) and not res
    assert "catalog minimum 8 mm" in res.reason and "kidney" in res.reason
    assert time.perf_counter() - t0 < 2.0
    with pytest.raises(PlacementError, match="No within_parenchyma position fits"):
        place_lesion(tiny, rep, cat, seed=0)


def test_box_is_clamped_to_the_image():
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[:12, :, :] = 5  # liver cut by the image border at x = 0
    om = organ_map_from_array(labels, np.eye(4) * [3, 3, 3, 1], "v2")
    cat = load_catalog("liver_tumor")
    for s in range(30):
        rep = cat.sample(s, {"lesion_location": "protruding from the parenchymal organ"})
        box = place_lesion(om, rep, cat, seed=s)
        assert all(0 <= a < b <= n for a, b, n in zip(box.lo, box.hi, labels.shape))
        # the cut face at x = 0 is not a surface: centres sit on the real boundary at x = 11.5
        assert box.center_vox[0] == pytest.approx(11.5)


def test_distance_maps_are_cached_per_organ_set():
    labels = _sphere((40, 40, 40), (20, 20, 20), 12, label=5)
    om = organ_map_from_array(labels, np.eye(4), "v2")
    cat = load_catalog("liver_tumor")
    place_lesion(om, cat.sample(0), cat, 0)
    keys = [k for k in om._cache if k[0] == "placement_geometry"]
    assert len(keys) == 1
    geom = om._cache[keys[0]]
    place_lesion(om, cat.sample(1), cat, 1)
    assert om._cache[keys[0]] is geom and [k for k in om._cache if k[0] == "placement_geometry"] == keys


# ------------------------------------------------------------------------------------------------
# the real CT: every catalog whose organ is present x every location category, >= 100 seeds

N_SEEDS = 100


@pytest.fixture(scope="module")
def real_maps(shared_ct_dir):
    return {
        "sm": load_organ_map(shared_ct_dir / "example_seg.nii.gz"),
        "full": load_organ_map(shared_ct_dir / "example_seg_fast_force_split.nii.gz"),
    }


def _organ_and_depth(om, organ_ids):
    """Organ mask and inner distance (mm) on the full volume, computed here from scratch."""
    organ = np.isin(om.labels, organ_ids)
    depth = ndimage.distance_transform_edt(np.pad(organ, 1), sampling=om.spacing)[1:-1, 1:-1, 1:-1]
    return organ, depth


def _independent_measures(om, box: LesionBox, organ: np.ndarray, depth: np.ndarray):
    """Recompute the rule quantities for one box (no placement internals)."""
    spacing = om.spacing
    c = np.asarray(box.center_vox)
    # lesion ellipsoid from the report's size in mm (diagonal affine) around the centre
    semi = np.maximum(np.asarray(box.report.size_mm) / (2 * np.asarray(spacing)), 0.5)
    lo = np.floor(c - semi).astype(int)
    hi = np.floor(c + semi).astype(int) + 1
    idx = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3)
    inell = (((idx - c) / semi) ** 2).sum(1) <= 1
    idx = idx[inell]
    inimg = np.all((idx >= 0) & (idx < np.array(organ.shape)), axis=1)
    inside = np.zeros(len(idx), bool)
    inside[inimg] = organ[tuple(idx[inimg].T)]
    frac = inside.mean()
    # centre voxel(s): a half-voxel centre sits between an organ voxel and an outside voxel
    lo_v, hi_v = np.floor(c).astype(int), np.ceil(c).astype(int)
    pair = [tuple(lo_v), tuple(hi_v)]
    return dict(frac=frac, organ=organ, depth=depth, pair=pair, max_depth=depth.max())


def _rule_ok(category, m, box, wall_mm, spec):
    a, b = m["pair"]
    inside_needed = spec.inside_fraction
    if category == "within_parenchyma":
        return m["frac"] >= inside_needed
    if category == "protruding":
        return (a != b and m["organ"][a] != m["organ"][b]
                and spec.min_organ_fraction <= m["frac"] <= spec.max_organ_fraction)
    if category == "wall":
        return (a == b and m["organ"][a] and m["depth"][a] <= wall_mm + 1e-6
                and m["frac"] >= spec.min_organ_fraction)
    if category == "lumen":
        return (a == b and m["organ"][a] and m["depth"][a] >= lumen_depth_threshold(m["max_depth"], wall_mm) - 1e-6
                and m["frac"] >= inside_needed)
    raise AssertionError(category)


def _cases():
    out = []
    for name in list_catalogs():
        c = load_catalog(name)
        for loc in c.domain("lesion_location"):
            out.append((name, loc))
    return out


@pytest.mark.parametrize("name, location", _cases())
def test_real_ct_placement_rules(real_maps, name, location):
    cat = load_catalog(name)
    om = real_maps["full"] if name == "bladder_cancer" else real_maps["sm"]
    names = cat.organ_names()
    ids = [om.names[n] for n in names if om.has(n)]
    category = LOCATION_CATEGORY[location]
    if not ids:  # esophagus and brain are outside this abdominal scan: the error must say so
        rep = cat.sample(0, {"lesion_location": location})
        with pytest.raises(PlacementError) as e:
            place_lesion(om, rep, cat, seed=0)
        msg = str(e.value)
        assert rep.organ in msg and names[0] in msg and "labels present" in msg and "liver" in msg and "--mapping" in msg
        assert isinstance(place_lesion(om, rep, cat, seed=0, on_failure="skip"), NoPlacement)
        return
    wall_mm = max(cat.placement.wall_mm, max(om.spacing))
    organ, depth = _organ_and_depth(om, ids)
    placed = satisfied = 0
    elapsed = 0.0
    for seed in range(N_SEEDS):
        rep = cat.sample(seed, {"lesion_location": location})
        t0 = time.perf_counter()
        box = place_lesion(om, rep, cat, seed=seed, on_failure="skip")
        elapsed += time.perf_counter() - t0
        if isinstance(box, NoPlacement):
            continue
        placed += 1
        assert box.category == category
        assert all(0 <= a < b <= n for a, b, n in zip(box.lo, box.hi, om.shape))
        assert max(box.report.size_mm) >= min(cat.size.min, max(rep.size_mm)) - 0.01
        m = _independent_measures(om, box, organ, depth)
        satisfied += bool(_rule_ok(category, m, box, wall_mm, cat.placement))
    assert placed >= 0.95 * N_SEEDS, f"{name}/{category}: placed {placed}/{N_SEEDS}"
    assert satisfied == placed, f"{name}/{category}: rule held for {satisfied}/{placed}"
    assert elapsed / N_SEEDS < 0.05  # ms-scale placement once the distance maps are cached


def test_v1_label_map_is_detected_and_placed(real_maps):
    """The real v2 map rewritten with v1 ids: auto detection picks v1 and the pancreas (v1 id 10) is found."""
    from lesiondiffusion.errors import CatalogError

    v2 = real_maps["sm"]
    lut = np.zeros(256, np.uint8)
    for name, i2 in TOTALSEG_V2.items():
        if name in TOTALSEG_V1:
            lut[i2] = TOTALSEG_V1[name]
    v1_labels = lut[v2.labels]
    assert guess_version(v1_labels, v2.affine)[0] == "v1"
    om = organ_map_from_array(v1_labels, v2.affine, "auto")
    assert om.source == "auto->v1" and om.names["pancreas"] == 10
    cat = load_catalog("pancreatic_tumor")
    box = place_lesion(om, cat.sample(0), cat, seed=0)
    c = np.floor(box.center_vox).astype(int)
    assert v1_labels[tuple(c)] == 10 or box.category == "protruding"
    wrong = organ_map_from_array(v1_labels, v2.affine, "v2")  # forcing the wrong table: "pancreas" is the aorta
    assert wrong.mask(["pancreas"]).sum() == (v2.labels == TOTALSEG_V2["aorta"]).sum()
    rep = cat.sample(0)
    rep.organ = "liver"  # not an organ of this catalog
    with pytest.raises(CatalogError, match="organ 'liver' is not a target of catalog pancreatic_tumor"):
        place_lesion(om, rep, cat, seed=0)


def test_brain_and_esophagus_catalogs_place_on_synthetic_organs():
    """The real CT lacks brain and oesophagus; a head ball and an oesophagus tube stand in."""
    labels = _sphere((48, 56, 40), (24, 28, 20), (20, 24, 16), label=TOTALSEG_V2["brain"])
    labels[22:28, 4:10, :] = TOTALSEG_V2["esophagus"]  # 6 x 6 voxel tube = 15 x 15 mm at 2.5 mm
    om = organ_map_from_array(labels, np.diag([2.5, 2.5, 3.0, 1.0]), "v2")
    brain = load_catalog("hematencephalon")
    for s in range(20):
        box = place_lesion(om, brain.sample(s), brain, seed=s)
        assert box.measures["inside_fraction"] >= 0.9 and box.organ_names == ["brain"]
    eso = load_catalog("esophageal_cancer")
    for loc, category in (("wall thickening", "wall"), ("within the lumen of a hollow organ", "lumen")):
        for s in range(20):
            box = place_lesion(om, eso.sample(s, {"lesion_location": loc}), eso, seed=s)
            c = tuple(int(v) for v in box.center_vox)
            assert box.category == category and labels[c] == TOTALSEG_V2["esophagus"]
            assert (box.measures["center_depth_mm"] <= 3.0 if category == "wall"
                    else box.measures["center_depth_mm"] >= box.measures["lumen_depth_threshold_mm"])
