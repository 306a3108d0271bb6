"""LesionSynthesizer on a small hand-made CT: stage contracts, blending, seeds, guidance, failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from lesiondiffusion.bundle import Bundle
from lesiondiffusion.catalog import load_catalog
from lesiondiffusion.errors import SynthesisError
from lesiondiffusion.generator import LesionGenerator
from lesiondiffusion.organs import organ_map_from_array
from lesiondiffusion.pipeline import CropGeometry, LesionSynthesizer, SynthesisConfig

SPACING = (2.0, 2.0, 4.0)  # differs from the tiny bundle's 3 mm: exercises resampling both ways


def randomize_zero_layers(net: torch.nn.Module, seed: int) -> None:
    """MONAI zero-initialises the UNet output/attention projections; random ones act like training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(0)
    shape = (44, 40, 20)
    idx = np.indices(shape).astype(np.float32)
    mm = [idx[a] * SPACING[a] for a in range(3)]

    def ellipsoid(center, radii):
        return sum(((m - c) / r) ** 2 for m, c, r in zip(mm, center, radii)) <= 1

    body = ellipsoid((44, 40, 40), (42, 38, 200))
    ct = np.where(body, -90, -1000) + rng.normal(0, 8, shape)
    labels = np.zeros(shape, np.int16)
    labels[ellipsoid((26, 40, 40), (16, 14, 26))] = 3  # kidney_left
    labels[ellipsoid((62, 40, 40), (16, 16, 30))] = 5  # liver
    ct[labels == 3] += 120
    ct[labels == 5] += 150
    affine = np.diag([*SPACING, 1.0])
    organs = organ_map_from_array(labels, affine, "v2")
    bundle = Bundle.init("tiny", "hashing:64", seed=0)
    randomize_zero_layers(bundle.lmnet, 1)
    randomize_zero_layers(bundle.linet, 2)
    catalog = load_catalog("kidney_tumor")
    fixed = {"size_mm": "12,10,12", "lesion_location": "within the parenchymal organ"}
    reports = [catalog.sample(s, fixed) for s in (0, 1)]
    return ct.astype(np.int16), organs, bundle, catalog, reports


@pytest.fixture(scope="module")
def synth(scene):
    return LesionSynthesizer(scene[2], "cpu", SynthesisConfig(ddim_steps=2))


@pytest.fixture(scope="module")
def results(scene, synth):
    ct, organs, _, catalog, reports = scene
    before = ct.copy()
    out = synth(ct, organs, reports, catalog, seed=0)
    assert np.array_equal(ct, before), "the input CT must never be modified"
    return out


def test_results_keep_shapes_dtypes_and_every_voxel_outside_the_dilated_mask(scene, synth, results):
    ct, organs, *_ = scene
    assert isinstance(synth, LesionGenerator)
    assert len(results) == 2
    for r in results:
        assert r.ok, r.failure
        assert r.image.shape == ct.shape and r.image.dtype == ct.dtype
        assert r.lesion_mask.shape == ct.shape and r.lesion_mask.dtype == np.uint8
        mask = r.lesion_mask.astype(bool)
        assert mask.any() and set(np.unique(r.lesion_mask)) <= {0, 1}
        dilated = ndimage.binary_dilation(mask, iterations=synth.config.blend_dilation)
        assert np.array_equal(r.image[~dilated], ct[~dilated])  # bit-identical outside
        assert (r.image[mask] != ct[mask]).any()  # and the lesion really changed the CT
        changed = r.image != ct
        assert r.image[changed].min() >= -1024 and r.image[changed].max() <= 3071  # clipped to valid HU
        assert r.info["image_crop"] and all(s % 8 == 0 for s in r.info["image_crop"])


def test_mask_lies_in_the_placement_box_and_the_organ(scene, results):
    _, organs, *_ = scene
    kidney = organs.mask(["kidney_left", "kidney_right"])
    for r in results:
        mask = r.lesion_mask.astype(bool)
        in_box = np.zeros_like(mask)
        in_box[r.box.slices()] = True
        assert not (mask & ~in_box).any()
        assert not (mask & ~kidney).any()  # within-parenchyma lesions stay inside the organ
        lo, hi = r.info["hu_range"]
        assert lo - 1 <= r.image[mask].mean() <= hi + 1  # the catalog's density range holds
        labels, n = ndimage.label(mask)
        assert n == 1  # one connected lesion


def test_same_seed_same_output_other_seed_or_guidance_differs(scene, synth, results):
    ct, organs, bundle, catalog, reports = scene
    again = synth(ct, organs, reports[:1], catalog, seed=0)[0]
    # per-lesion noise generators: lesion 0 does not depend on the other lesions of the batch
    assert np.array_equal(again.image, results[0].image)
    # 4 steps: with 2, the first step's clamped x0 dominates and the VQ codebook absorbs the rest
    runs = [LesionSynthesizer(bundle, "cpu", SynthesisConfig(ddim_steps=4, guidance_scale=g))(
        ct, organs, reports[:1], catalog, seed=0)[0] for g in (1.0, 2.5)]
    assert all(r.ok for r in runs)
    assert not np.array_equal(runs[0].image, runs[1].image)


def test_rejected_masks_retry_then_fail_clearly(scene):
    ct, organs, bundle, catalog, reports = scene
    strict = LesionSynthesizer(bundle, "cpu", SynthesisConfig(ddim_steps=1, guidance_scale=1.0, mask_threshold=2.0, max_retries=1))
    r = strict(ct, organs, reports[:1], catalog, seed=3)[0]
    assert not r.ok and r.image is None
    assert "after 2 attempt(s)" in r.failure and "empty mask" in r.failure
    raising = LesionSynthesizer(bundle, "cpu", SynthesisConfig(ddim_steps=1, guidance_scale=1.0, mask_threshold=2.0,
                                                                max_retries=0, on_failure="raise"))
    with pytest.raises(SynthesisError, match="empty mask"):
        raising(ct, organs, reports[:1], catalog, seed=3)


def test_nan_network_output_is_rejected(scene):
    ct, organs, _, catalog, reports = scene
    broken = Bundle.init("tiny", "hashing:64", seed=0, phrases=reports[0].mask_phrases() + reports[0].image_phrases())
    with torch.no_grad():
        broken.linet.out[-1].conv.bias.fill_(float("nan"))
    r = LesionSynthesizer(broken, "cpu", SynthesisConfig(ddim_steps=1, guidance_scale=1.0))(ct, organs, reports[:1], catalog, seed=0)[0]
    assert not r.ok and "NaN" in r.failure


def test_missing_organ_is_a_failure_not_a_crash(scene, synth):
    ct, organs, *_ = scene
    liver_only = organ_map_from_array(np.where(organs.labels == 5, 5, 0).astype(np.int16), organs.affine, "v2")
    catalog = load_catalog("kidney_tumor")
    r = synth(ct, liver_only, [catalog.sample(0, {"size_mm": "12,10,12"})], catalog, seed=0)[0]
    assert not r.ok and r.failure.startswith("no placement")


def test_crop_geometry_resamples_and_grows_with_the_lesion(scene, synth):
    _, organs, *_ = scene
    geo = CropGeometry(np.array([20.0, 18.0, 9.0]), np.array([1.5, 1.5, 0.75]), (16, 16, 16), (8, 8, 8))
    vol = np.add.outer(np.add.outer(np.arange(44.0), np.arange(40.0)), np.arange(20.0)).astype(np.float32)
    crop = geo.sample(vol, order=1, mode="nearest")
    region = (slice(14, 26), slice(12, 24), slice(6, 12))
    back = geo.back(crop, region, order=1)
    assert np.allclose(back, vol[region], atol=1e-3)  # a linear field survives the round trip exactly

    class Box:
        def __init__(self, lo, hi):
            self.lo, self.hi = lo, hi

    small = synth.geometry(Box((10, 10, 5), (14, 14, 7)), organs.shape, organs.spacing)
    big = synth.geometry(Box((2, 2, 1), (40, 38, 19)), organs.shape, organs.spacing)
    assert small.image_size == (32, 32, 32) and small.mask_size == (16, 16, 16)
    assert all(b > s for b, s in zip(big.image_size, small.image_size))
    assert all(s % 8 == 0 for s in big.image_size) and all(s % 4 == 0 for s in big.mask_size)
