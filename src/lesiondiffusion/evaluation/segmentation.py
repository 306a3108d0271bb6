"""The segmentation study (the method's Table 1 / Table 2 protocol on any nnU-Net dataset).

Settings: real only, synthetic only, synthetic pretraining then real fine-tuning. Each synthetic
setting runs per generator (``lesiondiffusion``, ``rule_based``, ``lesiondiffusion_notext`` = null
prompts for both networks; ``no_lesion``, asked for by name, is the control whose synthetic cases carry no
new lesion) and per source (an offline cache of N synthetic cases, or on-the-fly),
and every run per seed. A run is nnU-Net's own train and predict commands in its own results folder
(so runs sharing a trainer class stay independent, also when ``parallel`` of them run at once), scored
per case with nnU-Net's Dice; the table gives mean ± sd over seeds per lesion type. Finished runs are
reused; an interrupted training resumes. ``fewshot.FewShotStudy`` is a preset of this protocol.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np
from tqdm.auto import tqdm

from ..errors import LesionDiffusionError
from ..generator import WEIGHT_FREE_BACKENDS
from ..io import atomic_path, atomic_write_text, write_csv, write_json, write_yaml
from ..safeyaml import read_yaml
from . import nnunet_runner as runner
from .metrics import dice_on_folders

log = logging.getLogger(__name__)
T = TypeVar("T")

# setting -> (table name, base trainer class); a suffix such as "_5epochs" selects a variant of all three
SETTINGS: dict[str, tuple[str, str]] = {
    "real": ("Real only", "nnUNetTrainer"),
    "synthetic": ("Synthetic only", "nnUNetTrainerLesionDiffusionSynthOnly"),
    "synthetic_real": ("Synthetic then real", "nnUNetTrainerLesionDiffusion"),
}
# generator name -> the lesiondiffusion.yaml ``generator`` keys it sets (bundle/device/options come from
# the study's base config)
GENERATORS: dict[str, dict[str, Any]] = {
    "lesiondiffusion": {"backend": "lesiondiffusion"},
    "rule_based": {"backend": "rule_based"},
    "lesiondiffusion_notext": {"backend": "lesiondiffusion", "text_conditioning": False},
    # the control: same schedule and crops as rule_based, nothing inpainted (what the lesions themselves add)
    "no_lesion": {"backend": "no_lesion"},
}
# what a study runs when it is not told: the generators of the method's tables (the control is opt-in)
DEFAULT_GENERATORS = ("lesiondiffusion", "rule_based", "lesiondiffusion_notext")
SOURCES = ("offline", "online")   # offline: a cache of ``synthetic_cases`` built once per generator


def _preprocessed(pre: Path, plans: str, configuration: str) -> bool:
    """Whether ``pre`` holds the plans and the preprocessed data of ``configuration``."""
    path = pre / f"{plans}.json"
    if not path.is_file():
        return False
    configs = json.loads(path.read_text()).get("configurations", {})
    name, seen = configuration, set()
    while name in configs and name not in seen:  # a configuration may use the data of the one it inherits from
        seen.add(name)
        ident = configs[name].get("data_identifier")
        if ident:
            return (pre / ident).is_dir()
        name = configs[name].get("inherits_from")
    return False


@dataclass
class _Study:
    """What every run of one ``SegmentationProtocol.run`` call shares."""

    env: dict[str, str]
    ds_id: str
    ds_name: str
    labels: dict[int, str]
    test_images: Path
    test_labels: Path
    logs: Path
    base: dict[str, Any]


@dataclass(frozen=True)
class Run:
    """One nnU-Net training: a setting, for synthetic settings a generator and source, and a seed."""

    setting: str
    generator: str | None
    source: str | None
    seed: int

    @property
    def group(self) -> str:
        return self.setting if self.generator is None else f"{self.setting}__{self.generator}__{self.source}"

    @property
    def key(self) -> str:
        return f"{self.group}__seed{self.seed}"


@dataclass
class StudyResult:
    """``rows``: one per setting/generator/source with mean and sd over seeds per lesion type (Dice 0..1);
    ``runs``: one per training with its per-type Dice; ``per_case``: one per run, test case and label."""

    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    per_case: list[dict[str, Any]]
    lesion_types: list[str]
    paths: dict[str, Path]


def parse_seeds(text: str | int | Sequence[int]) -> tuple[int, ...]:
    """``3`` -> (0, 1, 2); ``"0,4,7"`` -> (0, 4, 7)."""
    if isinstance(text, int):
        return tuple(range(text))
    if not isinstance(text, str):
        return tuple(int(s) for s in text)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise LesionDiffusionError(f"--seeds {text!r}: give a count (3) or a comma-separated list (0,1,2).") from None
    if len(parts) == 1 and "," not in text:
        if vals[0] < 1:
            raise LesionDiffusionError(f"--seeds {text!r}: give at least 1 seed.")
        return tuple(range(vals[0]))
    if len(set(vals)) != len(vals):
        raise LesionDiffusionError(f"--seeds {text!r}: seeds repeat; each seed is one independent run.")
    return tuple(vals)


@dataclass
class SegmentationProtocol:
    """The protocol as data; ``run()`` does it. See ``run_segmentation_study`` for the arguments."""

    dataset: str
    out_dir: Path
    settings: Sequence[str] = tuple(SETTINGS)
    generators: Sequence[str] = DEFAULT_GENERATORS
    sources: Sequence[str] = SOURCES
    synthetic_cases: int = 1000
    seeds: Sequence[int] = (0, 1, 2)
    configuration: str = "3d_fullres"
    fold: str = "all"
    plans: str = "nnUNetPlans"
    trainer_suffix: str = ""
    trainers: dict[str, str] = field(default_factory=dict)   # explicit per-setting trainer names
    config: Path | Mapping[str, Any] | None = None   # base lesiondiffusion.yaml (catalogs, store, bundle ...)
    bundle: Path | None = None       # overrides generator.bundle of the base config
    test_images: Path | None = None
    test_labels: Path | None = None
    device: str = "cpu"
    parallel: int = 1                # nnU-Net runs (and cache builds) at once
    plan: bool = True                # run nnUNetv2_plan_and_preprocess when the plans are missing
    progress: bool = True
    env: Mapping[str, str] | None = None
    echo: Callable[[str], Any] = log.info   # the CLI passes print

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.settings, self.generators, self.sources = tuple(self.settings), tuple(self.generators), tuple(self.sources)
        self.seeds = parse_seeds(self.seeds) if isinstance(self.seeds, (int, str)) else tuple(self.seeds)
        for values, known, what in ((self.settings, SETTINGS, "setting"), (self.generators, GENERATORS, "generator"),
                                    (self.sources, SOURCES, "synthetic source")):
            bad = [v for v in values if v not in known]
            if bad or not values:
                raise LesionDiffusionError(f"Unknown or no {what} {bad or values!r}; choose from {', '.join(known)} "
                                           "(comma-separated).")
        if not self.seeds:
            raise LesionDiffusionError("No seeds: give at least one (e.g. --seeds 3).")
        if "offline" in self.sources and self.synthetic_cases < 1:
            raise LesionDiffusionError(f"--synthetic-cases {self.synthetic_cases}: the offline cache needs >= 1 case.")
        if self.parallel < 1:
            raise LesionDiffusionError(f"--parallel {self.parallel}: give the number of runs at once (>= 1).")
        unknown = sorted(set(self.trainers) - set(SETTINGS))
        if unknown:
            raise LesionDiffusionError(f"trainers: unknown setting(s) {unknown}; keys are {', '.join(SETTINGS)}.")

    # -- what runs ------------------------------------------------------------------------------
    def runs(self) -> list[Run]:
        out = []
        for setting in self.settings:
            if setting == "real":
                out += [Run(setting, None, None, s) for s in self.seeds]
                continue
            for g in self.generators:
                for src in self.sources:
                    out += [Run(setting, g, src, s) for s in self.seeds]
        return out

    def trainer(self, setting: str) -> str:
        return self.trainers.get(setting) or SETTINGS[setting][1] + self.trainer_suffix

    def label(self, run: Run) -> str:
        name = SETTINGS[run.setting][0]
        if run.generator is None:
            return name
        src = f"offline {self.synthetic_cases}" if run.source == "offline" else "on-the-fly"
        return f"{name} · {run.generator} · {src}"

    def head(self, run: Run) -> str:
        runs = self.runs()
        return f"[{runs.index(run) + 1}/{len(runs)}] {self.label(run)}, seed {run.seed}"

    def run_dir(self, run: Run) -> Path:
        return self.out_dir / "runs" / run.key

    def fold_dir(self, run: Run, dataset_name: str) -> Path:
        return (self.run_dir(run) / "nnUNet_results" / dataset_name
                / f"{self.trainer(run.setting)}__{self.plans}__{self.configuration}" / f"fold_{self.fold}")

    # -- configuration of the LesionDiffusion trainers ------------------------------------------
    def base_config(self, labels: dict[int, str]) -> dict[str, Any]:
        if self.config is None:
            raw: dict[str, Any] = {}
        elif isinstance(self.config, Mapping):
            raw = json.loads(json.dumps(dict(self.config)))
        else:
            path = Path(self.config)
            if not path.is_file():
                raise LesionDiffusionError(f"Config file {path} does not exist; pass the lesiondiffusion.yaml path.")

            raw = read_yaml(path, "configuration", LesionDiffusionError) or {}
            if not isinstance(raw, dict):
                raise LesionDiffusionError(f"{path}: expected a YAML mapping (a lesiondiffusion.yaml).")
        # the dataset's label names as lesion types (catalog names); healthy training cases as templates
        raw.setdefault("catalogs", [{"name": n, "label": n} for _, n in sorted(labels.items())])
        raw.setdefault("templates", {"dataset_healthy": True})
        raw.setdefault("generator", {})
        if self.bundle is not None:
            raw["generator"]["bundle"] = str(Path(self.bundle).resolve())
        raw["generator"].setdefault("device", self.device)
        return raw

    def generator_config(self, base: dict[str, Any], generator: str, seed: int) -> dict[str, Any]:
        cfg = json.loads(json.dumps(base))
        g = {k: v for k, v in cfg["generator"].items() if k not in ("backend", "text_conditioning")}
        if GENERATORS[generator]["backend"] in WEIGHT_FREE_BACKENDS:
            g = {"device": g.get("device", self.device)}  # bundle and diffusion options do not apply
        elif not g.get("bundle"):
            raise LesionDiffusionError(
                f"Generator {generator!r} needs a model bundle: pass --bundle DIR (or set generator.bundle in the "
                "--config YAML), or leave it out with --generators rule_based.")
        else:
            from ..pipeline import SynthesisConfig

            # written out, so a cache or run made under an earlier default (shift) never passes for today's
            g.setdefault("hu_correction", SynthesisConfig.hu_correction)
        cfg["generator"] = {**g, **GENERATORS[generator]}
        cfg["seed"] = int(seed)
        return cfg

    def cache_dir(self, base: dict[str, Any], generator: str) -> Path:
        """One cache per generator, size and everything that decides its cases, so a changed option (HU
        correction, DDIM steps, catalogs ...) builds a new cache instead of training on a stale one.
        ``cache build`` itself refuses a folder whose bundle content changed."""
        cfg = self.generator_config(base, generator, int(base.get("seed", 0)))
        what = {"generator": {k: v for k, v in cfg["generator"].items() if k != "device"},
                "catalogs": cfg.get("catalogs"), "templates": cfg.get("templates"), "seed": cfg["seed"],
                "context_margin": (cfg.get("store") or {}).get("context_margin", 0),
                "configuration": self.configuration, "plans": self.plans}
        digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]
        return self.out_dir / "caches" / f"{generator}__n{self.synthetic_cases}__{digest}"

    def run_config(self, base: dict[str, Any], run: Run) -> dict[str, Any] | None:
        """The lesiondiffusion.yaml of a synthetic run; None for real only."""
        if run.generator is None:
            return None
        cfg = self.generator_config(base, run.generator, run.seed)
        if run.source == "offline":
            cfg.update({"mode": "offline", "offline": {"cache_dir": str(self.cache_dir(base, run.generator))}})
        else:
            cfg["mode"] = "online"
        return cfg

    def identity(self, run: Run, cfg: dict[str, Any] | None) -> dict[str, Any]:
        """Everything that makes a run's result; a finished run is reused only if it matches."""
        return json.loads(json.dumps({
            "trainer": self.trainer(run.setting), "fold": self.fold, "configuration": self.configuration,
            "plans": self.plans, "synthetic_cases": self.synthetic_cases if run.source == "offline" else None,
            "train_seed": run.seed, "config": cfg}))

    # -- the study ------------------------------------------------------------------------------
    def run(self) -> StudyResult:
        study = self.prepare(runner.nnunet_environment(self.env))
        runs = self.runs()
        self.echo(f"segmentation study: {len(runs)} nnU-Net runs ({len(self.seeds)} seed(s), {self.parallel} at a "
                  f"time) on {study.ds_name}, configuration {self.configuration}, fold {self.fold}; "
                  f"outputs in {self.out_dir}")
        done = {r: self.finished(study, r) for r in runs}
        todo = [r for r in runs if done[r] is None]
        caches = list(dict.fromkeys(r.generator for r in todo if r.source == "offline"))
        self.each(caches, lambda g: self._build_cache(study, g), what="offline cache builds",
                  name=lambda g: f"offline cache for {g}", log_of=lambda g: self._cache_log(study, g))
        bar = tqdm(total=len(todo), desc="nnU-Net runs", unit="run", disable=not self.progress or self.parallel == 1)
        fresh = self.each(todo, lambda r: self._train_and_score(study, r, bar), what="nnU-Net runs",
                          name=self.head, log_of=lambda r: study.logs / f"train_{r.key}.log")
        bar.close()
        done.update(zip(todo, fresh))
        return self.write_tables([done[r] for r in runs], study.labels)

    def prepare(self, env: dict[str, str]) -> _Study:
        """Resolve the dataset and its test set; plan and preprocess if needed."""
        ds_dir = runner.dataset_folder(env["nnUNet_raw"], self.dataset)
        ds_id = runner.dataset_id(ds_dir)
        labels = runner.dataset_labels(ds_dir)
        test_images = Path(self.test_images or ds_dir / "imagesTs")
        test_labels = Path(self.test_labels or ds_dir / "labelsTs")
        for p, what in ((test_images, "images"), (test_labels, "labels")):
            if not p.is_dir() or not any(p.iterdir()):
                raise LesionDiffusionError(
                    f"Test {what} folder {p} is missing or empty. Put held-out cases in the dataset's "
                    "imagesTs/labelsTs (nnU-Net layout) or pass --test-images/--test-labels.")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        logs = self.out_dir / "logs"
        pre = Path(env["nnUNet_preprocessed"]) / ds_dir.name
        if not _preprocessed(pre, self.plans, self.configuration):
            if not self.plan:
                raise LesionDiffusionError(
                    f"No {self.configuration} data for plans {pre / (self.plans + '.json')}; run "
                    f"nnUNetv2_plan_and_preprocess -d {ds_id} -c {self.configuration} first.")
            runner.plan_and_preprocess(ds_id, [self.configuration], env, logs / "plan_and_preprocess.log",
                                       plans=self.plans, progress=self.progress, echo=self.echo)
        base = self.base_config(labels) if any(s != "real" for s in self.settings) else {}
        return _Study(env, ds_id, ds_dir.name, labels, test_images, test_labels, logs, base)

    def each(self, items: list[Any], work: Callable[[Any], T], *, what: str, name: Callable[[Any], str],
             log_of: Callable[[Any], Path]) -> list[T]:
        """``work`` on every item, ``parallel`` at a time; results in the items' order. After a failure
        nothing new starts, what runs finishes (and is kept for reuse), and every failure is raised
        together with its log."""
        results: dict[int, T] = {}
        failed: list[tuple[int, BaseException]] = []
        with ThreadPoolExecutor(max_workers=max(1, min(self.parallel, len(items)))) as pool:
            futures = {pool.submit(work, item): i for i, item in enumerate(items)}
            try:
                for fut in as_completed(futures):
                    if fut.cancelled():
                        continue
                    if fut.exception() is None:
                        results[futures[fut]] = fut.result()
                        continue
                    failed.append((futures[fut], fut.exception()))
                    for f in futures:
                        f.cancel()
            except BaseException:  # Ctrl-C: start nothing new (the running commands get the signal too)
                for f in futures:
                    f.cancel()
                raise
        if failed:
            failed.sort(key=lambda x: x[0])
            lines = []
            for i, exc in failed:
                log_path = str(log_of(items[i]))
                lines.append(f"{name(items[i])}: {exc}" + ("" if log_path in str(exc) else f" (log: {log_path})"))
            skipped = len(items) - len(results) - len(failed)
            raise LesionDiffusionError(
                f"{len(failed)} of {len(items)} {what} failed" + (f" ({skipped} not started)" if skipped else "")
                + "; finished ones are kept and reused when the study is run again:\n- " + "\n- ".join(lines)
            ) from failed[0][1]
        return [results[i] for i in range(len(items))]

    def finished(self, study: _Study, run: Run) -> dict[str, Any] | None:
        marker = self.run_dir(run) / "result.json"
        if marker.exists():
            prev = json.loads(marker.read_text())
            if prev.get("identity") == self.identity(run, self.run_config(study.base, run)):
                self.echo(f"{self.head(run)}: reusing {marker}")
                return prev
        return None

    def _cache_log(self, study: _Study, generator: str) -> Path:
        return study.logs / f"cache_{self.cache_dir(study.base, generator).name}.log"

    def _build_cache(self, study: _Study, generator: str) -> Path:
        cache = self.cache_dir(study.base, generator)
        cfg = self.generator_config(study.base, generator, int(study.base.get("seed", 0)))
        cfg.update({"mode": "offline", "offline": {"cache_dir": str(cache)}})
        cfg_path = cache.parent / f"{cache.name}.yaml"
        write_yaml(cfg_path, cfg)
        self.echo(f"  offline cache for {generator}: {self.synthetic_cases} synthetic cases -> {cache}")
        # `lesiondiffusion cache build` in its own process, like the nnU-Net commands: it reads the plans
        # through nnU-Net's environment variables, returns at once for a finished cache, resumes an
        # interrupted one and refuses one made by another bundle. Templates come from every training case
        # (--fold all): they are healthy cases, and the study scores on a separate test set.
        runner.run_logged([sys.executable, "-m", "lesiondiffusion", "cache", "build", "--config", str(cfg_path),
                           "--dataset", study.ds_id, "-n", str(self.synthetic_cases), "-c", self.configuration,
                           "--plans", self.plans, "--fold", "all", "-q"],
                          self._cache_log(study, generator), study.env, progress=False, echo=self.echo)
        return cache

    def _train_and_score(self, study: _Study, run: Run, bar: Any) -> dict[str, Any]:
        trainer = self.trainer(run.setting)
        rdir = self.run_dir(run)
        cfg = self.run_config(study.base, run)
        self.echo(f"{self.head(run)}: {trainer}")
        # the CPU recipes seed network init and sampling from LESIONDIFFUSION_TRAIN_SEED
        run_env = dict(study.env, nnUNet_results=str(rdir / "nnUNet_results"), LESIONDIFFUSION_TRAIN_SEED=str(run.seed))
        if cfg is not None:
            cfg_path = rdir / "lesiondiffusion.yaml"
            write_yaml(cfg_path, cfg)
            run_env["LESIONDIFFUSION_CONFIG"] = str(cfg_path)
        fold_dir = self.fold_dir(run, study.ds_name)
        # epoch bars only for one run at a time: bars of parallel runs would overwrite each other
        bars = self.progress and self.parallel == 1
        runner.train(study.ds_id, self.configuration, self.fold, trainer, run_env, study.logs / f"train_{run.key}.log",
                     fold_dir=fold_dir, plans=self.plans, device=self.device, progress=bars, echo=self.echo)
        pred = rdir / "predictions"
        runner.predict(study.ds_id, self.configuration, self.fold, trainer, study.test_images, pred, run_env,
                       study.logs / f"predict_{run.key}.log", plans=self.plans, device=self.device,
                       progress=bars, echo=self.echo)
        labels = study.labels
        scores = dice_on_folders(study.test_labels, pred, sorted(labels))
        result = {"key": run.key, "group": run.group, "setting": run.setting, "generator": run.generator,
                  "source": run.source, "seed": run.seed, "label": self.label(run), "trainer": trainer,
                  "identity": self.identity(run, cfg), "fold_dir": str(fold_dir), "predictions": str(pred),
                  "dice": {labels[k]: v for k, v in scores["mean"].items()},
                  "per_case": [{"case": c["case"], "dice": {labels[k]: v for k, v in c["dice"].items()},
                                "n_ref": {labels[k]: v for k, v in c["n_ref"].items()}} for c in scores["per_case"]]}
        write_json(rdir / "result.json", result)
        self.echo(f"{self.head(run)}: Dice " + ", ".join(f"{t} {v:.3f}" for t, v in result["dice"].items()))
        bar.update(1)
        return result

    # -- tables -----------------------------------------------------------------------------------
    def write_tables(self, results: list[dict[str, Any]], labels: dict[int, str]) -> StudyResult:
        types = [labels[k] for k in sorted(labels)]
        rows = summarize(results, types)
        for r in rows:
            r["label"] = next(x["label"] for x in results if x["group"] == r["group"])
        per_case = [{"run": r["key"], "setting": r["setting"], "generator": r["generator"] or "",
                     "source": r["source"] or "", "seed": r["seed"], "case": c["case"], "lesion_type": t,
                     "voxels_ref": c["n_ref"][t], "dice": c["dice"][t]}
                    for r in results for c in r["per_case"] for t in types]
        paths = {"csv": self.out_dir / "segmentation_dice.csv", "markdown": self.out_dir / "segmentation_dice.md",
                 "png": self.out_dir / "segmentation_dice.png", "per_case": self.out_dir / "segmentation_per_case.csv",
                 "runs": self.out_dir / "segmentation_runs.csv"}
        write_csv(paths["csv"], [{k: v for k, v in r.items() if k != "group"} for r in rows])
        write_csv(paths["per_case"], per_case)
        write_csv(paths["runs"], [{"run": r["key"], "setting": r["setting"], "generator": r["generator"] or "",
                                   "source": r["source"] or "", "seed": r["seed"],
                                   **{t: r["dice"].get(t, float("nan")) for t in types}} for r in results])
        atomic_write_text(paths["markdown"], format_dice_markdown(rows, types, self.describe()))
        plot_dice(rows, types, paths["png"], title=f"nnU-Net Dice on the test set ({len(self.seeds)} seed(s))")
        return StudyResult(rows, results, per_case, types, paths)

    def describe(self) -> str:
        return (f"nnU-Net {self.configuration}, fold {self.fold}, trainers: "
                + ", ".join(f"{s} `{self.trainer(s)}`" for s in self.settings)
                + f"; seeds {', '.join(map(str, self.seeds))}"
                + (f"; offline cache of {self.synthetic_cases} synthetic cases per generator"
                   if "offline" in self.sources and set(self.settings) - {"real"} else ""))


def run_segmentation_study(dataset: str | int, out_dir: str | Path, **options: Any) -> StudyResult:
    """Run the segmentation study and return its rows (see ``StudyResult``).

    ``options`` are the fields of ``SegmentationProtocol``: ``settings`` (subset of ``SETTINGS``),
    ``generators`` (subset of ``GENERATORS``), ``sources`` (``offline``/``online``), ``synthetic_cases``,
    ``seeds`` (a count or a list), ``configuration`` (``2d``, ``3d_fullres`` ...), ``fold`` (default
    ``all``), ``plans``, ``trainer_suffix`` or ``trainers`` ({setting: class name}), ``config`` (a base
    lesiondiffusion.yaml path or dict: catalogs, templates, store, schedule; default: the dataset's
    label names as catalogs), ``bundle``, ``test_images``/``test_labels`` (default the raw dataset's
    imagesTs/labelsTs), ``device``, ``parallel`` (runs at once; offline caches are built first, side by
    side), ``env`` (nnU-Net's three folders; default this process's), ``progress``, ``echo``.
    """
    return SegmentationProtocol(dataset=str(dataset), out_dir=Path(out_dir), **options).run()


def summarize(results: list[dict[str, Any]], types: list[str]) -> list[dict[str, Any]]:
    """Mean and sd over seeds of each run group's per-type Dice (a seed whose type is NaN is left out)."""
    rows = []
    for group in dict.fromkeys(r["group"] for r in results):
        rs = [r for r in results if r["group"] == group]
        row: dict[str, Any] = {"group": group, "setting": SETTINGS[rs[0]["setting"]][0],
                               "generator": rs[0]["generator"] or "", "source": rs[0]["source"] or "",
                               "seeds": len(rs)}
        for t in types + ["mean"]:
            if t == "mean":
                per_seed = [np.nanmean(v) if np.isfinite(v).any() else np.nan
                            for v in ([r["dice"].get(x, np.nan) for x in types] for r in rs)]
            else:
                per_seed = [r["dice"].get(t, np.nan) for r in rs]
            v = np.asarray(per_seed, float)
            v = v[np.isfinite(v)]
            row[f"{t}_mean"] = float(v.mean()) if v.size else float("nan")
            row[f"{t}_sd"] = float(v.std(ddof=1)) if v.size > 1 else float("nan")
        rows.append(row)
    return rows


def format_dice_markdown(rows: list[dict[str, Any]], types: list[str], caption: str = "") -> str:
    """Dice (%) per lesion type, one row per setting/generator/source (the layout of the method's Table 1)."""
    head = ("| Training data | Generator | Synthetic cases | " + " | ".join(t.replace("_", " ") for t in types)
            + " | Mean |")
    sep = "|---|---|---|" + "---:|" * (len(types) + 1)
    lines = [head, sep]
    for r in rows:
        cells = []
        for t in types + ["mean"]:
            m, s = r[f"{t}_mean"], r[f"{t}_sd"]
            cells.append("n/a" if math.isnan(m) else f"{100 * m:.1f}" if math.isnan(s) else
                         f"{100 * m:.1f} ± {100 * s:.1f}")
        src = {"offline": "offline cache", "online": "on-the-fly"}.get(r["source"], "–")
        lines.append(f"| {r['setting']} | {r['generator'] or '–'} | {src} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        "\n\nDice in %, mean ± sd over seeds (sd shown with 2 or more seeds) of each run's mean over test cases; "
        "as in nnU-Net's evaluation, a case where the lesion type is absent from both reference and prediction is "
        "skipped (a false positive counts as 0)." + (f" {caption}." if caption else "") + "\n"
    )


def plot_dice(rows: list[dict[str, Any]], types: list[str], path: str | Path, title: str = "") -> None:
    """Grouped bars: one group per lesion type (and the mean), one bar per row, sd over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = types + ["mean"]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.35 * len(rows) * len(cols)), 4.5))
    x = np.arange(len(cols))
    for i, r in enumerate(rows):
        m = np.array([r[f"{c}_mean"] for c in cols], float)
        s = np.array([r[f"{c}_sd"] for c in cols], float)
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, np.nan_to_num(m), width, yerr=np.where(np.isfinite(s), s, 0),
               capsize=2, label=r.get("label") or r["setting"])
    ax.set_xticks(x)
    ax.set_xticklabels([c.replace("_", " ") for c in cols])
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
