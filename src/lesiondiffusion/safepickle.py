"""Reading nnU-Net's preprocessed ``CASE.pkl`` properties without running code.

nnU-Net stores each preprocessed case's properties (spacing, bounding box, class locations) as a pickle.
An unrestricted ``pickle.load`` runs whatever a file asks for, so a ``.pkl`` swapped into a shared
preprocessed folder would run code in ``cache build``. These files hold only dicts, lists, numbers and
numpy arrays; the unpickler below resolves exactly the globals those need (seen in nnU-Net 2.x output:
``numpy.dtype``, ``numpy.ndarray``, ``numpy._core.multiarray._reconstruct`` / ``scalar``, the same under
numpy 1.x's ``numpy.core``, and ``collections.OrderedDict``) and refuses every other one. The standard
library has no such allow-list loader; numpy's own ``allow_pickle=False`` covers ``.npy`` only.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

from .errors import LesionDiffusionError

_ALLOWED: frozenset[tuple[str, str]] = frozenset({
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("collections", "OrderedDict"),
})


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not plain data")
        return super().find_class(module, name)


def load_plain_pickle(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` allowing plain data and numpy arrays only; anything else is refused with the file
    named and nothing from it run."""
    try:
        with open(path, "rb") as fh:
            return _PlainDataUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as exc:
        raise LesionDiffusionError(
            f"{path}: refused to read it ({exc}). nnU-Net's preprocessed .pkl files hold plain data and numpy "
            "arrays only; this one asks for more, or is damaged. Re-create it with nnUNetv2_plan_and_preprocess "
            "(or nnUNetv2_preprocess) from your raw dataset.") from None
