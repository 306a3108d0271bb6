"""Evaluation: shape metrics, HU statistics, Dice, the alignment command on a tiny bundle and the
segmentation study driving real nnU-Net commands on phantoms."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from lesiondiffusion.nnunet_integration.discovery import with_ext_trainer
from lesiondiffusion.evaluation import (
    convexity,
    dice,
    dice_on_folders,
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


def test_dice_on_folders(tmp_path):
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
    assert [c["case"] for c in out["per_case"]] == ["a", "b"] and out["per_case"][1]["dice"][1] == 1.0


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


def test_alignment_always_measures_uncorrected_output(phantom_case):
    """A synthesizer set to shift runs with the correction off inside the study (its own config is left
    as it was); a generator that corrects anyway is refused rather than measured."""
    from lesiondiffusion.catalog import load_catalog
    from lesiondiffusion.errors import LesionDiffusionError
    from lesiondiffusion.evaluation import run_alignment
    from lesiondiffusion.io import load_nifti
    from lesiondiffusion.organs import load_organ_map
    from lesiondiffusion.pipeline import SynthesisConfig
    from lesiondiffusion.rule_based import RuleBasedGenerator

    class Stamped:  # rule-based lesions stamped with the correction mode the generator ran under
        def __init__(self, config, corrects=False):
            self.config, self.corrects, self.seen = config, corrects, []

        def __call__(self, ct, organs, reports, catalogs, *, seed):
            mode = self.config.hu_correction if self.config is not None else "shift"
            self.seen.append(mode)
            out = RuleBasedGenerator()(ct, organs, reports, catalogs, seed=seed)
            for r in out:
                r.info.update(hu_correction=mode, hu_corrected=mode != "off" or self.corrects)
            return out

    ct, _, _ = load_nifti(phantom_case / "ct.nii.gz", np.float32)
    organs = load_organ_map(phantom_case / "organs.nii.gz")
    cat = load_catalog("liver_cyst")
    gen = Stamped(SynthesisConfig(hu_correction="shift"))
    res = run_alignment(gen, ct, organs, cat, 1, groups=("density",), progress=False)
    assert any(s.ok for s in res.samples)
    # every call ran with the correction off (the study's shallow copy shares ``seen``), and the caller's
    # generator keeps its own setting
    assert len(gen.seen) == len(cat.domain("density")) and set(gen.seen) == {"off"}
    assert gen.config.hu_correction == "shift"
    with pytest.raises(LesionDiffusionError, match="HU-corrected the lesion"):
        run_alignment(Stamped(None), ct, organs, cat, 1, groups=("density",), progress=False)


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


def test_seeds_and_bad_study_options_are_clear(tmp_path):
    from lesiondiffusion.errors import LesionDiffusionError
    from lesiondiffusion.evaluation.segmentation import SegmentationProtocol, parse_seeds

    assert parse_seeds("3") == (0, 1, 2) and parse_seeds("0,4,7") == (0, 4, 7) and parse_seeds(2) == (0, 1)
    for bad in ("0", "a,b", "1,1"):
        with pytest.raises(LesionDiffusionError, match="--seeds"):
            parse_seeds(bad)
    with pytest.raises(LesionDiffusionError, match="lesiondiffusion_notext"):
        SegmentationProtocol("1", tmp_path, generators=("gan",))
    study = SegmentationProtocol("1", tmp_path, settings=("real", "synthetic"), generators=("rule_based",),
                              sources=("offline", "online"), seeds=(0, 1))
    assert [r.key for r in study.runs()] == [
        "real__seed0", "real__seed1", "synthetic__rule_based__offline__seed0", "synthetic__rule_based__offline__seed1",
        "synthetic__rule_based__online__seed0", "synthetic__rule_based__online__seed1"]
    with pytest.raises(LesionDiffusionError, match="--parallel"):
        SegmentationProtocol("1", tmp_path, parallel=0)
    with pytest.raises(LesionDiffusionError, match="--bundle"):  # lesiondiffusion generators need a bundle
        SegmentationProtocol("1", tmp_path).generator_config({"generator": {}}, "lesiondiffusion", 0)


def test_summary_mean_sd_over_seeds_and_markdown():
    from lesiondiffusion.evaluation.segmentation import format_dice_markdown, summarize

    runs = [{"group": "real", "setting": "real", "generator": None, "source": None,
             "dice": {"kidney_tumor": d, "liver_tumor": float("nan")}} for d in (0.2, 0.4, 0.6)]
    rows = summarize(runs, ["kidney_tumor", "liver_tumor"])
    assert len(rows) == 1 and rows[0]["seeds"] == 3
    assert rows[0]["kidney_tumor_mean"] == pytest.approx(0.4) and rows[0]["kidney_tumor_sd"] == pytest.approx(0.2)
    assert math.isnan(rows[0]["liver_tumor_mean"]) and rows[0]["mean_mean"] == pytest.approx(0.4)
    md = format_dice_markdown(rows, ["kidney_tumor", "liver_tumor"])
    assert "| Training data | Generator | Synthetic cases | kidney tumor | liver tumor | Mean |" in md
    assert "| Real only | – | – | 40.0 ± 20.0 | n/a | 40.0 ± 20.0 |" in md


class _FakeNNUNet:
    """nnU-Net's commands replaced by stand-ins that record what each run got: the protocol's scheduling,
    reuse, tables and failures without training anything."""

    def __init__(self, fail: str | None = None):
        import threading

        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []   # ("cache" | "train", what), in start order
        self.envs: dict[str, dict[str, str]] = {}
        self.busy = self.most_busy = 0
        self.fail = fail

    def run_logged(self, cmd, log_path, env=None, **kw):
        with self.lock:
            self.events.append(("cache", cmd[cmd.index("--config") + 1]))

    def train(self, ds_id, configuration, fold, trainer, env, log_path, *, fold_dir, **kw):
        import time

        key = Path(env["nnUNet_results"]).parent.name
        with self.lock:
            self.events.append(("train", key))
            self.envs[key] = dict(env)
            self.busy += 1
            self.most_busy = max(self.most_busy, self.busy)
        time.sleep(0.2)
        with self.lock:
            self.busy -= 1
        if key == self.fail:
            from lesiondiffusion.errors import LesionDiffusionError

            raise LesionDiffusionError(f"`nnUNetv2_train` failed with exit code 1. Last lines of {log_path}:\n    boom")
        fold_dir.mkdir(parents=True, exist_ok=True)

    def predict(self, ds_id, configuration, fold, trainer, images, out, env, log_path, **kw):
        out.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def dice(ref, pred, labels):
        key = Path(pred).parent.name  # a fixed Dice per run: parallel and sequential tables must agree
        v = (sum(map(ord, key)) % 97) / 100
        return {"mean": {1: v}, "per_case": [{"case": "c0", "dice": {1: v}, "n_ref": {1: 5}}]}

    def install(self, monkeypatch):
        from lesiondiffusion.evaluation import segmentation as seg

        for name in ("run_logged", "train", "predict"):
            monkeypatch.setattr(seg.runner, name, getattr(self, name))
        monkeypatch.setattr(seg, "dice_on_folders", self.dice)
        return self


def test_nnunet_environment_needs_the_trainers_findable_and_names_the_fix(tmp_path):
    """The core runner does not import the nnU-Net integration: its caller puts the trainer folder in
    nnUNet_extTrainer, and a missing one is named with the fix before any nnU-Net command runs."""
    from lesiondiffusion.errors import LesionDiffusionError
    from lesiondiffusion.evaluation.nnunet_runner import nnunet_environment

    env = {k: str(tmp_path) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    with pytest.raises(LesionDiffusionError, match=r"lists no folder with lesiondiffusion_trainers.py.*nnunet env"):
        nnunet_environment(env)
    with pytest.raises(LesionDiffusionError, match="lists no folder"):
        nnunet_environment(dict(env, nnUNet_extTrainer=str(tmp_path)))
    ok = nnunet_environment(with_ext_trainer(env))
    assert ok["nnUNet_compile"] == "false" and ok["nnUNet_extTrainer"].endswith("ext_trainers")


@pytest.fixture
def fake_dataset(tmp_path):
    """A raw dataset with a test set and preprocessed 2d data (files only; the fake commands read nothing)."""
    ds = tmp_path / "raw" / "Dataset933_Fake"
    for sub in ("imagesTs", "labelsTs"):
        (ds / sub).mkdir(parents=True)
        (ds / sub / "t0.nii.gz").write_bytes(b"")
    (ds / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver_tumor": 1}}))
    pre = tmp_path / "pre" / ds.name
    (pre / "nnUNetPlans_2d").mkdir(parents=True)
    (pre / "nnUNetPlans.json").write_text(json.dumps({"configurations": {"2d": {"data_identifier": "nnUNetPlans_2d"}}}))
    return with_ext_trainer(dict(os.environ, nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "pre"),
                                 nnUNet_results=str(tmp_path / "res")))


def test_parallel_runs_give_the_sequential_results_and_tables(tmp_path, fake_dataset, monkeypatch):
    """parallel=2: runs overlap, each in its own results folder with its seed; the offline caches are built
    first, once per generator; results, tables and reuse are those of parallel=1."""
    from lesiondiffusion.evaluation.segmentation import SegmentationProtocol

    said: list[str] = []
    common = dict(settings=("real", "synthetic_real"), generators=("rule_based", "lesiondiffusion_notext"),
                  sources=("offline", "online"), synthetic_cases=3, seeds=(0, 1), configuration="2d",
                  bundle=tmp_path / "bundle", config={"schedule": {"pretrain_fraction": 0.25}}, env=fake_dataset,
                  progress=False, echo=said.append)
    outs = {}
    for parallel in (1, 2):
        fake = _FakeNNUNet().install(monkeypatch)
        out = tmp_path / f"p{parallel}"
        res = SegmentationProtocol("933", out, parallel=parallel, **common).run()
        outs[parallel] = (out, res, fake)
        kinds = [k for k, _ in fake.events]
        assert kinds == ["cache"] * 2 + ["train"] * 10  # caches first: every offline run reads one
        assert fake.most_busy == parallel
        assert {Path(f).stem.split("__")[0] for k, f in fake.events if k == "cache"} == {"rule_based",
                                                                                         "lesiondiffusion_notext"}
        for key, env in fake.envs.items():
            assert env["LESIONDIFFUSION_TRAIN_SEED"] == key[-1] and Path(env["nnUNet_results"]).parent.name == key
        assert len({env["nnUNet_results"] for env in fake.envs.values()}) == 10
        cfg = yaml.safe_load(Path(fake.envs["synthetic_real__rule_based__offline__seed1"]["LESIONDIFFUSION_CONFIG"])
                             .read_text())
        assert cfg["seed"] == 1 and cfg["schedule"] == {"pretrain_fraction": 0.25} and cfg["mode"] == "offline"
        assert cfg["catalogs"] == [{"name": "liver_tumor", "label": "liver_tumor"}]
    (o1, r1, _), (o2, r2, _) = outs[1], outs[2]
    assert [r["key"] for r in r2.runs] == [r["key"] for r in r1.runs]  # the protocol's order, not finishing order
    for name in ("segmentation_dice.csv", "segmentation_dice.md", "segmentation_runs.csv", "segmentation_per_case.csv"):
        assert (o2 / name).read_text() == (o1 / name).read_text(), name
    assert (o2 / "segmentation_dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same study again is reused; another schedule retrains the synthetic runs only
    fake = _FakeNNUNet().install(monkeypatch)
    SegmentationProtocol("933", o2, parallel=2, **common).run()
    assert fake.events == []
    other = dict(common, config={"schedule": {"pretrain_fraction": 0.5}})
    SegmentationProtocol("933", o2, parallel=2, **other).run()
    trained = [w for k, w in fake.events if k == "train"]
    assert len(trained) == 8 and not any(w.startswith("real") for w in trained)


def test_a_failed_parallel_run_is_reported_with_its_log_and_the_others_are_kept(tmp_path, fake_dataset, monkeypatch):
    from lesiondiffusion.errors import LesionDiffusionError
    from lesiondiffusion.evaluation.segmentation import SegmentationProtocol

    common = dict(settings=("real", "synthetic"), generators=("rule_based",), sources=("online",), seeds=(0, 1, 2),
                  configuration="2d", env=fake_dataset, parallel=2, progress=False, echo=lambda m: None)
    fake = _FakeNNUNet(fail="real__seed1").install(monkeypatch)
    with pytest.raises(LesionDiffusionError) as err:
        SegmentationProtocol("933", tmp_path / "s", **common).run()
    msg = str(err.value)
    assert "1 of 6 nnU-Net runs failed" in msg and "Real only, seed 1" in msg
    assert str(tmp_path / "s" / "logs" / "train_real__seed1.log") in msg and "boom" in msg
    kept = {p.parent.name for p in (tmp_path / "s" / "runs").glob("*/result.json")}
    assert "real__seed0" in kept and "real__seed1" not in kept
    assert len(fake.events) < 6  # nothing new started after the failure
    fake = _FakeNNUNet().install(monkeypatch)
    res = SegmentationProtocol("933", tmp_path / "s", **common).run()
    assert len(res.runs) == 6 and {w for _, w in fake.events}.isdisjoint(kept)


def test_cache_folders_differ_by_what_makes_their_cases():
    from lesiondiffusion.evaluation.segmentation import SegmentationProtocol

    p = SegmentationProtocol("1", Path("/tmp/x"), synthetic_cases=8)
    base = {"catalogs": [{"name": "liver_tumor"}], "generator": {"bundle": "/b", "options": {"ddim_steps": 10}}}
    names = {}
    for what, gen in (("plain", {}), ("hu", {"hu_correction": "shift"}), ("ddim", {"options": {"ddim_steps": 4}}),
                      ("device", {"device": "cuda"}), ("off", {"hu_correction": "off"})):
        b = json.loads(json.dumps(base))
        b["generator"].update(gen)
        names[what] = {g: p.cache_dir(b, g).name for g in ("lesiondiffusion", "rule_based")}
    assert names["plain"]["lesiondiffusion"].startswith("lesiondiffusion__n8__")
    assert len({n["lesiondiffusion"] for n in names.values()}) == 3  # hu and ddim change it, the device does not
    assert names["device"] == names["plain"]
    assert names["off"] == names["plain"]  # the default (off) is written out: the same cases, the same cache
    assert len({n["rule_based"] for n in names.values()}) == 1  # diffusion options do not apply to rule_based


@pytest.mark.slow
@pytest.mark.timeout(1800)  # eight tiny nnU-Net trainings + predictions
def test_segmentation_study_end_to_end_with_real_nnunet(tmp_path):
    """The protocol at smoke scale with nnU-Net's own commands: real only, then synthetic only and
    synthetic-then-real for each generator (on-the-fly, two runs at once), one offline-cache run, one
    seed; a repeat (one run at a time) reuses every finished run."""
    from lesiondiffusion.evaluation.segmentation import run_segmentation_study
    from lesiondiffusion.io import save_nifti
    from lesiondiffusion.phantoms import make_phantom, write_phantom_dataset

    raw = tmp_path / "raw"
    ds = write_phantom_dataset(raw, n_healthy=2, lesion_types=["kidney_tumor"], shape=(32, 32, 24),
                               spacing=(5.0, 5.0, 6.0), seed=0, dataset_id=931, name="EvalSeg", cases_per_type=2)
    for i in range(2):
        ph = make_phantom((32, 32, 24), (5.0, 5.0, 6.0), seed=100 + i, lesion_types=["kidney_tumor"])
        save_nifti(ds / "imagesTs" / f"t{i}_0000.nii.gz", ph.ct, ph.affine)
        save_nifti(ds / "labelsTs" / f"t{i}.nii.gz", ph.lesion, ph.affine)
    bundle = tmp_path / "bundle"
    r = _cli("bundle", "init", "--preset", "tiny", "-o", str(bundle))
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "res"), nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1",
               nnUNet_compile="false", OMP_NUM_THREADS="1")
    env.pop("LESIONDIFFUSION_CONFIG", None)
    env = with_ext_trainer(env)  # the caller makes the trainers findable (the core does not import them)
    # random tiny weights: accept any mask (the smoke test is about the protocol, not the lesions)
    base = {"catalogs": [{"name": "kidney_tumor"}], "synthetic_probability": 1.0,
            "store": {"size": 4, "reuse": 4, "warmup": 1},
            "generator": {"options": {"ddim_steps": 2, "mask_threshold": -1.0, "max_retries": 0,
                                      "min_volume_fraction": 0.0, "min_organ_fraction": 0.0,
                                      "min_mask_in_organ": 0.0}}}
    said: list[str] = []
    common = dict(seeds=1, fold="all", trainer_suffix="_tinynet_2epochs_3iters", config=base, bundle=bundle,
                  env=env, progress=False, echo=said.append)
    out = tmp_path / "study"
    res = run_segmentation_study(931, out, sources=("online",), parallel=2, **common)
    groups = [r["group"] for r in res.rows]
    assert groups == ["real"] + [f"{s}__{g}__online" for s in ("synthetic", "synthetic_real")
                                 for g in ("lesiondiffusion", "rule_based", "lesiondiffusion_notext")]
    assert res.lesion_types == ["kidney_tumor"]
    for run in res.runs:
        assert run["dice"]["kidney_tumor"] is not None
        d = run["dice"]["kidney_tumor"]
        assert math.isnan(d) or 0.0 <= d <= 1.0
        assert sorted(c["case"] for c in run["per_case"]) == ["t0", "t1"]
        assert Path(run["fold_dir"]).joinpath("checkpoint_final.pth").is_file()
    # each run trained in its own nnU-Net results folder with its own generator configuration
    notext = next(r for r in res.runs if r["group"] == "synthetic_real__lesiondiffusion_notext__online")
    saved = yaml.safe_load((Path(notext["fold_dir"]) / "lesiondiffusion.yaml").read_text())
    assert saved["generator"]["backend"] == "lesiondiffusion" and saved["generator"]["text_conditioning"] is False
    assert len({r["fold_dir"] for r in res.runs}) == len(res.runs)
    assert len(res.per_case) == 2 * len(res.runs)
    assert res.paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = res.paths["markdown"].read_text()
    assert md.startswith("| Training data | Generator | Synthetic cases | kidney tumor | Mean |")
    assert "| Synthetic then real | lesiondiffusion_notext | on-the-fly |" in md
    assert len(list(csv.DictReader(open(res.paths["csv"])))) == 7

    # an offline cache of N cases: built once, then trained from without a generator
    off = run_segmentation_study(931, out, settings=("synthetic_real",), generators=("rule_based",),
                                 sources=("offline",), synthetic_cases=2, **common)
    run = off.runs[0]
    assert run["group"] == "synthetic_real__rule_based__offline"
    (cache,) = (out / "caches").glob("rule_based__n2__*/")
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["n_cases"] == 2
    log = next(Path(run["fold_dir"]).glob("training_log_*.txt")).read_text()
    assert "(no generator loaded)" in log

    # resumable: the same study again trains and predicts nothing
    said.clear()
    again = run_segmentation_study(931, out, sources=("online",), **common)
    assert [r["dice"] for r in again.runs] == [r["dice"] for r in res.runs]
    assert sum("reusing" in line for line in said) == 7 and not any("$ " in line for line in said)
