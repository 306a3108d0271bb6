"""Bad inputs and faults, one table row each (issue 13): every row runs the real CLI and asserts the exit
code, the key words of the message, and that every input file is byte-identical afterwards.

The world (a 32x32x24 phantom CT and organ map, a tiny random bundle, reports) is built once per module;
a row's ``setup`` adds what that row needs in its own folder and returns the argv. Runs are in-process
(``lesiondiffusion.cli.main``) except where a real process exit matters.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import yaml

from lesiondiffusion.cli import main
from lesiondiffusion.phantoms import make_phantom


@dataclass
class Case:
    id: str
    category: str  # the headings: data loss, machine, silent, traceback, blame, minor
    setup: Callable[["World", Path], list[str]]
    rc: int
    words: tuple[str, ...]
    # files a row may change on purpose (relative to its folder), e.g. a stale temporary it asks to remove
    may_change: tuple[str, ...] = ()
    after: Callable[["World", Path], None] | None = None
    fault: Callable[[pytest.MonkeyPatch, Path], None] | None = field(default=None, repr=False)


@dataclass
class World:
    root: Path
    ct: Path
    seg: Path
    bundle: Path
    report: Path

    def synth(self, *extra: str, ct: Path | None = None, seg: Path | None = None, bundle: Path | None = None,
              out: Path | None = None) -> list[str]:
        return ["synthesize", "--bundle", str(bundle or self.bundle), "--ct", str(ct or self.ct),
                "--organs", str(seg or self.seg), "--catalog", "kidney_tumor", "--ddim-steps", "1", "--no-preview",
                "--min-mask-in-organ", "0",  # random weights: the I/O rows must not depend on mask quality
                "-o", str(out or self.root / "never"), *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    p = make_phantom((32, 32, 24), (3.0, 3.0, 4.0), seed=1)
    ct, seg = root / "ct.nii.gz", root / "seg.nii.gz"
    nib.save(nib.Nifti1Image(p.ct.astype(np.int16), p.affine), str(ct))
    nib.save(nib.Nifti1Image(p.organs.astype(np.uint8), p.affine), str(seg))
    bundle = root / "bundle"
    assert main(["bundle", "init", "--preset", "tiny", "-o", str(bundle), "--encoder", "hashing:64"]) == 0
    report = root / "report.yaml"
    assert main(["report", "sample", "kidney_tumor", "--seed", "0", "--set", "size_mm=15,12,14",
                 "--set", "lesion_location=within the parenchymal organ", "-o", str(report)]) == 0
    return World(root, ct, seg, bundle, report)


def _hashes(*folders: Path) -> dict[Path, str]:
    out = {}
    for folder in folders:
        for p in folder.rglob("*"):
            if p.is_file() and not p.is_symlink():
                out[p] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _report_with(world: World, d: Path, name: str = "r.yaml", **changes) -> Path:
    doc = yaml.safe_load(world.report.read_text())
    for k, v in changes.items():
        if v is None:
            doc.pop(k, None)
        else:
            doc[k] = v
    path = d / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------
# 1. data loss

def _bundle_in_sample(w: World, d: Path) -> list[str]:
    out = d / "out"
    (out / "sample_000").mkdir(parents=True)
    shutil.copytree(w.bundle, out / "sample_000" / "bundle")
    return w.synth("--overwrite", bundle=out / "sample_000" / "bundle", out=out)


def _report_in_sample(w: World, d: Path) -> list[str]:
    out = d / "out"
    (out / "sample_000").mkdir(parents=True)
    rep = shutil.copy(w.report, out / "sample_000" / "report.yaml")
    return w.synth("--overwrite", "--report", str(rep), out=out)


def _ct_in_sample_via_link(w: World, d: Path) -> list[str]:
    out = d / "out"
    (out / "sample_000").mkdir(parents=True)
    shutil.copy(w.ct, out / "sample_000" / "ct.nii.gz")
    (d / "link").symlink_to(out / "sample_000")
    return w.synth("--overwrite", ct=d / "link" / "ct.nii.gz", out=out)


def _ct_behind_symlinked_out(w: World, d: Path) -> list[str]:
    real = d / "real"
    (real / "sample_001").mkdir(parents=True)
    shutil.copy(w.ct, real / "sample_001" / "ct.nii.gz")
    (d / "alias").symlink_to(real)
    return w.synth("--overwrite", "-n", "2", ct=real / "sample_001" / "ct.nii.gz", out=d / "alias")


def _catalog_in_sample(w: World, d: Path) -> list[str]:
    from lesiondiffusion.catalog import load_catalog

    out = d / "out"
    (out / "sample_000").mkdir(parents=True)
    cat = shutil.copy(load_catalog("kidney_tumor").path, out / "sample_000" / "kidney_tumor.yaml")
    argv = w.synth("--overwrite", out=out)
    argv[argv.index("kidney_tumor")] = str(cat)
    return argv


def _out_inside_bundle(w: World, d: Path) -> list[str]:
    b = d / "bundle"
    shutil.copytree(w.bundle, b)
    return w.synth(bundle=b, out=b / "samples")


def _out_is_ct(w: World, d: Path) -> list[str]:
    return w.synth(out=w.ct)


def _mask_out_is_ct(w: World, d: Path) -> list[str]:
    ct = shutil.copy(w.ct, d / "ct.nii.gz")
    return ["place", "--organs", str(w.seg), "--report", str(w.report), "-o", str(d / "b.json"), "--mask-out", str(ct)]


def _mask_out_is_organs(w: World, d: Path) -> list[str]:
    return ["place", "--organs", str(w.seg), "--report", str(w.report), "-o", str(d / "b.json"),
            "--mask-out", str(w.seg), "--overwrite"]


def _mask_out_links_to_report(w: World, d: Path) -> list[str]:
    (d / "box.nii.gz").symlink_to(w.seg)
    return ["place", "--organs", str(w.seg), "--report", str(w.report), "-o", str(d / "b.json"),
            "--mask-out", str(d / "box.nii.gz"), "--overwrite"]


def _bbox_is_report(w: World, d: Path) -> list[str]:
    rep = shutil.copy(w.report, d / "r.yaml")
    return ["place", "--organs", str(w.seg), "--report", str(rep), "-o", str(rep)]


def _report_sample_over_catalog(w: World, d: Path) -> list[str]:
    from lesiondiffusion.catalog import load_catalog

    cat = shutil.copy(load_catalog("kidney_tumor").path, d / "kidney_tumor.yaml")
    return ["report", "sample", str(cat), "-o", str(cat)]


def _fake_preprocessed(d: Path) -> tuple[Path, Path]:
    """nnU-Net plans for a dataset whose preprocessing produced no case yet (enough for cache build to start)."""
    import json

    pre = d / "pre" / "Dataset997_Fake"
    (pre / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    kw = {"order_z": 0, "force_separate_z": None}
    conf = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": [32, 32, 32], "median_image_size_in_voxels": [32, 32, 32], "spacing": [1.0, 1.0, 1.0],
            "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, **kw},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, **kw},
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, **kw},
            "architecture": {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []}, "batch_dice": True}
    plans = {"dataset_name": "Dataset997_Fake", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2], "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
             "original_median_shape_after_transp": [32, 32, 32], "image_reader_writer": "SimpleITKIO",
             "configurations": {"3d_fullres": conf}, "experiment_planner_used": "ExperimentPlanner",
             "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {}}
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans))
    (pre / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                  "labels": {"background": 0, "kidney_tumor": 1}, "numTraining": 0}))
    cfg = pre / "lesiondiffusion.yaml"
    cfg.write_text(yaml.safe_dump({"generator": {"backend": "rule_based"}, "catalogs": [{"name": "kidney_tumor"}],
                                   "mode": "offline"}))
    return pre, cfg


def _nnunet_env(monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
    for var, sub in (("nnUNet_preprocessed", "pre"), ("nnUNet_raw", "raw"), ("nnUNet_results", "results")):
        monkeypatch.setenv(var, str(d / sub))


def _cache_out(where: str) -> Callable[[World, Path], list[str]]:
    def setup(w: World, d: Path) -> list[str]:
        pre, cfg = _fake_preprocessed(d)
        out = {"holds-config": pre, "in-data": pre / "nnUNetPlans_3d_fullres" / "cache", "ok": d / "cache"}[where]
        return ["cache", "build", "--config", str(cfg), "--dataset", "Dataset997_Fake", "-n", "2", "-q",
                "-o", str(out)]
    return setup


# ------------------------------------------------------------------------------------------------
# 2. sizes beyond the catalog (a 5 m lesion once took the machine down in placement)

_HUGE = [5000, 4000, 4000]


def _set_huge(w: World, d: Path) -> list[str]:
    return ["report", "sample", "kidney_tumor", "--set", "size_mm=5000,4000,4000"]


def _check_huge(w: World, d: Path) -> list[str]:
    return ["report", "check", str(_report_with(w, d, size_mm=_HUGE, size=None))]


def _place_huge(w: World, d: Path) -> list[str]:
    return ["place", "--organs", str(w.seg), "--report", str(_report_with(w, d, size_mm=_HUGE, size=None)),
            "-o", str(d / "b.json"), "--mask-out", str(d / "box.nii.gz"), "--ellipsoid"]


def _synth_report_huge(w: World, d: Path) -> list[str]:
    return w.synth("--report", str(_report_with(w, d, size_mm=_HUGE, size=None)), out=d / "out")


def _pretrain_report_huge(w: World, d: Path) -> list[str]:
    ds = _toy(d)
    path = next(p for p in (ds / "reportsTr").glob("*.yaml") if yaml.safe_load(p.read_text())["lesions"])
    doc = yaml.safe_load(path.read_text())
    doc["lesions"][0]["report"].update(size_mm=_HUGE, size="large (>5 cm)", lesion_type="kidney_tumor")
    path.write_text(yaml.safe_dump(doc))
    return ["pretrain", "check", str(ds)]


def _synth_set_tiny(w: World, d: Path) -> list[str]:
    return w.synth("--set", "size_mm=1,1,1", out=d / "out")


# ------------------------------------------------------------------------------------------------
# 3. silent wrong results: size_mm shape, lesion type, CT scale, swapped inputs

def _size_one_number(w: World, d: Path) -> list[str]:
    return ["report", "check", str(_report_with(w, d, size_mm=[30], size=None))]


def _size_bool(w: World, d: Path) -> list[str]:
    return ["report", "check", str(_report_with(w, d, size_mm=[True, 20, 20], size=None))]


def _size_nan(w: World, d: Path) -> list[str]:
    path = _report_with(w, d, size=None)
    path.write_text(path.read_text().replace("size_mm:", "size_mm: [.nan, 20, 20]\nold_size_mm:"))
    doc = yaml.safe_load(path.read_text())
    doc.pop("old_size_mm")
    path.write_text(yaml.safe_dump(doc))
    return ["report", "check", str(path)]


def _size_two_numbers_set(w: World, d: Path) -> list[str]:
    return ["report", "sample", "kidney_tumor", "--set", "size_mm=20,20"]


def _size_one_number_set(w: World, d: Path) -> list[str]:
    return ["report", "sample", "kidney_tumor", "--set", "size_mm=30"]


def _unicorn(w: World, d: Path) -> list[str]:
    return w.synth("--report", str(_report_with(w, d, lesion_type="unicorn_tumor")), out=d / "out")


def _other_type(w: World, d: Path) -> list[str]:
    argv = w.synth("--report", str(w.report), out=d / "out")
    argv[argv.index("kidney_tumor")] = "liver_tumor"
    return argv


def _uint8_ct(w: World, d: Path) -> list[str]:
    img = nib.load(str(w.ct))
    hu = np.asanyarray(img.dataobj).astype(np.float32)
    eight_bit = np.clip((hu + 160) / 400 * 255, 0, 255).astype(np.uint8)  # a soft-tissue window export
    path = d / "ct8.nii.gz"
    nib.save(nib.Nifti1Image(eight_bit, img.affine), str(path))
    return w.synth(ct=path, out=d / "out")


def _normalised_ct(w: World, d: Path) -> list[str]:
    img = nib.load(str(w.ct))
    hu = np.asanyarray(img.dataobj).astype(np.float32)
    path = d / "ct01.nii.gz"
    nib.save(nib.Nifti1Image((hu + 1024) / 4095, img.affine), str(path))
    return w.synth(ct=path, out=d / "out")


def _swapped(w: World, d: Path) -> list[str]:
    return w.synth(ct=w.seg, seg=w.ct, out=d / "out")


def _ct_as_organs_in_place(w: World, d: Path) -> list[str]:
    return ["place", "--organs", str(w.ct), "--report", str(w.report), "-o", str(d / "b.json")]


# ------------------------------------------------------------------------------------------------
# 5. the environment: unwritable or full disks, outputs under files, truncated NIfTI

def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _truncated_ct(w: World, d: Path) -> list[str]:
    return w.synth(ct=_truncate(w.ct, d / "ct.nii.gz"), out=d / "out")


def _truncated_organs_place(w: World, d: Path) -> list[str]:
    return ["place", "--organs", str(_truncate(w.seg, d / "seg.nii.gz")), "--report", str(w.report),
            "-o", str(d / "b.json")]


def _toy(d: Path) -> Path:
    from toydata import write_toy_dataset  # benchmarks/toydata.py (conftest puts benchmarks/ on the path)

    return write_toy_dataset(d / "ds", n_lesion=1, n_healthy=0, shape=(16, 16, 12), seed=0)


def _pretrain_truncated(sub: str):
    def setup(w: World, d: Path) -> list[str]:
        ds = _toy(d)
        path = next((ds / sub).glob("*.nii.gz"))
        _truncate(path, path)
        return ["pretrain", "check", str(ds)]
    return setup


def _out_under_file(w: World, d: Path) -> list[str]:
    (d / "notes.txt").write_text("a file, not a folder")
    return w.synth("--set", "size_mm=15,12,14", out=d / "notes.txt" / "out")


def _bbox_under_file(w: World, d: Path) -> list[str]:
    (d / "notes.txt").write_text("a file, not a folder")
    return ["place", "--organs", str(w.seg), "--report", str(w.report), "-o", str(d / "notes.txt" / "b.json")]


def _read_only_fault(monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
    import tempfile

    def refuse(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's own keyword
        raise OSError(errno.EROFS, "Read-only file system", str(dir))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)


def _disk_full_fault(monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
    def full(img, filename):
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 100)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib, "save", full)


def _synth_ok(w: World, d: Path) -> list[str]:
    return w.synth("--set", "size_mm=15,12,14", "--set", "lesion_location=within the parenchymal organ", out=d / "out")


def _nothing_left(w: World, d: Path) -> None:
    out = d / "out"
    assert not out.exists() or not list(out.iterdir()), list(out.iterdir())


def _place_ok(w: World, d: Path) -> list[str]:
    return ["place", "--organs", str(w.seg), "--report", str(w.report), "-o", str(d / "b.json"),
            "--mask-out", str(d / "box.nii.gz")]


def _no_box(w: World, d: Path) -> None:
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(("box", ".box"))) == []


# ------------------------------------------------------------------------------------------------
# 6. NaN and infinity: in the bundle (config, embeddings) and on the command line

def _bundle_copy(w: World, d: Path) -> Path:
    b = d / "bundle"
    shutil.copytree(w.bundle, b)
    return b


def _config_value(path: str, value) -> Callable[[World, Path], list[str]]:
    def setup(w: World, d: Path) -> list[str]:
        b = _bundle_copy(w, d)
        cfg = yaml.safe_load((b / "config.yaml").read_text())
        node = cfg
        *parents, last = path.split(".")
        for k in parents:
            node = node[k]
        if last.endswith("]"):
            name, idx = last[:-1].split("[")
            node[name][int(idx)] = value
        else:
            node[last] = value
        (b / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        return ["bundle", "info", str(b)]
    return setup


def _nan_embedding(cmd: str) -> Callable[[World, Path], list[str]]:
    def setup(w: World, d: Path) -> list[str]:
        from safetensors.torch import load_file, save_file

        b = _bundle_copy(w, d)
        f = b / "text_embeddings" / "embeddings.safetensors"
        tensors = load_file(str(f))
        key = next(iter(tensors))
        tensors[key][3, 0] = float("nan")
        save_file(tensors, str(f))
        if cmd == "info":
            return ["bundle", "info", str(b)]
        return w.synth("--set", "size_mm=15,12,14", bundle=b, out=d / "out")
    return setup


def _guidance(value: str) -> Callable[[World, Path], list[str]]:
    return lambda w, d: w.synth("--guidance", value, out=d / "out")


def _pretrain_lr_nan(w: World, d: Path) -> list[str]:
    return ["pretrain", "vqgan", "--data", str(d / "ds"), "--bundle", str(w.bundle), "--lr", "nan", "-o", str(d / "run")]


# ------------------------------------------------------------------------------------------------
# 8. oversized, binary and many-times-wrong catalogs and reports

def _big_catalog(w: World, d: Path) -> list[str]:
    from lesiondiffusion.catalog import load_catalog

    path = d / "big.yaml"
    text = load_catalog("kidney_tumor").path.read_text()
    path.write_text(text + "".join(f"# padding line {i:08d} ....................................\n" for i in range(40000)))
    return ["catalogs", "validate", str(path)]


def _binary_catalog(w: World, d: Path) -> list[str]:
    path = d / "garbage.yaml"
    path.write_bytes(bytes(range(256)) * 8)
    return ["catalogs", "validate", str(path)]


def _latin1_report(w: World, d: Path) -> list[str]:
    path = d / "r.yaml"
    path.write_bytes(w.report.read_bytes().replace(b"lesion_type:", b"# r\xe9sum\xe9\nlesion_type:"))
    return ["report", "check", str(path)]


def _binary_report(w: World, d: Path) -> list[str]:
    path = d / "r.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    return w.synth("--report", str(path), out=d / "out")


def _big_report(w: World, d: Path) -> list[str]:
    path = _report_with(w, d)
    path.write_text(path.read_text() + "# " + "x" * (2 << 20) + "\n")
    return ["place", "--organs", str(w.seg), "--report", str(path), "-o", str(d / "b.json")]


def _many_bad_values(w: World, d: Path) -> list[str]:
    return ["report", "check", str(_report_with(w, d, shape="hexagonal", density="glowing", surface=7,
                                                size_mm=[30], colour="red"))]


def _pretrain_binary_report(w: World, d: Path) -> list[str]:
    ds = _toy(d)
    next((ds / "reportsTr").glob("*.yaml")).write_bytes(b"\x00\x01\x02 binary")
    return ["pretrain", "check", str(ds)]


# ------------------------------------------------------------------------------------------------
# 7. leftovers of a killed run

def _stale_temporaries(w: World, d: Path) -> list[str]:
    out = d / "out"
    (out / ".sample_000.k3j2l1").mkdir(parents=True)  # a killed older run's folder
    (out / ".sample_000.k3j2l1" / "image.nii.gz").write_bytes(b"partial")
    (out / ".sample_001.pid999999999@elsewhere_host.abc").mkdir()  # another machine's live run: kept
    from lesiondiffusion.io import temp_tag

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_tag = temp_tag().replace(f"pid{os.getpid()}@", f"pid{int(dead.stdout)}@")
    (out / f".sample_000.old.{dead_tag}q1").mkdir()  # this machine, a process that has exited: removed
    (out / f".sample_002.{temp_tag()}q2").mkdir()  # this machine, a live process (this one): kept
    return w.synth("--set", "size_mm=15,12,14", "--set", "lesion_location=within the parenchymal organ", out=out)


def _stale_temporaries_after(w: World, d: Path) -> None:
    from lesiondiffusion.io import temp_tag

    names = sorted(p.name for p in (d / "out").iterdir())
    assert names == [".sample_001.pid999999999@elsewhere_host.abc", f".sample_002.{temp_tag()}q2", "sample_000"], names


CASES: list[Case] = [
    Case("bundle-inside-replaced-sample", "data loss", _bundle_in_sample, 2, ("sample_000", "contains", "--bundle")),
    Case("report-inside-replaced-sample", "data loss", _report_in_sample, 2, ("contains", "--report")),
    Case("ct-in-sample-through-symlink", "data loss", _ct_in_sample_via_link, 2, ("contains", "--ct")),
    Case("ct-behind-symlinked-output", "data loss", _ct_behind_symlinked_out, 2, ("sample_001", "--ct")),
    Case("catalog-inside-replaced-sample", "data loss", _catalog_in_sample, 2, ("contains", "--catalog")),
    Case("output-inside-bundle", "data loss", _out_inside_bundle, 2, ("lies inside", "--bundle")),
    Case("output-is-the-ct", "data loss", _out_is_ct, 2, ("--ct", "same path")),
    Case("mask-out-existing-file", "data loss", _mask_out_is_ct, 2, ("already exists", "--overwrite")),
    Case("mask-out-is-organs", "data loss", _mask_out_is_organs, 2, ("--organs", "same path")),
    Case("mask-out-symlink-to-organs", "data loss", _mask_out_links_to_report, 2, ("--organs", "never overwritten")),
    Case("bbox-json-is-report", "data loss", _bbox_is_report, 2, ("--report", "same path")),
    Case("report-sample-over-catalog", "data loss", _report_sample_over_catalog, 2, ("catalog", "same path")),
    Case("cache-output-holds-config", "data loss", _cache_out("holds-config"), 2, ("contains", "--config"),
         fault=_nnunet_env),
    Case("cache-output-in-preprocessed-data", "data loss", _cache_out("in-data"), 2,
         ("lies inside", "preprocessed data"), fault=_nnunet_env),
    Case("cache-build-no-preprocessed-cases", "traceback", _cache_out("ok"), 2,
         ("no readable preprocessed cases", "nnUNetv2_plan_and_preprocess"), fault=_nnunet_env),
    Case("set-size-beyond-catalog", "machine", _set_huge, 2, ("size_mm", "8-120 mm", "outside")),
    Case("report-check-size-beyond-catalog", "machine", _check_huge, 2, ("5000", "8-120 mm")),
    Case("place-size-beyond-catalog", "machine", _place_huge, 2, ("--report", "8-120 mm")),
    Case("synthesize-report-size-beyond-catalog", "machine", _synth_report_huge, 2, ("--report", "8-120 mm")),
    # pretrain check refuses what `report check` refuses (issue 18: one validation, Catalog.check_report)
    Case("pretrain-report-size-beyond-catalog", "machine", _pretrain_report_huge, 2,
         ("does not fit catalog kidney_tumor", "5000", "8-120 mm", "report check")),
    Case("synthesize-set-size-below-catalog", "machine", _synth_set_tiny, 2, ("size_mm", "8-120 mm")),
    Case("size-one-number", "silent", _size_one_number, 2, ("size_mm", "three", "[30]")),
    Case("size-boolean", "silent", _size_bool, 2, ("size_mm", "three numbers", "True")),
    Case("size-nan", "silent", _size_nan, 2, ("size_mm", "finite")),
    Case("set-size-two-numbers", "silent", _size_two_numbers_set, 2, ("size_mm", "three")),
    Case("set-size-one-number", "silent", _size_one_number_set, 2, ("size_mm", "three")),
    Case("report-lesion-type-unknown", "silent", _unicorn, 2, ("unicorn_tumor", "lesion_type", "--catalog")),
    Case("report-lesion-type-other-catalog", "silent", _other_type, 2, ("kidney_tumor", "liver_tumor")),
    Case("ct-uint8-not-hu", "silent", _uint8_ct, 2, ("--ct", "Hounsfield", "--allow-non-hu")),
    Case("ct-normalised-not-hu", "silent", _normalised_ct, 2, ("--ct", "Hounsfield", "--allow-non-hu")),
    Case("ct-and-organs-swapped", "blame", _swapped, 2, ("swapped", "--ct", "--organs")),
    Case("place-organs-is-a-ct", "blame", _ct_as_organs_in_place, 2, ("looks like a CT", "ct.nii.gz")),
    Case("truncated-ct", "traceback", _truncated_ct, 2, ("Cannot read", "ct.nii.gz", "NIfTI")),
    Case("truncated-organs-place", "traceback", _truncated_organs_place, 2, ("Cannot read", "seg.nii.gz")),
    Case("pretrain-check-truncated-image", "traceback", _pretrain_truncated("imagesTr"), 2,
         ("cannot read as NIfTI", "imagesTr", "Re-export")),
    Case("pretrain-check-truncated-label", "traceback", _pretrain_truncated("labelsTr"), 2,
         ("cannot read as NIfTI", "labelsTr")),
    Case("pretrain-check-truncated-organs", "traceback", _pretrain_truncated("organsTr"), 2,
         ("cannot read as NIfTI", "organsTr")),
    Case("output-under-a-file", "traceback", _out_under_file, 2, ("notes.txt", "is a file")),
    Case("bbox-under-a-file", "traceback", _bbox_under_file, 2, ("notes.txt", "is a file")),
    Case("read-only-output", "traceback", _synth_ok, 1, ("Cannot write", "read-only", "out"),
         fault=_read_only_fault, after=_nothing_left),
    Case("disk-full-synthesize", "traceback", _synth_ok, 2, ("image.nii.gz", "disk is full", "free space"),
         fault=_disk_full_fault, after=_nothing_left),
    Case("disk-full-mask-out", "traceback", _place_ok, 2, ("box.nii.gz", "disk is full"),
         fault=_disk_full_fault, after=_no_box),
    Case("bundle-hu-window-nan", "blame", _config_value("hu_window[0]", float("nan")), 2,
         ("hu_window[0]", "nan", "finite")),
    Case("bundle-guidance-inf", "blame", _config_value("schedule.guidance_scale", float("inf")), 2,
         ("schedule.guidance_scale", "finite")),
    Case("bundle-spacing-nan", "blame", _config_value("spacing_mm[2]", float("nan")), 2, ("spacing_mm[2]",)),
    Case("bundle-info-nan-embedding", "blame", _nan_embedding("info"), 2, ("embeddings.safetensors", "NaN", "phrase")),
    Case("synthesize-nan-embedding", "blame", _nan_embedding("synth"), 2, ("NaN", "phrase", "bundle embed")),
    Case("guidance-nan", "blame", _guidance("nan"), 2, ("--guidance", "finite")),
    Case("guidance-inf", "blame", _guidance("inf"), 2, ("--guidance", "finite")),
    Case("pretrain-lr-nan", "blame", _pretrain_lr_nan, 2, ("--lr", "finite")),
    Case("catalog-oversized", "minor", _big_catalog, 2, ("big.yaml", "too large", "MiB")),
    Case("catalog-binary", "minor", _binary_catalog, 2, ("garbage.yaml", "not a text file", "NUL")),
    Case("report-not-utf8", "minor", _latin1_report, 2, ("r.yaml:", "UTF-8", "0xe9")),
    Case("report-binary", "minor", _binary_report, 2, ("r.yaml", "not a text file")),
    Case("report-oversized", "minor", _big_report, 2, ("r.yaml", "too large")),
    Case("report-every-bad-value-listed", "minor", _many_bad_values, 2,
         ("5 problems", "'colour'", "'hexagonal'", "'glowing'", "'surface'", "[30]")),
    Case("pretrain-check-binary-report", "minor", _pretrain_binary_report, 2, ("reportsTr", "not a text file")),
    Case("stale-temporaries-removed", "minor", _stale_temporaries, 0, ("wrote 1 sample",),
         may_change=("out/.sample_000.k3j2l1/image.nii.gz",), after=_stale_temporaries_after),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: World, tmp_path: Path, capsys, monkeypatch) -> None:
    argv = case.setup(world, tmp_path)
    before = _hashes(world.root, tmp_path)
    if case.fault is not None:
        case.fault(monkeypatch, tmp_path)
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse refuses an option value before any command runs
        rc = exc.code
    monkeypatch.undo()
    captured = capsys.readouterr()
    message = captured.out + captured.err
    assert rc == case.rc, message
    for word in case.words:
        assert word.lower() in message.lower(), f"{word!r} not in: {message}"
    assert "Traceback" not in message
    allowed = {tmp_path / p for p in case.may_change}
    after = _hashes(world.root, tmp_path)
    for path, digest in before.items():
        if path in allowed:
            continue
        assert after.get(path) == digest, f"input {path} changed or vanished"
    if case.after is not None:
        case.after(world, tmp_path)


def test_placement_memory_is_bounded_by_the_organ_not_the_size(world: World) -> None:
    """The library API takes any report: a 5 m lesion is shrunk to fit (or refused), never allocating ~22 GiB."""
    import tracemalloc

    from lesiondiffusion.catalog import load_catalog
    from lesiondiffusion.organs import load_organ_map
    from lesiondiffusion.placement import place_lesion
    from lesiondiffusion.report import LesionReport

    organs = load_organ_map(world.seg)
    huge = LesionReport.from_yaml(world.report).with_size_mm(_HUGE)
    tracemalloc.start()
    try:
        box = place_lesion(organs, huge, load_catalog("kidney_tumor"), seed=0, on_failure="skip")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"placement peaked at {peak / 2**20:.0f} MiB"
    if box:
        assert max(box.size_mm) < 120 and box.measures["shrink"] < 0.05


# ------------------------------------------------------------------------------------------------
# 4. the offline cache: identity by content and options, per-file size + sha256

def _tiny_case(seed: int):
    from lesiondiffusion.store import SyntheticCase

    rng = np.random.default_rng(seed)
    seg = np.zeros((1, 6, 6, 6), np.int16)
    seg[0, 2:4, 2:4, 2:4] = 1
    return SyntheticCase(f"s{seed}", rng.standard_normal((1, 6, 6, 6)).astype(np.float32), seg,
                         {"class_locations": {1: np.argwhere(seg > 0)}}, {"seed": seed}), None


def _identity(bundle: Path, **changes):
    from lesiondiffusion.commands.cache import generator_identity
    from lesiondiffusion.nnunet_integration.config import config_from_dict

    raw = {"generator": {"backend": "lesiondiffusion", "bundle": str(bundle), "options": {"ddim_steps": 10}},
           "catalogs": [{"name": "kidney_tumor"}], "templates": {"dataset_healthy": True}, "seed": 0}
    for key, value in changes.items():
        section, _, sub = key.partition(".")
        if sub:
            raw[section] = {**raw[section], sub: value}
        else:
            raw[section] = value
    return {"plans": "p", **generator_identity(config_from_dict(raw, "test.yaml"))}


def _reinit_bundle(b: Path) -> dict:
    shutil.rmtree(b)
    assert main(["bundle", "init", "--preset", "tiny", "-o", str(b), "--encoder", "hashing:64", "--seed", "1"]) == 0
    return {}


def _user_catalog(b: Path) -> dict:
    from lesiondiffusion.catalog import load_catalog

    path = b.parent / "kidney_tumor.yaml"
    text = load_catalog("kidney_tumor").path.read_text()
    path.write_text(text.replace("median: 35", "median: 40"))
    return {"catalogs": [{"name": str(path)}]}


IDENTITY_CHANGES = [
    ("bundle-reinitialised", _reinit_bundle, "bundle_sha256"),
    ("ddim-steps", lambda b: {"generator.options": {"ddim_steps": 50}}, "generator_options.ddim_steps"),
    ("guidance-added", lambda b: {"generator.options": {"ddim_steps": 10, "guidance_scale": 4.0}},
     "generator_options.guidance_scale"),
    # the whole section: ddim_steps is no rule_based option (the config schema refuses it)
    ("backend", lambda b: {"generator": {"backend": "rule_based", "bundle": str(b)}}, "backend"),
    ("hu-correction", lambda b: {"generator.hu_correction": "clip"}, "generator.hu_correction"),
    ("seed", lambda b: {"seed": 7}, "seed"),
    ("catalog-edited", _user_catalog, "catalogs"),
    ("catalog-weight", lambda b: {"catalogs": [{"name": "kidney_tumor", "weight": 2.0}]}, "catalogs"),
    ("template-mapping", lambda b: {"templates": {"dataset_healthy": True, "organ_mapping": "v1"}},
     "templates.organ_mapping"),
]


@pytest.mark.parametrize("name,change,key", IDENTITY_CHANGES, ids=[c[0] for c in IDENTITY_CHANGES])
def test_resumed_cache_refuses_a_changed_generator(name, change, key, world: World, tmp_path: Path) -> None:
    from lesiondiffusion.errors import LesionDiffusionError
    from lesiondiffusion.store import OfflineCache

    bundle = tmp_path / "bundle"
    shutil.copytree(world.bundle, bundle)
    root = tmp_path / "cache"
    OfflineCache(root, _identity(bundle)).build(_tiny_case, 2, progress=False)
    before = _hashes(root)
    with pytest.raises(LesionDiffusionError) as err:
        OfflineCache(root, _identity(bundle, **change(bundle))).build(_tiny_case, 3, progress=False)
    assert key in str(err.value) and "mix cases" in str(err.value)
    assert _hashes(root) == before  # nothing was added to the old cache
    # the unchanged settings still resume (the bundle is only equal by content when unchanged)
    if name != "bundle-reinitialised":
        assert OfflineCache(root, _identity(bundle)).build(_tiny_case, 3, progress=False)["n_cases"] == 3


def test_damaged_cache_files_are_rebuilt_on_resume_and_refused_by_the_reader(tmp_path: Path) -> None:
    from lesiondiffusion.errors import LesionDiffusionError
    from lesiondiffusion.store import OfflineCache, OfflineCacheReader

    root = tmp_path / "cache"
    manifest = OfflineCache(root, {"plans": "p"}).build(_tiny_case, 3, progress=False)
    assert all(len(c["sha256"]) == 64 and c["bytes"] > 0 for c in manifest["cases"])
    first, second = (root / "cases" / c["file"] for c in manifest["cases"][:2])
    # the trainer's reader refuses a file changed in place (same size, other bytes) and a truncated one
    data = bytearray(second.read_bytes())
    data[-30] ^= 0xFF
    second.write_bytes(bytes(data))
    reader = OfflineCacheReader(root, expect={"plans": "p"})
    reader.files = [second]
    with pytest.raises(LesionDiffusionError, match="sha256 differs.*cache verify"):
        reader.draw()
    first.write_bytes(first.read_bytes()[:-40])  # truncated
    with pytest.raises(LesionDiffusionError, match="truncated"):
        OfflineCacheReader(root, expect={"plans": "p"})
    # resume sets both aside and rebuilds exactly those two cases
    calls = []

    def factory(seed):
        calls.append(seed)
        return _tiny_case(seed)

    manifest = OfflineCache(root, {"plans": "p"}).build(factory, 3, progress=False)
    assert sorted(calls) == [0, 1] and manifest["n_cases"] == 3
    assert sorted(p.name for p in (root / "rejected").glob("*.npz")) == sorted([first.name, second.name])
    assert OfflineCacheReader(root, expect={"plans": "p"}).draw().seg.max() == 1
