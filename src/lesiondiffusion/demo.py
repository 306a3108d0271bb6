"""The embedded default: ``lesiondiffusion demo`` runs the whole method on built-in phantoms.

Owns the orchestration only (phantom dataset -> tiny generator bundle trained with the pretraining
code -> lesion synthesis -> real nnU-Net plan/train/predict -> Dice -> one-page summary); every
step calls the project's own modules or nnU-Net's commands and is skipped when its marker exists.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .blending import hu_correction_note, hu_correction_record, hu_correction_summary
from .catalog import load_catalog
from .demo_assets import DEMO_NOTICE, packaged_bundle_dir
from .errors import LesionDiffusionError
from .fewshot import FewShotData, FewShotStudy, write_fewshot_dataset
from .io import atomic_path, load_nifti, save_nifti, write_json, write_yaml
from .nnunet_integration.discovery import with_ext_trainer
from .organs import load_organ_map
from .preview import save_preview

log = logging.getLogger(__name__)



@dataclass
class DemoSettings:
    """Everything the demo does, as data; ``PRESETS`` holds the default and the CI-sized run."""

    shape: tuple[int, int, int] = (64, 64, 40)
    spacing: tuple[float, float, float] = (3.0, 3.0, 4.0)
    n_healthy: int = 6
    # lesion types of the segmentation dataset (dataset labels 1..n in this order)
    lesion_types: tuple[str, ...] = ("liver_tumor",)
    cases_per_type: int = 2          # the few-shot setting: K real lesion cases per type
    n_test_per_type: int = 6
    # catalogs shown in the synthesis step; at least one hollow-organ type
    synth_types: tuple[str, ...] = ("kidney_tumor", "liver_tumor", "gastric_cancer")
    synth_per_type: int = 1
    synth_attempts: int = 3          # new report + seed after a failed synthesis, per lesion
    ddim_steps: int = 10             # DDIM steps of the demo's synthesis and of the synthetic cache
    # generator: the bundle shipped in the package (trained on phantoms by benchmarks/demo_bundle.py), or
    # "train": a few minutes of pretraining with the steps below
    bundle_source: str = "packaged"
    pretrain_steps: dict[str, int] = field(default_factory=lambda: {"vqgan": 40, "lmnet": 60, "linet": 60})
    pretrain_workers: int = 0        # data loading in the main process: cheaper than spawning on 2 cores
    # segmentation: real only vs LesionDiffusion (synthetic pretraining, then real fine-tuning), same recipe
    configuration: str = "2d"
    trainer_suffix: str = "_fewshotcpu"
    synthetic_cases: int = 48        # offline cache of synthetic cases for the LesionDiffusion trainer
    # synthetic share while pretraining: 1.0 as the method, the schedule that beat real only in
    # benchmarks/fewshot_table1.py (0.5 with few cases did not; docs/fewshot.md section 4)
    synthetic_probability: float = 1.0
    trainer_config: dict[str, Any] = field(default_factory=dict)   # extra lesiondiffusion.yaml keys
    dataset_id: int = 900
    dataset_name: str = "LDPhantom"
    seed: int = 0

    def key(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


PRESETS: dict[str, DemoSettings] = {
    "default": DemoSettings(),
    "fast": DemoSettings(
        shape=(48, 48, 32),
        spacing=(4.0, 4.0, 5.0),
        n_healthy=3,
        cases_per_type=1,
        n_test_per_type=1,
        synth_per_type=1,
        ddim_steps=4,
        trainer_suffix="_fewshotcpu_smoke",
        synthetic_cases=4,
    ),
}

STEPS = ("data", "bundle", "synthesis", "nnunet", "summary")


@dataclass
class DemoPaths:
    workdir: Path

    @property
    def markers(self) -> Path:
        return self.workdir / "steps"

    @property
    def raw(self) -> Path:
        return self.workdir / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.workdir / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.workdir / "nnUNet_results"

    @property
    def bundle(self) -> Path:
        return self.workdir / "bundle"

    @property
    def pretrain_runs(self) -> Path:
        return self.workdir / "pretrain_runs"

    @property
    def synthesis(self) -> Path:
        return self.workdir / "synthesis"

    @property
    def segmentation(self) -> Path:
        return self.workdir / "segmentation"

    @property
    def summary_png(self) -> Path:
        return self.workdir / "summary.png"

    @property
    def summary_json(self) -> Path:
        return self.workdir / "summary.json"


class Demo:
    """Runs the demo steps in order; each writes ``steps/<name>.json`` (atomically) when finished."""

    def __init__(self, workdir: str | Path, *, device: str = "cpu", fast: bool = False,
                 settings: DemoSettings | None = None, progress: bool = True,
                 echo: Callable[[str], None] = log.info) -> None:
        self.paths = DemoPaths(Path(workdir).expanduser().resolve())
        self.device = device
        self.settings = settings or PRESETS["fast" if fast else "default"]
        self.progress = progress
        self.echo = echo
        self.dataset_dir = self.paths.raw / f"Dataset{self.settings.dataset_id:03d}_{self.settings.dataset_name}"

    # ---- markers ---------------------------------------------------------------------------
    def _marker(self, step: str) -> Path:
        return self.paths.markers / f"{step}.json"

    def done(self, step: str) -> dict[str, Any] | None:
        p = self._marker(step)
        if not p.exists():
            return None
        try:
            info = json.loads(p.read_text())
        except json.JSONDecodeError:
            return None  # a marker is written atomically, so this only happens if edited by hand
        return info if info.get("settings") == self.settings.key() else None

    def _mark(self, step: str, info: dict[str, Any]) -> None:
        write_json(self._marker(step), {"settings": self.settings.key(), **info})

    def check_workdir(self) -> None:
        """Refuse a workdir filled by a demo with other settings (mixing them would be silent)."""
        for step in STEPS:
            p = self._marker(step)
            if p.exists():
                try:
                    other = json.loads(p.read_text()).get("settings")
                except json.JSONDecodeError:
                    continue
                if other != self.settings.key():
                    raise LesionDiffusionError(
                        f"{self.paths.workdir} holds a demo run with other settings (see {p}). Use another "
                        "--workdir, or add --restart to delete this demo's outputs there and start over."
                    )

    def restart(self) -> None:
        """Delete only what the demo writes inside the workdir."""
        for p in (self.paths.markers, self.paths.raw, self.paths.preprocessed, self.paths.results,
                  self.paths.bundle, self.paths.pretrain_runs, self.paths.synthesis, self.paths.segmentation):
            if p.exists():
                shutil.rmtree(p)
        for p in (self.paths.summary_png, self.paths.summary_json, self.paths.workdir / "lesiondiffusion.yaml"):
            if p.exists():
                p.unlink()

    # ---- orchestration ---------------------------------------------------------------------
    def run(self, steps: tuple[str, ...] = STEPS) -> dict[str, Any]:
        self.paths.workdir.mkdir(parents=True, exist_ok=True)
        self.check_workdir()
        results: dict[str, Any] = {}
        funcs = {"data": self.step_data, "bundle": self.step_bundle, "synthesis": self.step_synthesis,
                 "nnunet": self.step_nnunet, "summary": self.step_summary}
        for i, step in enumerate(steps, start=1):
            prev = self.done(step)
            if prev is not None:
                self.echo(f"[{i}/{len(steps)}] {step}: already done (reusing {self._marker(step)})")
                results[step] = prev
                continue
            self.echo(f"[{i}/{len(steps)}] {step} ...")
            t0 = time.perf_counter()
            info = funcs[step](results)
            info["seconds"] = round(time.perf_counter() - t0, 1)
            self._mark(step, info)
            results[step] = {"settings": self.settings.key(), **info}
            self.echo(f"[{i}/{len(steps)}] {step}: done in {info['seconds']:.0f} s")
        return results

    # ---- step 1: phantom dataset -----------------------------------------------------------
    def fewshot_data(self) -> "FewShotData":
        s = self.settings
        return FewShotData(lesion_types=tuple(s.lesion_types), k_real=s.cases_per_type, n_healthy=s.n_healthy,
                           n_test_per_type=s.n_test_per_type, shape=tuple(s.shape), spacing=tuple(s.spacing),
                           seed=s.seed, dataset_id=s.dataset_id, name=s.dataset_name)

    def step_data(self, results: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        ds = write_fewshot_dataset(self.paths.raw, self.fewshot_data(), progress=self.progress)
        n_train = len(list((ds / "imagesTr").glob("*_0000.nii.gz")))
        k = len(list((ds / "imagesTs").glob("*_0000.nii.gz")))
        self.echo(f"    dataset: {ds} ({n_train} training cases, {s.cases_per_type} with a lesion per type; {k} test "
                  f"cases; shape {s.shape} @ {s.spacing} mm)")
        return {"dataset": str(ds), "n_train": n_train, "n_test": k}

    # ---- step 2: tiny generator bundle ------------------------------------------------------
    def step_bundle(self, results: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        if s.bundle_source == "packaged":
            return self._packaged_bundle()
        if s.bundle_source != "train":
            raise LesionDiffusionError(f"demo setting bundle_source={s.bundle_source!r}: use 'packaged' or 'train'.")
        return self._train_bundle()

    def _packaged_bundle(self) -> dict[str, Any]:
        src = packaged_bundle_dir()
        if not (src / "config.yaml").is_file():
            raise LesionDiffusionError(
                f"The demo bundle is not installed ({src} has no config.yaml). Reinstall the package, or rebuild it "
                "from a source checkout with `python benchmarks/demo_bundle.py --install`.")
        if self.paths.bundle.exists():
            shutil.rmtree(self.paths.bundle)
        shutil.copytree(src, self.paths.bundle)
        info = json.loads((src / "demo_bundle.json").read_text()) if (src / "demo_bundle.json").exists() else {}
        self.echo(f"    bundle: {self.paths.bundle} (shipped demo weights, trained on phantoms by "
                  f"benchmarks/demo_bundle.py; {DEMO_NOTICE.split('.')[0]})")
        return {"bundle": str(self.paths.bundle), "metrics": {}, "source": "packaged", "recipe": info.get("recipe")}

    def _train_bundle(self) -> dict[str, Any]:
        from .pretrain import train_linet, train_lmnet, train_vqgan
        from .pretrain.common import PretrainOptions
        from .pretrain.engine import TrainConfig

        s = self.settings
        losses: dict[str, str] = {}
        trainers = {"vqgan": train_vqgan, "lmnet": train_lmnet, "linet": train_linet}
        for net in ("vqgan", "lmnet", "linet"):
            run_dir = self.paths.pretrain_runs / net
            steps = s.pretrain_steps[net]
            opts = PretrainOptions(
                data=self.dataset_dir, run_dir=run_dir, preset="tiny", bundle=self.paths.bundle,
                resume=(run_dir / "checkpoint.pt").exists(),  # an interrupted demo continues its training
                train=TrainConfig(steps=steps, device=self.device, num_workers=s.pretrain_workers,
                                  checkpoint_every=max(10, steps // 4), log_every=5, progress=self.progress,
                                  seed=s.seed))
            self.echo(f"    pretrain {net}: {steps} steps (tiny preset) -> {run_dir}")
            # an interrupt keeps the last checkpoint; the next demo run resumes from it
            summary = trainers[net].train(opts)
            self.echo(f"    {net}: {summary['step']} steps, "
                      + ", ".join(f"{k} {v:.4g}" for k, v in summary["losses"].items()))
            for cand in ("metrics.csv", "scalars.csv", "log.csv"):
                if (run_dir / cand).exists():
                    losses[net] = str(run_dir / cand)
                    break
        (self.paths.bundle / "DEMO_WEIGHTS_NOT_FOR_RESEARCH.txt").write_text(DEMO_NOTICE + "\n")
        self.echo(f"    bundle: {self.paths.bundle}  ({DEMO_NOTICE.split('.')[0]})")
        return {"bundle": str(self.paths.bundle), "metrics": losses}

    # ---- step 3: synthesis -----------------------------------------------------------------
    def _healthy_templates(self) -> list[str]:
        import yaml

        out = []
        for rep in sorted((self.dataset_dir / "reportsTr").glob("*.yaml")):
            if not (yaml.safe_load(rep.read_text()) or {}).get("lesions"):
                out.append(rep.stem)
        if not out:
            raise LesionDiffusionError(f"No healthy template in {self.dataset_dir}; re-run with --restart.")
        return out

    def step_synthesis(self, results: dict[str, Any]) -> dict[str, Any]:
        from tqdm.auto import tqdm

        from .pipeline import LesionSynthesizer

        s = self.settings
        synth = LesionSynthesizer.from_bundle(self.paths.bundle, device=self.device, ddim_steps=s.ddim_steps)
        templates = self._healthy_templates()
        samples, failures = [], []
        jobs = [(t, k) for t in s.synth_types for k in range(s.synth_per_type)]
        for j, (t, k) in enumerate(tqdm(jobs, desc="synthesis", unit="lesion", disable=not self.progress)):
            catalog = load_catalog(t)
            case = templates[j % len(templates)]
            ct, affine, header = load_nifti(self.dataset_dir / "imagesTr" / f"{case}_0000.nii.gz", np.float32)
            organs = load_organ_map(self.dataset_dir / "organsTr" / f"{case}.nii.gz")
            out = self.paths.synthesis / f"{t}_{k}"
            for attempt in range(s.synth_attempts):
                # a failed sample (e.g. a mask outside its organ) is dropped and counted, never kept
                seed = s.seed * 1000 + j * 10 + attempt
                report = catalog.sample(seed)
                res = synth(ct, organs, [report], catalog, seed=seed)[0]
                if res.ok:
                    break
                failures.append({"type": t, "template": case, "seed": seed, "reason": str(res.failure)})
            if not res.ok:
                continue
            save_nifti(out / "image.nii.gz", res.image.astype(np.float32), affine, header)
            save_nifti(out / "lesion.nii.gz", res.lesion_mask.astype(np.uint8), affine, header)
            res.report.to_yaml(out / "report.yaml")
            # the report is the prompt; what the pipeline did to the lesion (HU correction, mask tries)
            # goes beside it, so a corrected density is never mistaken for the model's
            hu = hu_correction_record(res.info)
            write_json(out / "synthesis.json", {**hu, "mask_attempts": res.info.get("mask_attempts")})
            note = hu_correction_note(res.info)
            preview = out / "preview.png"
            save_preview(preview, ct, res.image, res.lesion_mask, organs.spacing,
                         title=f"{t} ({res.report.shape}, {res.report.density}) on {case}"
                         + (f"\n{note}" if note else ""))
            samples.append({"type": t, "template": case, "dir": str(out), "preview": str(preview),
                            "hollow": catalog.organ_type.startswith("hollow"),
                            "voxels": int(res.lesion_mask.sum()), "shape": res.report.shape,
                            "density": res.report.density, "hu": hu, "hu_note": note})
        if not samples:
            raise LesionDiffusionError(
                "Every synthesis failed: " + "; ".join(f"{f['type']}: {f['reason']}" for f in failures)
            )
        self.echo(f"    {len(samples)} lesions written under {self.paths.synthesis}"
                  + (f" ({len(failures)} failed and were dropped)" if failures else ""))
        return {"samples": samples, "failures": failures}

    # ---- step 4: nnU-Net --------------------------------------------------------------------
    def nnunet_env(self) -> dict[str, str]:
        env = with_ext_trainer(os.environ)  # nnU-Net finds the installed LesionDiffusion trainers
        env.update({
            "nnUNet_raw": str(self.paths.raw),
            "nnUNet_preprocessed": str(self.paths.preprocessed),
            "nnUNet_results": str(self.paths.results),
            "nnUNet_compile": "false",
        })
        # nnU-Net's worker processes (augmentation, fingerprint, validation export): each one imports
        # torch, so on the 2-core default machine more of them cost minutes and gain nothing
        n = str(max(1, min(2, os.cpu_count() or 1)))
        env.setdefault("nnUNet_n_proc_DA", n)
        env.setdefault("nnUNet_def_n_proc", n)
        return env

    def study(self) -> "FewShotStudy":
        """Real only vs LesionDiffusion (synthetic pretraining then real fine-tuning), one recipe, one seed."""
        s = self.settings
        return FewShotStudy(
            workdir=self.paths.segmentation, dataset_dir=self.dataset_dir, bundle=self.paths.bundle,
            generators=("lesiondiffusion",), settings=("real", "synthetic_real"), seeds=(s.seed,),
            configuration=s.configuration, trainer_suffix=s.trainer_suffix, synthetic_cases=s.synthetic_cases,
            ddim_steps=s.ddim_steps, synthetic_probability=s.synthetic_probability, parallel=2, device=self.device,
            progress=self.progress, env=self.nnunet_env(),
            echo=self.echo, extra_config=dict(s.trainer_config))

    def step_nnunet(self, results: dict[str, Any]) -> dict[str, Any]:
        out = self.study().run()
        by = {r["setting"]: r for r in out.runs}
        real, ld = by["real"], by["synthetic_real"]
        return {
            "dice": {"real_only": real["dice"], "lesiondiffusion": ld["dice"]},
            "fold_dirs": {"real_only": real["fold_dir"], "lesiondiffusion": ld["fold_dir"]},
            "predictions": {"real_only": real["predictions"], "lesiondiffusion": ld["predictions"]},
            "curves": {"real_only": training_curve(real["fold_dir"]),
                       "lesiondiffusion": training_curve(ld["fold_dir"])},
            "trainers": {"real_only": real["trainer"], "lesiondiffusion": ld["trainer"]},
            "table": str(out.paths["markdown"]), "chart": str(out.paths["png"]),
        }

    # ---- step 5: summary -------------------------------------------------------------------
    def step_summary(self, results: dict[str, Any]) -> dict[str, Any]:
        write_summary_png(self, results, self.paths.summary_png)
        nn = results["nnunet"]
        summary = {
            "workdir": str(self.paths.workdir),
            "dataset": results["data"]["dataset"],
            "bundle": results["bundle"]["bundle"],
            "bundle_notice": DEMO_NOTICE,
            "synthesis": [x["dir"] for x in results["synthesis"]["samples"]],
            # how far a correction moved the shown lesions (off by default: all zeros, the model's own HU)
            "hu_correction": hu_correction_summary([x.get("hu", {}) for x in results["synthesis"]["samples"]]),
            "nnunet_models": nn["fold_dirs"],
            "predictions": nn["predictions"],
            "dice": nn["dice"],
            "trainers": nn["trainers"],
            "summary_png": str(self.paths.summary_png),
        }
        write_json(self.paths.summary_json, summary)
        return summary


# ---------------------------------------------------------------------------------------------
# figures


def _lesion_slice(mask: np.ndarray) -> int:
    zs = np.nonzero(mask.reshape(-1, mask.shape[2]).any(0))[0]
    if not len(zs):
        return mask.shape[2] // 2
    counts = mask.sum((0, 1))
    return int(np.argmax(counts))


def training_curve(fold_dir: str | Path) -> dict[str, list[float]]:
    """nnU-Net's own per-epoch logging (train/val loss, pseudo Dice) from its final checkpoint."""
    import torch

    ck = Path(fold_dir) / "checkpoint_final.pth"
    if not ck.exists():
        return {}
    # nnU-Net logs numpy scalars; allowing exactly those keeps the load data-only (weights_only=True never
    # runs code from the file, unlike nnU-Net's own loader)
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    scalar_types = [np.dtype, scalar, *{type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")}]
    try:
        with torch.serialization.safe_globals(scalar_types):
            state = torch.load(ck, map_location="cpu", weights_only=True)
    except Exception as exc:  # a figure only: an unreadable checkpoint gives no curve, never a crash
        log.warning("%s: training curve not read (%s)", ck, str(exc).splitlines()[0][:200] if str(exc) else exc)
        return {}
    logd = state.get("logging", {}) or {}
    out = {}
    for k in ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice"):
        if k in logd:
            out[k] = [float(v) for v in logd[k]]
    return out


def _read_metric_csv(path: str | Path) -> dict[str, tuple[list[float], list[float]]]:
    """Scalars of a pretraining run: ``{name: (steps, values)}`` from its long-format metrics.csv
    (columns step,name,value) or a wide one (step plus one column per scalar)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    with open(path, encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            try:
                step = float(row.get("step") or 0)
                if "name" in row and "value" in row:
                    items = [(row["name"], row["value"])]
                else:
                    items = [(k, v) for k, v in row.items() if k != "step"]
                for k, v in items:
                    out.setdefault(k, ([], []))
                    out[k][0].append(step)
                    out[k][1].append(float(v))
            except (TypeError, ValueError):
                continue
    return out


def write_summary_png(demo: Demo, results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = results["synthesis"]["samples"]
    n = min(len(samples), 4)
    fig = plt.figure(figsize=(12, 9))
    gs = fig.add_gridspec(3, max(n, 3))
    for i, smp in enumerate(samples[:n]):
        ax = fig.add_subplot(gs[0, i])
        img, _, _ = load_nifti(Path(smp["dir"]) / "image.nii.gz", np.float32)
        m, _, _ = load_nifti(Path(smp["dir"]) / "lesion.nii.gz")
        z = _lesion_slice(m > 0)
        ax.imshow(img[:, :, z].T, cmap="gray", vmin=-160, vmax=240, origin="lower")
        ax.contour((m[:, :, z] > 0).T.astype(float), levels=[0.5], colors="r", linewidths=0.8)
        ax.set_title(f"{smp['type']}\n{smp['shape']}, {smp['density']}", fontsize=8)
        ax.axis("off")
    ax = fig.add_subplot(gs[1, :2])
    for net, csv_path in results["bundle"].get("metrics", {}).items():
        try:
            series = _read_metric_csv(csv_path)
        except OSError:
            continue
        # the main objective of each network: VQ-GAN reconstruction, diffusion noise loss
        key = next((k for k in ("recon", "loss", "total") if series.get(k, ([], []))[1]), None)
        if key is None:
            continue
        steps, v = series[key]
        v = np.asarray(v)
        ax.plot(steps, v / (abs(v[0]) + 1e-12), label=f"{net} {key}")
    ax.set_title("generator pretraining (loss / first value)", fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(gs[1, 2:])
    dice = results["nnunet"]["dice"]
    types = list(demo.settings.lesion_types)
    x = np.arange(len(types))
    for i, (name, color) in enumerate((("real_only", "tab:gray"), ("lesiondiffusion", "tab:red"))):
        vals = [dice[name].get(t, float("nan")) for t in types]
        bars = ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, label=name.replace("_", " "), color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([t.replace("_", " ") for t in types], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test Dice")
    ax.set_title(f"nnU-Net, {demo.settings.cases_per_type} real lesion cases per type (same recipe)", fontsize=9)
    ax.legend(fontsize=7)
    ax = fig.add_subplot(gs[2, :])
    ax.axis("off")
    lines = ["LesionDiffusion demo (procedural phantoms, " + DEMO_NOTICE.split(".")[0].lower() + ")",
             f"dataset: {results['data']['dataset']}  ({results['data']['n_train']} train / "
             f"{results['data']['n_test']} test cases)",
             f"bundle:  {results['bundle']['bundle']}",
             *comparison_lines(dice)]
    ax.text(0.0, 0.9, "\n".join(lines), va="top", family="monospace", fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def comparison_lines(dice: dict[str, dict[str, float]]) -> list[str]:
    """Which training is better on the test phantoms, per lesion type, and by how much."""
    out = []
    for t, real in dice["real_only"].items():
        ld = dice["lesiondiffusion"].get(t, float("nan"))
        diff = ld - real
        if abs(diff) < 0.005:
            verdict = "no difference"
        else:
            verdict = f"{'LesionDiffusion' if diff > 0 else 'real only'} better by {abs(diff):.3f}"
        out.append(f"Dice {t}: real only {real:.3f}, LesionDiffusion {ld:.3f} ({verdict})")
    return out


def _hu_lines(hu: dict[str, Any] | None) -> list[str]:
    """One line when an HU correction moved any shown lesion (nothing with the default, off)."""
    if not hu or not hu.get("lesions_moved"):
        return []
    return [f"  HU correction        {hu['hu_correction']} moved {hu['lesions_moved']} of {hu['lesions']} lesions "
            f"(mean |shift| {hu['mean_abs_hu_shift']:.1f} HU, max {hu['max_abs_hu_shift']:.1f} HU, "
            f"{hu['voxels_clipped']} voxels clipped): their density is the catalog's, not the model's"]


def format_final(results: dict[str, Any]) -> str:
    s = results["summary"]
    return "\n".join([
        "",
        "LesionDiffusion demo finished.",
        f"  phantom dataset      {s['dataset']}",
        f"  generator bundle     {s['bundle']}   <- {DEMO_NOTICE.split('.')[0]}",
        f"  synthetic lesions    {Path(s['synthesis'][0]).parent if s['synthesis'] else '-'} "
        f"({len(s['synthesis'])} cases: image.nii.gz, lesion.nii.gz, report.yaml, synthesis.json, preview.png)",
        *_hu_lines(s.get("hu_correction")),
        f"  nnU-Net models       real only: {s['nnunet_models']['real_only']}",
        f"                       LesionDiffusion: {s['nnunet_models']['lesiondiffusion']}",
        f"  predictions          {s['predictions']['lesiondiffusion']} (and .../real)",
        *(f"  {line}" for line in comparison_lines(s["dice"])),
        "                       (one seed, minutes of CPU: docs/fewshot.md has the 3-seed table and what it means)",
        f"  one-page summary     {s['summary_png']}",
    ])
