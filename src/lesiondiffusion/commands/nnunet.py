"""``lesiondiffusion nnunet``: make nnU-Net v2 find the LesionDiffusion trainers.

``env`` prints the ``nnUNet_extTrainer`` setting (nnunetv2 >= 2.8 imports the modules of that folder
by name); ``register``/``unregister`` drop or remove a small shim inside nnU-Net's own trainer
folder for older nnunetv2 versions; ``unregister`` only deletes a file whose text is exactly ours.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import LesionDiffusionError
from ..nnunet_integration.discovery import ext_trainer_dir, ext_trainer_value

SHIM_NAME = "lesiondiffusion_shim.py"
SHIM_TEXT = (
    "# written by `lesiondiffusion nnunet register`; remove with `lesiondiffusion nnunet unregister`\n"
    "try:\n"
    "    from lesiondiffusion.nnunet_integration.trainers import *  # noqa: F401,F403\n"
    "    from lesiondiffusion.nnunet_integration.variants import *  # noqa: F401,F403\n"
    "except ImportError: pass  # lesiondiffusion uninstalled: keep nnU-Net working\n"
)
# what earlier versions wrote (no variants module yet); register replaces it, unregister removes it
OLD_SHIM_TEXTS = (
    "# written by `lesiondiffusion nnunet register`; remove with `lesiondiffusion nnunet unregister`\n"
    "try: from lesiondiffusion.nnunet_integration.trainers import *  # noqa: F401,F403\n"
    "except ImportError: pass  # lesiondiffusion uninstalled: keep nnU-Net working\n",
)


def nnunet_trainer_dir() -> Path:
    try:
        import nnunetv2
    except ImportError as exc:
        raise LesionDiffusionError("nnunetv2 is not installed; install it with 'pip install nnunetv2'.") from exc
    return Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"


def register_shim(target_dir: Path) -> Path:
    target = Path(target_dir) / SHIM_NAME
    if target.exists() and target.read_text(encoding="utf-8") not in (SHIM_TEXT, *OLD_SHIM_TEXTS):
        raise LesionDiffusionError(f"{target} exists and was not written by 'lesiondiffusion nnunet register'; it is "
                                   "left untouched. Remove or rename it yourself, then run register again.")
    from ..io import atomic_write_text

    atomic_write_text(target, SHIM_TEXT)
    return target


def unregister_shim(target_dir: Path) -> Path | None:
    target = Path(target_dir) / SHIM_NAME
    if not target.exists():
        return None
    if target.read_text(encoding="utf-8") not in (SHIM_TEXT, *OLD_SHIM_TEXTS):
        raise LesionDiffusionError(f"{target} was changed after 'lesiondiffusion nnunet register' wrote it; it is left "
                                   "untouched. Delete it yourself if it is no longer needed.")
    target.unlink()
    cache = target.parent / "__pycache__"
    for pyc in cache.glob(f"{target.stem}.*.pyc") if cache.is_dir() else []:
        pyc.unlink()
    return target


def _env(args: argparse.Namespace) -> int:
    if args.path:
        print(ext_trainer_dir())
    else:
        print(f"export nnUNet_extTrainer={ext_trainer_value(os.environ.get('nnUNet_extTrainer'))}")
    return 0


def _register(args: argparse.Namespace) -> int:
    path = register_shim(Path(args.target) if args.target else nnunet_trainer_dir())
    print(f"wrote {path}; nnUNetv2_train ... -tr nnUNetTrainerLesionDiffusion now finds the trainers")
    return 0


def _unregister(args: argparse.Namespace) -> int:
    path = unregister_shim(Path(args.target) if args.target else nnunet_trainer_dir())
    print(f"removed {path}" if path else "nothing to remove (no shim written by register)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("nnunet", help="make nnU-Net v2 find the LesionDiffusion trainers")
    sub = p.add_subparsers(dest="nnunet_command", metavar="ACTION")
    sub.required = True
    e = sub.add_parser("env", help="print 'export nnUNet_extTrainer=...' (use: eval \"$(lesiondiffusion nnunet env)\")")
    e.add_argument("--path", action="store_true", help="print only the folder")
    e.set_defaults(func=_env)
    for name, fn, text in (("register", _register, "write a shim into nnU-Net's trainer folder (older nnunetv2)"),
                           ("unregister", _unregister, "remove the shim written by register")):
        r = sub.add_parser(name, help=text)
        r.add_argument("--target", help="trainer folder (default: nnunetv2/training/nnUNetTrainer of this Python)")
        r.set_defaults(func=fn)
