"""Synthetic training pairs for the deformable network (SynthMorph's recipe) and their metrics.

Random label maps (argmax of smooth noise) -> two random deformations of the map (fixed, moving)
-> two random images of arbitrary contrast from those maps (per-label intensities, within-label
noise, blur, bias field, gamma, resolution loss, speckle-like noise, optional common field-of-view
mask). A pair is a pure function of its seed (random numbers are drawn on the CPU), so a training
run that indexes pairs by iteration resumes exactly and gives the same data on every device.

Conventions: tensors ``(B, C, X, Y, Z)``; images in [0, 1]; label maps int64; a displacement has
channels ``(3)`` in voxels of the working grid, channel ``c`` along axis ``c``, and is a **pull**
field on the fixed grid (the moving voxel for fixed voxel ``p`` is ``p + u[p]``), as in
:mod:`brainshift.fields`. Building blocks from neurite 0.3.4 / voxelmorph 0.3.4 (PyTorch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .network import integrate

VAL_SEED_BASE = 10_000_000  # validation pairs use seeds VAL_SEED_BASE + i, never used in training


def warp(image: torch.Tensor, disp: torch.Tensor, mode: str = "linear") -> torch.Tensor:
    """``out[p] = image(p + disp[p])`` for ``(B,C,*)`` image and ``(B,3,*)`` voxel pull field; zeros outside."""
    import voxelmorph as vxm

    return vxm.nn.functional.spatial_transform(image, disp, method=mode)


@dataclass
class GeneratorConfig:
    """Parameters of the synthetic pair generator (lengths in voxels of the working grid)."""

    shape: int = 48                       # cubic working shape
    n_labels: int = 16                    # labels per map
    label_coarse: tuple[int, int] = (3, 6)    # coarse noise grid size range for label maps
    svf_coarse: int = 5                   # coarse grid size of the random SVFs
    svf_std_max: float = 3.0              # max std of the SVF (voxels at shape 48; scaled with shape)
    intensity_std_max: float = 0.08       # within-label noise std (intensity in [0, 1])
    blur_max: float = 1.0                 # Gaussian blur sigma max (voxels)
    bias_std_max: float = 0.3             # log-bias field std max
    gamma_std: float = 0.25               # log-gamma std
    noise_std_max: float = 0.05           # additive noise std max after normalisation
    speckle_prob: float = 0.3             # probability of multiplicative (speckle-like) noise
    res_prob: float = 0.3                 # probability of a resolution loss along one axis
    mask_prob: float = 0.5                # probability of a common field-of-view mask (both images)
    same_contrast_prob: float = 0.0       # probability that both images share one contrast (curriculum)
    related_prob: float = 0.0             # probability that the moving contrast is a monotone map of the fixed's


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _smooth_noise(g: torch.Generator, shape: tuple[int, ...], coarse: int, device) -> torch.Tensor:
    """Smooth noise ``shape=(B,C,X,Y,Z)`` by linear upsampling of a ``coarse``^3 grid of N(0,1)."""
    import neurite.nn.functional as nef

    scale = [s / max(coarse, 2) for s in shape[2:]]
    return nef.upsample_noise(shape, scale, device=device, generator=g)


def _random_svf(g: torch.Generator, cfg: GeneratorConfig, batch: int, device) -> torch.Tensor:
    """A random smooth stationary velocity field ``(B,3,n,n,n)`` in voxels."""
    n = cfg.shape
    std = _u(g, 0.0, cfg.svf_std_max) * n / 48.0
    return _smooth_noise(g, (batch, 3, n, n, n), cfg.svf_coarse, device) * std


def _random_mask(g: torch.Generator, n: int, device) -> torch.Tensor:
    """A random smooth-edged field-of-view mask (ellipsoid cut by a plane), ``(1,1,n,n,n)`` in [0,1]."""
    ax = torch.linspace(-1, 1, n, device=device)
    x, y, z = torch.meshgrid(ax, ax, ax, indexing="ij")
    c = [_u(g, -0.3, 0.3) for _ in range(3)]
    r = [_u(g, 0.6, 1.1) for _ in range(3)]
    ell = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2
    normal = torch.randn(3, generator=g).to(device)
    normal = normal / normal.norm()
    plane = normal[0] * x + normal[1] * y + normal[2] * z - _u(g, -0.2, 0.6)
    inside = torch.minimum(1 - ell, -plane)
    return torch.sigmoid(inside * 20)[None, None]


def _synth_image(g: torch.Generator, labels: torch.Tensor, cfg: GeneratorConfig, means: torch.Tensor) -> torch.Tensor:
    """A random-contrast image ``(B,1,*)`` in [0,1] from integer labels ``(B,1,*)`` and label intensities
    ``means`` ``(B, n_labels)``; ``g`` draws everything else (within-label noise, blur, bias, gamma, noise)."""
    import neurite.nn.functional as nef

    device = labels.device
    b = labels.shape[0]
    n = cfg.shape
    means = means.to(device)
    stds = torch.rand(b, cfg.n_labels, generator=g).to(device) * cfg.intensity_std_max
    lab = labels[:, 0].long()
    flat = lab.reshape(b, -1)
    img = torch.gather(means, 1, flat).reshape(lab.shape)
    img = img + torch.gather(stds, 1, flat).reshape(lab.shape) * torch.randn(lab.shape, generator=g).to(device)
    img = img[:, None]
    sigma = _u(g, 0.0, cfg.blur_max)
    if sigma > 0.3:
        img = nef.gaussian_smoothing(img, sigma=sigma)
    if float(torch.rand((), generator=g)) < cfg.res_prob:   # thick slices along one axis
        axis = int(torch.randint(0, 3, (), generator=g))
        factor = _u(g, 1.5, 4.0)
        size = [n, n, n]
        size[axis] = max(int(n / factor), 4)
        img = F.interpolate(F.interpolate(img, size=size, mode="trilinear", align_corners=True),
                            size=(n, n, n), mode="trilinear", align_corners=True)
    bias = _smooth_noise(g, (b, 1, n, n, n), 4, device) * _u(g, 0.0, cfg.bias_std_max)
    img = img * torch.exp(bias)
    img = _minmax(img)
    img = img.clamp_min(0) ** math.exp(float(torch.randn((), generator=g)) * cfg.gamma_std)
    if float(torch.rand((), generator=g)) < cfg.speckle_prob:
        img = img * (1 + 0.3 * torch.randn(img.shape, generator=g).to(device)).clamp_min(0)
    img = img + torch.randn(img.shape, generator=g).to(device) * _u(g, 0.0, cfg.noise_std_max)
    return _minmax(img)


def _minmax(img: torch.Tensor) -> torch.Tensor:
    lo = img.flatten(1).min(1)[0].view(-1, 1, 1, 1, 1)
    hi = img.flatten(1).max(1)[0].view(-1, 1, 1, 1, 1)
    return (img - lo) / (hi - lo).clamp_min(1e-6)


def generate_pair(seed: int, cfg: GeneratorConfig | None = None, batch: int = 1,
                  device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """One synthetic training pair, fully determined by ``seed`` (and ``cfg``).

    Returns ``moving``/``fixed`` images ``(B,1,n,n,n)`` in [0,1], ``moving_labels``/
    ``fixed_labels`` integer maps ``(B,1,n,n,n)`` (int64), and ``truth``, the true pull field
    ``(B,3,n,n,n)`` (voxels) from the fixed to the moving grid: both maps are the same smooth noise
    seen through ``phi_f`` and ``phi_m`` (exponentials of random SVFs), so
    ``truth = d_f + d_m_inv o phi_f`` with ``d_m_inv = exp(-v_m) - id``; and ``mask`` ``(B,1,n,n,n)``
    in [0, 1], the common field of view both images were multiplied by (ones without one). Random numbers are drawn on
    the CPU (so a seed gives the same pair on every device) and moved to ``device``.
    """
    cfg = cfg or GeneratorConfig()
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    n = cfg.shape
    with torch.no_grad():
        coarse = int(torch.randint(cfg.label_coarse[0], cfg.label_coarse[1] + 1, (), generator=g))
        noise = _smooth_noise(g, (batch, cfg.n_labels, n, n, n), coarse, "cpu").to(device)
        out = {}
        svfs = {}
        for name in ("fixed", "moving"):
            svfs[name] = _random_svf(g, cfg, batch, "cpu").to(device)
            out[f"{name}_labels"] = warp(noise, integrate(svfs[name])).argmax(1, keepdim=True)
        d_f = integrate(svfs["fixed"])
        out["truth"] = d_f + warp(integrate(-svfs["moving"]), d_f)
        mask = None
        if float(torch.rand((), generator=g)) < cfg.mask_prob:
            mask = _random_mask(g, n, "cpu").to(device)
        same = float(torch.rand((), generator=g)) < cfg.same_contrast_prob
        contrast_seeds = torch.randint(0, 2 ** 62, (2,), generator=g).tolist()
        related = float(torch.rand((), generator=g)) < cfg.related_prob and not same
        means = {}
        for name, cs in zip(("fixed", "moving"), contrast_seeds):
            gc = torch.Generator(device="cpu").manual_seed(contrast_seeds[0] if same else cs)
            means[name] = torch.rand(batch, cfg.n_labels, generator=gc)   # label intensities, uniform in [0, 1]
            if name == "moving" and related:   # instead: a random monotone (maybe inverted) map of the fixed's
                linked = means["fixed"] ** math.exp(0.5 * float(torch.randn((), generator=g)))
                if float(torch.rand((), generator=g)) < 0.5:
                    linked = 1 - linked
                means[name] = (linked + 0.1 * torch.randn(linked.shape, generator=g)).clamp(0, 1)
            img = _synth_image(gc, out[f"{name}_labels"].cpu(), cfg, means[name]).to(device)
            out[name] = img * mask if mask is not None else img
        out["mask"] = mask.expand_as(out["fixed"]).clone() if mask is not None else torch.ones_like(out["fixed"])
    return out


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
def soft_dice_loss(fixed_onehot: torch.Tensor, warped_onehot: torch.Tensor) -> torch.Tensor:
    """``1 - mean_label Dice`` between ``(B,L,*)`` probability maps."""
    dims = tuple(range(2, fixed_onehot.ndim))
    inter = (fixed_onehot * warped_onehot).sum(dims)
    denom = fixed_onehot.sum(dims) + warped_onehot.sum(dims)
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    return 1 - dice.mean()


def grad_penalty(disp: torch.Tensor) -> torch.Tensor:
    """SynthMorph's regulariser ``1/2 mean |grad u|^2`` (forward differences, voxel units)."""
    total = 0.0
    for d in range(2, disp.ndim):
        diff = disp.diff(dim=d)
        total = total + (diff ** 2).mean()
    return 0.5 * total


def onehot(labels: torch.Tensor, n_labels: int) -> torch.Tensor:
    return F.one_hot(labels[:, 0], n_labels).movedim(-1, 1).float()


def hard_dice(fixed_labels: torch.Tensor, moving_labels: torch.Tensor, disp: torch.Tensor | None,
              n_labels: int) -> float:
    """Mean Dice over labels present in the fixed map after warping the moving labels (nearest)."""
    warped = moving_labels if disp is None else warp(moving_labels.float(), disp, mode="nearest").long()
    scores = []
    for lab in range(n_labels):
        a = fixed_labels == lab
        b = warped == lab
        s = int(a.sum()) + int(b.sum())
        if int(a.sum()) > 0:
            scores.append(2 * int((a & b).sum()) / s)
    return float(sum(scores) / max(len(scores), 1))


def boundary_mask(labels: torch.Tensor, width: int = 1) -> torch.Tensor:
    """``(B,1,*)`` bool: voxels within ``width`` voxels (26-neighbourhood) of a different label.

    Endpoint error over uniform regions cannot fall much whatever the method (nothing there tells
    one position from another), so the deformable network is judged near label boundaries.
    """
    lab = labels.float()
    k = 2 * width + 1
    hi = F.max_pool3d(lab, k, stride=1, padding=width)
    lo = -F.max_pool3d(-lab, k, stride=1, padding=width)
    return hi != lo


def pair_metrics(pair: dict[str, torch.Tensor], disp: torch.Tensor | None, n_labels: int) -> dict[str, float]:
    """Dice, endpoint error (EPE, working voxels) over the grid and near label boundaries, for ``disp``.

    ``disp`` None is the identity. Boundaries are those of the fixed label map (:func:`boundary_mask`):
    ``bepe`` over the whole grid, ``bepe_fov`` only inside the field of view (``pair["mask"] > 0.5``),
    where the images show the boundaries at all (outside it both images are zero).
    """
    err = pair["truth"] if disp is None else disp - pair["truth"]
    norm = err.norm(dim=1, keepdim=True)
    edge = boundary_mask(pair["fixed_labels"])
    seen = edge & (pair["mask"] > 0.5) if "mask" in pair else edge
    return {"dice": hard_dice(pair["fixed_labels"], pair["moving_labels"], disp, n_labels),
            "epe": float(norm.mean()), "bepe": float(norm[edge].mean()), "bepe_fov": float(norm[seen].mean())}


@torch.no_grad()
def held_out_metrics(net: torch.nn.Module, cfg: GeneratorConfig, seeds: range,
                     device: str | torch.device = "cpu") -> dict[str, float]:
    """Mean :func:`pair_metrics` over the pairs of ``seeds``: identity (``*_before``) and ``net`` (``*_after``).

    ``net`` is put in eval mode for the call and returned to its previous mode.
    """
    was_training = net.training
    net.eval()
    rows = []
    for seed in seeds:
        p = generate_pair(seed, cfg, 1, device)
        disp = net(p["moving"], p["fixed"]).float()
        before, after = pair_metrics(p, None, cfg.n_labels), pair_metrics(p, disp, cfg.n_labels)
        rows.append({**{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()}})
    net.train(was_training)
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
