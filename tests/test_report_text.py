"""Free-text reports: the offline parser on labelled phrasings, negations, sizes, the CLI, and the optional
LLM path against a local fake OpenAI-compatible server."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from lesiondiffusion.catalog import load_catalog
from lesiondiffusion.cli import main
from lesiondiffusion.errors import ReportError
from lesiondiffusion.report_text import UNSPECIFIED, parse_text, parse_with_llm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_report_parse import score  # noqa: E402  (one scoring rule for the test and the benchmark)

PHRASINGS = yaml.safe_load((Path(__file__).parent / "data" / "report_phrasings.yaml").read_text(encoding="utf-8"))


def test_at_least_twenty_phrasings_with_mm_cm_and_negations():
    assert len(PHRASINGS) >= 20
    texts = " ".join(c["text"] for c in PHRASINGS)
    assert " mm" in texts and " cm" in texts and sum(bool(c.get("negated")) for c in PHRASINGS) >= 5


@pytest.mark.parametrize("case", PHRASINGS, ids=[c["text"][:40] for c in PHRASINGS])
def test_phrasing(case):
    _right, _judged, errors = score(case)
    assert errors == []


def test_example_sources_unspecified_and_size():
    r = parse_text("3.2 x 2.8 cm hypodense lesion with ill-defined margins in segment VI of the liver, "
                   "heterogeneous, no enhancement")
    assert r.size_mm == (32.0, 28.0, 28.0)
    assert r.sources["surface"] == "ill-defined margins"
    assert r.sources["organ"] == "segment VI of the liver"
    assert r.values["shape"] == UNSPECIFIED and "shape" not in r.sources
    d = r.to_dict()
    assert d["attributes"]["density"] == {"value": "hypodense", "source": "hypodense lesion"}


def test_negation_does_not_reach_past_the_clause():
    r = parse_text("Liver lesion without calcification, with necrosis.")
    assert [f.value for f in r.negated] == ["calcification"]
    assert r.values["specific_features"] == "areas of decreased density"
    r = parse_text("Kidney mass, not hyperdense, hypodense.")
    assert r.values["density"] == "hypodense" and r.negated[0].value == "hyperdense"


def test_unspecified_attributes_are_drawn_from_the_catalog():
    r = parse_text("2 cm hyperdense round lesion in the left kidney")
    report = r.to_report(load_catalog(r.lesion_type), seed=3)
    assert (report.lesion_type, report.density, report.shape, report.organ) == ("kidney_tumor", "hyperdense", "round-like", "left kidney")
    assert report.size_mm == (20.0, 20.0, 20.0)
    assert report.enhancement in load_catalog("kidney_tumor").domain("enhancement")


def test_cli_parse_text_and_file(tmp_path, capsys):
    f = tmp_path / "finding.txt"
    f.write_text("Round well-circumscribed 15 mm cyst in the left kidney, fluid density, no calcification.")
    out = tmp_path / "report.yaml"
    assert main(["report", "parse", "--file", str(f), "-o", str(out), "--seed", "1"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out.split("wrote ")[0])
    assert printed["attributes"]["specific_features"] == {"value": "none", "source": "no calcification"}
    report = yaml.safe_load(out.read_text())
    assert report["lesion_type"] == "kidney_cyst" and report["density"] == "hypodense fluid-like"
    assert main(["report", "parse"]) == 2  # neither text nor --file
    assert main(["report", "parse", "fuzzy thing", "-o", str(tmp_path / "x.yaml")]) == 2  # type unknown
    assert "--type" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


class _FakeChat(BaseHTTPRequestHandler):
    """A local OpenAI-compatible /v1/chat/completions that answers a canned content string."""

    answer = "{}"
    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, dict(self.headers), body))
        if self.path != "/v1/chat/completions":
            self.send_response(404)
            self.end_headers()
            return
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": type(self).answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def fake_llm():
    server = HTTPServer(("127.0.0.1", 0), _FakeChat)
    _FakeChat.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_llm_answer_validated_against_the_vocabulary(fake_llm, monkeypatch, capsys):
    text = "Oval 12 mm hypoattenuating lesion of the right kidney, calcified"
    _FakeChat.answer = "```json\n" + json.dumps({
        "shape": "ovoid", "organ": "right renal", "density": "hypoattenuating", "specific_features": "calcified",
        "surface": "unspecified", "size_mm": [12], "sources": {"shape": "Oval", "density": "hypoattenuating"},
    }) + "\n```"
    r = parse_with_llm(text, fake_llm, model="fake-model", api_key="k")
    assert r.values["shape"] == "oval" and r.values["organ"] == "right kidney" and r.values["density"] == "hypodense"
    assert r.values["specific_features"] == "calcification" and r.values["surface"] == UNSPECIFIED
    assert r.size_mm == (12.0, 12.0, 12.0) and r.values["size"] == "small (1-2 cm)"
    assert r.lesion_type == "kidney_tumor" and r.parser.startswith("llm:")
    path, headers, body = _FakeChat.requests[-1]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k"
    assert body["model"] == "fake-model" and body["messages"][-1]["content"] == text
    assert "hypodense fluid-like" in body["messages"][0]["content"]  # the vocabulary is in the prompt
    # the CLI path, key from the environment
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    assert main(["report", "parse", text, "--llm", fake_llm]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["attributes"]["shape"]["value"] == "oval"
    assert _FakeChat.requests[-1][1]["Authorization"] == "Bearer env-key"


def test_llm_value_outside_vocabulary_or_bad_json_is_an_error(fake_llm):
    _FakeChat.answer = json.dumps({"density": "glowing"})
    with pytest.raises(ReportError, match="density='glowing'.*outside the report vocabulary"):
        parse_with_llm("a lesion", fake_llm)
    _FakeChat.answer = "I think it is a cyst."
    with pytest.raises(ReportError, match="not one JSON object"):
        parse_with_llm("a lesion", fake_llm)
    with pytest.raises(ReportError, match="answered HTTP 404"):
        parse_with_llm("a lesion", fake_llm.replace("/v1", "/nothing/here/x") + "/bad")


_ADRENAL = """\
name: adrenal_nodule
label_name: adrenal_nodule
organ_type: parenchymal organ
organs:
  adrenal gland: {weight: 1.0, v2: [adrenal_gland_left, adrenal_gland_right], synonyms: [adrenal, adrenals]}
attributes:
  shape: {round-like: 0.6, oval: 0.4}
  lesion_location: {within the parenchymal organ: 1.0}
  relationship: {no close relationship with surrounding organs: 1.0}
  surface: {well-defined margin: 1.0}
  specific_features: {none: 1.0}
  enhancement: {non-contrast CT: 1.0}
  density: {hypodense: 1.0}
  density_variations: {homogeneous: 1.0}
size_mm: {distribution: uniform, min: 5, max: 60}
hu:
  non-contrast CT: {hypodense: [-20, 10]}
"""


def test_organs_declared_by_catalogs_on_the_path_are_read(tmp_path, monkeypatch):
    """"Left adrenal nodule" names the organ of a catalog on the catalog path, and that catalog's type."""
    assert parse_text("Left adrenal nodule, 18 mm.").values["organ"] == UNSPECIFIED  # no adrenal catalog yet
    (tmp_path / "adrenal_nodule.yaml").write_text(_ADRENAL)
    monkeypatch.setenv("LESIONDIFFUSION_CATALOG_PATH", str(tmp_path))
    r = parse_text("Left adrenal nodule, 18 mm, hypodense.")
    assert r.values["organ"] == "adrenal gland" and r.sources["organ"] == "adrenal"
    assert r.lesion_type == "adrenal_nodule" and r.values["shape"] == UNSPECIFIED  # "nodule" is not a shape
    report = r.to_report(load_catalog(r.lesion_type), seed=0)
    assert report.organ == "adrenal gland" and report.size_mm == (18.0, 18.0, 18.0)


@pytest.mark.parametrize("text, expect", [
    ("Spiculated 2.3 cm mass in the right upper lobe.",
     {"organ": "right lung", "specific_features": "spiculated margins"}),
    ("Solid nodule in the left lower lobe, 9 mm.", {"organ": "left lung", "density": "isodense soft-tissue mass"}),
    ("Well-defined intraparenchymal lesion of the right kidney, 3 cm.",
     {"lesion_location": "within the parenchymal organ", "organ": "right kidney", "surface": "well-defined margin"}),
    ("Hypodense mass of the pancreatic head with invasion of the duodenum.",
     {"relationship": "invasion of adjacent organs", "organ": "pancreas", "density": "hypodense"}),
    ("Pancreatic body mass with encasement of the superior mesenteric artery.",
     {"relationship": "invasion of adjacent organs", "organ": "pancreas"}),
    ("Polypoid tumour arising from the posterior wall of the bladder.",
     {"lesion_location": "wall thickening", "shape": "protrusion into the lumen", "organ": "urinary bladder"}),
    ("Simple cyst in the liver, 4 cm, water density.",
     {"shape": "cystic", "organ": "liver", "density": "hypodense fluid-like"}),
    ("12 mm nodule in the left lung.", {"organ": "left lung"}),
    ("Nodular hyperdense focus in the right kidney.",
     {"shape": "nodular", "organ": "right kidney", "density": "hyperdense"}),
    ("Liver lesion, no invasion of the diaphragm.", {"organ": "liver"}),
])
def test_phrasings_of_issue_18(text, expect):
    """The wordings `report parse` missed: lobes, intraparenchymal, named invasion, encasement, arising from
    the wall, cyst; and the noun "nodule" leaves the shape unspecified."""
    r = parse_text(text)
    got = {a: v for a, v in r.specified.items() if a not in ("size",)}
    assert got == expect
