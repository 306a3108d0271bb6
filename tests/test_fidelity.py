"""Fidelity to the method: docs/fidelity.md's machine-readable block against the presets in the code, the
attribute split (and old bundles keeping theirs), the pretraining recipe per preset, BiomedCLIP by
default for paper-sized bundles with no silent fallback."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml

from lesiondiffusion import presets
from lesiondiffusion.bundle import (
    CONFIG_FILE,
    LEGACY_CONDITIONING,
    PRESETS,
    Bundle,
    load_encoder,
    preset_config,
    preset_encoder,
    preset_training,
)
from lesiondiffusion.cli import build_parser
from lesiondiffusion.errors import BundleError, TextEncodingError
from lesiondiffusion.report import ATTRIBUTES, IMAGE_ATTRIBUTES, MASK_ATTRIBUTES

DOC = Path(__file__).resolve().parents[1] / "docs" / "fidelity.md"


def _block() -> dict:
    text = DOC.read_text(encoding="utf-8")
    m = re.search(r"```yaml fidelity\n(.*?)```", text, re.S)
    assert m, "docs/fidelity.md lost its ```yaml fidelity block"
    return yaml.safe_load(m.group(1))


def _pretrain_default(net: str, option: str):
    args = build_parser().parse_args(["pretrain", net, "--data", "d", "-o", "r"])
    return getattr(args, option)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)))
    return a == b


@pytest.mark.parametrize("preset", presets.NAMES)
def test_fidelity_block_is_the_preset_table(preset):
    """docs/fidelity.md's block lists every value of the table, with its value and its source."""
    block = _block()[preset]
    assert set(block) <= set(presets.SOURCES), f"docs/fidelity.md: sources must be {presets.SOURCES}, got {set(block)}"
    doc = {k: (v, src) for src, values in block.items() for k, v in values.items()}
    code = presets.TABLE[preset]
    assert sorted(doc) == sorted(code), (f"docs/fidelity.md lacks {sorted(set(code) - set(doc))}, "
                                         f"has extra {sorted(set(doc) - set(code))}")
    wrong = {k: (doc[k], code[k]) for k in code if not (_same(doc[k][0], code[k][0]) and doc[k][1] == code[k][1])}
    assert wrong == {}, f"docs/fidelity.md (value, source) vs presets.TABLE: {wrong}"


@pytest.mark.parametrize("preset", presets.NAMES)
def test_the_code_reads_the_preset_table(preset):
    """bundle.PRESETS, the networks' presets and the resolved bundle config are the table's values."""
    from lesiondiffusion.models import linet, lmnet, vqgan

    assert PRESETS[preset] == {"hu_window": presets.value(preset, "hu_window"),
                               "spacing_mm": presets.value(preset, "spacing_mm"),
                               "crop": presets.section(preset, "crop"), "schedule": presets.section(preset, "schedule"),
                               "encoder": presets.value(preset, "encoder"), "training": presets.section(preset, "training")}
    assert vqgan.PRESETS[preset] == presets.section(preset, "vqgan")
    assert vqgan.DISCRIMINATOR_PRESETS[preset] == presets.section(preset, "discriminator")
    assert lmnet.PRESETS[preset] == presets.section(preset, "lmnet")
    assert linet.PRESETS[preset] == presets.section(preset, "linet")
    cfg = preset_config(preset, "id", preset_encoder(preset), 512).to_dict()
    for section in ("crop", "schedule", "vqgan", "lmnet", "linet"):
        for k, v in presets.section(preset, section).items():
            assert _same(cfg[section][k], v), f"{preset} bundle config {section}.{k}: {cfg[section][k]} != table {v}"
    assert preset_training(preset) == presets.section(preset, "training")


def test_dataclass_and_option_defaults_read_the_table():
    """Defaults elsewhere are the table's: ScheduleConfig the paper preset's (the method), the pretraining
    dataclasses the tiny preset's (`pretrain` defaults to --preset tiny), options shared by both presets."""
    import dataclasses

    from monai.networks.nets import VQVAE

    from lesiondiffusion.pretrain.engine import TrainConfig
    from lesiondiffusion.pretrain.losses import VQGANLossConfig
    from lesiondiffusion.sampling import ScheduleConfig

    assert dataclasses.asdict(ScheduleConfig()) == presets.section("paper", "schedule")
    tiny = presets.section("tiny", "training")
    loss, train = VQGANLossConfig(), TrainConfig()
    assert (loss.adv_weight, loss.adv_warmup_steps, loss.adv_criterion) == \
        (tiny["adv_weight"], tiny["adv_warmup_steps"], tiny["adv_criterion"])
    assert (train.batch_size, train.lr, train.weight_decay, list(train.betas), train.warmup_steps, train.grad_clip) == \
        (tiny["batch_size"], tiny["lr"], tiny["weight_decay"], tiny["betas"], tiny["warmup_steps"], tiny["grad_clip"])
    # MONAI's VQVAE quantiser applies the commitment weight the table records
    assert inspect.signature(VQVAE).parameters["commitment_cost"].default == tiny["commitment_cost"]
    options = {"gamma": ("lmnet", "gamma"), "p_token": ("linet", "p_token"), "p_all": ("linet", "p_all"),
               "adv_warmup_steps": ("vqgan", "adv_warmup"), "warmup_steps": ("vqgan", "warmup_steps"),
               "grad_clip": ("vqgan", "grad_clip")}
    for key, (net, option) in options.items():
        # one option default serves both presets: the table must agree with itself
        assert presets.value("paper", f"training.{key}") == presets.value("tiny", f"training.{key}"), key
        assert _pretrain_default(net, option) == presets.value("paper", f"training.{key}"), key


def test_fidelity_table_matches_the_method_settings():
    method = _block()["method"]
    assert list(MASK_ATTRIBUTES) == method["conditioning.lmnet"]
    assert list(IMAGE_ATTRIBUTES) == method["conditioning.linet"]


def test_every_table_row_names_existing_code():
    """The 'where' column must point at files and symbols that exist."""
    root = DOC.parents[1]
    rows = [line for line in DOC.read_text(encoding="utf-8").splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 30
    for row in rows:
        where = row.rstrip(" |").rsplit("|", 1)[-1]
        for file, symbols in re.findall(r"`([\w/]+\.py): ([^`]+)`", where):
            path = next((p for p in (root / "src" / "lesiondiffusion" / file, root / file) if p.is_file()), None)
            assert path is not None, f"{file} named in docs/fidelity.md does not exist"
            source = path.read_text(encoding="utf-8")
            for symbol in re.findall(r"[A-Za-z_][A-Za-z_0-9]*", symbols.split("[")[0]):
                assert symbol in source, f"{symbol} not found in {file} (docs/fidelity.md row {row[:40]})"


def _rows() -> dict[str, list[str]]:
    """Design point -> the table's cells (#, design point, paper says, this project does, source, why, where)."""
    out = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if re.match(r"\| \d+ \|", line):
            # a cell separator has a space on both sides (|B'| inside a formula has not)
            cells = [c.strip() for c in re.split(r"(?<= )\|(?= )", line.strip()[1:-1])]
            assert len(cells) == 7, f"docs/fidelity.md row has {len(cells)} cells, not 7: {line[:60]}"
            out[cells[1]] = cells
    return out


# a place in the paper: a section, an equation, a figure or a table
PLACE = re.compile(r"§\s?(\d(\.\d)?)|Eq\. (\d)|Fig\. (\d)|Tab\. (\d)")
PAPER = Path(__file__).resolve().parents[2] / "shared" / "paper" / "LesionDiffusion_MICCAI2025.txt"


def test_every_paper_cell_names_its_place_or_says_not_stated():
    for point, cells in _rows().items():
        said = cells[2]
        assert PLACE.search(said) or said == "not stated", (
            f"docs/fidelity.md row {point!r}: 'paper says' must name the place (§2.1, Eq. 2, Fig. 1, Tab. 1) or be "
            f"exactly 'not stated'; got {said!r}")


# values the paper's text states: its words, and what the row must say (never "not stated" on its own)
STATED = {
    "diffusion steps, schedule": ("cosine noise schedule with 1000 timesteps", ("cosine", "1000", "§3 Impl.")),
    "learning-rate schedule": ("static learning rate", ("static", "§3 Impl.")),
    "latent space": ("codebook of 2048 entries", ("2048", "2×", "§3 Impl.")),
    "learning rate, weight decay": ("weight decay of 1", ("1×10⁻⁴", "1×10⁻⁵")),
    "sampler": ("DDIM denoising [17] of 200 timesteps", ("200",)),
    "guidance": ("guidance scale of 2.5", ("2.5",)),
    "LMNet loss": ("γ is set to 0.001", ("γ = 0.001", "Eq. 2")),
    "where reports come from": ("queries a large language model (LLM) to generate the report", ("generate", "§2.3")),
    "VQ-GAN loss": ("codebook loss [3]", ("Eq. 3",)),
    "adversarial weight, warm-up": ("log(1 - \\mathcal{D}_{disc}", ("Eq. 3",)),
}


def test_values_the_paper_states_are_given_with_their_place():
    rows = _rows()
    for point, (_, must) in STATED.items():
        said = rows[point][2]
        missing = [m for m in must if m not in said]
        assert not missing and "not stated" != said, f"docs/fidelity.md row {point!r} lacks {missing}: {said!r}"
    # what the paper's text does not say is not put in its mouth
    assert "channels not stated" in rows["latent space"][2]
    assert "formula not stated" in rows["sphericity"][2]
    for point, cells in rows.items():
        if cells[4].startswith("paper") and "not stated" in cells[2] and "+" not in cells[4]:
            raise AssertionError(f"row {point!r}: source 'paper' for a value the paper does not state")


@pytest.mark.skipif(not PAPER.is_file(), reason="the paper's text is not beside the checkout (../shared/paper/)")
def test_the_places_and_quotes_exist_in_the_paper():
    paper = PAPER.read_text(encoding="utf-8")
    flat = " ".join(paper.split())
    for point, (quote, _) in STATED.items():
        assert " ".join(quote.split()) in flat, f"row {point!r}: the paper's text does not contain {quote!r}"
    for point, cells in _rows().items():
        for m in PLACE.finditer(cells[2]):
            sec, _, eq, fig, tab = m.groups()
            if sec:
                assert re.search(rf"^{re.escape(sec)}\s", paper, re.M) or sec == "1" and "1 Introduction" in paper \
                    or sec == "3" and "3 Experiment" in paper, f"row {point!r}: no section {sec} in the paper"
            if eq:
                assert f"\\tag{{{eq}}}" in paper or f"({eq})" in paper, f"row {point!r}: no equation {eq} in the paper"
            if fig:
                assert f"Fig. {fig}." in paper, f"row {point!r}: no figure {fig} in the paper"
            if tab:
                assert f"Table {tab}." in paper, f"row {point!r}: no table {tab} in the paper"


def test_every_deviation_the_code_has_is_listed():
    """The deviations the project knows of each have a row marked deviation."""
    rows = _rows()
    for point in ("VQ-GAN loss", "adversarial weight, warm-up", "LINet's latent space at sampling", "LMNet output to a mask",
                  "placement", "lesions larger than the crop", "setting (2): synthetic, then real", "gradient clipping",
                  "attribute split of the shipped demo bundle", "convexity"):
        assert "deviation" in rows[point][4], f"docs/fidelity.md row {point!r} is not marked as a deviation"


def test_attribute_split_is_the_methods_and_old_bundles_keep_theirs(tmp_path):
    assert set(MASK_ATTRIBUTES) | set(IMAGE_ATTRIBUTES) == set(ATTRIBUTES)
    assert not set(MASK_ATTRIBUTES) & set(IMAGE_ATTRIBUTES)
    b = Bundle.init("tiny", "hashing:16", seed=0, phrases=[])
    assert b.config.attributes("lmnet") == MASK_ATTRIBUTES and b.config.attributes("linet") == IMAGE_ATTRIBUTES
    b.save(tmp_path / "new")
    assert Bundle.read_config(tmp_path / "new").conditioning == b.config.conditioning
    # a bundle written before the split (no `conditioning` key) keeps the 8/8 phrases it was trained on
    cfg = yaml.safe_load((tmp_path / "new" / CONFIG_FILE).read_text())
    del cfg["conditioning"]
    (tmp_path / "new" / CONFIG_FILE).write_text(yaml.safe_dump(cfg))
    old = Bundle.read_config(tmp_path / "new")
    assert old.conditioning == LEGACY_CONDITIONING and len(old.attributes("lmnet")) == 8
    cfg["conditioning"] = {"lmnet": ["shape", "colour"], "linet": ["density"]}
    (tmp_path / "new" / CONFIG_FILE).write_text(yaml.safe_dump(cfg))
    with pytest.raises(BundleError, match="conditioning.lmnet.*colour"):
        Bundle.read_config(tmp_path / "new")


def test_pretrain_options_follow_the_preset_recipe():
    from lesiondiffusion.commands.pretrain import pretrain_options

    parse = build_parser().parse_args
    paper = pretrain_options(parse(["pretrain", "vqgan", "--data", "d", "-o", "r", "--preset", "paper"]))
    assert paper.train.batch_size == 1 and paper.train.betas == (0.99, 0.999)
    assert paper.extra["adv_criterion"] == "bce" and paper.encoder is None  # None: the preset's (BiomedCLIP)
    tiny = pretrain_options(parse(["pretrain", "vqgan", "--data", "d", "-o", "r"]))
    assert tiny.train.batch_size == 2 and tiny.train.betas == (0.9, 0.999) and tiny.extra["adv_criterion"] == "least_squares"
    given = pretrain_options(parse(["pretrain", "lmnet", "--data", "d", "-o", "r", "--preset", "paper",
                                    "--batch-size", "4", "--betas", "0.9", "0.99", "--encoder", "hashing"]))
    assert given.train.batch_size == 4 and given.train.betas == (0.9, 0.99) and given.encoder == "hashing"


def test_vqgan_loss_uses_the_log_gan_criterion_for_paper():
    import torch

    from lesiondiffusion.pretrain.losses import VQGANLoss, VQGANLossConfig

    logits = torch.zeros(1, 1, 4, 4, 4)
    bce = VQGANLoss(VQGANLossConfig(adv_criterion=preset_training("paper")["adv_criterion"]))
    lsq = VQGANLoss(VQGANLossConfig(adv_criterion=preset_training("tiny")["adv_criterion"]))
    # at logit 0: -log(sigmoid(0)) = log 2 for the log-GAN loss, (0 - 1)^2 = 1 for least squares
    assert float(bce.adv(logits, target_is_real=True, for_discriminator=False)) == pytest.approx(0.6931, abs=1e-3)
    assert float(lsq.adv(logits, target_is_real=True, for_discriminator=False)) == pytest.approx(1.0)


def test_paper_preset_uses_biomedclip_and_never_falls_back(monkeypatch):
    assert preset_encoder("paper") == "biomedclip" and PRESETS["paper"]["encoder"] == "biomedclip"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: the hub is unreachable either way
    with pytest.raises(TextEncodingError) as err:
        load_encoder("paper")
    message = str(err.value)
    assert "local-dir:" in message and "--encoder hashing" in message and "[biomedclip]" in message


def test_paper_preset_loads_a_local_open_clip_folder(tmp_path):
    """The paper preset's loading path with `--encoder local-dir:` on a tiny open_clip model built here."""
    import json

    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path / "tiny_biomedclip"
    folder.mkdir()
    cfg = {"model_cfg": {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
           "lesiondiffusion_id": "open_clip:hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    model = open_clip.create_model(f"local-dir:{folder}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    enc = load_encoder("paper", f"local-dir:{folder}")
    assert enc.id == cfg["lesiondiffusion_id"] and enc.dim == 24
    assert tuple(enc.encode(["density: hypodense"]).shape) == (1, 24)
