"""The few-shot protocol of the method's Table 1 / Table 2, on phantoms or on a user's dataset.

``FewShotData`` writes the phantom dataset (K real lesion cases per type, H healthy templates, a held-out
test set with other seeds; lesions follow their sampled reports). ``FewShotStudy`` trains nnU-Net in
every setting (real only; synthetic only; synthetic then real) for every generator (LesionDiffusion,
the rule-based baseline, LesionDiffusion with null prompts) and seed, each run through the real nnU-Net
commands (``evaluation.SegmentationStudy``), and writes mean +- sd over seeds as CSV, Markdown and a bar
chart. ``lesiondiffusion demo`` and ``benchmarks/fewshot_table1.py`` both run it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import LesionDiffusionError
from .io import atomic_path, atomic_write_text, save_nifti, write_csv, write_json, write_yaml
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



# generator name -> the ``generator:`` section of lesiondiffusion.yaml (bundle and ddim steps filled in)
GENERATORS: dict[str, dict[str, Any]] = {
    "lesiondiffusion": {"backend": "lesiondiffusion"},
    "rule_based": {"backend": "rule_based"},
    "lesiondiffusion_notext": {"backend": "lesiondiffusion", "text_conditioning": False},
}
# setting -> base trainer class (the recipe suffix is appended)
SETTING_TRAINERS = {
    "real": "nnUNetTrainer",
    "synthetic": "nnUNetTrainerLesionDiffusionSynthOnly",
    "synthetic_real": "nnUNetTrainerLesionDiffusion",
}
SETTING_NAMES = {"real": "Real only", "synthetic": "Synthetic only", "synthetic_real": "Synthetic then real"}


@dataclass
class FewShotStudy:
    """Settings x generators x seeds on one nnU-Net dataset; every finished run is reused.

    ``synthetic_cases``: size of an offline cache built once per generator (``None``: on-the-fly
    producer). ``parallel``: trainings at once (each uses one torch thread with the CPU recipe).
    """

    workdir: Path
    dataset_dir: Path                       # $nnUNet_raw/Dataset<ID>_<Name> with imagesTs/labelsTs
    lesion_types: tuple[str, ...]
    bundle: Path | None = None
    generators: tuple[str, ...] = ("lesiondiffusion", "rule_based", "lesiondiffusion_notext")
    settings: tuple[str, ...] = ("real", "synthetic", "synthetic_real")
    seeds: tuple[int, ...] = (0, 1, 2)
    configuration: str = "2d"
    trainer_suffix: str = "_fewshotcpu"
    synthetic_cases: int | None = 200
    ddim_steps: int = 10
    pretrain_fraction: float = 0.5
    synthetic_probability: float = 0.5      # during pretraining
    finetune_synthetic_probability: float = 0.0
    hu_correction: str | None = None        # passed to the generator options when set
    parallel: int = 2
    device: str = "cpu"
    progress: bool = True
    env: dict[str, str] | None = None
    echo: Callable[[str], Any] = log.info
    extra_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.dataset_dir = Path(self.dataset_dir)
        for g in self.generators:
            if g not in GENERATORS:
                raise LesionDiffusionError(f"Unknown generator {g!r}; choose from {', '.join(GENERATORS)}.")
        for s in self.settings:
            if s not in SETTING_TRAINERS:
                raise LesionDiffusionError(f"Unknown setting {s!r}; choose from {', '.join(SETTING_TRAINERS)}.")
        if any(GENERATORS[g]["backend"] == "lesiondiffusion" for g in self.generators) and self.bundle is None:
            raise LesionDiffusionError("FewShotStudy: the lesiondiffusion generators need a bundle (bundle=...).")

    # -- environment and configuration -------------------------------------------------------
    def base_env(self) -> dict[str, str]:
        env = dict(self.env if self.env is not None else os.environ)
        env.setdefault("nnUNet_raw", str(self.dataset_dir.parent))
        env.setdefault("nnUNet_preprocessed", str(self.workdir / "nnUNet_preprocessed"))
        env["nnUNet_compile"] = "false"
        env.setdefault("nnUNet_n_proc_DA", "1")
        env.setdefault("nnUNet_def_n_proc", "1")
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def results_root(self, generator: str | None, seed: int) -> Path:
        return self.workdir / "nnUNet_results" / (generator or "real") / f"seed{seed}"

    def cache_dir(self, generator: str) -> Path:
        return self.workdir / "caches" / generator

    def write_config(self, generator: str, seed: int) -> Path:
        gen = json.loads(json.dumps(GENERATORS[generator]))
        if gen["backend"] == "lesiondiffusion":
            gen["bundle"] = str(Path(self.bundle).resolve())
            gen["device"] = self.device
            gen.setdefault("options", {})["ddim_steps"] = self.ddim_steps
        if self.hu_correction is not None and gen["backend"] == "lesiondiffusion":
            gen["hu_correction"] = self.hu_correction
        cfg: dict[str, Any] = {
            "generator": gen,
            "catalogs": [{"name": t, "weight": 1.0, "label": t} for t in self.lesion_types],
            "templates": {"dataset_healthy": True},
            "mode": "offline" if self.synthetic_cases else "online",
            "seed": int(seed),
            "synthetic_probability": self.synthetic_probability,
            "schedule": {"pretrain_fraction": self.pretrain_fraction,
                         "finetune_synthetic_probability": self.finetune_synthetic_probability},
        }
        if self.synthetic_cases:
            cfg["offline"] = {"cache_dir": str(self.cache_dir(generator))}
        cfg.update(self.extra_config)
        path = self.workdir / "configs" / f"{generator}_seed{seed}.yaml"
        write_yaml(path, cfg)
        return path

    # -- stages ------------------------------------------------------------------------------
    def preprocess(self, env: dict[str, str]) -> None:
        from .evaluation.nnunet_runner import nnunet_executable, run_logged

        ds_id = str(int(self.dataset_dir.name[len("Dataset"):len("Dataset") + 3]))
        pre = Path(env["nnUNet_preprocessed"]) / self.dataset_dir.name
        if (pre / "nnUNetPlans.json").exists() and any(pre.glob(f"nnUNetPlans_{self.configuration}*")):
            return
        run_logged([nnunet_executable("nnUNetv2_plan_and_preprocess"), "-d", ds_id, "-c", self.configuration,
                    "-np", "1", "-npfp", "1", "--verify_dataset_integrity"],
                   self.workdir / "logs" / "plan_and_preprocess.log", env, progress=False, echo=self.echo)

    def build_cache(self, generator: str, env: dict[str, str]) -> None:
        import shutil

        from .evaluation.nnunet_runner import run_logged

        n = int(self.synthetic_cases or 0)
        if n <= 0:
            return
        # always called: the build is resumable (a complete cache returns at once) and refuses a cache made
        # with another generator or bundle, naming what changed
        exe = shutil.which("lesiondiffusion") or "lesiondiffusion"
        ds_id = str(int(self.dataset_dir.name[len("Dataset"):len("Dataset") + 3]))
        run_logged([exe, "cache", "build", "--config", str(self.write_config(generator, 0)), "--dataset", ds_id,
                    "--configuration", self.configuration, "-n", str(n), "--quiet"],
                   self.workdir / "logs" / f"cache_{generator}.log", env, progress=False, echo=self.echo)

    def jobs(self) -> list[tuple[str, str | None, int]]:
        out: list[tuple[str, str | None, int]] = []
        for seed in self.seeds:
            for setting in self.settings:
                for g in ([None] if setting == "real" else list(self.generators)):
                    out.append((setting, g, seed))
        return out

    def run_one(self, setting: str, generator: str | None, seed: int, env: dict[str, str]) -> dict[str, Any]:
        from .evaluation import SegmentationStudy

        env = dict(env, nnUNet_results=str(self.results_root(generator, seed)),
                   LESIONDIFFUSION_TRAIN_SEED=str(seed))
        config = self.write_config(generator, seed) if generator else None
        study = SegmentationStudy(
            dataset=self.dataset_dir.name, out_dir=self.workdir / "runs" / (generator or "real") / f"seed{seed}",
            settings=(setting,), configuration=self.configuration, fold="all",
            trainers={setting: SETTING_TRAINERS[setting] + self.trainer_suffix}, device=self.device,
            config=config, plan=False, progress=False, env=env, echo=lambda m: None)
        row = study.run()["rows"][setting]
        return {"setting": setting, "generator": generator or "-", "seed": seed, **row}

    def run(self) -> dict[str, Any]:
        env = self.base_env()
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.echo(f"  preprocessing {self.dataset_dir.name} ({self.configuration})")
        self.preprocess(env)
        synth_gens = [g for g in self.generators if any(s != "real" for s in self.settings)]
        if self.synthetic_cases and synth_gens:
            # one cache build per generator, side by side (each is one single-threaded process)
            with ThreadPoolExecutor(max_workers=max(1, self.parallel)) as pool:
                for g in synth_gens:
                    self.echo(f"  offline cache: {self.synthetic_cases} synthetic cases from {g}")
                for fut in [pool.submit(self.build_cache, g, env) for g in synth_gens]:
                    fut.result()
        jobs = self.jobs()
        rows: list[dict[str, Any]] = []
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="nnU-Net runs", unit="run", disable=not self.progress)
        with ThreadPoolExecutor(max_workers=max(1, self.parallel)) as pool:
            futures = {pool.submit(self.run_one, s, g, seed, env): (s, g, seed) for s, g, seed in jobs}
            for fut in futures:
                s, g, seed = futures[fut]
                row = fut.result()
                rows.append(row)
                bar.update(1)
                self.echo(f"  {SETTING_NAMES[s]:<20} {g or '-':<24} seed {seed}: "
                          + ", ".join(f"{t} {v:.3f}" for t, v in row["dice"].items()))
        bar.close()
        return self.write_results(rows)

    # -- results -----------------------------------------------------------------------------
    def summarise(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Mean +- sd over seeds of each run's mean test Dice, per setting, generator and lesion type."""
        out = []
        keys = list(dict.fromkeys((r["setting"], r["generator"]) for r in rows))
        for setting, gen in keys:
            runs = [r for r in rows if r["setting"] == setting and r["generator"] == gen]
            entry: dict[str, Any] = {"setting": SETTING_NAMES[setting], "generator": gen, "seeds": len(runs)}
            for t in self.lesion_types:
                vals = np.asarray([r["dice"].get(t, math.nan) for r in runs], float)
                entry[f"{t}_mean"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan
                entry[f"{t}_sd"] = float(np.nanstd(vals, ddof=1)) if np.isfinite(vals).sum() > 1 else math.nan
                entry[f"{t}_runs"] = [round(float(v), 4) for v in vals]
            out.append(entry)
        return out

    def write_results(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        summary = self.summarise(rows)
        per_case = []
        for r in rows:
            for c in r["per_case"]:
                for lab, d in c["dice"].items():
                    per_case.append({"setting": r["setting"], "generator": r["generator"], "seed": r["seed"],
                                     "case": c["case"], "label": lab, "dice": d})
        csv_path, md_path, png_path = (self.workdir / "fewshot_dice.csv", self.workdir / "fewshot_dice.md",
                                       self.workdir / "fewshot_dice.png")
        write_csv(csv_path, [{k: v for k, v in e.items() if not k.endswith("_runs")} for e in summary])
        write_csv(self.workdir / "fewshot_per_case.csv", per_case)
        atomic_write_text(md_path, format_fewshot_markdown(summary, self.lesion_types))
        plot_fewshot(summary, self.lesion_types, png_path)
        write_json(self.workdir / "fewshot_runs.json", rows)
        return {"rows": rows, "summary": summary, "csv": csv_path, "markdown": md_path, "png": png_path}


def format_fewshot_markdown(summary: list[dict[str, Any]], types: tuple[str, ...] | list[str]) -> str:
    head = "| Training data | Generator | seeds | " + " | ".join(t.replace("_", " ") for t in types) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(types)]
    for e in summary:
        cells = []
        for t in types:
            m, sd = e[f"{t}_mean"], e[f"{t}_sd"]
            cells.append("n/a" if math.isnan(m) else f"{100 * m:.1f}" + ("" if math.isnan(sd) else f" ± {100 * sd:.1f}"))
        lines.append(f"| {e['setting']} | {e['generator']} | {e['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        "\n\nDice in %: mean ± sd over seeds of each run's mean test Dice (nnU-Net's metric code; a case "
        "without the lesion type in reference and prediction is skipped).\n")


def plot_fewshot(summary: list[dict[str, Any]], types: tuple[str, ...] | list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{e['setting']}\n{e['generator']}" if e["generator"] != "-" else e["setting"] for e in summary]
    x = np.arange(len(summary))
    width = 0.8 / max(1, len(types))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(summary)), 4.0))
    for i, t in enumerate(types):
        means = [100 * e[f"{t}_mean"] for e in summary]
        sds = [0.0 if math.isnan(e[f"{t}_sd"]) else 100 * e[f"{t}_sd"] for e in summary]
        ax.bar(x + (i - (len(types) - 1) / 2) * width, means, width, yerr=sds, capsize=3, label=t.replace("_", " "))
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("test Dice (%)")
    ax.set_title("nnU-Net test Dice, mean ± sd over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


__all__ = ["FewShotData", "FewShotStudy", "GENERATORS", "write_fewshot_dataset", "format_fewshot_markdown",
           "plot_fewshot"]
