"""``build_generator``: the one place a backend name becomes a ``LesionGenerator``.

Above the backends (``pipeline.LesionSynthesizer``, ``rule_based.RuleBasedGenerator``), which import only
the interface in ``generator``; the sample store, ``cache build`` and ``evaluate alignment`` come here.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import LesionDiffusionError
from .generator import BACKENDS, WEIGHT_FREE_BACKENDS, LesionGenerator
from .rule_based import NoLesionGenerator, RuleBasedGenerator

__all__ = ["BACKENDS", "build_generator"]


def build_generator(backend: str = "lesiondiffusion", *, bundle: str | None = None, device: str = "cpu",
                    options: dict[str, Any] | None = None, text_conditioning: bool = True,
                    hu_correction: str | None = None, source: str = "") -> LesionGenerator:
    """The one place a backend name becomes a generator (the trainer's producer, ``cache build`` and
    ``evaluate alignment`` all come here). ``no_lesion`` is the training control: placed like
    ``rule_based``, nothing inpainted (``rule_based.NoLesionGenerator``). LesionDiffusion is the default and is never silently
    replaced by the baseline. ``options`` are the backend's keyword arguments (for LesionDiffusion:
    ``SynthesisConfig`` fields such as ``ddim_steps``); ``text_conditioning=False`` gives LesionDiffusion
    null prompts for both networks (the text ablation); ``hu_correction`` (off | shift | clip; None: the
    pipeline's default) applies to LesionDiffusion only; ``source`` names the config file for errors."""
    where = f" in {source}" if source else ""
    options = dict(options or {})
    if backend in WEIGHT_FREE_BACKENDS:
        if not text_conditioning:
            raise LesionDiffusionError(f"text_conditioning=False{where}: only the lesiondiffusion backend is "
                                       f"text-conditioned; the {backend} backend reads the report directly.")
        return (RuleBasedGenerator if backend == "rule_based" else NoLesionGenerator)(**options)
    if backend != "lesiondiffusion":
        raise LesionDiffusionError(f"Unknown generator backend {backend!r}{where}; use one of: {', '.join(BACKENDS)}.")
    if not bundle:
        raise LesionDiffusionError(f"The lesiondiffusion backend needs a model bundle folder{where} (generator.bundle "
                                   "or --bundle); the rule_based backend needs none.")
    try:  # torch and MONAI: loaded only when this backend is asked for
        from .pipeline import LesionSynthesizer
    except ImportError as exc:
        raise LesionDiffusionError(f"The LesionDiffusion backend is unavailable ({exc}). Reinstall the package, or use "
                                   f"the rule_based backend{where}.") from exc
    if not text_conditioning:
        options["text_conditioning"] = False
    if hu_correction is not None:
        options["hu_correction"] = hu_correction
    return LesionSynthesizer.from_bundle(os.path.expandvars(str(bundle)), device=device, **options)
