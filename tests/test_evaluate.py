"""Evaluation: shape metrics, HU statistics, Dice, the alignment command on a tiny bundle and the
segmentation study driving real nnU-Net commands on phantoms."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from lesiondiffusion.evaluation import (
    convexity,
    dice,
    dice_on_folders,
    format_dice_markdown,
    hu_stats,
    sphericity,
)


def _ball(shape=(40, 40, 40), r=10.0, c=None):
    c = np.asarray(c if c is not None else [s / 2 for s in shape])
    g = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((gi - ci) ** 2 for gi, ci in zip(g, c)) <= r**2


def test_sphericity_and_convexity_rank_shapes():
    ball = _ball()
    assert sphericity(ball) > 0.97 and convexity(ball) > 0.97
    # two touching balls (dumbbell) and an L shape are less spherical and less convex
    dumbbell = _ball(c=(20, 13, 20), r=7) | _ball(c=(20, 27, 20), r=7)
    ell = np.zeros((40, 40, 40), bool)
    ell[5:35, 5:35, 5:35] = True
    ell[5:35, 20:35, 20:35] = False
    for shape in (dumbbell, ell):
        assert sphericity(shape) < sphericity(ball) - 0.1
        assert convexity(shape) < 0.93
    # anisotropic spacing is honoured: a ball in mm drawn on a 1x1x2 mm grid
    g = np.ogrid[:40, :40, :20]
    ball_mm = (g[0] - 20) ** 2 + (g[1] - 20) ** 2 + ((g[2] - 10) * 2.0) ** 2 <= 12**2
    true_ball = sphericity(ball_mm, (1.0, 1.0, 2.0))
    assert true_ball > 0.95
    assert sphericity(ball_mm, (1.0, 1.0, 1.0)) < true_ball - 0.04  # a 2:1 spheroid when spacing is ignored


def test_metrics_of_empty_masks_are_nan():
    empty = np.zeros((8, 8, 8), bool)
    assert math.isnan(sphericity(empty)) and math.isnan(convexity(empty))
    assert math.isnan(dice(empty, empty))


def test_hu_stats_and_dice():
    img = np.full((20, 20, 20), 60.0, np.float32)
    organ = np.zeros(img.shape, bool)
    organ[2:18, 2:18, 2:18] = True
    lesion = _ball((20, 20, 20), 4)
    img[lesion] = 10.0
    st = hu_stats(img, lesion, organ)
    assert st.lesion_mean == pytest.approx(10.0) and st.organ_mean == pytest.approx(60.0)
    assert st.contrast == pytest.approx(-50.0) and st.lesion_std == pytest.approx(0.0)
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    pred = np.zeros_like(ref)
    pred[4:8, 2:6, 2:6] = 1
    assert dice(ref, pred) == pytest.approx(0.5)
    ref2 = ref.copy()
    ref2[7:9, 7:9, 7:9] = 2
    assert dice(ref2, pred, label=2) == pytest.approx(0.0)


def test_dice_on_folders_and_markdown(tmp_path):
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    pred = np.zeros_like(ref)
    pred[4:8, 2:6, 2:6] = 1
    nib.save(nib.Nifti1Image(ref, aff), tmp_path / "ref" / "a.nii.gz")
    nib.save(nib.Nifti1Image(pred, aff), tmp_path / "pred" / "a.nii.gz")
    nib.save(nib.Nifti1Image(ref, aff), tmp_path / "ref" / "b.nii.gz")
    nib.save(nib.Nifti1Image(ref, aff), tmp_path / "pred" / "b.nii.gz")
    out = dice_on_folders(tmp_path / "ref", tmp_path / "pred", [1, 2])
    assert out["mean"][1] == pytest.approx(0.75)
    assert math.isnan(out["mean"][2])  # label absent everywhere: no score, not a perfect one
    md = format_dice_markdown(
        [{"setting": "Real only", "kidney_tumor": 0.5, "liver_tumor": float("nan"), "mean": 0.5}],
        ["kidney_tumor", "liver_tumor"],
    )
    assert "| Training data | kidney tumor | liver tumor | Mean |" in md
    assert "| Real only | 50.0 | n/a | 50.0 |" in md


def _cli(*args: str, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lesiondiffusion", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory):
    from lesiondiffusion.io import save_nifti
    from lesiondiffusion.phantoms import make_phantom

    d = tmp_path_factory.mktemp("case")
    ph = make_phantom((48, 48, 32), (4.0, 4.0, 5.0), seed=1)
    save_nifti(d / "ct.nii.gz", ph.ct, ph.affine)
    save_nifti(d / "organs.nii.gz", ph.organs, ph.affine)
    return d


def test_alignment_cli_on_tiny_bundle(tmp_path, phantom_case):
    bundle = tmp_path / "bundle"
    r = _cli("bundle", "init", "--preset", "tiny", "-o", str(bundle))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "align"
    r = _cli("evaluate", "alignment", "--bundle", str(bundle), "--ct", str(phantom_case / "ct.nii.gz"),
             "--organs", str(phantom_case / "organs.nii.gz"), "--catalog", "liver_cyst", "-n", "1",
             "--ddim-steps", "2", "--no-progress", "-o", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "alignment_summary.csv")))
    groups = {row["group"] for row in rows}
    assert groups == {"shape", "density"}
    from lesiondiffusion.catalog import load_catalog

    cat = load_catalog("liver_cyst")
    assert {row["prompt"] for row in rows if row["group"] == "shape"} == set(cat.domain("shape"))
    assert {row["prompt"] for row in rows if row["group"] == "density"} == set(cat.domain("density"))
    for row in rows:  # every prompt is accounted for: a success or a counted failure
        assert int(row["n"]) + int(row["failed"]) == 1
    samples = list(csv.DictReader(open(out / "alignment_samples.csv")))
    ok = [s for s in samples if s["ok"] == "True"]
    for s in ok:  # successful lesions carry finite measurements
        assert 0 < float(s["volume_mm3"])
        assert math.isfinite(float(s["lesion_hu_mean"]))
    # no HU correction: the untrained bundle's lesions are not moved into the prompts' catalog ranges
    dens = [s for s in ok if s["group"] == "density"]

    def outside(s):  # outside the prompt's range under every enhancement status (csv has no enhancement)
        ranges = [cat.hu_range(s["prompt"], e) for e in cat.domain("enhancement")]
        return not any(lo - 1 <= float(s["lesion_hu_mean"]) <= hi + 1 for lo, hi in ranges)

    assert dens and any(outside(s) for s in dens)
    assert (out / "alignment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "group" in r.stdout and "shape" in r.stdout and "density" in r.stdout


def test_alignment_rule_based_separates_density_prompts(phantom_case):
    """The HU statistics see what the prompts ask for: with the rule-based generator (no weights),
    hyperdense lesions are brighter than hypodense ones, and every prompt value gets a row."""
    from lesiondiffusion.catalog import load_catalog
    from lesiondiffusion.evaluation import run_alignment
    from lesiondiffusion.io import load_nifti
    from lesiondiffusion.organs import load_organ_map
    from lesiondiffusion.rule_based import RuleBasedGenerator

    ct, _, _ = load_nifti(phantom_case / "ct.nii.gz", np.float32)
    organs = load_organ_map(phantom_case / "organs.nii.gz")
    cat = load_catalog("liver_tumor")
    res = run_alignment(RuleBasedGenerator(), ct, organs, cat, 3, progress=False)
    by = {(r["group"], r["prompt"]): r for r in res.summary()}
    assert set(by) == {("shape", v) for v in cat.domain("shape")} | {("density", v) for v in cat.domain("density")}
    hyper, hypo = by[("density", "hyperdense")], by[("density", "hypodense")]
    assert hyper["n"] > 0 and hypo["n"] > 0
    assert hyper["lesion_hu_mean_mean"] > hypo["lesion_hu_mean_mean"] + 20
    # the organ reference is the same liver for both
    assert abs(hyper["organ_hu_mean_mean"] - hypo["organ_hu_mean_mean"]) < 15


def test_alignment_bad_input_is_clear(tmp_path, phantom_case):
    r = _cli("evaluate", "alignment", "--ct", str(phantom_case / "ct.nii.gz"), "--organs",
             str(phantom_case / "organs.nii.gz"), "--catalog", "liver_tumor", "-n", "1")
    assert r.returncode == 2 and "--bundle" in r.stderr
    r = _cli("evaluate", "alignment", "--backend", "rule_based", "--ct", str(tmp_path / "missing.nii.gz"),
             "--organs", str(phantom_case / "organs.nii.gz"), "--catalog", "liver_tumor", "-n", "1")
    assert r.returncode == 2 and "missing.nii.gz" in r.stderr
    r = _cli("evaluate", "alignment", "--backend", "rule_based", "--ct", str(phantom_case / "ct.nii.gz"),
             "--organs", str(phantom_case / "organs.nii.gz"), "--catalog", "no_such_lesion", "-n", "1")
    assert r.returncode == 2 and "no_such_lesion" in r.stderr


def test_segmentation_requires_nnunet_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    r = _cli("evaluate", "segmentation", "--dataset", "901", "-o", str(tmp_path), env=env)
    assert r.returncode == 2 and "nnUNet_raw" in r.stderr


@pytest.mark.slow
def test_segmentation_study_real_nnunet(tmp_path):
    """Plan, train (short plain nnU-Net variant), predict and score; a second run reuses everything."""
    from lesiondiffusion.io import save_nifti
    from lesiondiffusion.phantoms import make_phantom, write_phantom_dataset

    raw = tmp_path / "raw"
    ds = write_phantom_dataset(raw, n_healthy=1, lesion_types=["kidney_tumor", "liver_tumor"], shape=(32, 32, 24),
                               spacing=(5.0, 5.0, 6.0), seed=0, dataset_id=931, name="EvalSeg", cases_per_type=2)
    for i, t in enumerate(["kidney_tumor", "liver_tumor"]):
        ph = make_phantom((32, 32, 24), (5.0, 5.0, 6.0), seed=100 + i, lesion_types=[t])
        save_nifti(ds / "imagesTs" / f"t{i}_0000.nii.gz", ph.ct, ph.affine)
        save_nifti(ds / "labelsTs" / f"t{i}.nii.gz", ph.lesion * (i + 1), ph.affine)
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "res"), nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1",
               nnUNet_compile="false")
    out = tmp_path / "eval"
    args = ("evaluate", "segmentation", "--dataset", "931", "--settings", "real", "--fold", "all",
            "--trainer-real", "nnUNetTrainer_tinynet_2epochs_3iters", "--no-progress", "-o", str(out))
    r = _cli(*args, env=env, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    rows = list(csv.DictReader(open(out / "segmentation_dice.csv")))
    assert [row["setting"] for row in rows] == ["Real only"]
    for t in ("kidney_tumor", "liver_tumor", "mean"):
        assert 0.0 <= float(rows[0][t]) <= 1.0 or math.isnan(float(rows[0][t]))
    md = (out / "segmentation_dice.md").read_text()
    assert md.startswith("| Training data | kidney tumor | liver tumor | Mean |")
    preds = sorted(p.name for p in (out / "predictions" / "real").glob("*.nii.gz"))
    assert preds == ["t0.nii.gz", "t1.nii.gz"]
    # resumable: the second run trains nothing and predicts nothing
    r2 = _cli(*args, env=env, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "reusing" in r2.stdout and "nnUNetv2_train" not in r2.stdout
