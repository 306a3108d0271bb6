"""RuleBasedGenerator: lesion inside the organ, HU from the catalog, untouched voxels bit-identical."""

from __future__ import annotations

import numpy as np
import pytest

from lesiondiffusion.catalog import load_catalog
from lesiondiffusion.generator import LesionGenerator
from lesiondiffusion.organs import organ_map_from_array
from lesiondiffusion.phantoms import make_phantom
from lesiondiffusion.rule_based import RuleBasedGenerator


@pytest.fixture(scope="module")
def phantom():
    ph = make_phantom((48, 48, 32), (2.0, 2.0, 3.0), seed=3)
    return ph, organ_map_from_array(ph.organs, ph.affine, "v2")


def test_implements_protocol():
    assert isinstance(RuleBasedGenerator(), LesionGenerator)


@pytest.mark.parametrize("catalog_name", ["kidney_tumor", "liver_tumor"])
def test_lesion_blended_only_inside_dilated_mask(phantom, catalog_name):
    ph, om = phantom
    cat = load_catalog(catalog_name)
    gen = RuleBasedGenerator(blend_margin_vox=2)
    ok = 0
    for seed in range(6):
        ct = ph.ct.copy()
        res = gen(ct, om, [cat.sample(seed)], cat, seed=seed)
        assert len(res) == 1
        r = res[0]
        np.testing.assert_array_equal(ct, ph.ct)  # the input is never modified
        if not r.ok:
            continue
        ok += 1
        mask = r.lesion_mask.astype(bool)
        assert mask.any() and r.image.shape == ct.shape and r.image.dtype == ct.dtype
        from scipy import ndimage

        zone = ndimage.binary_dilation(mask, iterations=2)
        changed = r.image != ct
        assert not changed[~zone].any(), "voxels outside the dilated mask must stay bit-identical"
        assert changed[mask].mean() > 0.9
        # the lesion's mean HU lies in the catalog's range (texture noise averages out)
        lo, hi = cat.hu_range(r.report.density, r.report.enhancement)
        assert lo - 40 <= float(r.image[mask].mean()) <= hi + 40
        if r.box.category == "within_parenchyma":
            assert om.mask(r.box.organ_names)[mask].all()
    assert ok >= 3


def test_deterministic_per_seed(phantom):
    ph, om = phantom
    cat = load_catalog("kidney_tumor")
    rep = cat.sample(1)
    a = RuleBasedGenerator()(ph.ct, om, [rep], cat, seed=7)[0]
    b = RuleBasedGenerator()(ph.ct, om, [rep], cat, seed=7)[0]
    c = RuleBasedGenerator()(ph.ct, om, [rep], cat, seed=8)[0]
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)


def test_lobulated_differs_from_round(phantom):
    ph, om = phantom
    cat = load_catalog("liver_tumor")
    base = cat.sample(2, fixed={"shape": "round-like", "size": "medium (2-5 cm)"})
    lob = cat.sample(2, fixed={"shape": "lobulated", "size": "medium (2-5 cm)"})
    a = RuleBasedGenerator()(ph.ct, om, [base], cat, seed=4)[0]
    b = RuleBasedGenerator(lobulation=0.4)(ph.ct, om, [lob], cat, seed=4)[0]
    assert a.ok and b.ok
    assert not np.array_equal(a.lesion_mask, b.lesion_mask)


def test_missing_organ_is_a_counted_failure_not_an_exception(phantom):
    ph, _ = phantom
    labels = ph.organs.copy()
    labels[np.isin(labels, [2, 3])] = 0  # no kidneys
    om = organ_map_from_array(labels, ph.affine, "v2")
    cat = load_catalog("kidney_tumor")
    res = RuleBasedGenerator()(ph.ct, om, [cat.sample(0), cat.sample(1)], cat, seed=0)
    assert len(res) == 2 and all(not r.ok and r.image is None for r in res)
    assert all(r.failure for r in res)


def test_shape_mismatch_raises(phantom):
    from lesiondiffusion.errors import SynthesisError

    ph, om = phantom
    cat = load_catalog("kidney_tumor")
    with pytest.raises(SynthesisError, match="differs from organ map shape"):
        RuleBasedGenerator()(ph.ct[:-1], om, [cat.sample(0)], cat, seed=0)


def test_no_lesion_control_places_like_rule_based_and_writes_nothing(phantom):
    """The control backend draws the same box and mask as rule_based for a seed (so a trainer crops the same
    region), returns the CT unchanged and says nothing was inpainted."""
    from lesiondiffusion.generators import build_generator
    from lesiondiffusion.rule_based import NoLesionGenerator

    ph, om = phantom
    cat = load_catalog("kidney_tumor")
    control = build_generator("no_lesion")
    assert isinstance(control, NoLesionGenerator) and isinstance(control, LesionGenerator)
    compared = 0
    for seed in range(4):
        rep = cat.sample(seed)
        lesion = RuleBasedGenerator()(ph.ct, om, [rep], cat, seed=seed)[0]
        empty = control(ph.ct, om, [rep], cat, seed=seed)[0]
        assert lesion.ok == empty.ok
        if not lesion.ok:
            continue
        compared += 1
        np.testing.assert_array_equal(empty.lesion_mask, lesion.lesion_mask)
        assert empty.box.lo == lesion.box.lo and empty.box.hi == lesion.box.hi
        np.testing.assert_array_equal(empty.image, ph.ct)  # nothing inpainted ...
        assert not np.array_equal(lesion.image, ph.ct)  # ... where rule_based did paint a lesion
        assert empty.info["inpainted"] is False and empty.info["backend"] == "no_lesion"
    assert compared >= 2


def test_no_lesion_control_is_not_offered_where_lesions_are_evaluated():
    from lesiondiffusion.generator import BACKENDS, LESION_BACKENDS

    assert "no_lesion" in BACKENDS and "no_lesion" not in LESION_BACKENDS
    with pytest.raises(Exception, match="text-conditioned"):
        from lesiondiffusion.generators import build_generator

        build_generator("no_lesion", text_conditioning=False)
