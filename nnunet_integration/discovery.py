"""How nnU-Net finds the LesionDiffusion trainers: the installed ``ext_trainers/`` folder that
``nnUNet_extTrainer`` lists (nnunetv2 >= 2.8). Light on purpose (no torch/nnU-Net import): the CLI and
the evaluation runner use it to build environments for nnU-Net subprocesses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

ENV_VAR = "nnUNet_extTrainer"


def ext_trainer_dir() -> Path:
    """The installed folder of trainer modules that ``nnUNet_extTrainer`` must list."""
    return Path(__file__).resolve().parent / "ext_trainers"


def ext_trainer_value(current: str | None = None) -> str:
    """``nnUNet_extTrainer`` with our folder appended once; folders already listed keep their place
    (and so their precedence: nnU-Net takes the first class of a name it finds)."""
    ours = str(ext_trainer_dir())
    parts = [p for p in (current or "").split(os.pathsep) if p and p != ours]
    return os.pathsep.join([*parts, ours])


def with_ext_trainer(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default: this process's environment) in which nnU-Net finds our trainers."""
    out = dict(os.environ if env is None else env)
    out[ENV_VAR] = ext_trainer_value(out.get(ENV_VAR))
    return out
