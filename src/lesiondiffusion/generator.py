"""The generator interface shared by every lesion synthesis backend.

``LesionSynthesizer`` (the diffusion pipeline, default) and the rule-based baseline both implement
``LesionGenerator``; the sample store and the nnU-Net trainer depend only on this interface. The
backends import this module; ``generators.build_generator`` (which imports the backends) turns a
backend name into one.
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


# built by ``generators.build_generator``; ``no_lesion`` is a training control (nothing inpainted), not a
# lesion generator, so commands that evaluate lesions offer ``LESION_BACKENDS`` only
LESION_BACKENDS = ("lesiondiffusion", "rule_based")
BACKENDS = (*LESION_BACKENDS, "no_lesion")
# need no bundle and take ``RuleBasedGenerator``'s options (the control is a RuleBasedGenerator subclass)
WEIGHT_FREE_BACKENDS = ("rule_based", "no_lesion")
