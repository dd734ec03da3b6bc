"""CycleGAN losses: least-squares GAN, cycle L1, identity L1, and the correlation loss L_cor.

All take tensors ``(B, 1, X, Y, Z)`` in the normalised range ``[-1, 1]``. ``mask`` (same shape,
0/1) restricts a loss to the iUS field of view; without it every voxel counts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lsgan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss (Mao et al.): mean (D(x) - 1)^2 for real targets, D(x)^2 for fake."""
    target = 1.0 if real else 0.0
    return ((logits.float() - target) ** 2).mean()


def masked_l1(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute difference (cycle and identity losses), over ``mask`` when given."""
    diff = (a.float() - b.float()).abs()
    if mask is None:
        return diff.mean()
    return (diff * mask).sum() / mask.sum().clamp_min(1.0)


def local_ncc(a: torch.Tensor, b: torch.Tensor, window: int = 9, eps: float = 1e-4) -> torch.Tensor:
    """Local normalised cross-correlation map in ``[-1, 1]`` over cubic windows of ``window`` voxels.

    Computed with box filters (zero padding at the patch border); shape as the inputs.
    """
    a, b = a.float(), b.float()
    pad = window // 2

    def box(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(x, window, stride=1, padding=pad, count_include_pad=False)

    mu_a, mu_b = box(a), box(b)
    var_a = (box(a * a) - mu_a ** 2).clamp_min(0.0)
    var_b = (box(b * b) - mu_b ** 2).clamp_min(0.0)
    cov = box(a * b) - mu_a * mu_b
    return cov / torch.sqrt((var_a + eps) * (var_b + eps))


def correlation_loss(inp: torch.Tensor, out: torch.Tensor, mask: torch.Tensor | None = None,
                     window: int = 9) -> torch.Tensor:
    """L_cor = 1 - mean(LNCC^2) between a generator's input and its output (squared local NCC).

    The square makes it sign-insensitive: US and T1 contrasts may be inverted relative to one
    another (an edge that is bright in one may be dark in the other), but structure in the output
    must be explained, window by window, by an affine intensity map of the input -- this stops the
    generator from inventing structure. Low-variance windows (flat regions) contribute little
    (``eps`` in :func:`local_ncc`). Range ``[0, 1]``, 0 for a perfect local (anti-)correlation.
    """
    r2 = local_ncc(inp, out, window) ** 2
    if mask is None:
        return 1.0 - r2.mean()
    return 1.0 - (r2 * mask).sum() / mask.sum().clamp_min(1.0)


def ssc_descriptors(x: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """Differentiable batched SSC descriptor ``(B, 12, X, Y, Z)`` of ``x`` ``(B, 1, X, Y, Z)``: the
    definition of :func:`brainshift.ssc.ssc_descriptor` (box patches of ``2*radius+1`` voxels, the
    12 six-neighbour pairs ``dilation`` voxels out, minimum subtracted, divided by the local mean
    distance clamped to ``[1e-3, 1e3]`` x its patch mean), written for autograd."""
    from ..ssc import PAIRS

    x = x.float()
    d = int(dilation)
    padded = F.pad(x, [d] * 6, mode="replicate")
    n = x.shape[2:]

    def shifted(off: tuple[int, int, int]) -> torch.Tensor:
        i, j, k = (d + d * o for o in off)
        return padded[:, :, i:i + n[0], j:j + n[1], k:k + n[2]]

    dist = torch.cat([(shifted(a) - shifted(b)) ** 2 for a, b in PAIRS], dim=1)
    size = 2 * radius + 1
    dist = F.avg_pool3d(F.pad(dist, [radius] * 6, mode="replicate"), size, stride=1)
    dist = dist - dist.min(dim=1, keepdim=True).values
    var = dist.mean(dim=1, keepdim=True)
    mean_var = var.mean(dim=(2, 3, 4), keepdim=True).detach().clamp_min(1e-12)
    var = torch.minimum(torch.maximum(var, 1e-3 * mean_var), 1e3 * mean_var)
    return torch.exp(-dist / var)


def ssc_loss(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference of the SSC descriptors of ``a`` and ``b`` (the pipeline's SSC-MSE,
    a structural, contrast-free comparison; structure-constrained CycleGANs use MIND alike),
    over ``mask`` when given."""
    sq = ((ssc_descriptors(a) - ssc_descriptors(b)) ** 2).mean(dim=1, keepdim=True)
    if mask is None:
        return sq.mean()
    return (sq * mask).sum() / mask.sum().clamp_min(1.0)
