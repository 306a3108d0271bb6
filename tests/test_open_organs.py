"""Open organ vocabulary: catalogs that declare organs outside the shipped list (TotalSegmentator names or
the names of a user's own label map), reports that use them, and their phrases in a bundle."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from lesiondiffusion.catalog import load_catalog
from lesiondiffusion.cli import main
from lesiondiffusion.errors import CatalogError, ReportError, SynthesisError
from lesiondiffusion.report import LesionReport, normalize_value

ADRENAL = """\
name: adrenal_adenoma
label_name: adrenal_adenoma
organ_type: parenchymal organ
organs:
  adrenal gland:
    weight: 1.0
    v2: [adrenal_gland_left, adrenal_gland_right]
    v1: [adrenal_gland_left, adrenal_gland_right]
    synonyms: [suprarenal gland]
attributes:
  shape: {round-like: 0.6, oval: 0.4}
  lesion_location: {within the parenchymal organ: 1.0}
  relationship: {no close relationship with surrounding organs: 1.0}
  surface: {well-defined margin: 1.0}
  specific_features: {none: 1.0}
  enhancement: {non-contrast CT: 1.0}
  density: {hypodense: 1.0}
  density_variations: {homogeneous: 1.0}
size_mm: {distribution: lognormal, median: 14, sigma: 0.3, min: 8, max: 30, aspect: [0.8, 1.0]}
hu:
  non-contrast CT: {hypodense: [-10, 10]}
"""

SARCOMA = """\
name: soft_tissue_sarcoma
label_name: sarcoma
organ_type: parenchymal organ
organs:
  soft tissue: {weight: 1.0, names: [soft_tissue]}
attributes:
  shape: {lobulated: 0.5, oval: 0.5}
  lesion_location: {within the parenchymal organ: 1.0}
  relationship: {close relationship with adjacent organs: 1.0}
  surface: {well-defined margin: 1.0}
  specific_features: {none: 0.5, areas of decreased density: 0.5}
  enhancement: {enhanced CT: 1.0}
  density: {isodense soft-tissue mass: 1.0}
  density_variations: {heterogeneous: 1.0}
size_mm: {distribution: uniform, min: 20, max: 40, aspect: [0.7, 1.0]}
hu:
  enhanced CT: {isodense soft-tissue mass: [30, 70]}
constraints:
  - {name: soft tissue only, if: {organ: soft tissue}, then: {organ_type: parenchymal organ}}
"""


@pytest.fixture
def catalog_dir(tmp_path, monkeypatch):
    d = tmp_path / "catalogs"
    d.mkdir()
    (d / "adrenal_adenoma.yaml").write_text(ADRENAL)
    (d / "soft_tissue_sarcoma.yaml").write_text(SARCOMA)
    monkeypatch.setenv("LESIONDIFFUSION_CATALOG_PATH", str(d))
    return d


def test_declared_organs_join_the_report_vocabulary(catalog_dir):
    cat = load_catalog("adrenal_adenoma")
    assert cat.domain("organ") == {"adrenal gland": 1.0}
    assert cat.organ_names("suprarenal gland") == ["adrenal_gland_left", "adrenal_gland_right"]
    rep = cat.sample(0)
    assert rep.organ == "adrenal gland" and "organ: adrenal gland" in rep.mask_phrases()
    # a report file naming the organ (or a synonym) is read without loading its catalog first
    d = rep.to_dict()
    d["organ"] = "Suprarenal  gland"
    assert LesionReport.from_dict(d).organ == "adrenal gland"
    assert normalize_value("organ", "soft tissue") == "soft tissue"
    with pytest.raises(ReportError, match="declare it under `organs:`"):
        normalize_value("organ", "pineal gland")


def test_vocabulary_lists_declared_organs(catalog_dir, capsys):
    assert main(["catalogs", "vocabulary", "--synonyms"]) == 0
    out = capsys.readouterr().out
    assert "  - adrenal gland   [declared by a catalog]   (also: suprarenal gland)" in out
    assert "  - soft tissue   [declared by a catalog]" in out


def test_a_second_catalog_adds_its_synonyms_to_an_organ_already_declared(catalog_dir):
    """Two catalogs target the adrenal gland with different synonyms: both spellings name the organ, in
    whichever order the catalogs are read (the second one's synonyms were dropped once the organ was known)."""
    load_catalog("adrenal_adenoma")  # declares "adrenal gland" (also: suprarenal gland)
    (catalog_dir / "adrenal_cyst.yaml").write_text(
        ADRENAL.replace("adrenal_adenoma", "adrenal_cyst").replace("[suprarenal gland]", "[adrenal, adrenals]"))
    load_catalog("adrenal_cyst")
    assert normalize_value("organ", "Adrenals") == "adrenal gland"
    assert normalize_value("organ", "suprarenal gland") == "adrenal gland"
    # a shipped organ takes a catalog's synonym too
    (catalog_dir / "liver_cyst_x.yaml").write_text(
        ADRENAL.replace("adrenal_adenoma", "liver_cyst_x").replace("adrenal gland:", "liver:")
        .replace("[adrenal_gland_left, adrenal_gland_right]", "[liver]").replace("[suprarenal gland]", "[jecur]"))
    load_catalog("liver_cyst_x")
    assert normalize_value("organ", "jecur") == "liver"


def test_declared_organ_without_class_names_or_clashing_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(ADRENAL.replace("    v2: [adrenal_gland_left, adrenal_gland_right]\n    v1: [adrenal_gland_left, adrenal_gland_right]\n", ""))
    with pytest.raises(CatalogError, match="lists no class names"):
        load_catalog(bad)
    clash = tmp_path / "clash.yaml"
    clash.write_text(ADRENAL.replace("adrenal gland:", "my gland:").replace("[suprarenal gland]", "[hepatic]"))
    with pytest.raises(CatalogError, match="already means organ 'liver'"):
        load_catalog(clash)


def test_adrenal_catalog_synthesises_on_the_example_ct(catalog_dir, shared_ct_dir, tmp_path, capsys):
    seg = shared_ct_dir / "example_seg.nii.gz"
    bundle = tmp_path / "bundle"
    assert main(["bundle", "init", "--preset", "tiny", "-o", str(bundle), "--encoder", "hashing:64"]) == 0
    out = tmp_path / "out"
    rc = main(["synthesize", "--bundle", str(bundle), "--ct", str(shared_ct_dir / "example_ct_sm.nii.gz"),
               "--organs", str(seg), "--catalog", "adrenal_adenoma", "-n", "1", "--seed", "0", "--ddim-steps", "1",
               "--no-preview", "-o", str(out)])
    assert rc == 0, capsys.readouterr()
    labels = np.asanyarray(nib.load(str(seg)).dataobj)
    mask = np.asanyarray(nib.load(str(out / "sample_000" / "lesion.nii.gz")).dataobj).astype(bool)
    assert mask.any() and np.isin(labels[mask], [8, 9]).all()  # inside the adrenal glands (v2 ids 8, 9)
    doc = yaml.safe_load((out / "sample_000" / "report.yaml").read_text())
    assert doc["report"]["organ"] == "adrenal gland"
    assert doc["box"]["organ_names"][0].startswith("adrenal_gland")


def test_new_phrase_without_a_loadable_encoder_names_bundle_embed(catalog_dir, tmp_path):
    from lesiondiffusion.bundle import Bundle
    from lesiondiffusion.organs import organ_map_from_array
    from lesiondiffusion.pipeline import LesionSynthesizer, SynthesisConfig

    from lesiondiffusion.report import vocabulary_phrases

    bundle = Bundle.init("tiny", "hashing:64", seed=0, phrases=vocabulary_phrases())  # shipped vocabulary only
    assert "organ: adrenal gland" not in bundle.cache
    bundle.cache.encoder = None  # as for a BiomedCLIP bundle on a machine without the model
    bundle.config.encoder["spec"] = str(tmp_path / "no-such-encoder")
    labels = np.zeros((24, 24, 24), np.int16)
    labels[4:20, 4:20, 4:20] = 8
    organs = organ_map_from_array(labels, np.diag([3.0, 3.0, 3.0, 1.0]), "v2")
    cat = load_catalog("adrenal_adenoma")
    synth = LesionSynthesizer(bundle, "cpu", SynthesisConfig(ddim_steps=1))
    with pytest.raises(SynthesisError, match="bundle embed .* --catalog adrenal_adenoma") as err:
        synth(np.zeros(labels.shape, np.float32), organs, [cat.sample(0)], cat, seed=0)
    assert "organ: adrenal gland" in str(err.value)


def test_soft_tissue_organ_from_a_user_label_map(catalog_dir, tmp_path, capsys):
    """A user's own organ map (label 1 soft tissue, 2 bone) with a mapping file: report, placement, lesion."""
    from lesiondiffusion.organs import load_organ_map
    from lesiondiffusion.rule_based import RuleBasedGenerator

    g = np.indices((40, 40, 24))
    labels = np.zeros((40, 40, 24), np.uint8)
    labels[((g[0] - 20) ** 2 + (g[1] - 20) ** 2) <= 18 ** 2] = 1     # thigh soft tissue
    labels[((g[0] - 20) ** 2 + (g[1] - 20) ** 2) <= 4 ** 2] = 2      # femur
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    seg = tmp_path / "thigh_seg.nii.gz"
    nib.save(nib.Nifti1Image(labels, aff), str(seg))
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"1": "soft_tissue", "2": "bone"}))
    report = tmp_path / "r.yaml"
    assert main(["report", "sample", "soft_tissue_sarcoma", "--seed", "3", "-o", str(report)]) == 0
    assert yaml.safe_load(report.read_text())["organ"] == "soft tissue"
    box_json = tmp_path / "box.json"
    assert main(["place", "--organs", str(seg), "--mapping", str(mapping), "--report", str(report),
                 "-o", str(box_json)]) == 0
    box = json.loads(box_json.read_text())
    assert box["organ_names"] == ["soft_tissue"] and box["measures"]["inside_fraction"] >= 0.9
    # without the mapping the organ cannot be found, and the error says how to map it
    assert main(["place", "--organs", str(seg), "--mapping", "v2", "--report", str(report),
                 "-o", str(tmp_path / "b2.json")]) == 2
    assert "soft_tissue" in capsys.readouterr().err
    organs = load_organ_map(seg, mapping)
    ct = np.where(labels == 1, 50.0, np.where(labels == 2, 700.0, -1000.0)).astype(np.float32)
    cat = load_catalog("soft_tissue_sarcoma")
    res = RuleBasedGenerator()(ct, organs, [LesionReport.from_yaml(report)], cat, seed=0)[0]
    assert res.ok and (labels[res.lesion_mask.astype(bool)] == 1).mean() > 0.9
