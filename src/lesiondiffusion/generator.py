"""The generator interface shared by every lesion synthesis backend.

``LesionSynthesizer`` (the diffusion pipeline, default) and the rule-based baseline both implement
``LesionGenerator``; the sample store and the nnU-Net trainer depend only on this interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # imported for type hints only, to keep this module dependency-free
    from .catalog import Catalog
    from .organs import OrganMap
    from .placement import LesionBox
    from .report import LesionReport


@dataclass
class SynthesisResult:
    """One synthesised lesion inpainted into one CT volume.

    ``image`` is the full input volume in HU with the lesion inpainted (every voxel outside the
    dilated lesion mask bit-identical to the input); ``lesion_mask`` is a uint8 volume of the same
    shape (1 = lesion). When ``failure`` is set the sample is unusable and ``image``/``lesion_mask``
    are ``None``: callers drop and count it, they never train on it.
    """

    image: np.ndarray | None
    lesion_mask: np.ndarray | None
    report: "LesionReport"
    box: "LesionBox | None"
    failure: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failure is None


@runtime_checkable
class LesionGenerator(Protocol):
    """Inpaints one lesion per report into ``ct`` (HU, array order of ``organs.labels``)."""

    def __call__(
        self,
        ct: np.ndarray,
        organs: "OrganMap",
        reports: Sequence["LesionReport"],
        catalogs: "Sequence[Catalog] | Catalog",
        *,
        seed: int,
    ) -> list[SynthesisResult]: ...


BACKENDS = ("lesiondiffusion", "rule_based")


def build_generator(backend: str = "lesiondiffusion", *, bundle: str | None = None, device: str = "cpu",
                    options: dict[str, Any] | None = None, text_conditioning: bool = True,
                    hu_correction: str | None = None, source: str = "") -> LesionGenerator:
    """The one place a backend name becomes a generator (the trainer's producer, ``cache build`` and
    ``evaluate alignment`` all come here). LesionDiffusion is the default and is never silently
    replaced by the baseline. ``options`` are the backend's keyword arguments (for LesionDiffusion:
    ``SynthesisConfig`` fields such as ``ddim_steps``); ``text_conditioning=False`` gives LesionDiffusion
    null prompts for both networks (the text ablation); ``hu_correction`` (off | shift | clip; None: the
    pipeline's default) applies to LesionDiffusion only; ``source`` names the config file for errors."""
    import os

    from .errors import LesionDiffusionError

    where = f" in {source}" if source else ""
    options = dict(options or {})
    if backend == "rule_based":
        from .rule_based import RuleBasedGenerator

        if not text_conditioning:
            raise LesionDiffusionError(f"text_conditioning=False{where}: only the lesiondiffusion backend is "
                                       "text-conditioned; the rule_based baseline reads the report directly.")

        return RuleBasedGenerator(**options)
    if backend != "lesiondiffusion":
        raise LesionDiffusionError(f"Unknown generator backend {backend!r}{where}; use one of: {', '.join(BACKENDS)}.")
    if not bundle:
        raise LesionDiffusionError(f"The lesiondiffusion backend needs a model bundle folder{where} (generator.bundle "
                                   "or --bundle); the rule_based backend needs none.")
    try:
        from .pipeline import LesionSynthesizer
    except ImportError as exc:
        raise LesionDiffusionError(f"The LesionDiffusion backend is unavailable ({exc}). Reinstall the package, or use "
                                   f"the rule_based backend{where}.") from exc
    if not text_conditioning:
        options["text_conditioning"] = False
    if hu_correction is not None:
        options["hu_correction"] = hu_correction
    return LesionSynthesizer.from_bundle(os.path.expandvars(str(bundle)), device=device, **options)
