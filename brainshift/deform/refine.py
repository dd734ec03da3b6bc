"""Instance refinement: Adam on a correction of a field, on the pair itself, coarse to fine."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..fields import compose
from ..ssc import ssc_descriptor
from .grid import (as_image, extract, field_to_numpy, field_to_torch, integrate_svf, mask_crop, normalise, overlap,
                   resize_field, taper, warp_torch)


def _descriptor(vol: torch.Tensor) -> torch.Tensor:
    """SSC descriptor (12, X, Y, Z) of a 3D tensor (radius 1, dilation 1)."""
    return ssc_descriptor(vol, radius=1, dilation=1)


def _grad2(disp: torch.Tensor) -> torch.Tensor:
    return sum((disp.diff(dim=d) ** 2).mean() for d in range(2, 5))


def refine_field(fixed: np.ndarray, moving_aligned: np.ndarray, mask: np.ndarray, init: np.ndarray, *,
                 iterations: int = 40, levels: tuple[int, ...] = (4, 2), alpha: float = 1.0,
                 lr: float = 0.3, margin_vox: int = 8, smooth_sigma: float = 1.0) -> np.ndarray:
    """Instance optimisation of a field on the pair itself (beyond the paper; CLI ``--refine``).

    Optimises a correction ``delta`` so that ``init + delta`` (voxel pull field on the fixed grid,
    warping ``moving_aligned``) minimises the SSC-descriptor MSE inside ``mask`` plus ``alpha`` x the
    diffusion energy (mean squared forward differences, in voxels of the level) of the correction
    ``delta``: the init comes from a regularised step (the network or :func:`.discrete_field`) and is
    not pulled back toward zero (regularising ``init + delta`` undid two thirds of an 8 mm push that
    the discrete search had found). From a zero init the two are the same.
    Coarse to fine: for each pooling factor in ``levels`` (fixed voxels per level voxel), Adam
    (``lr`` level voxels) runs ``iterations`` steps on ``delta`` sampled at that level, Gaussian
    smoothed (``smooth_sigma`` level voxels). ``levels=(4, 2)`` (2 and 1 mm at 0.5 mm spacing, set in
    session 1) was re-checked on the session-15 simulator (5 development pairs, seed 1; docs/MEASUREMENTS.md,
    session 17): (8, 4, 2) is the same on average (within 0.04 mm per pair), (4,) alone is 0.23 mm worse,
    80 iterations gain nothing, and (4, 2, 1) gained 0.03 mm on one pair for 10x the time.
    Only the mask's bounding box + ``margin_vox`` is changed; the correction is tapered to zero in the
    margin like :func:`predict_field`. The result
    is ``compose(exp(delta), init)``: the optimised correction taken as a stationary velocity,
    integrated and composed before ``init`` (for a small correction the same as ``init + delta``, but
    never folding where ``init`` does not: adding it folded 5 k voxels at a steep 10 mm collapse).

    Returns the refined voxel pull field (X, Y, Z, 3) float32 on the fixed grid.
    """
    import neurite.nn.functional as nef

    fixed = np.asarray(fixed, dtype=np.float32)
    moving_aligned = np.asarray(moving_aligned, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    init = np.asarray(init, dtype=np.float32)
    if init.shape != fixed.shape + (3,):
        raise ValueError(f"init field {init.shape} is not on the fixed grid {fixed.shape}+(3,)")
    if not mask.any() or iterations <= 0:
        return init.copy()
    top = max(levels)
    crop = mask_crop(mask, margin_vox, multiple=top)
    m_crop = extract(mask, crop)
    f_crop = as_image(normalise(extract(fixed, crop), m_crop > 0.5))
    mov_crop = as_image(normalise(extract(moving_aligned, crop), m_crop > 0.5))
    init_crop = field_to_torch(extract(init, crop))
    w_crop = torch.from_numpy(taper(crop))[None, None]
    delta = torch.zeros_like(init_crop)          # on the crop grid, fixed voxels
    for f in sorted(levels, reverse=True):
        size = crop.size // f
        pool = (lambda x: F.avg_pool3d(x, f)) if f > 1 else (lambda x: x)
        desc_f = _descriptor(pool(f_crop)[0, 0])[None]
        desc_m = _descriptor(pool(mov_crop)[0, 0])[None]
        m_lvl = (pool(as_image(m_crop)) > 0.5).float()
        if float(m_lvl.sum()) == 0:
            continue
        init_l = pool(init_crop) / f
        w_l = pool(w_crop)
        # parameter: the correction at this level (level voxels), started from the coarser result
        param = (pool(delta) / f).clone().requires_grad_(True)
        opt = torch.optim.Adam([param], lr=lr)
        for _ in range(iterations):
            d = nef.gaussian_smoothing(param, sigma=smooth_sigma) if smooth_sigma > 0 else param
            total = init_l + d * w_l
            warped = warp_torch(desc_m, total)
            sim = (((warped - desc_f) ** 2).mean(1, keepdim=True) * m_lvl).sum() / m_lvl.sum()
            loss = sim + alpha * _grad2(d * w_l)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            d = nef.gaussian_smoothing(param, sigma=smooth_sigma) if smooth_sigma > 0 else param
            delta = F.interpolate(d * f, scale_factor=f, mode="trilinear", align_corners=False) if f > 1 else d.clone()
    with torch.no_grad():  # the correction as a velocity, integrated (on at most 128^3) and composed
        v = delta * w_crop
        size = min(crop.size, 128)
        if size != crop.size:
            v = resize_field(v, (size,) * 3)
        delta = integrate_svf(v)
        if size != crop.size:
            delta = resize_field(delta, (crop.size,) * 3)
    src, dst = overlap(crop)          # the correction is zero outside the crop: compose only there
    out = init.copy()
    out[src] = compose(field_to_numpy(delta)[dst], init, origin=[sl.start for sl in src])
    return out
