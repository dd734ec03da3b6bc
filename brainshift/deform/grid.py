"""Crop geometry and tensor helpers shared by the deformable stage's steps.

Fields are voxel pull fields on the fixed grid (see :mod:`brainshift.fields`): numpy ``(X, Y, Z, 3)``,
or torch ``(B, 3, X, Y, Z)`` with channel ``c`` the displacement along array axis ``c`` (voxels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

@dataclass
class Crop:
    """Cubic crop ``[lo, lo + size)`` per axis in fixed voxels; may extend past the grid (zero padded).

    ``inner_lo``/``inner_hi``: the mask's bounding box (taper weight 1), ``box_lo``/``box_hi``: the
    bounding box + margin clipped to the grid (taper reaches 0 at its faces inside the grid).
    """

    lo: np.ndarray
    size: int
    inner_lo: np.ndarray
    inner_hi: np.ndarray
    box_lo: np.ndarray
    box_hi: np.ndarray
    grid: tuple[int, int, int]


def mask_crop(mask: np.ndarray, margin_vox: int = 8, multiple: int = 1) -> Crop:
    """Cube around the bounding box of ``mask`` (+ ``margin_vox``), side rounded up to ``multiple``."""
    idx = np.nonzero(mask)
    if len(idx[0]) == 0:
        raise ValueError("the iUS mask is empty")
    grid = tuple(int(s) for s in mask.shape)
    inner_lo = np.array([int(i.min()) for i in idx])
    inner_hi = np.array([int(i.max()) + 1 for i in idx])
    box_lo = np.maximum(inner_lo - margin_vox, 0)
    box_hi = np.minimum(inner_hi + margin_vox, grid)
    ext = box_hi - box_lo
    size = int(math.ceil(ext.max() / multiple) * multiple)
    lo = box_lo - (size - ext) // 2       # centre the box in the cube
    return Crop(lo=lo, size=size, inner_lo=inner_lo, inner_hi=inner_hi, box_lo=box_lo, box_hi=box_hi, grid=grid)


def overlap(crop: Crop) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(slices of the fixed grid, slices of the cube) of the part of the cube that lies on the grid."""
    src = tuple(slice(max(l, 0), min(l + crop.size, n)) for l, n in zip(crop.lo, crop.grid))
    dst = tuple(slice(s.start - l, s.stop - l) for s, l in zip(src, crop.lo))
    return src, dst


def extract(vol: np.ndarray, crop: Crop) -> np.ndarray:
    """The cube of ``vol`` as float32 (a bool mask gives 0 and 1), zero where it leaves the grid."""
    out = np.zeros((crop.size,) * 3 + vol.shape[3:], dtype=np.float32)
    src, dst = overlap(crop)
    out[dst] = vol[src]
    return out


def insert(field_crop: np.ndarray, crop: Crop) -> np.ndarray:
    """A (X,Y,Z,3) zero field on the fixed grid with the cube's values pasted in."""
    out = np.zeros(crop.grid + (3,), dtype=np.float32)
    src, dst = overlap(crop)
    out[src] = field_crop[dst]
    return out


def taper(crop: Crop) -> np.ndarray:
    """Separable weight on the cube: 1 on the mask's bounding box, a half-cosine down to 0 at the
    faces of the bounding box + margin that lie inside the grid, 0 beyond. Faces on the grid's
    edge are not tapered (there is no outside to stay still)."""
    weights = []
    for a in range(3):
        x = crop.lo[a] + np.arange(crop.size, dtype=np.float64)
        w = np.ones_like(x)
        lo, ilo, hi, ihi = crop.box_lo[a], crop.inner_lo[a], crop.box_hi[a], crop.inner_hi[a]
        if lo > 0:   # ramp from 0 at lo - 0.5 to 1 at ilo - 0.5
            t = np.clip((x - (lo - 0.5)) / max(ilo - lo, 1), 0, 1)
            w *= 0.5 - 0.5 * np.cos(np.pi * t)
        else:
            w *= x >= 0
        if hi < crop.grid[a]:
            t = np.clip(((hi - 0.5) - x) / max(hi - ihi, 1), 0, 1)
            w *= 0.5 - 0.5 * np.cos(np.pi * t)
        else:
            w *= x < crop.grid[a]
        weights.append(w)
    return (weights[0][:, None, None] * weights[1][None, :, None] * weights[2][None, None, :]).astype(np.float32)


def normalise(vol: np.ndarray, mask: np.ndarray | None = None, lo_pct: float = 1.0, hi_pct: float = 99.0) -> np.ndarray:
    """Intensities to [0, 1] by the ``lo_pct``/``hi_pct`` percentiles inside ``mask`` (else nonzero voxels)."""
    vol = np.asarray(vol, dtype=np.float32)
    sel = vol[mask] if mask is not None and mask.any() else vol[vol != 0]
    if sel.size == 0:
        return np.zeros_like(vol)
    lo, hi = np.percentile(sel, [lo_pct, hi_pct])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((vol - lo) / (hi - lo), 0, 1).astype(np.float32)


def as_image(vol: np.ndarray, device=None) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None, None].to(device or "cpu")


def field_to_torch(disp: np.ndarray, device=None) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(disp, -1, 0), dtype=np.float32))[None].to(device or "cpu")


def field_to_numpy(disp: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(disp[0].detach().cpu().numpy(), 0, -1), dtype=np.float32)


def warp_torch(img: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    import voxelmorph as vxm

    return vxm.nn.functional.spatial_transform(img, disp, padding_mode="border")


def resize_field(disp: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Resample a voxel field (corner-aligned grids, ``align_corners=True``) and rescale its vectors."""
    old = disp.shape[2:]
    scale = torch.tensor([(s - 1) / max(o - 1, 1) for s, o in zip(size, old)], dtype=disp.dtype, device=disp.device)
    out = F.interpolate(disp, size=size, mode="trilinear", align_corners=True)
    return out * scale.view(1, 3, 1, 1, 1)


def integrate_svf(svf: torch.Tensor, max_step_vox: float = 0.25) -> torch.Tensor:
    """Scaling and squaring with enough steps that the first step is at most ``max_step_vox`` voxels."""
    import voxelmorph as vxm

    vmax = float(svf.abs().max()) if svf.numel() else 0.0
    steps = max(5, int(math.ceil(math.log2(max(vmax, 1e-6) / max_step_vox))))
    return vxm.nn.functional.integrate_vec(svf, steps=min(steps, 12))
