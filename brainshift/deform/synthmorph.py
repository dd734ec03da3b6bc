"""SynthMorph step: load a trained network and predict a field inside the iUS field of view.

Regularisation control: one trained model per lambda (``model/synthmorph/synthmorph_l{lam:.2f}.pt``);
:func:`load_model` picks the one nearest to the requested value (only 0.50 ships for now).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import model_dir
from .grid import as_image, extract, field_to_numpy, insert, integrate_svf, mask_crop, normalise, resize_field, taper

log = logging.getLogger(__name__)

_STEM = re.compile(r"^synthmorph_l(?P<lam>\d+\.\d+)\.pt$")

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
    """Load a trained SynthMorph network (weights written by :mod:`brainshift.deform.train`).

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
    from .network import build_network

    ck = torch.load(path, map_location=device, weights_only=False)
    net = build_network(ck["net"])
    net.load_state_dict(ck["model"])
    net.to(device).eval()
    return SynthMorphModel(net=net, shape=int(ck["shape"]), lam=float(ck["lambda"]), device=torch.device(device),
                           path=Path(path), card=ck.get("card", {}))


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
    m = extract(mask, crop) > 0.5
    f_img = normalise(extract(fixed, crop), m)
    m_img = normalise(extract(moving_aligned, crop), m)
    if mask_inputs:
        f_img, m_img = f_img * m, m_img * m
    n = model.shape
    with torch.no_grad():
        f_t = F.interpolate(as_image(f_img), size=(n,) * 3, mode="trilinear", align_corners=True)
        m_t = F.interpolate(as_image(m_img), size=(n,) * 3, mode="trilinear", align_corners=True)
        svf = model.velocity(m_t, f_t).cpu()
        size = min(crop.size, max_integration_size)
        svf = resize_field(svf, (size,) * 3)                       # working voxels -> integration voxels
        w = torch.from_numpy(taper(crop))[None, None]
        if size != crop.size:
            w = F.interpolate(w, size=(size,) * 3, mode="trilinear", align_corners=True)
        disp = integrate_svf(svf * w)
        if size != crop.size:
            disp = resize_field(disp, (crop.size,) * 3)
    return insert(field_to_numpy(disp), crop)


def card(path: Path | None = None) -> dict:
    """The JSON card of the shipped model nearest to lambda 0.5 (for logs and reports)."""
    models = available_models(path)
    if not models:
        return {}
    p = models[min(models, key=lambda v: abs(v - 0.5))].with_suffix(".json")
    return json.loads(p.read_text()) if p.is_file() else {}
