"""Deformable stage: SynthMorph inside the iUS field of view, optional instance refinement, a guard.

Conventions (as :mod:`brainshift.fields`): every field here is a **voxel pull field on the fixed
grid**, shape ``fixed.shape + (3,)``, float32: the voxel of the (affinely pre-aligned) moving image
that corresponds to fixed voxel ``p`` is ``p + disp[p]``. The moving input is the MR *after* the
affine stage, already resampled onto the fixed grid, so the deformable field relates the fixed
grid to that intermediate image; the lead composes ``fields.compose(deform_field, affine_field)``.

* :func:`predict_field` — the paper's SynthMorph step: crop both images to the iUS mask's bounding
  box (+ margin), normalise, resize (isotropically, as a cube) to the model's working shape,
  predict a stationary velocity field (SVF), bring the SVF back to the crop grid (vectors scaled by
  the resize factor: voxel units), multiply it by a smooth taper that is 1 on the mask's bounding box
  and 0 at the crop edge, and integrate it (scaling and squaring) on the crop grid. Tapering the
  *velocity* rather than the displacement keeps the result diffeomorphic, and the field is exactly
  zero outside the crop (no deformation is estimated outside the iUS).
* :func:`refine_field` — instance optimisation (beyond the paper): Adam on a displacement
  correction, coarse to fine, SSC-descriptor MSE inside the mask + diffusion regularisation.
* :func:`guard` — keep a deformable result only if SSC-MSE inside the mask improves by a margin and
  the field is plausible (no folds, SDlogJ and maximum displacement under bounds).

Regularisation control: one trained model per lambda (``model/synthmorph/synthmorph_l{lam:.2f}.pt``);
:func:`load_model` picks the one nearest to the requested value (only 0.50 ships for now).
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import model_dir

log = logging.getLogger(__name__)

_STEM = re.compile(r"^synthmorph_l(?P<lam>\d+\.\d+)\.pt$")


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
@dataclass
class SynthMorphModel:
    """A trained network and what inference needs to know about it."""

    net: torch.nn.Module      # (moving, fixed) (B,1,n,n,n) -> SVF with return_field_type='velocity'
    shape: int                # cubic working shape n (voxels)
    lam: float                # regularisation it was trained with
    device: torch.device
    path: Path
    card: dict

    @torch.no_grad()
    def velocity(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """SVF ``(1,3,n,n,n)`` in working-grid voxels for images ``(1,1,n,n,n)`` in [0, 1]."""
        return self.net(moving.to(self.device), fixed.to(self.device), return_field_type="velocity").float()


def available_models(directory: Path | None = None) -> dict[float, Path]:
    """``{lambda: path}`` of the weight files in ``directory`` (default: the shipped ones)."""
    directory = Path(directory or model_dir() / "synthmorph")
    out = {}
    for p in sorted(directory.glob("synthmorph_l*.pt")):
        m = _STEM.match(p.name)
        if m:
            out[float(m["lam"])] = p
    return out


def load_model(path: Path | str | None = None, device: str | None = None,
               regularisation: float = 0.5) -> SynthMorphModel:
    """Load a trained SynthMorph network (weights written by :mod:`brainshift.synthmorph_train`).

    ``path``: a weight file, or a folder in which the model whose lambda is nearest to
    ``regularisation`` is chosen (default folder: ``model/synthmorph/`` of the repository).
    ``device``: 'cpu' or 'cuda' (default: cuda if available). Loaded models are cached.
    """
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    p = Path(path) if path is not None else model_dir() / "synthmorph"
    if p.is_dir():
        models = available_models(p)
        if not models:
            raise FileNotFoundError(f"{p}: no synthmorph_l*.pt weights (train them: brainshift train-synthmorph)")
        lam = min(models, key=lambda v: abs(v - regularisation))
        if abs(lam - regularisation) > 1e-6:
            log.warning("no SynthMorph model for regularisation %.2f in %s; using lambda %.2f", regularisation, p, lam)
        p = models[lam]
    if not p.is_file():
        raise FileNotFoundError(f"{p}: SynthMorph weights not found")
    return _load_cached(str(p.resolve()), dev)


@lru_cache(maxsize=4)
def _load_cached(path: str, device: str) -> SynthMorphModel:
    from .synthmorph_train import build_network

    ck = torch.load(path, map_location=device, weights_only=False)
    net = build_network(ck["net"])
    net.load_state_dict(ck["model"])
    net.to(device).eval()
    return SynthMorphModel(net=net, shape=int(ck["shape"]), lam=float(ck["lambda"]), device=torch.device(device),
                           path=Path(path), card=ck.get("card", {}))


# --------------------------------------------------------------------------------------------
# crop geometry
# --------------------------------------------------------------------------------------------
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


def _extract(vol: np.ndarray, crop: Crop) -> np.ndarray:
    """The cube of ``vol`` (zero where it leaves the grid)."""
    out = np.zeros((crop.size,) * 3 + vol.shape[3:], dtype=np.float32)
    src = [slice(max(l, 0), min(l + crop.size, n)) for l, n in zip(crop.lo, crop.grid)]
    dst = [slice(s.start - l, s.stop - l) for s, l in zip(src, crop.lo)]
    out[tuple(dst)] = vol[tuple(src)]
    return out


def _insert(field_crop: np.ndarray, crop: Crop) -> np.ndarray:
    """A (X,Y,Z,3) zero field on the fixed grid with the cube's values pasted in."""
    out = np.zeros(crop.grid + (3,), dtype=np.float32)
    src = [slice(max(l, 0), min(l + crop.size, n)) for l, n in zip(crop.lo, crop.grid)]
    dst = [slice(s.start - l, s.stop - l) for s, l in zip(src, crop.lo)]
    out[tuple(src)] = field_crop[tuple(dst)]
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


# --------------------------------------------------------------------------------------------
# torch helpers (fields as (B,3,X,Y,Z), voxel units, channel c along axis c)
# --------------------------------------------------------------------------------------------
def _t(vol: np.ndarray, device=None) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None, None].to(device or "cpu")


def _field_t(disp: np.ndarray, device=None) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(disp, -1, 0), dtype=np.float32))[None].to(device or "cpu")


def _field_np(disp: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(disp[0].detach().cpu().numpy(), 0, -1), dtype=np.float32)


def _warp_t(img: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    import voxelmorph as vxm

    return vxm.nn.functional.spatial_transform(img, disp, padding_mode="border")


def _resize_field(disp: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
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


# --------------------------------------------------------------------------------------------
# SynthMorph prediction
# --------------------------------------------------------------------------------------------
def predict_field(fixed: np.ndarray, moving_aligned: np.ndarray, mask: np.ndarray, *,
                  model: SynthMorphModel | None = None, regularisation: float = 0.5, margin_vox: int = 8,
                  mask_inputs: bool = True, max_integration_size: int = 160) -> np.ndarray:
    """SynthMorph field between the fixed image and the affinely aligned moving image, iUS FOV only.

    ``fixed``: synthetic T1 or iUS on the fixed grid; ``moving_aligned``: the MR resampled onto the
    fixed grid by the affine stage; ``mask``: the iUS field of view (bool, fixed grid).
    ``margin_vox``: margin (fixed voxels) added around the mask's bounding box; the taper to zero
    lies in this margin. ``mask_inputs``: zero both images outside the mask before prediction (the
    paper crops the moving image to the iUS mask). ``regularisation``: lambda of the model used
    when ``model`` is None. The SVF is integrated on the crop grid, or on a grid of at most
    ``max_integration_size`` voxels per axis whose result is resampled to the crop.

    Returns a voxel pull field (X, Y, Z, 3) float32 on the fixed grid, zero outside the crop.
    """
    fixed = np.asarray(fixed, dtype=np.float32)
    moving_aligned = np.asarray(moving_aligned, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if not (fixed.shape == moving_aligned.shape == mask.shape):
        raise ValueError(f"fixed {fixed.shape}, moving {moving_aligned.shape} and mask {mask.shape} must share the fixed grid")
    if not mask.any():
        return np.zeros(fixed.shape + (3,), dtype=np.float32)
    if model is None:
        model = load_model(regularisation=regularisation)
    elif abs(model.lam - regularisation) > 1e-6:
        log.warning("model %s was trained with lambda %.2f, not %.2f", model.path.name, model.lam, regularisation)
    crop = mask_crop(mask, margin_vox)
    m = _extract(mask.astype(np.float32), crop) > 0.5
    f_img = normalise(_extract(fixed, crop), m)
    m_img = normalise(_extract(moving_aligned, crop), m)
    if mask_inputs:
        f_img, m_img = f_img * m, m_img * m
    n = model.shape
    with torch.no_grad():
        f_t = F.interpolate(_t(f_img), size=(n,) * 3, mode="trilinear", align_corners=True)
        m_t = F.interpolate(_t(m_img), size=(n,) * 3, mode="trilinear", align_corners=True)
        svf = model.velocity(m_t, f_t).cpu()
        size = min(crop.size, max_integration_size)
        svf = _resize_field(svf, (size,) * 3)                       # working voxels -> integration voxels
        w = torch.from_numpy(taper(crop))[None, None]
        if size != crop.size:
            w = F.interpolate(w, size=(size,) * 3, mode="trilinear", align_corners=True)
        disp = integrate_svf(svf * w)
        if size != crop.size:
            disp = _resize_field(disp, (crop.size,) * 3)
    return _insert(_field_np(disp), crop)


# --------------------------------------------------------------------------------------------
# instance refinement
# --------------------------------------------------------------------------------------------
def _descriptor(vol: torch.Tensor) -> torch.Tensor:
    """SSC descriptor (12, X, Y, Z) of a 3D tensor (brainshift.ssc, else a local MIND-like one)."""
    try:
        from .ssc import ssc_descriptor
    except ImportError:  # pragma: no cover - ssc.py is part of the package
        return _mind_like(vol)
    return ssc_descriptor(vol, radius=1, dilation=1)


def _mind_like(vol: torch.Tensor) -> torch.Tensor:  # pragma: no cover - fallback only
    v = vol[None, None]
    offs = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    p = F.pad(v, [1] * 6, mode="replicate")
    n = vol.shape
    d = torch.cat([F.avg_pool3d((p[..., 1 + a:1 + a + n[0], 1 + b:1 + b + n[1], 1 + c:1 + c + n[2]] - v) ** 2, 3, 1, 1)
                   for a, b, c in offs], 1)
    var = d.mean(1, keepdim=True).clamp_min(1e-6)
    return torch.exp(-d / var)[0]


def _grad2(disp: torch.Tensor) -> torch.Tensor:
    return sum((disp.diff(dim=d) ** 2).mean() for d in range(2, 5))


def refine_field(fixed: np.ndarray, moving_aligned: np.ndarray, mask: np.ndarray, init: np.ndarray, *,
                 iterations: int = 40, levels: tuple[int, ...] = (4, 2), alpha: float = 1.0,
                 lr: float = 0.3, margin_vox: int = 8, smooth_sigma: float = 1.0) -> np.ndarray:
    """Instance optimisation of a field on the pair itself (beyond the paper; CLI ``--refine``).

    Optimises a correction ``delta`` so that ``init + delta`` (voxel pull field on the fixed grid,
    warping ``moving_aligned``) minimises the SSC-descriptor MSE inside ``mask`` plus ``alpha`` x the
    diffusion energy (mean squared forward differences, in voxels of the level) of ``init + delta``.
    Coarse to fine: for each pooling factor in ``levels`` (fixed voxels per level voxel), Adam
    (``lr`` level voxels) runs ``iterations`` steps on ``delta`` sampled at that level, Gaussian
    smoothed (``smooth_sigma`` level voxels). Only the mask's bounding box + ``margin_vox`` is
    changed; the correction is tapered to zero in the margin like :func:`predict_field`.

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
    m_crop = _extract(mask.astype(np.float32), crop)
    f_crop = _t(normalise(_extract(fixed, crop), m_crop > 0.5))
    mov_crop = _t(normalise(_extract(moving_aligned, crop), m_crop > 0.5))
    init_crop = _field_t(_extract(init, crop))
    w_crop = torch.from_numpy(taper(crop))[None, None]
    delta = torch.zeros_like(init_crop)          # on the crop grid, fixed voxels
    for f in sorted(levels, reverse=True):
        size = crop.size // f
        pool = (lambda x: F.avg_pool3d(x, f)) if f > 1 else (lambda x: x)
        desc_f = _descriptor(pool(f_crop)[0, 0])[None]
        desc_m = _descriptor(pool(mov_crop)[0, 0])[None]
        m_lvl = (pool(_t(m_crop)) > 0.5).float()
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
            warped = _warp_t(desc_m, total)
            sim = (((warped - desc_f) ** 2).mean(1, keepdim=True) * m_lvl).sum() / m_lvl.sum()
            loss = sim + alpha * _grad2(total)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            d = nef.gaussian_smoothing(param, sigma=smooth_sigma) if smooth_sigma > 0 else param
            delta = F.interpolate(d * f, scale_factor=f, mode="trilinear", align_corners=False) if f > 1 else d.clone()
    with torch.no_grad():
        delta = delta * w_crop
    out = init.copy()
    region = _insert(_field_np(delta), crop)
    return out + region


# --------------------------------------------------------------------------------------------
# stage guard
# --------------------------------------------------------------------------------------------
@dataclass
class GuardDecision:
    """Outcome of :func:`guard`: keep the deformable field or fall back to the affine one."""

    kept: bool
    reason: str
    ssc_before: float     # SSC-MSE inside the mask, moving_aligned (affine only)
    ssc_after: float      # same after warping with the deformable field
    sdlogj: float         # std of log J over the mask (J > 0 voxels), the plain (not +3) form
    folds: int            # voxels with J <= 0 (whole interior grid)
    max_disp_mm: float    # largest displacement length of the field (mm)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def guard(fixed: np.ndarray, moving_aligned: np.ndarray, mask: np.ndarray, field: np.ndarray,
          spacing_mm, *, margin: float = 0.05, sdlogj_max: float = 0.25, max_disp_mm: float = 20.0,
          max_folds: int = 0) -> GuardDecision:
    """Decide whether a deformable field earns its place on this case.

    Kept only if (1) the SSC-MSE inside ``mask`` between ``fixed`` and ``moving_aligned`` warped by
    ``field`` is below ``(1 - margin)`` x the SSC-MSE without it (``margin`` relative, default 5%:
    linear resampling alone smooths the moving image and lowers SSC-MSE by ~1-3% for a sub-voxel field),
    (2) at most ``max_folds`` voxels have a Jacobian determinant <= 0, (3) the std of log J over
    the mask is at most ``sdlogj_max`` and (4) no displacement is longer than ``max_disp_mm``.
    ``field``: voxel pull field on the fixed grid; ``spacing_mm``: fixed voxel size (3,).
    """
    from .fields import warp
    from .metrics import jacobian_determinant
    from .ssc import ssc_mse

    mask = np.asarray(mask, dtype=bool)
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    jac = jacobian_determinant(field)
    folds = int((jac <= 0).sum())
    inner = mask[2:-2, 2:-2, 2:-2]
    jm = jac[inner] if inner.any() else jac.ravel()
    pos = jm[jm > 0]
    sdlogj = float(np.log(pos).std()) if pos.size else float("inf")
    max_mm = float(np.sqrt(((np.asarray(field, dtype=np.float64) * spacing) ** 2).sum(-1)).max())
    finite = bool(np.isfinite(field).all())
    ssc_before = float(ssc_mse(fixed, moving_aligned, mask))
    ssc_after = float(ssc_mse(fixed, warp(moving_aligned, field), mask)) if finite else float("inf")
    problems = []
    if not finite:
        problems.append("field has NaN/Inf")
    if not ssc_after < ssc_before * (1 - margin):
        problems.append(f"SSC-MSE {ssc_before:.5f} -> {ssc_after:.5f} does not improve by {margin:.0%}")
    if folds > max_folds:
        problems.append(f"{folds} folded voxels (J <= 0)")
    if not sdlogj <= sdlogj_max:
        problems.append(f"SDlogJ {sdlogj:.3f} > {sdlogj_max}")
    if not max_mm <= max_disp_mm:
        problems.append(f"max displacement {max_mm:.1f} mm > {max_disp_mm} mm")
    change = (ssc_after - ssc_before) / ssc_before if ssc_before > 0 else float("nan")
    if problems:
        reason = "rejected (affine kept): " + "; ".join(problems)
    else:
        reason = (f"kept: SSC-MSE {ssc_before:.5f} -> {ssc_after:.5f} ({change:+.1%}), no folds, "
                  f"SDlogJ {sdlogj:.3f}, max {max_mm:.1f} mm")
    return GuardDecision(kept=not problems, reason=reason, ssc_before=ssc_before, ssc_after=ssc_after,
                         sdlogj=sdlogj, folds=folds, max_disp_mm=max_mm)


def card(path: Path | None = None) -> dict:
    """The JSON card of the shipped model nearest to lambda 0.5 (for logs and reports)."""
    models = available_models(path)
    if not models:
        return {}
    p = models[min(models, key=lambda v: abs(v - 0.5))].with_suffix(".json")
    return json.loads(p.read_text()) if p.is_file() else {}
