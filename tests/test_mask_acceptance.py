"""The in-organ acceptance rule of the pipeline on a thin (adrenal-like) organ: one rule for every
placement kind, the share of LMNet's own mask in the organ or within one voxel of it, tries counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lesiondiffusion import pipeline
from lesiondiffusion.bundle import Bundle
from lesiondiffusion.catalog import load_catalog
from lesiondiffusion.organs import organ_map_from_array
from lesiondiffusion.pipeline import LesionSynthesizer, SynthesisConfig, mask_in_organ_fraction

SHAPE = (32, 32, 32)
PLATE_X = (15, 18)  # the organ is 3 voxels thick along axis 0, like an adrenal limb


def _ball(shape, center, radius) -> np.ndarray:
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(np.indices(shape), center)))
    return r <= radius


def test_share_in_organ_counts_the_one_voxel_shell_only():
    organ = np.zeros(SHAPE, bool)
    organ[PLATE_X[0]:PLATE_X[1], 6:26, 6:26] = True
    across = _ball(SHAPE, (16, 16, 16), 3)      # centred in the plate, bulging 1.5 voxels out of each side
    beside = _ball(SHAPE, (16 + 5, 16, 16), 3)  # in the fat beside the plate, touching its 1-voxel shell
    assert mask_in_organ_fraction(across, organ, 0) < 0.75
    assert mask_in_organ_fraction(across, organ, 1) > 0.9
    assert mask_in_organ_fraction(beside, organ, 0) == 0.0
    assert 0.0 < mask_in_organ_fraction(beside, organ, 1) < 0.1
    assert mask_in_organ_fraction(np.zeros(SHAPE, bool), organ, 1) == 0.0
    with pytest.raises(Exception, match="min_mask_in_organ"):
        SynthesisConfig(min_mask_in_organ=1.5)


@pytest.fixture(scope="module")
def thin_scene():
    labels = np.zeros(SHAPE, np.int16)
    labels[PLATE_X[0]:PLATE_X[1], 6:26, 6:26] = 3  # kidney_left (v2) as a 9 mm thin plate at 3 mm spacing
    rng = np.random.default_rng(0)
    ct = (np.where(labels > 0, 40.0, -100.0) + rng.normal(0, 5, SHAPE)).astype(np.float32)
    organs = organ_map_from_array(labels, np.diag([3.0, 3.0, 3.0, 1.0]), "v2")
    catalog = load_catalog("kidney_tumor")
    report = catalog.sample(0, {"size_mm": "12,12,12", "lesion_location": "protruding from the parenchymal organ"})
    bundle = Bundle.init("tiny", "hashing:32", seed=0, phrases=report.mask_phrases() + report.image_phrases())
    return ct, organs, catalog, report, bundle


def _fake_lmnet(monkeypatch, plan: list[str]) -> list[str]:
    """LMNet replaced by fields drawn from the organ and box channels it is given: 'fat' is a ball centred
    3 voxels off the plate in the box's fat half (radius 4: what was measured for adrenal lesions, ~12 % in
    the gland, 25 % after the box clip), 'organ' a ball of radius 2.5 across the plate; one per call."""
    calls: list[str] = []

    def sample(model, cond, context, ddim, noise, scale, progress=None):  # noqa: ANN001, ARG001
        kind = plan[min(len(calls), len(plan) - 1)]
        calls.append(kind)
        out = []
        for c in cond.float().cpu().numpy():
            organ, box = c[-2] > 0.5, c[-1] > 0.5
            cx = np.argwhere(organ)[:, 0].mean()
            centre = np.argwhere(box).mean(axis=0)
            side = np.sign(centre[0] - cx)  # the box (a protruding lesion's) reaches into the fat on this side
            offset, radius = (3.0, 4.0) if kind == "fat" else (0.0, 2.5)
            centre[0] = cx + offset * side
            r = np.sqrt(sum((g - v) ** 2 for g, v in zip(np.indices(organ.shape), centre)))
            out.append(np.tanh(radius - r)[None])  # a ball as a field in [-1, 1], > 0 inside
        return torch.from_numpy(np.stack(out).astype(np.float32))

    monkeypatch.setattr(pipeline, "sample_mask", sample)
    return calls


def test_a_mask_mostly_in_fat_is_redrawn_and_the_tries_are_reported(thin_scene, monkeypatch):
    ct, organs, catalog, report, bundle = thin_scene
    calls = _fake_lmnet(monkeypatch, ["fat", "organ"])
    synth = LesionSynthesizer(bundle, "cpu", SynthesisConfig(ddim_steps=1, max_retries=2))
    (res,) = synth(ct, organs, [report], catalog, seed=0)
    assert res.ok, res.failure
    assert calls == ["fat", "organ"]
    assert res.info["mask_attempts"] == 2 and res.info["attempts"] == 2
    (why,) = res.info["mask_rejections"]
    assert "of the generated mask lies in ['kidney_left'] or within 1 voxel(s) of it" in why and "needs >= 50%" in why
    assert res.info["mask_in_organ_fraction"] >= 0.5
    plate = organs.labels > 0
    lesion = res.lesion_mask > 0
    assert (lesion & plate).sum() / lesion.sum() > 0.25  # the kept lesion lies on the organ, not in the fat


def test_without_retries_the_fat_mask_fails_with_the_rule_and_the_count(thin_scene, monkeypatch):
    ct, organs, catalog, report, bundle = thin_scene
    _fake_lmnet(monkeypatch, ["fat"])
    synth = LesionSynthesizer(bundle, "cpu", SynthesisConfig(ddim_steps=1, max_retries=1))
    (res,) = synth(ct, organs, [report], catalog, seed=0)
    assert not res.ok and "after 2 attempt(s)" in res.failure and "SynthesisConfig.min_mask_in_organ" in res.failure
    assert res.info["mask_attempts"] == 2 and len(res.info["mask_rejections"]) == 2
    assert res.info["mask_in_organ_fraction"] < 0.5
    # the rule is one constant; at 0 only the catalog's protruding bound on the box-clipped mask is left, and
    # it accepts this mask with most of it in the fat (the failure the rule exists for)
    calls = _fake_lmnet(monkeypatch, ["fat"])
    lax = LesionSynthesizer(bundle, "cpu", SynthesisConfig(ddim_steps=1, max_retries=0, min_mask_in_organ=0.0))
    (res0,) = lax(ct, organs, [report], catalog, seed=0)
    assert calls == ["fat"] and res0.ok, res0.failure
    assert res0.info["raw_organ_fraction"] < 0.2 and res0.info["organ_fraction"] >= 0.25


def test_a_mask_across_the_thin_organ_is_accepted_first_time(thin_scene, monkeypatch):
    ct, organs, catalog, report, bundle = thin_scene
    calls = _fake_lmnet(monkeypatch, ["organ"])
    synth = LesionSynthesizer(bundle, "cpu", SynthesisConfig(ddim_steps=1, max_retries=0))
    (res,) = synth(ct, organs, [report], catalog, seed=0)
    assert res.ok, res.failure
    assert calls == ["organ"] and res.info["mask_attempts"] == 1 and "mask_rejections" not in res.info
    assert res.info["mask_in_organ_fraction"] >= 0.5
