"""Structured lesion reports: vocabulary, synonyms, size categories, round trips, bad input."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from lesiondiffusion.errors import ReportError
from lesiondiffusion.report import (
    ATTRIBUTES,
    IMAGE_ATTRIBUTES,
    MASK_ATTRIBUTES,
    VOCABULARY,
    LesionReport,
    normalize_value,
    size_category,
    vocabulary_phrases,
)


def _report(**over) -> LesionReport:
    d = dict(
        lesion_type="kidney_tumor", shape="round-like", organ_type="parenchymal organ",
        lesion_location="within the parenchymal organ", organ="kidney", size="medium (2-5 cm)",
        relationship="no close relationship with surrounding organs", surface="well-defined margin",
        specific_features="none", enhancement="enhanced CT", density="hypodense",
        density_variations="homogeneous", size_mm=(30.0, 24.0, 26.0),
    )
    d.update(over)
    return LesionReport(**d)


def test_attribute_groups_follow_the_method():
    assert ATTRIBUTES == ("shape", "organ_type", "lesion_location", "organ", "size", "relationship", "surface",
                          "specific_features", "enhancement", "density", "density_variations")
    assert set(MASK_ATTRIBUTES) | set(IMAGE_ATTRIBUTES) == set(ATTRIBUTES)
    assert set(MASK_ATTRIBUTES) & set(IMAGE_ATTRIBUTES) == set()  # the method's split, no attribute in both
    assert "surface" in IMAGE_ATTRIBUTES and "shape" in MASK_ATTRIBUTES


@pytest.mark.parametrize(
    "attribute, value, canonical",
    [
        ("density", "low density lesion", "hypodense"),
        ("density", "Hypoattenuating lesion", "hypodense"),
        ("density", "HIGH DENSITY", "hyperdense"),
        ("density", "ground glass", "ground-glass opacity"),
        ("density", "rim enhancement", "ring enhancement"),
        ("shape", "punctate", "nodular"),
        ("shape", "round like", "round-like"),
        ("shape", "round_like", "round-like"),
        ("enhancement", "plain CT", "non-contrast CT"),
        ("enhancement", "contrast-enhanced CT", "enhanced CT"),
        ("organ", "bladder", "urinary bladder"),
        ("organ", "renal", "kidney"),
        ("specific_features", "calculus", "stone"),
        ("specific_features", "necrosis", "areas of decreased density"),
        ("density_variations", "inhomogeneous", "heterogeneous"),
        ("lesion_location", "exophytic", "protruding from the parenchymal organ"),
        ("size", "small", "small (1-2 cm)"),
    ],
)
def test_synonyms_normalise_to_canonical(attribute, value, canonical):
    assert normalize_value(attribute, value) == canonical
    assert normalize_value(attribute, canonical) == canonical


def test_issue_vocabulary_is_covered():
    need = {
        "shape": ["round-like", "irregular", "irregular wall thickening", "nodular", "cystic", "luminal narrowing",
                  "protrusion into the lumen"],
        "density": ["hypodense", "isodense", "hyperdense", "mixed-density", "hypodense fluid-like",
                    "isodense soft-tissue mass", "ground-glass opacity", "ring enhancement"],
        "density_variations": ["homogeneous", "heterogeneous"],
        "surface": ["well-defined margin", "ill-defined margin", "clear serosal surface", "irregular serosal surface",
                    "clear boundary with the renal parenchyma", "unclear boundary with the renal parenchyma"],
        "relationship": ["no close relationship with surrounding organs", "close relationship with adjacent organs"],
        "specific_features": ["areas of decreased density", "areas of increased density", "spiculated margins",
                              "calcification", "stone"],
        "enhancement": ["enhanced CT", "non-contrast CT"],
        "lesion_location": ["within the parenchymal organ", "protruding from the parenchymal organ",
                            "within the lumen of a hollow organ", "wall thickening"],
    }
    for attribute, values in need.items():
        for v in values:
            assert v in VOCABULARY[attribute], (attribute, v)


def test_unknown_value_lists_allowed_values():
    with pytest.raises(ReportError) as e:
        normalize_value("density", "sparkly")
    msg = str(e.value)
    assert "'sparkly'" in msg and "'density'" in msg and "hypodense" in msg and "free_text" in msg
    with pytest.raises(ReportError, match="Unknown report attribute 'colour'"):
        normalize_value("colour", "red")


def test_size_category_follows_largest_extent():
    assert size_category((5, 9.9, 3)) == "tiny (<1 cm)"
    assert size_category((10, 3, 3)) == "small (1-2 cm)"
    assert size_category((19.9, 3, 3)) == "small (1-2 cm)"
    assert size_category((20, 3, 3)) == "medium (2-5 cm)"
    assert size_category((3, 3, 50)) == "large (>5 cm)"
    r = _report().with_size_mm((8, 6, 7))
    assert r.size == "tiny (<1 cm)" and r.size_mm == (8.0, 6.0, 7.0)


def test_constructor_normalises_and_rejects_inconsistent_size():
    r = _report(density="low density lesion", shape="round")
    assert r.density == "hypodense" and r.shape == "round-like"
    with pytest.raises(ReportError, match="contradicts size_mm"):
        _report(size="large (>5 cm)")
    for bad in [(0, 1, 1), (-3, 4, 4), (math.nan, 1, 1), (1, 2)]:
        with pytest.raises(ReportError, match="size_mm"):
            _report(size_mm=bad)


def test_phrases_are_stable_and_in_the_vocabulary():
    r = _report()
    mp, ip = r.mask_phrases(), r.image_phrases()
    assert len(mp) == 6 and len(ip) == 5
    assert mp[0] == "shape: round-like" and mp[1] == "organ type: parenchymal organ"
    assert ip[-1] == "density variations: homogeneous" and ip[0] == "surface: well-defined margin"
    vocab = vocabulary_phrases()
    assert len(vocab) == len(set(vocab)) == sum(len(v) for v in VOCABULARY.values())
    assert set(mp + ip) <= set(vocab)


def test_dict_yaml_json_round_trip(tmp_path):
    r = _report(specific_features="calcification", enhancement="non-contrast CT")
    assert LesionReport.from_dict(r.to_dict()) == r
    r.to_yaml(tmp_path / "r.yaml")
    assert LesionReport.from_yaml(tmp_path / "r.yaml") == r
    r.to_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["size_mm"] == [30.0, 24.0, 26.0]
    assert LesionReport.from_json(tmp_path / "r.json") == r
    # the {report: {...}} form used inside dataset reports is accepted too
    (tmp_path / "wrapped.yaml").write_text(yaml.safe_dump({"report": r.to_dict()}))
    assert LesionReport.from_yaml(tmp_path / "wrapped.yaml") == r


def test_from_dict_derives_missing_size_fields():
    d = _report().to_dict()
    del d["size"]
    assert LesionReport.from_dict(d).size == "medium (2-5 cm)"
    d = _report().to_dict()
    del d["size_mm"]
    d["size"] = "small"
    r = LesionReport.from_dict(d)
    assert r.size == "small (1-2 cm)" and size_category(r.size_mm) == r.size
    d = _report().to_dict()
    d["size_mm"] = "22x18x20"
    assert LesionReport.from_dict(d).size_mm == (22.0, 18.0, 20.0)


def test_from_dict_errors_name_source_key_and_fix():
    d = _report().to_dict()
    d["density"] = "glowing"
    with pytest.raises(ReportError) as e:
        LesionReport.from_dict(d, source="case7.yaml")
    assert "case7.yaml" in str(e.value) and "'density'" in str(e.value) and "glowing" in str(e.value)
    d = _report().to_dict()
    d["colour"] = "red"
    with pytest.raises(ReportError, match="unknown report key.*'colour'"):
        LesionReport.from_dict(d)
    d = _report().to_dict()
    del d["shape"]
    with pytest.raises(ReportError, match="missing shape"):
        LesionReport.from_dict(d)
    d = _report().to_dict()
    d["size"] = "tiny"
    with pytest.raises(ReportError, match="key 'size' is 'tiny"):
        LesionReport.from_dict(d)
    with pytest.raises(ReportError, match="must be a mapping"):
        LesionReport.from_dict(["shape"])


def test_free_text_attributes_accept_any_text():
    d = _report().to_dict()
    d["specific_features"] = "fat-containing   with   macroscopic fat"
    with pytest.raises(ReportError):
        LesionReport.from_dict(d)
    r = LesionReport.from_dict(d, free_text=["specific_features"])
    assert r.specific_features == "fat-containing with macroscopic fat"
    assert r.image_phrases()[1] == "specific features: fat-containing with macroscopic fat"
    again = LesionReport.from_dict(r.to_dict())  # free_text travels with the report
    assert again == r


def test_from_yaml_bad_files(tmp_path):
    with pytest.raises(ReportError, match="not found"):
        LesionReport.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("shape: [round\n")
    with pytest.raises(ReportError, match="bad.yaml: not valid YAML"):
        LesionReport.from_yaml(bad)
