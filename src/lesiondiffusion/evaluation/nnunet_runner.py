"""Runs nnU-Net's own commands as subprocesses: environment checks, plan/preprocess, train,
predict, with the output logged to a file and a progress bar per nnU-Net epoch."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from tqdm.auto import tqdm

from ..errors import LesionDiffusionError

log = logging.getLogger(__name__)

NNUNET_DIRS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
# the module nnU-Net imports from a folder in nnUNet_extTrainer to find the LesionDiffusion trainers
TRAINER_MODULE = "lesiondiffusion_trainers.py"


def nnunet_executable(name: str) -> str:
    """The nnU-Net console script of this Python environment (falls back to PATH)."""
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


def nnunet_environment(env: Mapping[str, str] | None = None, config: str | Path | None = None) -> dict[str, str]:
    """The environment for nnU-Net subprocesses: the three nnU-Net folders must be set; our trainers
    must be findable (the caller puts their folder in ``nnUNet_extTrainer``: the CLI and the demo use
    ``nnunet_integration.discovery.with_ext_trainer``, which this core module does not import);
    ``LESIONDIFFUSION_CONFIG`` points at ``config`` when given; no torch.compile."""
    env = dict(os.environ if env is None else env)
    missing = [k for k in NNUNET_DIRS if not env.get(k)]
    if missing:
        raise LesionDiffusionError(
            f"Environment variable(s) {', '.join(missing)} not set. nnU-Net needs nnUNet_raw, "
            "nnUNet_preprocessed and nnUNet_results pointing at folders (see nnU-Net's "
            "documentation/set_environment_variables.md)."
        )
    folders = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if not any((Path(p) / TRAINER_MODULE).is_file() for p in folders):
        raise LesionDiffusionError(
            f"nnUNet_extTrainer ({os.pathsep.join(folders) or 'not set'}) lists no folder with {TRAINER_MODULE}, so "
            "nnU-Net cannot find the LesionDiffusion trainers. Run `eval \"$(lesiondiffusion nnunet env)\"` "
            "first, or pass env=lesiondiffusion.nnunet_integration.discovery.with_ext_trainer(env)."
        )
    if config is not None:
        cfg = Path(config)
        if not cfg.exists():
            raise LesionDiffusionError(f"Config file {cfg} does not exist; pass the lesiondiffusion.yaml path.")
        env["LESIONDIFFUSION_CONFIG"] = str(cfg.resolve())
    env.setdefault("nnUNet_compile", "false")
    return env


def dataset_folder(raw: str | Path, dataset: str | int) -> Path:
    """``$nnUNet_raw/Dataset<ID>_<Name>`` from an id (``"900"``) or a folder name."""
    raw = Path(raw)
    ds = str(dataset)
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


def dataset_id(folder: Path) -> str:
    return str(int(folder.name[len("Dataset"):len("Dataset") + 3]))


def dataset_labels(folder: Path) -> dict[int, str]:
    """Foreground labels ``{value: name}`` of a raw dataset (integer labels only)."""
    meta = json.loads((folder / "dataset.json").read_text())
    if not all(isinstance(v, int) for v in meta["labels"].values()):
        raise LesionDiffusionError(
            f"{folder / 'dataset.json'}: region-based labels are not supported by this study; "
            "use integer labels (one per lesion type)."
        )
    return {int(v): k for k, v in meta["labels"].items() if int(v) != 0}


def epochs_of(trainer: str) -> int | None:
    """Epoch count a trainer name announces in nnU-Net's style (``..._5epochs``), for progress bars."""
    m = re.search(r"_(\d+)epochs?(?:_|$)", trainer)
    return int(m.group(1)) if m else None


def run_logged(cmd: Sequence[str], log_path: str | Path, env: Mapping[str, str] | None = None, *,
               progress: bool = True, epochs: int | None = None, echo: Callable[[str], Any] = log.info) -> None:
    """Run a command, write its output to ``log_path`` and advance a progress bar per nnU-Net epoch.
    A non-zero exit raises with the last lines of the log."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    echo(f"    $ {' '.join(cmd)}\n      (log: {log_path})")
    bar = tqdm(total=epochs, desc=Path(cmd[0]).name, unit="epoch", disable=not progress or epochs is None)
    tail: list[str] = []
    with open(log_path, "a", encoding="utf-8") as logf:
        logf.write(f"\n$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(list(cmd), env=None if env is None else dict(env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
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


def plan_and_preprocess(ds_id: str, configurations: Sequence[str], env: Mapping[str, str], log_path: Path, *,
                        plans: str = "nnUNetPlans", progress: bool = True,
                        echo: Callable[[str], Any] = log.info) -> None:
    """``nnUNetv2_plan_and_preprocess`` for the configurations whose preprocessed data is missing."""
    # nnU-Net's own process counts unless nnUNet_def_n_proc limits them (small machines)
    n_proc = env.get("nnUNet_def_n_proc")
    procs = ["-np", *([n_proc] * len(configurations)), "-npfp", n_proc] if n_proc else []
    run_logged([nnunet_executable("nnUNetv2_plan_and_preprocess"), "-d", ds_id, "-c", *configurations,
                *procs, "--verify_dataset_integrity"], log_path, env, progress=progress, echo=echo)


def train(ds_id: str, configuration: str, fold: str, trainer: str, env: Mapping[str, str], log_path: Path, *,
          fold_dir: Path, plans: str = "nnUNetPlans", device: str = "cpu", progress: bool = True,
          echo: Callable[[str], Any] = log.info, extra: Sequence[str] = ()) -> None:
    """``nnUNetv2_train`` unless ``fold_dir`` holds a final checkpoint; continues an interrupted run."""
    if (fold_dir / "checkpoint_final.pth").exists():
        return
    cmd = [nnunet_executable("nnUNetv2_train"), ds_id, configuration, fold, "-tr", trainer, "-p", plans,
           "-device", device.split(":")[0], *extra]
    if (fold_dir / "checkpoint_latest.pth").exists():
        cmd.append("--c")  # resume an interrupted training
    run_logged(cmd, log_path, env, progress=progress, epochs=epochs_of(trainer), echo=echo)


def predict(ds_id: str, configuration: str, fold: str, trainer: str, images: Path, out: Path,
            env: Mapping[str, str], log_path: Path, *, plans: str = "nnUNetPlans", device: str = "cpu",
            progress: bool = True, echo: Callable[[str], Any] = log.info, extra: Sequence[str] = ()) -> None:
    """``nnUNetv2_predict`` into a fresh ``out`` (a half-finished prediction folder is never scored)."""
    if out.exists():
        shutil.rmtree(out)
    run_logged([nnunet_executable("nnUNetv2_predict"), "-i", str(images), "-o", str(out), "-d", ds_id,
                "-c", configuration, "-f", fold, "-tr", trainer, "-p", plans, "-device", device.split(":")[0],
                "--disable_tta", "-npp", "1", "-nps", "1", *extra], log_path, env, progress=progress, echo=echo)
