"""The segmentation study: nnU-Net trained in the method's settings (real only, synthetic only,
synthetic then real), predicted on held-out cases and scored with nnU-Net's Dice; Markdown/CSV table."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import LesionDiffusionError
from ..io import atomic_write_text, write_csv, write_json
from . import nnunet_runner as runner
from .metrics import dice_on_folders

log = logging.getLogger(__name__)

# setting -> (table row name, base trainer class); a suffix such as "_5epochs" selects short variants
SETTINGS: dict[str, tuple[str, str]] = {
    "real": ("Real only", "nnUNetTrainer"),
    "synthetic": ("Synthetic only", "nnUNetTrainerLesionDiffusionSynthOnly"),
    "synthetic_real": ("Synthetic then real", "nnUNetTrainerLesionDiffusion"),
}


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
    echo: Callable[[str], Any] = log.info   # the CLI passes print

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        for s in self.settings:
            if s not in SETTINGS:
                raise LesionDiffusionError(
                    f"Unknown setting {s!r}; choose from {', '.join(SETTINGS)} (comma-separated)."
                )

    def environment(self) -> dict[str, str]:
        return runner.nnunet_environment(self.env, self.config)

    def trainer(self, setting: str) -> str:
        return self.trainers.get(setting) or SETTINGS[setting][1] + self.trainer_suffix

    def fold_dir(self, env: dict[str, str], setting: str) -> Path:
        ds = runner.dataset_folder(env["nnUNet_raw"], self.dataset).name
        return (Path(env["nnUNet_results"]) / ds / f"{self.trainer(setting)}__{self.plans}__{self.configuration}"
                / f"fold_{self.fold}")

    def run(self) -> dict[str, Any]:
        env = self.environment()
        ds_dir = runner.dataset_folder(env["nnUNet_raw"], self.dataset)
        ds_id = runner.dataset_id(ds_dir)
        labels = runner.dataset_labels(ds_dir)
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
            runner.plan_and_preprocess(ds_id, [self.configuration], env, logs / "plan_and_preprocess.log",
                                       plans=self.plans, progress=self.progress, echo=self.echo)
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
        runner.train(ds_id, self.configuration, self.fold, trainer, env, logs / f"train_{setting}.log",
                     fold_dir=fold_dir, plans=self.plans, device=self.device, progress=self.progress, echo=self.echo)
        pred = self.out_dir / "predictions" / setting
        runner.predict(ds_id, self.configuration, self.fold, trainer, test_images, pred, env,
                       logs / f"predict_{setting}.log", plans=self.plans, device=self.device,
                       progress=self.progress, echo=self.echo)
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
        write_csv(csv_path, table_rows)
        atomic_write_text(md_path, format_dice_markdown(table_rows, types))
        return {"csv": csv_path, "markdown": md_path, "table": table_rows}


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
