"""The head phantom (skull, brain, ventricles) and hematencephalon synthesised into it: the zero-shot
setting of the method (benchmarks/bench_zero_shot.py measures it with an abdomen-only generator)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lesiondiffusion.catalog import load_catalog
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.organs import organ_map_from_array
from lesiondiffusion.phantoms import HEAD_TISSUE_HU, HEAD_TS_V2_IDS, make_head_phantom
from lesiondiffusion.placement import place_lesion


def test_head_phantom_anatomy_labels_and_hu():
    p = make_head_phantom(seed=3)
    brain, skull = p.organs == HEAD_TS_V2_IDS["brain"], p.organs == HEAD_TS_V2_IDS["skull"]
    assert set(np.unique(p.organs)) == {0, 90, 91}
    assert p.ventricles.any() and not (p.ventricles & ~brain).any()  # ventricles lie inside the brain label
    assert p.parenchyma.sum() == brain.sum() - p.ventricles.sum()
    # the skull encloses the brain: no brain voxel touches the outside air
    outside = ~(brain | skull | (p.ct > -500))
    assert not (np.roll(brain, 1, 0) & outside).any()
    assert abs(float(np.median(p.ct[skull])) - HEAD_TISSUE_HU["skull"]) < 450  # tables and diploe
    assert 25 < float(p.ct[p.parenchyma].mean()) < 40
    assert float(p.ct[p.ventricles].mean()) < float(p.ct[p.parenchyma].mean()) - 8
    assert p.enhancement == "non-contrast CT" and p.lesion.sum() == 0
    again = make_head_phantom(seed=3)
    assert np.array_equal(again.ct, p.ct)
    with pytest.raises(LesionDiffusionError, match="too small.*shape >="):
        make_head_phantom(shape=(40, 40, 40), spacing=(2.0, 2.0, 2.0))


def test_hematencephalon_places_and_synthesises_into_the_head(tmp_path):
    from lesiondiffusion.bundle import Bundle
    from lesiondiffusion.pipeline import LesionSynthesizer, SynthesisConfig

    head = make_head_phantom(seed=0)
    organs = organ_map_from_array(head.organs, head.affine, mapping="v2")
    catalog = load_catalog("hematencephalon")
    report = catalog.sample(1, {"density": "hyperdense", "size_mm": [30, 25, 25]})
    box = place_lesion(organs, report, catalog, seed=0)
    assert box.organ_names and all("brain" in n for n in box.organ_names)
    bundle = Bundle.init("tiny", "hashing:32", seed=0, phrases=report.mask_phrases() + report.image_phrases())
    synth = LesionSynthesizer(bundle, "cpu", SynthesisConfig(ddim_steps=1, max_retries=0, min_volume_fraction=0.0,
                                                           min_mask_in_organ=0.0, hu_correction="off"))
    (res,) = synth(head.ct, organs, [report], catalog, seed=0)
    if res.failure is None:  # random weights may give an empty mask; a kept lesion lies in the brain
        m = res.lesion_mask > 0
        assert (head.organs[m] == HEAD_TS_V2_IDS["brain"]).all()
        untouched = ~ndimage.binary_dilation(m, iterations=2)
        assert np.array_equal(res.image[untouched], head.ct[untouched])  # skull and the rest stay as they were
        assert 0.0 <= res.info["raw_organ_fraction"] <= 1.0
    else:
        assert "empty mask" in res.failure
