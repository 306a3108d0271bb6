"""nnU-Net integration end to end: the real nnU-Net CLI (plan/preprocess, train, predict) on a tiny
phantom dataset, plus in-process checks of what the trainer's batches contain."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

DATASET_ID = 913
NAME = "LDTrainerTest"
DS = f"Dataset{DATASET_ID}_{NAME}"
BIN = Path(sys.executable).parent


def _env(root: Path, n_proc_da: int = 0, **extra: str) -> dict[str, str]:
    from lesiondiffusion.nnunet_integration.discovery import ext_trainer_dir

    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"), "nnUNet_results": str(root / "res"),
        "nnUNet_n_proc_DA": str(n_proc_da), "nnUNet_def_n_proc": "1", "nnUNet_compile": "false",
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "nnUNet_extTrainer": str(ext_trainer_dir()),
    })
    env.pop("LESIONDIFFUSION_CONFIG", None)
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def _write_config(path: Path, **over) -> Path:
    cfg = {"generator": {"backend": "rule_based"}, "catalogs": [{"name": "kidney_tumor", "weight": 1.0}],
           "synthetic_probability": 0.8, "schedule": {"pretrain_fraction": 0.5},
           "store": {"size": 6, "reuse": 2, "warmup": 2}}
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def nnunet_root(tmp_path_factory) -> Path:
    """A 6-case phantom dataset (3 healthy templates), planned and preprocessed by nnU-Net's CLI."""
    from lesiondiffusion.phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("nnunet")
    write_phantom_dataset(root / "raw", n_healthy=3, lesion_types=["kidney_tumor"], shape=(40, 40, 32),
                          spacing=(2.0, 2.0, 3.0), seed=0, dataset_id=DATASET_ID, name=NAME, cases_per_type=3)
    proc = _run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"],
                _env(root, n_proc_da=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    plans_file = root / "pre" / DS / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["normalization_schemes"] == ["CTNormalization"]
    cfg["batch_size"] = 2
    plans_file.write_text(json.dumps(plans, indent=2))
    return root


def _fold_dir(root: Path, trainer: str) -> Path:
    return root / "res" / DS / f"{trainer}__nnUNetPlans__3d_fullres"


def test_train_online_rule_based_then_predict(nnunet_root):
    """nnUNetv2_train finds the trainer through nnUNet_extTrainer, pretrains with a spawned producer
    feeding a forked augmentation worker, switches to fine-tuning at the configured epoch, then
    nnUNetv2_predict uses the trained folder."""
    root = nnunet_root
    _write_config(root / "pre" / DS / "lesiondiffusion.yaml")
    trainer = "nnUNetTrainerLesionDiffusion_tinynet_2epochs_3iters"
    proc = _run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"],
                _env(root, n_proc_da=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    fold = _fold_dir(root, trainer) / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    saved = yaml.safe_load((fold / "lesiondiffusion.yaml").read_text())
    assert saved["generator"]["backend"] == "rule_based" and saved["store"]["reuse"] == 2
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "LesionDiffusion configuration:" in log and "backend: rule_based" in log  # echoed into the log
    assert "epoch 0 starts phase 'pretrain' (synthetic probability 0.8)" in log
    assert "epoch 1 starts phase 'finetune' (synthetic probability 0)" in log
    assert "LesionDiffusion store (pretrain): hit rate" in log
    assert "producer stopped for the fine-tuning phase" in log

    inp, out = root / "pred_in", root / "pred_out"
    inp.mkdir()
    src = root / "raw" / DS / "imagesTr"
    for case in sorted(src.glob("*_0000.nii.gz"))[:2]:
        shutil.copy(case, inp / case.name)
    proc = _run([str(BIN / "nnUNetv2_predict"), "-i", str(inp), "-o", str(out), "-d", str(DATASET_ID), "-c",
                 "3d_fullres", "-f", "0", "-tr", trainer, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
                _env(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import nibabel as nib

    preds = sorted(out.glob("*.nii.gz"))
    assert len(preds) == 2
    ref = nib.load(str(sorted(inp.glob("*.nii.gz"))[0]))
    assert nib.load(str(preds[0])).shape == ref.shape


def test_offline_cache_build_resume_and_synth_only_training(nnunet_root, tmp_path):
    """`lesiondiffusion cache build --shard K/2` in two processes at once (LesionDiffusion backend, tiny
    random bundle) fills one cache, an unsharded re-run resumes/extends it; the synthetic-only trainer
    then trains from the cache without loading a generator."""
    root = nnunet_root
    env = _env(root)
    bundle = tmp_path / "bundle"
    proc = _run([str(BIN / "lesiondiffusion"), "bundle", "init", "--preset", "tiny", "-o", str(bundle)], env)
    assert proc.returncode == 0, proc.stderr
    cfg = _write_config(tmp_path / "ld.yaml", generator={"backend": "lesiondiffusion", "bundle": str(bundle),
                                                          "options": {"ddim_steps": 2}},
                        mode="offline", offline={"cache_dir": str(tmp_path / "cache")})
    build = [str(BIN / "lesiondiffusion"), "cache", "build", "--config", str(cfg), "--dataset", str(DATASET_ID),
             "-n", "3", "-q"]
    shards = [subprocess.Popen(build + ["--shard", f"{k}/2"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for k in range(2)]
    for proc in shards:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    cache = tmp_path / "cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["n_cases"] == 3 and manifest["identity"]["backend"] == "lesiondiffusion"
    assert len({c["seed"] for c in manifest["cases"]}) == 3
    assert all(c["meta"]["report"]["lesion_type"] == "kidney_tumor" and "seed" in c for c in manifest["cases"])
    # an interrupted build: a case lost, a partial temp file left behind; the re-run completes it
    first = cache / "cases" / manifest["cases"][0]["file"]
    first.unlink()
    (cache / "cases" / f".{first.name}.tmp123.npz").write_bytes(b"\0" * 10)
    proc = _run(build[:-2] + ["4", "-q"], env)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((cache / "manifest.json").read_text())
    files = [c["file"] for c in manifest["cases"]]
    assert manifest["n_cases"] == 4 and len(set(files)) == 4 and first.name in files
    from lesiondiffusion.store import load_case

    for f in files:
        case = load_case(cache / "cases" / f)
        assert np.isfinite(case.data).all() and (case.seg == 1).any()

    trainer = "nnUNetTrainerLesionDiffusionSynthOnly_tinynet_2epochs_3iters"
    proc = _run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "1", "-tr", trainer, "-device", "cpu"],
                _env(root, LESIONDIFFUSION_CONFIG=str(cfg)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = next((_fold_dir(root, trainer) / "fold_1").glob("training_log_*.txt")).read_text()
    assert "(no generator loaded)" in log
    assert "phase 'synthetic_only'" in log and "starts phase 'finetune'" not in log
    assert "hit rate 100.0%" in log


def test_bad_config_is_reported_by_training(nnunet_root, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("catalogs: [{name: kidney_tumor}]\nstore: {reuse: 0}\n")
    proc = _run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "2", "-tr",
                 "nnUNetTrainerLesionDiffusion_tinynet_2epochs_3iters", "-device", "cpu"],
                _env(nnunet_root, LESIONDIFFUSION_CONFIG=str(bad)))
    assert proc.returncode != 0
    assert f"{bad}: key 'generator.bundle'" in proc.stderr  # default backend needs a bundle; fix names rule_based
    assert "rule_based" in proc.stderr


@pytest.fixture(scope="module")
def more_configurations(nnunet_root) -> Path:
    """The fixture dataset preprocessed for ``2d`` and ``3d_lowres`` too. The phantoms are too small for
    nnU-Net to plan a low-resolution stage, so 3d_lowres (1.5x coarser) and its cascade are added to
    the plans by hand, as nnU-Net's planner writes them for large images."""
    root = nnunet_root
    plans_file = root / "pre" / DS / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    confs = plans["configurations"]
    confs["2d"]["batch_size"] = 2
    confs["3d_lowres"] = {"inherits_from": "3d_fullres", "data_identifier": "nnUNetPlans_3d_lowres",
                          "spacing": [s * 1.5 for s in confs["3d_fullres"]["spacing"]],
                          "next_stage": "3d_cascade_fullres"}
    confs["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    plans_file.write_text(json.dumps(plans, indent=2))
    proc = _run([str(BIN / "nnUNetv2_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "3d_lowres", "-np", "1", "1"],
                _env(root, n_proc_da=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.parametrize("configuration", ["2d", "3d_lowres"])
def test_trainer_runs_with_2d_and_lowres_configurations(more_configurations, configuration, tmp_path):
    """nnUNetv2_train with a LesionDiffusion trainer in every configuration nnU-Net plans (3d_fullres is
    the test above): synthetic crops get the configuration's geometry, and the run validates."""
    cfg = _write_config(tmp_path / "ld.yaml", synthetic_probability=1.0)
    trainer = "nnUNetTrainerLesionDiffusion_tinynet_2epochs_3iters"
    proc = _run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), configuration, "3", "-tr", trainer, "-device", "cpu"],
                _env(more_configurations, LESIONDIFFUSION_CONFIG=str(cfg)), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fold = more_configurations / "res" / DS / f"{trainer}__nnUNetPlans__{configuration}" / "fold_3"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
    log = next(fold.glob("training_log_*.txt")).read_text()
    import re

    hit = re.search(r"LesionDiffusion store \(pretrain\): hit rate ([0-9.]+)%", log)
    assert hit and float(hit.group(1)) > 0, log[-2000:]  # synthetic cases reached the batches


def test_cascade_is_refused_at_start_up(more_configurations, tmp_path):
    cfg = _write_config(tmp_path / "ld.yaml")
    proc = _run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "3d_cascade_fullres", "3", "-tr",
                 "nnUNetTrainerLesionDiffusion_tinynet_2epochs_3iters", "-device", "cpu"],
                _env(more_configurations, LESIONDIFFUSION_CONFIG=str(cfg)), timeout=600)
    assert proc.returncode != 0
    assert "does not support the cascade configuration '3d_cascade_fullres'" in proc.stderr, proc.stderr[-3000:]
    assert "Train '3d_fullres', '3d_lowres' or '2d'" in proc.stderr


# ------------------------------------------------------------------ in-process batch checks

class _Bright:
    """Test generator: the rule-based lesion shape, painted at a single bright HU value."""

    def __init__(self):
        from lesiondiffusion.rule_based import RuleBasedGenerator

        self.inner = RuleBasedGenerator(blend_margin_vox=0, edge_sigma_mm=0.0)

    def __call__(self, ct, organs, reports, catalogs, *, seed):
        out = self.inner(ct, organs, reports, catalogs, seed=seed)
        for r in out:
            if r.ok:
                r.image = ct.copy()
                r.image[r.lesion_mask > 0] = 3000.0
        return out


@pytest.fixture
def trainer_factory(nnunet_root, monkeypatch, tmp_path):
    import torch

    for k, v in _env(nnunet_root).items():
        if k.startswith("nnUNet"):
            monkeypatch.setenv(k, v)
    made = []

    def make(cls_name: str, fold: int, **cfg_over):
        from lesiondiffusion.nnunet_integration import variants

        cfg = _write_config(tmp_path / f"cfg_{fold}.yaml", **cfg_over)
        monkeypatch.setenv("LESIONDIFFUSION_CONFIG", str(cfg))
        pre = nnunet_root / "pre" / DS
        plans = json.loads((pre / "nnUNetPlans.json").read_text())
        plans["continue_training"] = False
        dataset_json = json.loads((pre / "dataset.json").read_text())
        t = getattr(variants, cls_name)(plans, "3d_fullres", fold, dataset_json, device=torch.device("cpu"))
        made.append(t)
        return t

    yield make
    for t in made:
        t._ld_shutdown()


def test_batches_hold_synthetic_samples_with_aligned_labels_and_nnunet_ds_targets(trainer_factory, monkeypatch):
    import torch
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    from lesiondiffusion.nnunet_integration import data as ld_data

    monkeypatch.setattr(ld_data, "build_generator", lambda cfg, device=None: _Bright())
    orig = ld_data.load_templates

    def flat(*a, **k):  # flat dark templates (organ maps kept): only the lesion is bright
        ts = orig(*a, **k)
        for t in ts:
            t.hu[:] = -1000.0
        return ts

    monkeypatch.setattr(ld_data, "load_templates", flat)
    tr = trainer_factory("nnUNetTrainerLesionDiffusion_tinynet_2epochs_3iters", 3, synthetic_probability=1.0,
                         store={"worker": "thread", "warmup": 4, "reuse": 3})
    np.random.seed(0)
    torch.manual_seed(0)
    tr.on_train_start()
    dataset = tr.dataloader_train.data_loader._data
    assert type(dataset).__name__ == "MixedDataset"
    scales = tr._get_deep_supervision_scales()
    ds = DownsampleSegForDSTransform(ds_scales=scales)
    n_synth = 0
    for _ in range(3):
        batch = next(tr.dataloader_train)
        kinds = dataset.history[-tr.batch_size:]
        target = batch["target"]
        assert isinstance(target, list) and len(target) == len(scales)
        for j, (kind, _name) in enumerate(kinds):
            full = target[0][j]
            # deep-supervision targets are exactly nnU-Net's own downsampling of the full-res target
            for k, lowres in enumerate(ds(segmentation=full.clone())["segmentation"]):
                assert torch.equal(lowres, target[k][j])
            if kind != "synthetic":
                continue
            n_synth += 1
            img, lab = batch["data"][j, 0].numpy(), full[0].numpy()
            lesion = lab == 1
            if lesion.sum() < 20:
                continue
            # labels follow the lesion through nnU-Net's spatial/intensity augmentation: the k brightest
            # voxels (k = labelled voxels) are mostly labelled, and the labelled voxels are brighter than
            # the shell just outside them (a shifted or flipped label fails both)
            from scipy import ndimage

            k = int(lesion.sum())
            top = np.argsort(img.ravel(), kind="stable")[-k:]
            overlap = lesion.ravel()[top].mean()
            # a blob of under ~30 voxels (4 x 4 x 4) is smeared by nnU-Net's rotation/scaling so much that its
            # neighbours outrank some of its voxels (seen: 26 voxels, overlap 0.54); the shell test below
            # still holds for it
            if k >= 30:
                assert overlap > 0.6, overlap
            shell = ndimage.binary_dilation(lesion, iterations=2) & ~lesion
            assert img[lesion].mean() > img[shell].mean() + 0.25 * (img[lesion].mean() - np.median(img[~lesion]))
    assert n_synth >= 4
    stats = tr.ld_store.stats()
    assert stats.fresh >= 1 and stats.fresh + stats.reused >= n_synth


def test_no_lesion_control_trains_on_unlabelled_template_crops(trainer_factory):
    """generator.backend no_lesion (the study's control): synthetic draws are template crops around where
    rule_based would put a lesion, with the template's own labels only (healthy templates: none)."""
    tr = trainer_factory("nnUNetTrainerLesionDiffusion_tinynet_2epochs_3iters", 4, synthetic_probability=1.0,
                         generator={"backend": "no_lesion"}, store={"worker": "thread", "warmup": 2, "reuse": 1})
    tr.on_train_start()
    dataset = tr.dataloader_train.data_loader._data
    n_synth = 0
    for _ in range(2):
        batch = next(tr.dataloader_train)
        for j, (kind, _name) in enumerate(dataset.history[-tr.batch_size:]):
            if kind == "synthetic":
                n_synth += 1
                assert not (batch["target"][0][j] == 1).any()  # nothing inpainted, nothing labelled
    assert n_synth >= 2
    case = dataset.last_case
    assert case is not None and case.meta["backend"] == "no_lesion" and (case.seg <= 0).all()


def test_schedule_switches_at_configured_epoch(trainer_factory):
    tr = trainer_factory("nnUNetTrainerLesionDiffusion_tinynet_2epochs_3iters", 4, schedule={"pretrain_fraction": 0.3},
                         synthetic_probability=0.6)
    tr.num_epochs = 10
    tr.ld_config = tr.load_lesiondiffusion_config()
    phases = [tr.phase_for_epoch(e) for e in range(10)]
    assert phases[:3] == [("pretrain", 0.6)] * 3 and phases[3:] == [("finetune", 0.0)] * 7
    so = trainer_factory("nnUNetTrainerLesionDiffusionSynthOnly_tinynet_2epochs_3iters", 4)
    so.ld_config = so.load_lesiondiffusion_config()
    assert {so.phase_for_epoch(e) for e in range(2)} == {("synthetic_only", 1.0)}
    assert so.ld_config.store.on_miss == "wait"


def test_crashed_producer_stops_training_with_traceback(trainer_factory, monkeypatch):
    from lesiondiffusion.nnunet_integration import data as ld_data
    from lesiondiffusion.store import ProducerCrashed

    def boom(cfg, device=None):
        raise RuntimeError("generator failed to load: CUDA out of memory (test)")

    monkeypatch.setattr(ld_data, "build_generator", boom)
    tr = trainer_factory("nnUNetTrainerLesionDiffusion_tinynet_2epochs_3iters", 4, store={"worker": "thread", "warmup": 0})
    tr.on_train_start()
    batch = next(tr.dataloader_train)  # the loader does not hang: a miss falls back to real data
    # the producer thread reads its templates before it loads the generator: on a busy machine the
    # crash can come a few training steps later, but it must come
    deadline = time.monotonic() + 300
    with pytest.raises(ProducerCrashed, match="CUDA out of memory \\(test\\)"):
        while time.monotonic() < deadline:
            tr.train_step(batch)
            time.sleep(0.2)


def test_resume_rebuilds_the_store_for_the_checkpoint_phase(trainer_factory):
    """What `nnUNetv2_train ... --c` does: load the checkpoint, then on_train_start; the store is
    rebuilt only when synthetic epochs remain."""
    tr = trainer_factory("nnUNetTrainerLesionDiffusion_tinynet_2epochs_3iters", 4, store={"worker": "thread", "warmup": 1})
    tr.on_train_start()
    assert tr.ld_store is not None and tr.phase_for_epoch(0)[0] == "pretrain"
    ckpt = Path(tr.output_folder) / "checkpoint_latest.pth"
    tr.save_checkpoint(str(ckpt))  # end of epoch 0 -> resumes at epoch 1 (fine-tuning)
    assert (Path(tr.output_folder) / "lesiondiffusion.yaml").is_file()
    tr._ld_shutdown()
    again = trainer_factory("nnUNetTrainerLesionDiffusion_tinynet_2epochs_3iters", 4, store={"worker": "thread", "warmup": 1})
    again.load_checkpoint(str(ckpt))
    assert again.current_epoch == 1
    again.on_train_start()
    assert again.ld_store is None and again.ld_reader is None  # no generator for the real fine-tuning
    synth = trainer_factory("nnUNetTrainerLesionDiffusionSynthOnly_tinynet_2epochs_3iters", 4, store={"worker": "thread", "warmup": 1})
    synth.load_checkpoint(str(ckpt))
    synth.on_train_start()
    assert synth.ld_store is not None and synth.ld_store.stats().produced >= 1


def _ddp_rank(rank: int, world: int, root: str, cfg: str, init_file: str, out: str) -> None:
    """One DDP rank on CPU (gloo): what nnUNetv2_train -num_gpus N runs per GPU, up to the CUDA-only parts."""
    os.environ.update({k: v for k, v in _env(Path(root)).items() if k.startswith("nnUNet")})
    os.environ["LESIONDIFFUSION_CONFIG"] = cfg
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from lesiondiffusion.nnunet_integration import variants

    pre = Path(root) / "pre" / DS
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((pre / "dataset.json").read_text())
    tr = variants.nnUNetTrainerLesionDiffusion_tinynet_2epochs_3iters(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    if rank == 0:
        tr.do_split()  # writes splits_final.json once before the other rank reads it
    dist.barrier()
    try:
        tr._ld_setup()
        client = tr.ld_store.client(on_miss="wait")
        seeds = [client.draw().meta["seed"] for _ in range(3)]
        tr.ld_phase = "pretrain"
        tr._ld_log_store_stats()
        per_rank: list = [None] * world
        dist.all_gather_object(per_rank, {"rank_world": tr.ld_rank_world, "seeds": seeds,
                                          "own": tr.ld_store.stats().fresh, "sum": tr.ld_last_stats.fresh})
        if rank == 0:
            Path(out).write_text(json.dumps({"ranks": per_rank, "log": Path(tr.log_file).read_text()}))
    finally:
        tr._ld_shutdown()
        dist.destroy_process_group()


def test_ddp_ranks_own_producers_with_disjoint_seeds_and_summed_stats(nnunet_root, tmp_path):
    """Two DDP processes (gloo on CPU; nnU-Net's own -num_gpus path needs CUDA/NCCL): each rank starts
    its own producer with its own seed stream, and the store statistics in the log are summed over ranks."""
    import multiprocessing as mp

    cfg = _write_config(tmp_path / "ld.yaml", store={"size": 4, "reuse": 1, "warmup": 0})
    out = tmp_path / "out.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ddp_rank, args=(r, 2, str(nnunet_root), str(cfg), str(tmp_path / "pg"), str(out)))
             for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(240)
        assert proc.exitcode == 0
    res = json.loads(out.read_text())
    ranks = res["ranks"]
    assert [r["rank_world"] for r in ranks] == [[0, 2], [1, 2]]
    base = 0  # seed 0, epoch 0: rank r synthesises seeds r, r + 2, r + 4, ...
    for r, info in enumerate(ranks):
        assert all((s - base) % 2 == r for s in info["seeds"]), info
    assert not set(ranks[0]["seeds"]) & set(ranks[1]["seeds"])
    assert ranks[0]["sum"] == ranks[1]["sum"] == ranks[0]["own"] + ranks[1]["own"] >= 6
    assert "LesionDiffusion: rank 0 of 2 has its own producer, generator on cpu" in res["log"]
    assert "LesionDiffusion store (pretrain, sum over 2 ranks): hit rate 100.0% (fresh 6" in res["log"]
