"""One geometry: the same phantom stored RAS, LPS, transposed, or read by nnU-Net gives the same lesion in
world coordinates, and pretraining caches the same crops from an RAS and an LPS copy."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from lesiondiffusion.bundle import Bundle
from lesiondiffusion.catalog import load_catalog
from lesiondiffusion.geometry import canonical, place_canonical, to_canonical
from lesiondiffusion.io import save_nifti
from lesiondiffusion.organs import organ_map_from_array
from lesiondiffusion.phantoms import make_phantom
from lesiondiffusion.pipeline import LesionSynthesizer, SynthesisConfig
from lesiondiffusion.rule_based import RuleBasedGenerator

SHAPE, SPACING = (48, 48, 32), (4.0, 4.0, 5.0)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(SHAPE, SPACING, seed=3)


def reorient(arr: np.ndarray, affine: np.ndarray, flips=(True, True, False), perm=(0, 1, 2)):
    """The same voxels stored in another array order (flipped / transposed), with the matching affine."""
    out, aff = arr, affine.copy()
    for a, f in enumerate(flips):
        if f:
            out = np.flip(out, a)
            aff[:3, 3] = aff[:3, 3] + aff[:3, a] * (arr.shape[a] - 1)
            aff[:3, a] = -aff[:3, a]
    out = np.transpose(out, perm)
    aff[:3, :3] = aff[:3, :3][:, list(perm)]
    return np.ascontiguousarray(out), aff


def world_points(mask: np.ndarray, affine: np.ndarray) -> set[tuple[float, ...]]:
    idx = np.argwhere(mask > 0)
    pts = idx @ affine[:3, :3].T + affine[:3, 3]
    return {tuple(p) for p in np.round(pts, 3)}


ORDERS = {"LPS": dict(flips=(True, True, False)), "LPS transposed": dict(flips=(True, True, False), perm=(2, 0, 1)),
          "RAI": dict(flips=(False, False, True), perm=(1, 0, 2))}


def test_canonical_round_trip_points_and_boxes():
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(5, 6, 7))
    aff = np.diag([1.0, 2.0, 3.0, 1.0])
    for kw in ORDERS.values():
        moved, maff = reorient(arr, aff, **kw)
        c = canonical(maff, moved.shape)
        assert np.array_equal(c.forward(moved), arr)  # back to the RAS original exactly
        assert np.array_equal(c.backward(c.forward(moved)), moved)
        assert np.allclose(c.affine(maff), aff)
        k = (1, 4, 2)  # a canonical voxel lands where point_back says in the moved array
        p = tuple(int(round(v)) for v in c.point_back(k))
        assert moved[p] == arr[k]
        lo, hi = c.box_back((1, 2, 3), (3, 5, 6))
        box = np.zeros(arr.shape, bool)
        box[1:3, 2:5, 3:6] = True
        moved_box, _ = reorient(box, aff, **kw)
        assert np.array_equal(np.argwhere(moved_box).min(0), lo)
        assert np.array_equal(np.argwhere(moved_box).max(0) + 1, hi)


@pytest.mark.parametrize("order", list(ORDERS))
def test_same_seed_same_world_lesion_rule_based(phantom, order):
    cat = load_catalog("kidney_tumor")
    report = cat.sample(5)
    gen = RuleBasedGenerator()
    ref = gen(phantom.ct, organ_map_from_array(phantom.organs, phantom.affine, "v2"), [report], cat, seed=11)[0]
    ct, aff = reorient(phantom.ct, phantom.affine, **ORDERS[order])
    org, _ = reorient(phantom.organs, phantom.affine, **ORDERS[order])
    got = gen(ct, organ_map_from_array(org, aff, "v2"), [report], cat, seed=11)[0]
    assert ref.ok and got.ok
    assert world_points(got.lesion_mask, aff) == world_points(ref.lesion_mask, phantom.affine)
    assert got.box.to_dict()["world_mm"] == ref.box.to_dict()["world_mm"]
    assert got.info["input_orientation"] != "RAS"


def test_same_seed_same_world_lesion_diffusion(phantom):
    bundle = Bundle.init("tiny", "hashing:64", seed=0)
    synth = LesionSynthesizer(bundle, "cpu", SynthesisConfig(ddim_steps=2, min_organ_fraction=0.0))
    cat = load_catalog("liver_tumor")
    report = cat.sample(2, {"size_mm": "20,16,16", "lesion_location": "within the parenchymal organ"})
    torch.manual_seed(0)
    ref = synth(phantom.ct, organ_map_from_array(phantom.organs, phantom.affine, "v2"), [report], cat, seed=4)[0]
    ct, aff = reorient(phantom.ct, phantom.affine, **ORDERS["LPS transposed"])
    org, _ = reorient(phantom.organs, phantom.affine, **ORDERS["LPS transposed"])
    got = synth(ct, organ_map_from_array(org, aff, "v2"), [report], cat, seed=4)[0]
    assert ref.ok == got.ok
    if ref.ok:
        assert world_points(got.lesion_mask, aff) == world_points(ref.lesion_mask, phantom.affine)
        # the image as well: the canonical arrays are identical, so every voxel value is
        back, _ = to_canonical(got.image, aff)
        assert np.array_equal(back, ref.image)
    else:
        assert got.failure == ref.failure


def test_place_canonical_same_world_box(phantom):
    cat = load_catalog("liver_cyst")
    report = cat.sample(1)
    ref = place_canonical(organ_map_from_array(phantom.organs, phantom.affine, "v2"), report, cat, 7)
    org, aff = reorient(phantom.organs, phantom.affine, **ORDERS["LPS"])
    got = place_canonical(organ_map_from_array(org, aff, "v2"), report, cat, 7)
    assert got.to_dict()["world_mm"] == ref.to_dict()["world_mm"]


def test_nnunet_reader_order_same_world_lesion(phantom, tmp_path):
    """A case read by nnU-Net's reader (axes reversed against the file) with the trainer's affine gives
    the lesion the file-order call gives, in world coordinates."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from lesiondiffusion.nnunet_integration.data import _reader_affine

    ct, aff = reorient(phantom.ct.astype(np.float32), phantom.affine, **ORDERS["LPS"])
    org, _ = reorient(phantom.organs, phantom.affine, **ORDERS["LPS"])
    save_nifti(tmp_path / "ct.nii.gz", ct, aff)
    save_nifti(tmp_path / "org.nii.gz", org.astype(np.int16), aff)
    rw = SimpleITKIO()
    data, props = rw.read_images([str(tmp_path / "ct.nii.gz")])
    seg, _ = rw.read_seg(str(tmp_path / "org.nii.gz"))
    raff = _reader_affine(props, props["spacing"])
    cat = load_catalog("kidney_tumor")
    report = cat.sample(5)
    gen = RuleBasedGenerator()
    ref = gen(phantom.ct, organ_map_from_array(phantom.organs, phantom.affine, "v2"), [report], cat, seed=11)[0]
    got = gen(data[0], organ_map_from_array(seg[0].astype(np.int16), raff, "v2"), [report], cat, seed=11)[0]
    assert ref.ok and got.ok
    # nnU-Net's affine is in RAS world coordinates like the phantom's
    assert world_points(got.lesion_mask, raff) == world_points(ref.lesion_mask, phantom.affine)


def _write_case(root, case, ct, les, org, aff):
    for sub in ("imagesTr", "labelsTr", "organsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    save_nifti(root / "imagesTr" / f"{case}_0000.nii.gz", ct.astype(np.float32), aff)
    save_nifti(root / "labelsTr" / f"{case}.nii.gz", les.astype(np.uint8), aff)
    save_nifti(root / "organsTr" / f"{case}.nii.gz", org.astype(np.int16), aff)


def test_pretraining_crops_identical_from_ras_and_lps(tmp_path):
    """The cache the three networks train on is the same array for an RAS file and its LPS copy, so a
    bundle trained on either learns the same (and synthesis sees the same orientation, tests above)."""
    from lesiondiffusion.pretrain.data import PrepConfig, prepare_dataset
    from lesiondiffusion.phantoms import write_phantom_dataset

    src = write_phantom_dataset(tmp_path / "ras", n_healthy=0, lesion_types=["kidney_tumor"], shape=(48, 48, 32),
                                spacing=(4.0, 4.0, 5.0), seed=0)
    src = next(p for p in (tmp_path / "ras").rglob("dataset.json")).parent
    lps = tmp_path / "lps"
    lps.mkdir()
    meta = json.loads((src / "dataset.json").read_text())
    (lps / "dataset.json").write_text(json.dumps(meta))
    if (src / "reportsTr").is_dir():
        import shutil

        shutil.copytree(src / "reportsTr", lps / "reportsTr")
    cases = [p.name[: -len("_0000.nii.gz")] for p in sorted((src / "imagesTr").glob("*_0000.nii.gz"))]
    for case in cases:
        img = nib.load(str(src / "imagesTr" / f"{case}_0000.nii.gz"))
        les = np.asanyarray(nib.load(str(src / "labelsTr" / f"{case}.nii.gz")).dataobj)
        org = np.asanyarray(nib.load(str(src / "organsTr" / f"{case}.nii.gz")).dataobj)
        ct, aff = reorient(np.asanyarray(img.dataobj), img.affine, **ORDERS["LPS"])
        _write_case(lps, case, ct, reorient(les, img.affine, **ORDERS["LPS"])[0],
                    reorient(org, img.affine, **ORDERS["LPS"])[0], aff)
    cfg = PrepConfig(spacing_mm=(3.0, 3.0, 3.0), hu_window=(-1000.0, 1000.0), lmnet_crop=(16, 16, 16),
                     linet_crop=(32, 32, 32), jitter=2)
    a = prepare_dataset(src, tmp_path / "cache_ras", cfg, progress=False)
    b = prepare_dataset(lps, tmp_path / "cache_lps", cfg, progress=False)
    assert len(a.lesions) == len(b.lesions) > 0
    for ra, rb in zip(a.lesions, b.lesions):
        za, zb = np.load(a.root / ra["file"]), np.load(b.root / rb["file"])
        for key in ("image", "lesion", "organ"):
            assert np.array_equal(za[key], zb[key]), key
