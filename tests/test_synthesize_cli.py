"""`lesiondiffusion synthesize` end to end on the real CT with a tiny random bundle, plus bad input."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lesiondiffusion.cli import main
from lesiondiffusion.report import LesionReport


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    assert main(["bundle", "init", "--preset", "tiny", "-o", str(out), "--encoder", "hashing:64"]) == 0
    return out


def test_synthesize_real_ct_end_to_end(shared_ct_dir, bundle_dir, tmp_path, capsys):
    ct_path, seg_path = shared_ct_dir / "example_ct_sm.nii.gz", shared_ct_dir / "example_seg.nii.gz"
    before = (_digest(ct_path), _digest(seg_path))
    out = tmp_path / "out"
    argv = ["synthesize", "--bundle", str(bundle_dir), "--ct", str(ct_path), "--organs", str(seg_path),
            "--catalog", "kidney_tumor", "--set", "density=hypodense", "--set", "size_mm=15,12,15",
            "--set", "lesion_location=within the parenchymal organ",
            "-n", "2", "--seed", "5", "--ddim-steps", "2", "--batch-size", "2", "-o", str(out)]
    assert main(argv) == 0
    assert "wrote 2 sample(s)" in capsys.readouterr().out
    assert (_digest(ct_path), _digest(seg_path)) == before  # inputs untouched
    ct_img = nib.load(str(ct_path))
    ct = np.asanyarray(ct_img.dataobj)
    kidneys = np.isin(np.asanyarray(nib.load(str(seg_path)).dataobj), [2, 3])
    for i in range(2):
        d = out / f"sample_{i:03d}"
        assert sorted(p.name for p in d.iterdir()) == ["image.nii.gz", "lesion.nii.gz", "preview.png", "report.yaml"]
        img, les = nib.load(str(d / "image.nii.gz")), nib.load(str(d / "lesion.nii.gz"))
        assert np.allclose(img.affine, ct_img.affine) and np.allclose(les.affine, ct_img.affine)
        assert img.get_data_dtype() == ct_img.get_data_dtype()
        image, mask = np.asanyarray(img.dataobj), np.asanyarray(les.dataobj).astype(bool)
        assert image.shape == ct.shape and mask.any()
        assert not (mask & ~kidneys).any()
        changed = ndimage.binary_dilation(mask)
        assert np.array_equal(image[~changed], ct[~changed])
        report = LesionReport.from_yaml(d / "report.yaml")  # report.yaml is reusable as --report
        assert report.density == "hypodense" and report.lesion_type == "kidney_tumor"
        assert (d / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    # a finished run is never silently overwritten
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_synthesize_bad_input_is_explained(shared_ct_dir, bundle_dir, tmp_path, capsys):
    ct_path = shared_ct_dir / "example_ct_sm.nii.gz"
    base = ["synthesize", "--bundle", str(bundle_dir), "--ct", str(ct_path), "--catalog", "kidney_tumor", "-o", str(tmp_path / "o")]
    missing = tmp_path / "nope.nii.gz"
    assert main(base + ["--organs", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert main(base + ["--organs", str(shared_ct_dir / "example_seg.nii.gz"), "--set", "density"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    other = shared_ct_dir / "example_seg_fast_force_split.nii.gz"
    if other.exists():
        assert main(base + ["--organs", str(other)]) == 2
        assert "same voxel grid" in capsys.readouterr().err
    (tmp_path / "not_a_bundle").mkdir()
    assert main(base + ["--organs", str(shared_ct_dir / "example_seg.nii.gz"), "--bundle", str(tmp_path / "not_a_bundle")]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_interrupted_write_leaves_no_partial_sample(shared_ct_dir, bundle_dir, tmp_path, monkeypatch, capsys):
    import lesiondiffusion.preview as preview

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the user presses Ctrl-C while the last file of the sample is written

    monkeypatch.setattr(preview, "save_preview", crash)
    out = tmp_path / "out"
    argv = ["synthesize", "--bundle", str(bundle_dir), "--ct", str(shared_ct_dir / "example_ct_sm.nii.gz"),
            "--organs", str(shared_ct_dir / "example_seg.nii.gz"), "--catalog", "kidney_tumor",
            "--set", "size_mm=12,12,12", "--ddim-steps", "1", "--guidance", "1", "-o", str(out)]
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(out.iterdir()) == []  # neither sample_000 nor temporary folders/files


def test_synthesize_redraws_and_prints_tries_on_a_thin_organ(shared_ct_dir, bundle_dir, tmp_path, capsys):
    import yaml

    out = tmp_path / "thin"
    argv = ["synthesize", "--bundle", str(bundle_dir), "--ct", str(shared_ct_dir / "example_ct_sm.nii.gz"),
            "--organs", str(shared_ct_dir / "example_seg.nii.gz"), "--catalog", "pancreatic_tumor",
            "--set", "lesion_location=protruding from the parenchymal organ", "-n", "3", "--seed", "1",
            "--ddim-steps", "1", "--batch-size", "3", "--max-tries", "4", "--no-preview", "-o", str(out)]
    rc = main(argv)
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.startswith("tries per sample"))
    tries = {int(k): int(v) for k, v in (p.split(": ") for p in line.split("): ", 1)[1].split(", "))}
    assert sorted(tries) == [0, 1, 2] and all(1 <= t <= 4 for t in tries.values())
    for i, t in tries.items():
        d = out / f"sample_{i:03d}"
        if d.exists():
            doc = yaml.safe_load((d / "report.yaml").read_text())
            assert doc["synthesis"]["tries"] == t
            frac = doc["synthesis"]["organ_fraction"]
            assert 0.25 <= frac <= 0.9  # the same rule the box passed at placement
            syn = doc["synthesis"]
            assert syn["hu_correction"] == "off" and syn["hu_corrected"] is False  # the default: the model's HU
            assert f"sample {i:03d}: HU correction" not in text
        else:
            assert t == 4 and rc == 1
            fails = yaml.safe_load((out / "failures.yaml").read_text())
            assert any(f["sample"] == i and f["tries"] == 4 for f in fails)
