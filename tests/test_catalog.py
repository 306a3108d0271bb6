"""YAML attribute catalogs: shipped catalogs, seeded constrained sampling, validation messages."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lesiondiffusion.catalog import list_catalogs, load_catalog, validate_catalog_file
from lesiondiffusion.errors import CatalogError
from lesiondiffusion.organs import TOTALSEG_V1, TOTALSEG_V2
from lesiondiffusion.report import size_category, vocabulary_phrases

SHIPPED = {
    "lung_tumor", "liver_tumor", "liver_cyst", "gallbladder_cancer", "gallstone", "colon_cancer", "bladder_cancer",
    "esophageal_cancer", "gastric_cancer", "kidney_tumor", "kidney_cyst", "kidney_stone", "pancreatic_tumor",
    "pancreatic_cyst", "hematencephalon", "soft_tissue_sarcoma",
}
CATALOG_DIR = Path(__file__).resolve().parents[1] / "attribute_catalogs"


def test_shipped_catalogs_are_listed_and_template_is_skipped():
    assert set(list_catalogs()) == SHIPPED
    assert (CATALOG_DIR / "_template.yaml").exists()
    validate_catalog_file(CATALOG_DIR / "_template.yaml")  # the template itself is a valid catalog


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_1000_samples_are_valid_reports(name):
    c = load_catalog(name)
    assert c.name == name and c.label_name
    vocab = set(vocabulary_phrases())
    phrases = set(c.phrases())
    assert phrases <= vocab
    for o in c.organs:
        for n in c.organs[o].get("v2", []):
            assert n in TOTALSEG_V2
        for n in c.organs[o].get("v1", []):
            assert n in TOTALSEG_V1
    rng = np.random.default_rng(123)
    seen: Counter = Counter()
    for _ in range(1000):
        r = c.sample(rng)
        assert r.lesion_type == name
        assert c.check_report(r) == []
        assert r.organ_type == c.organ_type
        assert c.size.min <= max(r.size_mm) <= c.size.max
        assert min(r.size_mm) >= c.size.min * c.size.aspect[0] - 1e-6
        assert size_category(r.size_mm) == r.size
        lo, hi = c.hu_range(r.density, r.enhancement)
        assert -1024 <= lo <= hi <= 3071
        assert set(r.mask_phrases() + r.image_phrases()) <= phrases
        seen[r.lesion_location] += 1
    # every location value with weight > 0 is actually produced
    assert set(seen) == {v for v, w in c.domain("lesion_location").items() if w > 0}


def test_sampling_is_seeded_and_follows_weights():
    c = load_catalog("kidney_tumor")
    assert c.sample(7) == c.sample(7)
    assert len({tuple(c.sample(s).size_mm) for s in range(20)}) == 20
    locs = Counter(c.sample(s).lesion_location for s in range(2000))
    share = locs["within the parenchymal organ"] / 2000
    assert 0.45 < share < 0.55  # weight 0.5 in the catalog
    sizes = np.array([max(c.sample(s).size_mm) for s in range(2000)])
    assert 28 < np.median(sizes) < 42  # lognormal median 35 mm, truncated to [8, 120]


def test_fixed_attributes_are_respected_with_synonyms():
    c = load_catalog("kidney_tumor")
    for s in range(50):
        r = c.sample(s, {"density": "low density lesion", "size_mm": "22,18,20"})
        assert r.density == "hypodense" and r.size_mm == (22.0, 18.0, 20.0) and r.size == "medium (2-5 cm)"
    for s in range(50):
        r = c.sample(s, {"size": "small"})
        assert 10 <= max(r.size_mm) < 20
    r = c.sample(0, {"organ": "left kidney"})  # weight 0: allowed when fixed, never sampled
    assert r.organ == "left kidney"
    assert all(c.sample(s).organ == "kidney" for s in range(100))


def test_constraints_hold_for_fixed_and_sampled_values():
    c = load_catalog("liver_cyst")
    for s in range(200):
        r = c.sample(s, {"shape": "cystic"})
        assert r.density == "hypodense fluid-like" and r.density_variations == "homogeneous"
    # fixing the consequence narrows the cause through the contrapositive
    for s in range(200):
        r = c.sample(s, {"density_variations": "heterogeneous"})
        assert r.shape != "cystic"
    st = load_catalog("kidney_stone")
    assert all(st.sample(s).density == "hyperdense" for s in range(200))


def test_impossible_combination_names_the_rule():
    c = load_catalog("liver_cyst")
    with pytest.raises(CatalogError) as e:
        c.sample(0, {"shape": "cystic", "density": "hypodense"})
    msg = str(e.value)
    assert "cystic means fluid and homogeneous" in msg and "liver_cyst.yaml" in msg and "line" in msg
    with pytest.raises(CatalogError, match="cystic means fluid"):
        c.sample(0, {"shape": "cystic", "density_variations": "heterogeneous"})
    g = load_catalog("gastric_cancer")
    with pytest.raises(CatalogError, match="polypoid tumours sit in the lumen"):
        g.sample(0, {"shape": "protrusion into the lumen", "lesion_location": "wall thickening"})


def test_fixed_values_outside_the_catalog_are_rejected():
    c = load_catalog("colon_cancer")
    with pytest.raises(CatalogError, match="allows .*irregular wall thickening"):
        c.sample(0, {"shape": "cystic"})
    with pytest.raises(CatalogError, match="tiny"):
        c.sample(0, {"size": "tiny"})  # min diameter 10 mm
    with pytest.raises(CatalogError, match="not a report attribute"):
        c.sample(0, {"colour": "red"})
    with pytest.raises(CatalogError, match="Unknown value 'purple'"):
        c.sample(0, {"density": "purple"})
    with pytest.raises(CatalogError, match="contradicts"):
        c.sample(0, {"size": "large", "size_mm": [10, 10, 10]})


def test_hu_ranges_are_plausible():
    assert load_catalog("liver_cyst").hu_range("fluid density", "plain CT") == (0.0, 20.0)
    lo, hi = load_catalog("kidney_stone").hu_range("hyperdense", "non-contrast CT")
    assert lo >= 200 and hi >= 1000
    lo, hi = load_catalog("lung_tumor").hu_range("ground-glass opacity", "enhanced CT")
    assert -800 <= lo < hi < -200
    lo, hi = load_catalog("hematencephalon").hu_range("hyperdense", "non-contrast CT")
    assert 45 <= lo < hi <= 95
    with pytest.raises(CatalogError, match="no HU range for density 'ground-glass opacity'"):
        load_catalog("liver_tumor").hu_range("ground-glass opacity", "enhanced CT")


def test_unknown_lesion_type_lists_catalogs():
    with pytest.raises(CatalogError, match="Unknown lesion type 'spleen_tumor'.*kidney_tumor"):
        load_catalog("spleen_tumor")


# ------------------------------------------------------------------------------------------------
# validation: each bad-input class gives file, line and key
GOOD = (CATALOG_DIR / "kidney_tumor.yaml").read_text()


def _write(tmp_path: Path, text: str, name: str = "my_lesion.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _line_of(text: str, needle: str) -> int:
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(needle)


def _expect(tmp_path, text, needle, *fragments):
    p = _write(tmp_path, text)
    with pytest.raises(CatalogError) as e:
        validate_catalog_file(p)
    msg = str(e.value)
    line = _line_of(text, needle)
    assert f"{p}:{line}:" in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def test_validate_yaml_syntax_error(tmp_path):
    text = GOOD.replace("  shape: {round-like: 0.45,", "  shape: {round-like: 0.45,,[")
    p = _write(tmp_path, text)
    with pytest.raises(CatalogError) as e:
        validate_catalog_file(p)
    assert re.search(rf"{re.escape(str(p))}:\d+:\d+: YAML syntax error", str(e.value))


def test_validate_unknown_attribute(tmp_path):
    text = GOOD.replace("  shape: {", "  colour: {red: 1}\n  shape: {")
    _expect(tmp_path, text, "colour:", "attributes.colour", "unknown attribute")


def test_validate_unknown_value(tmp_path):
    text = GOOD.replace("oval: 0.15,", "triangular: 0.15,")
    _expect(tmp_path, text, "triangular", "attributes.shape.triangular", "unknown value 'triangular'", "round-like")


@pytest.mark.parametrize("weight", ["-0.2", "heavy", ".nan"])
def test_validate_bad_weight(tmp_path, weight):
    text = GOOD.replace("oval: 0.15,", f"oval: {weight},")
    _expect(tmp_path, text, "shape: {", "attributes.shape.oval", "bad weight")


def test_validate_all_zero_weights(tmp_path):
    text = GOOD.replace("enhancement: {enhanced CT: 0.7, non-contrast CT: 0.3}", "enhancement: {enhanced CT: 0, non-contrast CT: 0}")
    _expect(tmp_path, text, "enhancement: {", "attributes.enhancement", "every weight is 0")


def test_validate_negative_size(tmp_path):
    text = GOOD.replace("  min: 8\n", "  min: -8\n")
    _expect(tmp_path, text, "  min: -8", "size_mm.min", "positive")


def test_validate_inverted_size_range(tmp_path):
    text = GOOD.replace("  min: 8\n", "  min: 200\n")
    _expect(tmp_path, text, "  min: 200", "size_mm.min", "inverted size range")


def test_validate_unknown_organ_name(tmp_path):
    text = GOOD.replace("v2: [kidney_left, kidney_right, kidney_cyst_left", "v2: [kidney_leftt, kidney_right, kidney_cyst_left")
    _expect(tmp_path, text, "kidney_leftt", "organs.kidney.v2.0", "unknown TotalSegmentator v2 class name 'kidney_leftt'")


def test_validate_bad_hu_and_constraints(tmp_path):
    text = GOOD.replace("hypodense: [10, 28]", "hypodense: [28, 10]")
    _expect(tmp_path, text, "hypodense: [28, 10]", "inverted HU range")
    text = GOOD.replace("then: {density_variations: heterogeneous}", "then: {density_variations: stripy}", 1)
    _expect(tmp_path, text, "stripy", "constraints.0.then.density_variations", "stripy")
    text = GOOD.replace("    mixed-density: [10, 60]\n", "")
    _expect(tmp_path, text, "hu:", "missing HU range for density 'mixed-density' under 'non-contrast CT'")


def test_validate_lists_every_problem_at_once(tmp_path):
    text = GOOD.replace("oval: 0.15,", "triangular: 0.15,").replace("  min: 8\n", "  min: -8\n").replace(
        "organ_type: parenchymal organ", "organ_type: gaseous organ")
    p = _write(tmp_path, text)
    with pytest.raises(CatalogError) as e:
        validate_catalog_file(p)
    msg = str(e.value)
    assert "3 problems" in msg and "triangular" in msg and "size_mm.min" in msg and "gaseous organ" in msg


def test_validate_duplicate_keys_and_missing_sections(tmp_path):
    text = GOOD.replace("  density_variations: {homogeneous: 0.35, heterogeneous: 0.65}",
                        "  density_variations: {homogeneous: 0.35, heterogeneous: 0.65}\n  shape: {round-like: 1}")
    _expect(tmp_path, text, "  shape: {round-like: 1}", "attributes.shape", "duplicate key")
    text = GOOD.replace("organs:\n", "organz:\n")
    msg = _expect(tmp_path, text, "organz", "unknown key")
    assert "missing required key 'organs'" in msg


def test_catalog_whose_rules_allow_nothing_is_rejected(tmp_path):
    rules = ("  - name: contradiction\n    if: {organ_type: parenchymal organ}\n"
             "    then: {density: hyperdense, density_variations: homogeneous}\n"
             "  - name: other side\n    if: {density: hyperdense}\n    then: {density_variations: heterogeneous}\n")
    text = GOOD.replace("placement:\n", rules + "placement:\n")
    p = _write(tmp_path, text)
    with pytest.raises(CatalogError, match="allow no report at all"):
        validate_catalog_file(p)


def test_user_catalog_folder_and_free_text(tmp_path, monkeypatch):
    text = GOOD.replace("name: kidney_tumor", "name: my_lesion").replace(
        "placement:", "free_text: [specific_features]\nplacement:").replace(
        "calcification: 0.1,", "macroscopic fat: 0.1,")
    _write(tmp_path, text)
    _write(tmp_path, GOOD, "_draft.yaml")
    monkeypatch.setenv("LESIONDIFFUSION_CATALOG_PATH", str(tmp_path))
    assert "my_lesion" in list_catalogs() and "_draft" not in list_catalogs()
    c = load_catalog("my_lesion")
    feats = {c.sample(s).specific_features for s in range(300)}
    assert "macroscopic fat" in feats
    r = c.sample(0, {"specific_features": "fat-containing angiomyolipoma"})
    assert r.specific_features == "fat-containing angiomyolipoma"
    assert "specific features: macroscopic fat" in c.phrases()
