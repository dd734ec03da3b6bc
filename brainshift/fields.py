"""Displacement fields in the Learn2Reg convention, and the conversions that produce them.

The one convention (ReMIND2Reg, Learn2Reg): a field ``disp`` has shape ``fixed.shape + (3,)``,
float32, in **voxel units**, and is a **pull** (backward) field on the **fixed** grid: the moving
voxel that corresponds to fixed voxel ``p = (i, j, k)`` is ``p + disp[p]``. Warping the moving
image onto the fixed grid therefore reads ``moving(p + disp[p])``. The file's header carries the
moving image's affine (the two grids coincide in ReMIND2Reg).

World matrices follow NiftyReg's ``-aff`` files: ``M`` maps *reference (fixed)* world coordinates
to *floating (moving)* world coordinates, RAS millimetres. The voxel mapping is then
``q = inv(A_moving) @ M @ A_fixed @ p`` (homogeneous), so ``disp[p] = q - p``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy.ndimage import map_coordinates

from .io import InputError, _atomic_write, _write_image, itk_image


def voxel_matrix(world_matrix: np.ndarray, fixed_affine: np.ndarray, moving_affine: np.ndarray) -> np.ndarray:
    """4x4 map from fixed voxel index to moving voxel index for a NiftyReg-convention world matrix."""
    return np.linalg.inv(moving_affine) @ np.asarray(world_matrix, dtype=np.float64) @ fixed_affine


def matrix_to_field(world_matrix: np.ndarray, fixed_affine: np.ndarray, moving_affine: np.ndarray,
                    fixed_shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel pull field (X,Y,Z,3) float32 of a world matrix (reference world -> floating world, RAS).

    Computed exactly (no interpolation) by broadcasting: ``disp[p] = (V - I) p + t`` with ``V`` the
    voxel matrix of :func:`voxel_matrix`.
    """
    v = voxel_matrix(world_matrix, fixed_affine, moving_affine)
    lin = v[:3, :3] - np.eye(3)
    i, j, k = (np.arange(n, dtype=np.float64) for n in fixed_shape)
    disp = np.empty(tuple(fixed_shape) + (3,), dtype=np.float32)
    for c in range(3):
        disp[..., c] = (lin[c, 0] * i[:, None, None] + lin[c, 1] * j[None, :, None]
                        + lin[c, 2] * k[None, None, :] + v[c, 3])
    return disp


def identity_field(fixed_shape: tuple[int, int, int]) -> np.ndarray:
    """The zero pull field on the fixed grid."""
    return np.zeros(tuple(fixed_shape) + (3,), dtype=np.float32)


def _sample(volume: np.ndarray, coords: np.ndarray, order: int, mode: str, cval: float = 0.0) -> np.ndarray:
    """``volume`` at voxel ``coords`` (shape (3, ...)); float32 out."""
    return map_coordinates(volume, coords, order=order, mode=mode, cval=cval, output=np.float32,
                           prefilter=order > 1)


def _grid_plus(disp: np.ndarray, origin=(0, 0, 0)) -> np.ndarray:
    """Coordinates ``p + disp[p]`` as an array (3, X, Y, Z) float32; ``p`` counted from voxel ``origin``."""
    coords = np.moveaxis(disp, -1, 0).astype(np.float32, copy=True)
    for c, n in enumerate(disp.shape[:3]):
        shape = [1, 1, 1]
        shape[c] = n
        coords[c] += np.arange(origin[c], origin[c] + n, dtype=np.float32).reshape(shape)
    return coords


def compose(first: np.ndarray, second: np.ndarray, origin=(0, 0, 0)) -> np.ndarray:
    """Pull field of "follow ``first``, then ``second``": ``p -> q = p + first[p] -> q + second[q]``.

    ``first`` lives on the fixed grid and maps to an intermediate grid on which ``second`` lives
    (e.g. ``first`` = deformable field between fixed and the affinely pre-aligned moving image,
    ``second`` = the affine field). ``second`` is sampled trilinearly at ``q`` (edge values
    extended outside its grid). ``origin``: the fixed voxel of ``first[0, 0, 0]`` when ``first``
    covers only a box of the fixed grid (where ``first`` is zero outside a box, composing that box
    alone gives the same values at a fraction of the cost). Result: ``first.shape``, float32.
    """
    coords = _grid_plus(first, origin)
    out = np.empty_like(first, dtype=np.float32)
    for c in range(3):
        out[..., c] = first[..., c] + _sample(second[..., c], coords, order=1, mode="nearest")
    return out


def warp(moving: np.ndarray, disp: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Resample the moving image onto the fixed grid: ``out[p] = moving(p + disp[p])``.

    ``order`` is the spline order (0 nearest, 1 linear, 3 cubic); outside the moving grid ``cval``.
    """
    return _sample(np.asarray(moving, dtype=np.float32), _grid_plus(disp), order=order, mode="constant", cval=cval)


def field_name(fixed_id: str, fixed_tag: str, moving_id: str, moving_tag: str) -> str:
    """Official file name ``disp_XXXX_0000_XXXX_000M.nii.gz``."""
    return f"disp_{fixed_id}_{fixed_tag}_{moving_id}_{moving_tag}.nii.gz"


def write_field(path: str | os.PathLike, disp: np.ndarray, moving_affine: np.ndarray) -> Path:
    """Write a pull field (X,Y,Z,3) as float32 with the moving image's affine (.nii.gz or .mha).

    Written to a temporary name in the same folder and renamed, so no partial file is ever seen.
    """
    disp = np.asarray(disp)
    if disp.ndim != 4 or disp.shape[3] != 3:
        raise ValueError(f"a displacement field has shape (X,Y,Z,3), not {disp.shape}")
    if not np.isfinite(disp).all():
        raise ValueError("displacement field contains NaN or Inf; not written")
    return _atomic_write(Path(path), lambda tmp: _write_image(tmp, disp.astype(np.float32), moving_affine))


def read_field(path: str | os.PathLike) -> np.ndarray:
    """Read a pull field written by :func:`write_field` (or by any Learn2Reg method): (X,Y,Z,3)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: displacement field not found")
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            disp = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
        except Exception as exc:
            raise InputError(f"{path}: cannot read displacement field ({exc})") from exc
    else:
        from .io import _read_itk

        disp = _read_itk(path)[0].astype(np.float64)
    if disp.ndim == 5 and disp.shape[3] == 1:  # (X,Y,Z,1,3) as some NIfTI writers store vectors
        disp = disp[:, :, :, 0, :]
    if disp.ndim != 4 or disp.shape[3] != 3:
        raise InputError(f"{path}: displacement field must have shape (X,Y,Z,3), got {disp.shape}")
    return disp


# --------------------------------------------------------------------------------------------
# ITK / 3D Slicer export
# --------------------------------------------------------------------------------------------
#: File suffixes :func:`write_itk_transform` writes as an ITK transform file; others as a vector image.
ITK_TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt")


def itk_displacement(disp: np.ndarray, fixed_affine: np.ndarray, moving_affine: np.ndarray) -> np.ndarray:
    """The Learn2Reg voxel pull field as ITK's displacement: (X,Y,Z,3) float64, **LPS mm**, fixed grid.

    ``disp`` (X,Y,Z,3, voxels) maps fixed voxel ``p`` to moving voxel ``q = p + disp[p]``; the
    result ``d`` maps the fixed world point ``x = A_fixed p`` to the moving world point
    ``x + d[p] = A_moving q``, both in ITK's LPS world (``x_lps = diag(-1,-1,1) x_ras``). That is
    the direction ITK resamples with (and 3D Slicer reads from a transform file): a transform maps
    points of the output (fixed) space to the input (moving) space, a pull. Exact, no interpolation.
    """
    disp = np.asarray(disp)
    if disp.ndim != 4 or disp.shape[3] != 3:
        raise ValueError(f"a displacement field has shape (X,Y,Z,3), not {disp.shape}")
    a_f, a_m = np.asarray(fixed_affine, dtype=np.float64), np.asarray(moving_affine, dtype=np.float64)
    # d_ras = A_m[:3,:3] (p + disp) + t_m - (A_f[:3,:3] p + t_f), one channel at a time (memory)
    lin, shift = a_m[:3, :3] - a_f[:3, :3], a_m[:3, 3] - a_f[:3, 3]
    idx = [np.arange(n, dtype=np.float64).reshape([n if a == c else 1 for a in range(3)])
           for c, n in enumerate(disp.shape[:3])]
    out = np.empty(disp.shape, dtype=np.float64)
    for c in range(3):
        sign = -1.0 if c < 2 else 1.0  # RAS -> LPS: x and y change sign
        d = shift[c] + lin[c, 0] * idx[0] + lin[c, 1] * idx[1] + lin[c, 2] * idx[2]
        for j in range(3):
            d = d + a_m[c, j] * disp[..., j]
        out[..., c] = sign * d
    return out


def itk_transform(disp: np.ndarray, fixed_affine: np.ndarray, moving_affine: np.ndarray):
    """``sitk.DisplacementFieldTransform`` of a Learn2Reg pull field (see :func:`itk_displacement`).

    ``sitk.Resample(moving_image, fixed_image, itk_transform(...))`` puts the moving image on the
    fixed grid, as :func:`warp` does.
    """
    import SimpleITK as sitk

    return sitk.DisplacementFieldTransform(itk_image(itk_displacement(disp, fixed_affine, moving_affine), fixed_affine))


def write_itk_transform(path: str | os.PathLike, disp: np.ndarray, fixed_affine: np.ndarray,
                        moving_affine: np.ndarray) -> Path:
    """Write a pull field as an ITK displacement-field transform (LPS mm, fixed grid), atomically.

    ``.h5``/``.hdf5``/``.tfm``/``.txt``: an ITK transform file (float64), as 3D Slicer, ANTs and
    ``sitk.ReadTransform`` load it. Any other image suffix (``.nii.gz``, ``.nrrd``, ``.mha``): a 3-component
    float32 vector image on the fixed grid holding the displacement in LPS mm, written by ITK
    itself (ITK's NIfTI reader gives back exactly these vectors), the form ANTs and ITK-SNAP use;
    ``sitk.DisplacementFieldTransform(sitk.Cast(img, sitk.sitkVectorFloat64))`` makes it a transform.
    """
    import SimpleITK as sitk

    path = Path(path)
    vectors = itk_displacement(disp, fixed_affine, moving_affine)
    if path.name.lower().endswith(ITK_TRANSFORM_SUFFIXES):
        def writer(tmp: Path) -> None:
            sitk.WriteTransform(sitk.DisplacementFieldTransform(itk_image(vectors, fixed_affine)), str(tmp))
    else:
        def writer(tmp: Path) -> None:
            img = sitk.Cast(itk_image(vectors, fixed_affine), sitk.sitkVectorFloat32)
            sitk.WriteImage(img, str(tmp), useCompression=True)
    return _atomic_write(path, writer)
