"""The ``lesiondiffusion.yaml`` configuration of the nnU-Net trainers: dataclasses, loading, validation.

Where the file is found: ``$LESIONDIFFUSION_CONFIG`` if set, else
``$nnUNet_preprocessed/Dataset<ID>_<Name>/lesiondiffusion.yaml``. Every problem is reported with the file,
the key, the offending value and the fix (``ConfigError``); the trainer echoes the validated config
into its training log and saves it next to its checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lesiondiffusion.errors import ConfigError, LesionDiffusionError
from lesiondiffusion.generator import BACKENDS, WEIGHT_FREE_BACKENDS
from lesiondiffusion.io import read_text_input
from lesiondiffusion.rule_based import RuleBasedGenerator
from lesiondiffusion.safeyaml import compose_yaml, duplicate_keys

CONFIG_ENV = "LESIONDIFFUSION_CONFIG"
CONFIG_FILENAME = "lesiondiffusion.yaml"

MODES = ("online", "offline")
REFRESH = ("continuous", "once")
ON_MISS = ("real", "wait")
WORKERS = ("process", "thread")
HU_CORRECTIONS = ("off", "shift", "clip")  # the pipeline's SynthesisConfig.hu_correction values

EXAMPLE = """\
# lesiondiffusion.yaml (beside the dataset's preprocessed folder, or $LESIONDIFFUSION_CONFIG)
generator:
  backend: lesiondiffusion        # lesiondiffusion (default) | rule_based (baseline, no weights) | no_lesion (control: same crops, nothing inpainted)
  bundle: /path/to/bundle         # model bundle folder (lesiondiffusion backend)
  device: cuda                    # where the generator runs: cpu | cuda | cuda:N
  hu_correction: off              # off: the model's own intensities; shift | clip: move the lesion mean into the catalog's HU range
  text_conditioning: true         # false: null prompts for both networks (text ablation)
catalogs:
  - name: kidney_tumor            # built-in catalog name or path to a catalog YAML
    weight: 1.0                   # relative sampling weight
    label: kidney_tumor           # dataset.json label (name or id) written for this lesion type
templates:
  dataset_healthy: true           # healthy cases of this dataset (no lesion voxel) as templates
  dataset_lesion_cases: false     # also cases WITH lesions: new lesions go into their tissue away from the real one
  lesion_exclusion_mm: 10.0       # ... at least this far from a real lesion (which stays labelled)
  folders: []                     # extra folders with imagesTr/*_0000.nii.gz + organsTr/*.nii.gz
mode: online                      # online (background producer) | offline (read a built cache)
synthetic_probability: 1.0        # chance that a training sample is synthetic while pretraining
schedule:
  pretrain_fraction: 0.5          # share of epochs pretrained on synthetic data, then real fine-tuning
store:
  size: 32                        # synthetic cases waiting in the store
  reuse: 8                        # max training draws of one synthetic case (each draw is a new patch)
  refresh: continuous             # continuous | once (fill the store once, then stop the generator)
  warmup: 4                       # cases to wait for before the first epoch (0 = start cold)
  budget: 0.05                    # the producer may slow training by at most 5 % (null = no limit)
  spool_dir: null                 # folder for queued cases (null: /dev/shm, else $TMPDIR); needs ~size x case size free
"""


@dataclass
class GeneratorConfig:
    backend: str = "lesiondiffusion"
    bundle: str | None = None
    device: str = "cpu"
    hu_correction: str = "off"       # off | shift | clip (lesiondiffusion backend; see pipeline.correct_hu)
    options: dict[str, Any] = field(default_factory=dict)   # extra kwargs for the backend
    text_conditioning: bool = True   # false: null prompts for LMNet and LINet (the method's text ablation)

    def device_for_rank(self, local_rank: int | None) -> str:
        """Where this process's generator runs: plain ``cuda`` means the process's own GPU (``cuda:LOCAL_RANK``
        under DDP or torchrun); ``cuda:N`` is a dedicated generator GPU shared by every rank; ``cpu`` stays."""
        if self.device == "cuda" and local_rank is not None:
            return f"cuda:{int(local_rank)}"
        return self.device


@dataclass
class CatalogEntry:
    name: str
    weight: float = 1.0
    label: str | int | None = None   # None = the catalog's own label_name


@dataclass
class TemplatesConfig:
    dataset_healthy: bool = True
    # lesion cases as templates (few-shot data where every case has a lesion, e.g. a user's own
    # mask-only collection): the real lesion keeps its label and the organ map loses it, dilated by
    # lesion_exclusion_mm, so placement puts the synthetic one elsewhere
    dataset_lesion_cases: bool = False
    lesion_exclusion_mm: float = 10.0
    folders: list[str] = field(default_factory=list)
    organ_mapping: str = "auto"
    max_cases: int = 0               # 0 = every healthy case found


@dataclass
class ScheduleConfig:
    pretrain_fraction: float = 0.5
    finetune_synthetic_probability: float = 0.0


@dataclass
class StoreConfig:
    size: int = 32
    reuse: int = 8
    refresh: str = "continuous"
    warmup: int = 4
    warmup_timeout_s: float = 600.0
    on_miss: str = "real"            # what a draw does when no synthetic case is available
    worker: str = "process"          # producer in a spawned process (default) or a thread
    context_margin: int = 0          # extra voxels of context around the lesion beyond the patch
    nice: int = 10                   # producer process priority offset (CPU generators yield to training)
    budget: float | None = 0.05      # max extra training iteration time from the producer; None = unthrottled
    batch: int = 1                   # lesions per generator call (one template, one network batch); GPU: 8
    spool_dir: str | None = None     # where queued cases wait as files; None: /dev/shm if writable, else $TMPDIR


@dataclass
class OfflineConfig:
    cache_dir: str | None = None     # None = $nnUNet_preprocessed/DATASET/lesiondiffusion_cache/PLANS__CONFIG


@dataclass
class LesionDiffusionConfig:
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    catalogs: list[CatalogEntry] = field(default_factory=list)
    templates: TemplatesConfig = field(default_factory=TemplatesConfig)
    mode: str = "online"
    synthetic_probability: float = 1.0
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    seed: int = 0
    source: str = "<defaults>"       # the file it came from (not a YAML key)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SECTIONS = {
    "generator": GeneratorConfig,
    "templates": TemplatesConfig,
    "schedule": ScheduleConfig,
    "store": StoreConfig,
    "offline": OfflineConfig,
}


def _err(path: str, key: str, value: Any, fix: str) -> ConfigError:
    return ConfigError(f"{path}: key '{key}' has invalid value {value!r}. {fix}")


# ---- schema: every key's type comes from the dataclass annotations, so a new field is checked too

_TYPE_WORDS = {"str": "text", "int": "an integer", "float": "a number", "bool": "true or false (unquoted)",
               "None": "null", "dict": "a mapping", "list[str]": "a list of text", "tuple": "a list of numbers"}


def _type_ok(value: Any, annotation: str) -> bool:
    for t in (a.strip() for a in str(annotation).split("|")):
        if (t == "Any" or (t == "None" and value is None) or (t == "str" and isinstance(value, str))
                or (t == "bool" and isinstance(value, bool))
                or (t == "int" and isinstance(value, int) and not isinstance(value, bool))
                or (t == "float" and isinstance(value, (int, float)) and not isinstance(value, bool))
                or (t.startswith("dict") and isinstance(value, dict))
                or (t.startswith("tuple") and isinstance(value, list)
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value))
                or (t == "list[str]" and isinstance(value, list) and all(isinstance(x, str) for x in value))):
            return True
    return False


def _check_type(path: str, key: str, value: Any, annotation: str) -> None:
    if _type_ok(value, annotation):
        return
    parts = [a.strip() for a in str(annotation).split("|")]
    want = " or ".join(_TYPE_WORDS.get(a.split("[")[0] if a != "list[str]" else a, a) for a in parts)
    fix = f"Use {want}."
    if "bool" in parts and isinstance(value, str):
        # a quoted 'false' is text, and text would count as true: the trap of the original probe
        fix = f"Write true or false without quotes: {value!r} is text, not a boolean."
    raise _err(path, key, value, fix)


def _check_keys(path: str, prefix: str, raw: dict, known: set[str] | list[str]) -> None:
    for k in raw:
        if not isinstance(k, str):
            where = f"under '{prefix}'" if prefix else "at the top level"
            raise ConfigError(f"{path}: key {k!r} {where} is not a name (YAML read it as {type(k).__name__}); "
                              f"allowed keys {where}: {', '.join(sorted(known))}.")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        dotted = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        where = f"under '{prefix}'" if prefix else "at the top level"
        raise _err(path, dotted, raw[unknown[0]], f"Unknown key; allowed keys {where}: {', '.join(sorted(known))}.")


def _build_section(cls: type, raw: Any, path: str, prefix: str):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise _err(path, prefix, raw, f"'{prefix}' must be a mapping of keys ({', '.join(cls.__dataclass_fields__)}).")
    _check_keys(path, prefix, raw, set(cls.__dataclass_fields__))
    for k, v in raw.items():
        if cls is GeneratorConfig and k == "hu_correction" and v is False:
            continue  # a bare `off` reads as false in YAML 1.1; _validate maps it back
        _check_type(path, f"{prefix}.{k}", v, cls.__dataclass_fields__[k].type)
    return cls(**raw)


# ranges of the backends' options (types come from their dataclass fields); None is always the default
_OPTION_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "lesiondiffusion": {"ddim_steps": (1, 10000), "guidance_scale": (0.0, 100.0), "mask_threshold": (-1.0, 1.0),
                        "max_retries": (0, 100), "min_volume_fraction": (0.0, 1.0), "min_organ_fraction": (0.0, 1.0),
                        "min_mask_in_organ": (0.0, 1.0), "organ_margin_vox": (0, 64), "blend_dilation": (0, 64),
                        "feather_sigma": (0.0, 64.0), "batch_size": (1, 1024), "crop_fill": (1e-3, 1.0)},
    "rule_based": {"edge_sigma_mm": (0.0, 100.0), "blend_margin_vox": (0, 64), "lobulation": (0.0, 1.0),
                   "homogeneous_std_hu": (0.0, 1000.0), "heterogeneous_std_frac": (0.0, 10.0)},
}
_OPTION_RANGES["no_lesion"] = _OPTION_RANGES["rule_based"]  # the control takes the baseline's options
_OPTION_SET_ELSEWHERE = {"hu_correction": "generator.hu_correction", "text_conditioning": "generator.text_conditioning"}


def _backend_fields(backend: str) -> dict[str, Any]:
    if backend in WEIGHT_FREE_BACKENDS:
        cls = RuleBasedGenerator
    else:  # the pipeline brings torch and the networks: imported only for that backend
        from lesiondiffusion.pipeline import SynthesisConfig as cls
    return {f.name: f.type for f in fields(cls)}


def _check_options(path: str, backend: str, options: dict) -> None:
    """generator.options against the backend's own keyword arguments: names, types and ranges."""
    for k, v in options.items():
        key = f"generator.options.{k}"
        if isinstance(k, str) and k in _OPTION_SET_ELSEWHERE:
            raise _err(path, key, v, f"Set it once, as {_OPTION_SET_ELSEWHERE[k]}.")
    known = _backend_fields(backend)
    allowed = {k: t for k, t in known.items() if k not in _OPTION_SET_ELSEWHERE}
    _check_keys(path, "generator.options", options, set(allowed))
    for k, v in options.items():
        key = f"generator.options.{k}"
        _check_type(path, key, v, allowed[k])
        lo_hi = _OPTION_RANGES.get(backend, {}).get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if v != v or v in (float("inf"), float("-inf")):
                raise _err(path, key, v, "Use a finite number.")
            if lo_hi is not None:
                _number(path, key, v, lo_hi[0], lo_hi[1], integer="int" in str(allowed[k]).split("|")[0])
    if backend == "lesiondiffusion":
        from lesiondiffusion.pipeline import SynthesisConfig

        try:  # the pipeline's own checks (e.g. on_failure) with the file named
            SynthesisConfig(**options)
        except (LesionDiffusionError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: generator.options: {exc}") from None


def check_device(device: str, source: str, key: str = "generator.device", fix: str | None = None) -> None:
    """Refuse a generator device this machine does not have, before any producer starts."""
    if not isinstance(device, str) or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        fix = fix or f"set 'device: cpu' under 'generator:' in {source}"
        raise _err(source, key, device, f"This machine has no CUDA GPU (torch.cuda.is_available() is false), so the "
                                        f"generator cannot run there: {fix}.")
    if ":" in device:
        try:
            index = int(device.split(":", 1)[1])
        except ValueError:
            raise _err(source, key, device, "Use 'cpu', 'cuda' or 'cuda:N' with N a GPU index.") from None
        if not 0 <= index < torch.cuda.device_count():
            raise _err(source, key, device, f"This machine has {torch.cuda.device_count()} CUDA GPU(s) (cuda:0 to "
                                            f"cuda:{torch.cuda.device_count() - 1}); pick one of them or 'cuda'.")


def _number(path: str, key: str, value: Any, lo: float, hi: float, integer: bool = False) -> float:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not (lo <= value <= hi):
        kind = "an integer" if integer else "a number"
        raise _err(path, key, value, f"Use {kind} between {lo} and {hi}.")
    return value


def config_from_dict(raw: Any, source: str = "<dict>") -> LesionDiffusionConfig:
    """Build and validate a config from parsed YAML; every error names ``source``, key, value, fix."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the file must contain a YAML mapping, got {type(raw).__name__}. "
                          f"Start from this example:\n{EXAMPLE}")
    top_known = set(LesionDiffusionConfig.__dataclass_fields__) - {"source"}
    _check_keys(source, "", raw, top_known)
    for key in ("mode", "synthetic_probability", "seed"):
        if key in raw:
            _check_type(source, key, raw[key], LesionDiffusionConfig.__dataclass_fields__[key].type)
    kwargs: dict[str, Any] = {}
    for key, cls in _SECTIONS.items():
        kwargs[key] = _build_section(cls, raw.get(key), source, key)
    cats = raw.get("catalogs", [])
    if not isinstance(cats, list) or not cats:
        raise _err(source, "catalogs", cats, "List at least one catalog, e.g. '- {name: kidney_tumor, weight: 1.0}'.")
    entries = []
    for i, item in enumerate(cats):
        if isinstance(item, str):
            item = {"name": item}
        entries.append(_build_section(CatalogEntry, item, source, f"catalogs[{i}]"))
        if not isinstance(entries[-1].name, str) or not entries[-1].name:
            raise _err(source, f"catalogs[{i}].name", entries[-1].name, "Give a catalog name or a path to a catalog YAML.")
        _number(source, f"catalogs[{i}].weight", entries[-1].weight, 1e-12, 1e12)
    kwargs["catalogs"] = entries
    for key in ("mode", "synthetic_probability", "seed"):
        if key in raw:
            kwargs[key] = raw[key]
    cfg = LesionDiffusionConfig(**kwargs, source=source)
    _validate(cfg)
    return cfg


def _validate(cfg: LesionDiffusionConfig) -> None:
    p = cfg.source
    g = cfg.generator
    if g.backend not in BACKENDS:
        raise _err(p, "generator.backend", g.backend, f"Use one of: {', '.join(BACKENDS)}.")
    if not isinstance(g.device, str) or not (g.device == "cpu" or g.device.startswith("cuda") or g.device == "mps"):
        raise _err(p, "generator.device", g.device, "Use 'cpu', 'cuda' or 'cuda:N'.")
    if not isinstance(g.options, dict):
        raise _err(p, "generator.options", g.options, "Use a mapping of keyword arguments for the backend.")
    if g.hu_correction is False:  # YAML 1.1 reads a bare `off` (the default, as written in docs) as false
        g.hu_correction = "off"
    if g.hu_correction not in HU_CORRECTIONS:
        raise _err(p, "generator.hu_correction", g.hu_correction,
                   f"Use one of: {', '.join(HU_CORRECTIONS)} (shift: move the lesion mean into the catalog's HU range, "
                   "clip: clip lesion voxels into it, off: keep the model's intensities).")
    _check_options(p, g.backend, g.options)
    if not isinstance(g.text_conditioning, bool):
        raise _err(p, "generator.text_conditioning", g.text_conditioning, "Use true or false.")
    if not g.text_conditioning and g.backend != "lesiondiffusion":
        raise _err(p, "generator.text_conditioning", g.text_conditioning,
                   f"Only the lesiondiffusion backend is text-conditioned; remove the key for backend {g.backend!r}.")
    if cfg.mode not in MODES:
        raise _err(p, "mode", cfg.mode, f"Use one of: {', '.join(MODES)}.")
    if g.backend == "lesiondiffusion" and cfg.mode == "online":
        if not g.bundle:
            raise _err(p, "generator.bundle", g.bundle,
                       "The default LesionDiffusion backend needs a model bundle folder: set generator.bundle "
                       "(create one with 'lesiondiffusion bundle init' or the pretrain commands), or opt in to the "
                       "weight-free baseline with 'generator: {backend: rule_based}'.")
        bundle = Path(os.path.expandvars(str(g.bundle))).expanduser()
        if not (bundle / "config.yaml").is_file():
            raise _err(p, "generator.bundle", g.bundle,
                       f"No model bundle at {bundle} (config.yaml missing). Point generator.bundle at a bundle "
                       "folder, or set 'generator: {backend: rule_based}' to use the rule-based baseline instead.")
    _number(p, "synthetic_probability", cfg.synthetic_probability, 0.0, 1.0)
    _number(p, "schedule.pretrain_fraction", cfg.schedule.pretrain_fraction, 0.0, 1.0)
    _number(p, "schedule.finetune_synthetic_probability", cfg.schedule.finetune_synthetic_probability, 0.0, 1.0)
    s = cfg.store
    _number(p, "store.size", s.size, 1, 100000, integer=True)
    _number(p, "store.reuse", s.reuse, 1, 100000, integer=True)
    _number(p, "store.warmup", s.warmup, 0, s.size, integer=True)
    _number(p, "store.warmup_timeout_s", s.warmup_timeout_s, 0, 1e7)
    _number(p, "store.context_margin", s.context_margin, 0, 4096, integer=True)
    _number(p, "store.nice", s.nice, 0, 19, integer=True)
    _number(p, "store.batch", s.batch, 1, 256, integer=True)
    if s.budget is not None:
        _number(p, "store.budget", s.budget, 0.001, 100.0)
    if s.refresh not in REFRESH:
        raise _err(p, "store.refresh", s.refresh, f"Use one of: {', '.join(REFRESH)}.")
    if s.on_miss not in ON_MISS:
        raise _err(p, "store.on_miss", s.on_miss, f"Use one of: {', '.join(ON_MISS)}.")
    if s.worker not in WORKERS:
        raise _err(p, "store.worker", s.worker, f"Use one of: {', '.join(WORKERS)}.")
    if s.spool_dir is not None:
        spool = Path(os.path.expandvars(s.spool_dir)).expanduser()
        if not spool.is_dir() or not os.access(spool, os.W_OK | os.X_OK):
            raise _err(p, "store.spool_dir", s.spool_dir, "Use an existing folder this user can write to (a local disk "
                       "or /dev/shm), or null for the default.")
    t = cfg.templates
    if not isinstance(t.folders, list):
        raise _err(p, "templates.folders", t.folders, "Use a list of folder paths.")
    for i, folder in enumerate(t.folders):
        f = Path(os.path.expandvars(str(folder))).expanduser()
        if not (f / "imagesTr").is_dir() or not (f / "organsTr").is_dir():
            raise _err(p, f"templates.folders[{i}]", folder,
                       "Each template folder needs imagesTr/{case}_0000.nii.gz (CT in HU) and organsTr/{case}.nii.gz "
                       "(TotalSegmentator labels).")
    if not t.dataset_healthy and not t.dataset_lesion_cases and not t.folders:
        raise _err(p, "templates.dataset_healthy", t.dataset_healthy,
                   "No template source: enable dataset_healthy or dataset_lesion_cases, or list templates.folders.")
    _number(p, "templates.lesion_exclusion_mm", t.lesion_exclusion_mm, 0, 1000)
    _number(p, "templates.max_cases", t.max_cases, 0, 10**9, integer=True)
    _number(p, "seed", cfg.seed, 0, 2**31 - 1, integer=True)


def load_config(path: str | os.PathLike) -> LesionDiffusionConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Configuration file not found: {path}. Create it (example below) or set "
                          f"{CONFIG_ENV}.\n{EXAMPLE}")
    text = read_text_input(path, "configuration", ConfigError)
    try:
        node, raw = compose_yaml(text, path, ConfigError)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}). Fix the syntax at the position shown.") from None
    dups = duplicate_keys(node)
    if dups:
        key, line = dups[0]
        raise ConfigError(f"{path}:{line}: key '{key}' is given twice (YAML would silently keep the later one); keep "
                          "one.")
    return config_from_dict(raw, source=str(path))


def config_path_for(preprocessed_dataset_folder: str | os.PathLike | None) -> Path:
    """``$LESIONDIFFUSION_CONFIG`` if set, else ``lesiondiffusion.yaml`` in the dataset's preprocessed folder."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    if preprocessed_dataset_folder is None:
        raise ConfigError(f"Neither {CONFIG_ENV} nor nnUNet_preprocessed is set, so no {CONFIG_FILENAME} can be "
                          f"found. Set {CONFIG_ENV}=/path/to/{CONFIG_FILENAME}.")
    return Path(preprocessed_dataset_folder) / CONFIG_FILENAME


def resolve_label(entry: CatalogEntry, catalog_label: str, dataset_json: dict, source: str, index: int) -> int:
    """Dataset label id that a lesion type writes, from the entry (name or id) or the catalog's label name."""
    labels = dataset_json.get("labels", {})
    wanted = entry.label if entry.label is not None else catalog_label
    plain = {k: v for k, v in labels.items() if isinstance(v, int)}
    if isinstance(wanted, int) and not isinstance(wanted, bool):
        if wanted in plain.values() and wanted != 0:
            return int(wanted)
    elif isinstance(wanted, str) and wanted in plain and plain[wanted] != 0:
        return int(plain[wanted])
    choices = ", ".join(f"{k}={v}" for k, v in plain.items() if v != 0)
    raise _err(source, f"catalogs[{index}].label", wanted,
               f"It is not a foreground label of dataset.json (labels: {choices}). Set 'label:' to one of them.")
