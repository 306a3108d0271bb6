"""The few-shot protocol of the method's Table 1 / Table 2, on phantoms or on a user's dataset.

``FewShotData`` writes the phantom dataset (K real lesion cases per type, H healthy templates, a held-out
test set with other seeds; lesions follow their sampled reports). ``FewShotStudy`` is the segmentation
protocol (``evaluation.segmentation.SegmentationProtocol``) preset for it: the CPU recipe, the schedule
knobs and runs side by side. ``lesiondiffusion demo`` and ``benchmarks/fewshot_table1.py`` both run it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import LesionDiffusionError
from .evaluation.segmentation import DEFAULT_GENERATORS, GENERATORS, SETTINGS, SegmentationProtocol, StudyResult
from .io import save_nifti
from .phantoms import make_phantom, write_phantom_dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FewShotData:
    """What the few-shot dataset holds; every number here is part of a result's description."""

    lesion_types: tuple[str, ...] = ("liver_tumor",)
    k_real: int = 2                  # real lesion cases per lesion type
    n_healthy: int = 8               # lesion-free cases: templates for synthesis, negatives for nnU-Net
    n_test_per_type: int = 12        # held-out test cases per lesion type (other seeds)
    shape: tuple[int, int, int] = (64, 64, 40)
    spacing: tuple[float, float, float] = (3.0, 3.0, 4.0)
    seed: int = 0
    dataset_id: int = 910
    name: str = "LDFewShot"

    def key(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def dataset_dir(self, raw_root: str | Path) -> Path:
        return Path(raw_root) / f"Dataset{self.dataset_id:03d}_{self.name}"


def write_fewshot_dataset(raw_root: str | Path, data: FewShotData, *, progress: bool = True) -> Path:
    """Write (or complete) the dataset under ``raw_root`` and return its folder.

    Training cases come from ``write_phantom_dataset`` (seed ``data.seed``); test cases use a separate
    seed stream, one lesion each, labelled with the position of their type. Existing complete files are
    kept, so an interrupted call can be repeated.
    """
    if data.k_real < 0 or data.n_healthy < 0 or data.n_test_per_type < 1:
        raise LesionDiffusionError(
            f"Few-shot dataset: k_real={data.k_real}, n_healthy={data.n_healthy}, "
            f"n_test_per_type={data.n_test_per_type}; give k_real >= 0, n_healthy >= 0 and at least one test case.")
    types = list(dict.fromkeys(data.lesion_types))
    ds = write_phantom_dataset(raw_root, n_healthy=data.n_healthy, lesion_types=types, shape=data.shape,
                               spacing=data.spacing, seed=data.seed, dataset_id=data.dataset_id, name=data.name,
                               cases_per_type=data.k_real, progress=progress)
    ims, labs, orgs = ds / "imagesTs", ds / "labelsTs", ds / "organsTs"
    for d in (ims, labs, orgs):
        d.mkdir(parents=True, exist_ok=True)
    seeds = np.random.SeedSequence([data.seed, 7919]).spawn(len(types) * data.n_test_per_type)
    k = 0
    for _ in range(data.n_test_per_type):
        for label, t in enumerate(types, start=1):
            case = f"{data.name.lower()}_test_{k:03d}"
            files = (ims / f"{case}_0000.nii.gz", labs / f"{case}.nii.gz", orgs / f"{case}.nii.gz")
            if not all(f.exists() for f in files):
                ph = make_phantom(data.shape, data.spacing, np.random.default_rng(seeds[k]), [t])
                save_nifti(files[0], ph.ct, ph.affine)
                save_nifti(files[1], (ph.lesion > 0).astype(np.uint8) * label, ph.affine)
                save_nifti(files[2], ph.organs, ph.affine)
            k += 1
    return ds



@dataclass
class FewShotStudy:
    """The few-shot preset of ``SegmentationProtocol``: settings x generators x seeds on one dataset
    folder with the CPU recipe (2d, ``*_fewshotcpu``), LesionDiffusion trainers configured from the
    schedule knobs below, every nnU-Net folder under ``workdir`` unless ``env`` names one.

    ``synthetic_cases``: size of an offline cache built once per generator (``None`` or 0: on-the-fly
    producer). ``parallel``: trainings at once (the CPU recipe uses one torch thread each).
    ``extra_config``: further lesiondiffusion.yaml keys (e.g. ``catalogs``; default: the dataset's labels).
    """

    workdir: Path
    dataset_dir: Path                       # $nnUNet_raw/Dataset<ID>_<Name> with imagesTs/labelsTs
    bundle: Path | None = None
    generators: tuple[str, ...] = DEFAULT_GENERATORS
    settings: tuple[str, ...] = tuple(SETTINGS)
    seeds: tuple[int, ...] = (0, 1, 2)
    configuration: str = "2d"
    trainer_suffix: str = "_fewshotcpu"
    synthetic_cases: int | None = 200
    ddim_steps: int = 10
    pretrain_fraction: float = 0.5
    synthetic_probability: float = 0.5      # during pretraining
    finetune_synthetic_probability: float = 0.0
    hu_correction: str | None = None        # generator.hu_correction when set (else the config's default)
    parallel: int = 2
    device: str = "cpu"
    progress: bool = True
    env: dict[str, str] | None = None
    echo: Callable[[str], Any] = log.info
    extra_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.dataset_dir = Path(self.dataset_dir)
        # the protocol would only notice a missing bundle when its first synthetic run starts
        if self.bundle is None and any(GENERATORS.get(g, {}).get("backend") == "lesiondiffusion"
                                       for g in self.generators):
            raise LesionDiffusionError("FewShotStudy: the lesiondiffusion generators need a bundle (bundle=...).")
        self.protocol()  # names of settings and generators, seeds, parallel: checked now, not after preprocessing

    def base_env(self) -> dict[str, str]:
        env = dict(self.env if self.env is not None else os.environ)
        env["nnUNet_raw"] = str(self.dataset_dir.parent)
        env.setdefault("nnUNet_preprocessed", str(self.workdir / "nnUNet_preprocessed"))
        env.setdefault("nnUNet_results", str(self.workdir / "nnUNet_results"))  # each run gets its own below it
        env["nnUNet_compile"] = "false"
        # one process per job: parallel trainings already fill the cores
        for key in ("nnUNet_n_proc_DA", "nnUNet_def_n_proc", "OMP_NUM_THREADS"):
            env.setdefault(key, "1")
        return env

    def base_config(self) -> dict[str, Any]:
        generator: dict[str, Any] = {"options": {"ddim_steps": self.ddim_steps}}
        if self.hu_correction is not None:
            generator["hu_correction"] = self.hu_correction
        cfg: dict[str, Any] = {
            "generator": generator,
            "templates": {"dataset_healthy": True},
            "synthetic_probability": self.synthetic_probability,
            "schedule": {"pretrain_fraction": self.pretrain_fraction,
                         "finetune_synthetic_probability": self.finetune_synthetic_probability},
        }
        cfg.update(self.extra_config)
        return cfg

    def protocol(self) -> SegmentationProtocol:
        n = int(self.synthetic_cases or 0)
        return SegmentationProtocol(
            dataset=self.dataset_dir.name, out_dir=self.workdir, settings=self.settings, generators=self.generators,
            sources=("offline",) if n else ("online",), synthetic_cases=n, seeds=tuple(self.seeds),
            configuration=self.configuration, fold="all", trainer_suffix=self.trainer_suffix,
            config=self.base_config(), bundle=self.bundle, device=self.device, parallel=self.parallel,
            progress=self.progress, env=self.base_env(), echo=self.echo)

    def run(self) -> StudyResult:
        return self.protocol().run()


__all__ = ["FewShotData", "FewShotStudy", "GENERATORS", "SETTINGS", "write_fewshot_dataset"]
