"""LC2: linear correlation of linear combination, the standard MR-ultrasound similarity.

After Wein et al., "Global registration of ultrasound to MRI using the LC2 metric for enabling
neurosurgical guidance", MICCAI 2013 (and Fuerst et al., MedIA 2014). Ultrasound shows both tissue
echogenicity and interfaces, so in a small patch the iUS ``u`` is modelled as a linear combination
of the MR intensity ``p`` and the MR gradient magnitude ``g``:

    u ~ a * p + b * g + c        (least squares, per patch)

and the patch's score is the share of the iUS variance this explains,
``LC2_patch = 1 - var(residual) / var(u)`` in [0, 1]. The volume's score weights each patch by its
iUS variance, so flat or empty patches count for nothing:

    LC2 = sum_patches var(u) * LC2_patch / sum_patches var(u)
        = sum_patches explained variance / sum_patches var(u).

Here every voxel of the mask is a patch centre (dense LC2): the local means and (co)variances are
box filters of side ``patch`` voxels (separable running sums), so the whole score is one filtering
of nine channels, with no loop over patches. The 2x2 normal equations of ``(a, b)`` are solved per voxel in
closed form, with a small ridge so that flat MR patches do not divide by zero.

Higher is more similar: 1 when the iUS is exactly an affine map of the MR intensity (or of its
gradient), about 0 for unrelated noise. Torch float32 on the input's device; volumes on one grid,
indexed ``[i, j, k]``; ``patch`` in voxels of that grid (the MR is the *moving image resampled on
the fixed grid*).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .ssc import _as_tensor, auto_factor, downsample, downsample_mask


def _box(x: torch.Tensor, size: int) -> torch.Tensor:
    """Local mean over cubes of ``size`` voxels along the last three axes of ``x``, zero padded.

    Separable running sums (cumsum along each axis): the cost does not grow with ``size``.
    """
    r = size // 2
    for axis in range(x.ndim - 3, x.ndim):
        n = x.shape[axis]
        shape = list(x.shape)
        shape[axis] = 1
        zero = x.new_zeros(shape)
        padded = torch.cat([zero.expand(*[r + 1 if a == axis else s for a, s in enumerate(shape)]), x,
                            zero.expand(*[r if a == axis else s for a, s in enumerate(shape)])], dim=axis)
        c = padded.cumsum(dim=axis)
        x = (c.narrow(axis, size, n) - c.narrow(axis, 0, n)) / size
    return x


def gradient_magnitude(vol: torch.Tensor) -> torch.Tensor:
    """|grad| over the last three axes by central differences (one-sided at the borders), per voxel."""
    g = torch.gradient(vol, dim=(-3, -2, -1))
    return torch.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2)


def lc2_map(us: torch.Tensor | np.ndarray, mr: torch.Tensor | np.ndarray, patch: int = 7,
            ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-voxel (explained variance, iUS variance) of patches of ``patch`` voxels (odd).

    ``mr`` may carry leading batch axes (B, X, Y, Z): several MR positions against one iUS.
    Returns two tensors of ``mr``'s shape; their sums over a mask give :func:`lc2`.
    ``ridge`` is relative to the MR's global variance.
    """
    if patch % 2 != 1 or patch < 3:
        raise ValueError(f"patch must be an odd number of voxels >= 3, got {patch}")
    u = _as_tensor(us)
    p = mr.float() if isinstance(mr, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(mr, dtype=np.float32))
    if u.shape != p.shape[-3:]:
        raise ValueError(f"iUS {tuple(u.shape)} and MR {tuple(p.shape)} are not on one grid")
    # one scale for the MR and its gradient, so the ridge means the same for both
    dims = (-3, -2, -1)
    p = (p - p.mean(dim=dims, keepdim=True)) / (p.std(dim=dims, keepdim=True) + 1e-8)
    u = ((u - u.mean()) / (u.std() + 1e-8)).expand_as(p)
    g = gradient_magnitude(p)
    mu, mp, mg, spp, sgg, spg, sup, sug, suu = _box(torch.stack([u, p, g, p * p, g * g, p * g, u * p, u * g, u * u]),
                                                    patch)
    vpp = spp - mp * mp + ridge
    vgg = sgg - mg * mg + ridge
    vpg = spg - mp * mg
    cup = sup - mu * mp
    cug = sug - mu * mg
    vuu = (suu - mu * mu).clamp_min(0)
    det = (vpp * vgg - vpg * vpg).clamp_min(1e-12)
    # explained variance b^T C^-1 b of the 2x2 least squares (C = cov of (p, g), b = cov with u)
    explained = (vgg * cup * cup - 2 * vpg * cup * cug + vpp * cug * cug) / det
    return torch.minimum(explained.clamp_min(0), vuu), vuu


def lc2(us: torch.Tensor | np.ndarray, mr: torch.Tensor | np.ndarray,
        mask: torch.Tensor | np.ndarray | None = None, *, patch: int = 7, factor: int | None = None) -> float:
    """LC2 of the iUS against an MR on the same grid, inside ``mask`` (patch centres), in [0, 1].

    ``factor``: both volumes (and the mask) are first mean-pooled by it; ``None`` pools to at most
    128 voxels per axis (a 256^3 0.5 mm pair is compared at 1 mm, 7 mm patches). Higher is better.
    """
    f = auto_factor(tuple(us.shape)) if factor is None else int(factor)
    u, p = downsample(us, f), downsample(mr, f)
    explained, var = lc2_map(u, p, patch)
    if mask is not None:
        m = downsample_mask(mask, f, u.device)
        if m.shape != var.shape:
            raise ValueError(f"mask {tuple(m.shape)} does not match the pooled grid {tuple(var.shape)}")
        explained, var = explained[m], var[m]
    total = float(var.sum())
    return float(explained.sum()) / total if total > 0 else 0.0


def lc2_batch(us: torch.Tensor | np.ndarray, mrs: torch.Tensor, mask: torch.Tensor, *, patch: int = 7) -> torch.Tensor:
    """LC2 of one iUS against a batch of MRs ``mrs`` (B, X, Y, Z) on its grid, inside ``mask``: (B,).

    No pooling (the caller's grid); the same numbers as :func:`lc2` with ``factor=1``, one call.
    """
    explained, var = lc2_map(us, mrs, patch)
    m = mask.bool()
    total = var[..., m].sum(-1)
    return explained[..., m].sum(-1) / total.clamp_min(1e-12)
