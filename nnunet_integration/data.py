"""Templates, synthetic-case factory and the mixing dataset that feed synthetic cases to nnU-Net.

Design (why it looks like this): lesion synthesis needs CT in HU plus an organ map, but nnU-Net's
preprocessed patches are normalised and carry no organ maps. So synthesis happens *before*
nnU-Net's data loader, on templates:

1. Templates are healthy cases (no voxel of any configured lesion label) of the training split
   and/or extra folders of healthy CT + organ maps. They are read with the plans' own image reader,
   transposed, cropped to non-zero and resampled to the configuration's spacing with the plans' own
   resampling functions (the organ map with nearest neighbour), i.e. exactly the geometry of the
   real preprocessed cases, but kept in HU. They are cropped to the organs the catalogs use (plus a
   patch of context) and held in memory by the producer.
2. The producer samples a catalog (by weight), a report and a template, runs the generator in HU,
   crops the result around the lesion with half the loader's (rotation-enlarged) patch size of
   context on each side, normalises it with the plans' normalisation scheme (CTNormalization with
   the dataset fingerprint's intensity properties), writes the catalog's dataset label into the
   template's label map and samples ``class_locations`` with nnU-Net's own preprocessor helper.
   The result is a preprocessed case exactly like a real one.
3. ``MixedDataset`` wraps the real training dataset: each ``load_case`` returns a synthetic case
   with the current synthetic probability, else the real case. nnU-Net's unchanged data loader
   then crops the patch (foreground oversampling included), runs nnU-Net's augmentation and builds
   the deep-supervision targets, so synthetic and real samples are treated identically.

Normalisation runs after resampling here (nnU-Net normalises first); for CTNormalization, a clip and
an affine map, the two orders differ only by the interpolation overshoot at clipped edges.
"""

from __future__ import annotations

import logging
import os
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from lesiondiffusion.blending import hu_correction_record
from lesiondiffusion.catalog import load_catalog
from lesiondiffusion.errors import ConfigError, LesionDiffusionError
from lesiondiffusion.generators import build_generator as generator_from_name
from lesiondiffusion.organs import OrganMap, organ_map_from_array
from lesiondiffusion.safepickle import load_plain_pickle
from lesiondiffusion.store import SyntheticCase

from .config import LesionDiffusionConfig, resolve_label

log = logging.getLogger(__name__)


@dataclass
class Template:
    """A healthy CT in HU at the plans' spacing, its organ map and its dataset labels (same grid)."""

    name: str
    hu: np.ndarray            # float32 (X, Y, Z) in nnU-Net's axis order
    organs: Any               # lesiondiffusion.organs.OrganMap on the same grid
    seg: np.ndarray           # int16 (X, Y, Z) dataset labels; -1 outside the non-zero region like nnU-Net


def initial_patch_size(configuration_manager: Any) -> tuple[int, ...]:
    """The enlarged patch nnU-Net's training loader crops before rotation/scaling (nnU-Net's own rule)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    # the method only reads configuration_manager and logs; a stand-in object reuses nnU-Net's logic exactly
    dummy = SimpleNamespace(configuration_manager=configuration_manager, print_to_log_file=lambda *a, **k: None)
    _, _, size, _ = nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(dummy)
    return tuple(int(s) for s in size)


def _reader_affine(props: dict, spacing: Sequence[float]) -> np.ndarray:
    """Voxel->world (RAS mm) affine for an array read by nnU-Net's reader (axes reversed vs the file)."""
    aff = np.eye(4)
    if "sitk_stuff" in props:
        st = props["sitk_stuff"]
        d = np.asarray(st["direction"], dtype=np.float64).reshape(3, 3)
        sp = np.asarray(st["spacing"], dtype=np.float64)
        lps_to_ras = np.diag([-1.0, -1.0, 1.0])
        for a in range(3):
            aff[:3, a] = lps_to_ras @ (d[:, 2 - a] * sp[2 - a])
        aff[:3, 3] = lps_to_ras @ np.asarray(st["origin"], dtype=np.float64)
    elif "nibabel_stuff" in props:
        st = props["nibabel_stuff"]
        src = np.asarray(st.get("reoriented_affine", st.get("original_affine")), dtype=np.float64)
        for a in range(3):
            aff[:3, a] = src[:3, 2 - a]
        aff[:3, 3] = src[:3, 3]
    else:
        aff[:3, :3] = np.diag(np.asarray(spacing, dtype=np.float64))
    return aff


def preprocess_template(image_file: str, organ_file: str, label_file: str | None, plans_manager: Any,
                        configuration_manager: Any, organ_mapping: str = "auto", name: str = "") -> Template:
    """Read a CT (HU) + organ map (+ labels) and bring them to the plans' geometry, staying in HU."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, resample_data_or_seg_to_shape

    for f in (image_file, organ_file) + ((label_file,) if label_file else ()):
        if not Path(f).is_file():
            raise ConfigError(f"Template file missing: {f}. Template cases need imagesTr/CASE_0000, organsTr/CASE "
                              "(TotalSegmentator labels) and, for dataset cases, labelsTr/CASE.")
    rw = plans_manager.image_reader_writer_class()
    data, props = rw.read_images([image_file])
    if data.shape[0] != 1:
        raise ConfigError(f"{image_file}: {data.shape[0]} channels; lesion synthesis supports single-channel CT.")
    organs, _ = rw.read_seg(organ_file)
    if organs.shape != data.shape:
        raise ConfigError(f"{organ_file}: organ map shape {organs.shape[1:]} differs from the CT {data.shape[1:]}; "
                          "the organ map must be on the CT's grid.")
    seg = rw.read_seg(label_file)[0] if label_file else np.zeros_like(organs)
    tf = plans_manager.transpose_forward
    axes = [0, *[i + 1 for i in tf]]
    data, organs, seg = data.transpose(axes), organs.transpose(axes), seg.transpose(axes)
    spacing = [props["spacing"][i] for i in tf]
    affine = _reader_affine(props, props["spacing"])
    affine[:3, :3] = affine[:3, :3][:, list(tf)]
    data = np.ascontiguousarray(data, dtype=np.float32)
    data, seg, bbox = crop_to_nonzero(data, np.ascontiguousarray(seg).astype(np.int16))
    organs = organs[(slice(None),) + tuple(slice(a, b) for a, b in bbox)]
    affine[:3, 3] += affine[:3, :3] @ np.asarray([b[0] for b in bbox], dtype=np.float64)
    target = list(configuration_manager.spacing)
    if len(target) < 3:  # 2d configurations keep the slice spacing
        target = [spacing[0]] + target
    new_shape = compute_new_shape(data.shape[1:], spacing, target)
    hu = configuration_manager.resampling_fn_data(data, new_shape, spacing, target)[0].astype(np.float32)
    seg = configuration_manager.resampling_fn_seg(seg, new_shape, spacing, target)[0].astype(np.int16)
    # nearest neighbour for the organ map: one-hot linear resampling of ~117 classes would be slow
    organs = resample_data_or_seg_to_shape(organs.astype(np.int16), new_shape, spacing, target, is_seg=True,
                                           order=0, order_z=0, force_separate_z=None)[0].astype(np.int16)
    affine[:3, :3] = affine[:3, :3] * (np.asarray(target) / np.asarray(spacing))[None, :]
    omap = organ_map_from_array(organs, affine, organ_mapping)
    return Template(name or Path(image_file).name, hu, omap, seg)


def synthetic_context(crop_size: Sequence[int], margin: int = 0) -> list[int]:
    """Voxels of context kept on each side of a lesion (3-D, nnU-Net axis order) so that any training
    patch containing lesion voxels fits: half the loader's initial patch plus ``margin``. A ``2d``
    configuration's patch is in-plane only (its loader takes one slice), so the slice axis keeps
    ``margin`` slices beyond the lesion."""
    half = [int(np.ceil(s / 2)) + margin for s in crop_size]
    if len(half) == 2:
        return [margin, *half]
    if len(half) != 3:
        raise LesionDiffusionError(f"patch size {tuple(crop_size)}: expected 2 (2d) or 3 (3d) axes.")
    return half


def _crop_template(t: Template, organ_names: Sequence[str], context: Sequence[int]) -> Template | None:
    """Keep only the part of a template around the organs lesions can go into (memory), or None."""
    mask = t.organs.mask(organ_names)
    if not mask.any():
        return None
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - np.asarray(context), 0)
    hi = np.minimum(idx.max(0) + 1 + np.asarray(context), t.hu.shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

    aff = t.organs.affine.copy()
    aff[:3, 3] += aff[:3, :3] @ lo.astype(np.float64)
    om = OrganMap(labels=np.ascontiguousarray(t.organs.labels[sl]), affine=aff, names=t.organs.names,
                  source=t.organs.source)
    return Template(t.name, np.ascontiguousarray(t.hu[sl]), om, np.ascontiguousarray(t.seg[sl]))


@dataclass
class FactorySpec:
    """Everything the producer needs to build a ``SyntheticCaseFactory``; picklable (spawned process)."""

    config: LesionDiffusionConfig
    plans: dict
    configuration: str
    dataset_json: dict
    dataset_name: str
    preprocessed_folder: str | None      # the configuration's preprocessed data folder
    raw_folder: str | None               # $nnUNet_raw/Dataset<ID>_<Name>
    identifiers: list[str] | None        # cases allowed as templates (the training split)
    crop_size: tuple[int, ...]
    device: str | None = None            # overrides config.generator.device
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_dataset(cls, config: LesionDiffusionConfig, plans_manager: Any, configuration: str, dataset_json: dict,
                    preprocessed_folder: str | None, identifiers: Sequence[str] | None,
                    device: str | None = None) -> "FactorySpec":
        """The spec for one dataset, plans and configuration (the trainer and ``cache build`` both use
        this): synthetic crops sized by nnU-Net's initial patch, templates from ``$nnUNet_raw`` when set."""
        from nnunetv2.paths import nnUNet_raw

        name = plans_manager.dataset_name
        return cls(config=config, plans=deepcopy(plans_manager.plans), configuration=configuration,
                   dataset_json=dataset_json, dataset_name=name, preprocessed_folder=preprocessed_folder,
                   raw_folder=os.path.join(nnUNet_raw.get(), name) if nnUNet_raw.is_set() else None,
                   identifiers=None if identifiers is None else list(identifiers),
                   crop_size=initial_patch_size(plans_manager.get_configuration(configuration)), device=device)

    def build(self) -> "SyntheticCaseFactory":
        return SyntheticCaseFactory(self)


def lesion_labels(config: LesionDiffusionConfig, catalogs: Sequence[Any], dataset_json: dict) -> list[int]:
    return [resolve_label(e, c.label_name, dataset_json, config.source, i)
            for i, (e, c) in enumerate(zip(config.catalogs, catalogs))]


def load_catalogs(config: LesionDiffusionConfig) -> list[Any]:
    return [load_catalog(e.name) for e in config.catalogs]


def find_healthy_cases(preprocessed_folder: str, identifiers: Sequence[str], labels: Sequence[int]) -> list[str]:
    """Training cases without any voxel of the lesion labels, from the preprocessed properties (read as
    plain data: a swapped .pkl must not run code here)."""
    healthy = []
    for ident in identifiers:
        props = load_plain_pickle(os.path.join(preprocessed_folder, ident + ".pkl"))
        locs = props.get("class_locations", {})
        if all(len(locs.get(lab, [])) == 0 for lab in labels):
            healthy.append(ident)
    return healthy


def load_templates(spec: FactorySpec, catalogs: Sequence[Any], labels: Sequence[int]) -> list[Template]:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cfg = spec.config
    pm = PlansManager(spec.plans)
    cm = pm.get_configuration(spec.configuration)
    ending = spec.dataset_json.get("file_ending", ".nii.gz")
    sources: list[tuple[str, str, str | None, str]] = []
    if cfg.templates.dataset_healthy or cfg.templates.dataset_lesion_cases:
        if not spec.raw_folder or not Path(spec.raw_folder).is_dir():
            raise ConfigError(f"{cfg.source}: templates.dataset_healthy/dataset_lesion_cases is true but the raw "
                              f"dataset folder {spec.raw_folder} does not exist; set nnUNet_raw or list templates.folders.")
        idents = spec.identifiers
        if idents is None:
            idents = sorted(p.name[: -len(ending)] for p in (Path(spec.raw_folder) / "labelsTr").glob("*" + ending))
        healthy = find_healthy_cases(spec.preprocessed_folder, idents, labels) if spec.preprocessed_folder else idents
        if cfg.templates.dataset_lesion_cases:
            chosen = list(idents) if cfg.templates.dataset_healthy else [c for c in idents if c not in set(healthy)]
        else:
            chosen = healthy
        raw = Path(spec.raw_folder)
        for case in chosen:
            sources.append((str(raw / "imagesTr" / f"{case}_0000{ending}"), str(raw / "organsTr" / f"{case}{ending}"),
                            str(raw / "labelsTr" / f"{case}{ending}"), case))
    for folder in cfg.templates.folders:
        f = Path(os.path.expandvars(folder)).expanduser()
        for img in sorted((f / "imagesTr").glob(f"*_0000{ending}")):
            case = img.name[: -len(f"_0000{ending}")]
            sources.append((str(img), str(f / "organsTr" / f"{case}{ending}"), None, f"{f.name}/{case}"))
    if cfg.templates.max_cases:
        sources = sources[: cfg.templates.max_cases]
    if not sources:
        raise ConfigError(f"{cfg.source}: no template cases found (healthy training cases of {spec.dataset_name} "
                          f"without labels {list(labels)}, plus templates.folders). Add healthy cases or a template folder.")
    organ_names = sorted({n for c in catalogs for n in c.organ_names()})
    context = synthetic_context(spec.crop_size, cfg.store.context_margin)
    templates = []
    for img, org, lab, name in sources:
        t = preprocess_template(img, org, lab, pm, cm, cfg.templates.organ_mapping, name)
        exclude_lesions(t, labels, cfg.templates.lesion_exclusion_mm)
        t = _crop_template(t, organ_names, context)
        if t is None:
            log.warning("template %s has none of the organs %s; skipped", name, organ_names)
            continue
        templates.append(t)
    if not templates:
        raise ConfigError(f"{cfg.source}: none of the {len(sources)} template cases contains the organs the catalogs "
                          f"need ({', '.join(organ_names)}). Check the organ maps (organsTr) and templates.organ_mapping.")
    return templates


def exclude_lesions(t: Template, labels: Sequence[int], margin_mm: float) -> int:
    """Take a template's real lesions (and ``margin_mm`` around them) out of its organ map, so that
    placement never puts a synthetic lesion on or beside a real one; the real lesion keeps its label in
    ``t.seg``. Returns the number of organ voxels removed (0 for a healthy template)."""
    from scipy import ndimage

    lesion = np.isin(t.seg, list(labels))
    if not lesion.any():
        return 0
    spacing = np.linalg.norm(t.organs.affine[:3, :3], axis=0)
    near = ndimage.distance_transform_edt(~lesion, sampling=spacing) <= margin_mm if margin_mm > 0 else lesion
    removed = int(((t.organs.labels != 0) & near).sum())
    t.organs.labels[near] = 0
    t.organs._cache.clear()  # cached organ masks predate the change
    return removed


def build_generator(config: LesionDiffusionConfig, device: str | None = None) -> Any:
    """The configured backend (``lesiondiffusion.generators.build_generator`` decides)."""
    g = config.generator
    return generator_from_name(g.backend, bundle=g.bundle, device=device or g.device, options=g.options,
                               text_conditioning=g.text_conditioning, hu_correction=g.hu_correction,
                               source=str(config.source))


class SyntheticCaseFactory:
    """Resident generator + templates; ``factory(seed)`` -> one preprocessed ``SyntheticCase`` or a failure."""

    def __init__(self, spec: FactorySpec) -> None:
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.spec = spec
        cfg = spec.config
        self.catalogs = load_catalogs(cfg)
        self.labels = lesion_labels(cfg, self.catalogs, spec.dataset_json)
        w = np.asarray([e.weight for e in cfg.catalogs], dtype=np.float64)
        self.weights = w / w.sum()
        pm = PlansManager(spec.plans)
        self.cm = pm.get_configuration(spec.configuration)
        self.label_manager = pm.get_label_manager(spec.dataset_json)
        self.intensity = pm.foreground_intensity_properties_per_channel
        self.normalizer = self._normalizer()
        self.sample_locations = DefaultPreprocessor._sample_foreground_locations
        self.templates = load_templates(spec, self.catalogs, self.labels)
        self.by_catalog = [[i for i, t in enumerate(self.templates) if t.organs.mask(c.organ_names()).any()]
                           for c in self.catalogs]
        self.generator = build_generator(cfg, spec.device)
        self.context = np.asarray(synthetic_context(spec.crop_size, cfg.store.context_margin))
        log.info("synthetic case factory ready: %d templates, %d catalogs, backend %s", len(self.templates),
                 len(self.catalogs), cfg.generator.backend)

    def _normalizer(self) -> Any:
        import nnunetv2
        from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

        scheme = self.cm.normalization_schemes[0]
        cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "preprocessing", "normalization"),
                                          scheme, "nnunetv2.preprocessing.normalization")
        if cls is None:
            raise ConfigError(f"Normalisation scheme {scheme!r} of the plans is unknown to nnU-Net.")
        if scheme != "CTNormalization":
            log.warning("plans normalise channel 0 with %s, not CTNormalization; synthetic crops are normalised on "
                        "their own, which is only consistent for CT-style (global) normalisation", scheme)
        return cls(use_mask_for_norm=self.cm.use_mask_for_norm[0], intensityproperties=self.intensity["0"])

    def __call__(self, seed: int) -> tuple[SyntheticCase | None, str | None]:
        return self.batch([seed])[0]

    def batch(self, seeds: Sequence[int]) -> list[tuple[SyntheticCase | None, str | None]]:
        """One case per seed from one generator call: the first seed picks the catalog and template, each
        seed its own report, so the generator runs the lesions through its networks as one batch."""
        rng = np.random.default_rng(seeds[0])
        k = int(rng.choice(len(self.catalogs), p=self.weights))
        catalog, label = self.catalogs[k], self.labels[k]
        if not self.by_catalog[k]:
            return [(None, f"no template contains the organs of catalog {catalog.name}")] * len(seeds)
        t = self.templates[self.by_catalog[k][int(rng.integers(len(self.by_catalog[k])))]]
        try:
            reports = [catalog.sample(rng)] + [catalog.sample(np.random.default_rng(s)) for s in seeds[1:]]
            results = self.generator(t.hu, t.organs, reports, catalog, seed=int(rng.integers(2**31 - 1)))
        except LesionDiffusionError as exc:  # bad draw (no placement, ...): dropped and counted
            return [(None, f"{type(exc).__name__}: {exc}")] * len(seeds)
        return [self._case(result, t, catalog, label, s) for result, s in zip(results, seeds)]

    def _case(self, result: Any, t: Template, catalog: Any, label: int,
              seed: int) -> tuple[SyntheticCase | None, str | None]:
        if not result.ok:
            return None, result.failure
        mask = np.asarray(result.lesion_mask) > 0
        if not mask.any():
            return None, "empty lesion mask"
        if not np.isfinite(result.image).all():
            return None, "non-finite values in the synthesised CT"
        idx = np.argwhere(mask)
        lo = np.maximum(idx.min(0) - self.context, 0)
        hi = np.minimum(idx.max(0) + 1 + np.asarray(self.context), mask.shape)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        seg = t.seg[sl].astype(np.int16, copy=True)
        if result.info.get("inpainted", True):  # the no_lesion control crops the same region, adds no label
            seg[mask[sl]] = label
        data = np.array(result.image[sl], dtype=np.float32)[None]
        data[0] = self.normalizer.run(data[0], seg)
        seg = seg[None]
        lm = self.label_manager
        collect = list(lm.foreground_regions if lm.has_regions else lm.foreground_labels)
        if lm.has_ignore_label:
            collect.append([-1] + lm.all_labels)
        props = {"class_locations": self.sample_locations(seg, collect, verbose=False),
                 "spacing": list(self.cm.spacing), "synthetic": True}
        meta = {"seed": int(seed), "template": t.name, "catalog": catalog.name, "label": int(label),
                "report": result.report.to_dict(), "crop_lo": [int(v) for v in lo],
                "box": result.box.to_dict() if result.box is not None and hasattr(result.box, "to_dict") else None,
                "backend": self.spec.config.generator.backend}
        if not result.info.get("inpainted", True):
            meta["inpainted"] = False
        hu = hu_correction_record(getattr(result, "info", None) or {})
        if hu:  # how far a correction moved this lesion (nothing when the generator corrects nothing)
            meta["hu"] = hu
        return SyntheticCase(f"synth_{seed}", data, seg, props, meta), None


class MixedDataset:
    """Wraps nnU-Net's training dataset; ``load_case`` returns a synthetic case with probability ``p``.

    ``p`` lives in shared memory (set by the trainer each epoch) so augmentation worker processes
    see the pretrain->finetune switch. ``source`` is a ``StoreClient`` (online) or an
    ``OfflineCacheReader``; a None draw (store empty) falls back to the real case. ``history``
    records the last ``history_len`` draws of this process (tests, debugging).
    """

    def __init__(self, real: Any, source: Any, probability: Any, history_len: int = 64) -> None:
        self.real = real
        self.source = source
        self.probability = probability
        self.identifiers = real.identifiers
        self.history: list[tuple[str, str]] = []
        self.history_len = history_len
        self.last_case: SyntheticCase | None = None

    def __getattr__(self, item: str) -> Any:  # anything else behaves like the wrapped nnU-Net dataset
        if item == "real":
            raise AttributeError(item)
        return getattr(self.real, item)

    def __getitem__(self, identifier: str):
        return self.load_case(identifier)

    def _record(self, kind: str, name: str) -> None:
        self.history.append((kind, name))
        if len(self.history) > self.history_len:
            del self.history[0]

    def load_case(self, identifier: str):
        p = float(self.probability.value)
        if p > 0 and np.random.uniform() < p:
            case = self.source.draw()
            if case is not None:
                self.last_case = case
                self._record("synthetic", case.name)
                return case.data, case.seg, None, case.properties
        self._record("real", identifier)
        return self.real.load_case(identifier)
