"""Large-displacement discrete search: an SSC cost volume and coupled convex optimisation.

After the idea of ConvexAdam (Siebert, Hansen, Heinrich 2021): a dense cost volume of modality
independent descriptors over every integer displacement of a search cube, minimised per control
point while coupled, with a growing weight, to a smoothed copy of the field. Unlike gradient
descent from zero (:func:`.refine_field`) it finds shifts of 5-10 mm; its output is meant as the
``init`` of :func:`.refine_field`.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..ssc import ssc_descriptor
from .grid import as_image, extract, field_to_numpy, insert, integrate_svf, mask_crop, normalise, taper


def _smooth(u: torch.Tensor, passes: int) -> torch.Tensor:
    """``passes`` x 3x3x3 mean filter of a (1, C, X, Y, Z) tensor, edge values replicated."""
    for _ in range(passes):
        u = F.avg_pool3d(F.pad(u, [1] * 6, mode="replicate"), 3, stride=1)
    return u


def _cost_volume(desc_f: torch.Tensor, desc_m: torch.Tensor, m: torch.Tensor, cell: int,
                 r: int) -> tuple[torch.Tensor, torch.Tensor, tuple[slice, ...]]:
    """Cost (D, box cells) with D = (2r+1)^3 displacements (axis 0 slowest), mask voxels per cell (w, w, w),
    and ``box``: the slices of the cells that hold mask voxels (other cells have a constant cost).

    Cost of a cell: the mean over its voxels inside the mask ``m`` (n, n, n) of the channel-mean squared
    difference of ``desc_f`` (C, n, n, n) at ``x`` and ``desc_m`` (C, n+2r, n+2r, n+2r; voxel ``x`` of
    ``desc_f`` is ``x + r`` there) at ``x + d``; 0 without mask voxels. Computed as |a|^2 + |b|^2 - 2 a.b,
    one chunk of 2r+1 displacements along axis 2 at a time (an unfolded view of ``desc_m``, no copy)."""
    k, w = 2 * r + 1, desc_f.shape[1] // cell
    count = m.reshape(w, cell, w, cell, w, cell).sum((1, 3, 5))
    nz = count.nonzero()
    lo, hi = nz.min(0).values.tolist(), (nz.max(0).values + 1).tolist()
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    vox = tuple(slice(a * cell, b * cell) for a, b in zip(lo, hi))
    s = [b - a for a, b in zip(lo, hi)]
    a, mb = desc_f[(slice(None),) + vox], m[vox] / desc_f.shape[0]
    b = desc_m[(slice(None),) + tuple(slice(x.start, x.stop + 2 * r) for x in vox)]
    b2 = (b ** 2).sum(0)
    const = ((a ** 2).sum(0) * mb).reshape(s[0], cell, s[1], cell, s[2], cell).sum((1, 3, 5))
    n0, n1, n2 = (x * cell for x in s)
    out = torch.empty(k, k, k, *s)
    for i in range(k):
        for j in range(k):
            acc = b2[i:i + n0, j:j + n1].unfold(2, n2, 1).clone()     # [x, y, l, z]: |b|^2 at x+i, y+j, z+l
            for c in range(a.shape[0]):
                acc.addcmul_(b[c, i:i + n0, j:j + n1].unfold(2, n2, 1), a[c, :, :, None], value=-2.0)
            acc = (acc * mb[:, :, None]).reshape(s[0], cell, s[1], cell, k, s[2], cell).sum((1, 3, 6))
            out[i, j] = acc.permute(2, 0, 1, 3) + const
    return out.reshape(k ** 3, -1).div_(count[box].reshape(-1).clamp(min=1)), count, box


def _coupled_argmin(cost: torch.Tensor, disps: torch.Tensor, u_bar: torch.Tensor, theta: float,
                    block: int = 1024) -> torch.Tensor:
    """Per control point ``argmin_d cost[d] + theta |d - u_bar|^2`` -> (cells, 3), ``block`` cells at a time."""
    out = []
    for s in range(0, cost.shape[1], block):
        ub = u_bar[s:s + block]
        penalty = (disps ** 2).sum(1, keepdim=True) - 2 * disps @ ub.T + (ub ** 2).sum(1)  # (D, block)
        out.append(disps[torch.argmin(cost[:, s:s + block] + theta * penalty, 0)])
    return torch.cat(out)


def discrete_field(fixed: np.ndarray, moving_aligned: np.ndarray, mask: np.ndarray, *, spacing_mm: float,
                   level_mm: float = 2.0, cell: int = 2, search_mm: float = 12.0, margin_vox: int | None = None,
                   coupling: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3),
                   smooth_passes: int = 1, desc_mm: float = 1.0, erode_mm: float = 2.0,
                   prior: float = 0.01) -> np.ndarray:
    """Discrete search for a large smooth deformation inside the iUS field of view (beyond the paper).

    Returns a **voxel pull field on the fixed grid** (float32, ``fixed.shape + (3,)``): the voxel of
    ``moving_aligned`` that corresponds to fixed voxel ``p`` is ``p + disp[p]`` (channel ``c``:
    displacement along array axis ``c``, in fixed voxels). All inputs lie on the fixed grid of
    isotropic ``spacing_mm`` mm voxels; ``mask`` (bool) is the iUS field of view. The field is
    tapered to zero in the margin and exactly zero outside the crop (as :func:`.predict_field`).

    Steps: crop to the mask's bounding box + ``margin_vox`` fixed voxels; normalise both images
    inside the mask; SSC descriptors (radius 1, dilation 1) of the images mean-pooled to about
    ``desc_mm``, themselves mean-pooled to the *level* of ``f = max(1, round(level_mm / spacing_mm))``
    fixed voxels (the moving one on a cube wider by the search radius, real data). Control points
    sit at the centres of cells of ``cell``^3 level voxels. For every integer displacement ``d`` in
    ``[-R, R]^3`` level voxels, ``R = ceil(search_mm / (f * spacing_mm))``, the cost of a cell is the
    mean of the squared descriptor difference over its voxels that lie ``erode_mm`` or more inside
    the mask; cells without such voxels have a constant cost (the coupling alone decides there). Per cell,
    the cost minus its minimum over ``d`` is divided by the median over masked cells of (mean over
    ``d`` - minimum over ``d``): a typical wrong displacement costs about 1, so ``theta`` in
    ``coupling`` is in 1 / level voxel^2 (``theta`` = 0.01: 10 level voxels of disagreement with the
    smoothed field cost as much as a typical mismatch; 0.3: under 2 voxels). **Prior**: ``prior`` x
    ``|d - c|^2`` is added to every cell's cost, ``c`` the per-axis median over masked cells of their
    argmin displacements (a shift common to the whole field of view, e.g. one the coarse stage left,
    is not penalised); 0.01 makes a 10 mm local departure from ``c`` cost a quarter of a typical
    mismatch, so a cell whose cost has no clear minimum stays near ``c`` instead of taking a spurious
    match (the SSC cost of realistic iUS against MR is noisy away from strong structures). Start: the per-cell
    argmin (ties towards ``d = 0``: identical images give exactly 0). Then for each ``theta``:
    ``u_bar`` = ``smooth_passes`` x 3x3x3 mean filter of the field (weighted by each cell's share
    of mask voxels, so empty cells do not drag the mask's edge towards 0), and per cell
    ``argmin_d cost[d] + theta |d - u_bar|^2`` (cells without mask voxels take ``u_bar`` itself, not
    a rounded label: rounding made 2 mm steps that folded). The last field so smoothed is taken as a
    stationary velocity: brought to the level grid (trilinear; cell centres stay where the cost was
    computed, a constant field stays constant), multiplied by :func:`.taper`, integrated (scaling and
    squaring) and brought to the crop grid, times ``f`` (fixed voxels). Integration keeps the result
    free of folds where a steep collapse or the taper would fold the plain field (99 k folded voxels
    on a simulated 5-10 mm collapse at 256^3 before, 0 after). ``margin_vox`` (default
    ``search_mm`` in voxels) leaves room for the taper to bring a large shift to zero.

    ``prior``, chosen on the session-11 simulator (realistic iUS; 256^3 0.5 mm, seeds 1 and 2, 6 pairs
    each, TRE after this step alone; the affine stage's 3.67 / 3.40 mm): without it 2.92 / 3.81 mm (the
    step made 7 of 12 pairs worse than the affine stage), 0.003: 2.42 / -, **0.01: 2.33 / 2.18** (none
    worse), 0.03: - / 2.20; where nothing moved (160^3, seed 5) the mean spurious displacement fell from
    2.0 to 1.1 mm. Older defaults, chosen on the earlier simulator (seed 1, 5 pairs, TRE after this
    step from the affine stage's 3.74 mm): descriptors computed at 1 mm and pooled to the 2 mm level
    (3.10 -> 1.86 mm against descriptors of the image pooled to 2 mm; speckle averaged over 8 voxels
    first, then fine structure described, as ConvexAdam pools full-resolution MIND; at 0.5 mm the
    speckle itself was matched); the cost taken 2 mm inside the fan (1.86 -> 1.72 mm: descriptors at
    the fan's edge see its step to zero, which nothing in the MR matches; where nothing moved, 160^3
    at 0.5 mm, it cut the spurious displacement at the edge from 7.2 to 2.5 mm; 4 mm cut it to 0.6
    but lost at the peak of a push on another seed). Measured and not kept: 6 mm control points
    (1.73), SSC radius 2 (2.27) or dilation 2 (2.20), a 3 mm level with 18 mm range (2.17), a 16 mm
    range (1.83), longer or shorter coupling schedules (1.78, 1.83). Earlier choices:
    2 mm level and 2-voxel cells (4 mm control points) resolve a resection's collapse at
    a small cost volume; ``search_mm`` = 12 covers 5-10 mm shifts with room; the schedule grows x3
    from almost free (outliers corrected) to nearly pinned to the smooth field; one smoothing pass
    per step (sigma ~ 0.8 cell, ~3 mm) because the filter acts again at every step: with 2-3 passes
    or ``theta`` up to 1 an 8 mm peak shrank by a further 20-30 % on synthetic pushes, with none
    the field folds. Memory: ``(2R+1)^3`` floats per cell of the mask's box (~30 MB for a 60 mm box at
    2 mm, R = 6; ~130 MB for a 100 mm box) and ~10 MB per temporary of the argmin (1024 cells at a time).
    """
    fixed, moving = np.asarray(fixed, dtype=np.float32), np.asarray(moving_aligned, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    zero = np.zeros(fixed.shape + (3,), dtype=np.float32)
    if not mask.any():
        return zero
    f = max(1, round(level_mm / spacing_mm))
    r = max(1, math.ceil(search_mm / (f * spacing_mm)))
    margin_vox = round(search_mm / spacing_mm) if margin_vox is None else margin_vox
    crop = mask_crop(mask, margin_vox, multiple=f * cell)
    wide = dataclasses.replace(crop, lo=crop.lo - r * f, size=crop.size + 2 * r * f)
    m_crop, m_wide = extract(mask, crop) > 0.5, extract(mask, wide) > 0.5
    m_cost, e = as_image(m_crop.astype(np.float32)), round(erode_mm / spacing_mm)
    for k in ((2 * e + 1, 1, 1), (1, 2 * e + 1, 1), (1, 1, 2 * e + 1)) if e > 0 else ():   # separable erosion
        m_cost = -F.max_pool3d(-m_cost, k, stride=1, padding=tuple(x // 2 for x in k))
    m_lvl = ((F.avg_pool3d(m_cost, f) if f > 1 else m_cost)[0, 0] > 0.5).float()
    if not m_lvl.any():
        return zero
    fd = min(f, max(1, round(desc_mm / spacing_mm)))     # descriptor level, fixed voxels
    if f % fd:
        raise ValueError(f"desc_mm {desc_mm} does not divide level_mm {level_mm} in {spacing_mm} mm voxels")

    def describe(vol: np.ndarray, m: np.ndarray) -> torch.Tensor:    # SSC at desc_mm, mean-pooled to the level
        img = as_image(normalise(vol, m))
        desc = ssc_descriptor((F.avg_pool3d(img, fd) if fd > 1 else img)[0, 0], radius=1, dilation=1)
        return F.avg_pool3d(desc[None], f // fd)[0] if f > fd else desc

    desc_f, desc_m = describe(extract(fixed, crop), m_crop), describe(extract(moving, wide), m_wide)
    cost, count, box = _cost_volume(desc_f, desc_m, m_lvl, cell, r)
    cost.sub_(cost.min(0).values)
    masked = count[box].reshape(-1) > 0                                  # cells of the box with mask voxels
    cost.div_(max(float(cost.mean(0)[masked].median()), 1e-12))
    ax = torch.arange(-r, r + 1, dtype=torch.float32)
    disps = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)  # (D, 3), axis 0 slowest
    if prior > 0:   # Gaussian prior about the field's robust centre (a shift the coarse stage left is not penalised)
        centre = disps[cost.argmin(0)][masked].median(0).values
        cost.add_(prior * ((disps - centre) ** 2).sum(1, keepdim=True))
    weight = (count / cell ** 3 + 1e-3)[None, None]                      # (1, 1, w, w, w)
    norm = _smooth(weight, smooth_passes)
    box = (slice(None), slice(None)) + box
    empty = (count == 0)[None, None].expand(1, 3, *count.shape)

    def step(u_bar: torch.Tensor, theta: float) -> torch.Tensor:        # (1, 3, w, w, w) level voxels
        u = u_bar.clone()                                                # no data: the smoothed field itself
        inner = u_bar[box]
        u[box] = _coupled_argmin(cost, disps, inner.reshape(3, -1).T, theta).T.reshape(inner.shape)
        u[empty] = u_bar[empty]
        return u

    u = step(torch.zeros(1, 3, *weight.shape[2:]), 1e-4)                 # ties towards d = 0
    for theta in coupling:
        u = step(_smooth(u * weight, smooth_passes) / norm, theta)
    u = _smooth(u * weight, smooth_passes) / norm
    # the field as a stationary velocity, tapered and integrated on the level grid (diffeomorphic even
    # where the collapse is steep and where the taper brings 10 mm to zero); cell k's centre is level
    # voxel k*cell + (cell-1)/2 and crop voxel k*s + (s-1)/2 (s = cell*f): align_corners=False's sampling
    n_lvl = crop.size // f
    w = torch.from_numpy(taper(crop))[None, None]
    w_lvl = F.avg_pool3d(w, f) if f > 1 else w
    v = F.interpolate(u, size=(n_lvl,) * 3, mode="trilinear", align_corners=False) * w_lvl
    disp = integrate_svf(v)
    disp = F.interpolate(disp, size=(crop.size,) * 3, mode="trilinear", align_corners=False) * f
    return insert(field_to_numpy(disp), crop)
