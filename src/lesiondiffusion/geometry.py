"""One orientation for everything the networks see: the closest RAS axis order of the input.

Pretraining, ``synthesize``, ``place``, the offline cache and the nnU-Net trainer all receive volumes
in some array order: a NIfTI file's own (RAS phantoms, LPS sarcomas, anything a scanner wrote), or
nnU-Net's reader order (axes reversed against the file). A network trained on crops in one orientation
and run on crops in another sees its anatomy mirrored or transposed, so every stage brings its arrays
to one canonical order first and back afterwards, through ``Canonical`` (nibabel's ``io_orientation``
and ``apply_orientation``: the same axis flips and transposes ``nibabel.as_closest_canonical`` makes).

Only flips and axis permutations are applied (no resampling): oblique scans keep their voxels and are
handled on their closest canonical axes, as nibabel does. Spacing per canonical axis follows from the
canonical affine's column norms.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from nibabel import orientations as nio
from scipy import ndimage

_IDENTITY = np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)


@dataclass(frozen=True)
class Canonical:
    """The map between an input array order (``shape``, ``affine``) and the canonical (RAS) order.

    ``ornt[a] = (k, s)``: input axis ``a`` becomes canonical axis ``k``, reversed when ``s`` is -1."""

    ornt: np.ndarray
    shape: tuple[int, int, int]

    @property
    def identity(self) -> bool:
        return bool(np.array_equal(self.ornt, _IDENTITY))

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        out = [0, 0, 0]
        for a, (k, _) in enumerate(self.ornt):
            out[int(k)] = int(self.shape[a])
        return tuple(out)  # type: ignore[return-value]

    def forward(self, arr: np.ndarray) -> np.ndarray:
        """Input order -> canonical order (a view where numpy can make one)."""
        return arr if self.identity else nio.apply_orientation(arr, self.ornt)

    def backward(self, arr: np.ndarray) -> np.ndarray:
        """Canonical order -> input order (the exact inverse of ``forward``)."""
        return arr if self.identity else nio.apply_orientation(arr, nio.ornt_transform(_IDENTITY, self.ornt))

    def affine(self, affine: np.ndarray) -> np.ndarray:
        """The canonical array's voxel -> world affine."""
        return np.asarray(affine, dtype=np.float64) @ nio.inv_ornt_aff(self.ornt, self.shape)

    def point_back(self, point: Sequence[float]) -> tuple[float, float, float]:
        """A canonical voxel coordinate (float) -> the input voxel coordinate."""
        out = [0.0, 0.0, 0.0]
        for a, (k, s) in enumerate(self.ornt):
            c = float(point[int(k)])
            out[a] = c if s > 0 else self.shape[a] - 1 - c
        return tuple(out)  # type: ignore[return-value]

    def box_back(self, lo: Sequence[int], hi: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """A canonical voxel box [lo, hi) -> the input voxel box [lo, hi)."""
        blo, bhi = [0, 0, 0], [0, 0, 0]
        for a, (k, s) in enumerate(self.ornt):
            l, h = int(lo[int(k)]), int(hi[int(k)])
            blo[a], bhi[a] = (l, h) if s > 0 else (self.shape[a] - h, self.shape[a] - l)
        return tuple(blo), tuple(bhi)

    def axes_back(self, values: Sequence[float]) -> tuple[float, float, float]:
        """Per-axis magnitudes (semi-axes, extents) from canonical to input axis order."""
        return tuple(float(values[int(k)]) for k, _ in self.ornt)  # type: ignore[return-value]


@dataclass
class CropGeometry:
    """A crop grid at the bundle spacing centred on ``center`` (input voxel coordinates).

    Crop voxel j along an axis sits at input coordinate ``center + (j - (n - 1) / 2) * scale`` with
    ``scale = bundle spacing / input spacing``; LMNet's crop is the centred sub-grid of LINet's.
    """

    center: np.ndarray
    scale: np.ndarray
    image_size: tuple[int, int, int]
    mask_size: tuple[int, int, int]
    coarsen: float = 1.0  # synthesis spacing / bundle spacing (> 1 for lesions larger than the trained crop)

    @property
    def mask_offset(self) -> tuple[int, ...]:
        return tuple((i - m) // 2 for i, m in zip(self.image_size, self.mask_size))

    def mask_slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + m) for o, m in zip(self.mask_offset, self.mask_size))

    def sample(self, volume: np.ndarray, order: int, mode: str, cval: float = 0.0) -> np.ndarray:
        """Resample ``volume`` (input grid) onto the image crop grid."""
        n = np.asarray(self.image_size, dtype=np.float64)
        offset = self.center - (n - 1) / 2 * self.scale
        return ndimage.affine_transform(
            volume, self.scale, offset=offset, output_shape=self.image_size, order=order, mode=mode,
            cval=cval, output=np.float32, prefilter=False,
        )

    def back(self, crop: np.ndarray, region: tuple[slice, slice, slice], order: int, cval: float = 0.0) -> np.ndarray:
        """Resample an image-crop array back onto the input voxels of ``region``."""
        n = np.asarray(self.image_size, dtype=np.float64)
        start = np.asarray([s.start for s in region], dtype=np.float64)
        shape = tuple(s.stop - s.start for s in region)
        inv = 1.0 / self.scale
        offset = (start - self.center) * inv + (n - 1) / 2
        return ndimage.affine_transform(
            crop, inv, offset=offset, output_shape=shape, order=order, mode="constant", cval=cval,
            output=np.float32, prefilter=False,
        )

    def box_mask(self, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
        """{0,1} image-crop mask of the voxel box [lo, hi) (crop voxels whose centre falls inside)."""
        axes = []
        for a in range(3):
            j = np.arange(self.image_size[a])
            x = self.center[a] + (j - (self.image_size[a] - 1) / 2) * self.scale[a]
            axes.append((x >= lo[a] - 0.5) & (x < hi[a] - 0.5))
        return (axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]).astype(np.float32)


def canonical(affine: np.ndarray, shape: Sequence[int]) -> Canonical:
    """The canonical map of an array of ``shape`` with voxel -> world ``affine``."""
    ornt = nio.io_orientation(np.asarray(affine, dtype=np.float64))
    return Canonical(np.asarray(ornt, dtype=np.float64), tuple(int(s) for s in shape))  # type: ignore[arg-type]


def to_canonical(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``arr`` in canonical order (contiguous) and its affine."""
    c = canonical(affine, arr.shape)
    return np.ascontiguousarray(c.forward(arr)), c.affine(affine)


def box_back(box: Any, c: Canonical, affine: np.ndarray) -> Any:
    """A ``placement.LesionBox`` found on the canonical arrays, in the input's voxel order."""
    if box is None or c.identity:
        return box
    lo, hi = c.box_back(box.lo, box.hi)
    return dataclasses.replace(box, lo=lo, hi=hi, center_vox=c.point_back(box.center_vox),
                               semi_axes_vox=c.axes_back(box.semi_axes_vox), affine=np.asarray(affine, dtype=np.float64))


def canonical_organs(organs: Any) -> tuple[Any, Canonical]:
    """An ``OrganMap`` in canonical order (the same object when it already is) and the map back."""
    c = canonical(organs.affine, organs.labels.shape)
    if c.identity:
        return organs, c
    # the producer calls this for every batch on the same template: reorient its organ map once
    cached = organs._cache.get("canonical")
    if cached is None:
        cached = dataclasses.replace(organs, labels=np.ascontiguousarray(c.forward(organs.labels)),
                                     affine=c.affine(organs.affine), _cache={})
        organs._cache["canonical"] = cached
    return cached, c


def place_canonical(organs: Any, report: Any, catalog: Any, seed: Any, **kwargs: Any) -> Any:
    """``placement.place_lesion`` on the canonical organ map, the box returned in the input's voxel
    order: one seed gives one box in world coordinates whatever the array order."""
    from .placement import NoPlacement, place_lesion  # placement is above geometry in the flow

    organs_c, c = canonical_organs(organs)
    box = place_lesion(organs_c, report, catalog, seed, **kwargs)
    return box if isinstance(box, NoPlacement) else box_back(box, c, organs.affine)


def generate_canonical(generate: Any, ct: np.ndarray, organs: Any, *args: Any, **kwargs: Any) -> list[Any]:
    """Run ``generate(ct, organs, *args, **kwargs)`` (a generator's body) on the canonical arrays and
    bring its ``SynthesisResult``s back to the input's voxel order: placement, crops and networks then
    see the same anatomy whatever order the caller's arrays are in. ``organs`` is an ``OrganMap``."""
    organs_c, c = canonical_organs(organs)
    if c.identity:
        return generate(ct, organs, *args, **kwargs)
    # a view: the generator only reads the CT (resampled crops) and copies it for its result
    results = generate(c.forward(np.asarray(ct)), organs_c, *args, **kwargs)
    for r in results:
        if r.image is not None:
            r.image = np.ascontiguousarray(c.backward(r.image))
        if r.lesion_mask is not None:
            r.lesion_mask = np.ascontiguousarray(c.backward(r.lesion_mask))
        r.box = box_back(r.box, c, organs.affine)
        r.info["input_orientation"] = "".join(nio.ornt2axcodes(c.ornt))  # canonical is RAS
    return results


__all__ = ["Canonical", "CropGeometry", "box_back", "canonical", "canonical_organs", "generate_canonical", "place_canonical", "to_canonical"]
