"""Self-similarity context (SSC) descriptor and the SSC mean squared difference.

After Heinrich et al., "Towards realtime multimodal fusion for image-guided interventions using
self-similarity", MICCAI 2013. For every voxel ``x`` and each of the 12 pairs ``(a, b)`` of
six-neighbourhood offsets that lie ``sqrt(2)`` apart (e.g. ``+i`` and ``+j``, never ``+i`` and
``-i``), the patch distance

    D_ab(x) = sum_y w(y) * (I(x + d*a + y) - I(x + d*b + y))^2

is computed with a box (or Gaussian) patch weighting ``w`` of radius ``radius`` and offsets scaled
by ``dilation`` ``d`` (voxels). Then, per voxel, the smallest of the 12 distances is subtracted,
the local variance estimate ``V(x)`` is the mean of the 12 distances (clamped to
``[1e-3, 1e3] x`` its volume mean, so flat regions do not divide by zero), and
``SSC_ab(x) = exp(-D_ab(x) / V(x))``.

Invariance: an intensity map ``I -> s*I + c`` scales every ``D`` and ``V`` by ``s^2``, so SSC is
exactly invariant to affine intensity maps, inversion (``s < 0``) included. A smooth non-linear
monotone map is locally affine, so SSC is only approximately invariant to it.

Everything is computed in float32 with PyTorch on the input tensor's device (CPU or CUDA give the
same numbers within float tolerance). Volumes are indexed ``[i, j, k]`` like
:class:`brainshift.io.Volume`.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

#: The six-neighbourhood offsets (voxels).
SIX = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
#: The 12 pairs of six-neighbours at distance sqrt(2) (pairs of opposite neighbours are excluded).
PAIRS = tuple((a, b) for a, b in itertools.combinations(SIX, 2)
              if sum((p - q) ** 2 for p, q in zip(a, b)) == 2)
assert len(PAIRS) == 12

#: Volumes larger than this (voxels per axis) are mean-pooled by a power of two in :func:`ssc_mse`.
DEFAULT_MAX_SIZE = 128


def _as_tensor(vol: torch.Tensor | np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    if isinstance(vol, torch.Tensor):
        t = vol.to(dtype=torch.float32, device=device if device is not None else vol.device)
    else:
        t = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))
        if device is not None:
            t = t.to(device)
    if t.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {tuple(t.shape)}")
    return t


def _kernel1d(radius: int, kernel: str, device: torch.device) -> torch.Tensor:
    if kernel == "box":
        w = torch.ones(2 * radius + 1, dtype=torch.float32, device=device)
    elif kernel == "gauss":  # sigma = radius / 2 + 0.5: a Gaussian that is ~0 at the patch edge
        x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
        w = torch.exp(-0.5 * (x / (0.5 * radius + 0.5)) ** 2)
    else:
        raise ValueError(f"kernel must be 'box' or 'gauss', not {kernel!r}")
    return w / w.sum()


def _smooth(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Separable filter of a 3D tensor with the 1D kernel ``w`` (edge voxels replicated).

    Written as weighted sums of shifted views: faster on CPU than ``conv3d`` for short kernels.
    """
    r = (w.numel() - 1) // 2
    if r == 0:
        return x
    for axis in range(3):
        n = x.shape[axis]
        first = x.narrow(axis, 0, 1).expand(*[r if a == axis else s for a, s in enumerate(x.shape)])
        last = x.narrow(axis, n - 1, 1).expand(*[r if a == axis else s for a, s in enumerate(x.shape)])
        padded = torch.cat([first, x, last], dim=axis)
        out = padded.narrow(axis, 0, n) * w[0]
        for t in range(1, w.numel()):
            out.add_(padded.narrow(axis, t, n), alpha=float(w[t]))
        x = out
    return x


def ssc_descriptor(vol: torch.Tensor | np.ndarray, radius: int = 1, dilation: int = 2,
                   kernel: str = "box", device: torch.device | str | None = None) -> torch.Tensor:
    """SSC descriptor of a 3D volume: float32 tensor (12, X, Y, Z) with values in (0, 1].

    ``radius``: patch radius in voxels (box of ``2*radius+1`` voxels per axis, or a Gaussian of the
    same support with ``kernel='gauss'``). ``dilation``: distance in voxels of the six neighbours
    from the centre. Computed on ``vol``'s device (a numpy array goes to ``device``, default CPU).
    Borders are handled by replicating the edge voxels.
    """
    t = _as_tensor(vol, device)
    d = int(dilation)
    w = _kernel1d(int(radius), kernel, t.device)
    padded = F.pad(t[None, None], [d] * 6, mode="replicate")[0, 0]
    nx, ny, nz = t.shape

    def shifted(off: tuple[int, int, int]) -> torch.Tensor:
        i, j, k = (d + d * o for o in off)
        return padded[i:i + nx, j:j + ny, k:k + nz]

    out = torch.empty((12,) + tuple(t.shape), dtype=torch.float32, device=t.device)
    for c, (a, b) in enumerate(PAIRS):  # one channel at a time keeps the memory peak low
        out[c] = _smooth((shifted(a) - shifted(b)) ** 2, w)
    out -= out.min(dim=0, keepdim=True).values
    var = out.mean(dim=0, keepdim=True)
    mean_var = var.mean()
    if float(mean_var) <= 0:  # a constant image: all distances 0 -> descriptor of ones
        return torch.ones_like(out)
    var = var.clamp(min=float(mean_var) * 1e-3, max=float(mean_var) * 1e3)
    return torch.exp(out.div_(var).neg_())


def downsample(vol: torch.Tensor | np.ndarray, factor: int) -> torch.Tensor:
    """Mean-pool a volume by an integer ``factor`` per axis (voxel ``n`` covers ``factor*n ..``).

    Trailing voxels that do not fill a whole block are dropped. float32 tensor on ``vol``'s device.
    """
    t = _as_tensor(vol)
    if factor == 1:
        return t
    return F.avg_pool3d(t[None, None], kernel_size=factor, stride=factor)[0, 0]


def auto_factor(shape: tuple[int, ...], max_size: int = DEFAULT_MAX_SIZE) -> int:
    """Smallest power of two that brings every axis of ``shape`` to at most ``max_size`` voxels."""
    f = 1
    while max(shape) / f > max_size:
        f *= 2
    return f


def descriptor_mse(desc_fixed: torch.Tensor, desc_moving: torch.Tensor,
                   mask: torch.Tensor | np.ndarray | None = None) -> float:
    """Mean over the 12 channels and the mask voxels of the squared descriptor difference."""
    sq = ((desc_fixed - desc_moving) ** 2).mean(dim=0)
    if mask is None:
        return float(sq.mean())
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask,
                        device=sq.device).bool()
    if m.shape != sq.shape:
        raise ValueError(f"mask shape {tuple(m.shape)} does not match the descriptor grid {tuple(sq.shape)}")
    n = int(m.sum())
    if n == 0:
        raise ValueError("the mask is empty")
    return float(sq[m].sum() / n)


def downsample_mask(mask: torch.Tensor | np.ndarray, factor: int,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask on the grid of :func:`downsample`: a block is in when more than half of it is."""
    if isinstance(mask, torch.Tensor):
        mask = mask.float()
    return downsample(_as_tensor(mask, device), factor) > 0.5


def ssc_mse(fixed: np.ndarray | torch.Tensor, moving: np.ndarray | torch.Tensor,
            mask: np.ndarray | torch.Tensor | None = None, *, radius: int = 1, dilation: int = 2,
            factor: int | None = None, device: torch.device | str | None = None) -> float:
    """Mean squared difference of the SSC descriptors of two volumes on one grid, inside ``mask``.

    ``factor``: both volumes (and the mask) are first mean-pooled by this factor; ``None`` picks the
    smallest power of two that brings every axis to at most 128 voxels (a 256^3 0.5 mm volume is
    compared at 1 mm, 128^3), which keeps this to about a second on 2 CPU cores. ``radius`` and
    ``dilation`` are in voxels of the pooled grid. Lower is more similar; 0 for identical images.
    """
    if tuple(fixed.shape) != tuple(moving.shape):
        raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} are not on one grid")
    f = auto_factor(tuple(fixed.shape)) if factor is None else int(factor)
    dev = device if device is not None else (fixed.device if isinstance(fixed, torch.Tensor) else None)
    a = ssc_descriptor(downsample(_as_tensor(fixed, dev), f), radius, dilation)
    b = ssc_descriptor(downsample(_as_tensor(moving, dev), f), radius, dilation)
    m = None if mask is None else downsample_mask(mask, f, a.device)
    return descriptor_mse(a, b, m)
