"""Model bundle: one folder with config.yaml, the three networks' weights (safetensors) and the text
embedding cache. ``Bundle.init`` builds a randomly initialised bundle from a preset; ``Bundle.load``
checks the version and every tensor shape and explains any mismatch (file, key, expected, found, fix).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from . import presets
from .errors import BundleError
from .io import atomic_path, read_text_input, write_yaml
from .models import linet as linet_mod
from .models import lmnet as lmnet_mod
from .models import vqgan as vqgan_mod
from .catalog import list_catalogs, load_catalog
from .report import (ATTRIBUTES, IMAGE_ATTRIBUTES, LEGACY_IMAGE_ATTRIBUTES, LEGACY_MASK_ATTRIBUTES, MASK_ATTRIBUTES,
                     vocabulary_phrases)
from .safeyaml import load_yaml
from .sampling import ScheduleConfig
from .errors import TextEncodingError
from .text import BIOMEDCLIP_HUB_ID, EmbeddingCache, TextEncoder, make_encoder

log = logging.getLogger(__name__)

BUNDLE_VERSION = 1
# the method's attribute split (mask attributes -> LMNet, image attributes -> LINet) and the one that
# bundles without a `conditioning` key in config.yaml were trained with
METHOD_CONDITIONING: dict[str, tuple[str, ...]] = {"lmnet": MASK_ATTRIBUTES, "linet": IMAGE_ATTRIBUTES}
LEGACY_CONDITIONING: dict[str, tuple[str, ...]] = {"lmnet": LEGACY_MASK_ATTRIBUTES, "linet": LEGACY_IMAGE_ATTRIBUTES}
NETWORKS = ("vqgan", "lmnet", "linet")
CONFIG_FILE = "config.yaml"
EMBEDDINGS_DIR = "text_embeddings"


@dataclass
class CropConfig:
    """Crop geometry at the bundle spacing (voxels); crops grow past these sizes for big lesions."""

    lmnet_size: tuple[int, int, int]  # LMNet's crop around the box (minimum)
    linet_size: tuple[int, int, int]  # LINet's image crop (minimum), its latent is half this
    mask_margin_mm: float  # free space around the box inside LMNet's crop
    context_margin_mm: float  # extra anatomy around LMNet's crop inside LINet's crop


# The presets as the bundle and `lesiondiffusion pretrain` read them: the bundle geometry and schedule, the
# default text encoder and the pretraining recipe (``training``; not stored in config.yaml). Every value
# lives in ``presets.TABLE`` with its source (paper / project / deviation); docs/fidelity.md tables them
# and tests/test_fidelity.py checks the two against each other. `paper` is the method's recipe wherever
# the paper states a value; `tiny` runs on a 2-core CPU in seconds (tests, smoke runs, demo).
PRESETS: dict[str, dict[str, Any]] = {
    name: {
        "hu_window": presets.value(name, "hu_window"),
        "spacing_mm": presets.value(name, "spacing_mm"),
        "crop": presets.section(name, "crop"),
        "schedule": presets.section(name, "schedule"),
        "encoder": presets.value(name, "encoder"),
        "training": presets.section(name, "training"),
    }
    for name in presets.NAMES
}


def preset_encoder(preset: str) -> str:
    """The default text encoder spec of a preset (``bundle init``/``pretrain`` without ``--encoder``)."""
    if preset not in PRESETS:
        raise BundleError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    return str(PRESETS[preset]["encoder"])


def load_encoder(preset: str, spec: str | None = None, device: str = "cpu") -> TextEncoder:
    """The text encoder for a bundle of ``preset``: ``spec``, or the preset's default when None.

    BiomedCLIP (the ``paper`` default) that cannot be loaded stops here with both fixes named; there is
    no silent fallback to the hashing encoder.
    """
    spec = spec or preset_encoder(preset)
    try:
        return make_encoder(spec, device)
    except TextEncodingError as exc:
        if spec.strip() not in ("biomedclip", BIOMEDCLIP_HUB_ID):
            raise
        raise TextEncodingError(
            f"preset {preset!r} embeds report phrases with BiomedCLIP ({BIOMEDCLIP_HUB_ID}), the method's text "
            f"encoder, and it cannot be loaded here ({exc}). Fix one of: (1) use a local copy of the model: "
            "pip install 'lesiondiffusion-nnunet[biomedclip]' and pass --encoder local-dir:/path/to/biomedclip "
            "(a folder with open_clip_config.json, the weights and the tokenizer files; docs/bundle.md, "
            "'BiomedCLIP offline'); or (2) choose the offline hashing encoder explicitly with --encoder hashing "
            "(not a language model: a departure from the method, recorded in the bundle's config.yaml)."
        ) from exc


def preset_training(preset: str) -> dict[str, Any]:
    """The pretraining recipe of a preset (batch per process, AdamW lr/weight decay/betas, GAN criterion)."""
    if preset not in PRESETS:
        raise BundleError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    return copy.deepcopy(PRESETS[preset]["training"])


@dataclass
class BundleConfig:
    """Everything config.yaml holds; network sections are MONAI constructor kwargs."""

    preset: str
    hu_window: tuple[float, float]
    spacing_mm: tuple[float, float, float]
    crop: CropConfig
    encoder: dict[str, Any]  # {"id": ..., "spec": ..., "dim": ...}
    schedule: ScheduleConfig
    vqgan: dict[str, Any]
    lmnet: dict[str, Any]
    linet: dict[str, Any]
    version: int = BUNDLE_VERSION
    notes: dict[str, Any] = field(default_factory=dict)
    # LINet's latent standardisation (models.vqgan.LatentNorm); None = identity (untrained LINet)
    latent_norm: vqgan_mod.LatentNorm | None = None
    # report attributes each network is conditioned on, one phrase per attribute in this order
    # (`conditioning` in config.yaml; bundles without it used the legacy 8/8 split, see vocabulary.py)
    conditioning: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(METHOD_CONDITIONING))

    def attributes(self, net: str) -> tuple[str, ...]:
        """The report attributes ``net`` ("lmnet" or "linet") was trained on."""
        return tuple(self.conditioning[net])

    @property
    def latent_channels(self) -> int:
        return int(self.vqgan["embedding_dim"])

    @property
    def vq_factor(self) -> int:
        return vqgan_mod.downsample_factor(self.vqgan)

    @property
    def text_dim(self) -> int:
        return int(self.encoder["dim"])

    @property
    def latents(self) -> vqgan_mod.LatentNorm:
        """The VQ latent -> LINet space mapping (identity until LINet training fits one)."""
        return self.latent_norm or vqgan_mod.LatentNorm.identity(self.latent_channels)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "preset": self.preset,
            "hu_window": [float(v) for v in self.hu_window],
            "spacing_mm": [float(v) for v in self.spacing_mm],
            "crop": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.crop).items()},
            "encoder": dict(self.encoder),
            "schedule": self.schedule.to_dict(),
            "vqgan": copy.deepcopy(self.vqgan),
            "lmnet": copy.deepcopy(self.lmnet),
            "linet": copy.deepcopy(self.linet),
            "latent_norm": self.latents.to_dict(),
            "conditioning": {k: list(v) for k, v in self.conditioning.items()},
            "notes": dict(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "BundleConfig":
        if not isinstance(data, dict):
            raise BundleError(f"{source} must be a YAML mapping, found {type(data).__name__}. Recreate it with `lesiondiffusion bundle init`.")
        if "version" not in data:
            raise BundleError(f"{source} has no 'version' key; it is not a lesiondiffusion bundle config (expected version {BUNDLE_VERSION}).")
        version = data["version"]
        if version != BUNDLE_VERSION:
            newer = isinstance(version, int) and version > BUNDLE_VERSION
            fix = "upgrade lesiondiffusion-nnunet" if newer else "re-create the bundle with this version (`lesiondiffusion bundle init`) and retrain"
            raise BundleError(f"{source}: bundle version {version!r} is not supported (this package reads version {BUNDLE_VERSION}); {fix}.")
        required = ("preset", "hu_window", "spacing_mm", "crop", "encoder", "schedule", "vqgan", "lmnet", "linet")
        missing = [k for k in required if k not in data]
        if missing:
            raise BundleError(f"{source} is missing key(s) {missing}; compare with a fresh `lesiondiffusion bundle init` config.")
        bad = _non_finite(data)
        if bad:
            raise BundleError(
                f"{source}: {', '.join(f'{k}={v}' for k, v in bad)} is not a finite number; NaN or infinity there "
                "would turn every synthesis into NaN. Restore the value from a fresh `lesiondiffusion bundle init` "
                "config or the config the weights were trained with.")
        optional = {"version", "notes", "latent_norm", "conditioning"}
        unknown = sorted(set(data) - set(required) - optional)
        if unknown:
            raise BundleError(f"{source} has unknown key(s) {unknown}; allowed: {sorted(set(required) | optional)}.")
        try:
            crop_fields = {f.name for f in fields(CropConfig)}
            if set(data["crop"]) != crop_fields:
                raise BundleError(f"{source}: 'crop' needs exactly the keys {sorted(crop_fields)}, found {sorted(data['crop'])}.")
            crop = CropConfig(**{k: (tuple(int(x) for x in v) if k.endswith("_size") else float(v)) for k, v in data["crop"].items()})
            hu = tuple(float(v) for v in data["hu_window"])
            spacing = tuple(float(v) for v in data["spacing_mm"])
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{source}: bad value in hu_window/spacing_mm/crop ({exc}); they are numbers/lists of numbers.") from exc
        if len(hu) != 2 or hu[0] >= hu[1]:
            raise BundleError(f"{source}: hu_window={list(hu)} must be [low, high] with low < high, e.g. [-1000, 1000].")
        if len(spacing) != 3 or min(spacing) <= 0:
            raise BundleError(f"{source}: spacing_mm={list(spacing)} must be three positive numbers (mm).")
        enc = data["encoder"]
        if not isinstance(enc, dict) or not {"id", "dim"} <= set(enc):
            raise BundleError(f"{source}: 'encoder' must be a mapping with keys id, dim (and spec), found {enc!r}.")
        cfg = cls(
            preset=str(data["preset"]),
            hu_window=hu,  # type: ignore[arg-type]
            spacing_mm=spacing,  # type: ignore[arg-type]
            crop=crop,
            encoder=dict(enc),
            schedule=ScheduleConfig.from_dict(dict(data["schedule"] or {}), source),
            vqgan=dict(data["vqgan"]),
            lmnet=dict(data["lmnet"]),
            linet=dict(data["linet"]),
            version=int(version),
            notes=dict(data.get("notes") or {}),
        )
        cfg.conditioning = _read_conditioning(data.get("conditioning"), source)
        cfg.check(source)
        if data.get("latent_norm") is not None:  # absent in bundles written before it existed: identity
            norm = vqgan_mod.LatentNorm.from_dict(data["latent_norm"], cfg.latent_channels, source)
            cfg.latent_norm = None if norm.is_identity else norm
        return cfg

    def check(self, source: str) -> None:
        """Cross-section consistency: channel counts and text width must agree."""
        c, d = self.latent_channels, self.text_dim
        expect = {
            ("lmnet", "in_channels"): len(lmnet_mod.LMNET_CHANNELS),
            ("lmnet", "out_channels"): 1,
            ("lmnet", "cross_attention_dim"): d,
            ("linet", "in_channels"): c + 1,
            ("linet", "out_channels"): c,
            ("linet", "cross_attention_dim"): d,
        }
        for (section, key), value in expect.items():
            found = getattr(self, section).get(key)
            if found != value:
                raise BundleError(
                    f"{source}: {section}.{key} = {found!r} but it must be {value} (vqgan.embedding_dim={c}, "
                    f"encoder.dim={d}). Edit config.yaml or re-create the bundle from a preset."
                )


def _read_conditioning(raw: Any, source: str) -> dict[str, tuple[str, ...]]:
    if raw is None:  # written before the method's split: both networks saw the legacy 8 attributes
        return dict(LEGACY_CONDITIONING)
    if not isinstance(raw, dict) or set(raw) != {"lmnet", "linet"}:
        raise BundleError(f"{source}: 'conditioning' must map lmnet and linet to lists of report attributes, "
                          f"found {raw!r}. Compare with a fresh `lesiondiffusion bundle init` config.")
    out = {}
    for net, attrs in raw.items():
        bad = [a for a in (attrs or []) if a not in ATTRIBUTES]
        if not attrs or bad or len(set(attrs)) != len(attrs):
            raise BundleError(f"{source}: conditioning.{net} = {attrs!r} must list distinct report attributes "
                              f"({', '.join(ATTRIBUTES)}); unknown: {bad}.")
        out[net] = tuple(str(a) for a in attrs)
    return out


def _non_finite(obj: Any, key: str = "") -> list[tuple[str, Any]]:
    """Dotted keys of every NaN/inf number in a parsed YAML document (YAML writes them .nan / .inf)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return [(key, obj)]
    if isinstance(obj, dict):
        return [hit for k, v in obj.items() for hit in _non_finite(v, f"{key}.{k}" if key else str(k))]
    if isinstance(obj, (list, tuple)):
        return [hit for i, v in enumerate(obj) for hit in _non_finite(v, f"{key}[{i}]")]
    return []


def preset_config(preset: str, encoder_id: str, encoder_spec: str, dim: int) -> BundleConfig:
    if preset not in PRESETS:
        raise BundleError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    p = PRESETS[preset]
    vq = vqgan_mod.preset(preset)
    return BundleConfig(
        preset=preset,
        hu_window=tuple(p["hu_window"]),  # type: ignore[arg-type]
        spacing_mm=tuple(p["spacing_mm"]),  # type: ignore[arg-type]
        crop=CropConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in p["crop"].items()}),
        encoder={"id": encoder_id, "spec": encoder_spec, "dim": int(dim)},
        schedule=ScheduleConfig.from_dict(p["schedule"], f"preset {preset}"),
        vqgan=vq,
        lmnet=lmnet_mod.preset(preset, dim),
        linet=linet_mod.preset(preset, int(vq["embedding_dim"]), dim),
    )


def default_phrases() -> list[str]:
    """Every phrase the report vocabulary and the shipped catalogs can emit (the cache's contents)."""
    phrases = set(vocabulary_phrases())
    for name in list_catalogs():
        phrases.update(load_catalog(name).phrases())
    return sorted(phrases)


def _state_for_save(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


class Bundle:
    """Networks + config + embedding cache. Networks are in eval mode on ``device`` after load."""

    def __init__(
        self,
        config: BundleConfig,
        vqgan: torch.nn.Module,
        lmnet: torch.nn.Module,
        linet: torch.nn.Module,
        cache: EmbeddingCache,
        path: Path | None = None,
    ) -> None:
        self.config = config
        self.vqgan = vqgan
        self.lmnet = lmnet
        self.linet = linet
        self.cache = cache
        self.path = path

    # ---- construction ------------------------------------------------------------------------
    @staticmethod
    def build_networks(config: BundleConfig) -> dict[str, torch.nn.Module]:
        try:
            return {
                "vqgan": vqgan_mod.build_vqgan(config.vqgan),
                "lmnet": lmnet_mod.build_lmnet(config.lmnet),
                "linet": linet_mod.build_linet(config.linet),
            }
        except (TypeError, ValueError) as exc:
            raise BundleError(
                f"config.yaml network settings are invalid for MONAI ({type(exc).__name__}: {exc}). "
                "Compare the vqgan/lmnet/linet sections with a fresh `lesiondiffusion bundle init` config."
            ) from exc

    @classmethod
    def init(
        cls,
        preset: str = "tiny",
        encoder: str | TextEncoder | None = None,
        seed: int = 0,
        phrases: Iterable[str] | None = None,
        for_training: bool = False,
    ) -> "Bundle":
        """A randomly initialised bundle (seeded) whose cache holds ``phrases`` (default: all of them).

        ``for_training``: give the attention output projections of LMNet/LINet small random weights
        instead of MONAI's zeros (``models.lmnet.init_attention_outputs``), so training learns the text
        path from the first step; the pretraining commands create their bundles this way.
        ``encoder`` defaults to the preset's (``preset_encoder``: BiomedCLIP for ``paper``); one that cannot
        be loaded is an error, never a silent fallback to another encoder.
        """
        enc = load_encoder(preset, encoder) if encoder is None or isinstance(encoder, str) else encoder
        spec = (encoder or preset_encoder(preset)) if not isinstance(encoder, TextEncoder) else enc.id
        config = preset_config(preset, enc.id, spec, enc.dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            nets = cls.build_networks(config)
            if for_training:  # open the text (cross-attention) path from step 0; see init_attention_outputs
                lmnet_mod.init_attention_outputs(nets["lmnet"])
                lmnet_mod.init_attention_outputs(nets["linet"])
        config.notes = {"initialisation": f"random (seed {seed}); train with `lesiondiffusion pretrain`"}
        cache = EmbeddingCache(enc.id, enc.dim, encoder=enc)
        cache.add(default_phrases() if phrases is None else phrases)
        bundle = cls(config, nets["vqgan"], nets["lmnet"], nets["linet"], cache)
        bundle.eval()
        return bundle

    def eval(self) -> "Bundle":
        for net in self.networks().values():
            net.eval()
        return self

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"vqgan": self.vqgan, "lmnet": self.lmnet, "linet": self.linet}

    def to(self, device: str | torch.device) -> "Bundle":
        for net in self.networks().values():
            net.to(device)
        return self

    def attach_encoder(self, spec: str | TextEncoder | None = None) -> None:
        """Load a text encoder so phrases outside the cache can be embedded (checked against the id)."""
        if spec is None or isinstance(spec, str):
            enc: TextEncoder = make_encoder(spec or str(self.config.encoder.get("spec") or self.cache.encoder_id))
        else:
            enc = spec
        if enc.id != self.cache.encoder_id:
            raise BundleError(
                f"encoder {enc.id!r} differs from the bundle's {self.cache.encoder_id!r}; the networks were "
                "trained on the bundle encoder's vectors. Use that encoder (config.yaml encoder.spec)."
            )
        self.cache.encoder = enc

    def context(self, phrase_lists: list[list[str]]) -> torch.Tensor:
        return self.cache.context(phrase_lists)

    # ---- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path, parts: Iterable[str] = NETWORKS + ("text_embeddings",)) -> None:
        """Write the bundle; every file atomically (a crash leaves old or new files, never halves)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        parts = set(parts)
        for name, net in self.networks().items():
            if name in parts:
                target = path / name / "model.safetensors"
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(target) as tmp:
                    save_file(_state_for_save(net), str(tmp), metadata={"network": name, "bundle_version": str(BUNDLE_VERSION)})
        if "text_embeddings" in parts:
            self.cache.save(path / EMBEDDINGS_DIR)
        # config last: a bundle whose config exists has all its files
        write_yaml(path / CONFIG_FILE, self.config.to_dict())
        self.path = path

    @classmethod
    def read_config(cls, path: str | Path) -> BundleConfig:
        path = Path(path)
        cfg_path = path / CONFIG_FILE
        if not path.is_dir():
            raise BundleError(f"bundle folder {path} does not exist; create one with `lesiondiffusion bundle init --preset tiny -o {path}`.")
        if not cfg_path.is_file():
            raise BundleError(f"{cfg_path} is missing; {path} is not a complete bundle. Re-create it with `lesiondiffusion bundle init`.")
        try:
            # bounded like every other YAML input: bundles are shared, and a 1 KB alias bomb here hung
            # `bundle info` (the non-finite check walks every value) and a recursive alias ended in a traceback
            data = load_yaml(read_text_input(cfg_path, "bundle config", BundleError), cfg_path, BundleError)
        except yaml.YAMLError as exc:
            raise BundleError(f"{cfg_path} is not valid YAML ({exc}); fix the syntax or re-create the bundle.") from exc
        return BundleConfig.from_dict(data, str(cfg_path))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", encoder: str | TextEncoder | None = None) -> "Bundle":
        path = Path(path)
        config = cls.read_config(path)
        nets = cls.build_networks(config)
        for name, net in nets.items():
            file = path / name / "model.safetensors"
            if not file.is_file():
                raise BundleError(
                    f"{file} is missing. Train it with `lesiondiffusion pretrain {name} --bundle {path}` "
                    f"or create a random bundle with `lesiondiffusion bundle init --preset {config.preset}`."
                )
            expected = net.state_dict()
            try:
                with safe_open(str(file), framework="pt", device="cpu") as fh:
                    found = {k: fh.get_tensor(k) for k in fh.keys()}
            except Exception as exc:
                raise BundleError(f"cannot read {file} as safetensors ({type(exc).__name__}: {exc}); the file is corrupt, restore or retrain it.") from exc
            problems = []
            for key in sorted(set(expected) - set(found)):
                problems.append(f"key {key!r} missing (expected shape {tuple(expected[key].shape)})")
            for key in sorted(set(found) - set(expected)):
                problems.append(f"unexpected key {key!r} (shape {tuple(found[key].shape)})")
            for key in sorted(set(found) & set(expected)):
                if tuple(found[key].shape) != tuple(expected[key].shape):
                    problems.append(f"key {key!r}: expected shape {tuple(expected[key].shape)} from config.yaml, found {tuple(found[key].shape)}")
                elif not torch.isfinite(found[key].float()).all():
                    problems.append(f"key {key!r} contains NaN/inf values")
            if problems:
                shown = "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else "")
                raise BundleError(
                    f"{file} does not match the '{name}' section of {path / CONFIG_FILE} (preset {config.preset!r}): {shown}. "
                    f"Fix: use the config.yaml these weights were trained with, or retrain with `lesiondiffusion pretrain {name} --bundle {path}`."
                )
            net.load_state_dict({k: found[k].to(expected[k].dtype) for k in expected})
        enc_obj = make_encoder(encoder) if isinstance(encoder, str) else encoder
        spec = str(config.encoder.get("spec") or "")
        if enc_obj is None and spec.startswith("hashing"):
            # the hashing encoder is offline and deterministic: attach it so free-text phrases just work
            enc_obj = make_encoder(spec)
        cache = EmbeddingCache.load(path / EMBEDDINGS_DIR, encoder=enc_obj)
        if cache.dim != config.text_dim or cache.encoder_id != config.encoder["id"]:
            raise BundleError(
                f"{path / EMBEDDINGS_DIR / 'phrases.json'}: encoder {cache.encoder_id!r} dim {cache.dim} does not match "
                f"config.yaml encoder {config.encoder['id']!r} dim {config.text_dim}. Re-embed with "
                f"`lesiondiffusion bundle embed {path} --encoder {config.encoder.get('spec', '<spec>')}`."
            )
        bundle = cls(config, nets["vqgan"], nets["lmnet"], nets["linet"], cache, path=path)
        bundle.to(device).eval()
        return bundle

    def summary(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "path": str(self.path) if self.path else None,
            "version": cfg.version,
            "preset": cfg.preset,
            "encoder": cfg.encoder,
            "hu_window": list(cfg.hu_window),
            "spacing_mm": list(cfg.spacing_mm),
            "crop": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg.crop).items()},
            "schedule": cfg.schedule.to_dict(),
            "latent": f"{cfg.latent_channels} channels at 1/{cfg.vq_factor} resolution",
            "parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in self.networks().items()},
            "cached_phrases": len(self.cache.phrases),
            "notes": cfg.notes,
        }

    def equals(self, other: "Bundle") -> bool:
        """Same config, same weights bit for bit, same embedding cache."""
        if self.config.to_dict() != other.config.to_dict() or not self.cache.equals(other.cache):
            return False
        for name, net in self.networks().items():
            a, b = net.state_dict(), other.networks()[name].state_dict()
            if a.keys() != b.keys() or not all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a):
                return False
        return True


__all__ = ["Bundle", "BundleConfig", "CropConfig", "PRESETS", "BUNDLE_VERSION", "default_phrases", "preset_config",
           "load_encoder", "preset_encoder", "preset_training"]
