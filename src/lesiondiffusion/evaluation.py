"""Evaluation of generated lesions and of segmentation models trained with them.

Owns the shape metrics (sphericity, convexity), HU statistics lesion vs organ, Dice through
nnU-Net's own metric code, the prompt-alignment study and the three-setting segmentation study.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from scipy import ndimage

from .errors import LesionDiffusionError
from .io import atomic_path, atomic_write_text, write_json

if TYPE_CHECKING:
    from .catalog import Catalog
    from .generator import LesionGenerator
    from .organs import OrganMap

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# shape metrics


def _mesh(mask: np.ndarray, spacing: Sequence[float]):
    """Marching-cubes surface (mm) of a binary mask, padded so the surface is closed.

    The mask is anti-aliased first (Gaussian, 0.7 voxel): on the raw voxel staircase a digital
    ball scores sphericity ~0.91 and convexity ~0.92; smoothed it scores ~0.99 for both, so the
    metrics measure the shape rather than the voxel grid."""
    from skimage.measure import marching_cubes

    padded = np.pad(mask.astype(np.float32), 3)
    smooth = ndimage.gaussian_filter(padded, 0.7)
    if smooth.max() > 0.5:  # a mask of one or two voxels would vanish when smoothed
        padded = smooth
    verts, faces, _, _ = marching_cubes(padded, level=0.5, spacing=tuple(float(s) for s in spacing))
    return verts, faces


def _mesh_volume(verts: np.ndarray, faces: np.ndarray) -> float:
    # divergence theorem over the closed triangle mesh (no library returns a mesh's enclosed volume)
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    return float(abs(np.einsum("ij,ij->i", a, np.cross(b, c)).sum()) / 6.0)


def sphericity(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """pi^(1/3) (6V)^(2/3) / A on the marching-cubes surface: 1 for a ball, lower for lobulated
    or elongated shapes. NaN for an empty mask."""
    from skimage.measure import mesh_surface_area

    mask = np.asarray(mask, bool)
    if not mask.any():
        return float("nan")
    verts, faces = _mesh(mask, spacing)
    area = mesh_surface_area(verts, faces)
    vol = _mesh_volume(verts, faces)
    if area <= 0:
        return float("nan")
    return float(math.pi ** (1 / 3) * (6 * vol) ** (2 / 3) / area)


def convexity(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """Volume / convex-hull volume (scipy ConvexHull of the marching-cubes surface). 1 for a
    convex shape; NaN when the mask is empty or flat (hull undefined)."""
    from scipy.spatial import ConvexHull, QhullError

    mask = np.asarray(mask, bool)
    if not mask.any():
        return float("nan")
    verts, faces = _mesh(mask, spacing)
    try:
        hull = ConvexHull(verts)
    except QhullError:
        return float("nan")
    if hull.volume <= 0:
        return float("nan")
    return float(min(1.0, _mesh_volume(verts, faces) / hull.volume))


@dataclass
class HUStats:
    lesion_mean: float
    lesion_std: float
    organ_mean: float
    organ_std: float
    n_lesion: int
    n_organ: int

    @property
    def contrast(self) -> float:
        return self.lesion_mean - self.organ_mean


def hu_stats(image: np.ndarray, lesion: np.ndarray, organ: np.ndarray, *, margin_vox: int = 1) -> HUStats:
    """Mean and spread of HU inside the lesion and in the surrounding organ (organ voxels outside
    the lesion dilated by ``margin_vox``, so the blended edge counts for neither)."""
    lesion = np.asarray(lesion, bool)
    organ = np.asarray(organ, bool)
    ring = ndimage.binary_dilation(lesion, iterations=margin_vox) if margin_vox > 0 else lesion
    around = organ & ~ring
    li, oi = image[lesion], image[around]

    def ms(v: np.ndarray) -> tuple[float, float]:
        return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))

    (lm, ls), (om, os_) = ms(li), ms(oi)
    return HUStats(lm, ls, om, os_, int(li.size), int(oi.size))


def dice(reference: np.ndarray, prediction: np.ndarray, label: int = 1) -> float:
    """Dice of one label with nnU-Net's own confusion counts; NaN when both are empty."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    tp, fp, fn, _ = compute_tp_fp_fn_tn(np.asarray(reference) == label, np.asarray(prediction) == label)
    if tp + fp + fn == 0:
        return float("nan")
    return float(2 * tp / (2 * tp + fp + fn))


def dice_on_folders(ref_dir: str | Path, pred_dir: str | Path, labels: Sequence[int],
                    file_ending: str = ".nii.gz") -> dict[str, Any]:
    """Per-case and mean Dice per label with nnU-Net's ``compute_metrics`` (in this process: its
    folder helper spawns a pool, which costs more than the work on small test sets)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    ref_dir, pred_dir = Path(ref_dir), Path(pred_dir)
    preds = sorted(p for p in pred_dir.glob(f"*{file_ending}"))
    if not preds:
        raise LesionDiffusionError(f"No predictions (*{file_ending}) in {pred_dir}; run prediction first.")
    per_case = []
    for p in preds:
        ref = ref_dir / p.name
        if not ref.exists():
            raise LesionDiffusionError(f"Reference label {ref} for prediction {p} is missing.")
        r = compute_metrics(str(ref), str(p), SimpleITKIO(), list(labels))
        per_case.append({"case": p.name[: -len(file_ending)],
                         "dice": {int(k): float(v["Dice"]) for k, v in r["metrics"].items()},
                         "n_ref": {int(k): int(v["n_ref"]) for k, v in r["metrics"].items()}})
    mean = {}
    for lab in labels:
        vals = [c["dice"][lab] for c in per_case if not math.isnan(c["dice"][lab])]
        mean[int(lab)] = float(np.mean(vals)) if vals else float("nan")
    return {"per_case": per_case, "mean": mean}


# ---------------------------------------------------------------------------------------------
# prompt alignment


@dataclass
class AlignmentSample:
    group: str           # "shape" or "density"
    prompt: str
    seed: int
    ok: bool
    failure: str = ""
    sphericity: float = float("nan")
    convexity: float = float("nan")
    volume_mm3: float = float("nan")
    lesion_hu_mean: float = float("nan")
    lesion_hu_std: float = float("nan")
    organ_hu_mean: float = float("nan")
    organ_hu_std: float = float("nan")


@dataclass
class AlignmentResult:
    samples: list[AlignmentSample] = field(default_factory=list)

    def summary(self) -> list[dict[str, Any]]:
        rows = []
        keys = sorted({(s.group, s.prompt) for s in self.samples}, key=lambda k: (k[0] != "shape", k[1]))
        for g, p in keys:
            ss = [s for s in self.samples if s.group == g and s.prompt == p]
            ok = [s for s in ss if s.ok]

            def agg(attr: str) -> tuple[float, float]:
                v = np.array([getattr(s, attr) for s in ok], float)
                v = v[np.isfinite(v)]
                return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))

            row = {"group": g, "prompt": p, "n": len(ok), "failed": len(ss) - len(ok)}
            for attr in ("sphericity", "convexity", "volume_mm3", "lesion_hu_mean", "lesion_hu_std",
                         "organ_hu_mean"):
                m, s = agg(attr)
                row[f"{attr}_mean"] = m
                row[f"{attr}_sd"] = s
            rows.append(row)
        return rows


def prompt_values(catalog: "Catalog", attribute: str) -> list[str]:
    """Values of one attribute the catalog allows (its domain; zero-weight values can still be
    prompted), in catalog order."""
    return list(catalog.domain(attribute))


def run_alignment(
    generator: "LesionGenerator",
    ct: np.ndarray,
    organs: "OrganMap",
    catalog: "Catalog",
    n: int,
    *,
    seed: int = 0,
    groups: Sequence[str] = ("shape", "density"),
    progress: bool = True,
) -> AlignmentResult:
    """Generate ``n`` lesions per value of each prompt group with every other attribute sampled,
    and measure shape (masks) and HU (images) per sample."""
    from tqdm.auto import tqdm

    from .errors import CatalogError

    spacing = organs.spacing
    voxel_mm3 = float(np.prod(spacing))
    prompts = [(g, v) for g in groups for v in prompt_values(catalog, g)]
    result = AlignmentResult()
    bar = tqdm(total=len(prompts) * n, desc=f"alignment {catalog.name}", unit="lesion", disable=not progress)
    for k, (g, v) in enumerate(prompts):
        # one batched generator call per prompt value; every report has its own sampling seed
        base = seed + 100_003 * k
        reports, seeds = [], []
        for i in range(n):
            try:
                reports.append(catalog.sample(base + i, fixed={g: v}))
                seeds.append(base + i)
            except CatalogError as exc:
                result.samples.append(AlignmentSample(g, v, base + i, False, f"sampling: {exc}"))
        results = generator(ct, organs, reports, catalog, seed=base) if reports else []
        for s, report, res in zip(seeds, reports, results):
            if not res.ok:
                result.samples.append(AlignmentSample(g, v, s, False, str(res.failure)))
                continue
            mask = res.lesion_mask.astype(bool)
            organ_names = res.box.organ_names if res.box is not None else catalog.organ_names(report.organ)
            st = hu_stats(res.image, mask, organs.mask(organ_names))
            result.samples.append(AlignmentSample(
                g, v, s, True, "",
                sphericity=sphericity(mask, spacing), convexity=convexity(mask, spacing),
                volume_mm3=float(mask.sum()) * voxel_mm3,
                lesion_hu_mean=st.lesion_mean, lesion_hu_std=st.lesion_std,
                organ_hu_mean=st.organ_mean, organ_hu_std=st.organ_std,
            ))
        bar.update(n)
    bar.close()
    return result


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        atomic_write_text(path, "")
        return
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})


def format_alignment_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'group':<8} {'prompt':<40} {'n':>3} {'fail':>4} {'spher.':>13} {'convex.':>13} {'lesion HU':>15} {'organ HU':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        def pm(a: str) -> str:
            m, s = r[f"{a}_mean"], r[f"{a}_sd"]
            return "n/a" if math.isnan(m) else f"{m:.2f}±{s:.2f}" if abs(m) < 10 else f"{m:.0f}±{s:.0f}"
        lines.append(
            f"{r['group']:<8} {r['prompt'][:40]:<40} {r['n']:>3} {r['failed']:>4} {pm('sphericity'):>13} "
            f"{pm('convexity'):>13} {pm('lesion_hu_mean'):>15} "
            f"{'n/a' if math.isnan(r['organ_hu_mean_mean']) else format(r['organ_hu_mean_mean'], '.0f'):>9}"
        )
    return "\n".join(lines)


def plot_alignment(result: AlignmentResult, path: str | Path, title: str = "") -> None:
    """Scatter of sphericity vs convexity per shape prompt, and lesion vs organ HU per density prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    shape_prompts = [p for p in dict.fromkeys(s.prompt for s in result.samples if s.group == "shape")]
    for p in shape_prompts:
        ss = [s for s in result.samples if s.group == "shape" and s.prompt == p and s.ok]
        a1.scatter([s.sphericity for s in ss], [s.convexity for s in ss], label=f"{p} (n={len(ss)})", alpha=0.7)
    a1.set_xlabel("sphericity")
    a1.set_ylabel("convexity (volume / convex hull)")
    a1.set_title("mask morphology per shape prompt")
    a1.legend(fontsize=7)
    dens = [p for p in dict.fromkeys(s.prompt for s in result.samples if s.group == "density")]
    for i, p in enumerate(dens):
        ss = [s for s in result.samples if s.group == "density" and s.prompt == p and s.ok]
        x = np.full(len(ss), i, float) + np.linspace(-0.15, 0.15, max(len(ss), 1))[: len(ss)]
        a2.scatter(x, [s.lesion_hu_mean for s in ss], color="C3", alpha=0.7, label="lesion" if i == 0 else None)
        a2.scatter(x + 0.35, [s.organ_hu_mean for s in ss], color="C7", alpha=0.7, marker="s",
                   label="surrounding organ" if i == 0 else None)
    a2.set_xticks(range(len(dens)))
    a2.set_xticklabels([d[:22] for d in dens], rotation=25, ha="right", fontsize=7)
    a2.set_ylabel("mean HU")
    a2.set_title("intensity per density prompt")
    if dens:
        a2.legend(fontsize=7)
    fig.suptitle(title or "prompt alignment")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_alignment(result: AlignmentResult, out_dir: str | Path, title: str = "") -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = result.summary()
    paths = {"summary": out / "alignment_summary.csv", "samples": out / "alignment_samples.csv",
             "plot": out / "alignment.png"}
    _write_csv(paths["summary"], rows)
    _write_csv(paths["samples"], [vars(s) for s in result.samples])
    plot_alignment(result, paths["plot"], title)
    return paths


# ---------------------------------------------------------------------------------------------
# segmentation study: nnU-Net in the method's three settings


# setting -> (table row name, base trainer class); a suffix such as "_5epochs" selects short variants
SETTINGS: dict[str, tuple[str, str]] = {
    "real": ("Real only", "nnUNetTrainer"),
    "synthetic": ("Synthetic only", "nnUNetTrainerLesionDiffusionSynthOnly"),
    "synthetic_real": ("Synthetic then real", "nnUNetTrainerLesionDiffusion"),
}


def nnunet_executable(name: str) -> str:
    """The nnU-Net console script of this Python environment (falls back to PATH)."""
    import shutil
    import sys

    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise LesionDiffusionError(
            f"`{name}` was not found next to {sys.executable} or on PATH. Install nnU-Net v2 in this "
            "environment (`pip install nnunetv2`, a dependency of this package) and activate it."
        )
    return found


def ext_trainer_dir() -> Path:
    """The installed folder of trainer modules that nnU-Net's ``nnUNet_extTrainer`` must list."""
    from importlib import resources

    return Path(str(resources.files("lesiondiffusion.nnunet_integration"))) / "ext_trainers"


def trainer_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``nnUNet_extTrainer`` with the LesionDiffusion trainer folder prepended (kept once)."""
    import os

    env = dict(os.environ if env is None else env)
    folder = str(ext_trainer_dir())
    parts = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p and p != folder]
    return {"nnUNet_extTrainer": os.pathsep.join([folder, *parts])}


def run_logged(cmd: Sequence[str], log_path: str | Path, env: dict[str, str] | None = None, *,
               progress: bool = True, epochs: int | None = None, echo=log.info) -> None:
    """Run a command, write its output to ``log_path`` and advance a progress bar per nnU-Net epoch.
    A non-zero exit raises with the last lines of the log."""
    import re
    import subprocess

    from tqdm.auto import tqdm

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    echo(f"    $ {' '.join(cmd)}\n      (log: {log_path})")
    bar = tqdm(total=epochs, desc=Path(cmd[0]).name, unit="epoch", disable=not progress or epochs is None)
    tail: list[str] = []
    with open(log_path, "a", encoding="utf-8") as logf:
        logf.write(f"\n$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                logf.write(line)
                tail = (tail + [line.rstrip()])[-25:]
                if re.search(r"\bEpoch \d+\s*$", line):
                    bar.update(1)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        rc = proc.wait()
    bar.close()
    if rc != 0:
        raise LesionDiffusionError(
            f"`{' '.join(cmd)}` failed with exit code {rc}. Last lines of {log_path}:\n    "
            + "\n    ".join(tail)
        )


@dataclass
class SegmentationStudy:
    """Train, predict and score nnU-Net for each setting; every finished stage is reused.

    ``dataset`` is an nnU-Net dataset id or folder name under ``$nnUNet_raw``; the test set is the
    raw dataset's ``imagesTs``/``labelsTs`` unless ``test_images``/``test_labels`` are given.
    """

    dataset: str
    out_dir: Path
    settings: tuple[str, ...] = ("real", "synthetic", "synthetic_real")
    configuration: str = "3d_fullres"
    fold: str = "0"
    plans: str = "nnUNetPlans"
    trainer_suffix: str = ""
    trainers: dict[str, str] = field(default_factory=dict)   # explicit per-setting trainer names
    test_images: Path | None = None
    test_labels: Path | None = None
    device: str = "cpu"
    config: Path | None = None       # lesiondiffusion.yaml for the LesionDiffusion trainers
    plan: bool = True                # run nnUNetv2_plan_and_preprocess when the plans are missing
    progress: bool = True
    env: dict[str, str] | None = None
    echo: Any = log.info            # the CLI passes print

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        for s in self.settings:
            if s not in SETTINGS:
                raise LesionDiffusionError(
                    f"Unknown setting {s!r}; choose from {', '.join(SETTINGS)} (comma-separated)."
                )

    # -- environment -----------------------------------------------------------------------
    def environment(self) -> dict[str, str]:
        import os

        env = dict(self.env if self.env is not None else os.environ)
        missing = [k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if not env.get(k)]
        if missing:
            raise LesionDiffusionError(
                f"Environment variable(s) {', '.join(missing)} not set. nnU-Net needs nnUNet_raw, "
                "nnUNet_preprocessed and nnUNet_results pointing at folders (see nnU-Net's "
                "documentation/set_environment_variables.md)."
            )
        if self.config is not None:
            cfg = Path(self.config)
            if not cfg.exists():
                raise LesionDiffusionError(f"Config file {cfg} does not exist; pass the lesiondiffusion.yaml path.")
            env["LESIONDIFFUSION_CONFIG"] = str(cfg.resolve())
        env.update(trainer_env(env))
        env.setdefault("nnUNet_compile", "false")
        return env

    def dataset_folder(self, env: dict[str, str]) -> Path:
        raw = Path(env["nnUNet_raw"])
        ds = str(self.dataset)
        if ds.isdigit():
            hits = sorted(raw.glob(f"Dataset{int(ds):03d}_*"))
            if len(hits) != 1:
                raise LesionDiffusionError(
                    f"Dataset id {ds}: found {len(hits)} folders Dataset{int(ds):03d}_* in {raw}; expected one."
                )
            return hits[0]
        p = raw / ds
        if not p.is_dir():
            raise LesionDiffusionError(f"Dataset folder {p} does not exist. Give an id or a folder name in {raw}.")
        return p

    def trainer(self, setting: str) -> str:
        return self.trainers.get(setting) or SETTINGS[setting][1] + self.trainer_suffix

    def fold_dir(self, env: dict[str, str], setting: str) -> Path:
        ds = self.dataset_folder(env).name
        return (Path(env["nnUNet_results"]) / ds / f"{self.trainer(setting)}__{self.plans}__{self.configuration}"
                / f"fold_{self.fold}")

    # -- stages ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        env = self.environment()
        ds_dir = self.dataset_folder(env)
        ds_id = str(int(ds_dir.name[len("Dataset"):len("Dataset") + 3]))
        meta = json.loads((ds_dir / "dataset.json").read_text())
        labels = {int(v): k for k, v in meta["labels"].items() if int(v) != 0} if all(
            isinstance(v, int) for v in meta["labels"].values()) else None
        if labels is None:
            raise LesionDiffusionError(
                f"{ds_dir / 'dataset.json'}: region-based labels are not supported by this study; "
                "use integer labels (one per lesion type)."
            )
        test_images = Path(self.test_images or ds_dir / "imagesTs")
        test_labels = Path(self.test_labels or ds_dir / "labelsTs")
        for p, what in ((test_images, "images"), (test_labels, "labels")):
            if not p.is_dir() or not any(p.iterdir()):
                raise LesionDiffusionError(
                    f"Test {what} folder {p} is missing or empty. Put held-out cases in the dataset's "
                    "imagesTs/labelsTs (nnU-Net layout) or pass --test-images/--test-labels."
                )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        logs = self.out_dir / "logs"
        pre = Path(env["nnUNet_preprocessed"]) / ds_dir.name
        if not (pre / f"{self.plans}.json").exists():
            if not self.plan:
                raise LesionDiffusionError(
                    f"No plans {pre / (self.plans + '.json')}; run nnUNetv2_plan_and_preprocess -d {ds_id} first."
                )
            # nnU-Net's own process counts unless nnUNet_def_n_proc limits them (small machines)
            n_proc = env.get("nnUNet_def_n_proc")
            procs = ["-np", n_proc, "-npfp", n_proc] if n_proc else []
            run_logged([nnunet_executable("nnUNetv2_plan_and_preprocess"), "-d", ds_id, "-c", self.configuration,
                        *procs, "--verify_dataset_integrity"], logs / "plan_and_preprocess.log", env,
                       progress=self.progress, echo=self.echo)
        rows: dict[str, dict[str, Any]] = {}
        for setting in self.settings:
            rows[setting] = self._one(setting, env, ds_id, test_images, test_labels, labels, logs)
        table = self.write_table(rows, labels)
        return {"rows": rows, **table}

    def _one(self, setting: str, env, ds_id, test_images, test_labels, labels, logs) -> dict[str, Any]:
        trainer = self.trainer(setting)
        fold_dir = self.fold_dir(env, setting)
        marker = self.out_dir / "done" / f"{setting}.json"
        if marker.exists():
            prev = json.loads(marker.read_text())
            if prev.get("trainer") == trainer and prev.get("fold") == self.fold:
                self.echo(f"  {SETTINGS[setting][0]}: reusing {marker}")
                return prev
        if not (fold_dir / "checkpoint_final.pth").exists():
            cmd = [nnunet_executable("nnUNetv2_train"), ds_id, self.configuration, self.fold, "-tr", trainer,
                   "-p", self.plans, "-device", self.device.split(":")[0]]
            if (fold_dir / "checkpoint_latest.pth").exists():
                cmd.append("--c")  # resume an interrupted training
            run_logged(cmd, logs / f"train_{setting}.log", env, progress=self.progress,
                       epochs=_epochs_of(trainer), echo=self.echo)
        pred = self.out_dir / "predictions" / setting
        if pred.exists():
            import shutil

            shutil.rmtree(pred)  # a half-finished prediction folder is never scored
        run_logged([nnunet_executable("nnUNetv2_predict"), "-i", str(test_images), "-o", str(pred), "-d", ds_id,
                    "-c", self.configuration, "-f", self.fold, "-tr", trainer, "-p", self.plans,
                    "-device", self.device.split(":")[0], "--disable_tta", "-npp", "1", "-nps", "1"],
                   logs / f"predict_{setting}.log", env, progress=self.progress, echo=self.echo)
        scores = dice_on_folders(test_labels, pred, sorted(labels))
        row = {"setting": setting, "trainer": trainer, "fold": self.fold, "fold_dir": str(fold_dir),
               "predictions": str(pred),
               "dice": {labels[k]: v for k, v in scores["mean"].items()}, "per_case": scores["per_case"]}
        write_json(marker, row)
        return row

    def write_table(self, rows: dict[str, dict[str, Any]], labels: dict[int, str]) -> dict[str, Any]:
        types = [labels[k] for k in sorted(labels)]
        table_rows = []
        for setting, row in rows.items():
            vals = [row["dice"].get(t, float("nan")) for t in types]
            finite = [v for v in vals if not math.isnan(v)]
            table_rows.append({"setting": SETTINGS[setting][0], "trainer": row["trainer"],
                               **{t: v for t, v in zip(types, vals)},
                               "mean": float(np.mean(finite)) if finite else float("nan")})
        csv_path = self.out_dir / "segmentation_dice.csv"
        md_path = self.out_dir / "segmentation_dice.md"
        _write_csv(csv_path, table_rows)
        atomic_write_text(md_path, format_dice_markdown(table_rows, types))
        return {"csv": csv_path, "markdown": md_path, "table": table_rows}


def _epochs_of(trainer: str) -> int | None:
    import re

    m = re.search(r"_(\d+)epochs?(?:_|$)", trainer)
    return int(m.group(1)) if m else None


def format_dice_markdown(rows: list[dict[str, Any]], types: list[str]) -> str:
    """Dice (%) per lesion type, one row per training setting (the layout of the method's Table 1)."""
    head = "| Training data | " + " | ".join(t.replace("_", " ") for t in types) + " | Mean |"
    sep = "|---|" + "---:|" * (len(types) + 1)
    lines = [head, sep]
    for r in rows:
        cells = ["n/a" if math.isnan(r[t]) else f"{100 * r[t]:.1f}" for t in types + ["mean"]]
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        "\n\nDice in %, mean over test cases; as in nnU-Net's evaluation, a case where the lesion type is "
        "absent from both reference and prediction is skipped (a false positive counts as 0).\n"
    )
