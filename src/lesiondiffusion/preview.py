"""PNG previews of a synthesised lesion: orthogonal slices through the lesion, before and after, with
the mask contour. Uses matplotlib's Agg backend (no display needed) and writes atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .io import atomic_path

SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # HU window (level 40, width 400) where abdominal lesions show


def lesion_center(mask: np.ndarray) -> tuple[int, int, int]:
    """Voxel index of the mask's centroid (the volume centre for an empty mask)."""
    idx = np.argwhere(mask > 0)
    if idx.size == 0:
        return tuple(int(s // 2) for s in mask.shape)  # type: ignore[return-value]
    return tuple(int(round(v)) for v in idx.mean(axis=0))  # type: ignore[return-value]


def save_preview(
    path: str | Path,
    before: np.ndarray,
    after: np.ndarray,
    mask: np.ndarray,
    spacing: Sequence[float],
    title: str = "",
    window: tuple[float, float] = SOFT_TISSUE_WINDOW,
) -> None:
    """Write a 2 x 3 figure (rows: before, after; columns: the three array-axis planes through the
    lesion centroid) with the lesion contour drawn on both rows."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    c = lesion_center(mask)
    sp = [float(s) for s in spacing]
    planes = [
        ("axis 0 = %d" % c[0], lambda v: v[c[0], :, :], sp[2] / sp[1]),
        ("axis 1 = %d" % c[1], lambda v: v[:, c[1], :], sp[2] / sp[0]),
        ("axis 2 = %d" % c[2], lambda v: v[:, :, c[2]], sp[1] / sp[0]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(10, 6.6), dpi=90)
    for col, (name, take, aspect) in enumerate(planes):
        m = take(mask).astype(float)
        for row, (label, vol) in enumerate((("before", before), ("after", after))):
            ax = axes[row, col]
            # transpose so the last array axis runs vertically, as radiology viewers show it
            ax.imshow(take(vol).astype(np.float32).T, cmap="gray", vmin=window[0], vmax=window[1],
                      origin="lower", aspect=aspect, interpolation="nearest")
            if m.any():
                ax.contour(m.T, levels=[0.5], colors="red", linewidths=0.8, origin="lower")
            ax.set_title(f"{label}: {name}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(str(tmp), format="png")
    finally:
        plt.close(fig)
